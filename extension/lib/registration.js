// Registers the content scripts: in every frame of the sites the user turned on (and
// FaceCloak has access to), and, for frames of other sites that such a page embeds, in
// every frame of every site, where the catcher asks the service worker whether the tab's
// top-level site is on and otherwise stands down. Called whenever settings or permissions
// change and when the browser starts; registrations are rebuilt from settings each time.

import { grantedPatterns } from "./sites.js";

const IDS = ["facecloak-catcher", "facecloak-page-guard", "facecloak-frame-catcher", "facecloak-frame-guard"];
const ALL_SITES = ["http://*/*", "https://*/*"];
const CATCHER = [
  "extension/content/notice.js",
  "extension/content/protect-client.js",
  "extension/content/sniff.js",
  "extension/content/catcher.js",
];
const GUARD = ["extension/content/page-guard.js"];
const FRAMES_ONLY = "extension/content/frames-only.js";

/**
 * The sites whose uploads are protected now (switched on, global switch on, some host
 * access granted), each with the match patterns it has access to: [{site, patterns}].
 */
export async function activeSites(settings) {
  if (!settings.enabled) return [];
  const active = [];
  for (const site of Object.keys(settings.sites).filter((s) => settings.sites[s])) {
    const patterns = await grantedPatterns(site);
    if (patterns.length) active.push({ site, patterns });
  }
  return active;
}

/** Make the registered content scripts match `settings`; returns the protected sites. */
export async function syncContentScripts(settings) {
  const active = await activeSites(settings);
  const existing = await chrome.scripting.getRegisteredContentScripts({ ids: IDS });
  if (existing.length) {
    await chrome.scripting.unregisterContentScripts({ ids: existing.map((s) => s.id) });
  }
  if (!active.length) return active;
  const matches = active.flatMap((a) => a.patterns);
  const everywhere = { runAt: "document_start", allFrames: true, matchOriginAsFallback: true, persistAcrossSessions: true };
  // Frames of other sites: the scripts learn from frames-only.js that the top-level
  // site decides (a top-level page there is not protected at all).
  const elsewhere = { ...everywhere, matches: ALL_SITES, excludeMatches: matches };
  await chrome.scripting.registerContentScripts([
    { ...everywhere, matches, id: IDS[0], world: "ISOLATED", js: CATCHER },
    { ...everywhere, matches, id: IDS[1], world: "MAIN", js: GUARD },
    { ...elsewhere, id: IDS[2], world: "ISOLATED", js: [FRAMES_ONLY, ...CATCHER] },
    { ...elsewhere, id: IDS[3], world: "MAIN", js: [FRAMES_ONLY, ...GUARD] },
  ]);
  return active;
}
