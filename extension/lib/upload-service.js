// Serves the content script's "protect" port: one port per held upload (a picker's
// selection, a drop or a paste). The page itself never reaches this: the port is opened
// by the catcher in the extension's isolated world, and only for files the user gave.
//
// What a caller can get here is deliberately narrow: protected versions of at most
// MAX_FILES images it sends, and only from a frame of a tab whose top-level site the user
// turned on (or a frame of such a site itself). Pairing, settings and the token are never
// reachable from a content script.

import { DaemonClient, DaemonError } from "./daemon.js";
import { fromBase64, toBase64 } from "./base64.js";
import { protectImage } from "./protector.js";
import { EXTENSION_ORIGIN, loadSettings, loadToken, presetFor } from "./settings.js";
import { savePreview } from "./preview.js";
import { activeSites } from "./registration.js";
import { daemonAcceptsSite, normalizeSite, siteCovering } from "./sites.js";

export const PROTECT_PORT = "facecloak-protect";
// What the page did with the protected files, as the catcher reports it.
const DELIVERY = ["read", "handed", "ignored"];
const MAX_FILES = 20;
const MAX_BASE64_CHARS = Math.ceil((40 * 1024 * 1024) / 3) * 4;

/**
 * The protected site that decides for the frame behind `sender`, or null: the tab's
 * top-level site when it is on (whatever the frame's own origin, an opaque one included),
 * else the frame's own site when that is on.
 */
export async function senderSite(sender, settings) {
  const sites = (await activeSites(settings)).map((a) => a.site);
  const top = sender.frameId === 0 ? sender.url : sender.tab?.url;
  const own = sender.origin && sender.origin !== "null" ? sender.origin : sender.url;
  for (const url of [top, own]) {
    const host = normalizeSite(url || "");
    const site = host && siteCovering(host, sites);
    if (site) return site;
  }
  return null;
}

/** True when the two byte arrays are the same. */
function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i += 1) if (a[i] !== b[i]) return false;
  return true;
}

function validFiles(files) {
  return (
    Array.isArray(files) &&
    files.length > 0 &&
    files.length <= MAX_FILES &&
    files.every(
      (f) =>
        f &&
        typeof f.data === "string" &&
        f.data.length <= MAX_BASE64_CHARS &&
        typeof f.mime === "string" &&
        f.mime.startsWith("image/") &&
        typeof f.name === "string",
    )
  );
}

/** Handle one port from the catcher; `activity` is the ActivityLog the popup shows. */
export function servePort(port, activity) {
  let used = false;
  const controller = new AbortController();
  port.onDisconnect.addListener(() => controller.abort());
  let protectedIds = null; // once protected: the activity entries the page's outcome updates
  port.onMessage.addListener(async (message) => {
    if (protectedIds && message?.type === "delivered" && DELIVERY.includes(message.outcome)) {
      const ids = protectedIds;
      protectedIds = null;
      await Promise.all(ids.map((id) => activity.update(id, { delivery: message.outcome })));
      return;
    }
    if (used || message?.type !== "protect") {
      port.disconnect();
      return;
    }
    used = true;
    const post = (reply) => {
      if (!controller.signal.aborted) port.postMessage(reply);
    };
    try {
      const settings = await loadSettings();
      const site = await senderSite(port.sender, settings);
      if (!site) {
        // The user turned protection off for this site (or globally) after the page loaded.
        post({ type: "passthrough" });
        return;
      }
      if (!validFiles(message.files)) {
        throw new DaemonError("rejected", "FaceCloak was handed something that is not a photo.");
      }
      const ids = message.files.map(() => crypto.randomUUID());
      const results = await protectAll(message.files, {
        ids,
        site,
        settings,
        activity,
        post,
        signal: controller.signal,
      });
      protectedIds = ids;
      post({ type: "protected", files: results });
    } catch (err) {
      const known = err instanceof DaemonError;
      if (!known) console.error("FaceCloak: protecting failed", err);
      post({
        type: "failed",
        code: known ? err.code : "failed",
        message: known ? err.message : "FaceCloak could not protect this photo.",
      });
    }
  });
}

async function protectAll(files, { ids, site, settings, activity, post, signal }) {
  const stop = new AbortController();
  const both = AbortSignal.any([signal, stop.signal]);
  const client = new DaemonClient({ port: settings.port, token: await loadToken(), origin: EXTENSION_ORIGIN });
  await Promise.all(
    files.map((f, i) =>
      activity.update(ids[i], { site, name: f.name, state: "sending", progress: 0, faces: null }),
    ),
  );
  try {
    if (!client.token) {
      // Say what the user must do first: a daemon that is not running cannot be paired.
      await client.health();
      throw new DaemonError("unpaired", "FaceCloak is not paired with the FaceCloak service yet.");
    }
    // Every job is queued at once: the daemon batches waiting jobs of one preset. The
    // photos of one upload are one collection: the daemon protects them in one batch, and
    // a person's face in several of them is pushed away from what the photos share.
    const collection = files.length > 1 ? { id: crypto.randomUUID(), size: files.length } : undefined;
    return await Promise.all(
      files.map(async (file, index) => {
        const original = fromBase64(file.data);
        const result = await protectImage(client, {
          bytes: original,
          mime: file.mime,
          // The daemon validates `site` as a host name; IP-literal sites are not sent.
          site: daemonAcceptsSite(site) ? site : undefined,
          preset: presetFor(settings, site),
          collection,
          preview: true,
          timeoutSeconds: settings.timeoutSeconds,
          signal: both,
          onProgress: (p) => {
            activity.update(ids[index], p);
            post({ type: "progress", index, ...p });
          },
        });
        // Never call unchanged bytes protected: the service re-encodes every photo, so the
        // same bytes back with a face in them mean nothing was done to it.
        const bytes = new Uint8Array(result.bytes);
        if (!(result.faces === 0) && sameBytes(bytes, original)) {
          throw new DaemonError("failed", "The FaceCloak service sent this photo back unchanged.");
        }
        if (!/^image\//.test(result.mime || file.mime)) {
          throw new DaemonError("failed", "The FaceCloak service did not answer with a photo.");
        }
        if (result.preview) await savePreview({ ...result.preview, site, name: file.name });
        await activity.update(ids[index], {
          state: "done",
          preset: result.preset ?? null,
          delivery: "pending", // until the catcher says what the page did with it
          progress: 1,
          faces: result.faces,
          seconds: result.seconds,
        });
        return {
          data: toBase64(result.bytes),
          mime: result.mime || file.mime,
          faces: result.faces,
          seconds: result.seconds,
        };
      }),
    );
  } catch (err) {
    // One photo failed: the whole upload is held back, so none of it counts as done.
    stop.abort();
    const reason = err instanceof DaemonError ? err.message : "FaceCloak could not protect this photo.";
    await Promise.all(ids.map((id) => activity.update(id, { state: "failed", error: reason })));
    throw err;
  }
}
