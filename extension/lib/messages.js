// Messages from FaceCloak's pages (popup, options) to the service worker.

/** Send `{type, ...payload}`; resolves to the handler's result or throws its error. */
export async function ask(type, payload = {}) {
  const reply = await chrome.runtime.sendMessage({ type, ...payload });
  if (!reply) throw new Error("FaceCloak's background service did not answer.");
  if (!reply.ok) throw new Error(reply.error);
  return reply.result;
}
