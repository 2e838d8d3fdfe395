// The recent photos and their progress, in chrome.storage.session so the popup can show
// them live (storage.onChanged) and they vanish when the browser closes. Only the
// service worker writes it; updates are chained so concurrent jobs never lose one.

const KEY = "activity";
const KEEP = 12;

export class ActivityLog {
  #chain = Promise.resolve();

  /** Add or update the entry `id` with `fields`; newest entries first. */
  update(id, fields) {
    this.#chain = this.#chain
      .then(async () => {
        const { [KEY]: entries = [] } = await chrome.storage.session.get(KEY);
        const index = entries.findIndex((e) => e.id === id);
        const entry = { ...(index >= 0 ? entries[index] : { id }), ...fields, updatedAt: Date.now() };
        if (index >= 0) entries.splice(index, 1);
        entries.unshift(entry);
        await chrome.storage.session.set({ [KEY]: entries.slice(0, KEEP) });
      })
      .catch((err) => console.error("FaceCloak: could not record activity", err));
    return this.#chain;
  }
}

/** The recorded entries, newest first: {id, site, name, state, progress, faces, seconds, error}. */
export async function readActivity() {
  const { [KEY]: entries = [] } = await chrome.storage.session.get(KEY);
  return entries;
}

export const ACTIVITY_KEY = KEY;
