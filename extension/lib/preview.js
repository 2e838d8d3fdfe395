// The before/after preview of the last protected photo's faces, for the popup.
//
// It holds crops of the ORIGINAL photo's faces, so it lives only in chrome.storage.session
// (closed to content scripts by restrictStorage, gone when the browser closes), under one
// key that each newly protected photo overwrites: never more than the last photo's. Only
// the service worker writes it (from the daemon's answer to the token holder); only the
// extension's own pages read it.

const KEY = "lastPreview";
const DATA_URL = /^data:image\/jpeg;base64,[A-Za-z0-9+/]+=*$/;
const MAX_FACES = 8;

/** Keep `preview` ({faces, preset, site, name}) as the last photo's, dropping the one before. */
export async function savePreview({ faces, preset, site, name }) {
  const clean = (Array.isArray(faces) ? faces : [])
    .filter((f) => DATA_URL.test(f?.before) && DATA_URL.test(f?.after))
    .slice(0, MAX_FACES)
    .map((f) => ({
      before: f.before,
      after: f.after,
      models: Number(f.models) || 0,
      matched: Number(f.matched) || 0,
      unseen: Number(f.unseen) || 0,
      unseenMatched: Number(f.unseen_matched) || 0,
    }));
  if (!clean.length) {
    await chrome.storage.session.remove(KEY);
    return;
  }
  await chrome.storage.session.set({
    [KEY]: { faces: clean, preset: preset || null, site: site || "", name: name || "", at: Date.now() },
  });
}

/** The last photo's preview, or null. */
export async function readPreview() {
  const { [KEY]: preview = null } = await chrome.storage.session.get(KEY);
  return preview;
}

/**
 * "Not matched by 2 of 3 models" (and who still matches), for one face; then what the
 * recognisers the protection was not made with say, the honest part of the check: the
 * attack's own models are fooled by construction, a scraper's are not.
 */
export function matchWords({ models, matched, unseen = 0, unseenMatched = 0 }) {
  if (!models) return "Not measured";
  const unmatched = models - matched;
  const noun = models === 1 ? "model" : "models";
  let words = `Not matched by ${unmatched} of ${models} ${noun}`;
  if (unmatched !== models) words += ` (${matched} still match${matched === 1 ? "es" : ""})`;
  if (!unseen) return words;
  const others = unseen === 1 ? "recogniser" : "recognisers";
  const verdict = unseenMatched
    ? `${unseenMatched} of ${unseen} still match${unseenMatched === 1 ? "es" : ""}`
    : `none of ${unseen} matches`;
  return `${words}; ${others} it was not made with: ${verdict}`;
}

export const PREVIEW_KEY = KEY;
