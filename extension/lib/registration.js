// Registers the content scripts for the sites the user turned on and FaceCloak has host
// access to, and for nothing else. Called whenever settings or permissions change and
// when the browser starts; registrations are rebuilt from settings each time.

import { grantedPatterns } from "./sites.js";

const CATCHER_ID = "facecloak-catcher";
const GUARD_ID = "facecloak-page-guard";

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
  const existing = await chrome.scripting.getRegisteredContentScripts({ ids: [CATCHER_ID, GUARD_ID] });
  if (existing.length) {
    await chrome.scripting.unregisterContentScripts({ ids: existing.map((s) => s.id) });
  }
  if (!active.length) return active;
  const matches = active.flatMap((a) => a.patterns);
  const common = {
    matches,
    runAt: "document_start",
    allFrames: true,
    matchOriginAsFallback: true,
    persistAcrossSessions: true,
  };
  await chrome.scripting.registerContentScripts([
    {
      ...common,
      id: CATCHER_ID,
      world: "ISOLATED",
      js: [
        "extension/content/notice.js",
        "extension/content/protect-client.js",
        "extension/content/sniff.js",
        "extension/content/catcher.js",
      ],
    },
    { ...common, id: GUARD_ID, world: "MAIN", js: ["extension/content/page-guard.js"] },
  ]);
  return active;
}
