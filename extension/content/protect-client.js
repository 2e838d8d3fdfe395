// The catcher's line to the service worker: sends held image files over a port and gets
// back protected Files (same name, same order), or null when protection is off for this
// site. Runs in the extension's isolated world, so the page can neither see nor use it.

(() => {
  if (globalThis.FaceCloakProtectClient) return;

  const PORT_NAME = "facecloak-protect";
  const REPORT_WAIT_MS = 15000;

  function toBase64(buffer) {
    const view = new Uint8Array(buffer);
    if (typeof view.toBase64 === "function") return view.toBase64();
    let binary = "";
    for (let i = 0; i < view.length; i += 0x8000) {
      binary += String.fromCharCode.apply(null, view.subarray(i, i + 0x8000));
    }
    return btoa(binary);
  }

  function fromBase64(text) {
    if (typeof Uint8Array.fromBase64 === "function") return Uint8Array.fromBase64(text);
    const binary = atob(text);
    const out = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) out[i] = binary.charCodeAt(i);
    return out;
  }

  /** A failure the notice explains; `code` as in the service worker's DaemonError. */
  class ProtectError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  /**
   * Protect `images` ([{file, mime}], `mime` the image type its bytes show).
   * `onProgress(index, {state, progress, faces})` reports each photo. Resolves to File[]
   * (protected, same names; the declared type kept unless it was an image type, which the
   * service's answer replaces; `faces` per file, and `report(outcome)` to tell the service
   * worker what the page did with them) or null (protection is off here); rejects with
   * ProtectError.
   */
  async function protect(images, onProgress) {
    const files = await Promise.all(
      images.map(async ({ file, mime }) => ({
        name: file.name,
        mime,
        data: toBase64(await file.arrayBuffer()),
      })),
    );
    let port;
    try {
      port = chrome.runtime.connect({ name: PORT_NAME });
    } catch {
      // The extension was reloaded or removed under this page.
      throw new ProtectError("failed", "FaceCloak was updated or turned off; reload the page.");
    }
    return new Promise((resolve, reject) => {
      let settled = false;
      const finish = (fn, value) => {
        if (settled) return;
        settled = true;
        try {
          port.disconnect();
        } catch {
          // already gone
        }
        fn(value);
      };
      port.onMessage.addListener((reply) => {
        if (reply?.type === "progress") {
          onProgress?.(reply.index, reply);
        } else if (reply?.type === "passthrough") {
          finish(resolve, null);
        } else if (reply?.type === "protected" && reply.files?.length === images.length) {
          const out = reply.files.map(({ data, mime }, i) => {
            const { file } = images[i];
            const type = file.type.startsWith("image/") ? mime || file.type : file.type;
            return new File([fromBase64(data)], file.name, { type, lastModified: file.lastModified });
          });
          out.faces = reply.files.map((f) => f.faces);
          // The port stays open for one more message: what the page did with the files.
          settled = true;
          const close = () => {
            try {
              port.disconnect();
            } catch {
              // already gone
            }
          };
          const timer = setTimeout(close, REPORT_WAIT_MS);
          out.report = (outcome) => {
            clearTimeout(timer);
            try {
              port.postMessage({ type: "delivered", outcome });
            } catch {
              // the service worker went away: nothing to tell
            }
            close();
          };
          resolve(out);
        } else {
          finish(
            reject,
            new ProtectError(reply?.code || "failed", reply?.message || "FaceCloak could not protect this photo."),
          );
        }
      });
      port.onDisconnect.addListener(() =>
        finish(reject, new ProtectError("failed", "FaceCloak's background service stopped unexpectedly.")),
      );
      port.postMessage({ type: "protect", files });
    });
  }

  globalThis.FaceCloakProtectClient = Object.freeze({ protect, ProtectError });
})();
