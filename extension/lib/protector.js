// Protects one image through the daemon's job API: submit, poll the job for progress,
// fetch the result. Fails with a DaemonError (never with the original image).

import { DaemonError } from "./daemon.js";

const POLL_MS = [150, 250, 400, 600, 800, 1000];
// Waits between offers of a photo to a daemon whose queue is full (429, "busy").
const BUSY_RETRY_MS = [250, 500, 1000, 2000];

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(signal.reason);
      },
      { once: true },
    );
  });
}

/**
 * Submit the job; while the daemon's queue is full (an upload of more photos than it
 * holds at once), wait and offer it again until `signal` (the photo's time limit) ends.
 * Every other refusal is thrown as it is.
 */
async function submitWhenThereIsRoom(client, bytes, mime, options, { onProgress, signal }) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await client.submitJob(bytes, mime, { ...options, signal });
    } catch (err) {
      if (!(err instanceof DaemonError) || err.code !== "busy") throw err;
      onProgress({ state: "queued", progress: 0, faces: null });
      await sleep(BUSY_RETRY_MS[Math.min(attempt, BUSY_RETRY_MS.length - 1)], signal);
    }
  }
}

/**
 * Protect `bytes` (ArrayBuffer of an image of type `mime`) for `site`; `collection`
 * ({id, size}) when it is one of an upload's several photos.
 * `onProgress({state, progress, faces})` is called on every poll; `signal` cancels. Resolves to
 * {bytes, mime, faces, seconds, preset, preview}; rejects with DaemonError (code "timeout"
 * past `timeoutSeconds`). With `preview`, `preview` is the daemon's preview of the faces
 * (see DaemonClient.jobPreview), or null when it has none.
 */
export async function protectImage(
  client,
  { bytes, mime, site, preset, collection, preview = false, timeoutSeconds, onProgress, signal },
) {
  const timeout = AbortSignal.timeout(timeoutSeconds * 1000);
  const deadline = signal ? AbortSignal.any([signal, timeout]) : timeout;
  try {
    const id = await submitWhenThereIsRoom(client, bytes, mime, { site, preset, collection }, {
      onProgress,
      signal: deadline,
    });
    onProgress({ state: "queued", progress: 0, faces: null });
    for (let poll = 0; ; poll += 1) {
      const job = await client.jobStatus(id, { signal: deadline });
      onProgress({ state: job.state, progress: Number(job.progress) || 0, faces: job.faces ?? null });
      if (job.state === "done") {
        const result = await client.jobResult(id, { signal: deadline });
        // The preview is a nicety: a daemon without one (older, or a newer photo's) is fine.
        const faces = preview ? await client.jobPreview(id, { signal: deadline }).catch(() => null) : null;
        return { ...result, faces: result.faces ?? job.faces ?? null, preset: job.preset ?? null, preview: faces };
      }
      if (job.state === "failed") {
        throw new DaemonError("failed", job.error || "The FaceCloak service could not protect this photo.");
      }
      await sleep(POLL_MS[Math.min(poll, POLL_MS.length - 1)], deadline);
    }
  } catch (err) {
    if (timeout.aborted && !(err instanceof DaemonError && err.code !== "unreachable")) {
      throw new DaemonError(
        "timeout",
        `The FaceCloak service did not finish within ${timeoutSeconds} seconds.`,
      );
    }
    throw err;
  }
}
