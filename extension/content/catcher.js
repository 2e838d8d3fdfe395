// Catches image files on their way into the page, before any of the page's own code
// sees them, and hands the page protected copies instead.
//
// Runs at document_start in the extension's ISOLATED world of every frame of a site the
// user turned on. Its capture listeners on `window` are registered before any page
// script runs, so they are the first to see each event; DOM events, files and
// DataTransfers are shared with the page, but this world's functions and prototypes are
// not, so the page can neither tamper with the catcher nor reach its channel to the
// service worker. See extension/README.md for the threat model.
//
// Only events the browser made for the user (isTrusted) are held: a page cannot make
// FaceCloak do work by dispatching its own events, and the protected events re-dispatched
// here (isTrusted false) are never caught a second time.

(() => {
  if (globalThis.FaceCloakCatcher) return;
  globalThis.FaceCloakCatcher = true;

  const notice = globalThis.FaceCloakNotice;
  const { protect } = globalThis.FaceCloakProtectClient;

  const MIME_BY_EXTENSION = {
    jpg: "image/jpeg", jpeg: "image/jpeg", jfif: "image/jpeg", png: "image/png",
    webp: "image/webp", heic: "image/heic", heif: "image/heif", avif: "image/avif",
    bmp: "image/bmp", tif: "image/tiff", tiff: "image/tiff", gif: "image/gif",
  };

  function extensionMime(file) {
    const ext = /\.([a-z0-9]+)$/i.exec(file.name)?.[1]?.toLowerCase();
    return (ext && MIME_BY_EXTENSION[ext]) || "";
  }

  /** A raster image FaceCloak must protect (SVG is a drawing, not a photo). */
  function isImage(file) {
    if (file.type === "image/svg+xml") return false;
    return file.type.startsWith("image/") || (!file.type && Boolean(extensionMime(file)));
  }

  function withMime(file) {
    return file.type ? file : new File([file], file.name, { type: extensionMime(file), lastModified: file.lastModified });
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  const EXPLANATIONS = {
    unreachable:
      "The FaceCloak service is not running on this computer, so nothing was uploaded.\n" +
      "Start it with `facecloak serve` and try again, or turn FaceCloak off for this site in its popup to upload without protection.",
    unpaired:
      "FaceCloak is not paired with the FaceCloak service, so nothing was uploaded.\n" +
      "Run `facecloak pair` and enter the code on FaceCloak's options page, then try again.",
    unverified:
      "Another program is answering on the FaceCloak service's port; it could not prove it is the service this browser paired with, so FaceCloak sent it nothing and nothing was uploaded.\n" +
      "Stop that program and start `facecloak serve`, or check the port on FaceCloak's options page.",
    busy:
      "The FaceCloak service is busy with other photos, so nothing was uploaded.\nTry again in a moment.",
  };

  function explain(err) {
    if (EXPLANATIONS[err.code]) return EXPLANATIONS[err.code];
    const tail =
      err.code === "timeout"
        ? "Try again, pick the fast preset on FaceCloak's options page, or turn FaceCloak off for this site."
        : "Try another photo, or turn FaceCloak off for this site to upload without protection.";
    return `${err.message}\nNothing was uploaded. ${tail}`;
  }

  /**
   * Protect the images among `files` (others pass untouched, order kept), then call
   * `deliver(files)` with the protected list. On failure nothing is delivered and the
   * notice says why: the upload never reaches the page.
   */
  async function hold(files, deliver) {
    const positions = files.flatMap((f, i) => (isImage(f) ? [i] : []));
    const count = positions.length;
    const fractions = new Array(count).fill(0);
    const title = `FaceCloak is protecting ${plural(count, "photo")}…`;
    const message = "The upload continues as soon as the faces are protected.";
    notice.show({ kind: "progress", title, message, progress: 0 });
    try {
      const images = positions.map((i) => withMime(files[i]));
      const result = await protect(images, (index, p) => {
        fractions[index] = p.state === "done" ? 1 : Number(p.progress) || 0;
        const overall = fractions.reduce((a, b) => a + b, 0) / count;
        notice.show({ kind: "progress", title, message, progress: overall });
      });
      if (result === null) {
        // Protection was turned off for this site after the page loaded: the user's choice.
        notice.hide();
        deliver(files);
        return;
      }
      const out = files.slice();
      positions.forEach((fileIndex, k) => {
        out[fileIndex] = result[k];
      });
      const faces = result.faces.reduce((a, b) => a + (Number(b) || 0), 0);
      notice.show({
        kind: "done",
        title: `${plural(count, "photo")} protected`,
        message: `FaceCloak protected ${plural(faces, "face")} before the upload.`,
        autoHideMs: 4000,
      });
      deliver(out);
    } catch (err) {
      notice.show({
        kind: "error",
        reason: err.code || "failed",
        title: "FaceCloak held back this upload",
        message: explain(err),
      });
    }
  }

  function transferOf(files, strings) {
    const transfer = new DataTransfer();
    for (const { type, data } of strings) transfer.setData(type, data);
    for (const file of files) transfer.items.add(file);
    return transfer;
  }

  function stringsOf(transfer) {
    return Array.from(transfer.types)
      .filter((type) => type !== "Files")
      .map((type) => ({ type, data: transfer.getData(type) }));
  }

  function shadowRootOf(element) {
    return element instanceof Element ? chrome.dom.openOrClosedShadowRoot(element) : null;
  }

  // Inside a closed shadow root the event's path stops at the host: look inside.
  function fileInputIn(root) {
    for (const el of root.querySelectorAll("*")) {
      if (el instanceof HTMLInputElement && el.type === "file" && el.files?.length) return el;
      const inner = shadowRootOf(el);
      const found = inner && fileInputIn(inner);
      if (found) return found;
    }
    return null;
  }

  function fileInputOf(event) {
    const first = event.composedPath()[0];
    if (first instanceof HTMLInputElement && first.type === "file") return first;
    const root = shadowRootOf(first);
    return root ? fileInputIn(root) : null;
  }

  function deepElementAt(x, y, element) {
    let current = element;
    for (let root = shadowRootOf(current); root; root = shadowRootOf(current)) {
      const inner = root.elementFromPoint(x, y);
      if (!inner || inner === current) break;
      current = inner;
    }
    return current;
  }

  function deepActiveElement(element) {
    let current = element;
    for (let root = shadowRootOf(current); root?.activeElement; root = shadowRootOf(current)) {
      current = root.activeElement;
    }
    return current;
  }

  function swallow(event) {
    if (event.cancelable) event.preventDefault();
    event.stopImmediatePropagation();
  }

  // ---- file inputs -------------------------------------------------------------------
  // Choosing files fires `input` (composed) then `change` (not composed, so from inside a
  // shadow root it never reaches window). The first one takes the files and clears the
  // input, so the page never reads the originals from it; the second is swallowed.

  const heldInputs = new WeakMap(); // input -> token of its latest hold

  function swallowCompanion(input) {
    const listener = (event) => {
      input.removeEventListener("change", listener, true);
      if (event.isTrusted) event.stopImmediatePropagation();
    };
    input.addEventListener("change", listener, true);
    setTimeout(() => input.removeEventListener("change", listener, true), 0);
  }

  function onFileInput(event) {
    if (!event.isTrusted) return;
    const input = fileInputOf(event);
    if (!input) return;
    const files = Array.from(input.files || []);
    if (!files.some(isImage)) {
      if (!files.length && heldInputs.has(input)) event.stopImmediatePropagation();
      return;
    }
    event.stopImmediatePropagation();
    input.value = "";
    const token = {};
    heldInputs.set(input, token);
    if (event.type === "input") swallowCompanion(input);
    hold(files, (out) => {
      if (heldInputs.get(input) !== token) return; // the user picked other files meanwhile
      heldInputs.delete(input);
      input.files = transferOf(out, []).files;
      input.dispatchEvent(new Event("input", { bubbles: true, composed: true }));
      input.dispatchEvent(new Event("change", { bubbles: true }));
    });
  }

  // ---- drag and drop -----------------------------------------------------------------

  function onDrop(event) {
    if (!event.isTrusted || !event.dataTransfer) return;
    const files = Array.from(event.dataTransfer.files);
    if (!files.some(isImage)) return;
    swallow(event);
    const target = deepElementAt(event.clientX, event.clientY, event.composedPath()[0]);
    const strings = stringsOf(event.dataTransfer);
    const init = {
      bubbles: true, cancelable: true, composed: true,
      clientX: event.clientX, clientY: event.clientY, screenX: event.screenX, screenY: event.screenY,
      ctrlKey: event.ctrlKey, shiftKey: event.shiftKey, altKey: event.altKey, metaKey: event.metaKey,
    };
    hold(files, (out) => {
      const dataTransfer = transferOf(out, strings);
      const receiver = target?.isConnected ? target : document.documentElement;
      receiver.dispatchEvent(new DragEvent("drop", { ...init, dataTransfer }));
    });
  }

  // ---- paste -------------------------------------------------------------------------

  function onPaste(event) {
    if (!event.isTrusted || !event.clipboardData) return;
    const files = Array.from(event.clipboardData.files);
    if (!files.some(isImage)) return;
    swallow(event);
    const first = event.composedPath()[0];
    const target = first instanceof Element ? deepActiveElement(first) : first;
    const strings = stringsOf(event.clipboardData);
    hold(files, (out) => {
      const clipboardData = transferOf(out, strings);
      const receiver = target?.isConnected ? target : document;
      receiver.dispatchEvent(
        new ClipboardEvent("paste", { bubbles: true, cancelable: true, composed: true, clipboardData }),
      );
    });
  }

  const capture = { capture: true };
  window.addEventListener("input", onFileInput, capture);
  window.addEventListener("change", onFileInput, capture);
  window.addEventListener("drop", onDrop, capture);
  window.addEventListener("paste", onPaste, capture);
})();
