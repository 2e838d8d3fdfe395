// The service worker: the only part of FaceCloak that talks to the daemon. It answers
// the popup and the options page (messages with a `type`), tells a content script in a
// frame whether its tab is protected (the only thing it answers a content script), serves
// the content script's protect ports, keeps content-script registration in step with
// settings and host permissions, and mirrors settings to the daemon.

import { ActivityLog } from "./lib/activity.js";
import { DaemonClient, DaemonError } from "./lib/daemon.js";
import { syncContentScripts } from "./lib/registration.js";
import {
  EXTENSION_ORIGIN,
  loadSettings,
  loadToken,
  PRESETS,
  restrictStorage,
  saveSettings,
  saveToken,
} from "./lib/settings.js";
import { daemonAcceptsSite, grantedPatterns, normalizeSite, siteCovering, SUGGESTED_SITES } from "./lib/sites.js";
import { PROTECT_PORT, senderSite, servePort } from "./lib/upload-service.js";

const activity = new ActivityLog();
// Storage is closed to content scripts before any content script is registered.
const storageRestricted = restrictStorage().catch((err) => console.error("FaceCloak: storage stays open", err));

async function client() {
  const settings = await loadSettings();
  return new DaemonClient({ port: settings.port, token: await loadToken(), origin: EXTENSION_ORIGIN });
}

/** Copy the browser's settings to the daemon; best effort (it may not be running). */
async function mirrorToDaemon(settings, removedSites = []) {
  // The suggested sites are off here until the user turns them on (and grants access).
  const sites = Object.fromEntries(SUGGESTED_SITES.map((s) => [s.host, false]));
  for (const [site, on] of Object.entries(settings.sites)) {
    if (daemonAcceptsSite(site)) sites[site] = Boolean(on);
  }
  for (const site of removedSites) if (daemonAcceptsSite(site)) sites[site] = null;
  const patch = { enabled: settings.enabled, sites };
  if (settings.preset) patch.preset = settings.preset;
  try {
    await (await client()).putSettings(patch);
  } catch (err) {
    if (!(err instanceof DaemonError)) throw err;
  }
}

async function settingsChanged(settings, removedSites) {
  await syncContentScripts(settings);
  await mirrorToDaemon(settings, removedSites);
}

/**
 * The daemon's state for the popup: connected (with device and preset), unpaired,
 * unverified (something else on the port) or unreachable.
 */
async function daemonStatus() {
  const c = await client();
  let health;
  try {
    health = await c.health();
  } catch (err) {
    return { state: "unreachable", message: err.message };
  }
  const base = {
    device: health.device,
    version: health.version,
    queue: health.queue,
    // The daemon's presets, for the strength choices (this extension's list if it has none).
    presets: Array.isArray(health.presets) && health.presets.length ? health.presets.map(String) : null,
  };
  try {
    const remote = await c.getSettings();
    return { ...base, state: "connected", preset: remote.preset };
  } catch (err) {
    if (err instanceof DaemonError && (err.code === "unpaired" || err.code === "unverified")) {
      return { ...base, state: err.code, message: err.message };
    }
    return { ...base, state: "error", message: err.message };
  }
}

async function siteStatus(url, settings) {
  const host = normalizeSite(url || "");
  if (!host) return null;
  const site = siteCovering(host, Object.keys(settings.sites)) || host;
  const granted = (await grantedPatterns(site)).length > 0;
  const wanted = Boolean(settings.sites[site]);
  return { site, host, scheme: new URL(url).protocol.slice(0, -1), on: wanted && granted, wanted, granted };
}

const handlers = {
  async "get-status"({ url }) {
    const settings = await loadSettings();
    const [daemon, site] = await Promise.all([daemonStatus(), siteStatus(url, settings)]);
    const presets = daemon.presets || [...PRESETS];
    return { daemon, site, settings, presets, paired: Boolean(await loadToken()) };
  },

  // The strength for one site: a preset's name, or null for the global choice.
  async "set-site-preset"({ site, preset }) {
    const key = normalizeSite(site);
    if (!key) throw new Error(`"${site}" is not a web site's address.`);
    const settings = await loadSettings();
    const sitePresets = { ...settings.sitePresets, [key]: preset || null };
    await saveSettings({ sitePresets });
    return { site: key, preset: preset || null };
  },

  // The popup or options page asked for host access (a user gesture) before sending this.
  async "set-site"({ site, on }) {
    const key = normalizeSite(site);
    if (!key) throw new Error(`"${site}" is not a web site's address.`);
    const settings = await loadSettings();
    if (on && !(await grantedPatterns(key)).length) {
      throw new Error(`FaceCloak was not given access to ${key}.`);
    }
    const next = await saveSettings({ sites: { ...settings.sites, [key]: Boolean(on) } });
    await settingsChanged(next);
    return { site: key, on: Boolean(on) };
  },

  async "remove-site"({ site }) {
    const settings = await loadSettings();
    const sites = { ...settings.sites };
    delete sites[site];
    const sitePresets = { ...settings.sitePresets };
    delete sitePresets[site];
    const next = await saveSettings({ sites, sitePresets });
    await settingsChanged(next, [site]);
    return {};
  },

  async "set-enabled"({ enabled }) {
    await settingsChanged(await saveSettings({ enabled }));
    return {};
  },

  async "set-options"(options) {
    const patch = {};
    for (const key of ["port", "preset", "timeoutSeconds"]) if (key in options) patch[key] = options[key];
    await settingsChanged(await saveSettings(patch));
    return {};
  },

  async pair({ code }) {
    const clean = String(code || "").trim();
    if (!clean) throw new Error("Enter the code that “facecloak pair” printed.");
    const token = await (await client()).pair(clean, EXTENSION_ORIGIN);
    await saveToken(token);
    await mirrorToDaemon(await loadSettings());
    return { paired: true };
  },

  async unpair() {
    await saveToken(null);
    return { paired: false };
  },
};

// What a content script may ask: whether its frame's tab is protected (the catcher in a
// frame of a site that is not on itself asks when it starts). Nothing else.
const contentHandlers = {
  async "frame-status"(_message, sender) {
    return { protected: Boolean(await senderSite(sender, await loadSettings())) };
  },
};

chrome.runtime.onMessage.addListener((message, sender, sendResponse) => {
  if (sender.id !== chrome.runtime.id) return false;
  // Only FaceCloak's own pages may change settings or pair; content scripts run in
  // web pages and get only their frame's status.
  const fromExtensionPage = sender.url?.startsWith(`${EXTENSION_ORIGIN}/`);
  if (!fromExtensionPage) {
    const ask = contentHandlers[message?.type];
    if (!ask) return false;
    ask(message, sender).then(sendResponse, () => sendResponse({ protected: true }));
    return true;
  }
  const handler = handlers[message?.type];
  if (!handler) return false;
  handler(message)
    .then((result) => sendResponse({ ok: true, result }))
    .catch((err) => sendResponse({ ok: false, error: err.message, code: err.code }));
  return true;
});

chrome.runtime.onConnect.addListener((port) => {
  if (port.name === PROTECT_PORT && port.sender?.id === chrome.runtime.id) servePort(port, activity);
  else port.disconnect();
});

const resync = () => storageRestricted.then(loadSettings).then(syncContentScripts);
chrome.runtime.onInstalled.addListener(resync);
chrome.runtime.onStartup.addListener(resync);
chrome.permissions.onAdded.addListener(resync);
chrome.permissions.onRemoved.addListener(resync);
