// The extension's settings and pairing token in chrome.storage.local. They are the
// source of truth for what the browser does (protection must fail closed even when the
// daemon is down, so the browser has to know which sites are on without asking it); the
// daemon keeps a mirror through PUT /v1/settings (see background.js).
//
// Only the extension's own pages and service worker may read or write them: content
// scripts run inside web pages (a compromised page renderer can run code as one), so
// both storage areas are closed to them (restrictStorage), and what a content script
// needs it asks the service worker.

/** This extension's origin, chrome-extension://<id>. */
export const EXTENSION_ORIGIN = new URL(chrome.runtime.getURL("")).origin;

/**
 * Close chrome.storage.local and chrome.storage.session to content scripts. Chrome keeps
 * the access level; it is set again at every start of the service worker all the same.
 * Chrome versions without storage.local.setAccessLevel leave local storage open.
 */
export async function restrictStorage() {
  for (const area of [chrome.storage.local, chrome.storage.session]) {
    if (typeof area.setAccessLevel === "function") {
      await area.setAccessLevel({ accessLevel: "TRUSTED_CONTEXTS" });
    }
  }
}

/**
 * Default values; `preset: null` means "the daemon's own preset". `sitePresets` maps a
 * site key to the preset its uploads use instead (the strength per site).
 */
export const DEFAULT_SETTINGS = Object.freeze({
  enabled: true,
  port: 8765,
  preset: null,
  timeoutSeconds: 300,
  sites: {},
  sitePresets: {},
});

/**
 * The presets this extension knows; the daemon's own list (GET /v1/health `presets`) is
 * shown instead when it answers, so a preset added to the daemon needs no new extension.
 * The daemon refuses a preset it does not know (400), so a name is only checked here for
 * its shape.
 */
export const PRESETS = Object.freeze(["fast", "balanced", "natural", "strong", "paper"]);
const PRESET_NAME = /^[a-z][a-z0-9_-]{0,31}$/;

function checkPreset(preset) {
  if (preset !== null && !(typeof preset === "string" && PRESET_NAME.test(preset))) {
    throw new Error(`The preset must be one of ${PRESETS.join(", ")}.`);
  }
  return preset;
}

/** The preset for uploads on `site`: its own, else the global choice, else null (the daemon's). */
export function presetFor(settings, site) {
  return (site && settings.sitePresets?.[site]) || settings.preset || null;
}

const KEYS = Object.keys(DEFAULT_SETTINGS);

/** The settings, with defaults filled in. `sites` maps a site key to true/false. */
export async function loadSettings() {
  const stored = await chrome.storage.local.get(KEYS);
  return {
    ...DEFAULT_SETTINGS,
    ...stored,
    sites: { ...(stored.sites || {}) },
    sitePresets: { ...(stored.sitePresets || {}) },
  };
}

/**
 * Validate and save a partial update; returns the new settings. Throws an Error with a
 * message fit for the options page on a bad value.
 */
export async function saveSettings(patch) {
  const clean = {};
  if ("enabled" in patch) clean.enabled = Boolean(patch.enabled);
  if ("port" in patch) {
    const port = Number(patch.port);
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      throw new Error("The port must be a whole number between 1 and 65535.");
    }
    clean.port = port;
  }
  if ("preset" in patch) clean.preset = checkPreset(patch.preset);
  if ("sitePresets" in patch) {
    clean.sitePresets = {};
    for (const [site, preset] of Object.entries(patch.sitePresets || {})) {
      if (preset !== null) clean.sitePresets[site] = checkPreset(preset);
    }
  }
  if ("timeoutSeconds" in patch) {
    const seconds = Number(patch.timeoutSeconds);
    if (!Number.isFinite(seconds) || seconds < 5 || seconds > 3600) {
      throw new Error("The time limit must be between 5 and 3600 seconds.");
    }
    clean.timeoutSeconds = seconds;
  }
  if ("sites" in patch) clean.sites = { ...patch.sites };
  await chrome.storage.local.set(clean);
  return loadSettings();
}

/** The pairing token, or null. Only the service worker calls this. */
export async function loadToken() {
  const { token } = await chrome.storage.local.get("token");
  return typeof token === "string" && token ? token : null;
}

/** Store (or with null, forget) the pairing token. */
export async function saveToken(token) {
  if (token) await chrome.storage.local.set({ token });
  else await chrome.storage.local.remove("token");
}
