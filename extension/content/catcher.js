// Catches image files on their way into the page, before any of the page's own code
// sees them, and hands the page protected copies instead.
//
// Runs at document_start in the extension's ISOLATED world of every frame of a site the
// user turned on, and of frames of other sites inside such a page (lib/registration.js).
// Its capture listeners on `window` are registered before any page script runs, so they
// are the first to see each event; DOM events, files and DataTransfers are shared with the
// page, but this world's functions and prototypes are not, so the page can neither tamper
// with the catcher nor reach its channel to the service worker. See extension/README.md
// for the threat model.
//
// Every file picker goes through the catcher: a click that would open one is cancelled and
// the catcher opens its own picker on an input of its own, which the page never sees; the
// page guard (page-guard.js, in the page's world) sends it the pickers that no event shows
// (inputs outside the document, showPicker()). Files that reach the page another way (a
// drop, a paste, files set on an input) are held from the event that brings them. Whether
// a file is an image is decided by its first bytes (sniff.js).

(() => {
  if (globalThis.FaceCloakCatcher) return;
  globalThis.FaceCloakCatcher = true;

  // In a frame of a site that is not on itself, the tab's top-level site decides.
  const framesOnly = globalThis.FaceCloakFramesOnly === true;
  function sameOriginAsTop() {
    try {
      return window.top.location.origin === window.origin; // about:blank frames: inherited
    } catch {
      return false; // another origin: ask the service worker
    }
  }
  // A page of a site that is off: the catcher only tells the page guard to stand down (over
  // their line, below: Chromium runs frames-only.js once per frame, in this world only, so
  // the guard cannot read the flag itself) and then does nothing at all.
  // A frame with the top-level page's origin has its site, which is off, too.
  const standDown = framesOnly && (window === window.top || sameOriginAsTop());
  let status = standDown ? "off" : framesOnly ? "pending" : "on"; // "pending" behaves as "on": fail closed
  if (framesOnly && !standDown) {
    chrome.runtime.sendMessage({ type: "frame-status" }).then(
      (reply) => {
        if (reply && typeof reply.protected === "boolean") status = reply.protected ? "on" : "off";
      },
      () => {},
    );
  }
  const active = () => status !== "off";

  const notice = globalThis.FaceCloakNotice;
  const { protect } = globalThis.FaceCloakProtectClient;
  const { imageTypeOf } = globalThis.FaceCloakSniff;

  const MIME_BY_EXTENSION = {
    jpg: "image/jpeg", jpeg: "image/jpeg", jfif: "image/jpeg", png: "image/png",
    webp: "image/webp", heic: "image/heic", heif: "image/heif", avif: "image/avif",
    bmp: "image/bmp", tif: "image/tiff", tiff: "image/tiff", gif: "image/gif",
  };

  function extensionMime(file) {
    const ext = /\.([a-z0-9]+)$/i.exec(file.name)?.[1]?.toLowerCase();
    return (ext && MIME_BY_EXTENSION[ext]) || "";
  }

  /**
   * The MIME type to protect `file` as, or "" when it is not a raster image: its first
   * bytes decide; a declared image type or extension adds to them, never takes away (SVG
   * is a drawing, not a photo).
   */
  async function photoType(file) {
    const sniffed = await imageTypeOf(file);
    if (sniffed) return sniffed;
    if (file.type === "image/svg+xml") return "";
    if (file.type.startsWith("image/")) return file.type;
    return file.type ? "" : extensionMime(file);
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

  // What the page did with the files it was handed (see handOver): the notice and the
  // popup say "protected" only when the page read them.
  const OUTCOME_NOTICE = {
    read: (count, faces) => ({
      kind: "done",
      title: `${plural(count, "photo")} protected`,
      message: `FaceCloak protected ${plural(faces, "face")}; the page received only the protected ${count === 1 ? "photo" : "photos"}.`,
      autoHideMs: 4000,
    }),
    handed: (count, faces) => ({
      kind: "done",
      title: `${plural(count, "photo")} protected, handed to the page`,
      message: `FaceCloak protected ${plural(faces, "face")} and handed the page the protected ${count === 1 ? "photo" : "photos"}; it has not read ${count === 1 ? "it" : "them"} yet.`,
      autoHideMs: 6000,
    }),
    ignored: (count) => ({
      kind: "error",
      reason: "ignored",
      title: "The page did not take the protected photo",
      message:
        `FaceCloak protected ${plural(count, "photo")}, but this page did not read ${count === 1 ? "it" : "them"}, so nothing was uploaded.\n` +
        "Try again with the page's own upload button, or drop the photo on its upload area.",
    }),
  };

  /**
   * Sort `files` by their bytes, protect the images among them (others pass untouched,
   * order kept), then call `deliver(files)` with the result; files with no image are
   * delivered as they are. `deliver` returns (a promise of) what the page did with them:
   * "read", "handed" or "ignored". On failure nothing is delivered and the notice says why:
   * the upload never reaches the page. Resolves when it is settled either way.
   */
  async function screen(files, deliver) {
    const types = await Promise.all(files.map(photoType));
    const positions = files.flatMap((_, i) => (types[i] ? [i] : []));
    if (!positions.length) {
      await deliver(files);
      return;
    }
    const count = positions.length;
    const fractions = new Array(count).fill(0);
    const title = `FaceCloak is protecting ${plural(count, "photo")}…`;
    const message = "The upload continues as soon as the faces are protected.";
    notice.show({ kind: "progress", title, message, progress: 0 });
    try {
      const images = positions.map((i) => ({ file: files[i], mime: types[i] }));
      const result = await protect(images, (index, p) => {
        fractions[index] = p.state === "done" ? 1 : Number(p.progress) || 0;
        const overall = fractions.reduce((a, b) => a + b, 0) / count;
        notice.show({ kind: "progress", title, message, progress: overall });
      });
      if (result === null) {
        // Protection was turned off for this site after the page loaded: the user's choice.
        notice.hide();
        await deliver(files);
        return;
      }
      const out = files.slice();
      positions.forEach((fileIndex, k) => {
        out[fileIndex] = result[k];
      });
      const faces = result.faces.reduce((a, b) => a + (Number(b) || 0), 0);
      notice.show({ kind: "progress", title, message: "Handing the protected photos to the page…", progress: 1 });
      const outcome = (await deliver(out)) || "handed";
      result.report(outcome);
      notice.show((OUTCOME_NOTICE[outcome] || OUTCOME_NOTICE.handed)(count, faces));
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

  const isFileInput = (el) => el instanceof HTMLInputElement && el.type === "file";

  // Inside a closed shadow root the event's path stops at the host: look inside.
  function fileInputIn(root) {
    for (const el of root.querySelectorAll("*")) {
      if (isFileInput(el) && el.files?.length) return el;
      const inner = shadowRootOf(el);
      const found = inner && fileInputIn(inner);
      if (found) return found;
    }
    return null;
  }

  function fileInputOf(event) {
    const first = event.composedPath()[0];
    if (isFileInput(first)) return first;
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

  // ---- handing files over ------------------------------------------------------------
  // The page guard hands them over in the page's own world (page-guard.js: drops whose
  // items give file entries and handles, and a watch on whether the page reads them) and
  // answers what the page did; without a guard the catcher dispatches them itself.

  const OUTCOME_WAIT_MS = 5000;
  const waiting = new Map(); // id -> resolve(outcome)
  let handed = 0;

  function outcomeOf(id) {
    return new Promise((resolve) => {
      waiting.set(id, resolve);
      setTimeout(() => {
        if (waiting.delete(id)) resolve("handed");
      }, OUTCOME_WAIT_MS);
    });
  }

  function dispatchItself(kind, receiver, files, strings, init) {
    if (kind === "input") {
      receiver.files = transferOf(files, []).files;
      receiver.dispatchEvent(new Event("input", { bubbles: true, composed: true }));
      receiver.dispatchEvent(new Event("change", { bubbles: true }));
      return "handed";
    }
    const transfer = transferOf(files, strings);
    let last;
    if (kind === "paste") {
      last = new ClipboardEvent("paste", { ...init, clipboardData: transfer });
      receiver.dispatchEvent(last);
    } else {
      for (const type of ["dragenter", "dragover", "drop"]) {
        last = new DragEvent(type, { ...init, dataTransfer: transfer });
        receiver.dispatchEvent(last);
      }
    }
    return last.defaultPrevented ? "handed" : "ignored";
  }

  /** Hand `files` to the page (`kind`: "input", "drop" or "paste"); resolves to the outcome. */
  function handOver(kind, receiver, files, strings = [], init = {}, effects = null) {
    handed += 1;
    const id = `hand-${handed}`;
    // An element inside a shadow root would reach the guard as its host (an event's
    // relatedTarget is retargeted), so there the catcher hands the files over itself.
    if (guard && !(receiver.getRootNode?.() instanceof ShadowRoot)) {
      const outcome = outcomeOf(id); // the page may read the files while they are handed over
      guard.dispatchEvent(new MouseEvent("facecloak-receiver", { relatedTarget: receiver }));
      const request = new CustomEvent("facecloak-hand", {
        cancelable: true,
        detail: { id, kind, files, strings, init, effects },
      });
      if (!guard.dispatchEvent(request)) return outcome;
      waiting.delete(id);
    }
    return Promise.resolve(dispatchItself(kind, receiver, files, strings, init));
  }

  const deliverTo = (input, files) => handOver("input", input, files);

  // ---- file pickers --------------------------------------------------------------------
  // The catcher opens every picker itself, on an input that only it holds (never in the
  // document, so its events reach no one else), and gives the page's input the screened
  // files afterwards. The page's own input never holds the originals.

  // A page may read its input when the window gets the focus back after the picker closed
  // (or on a timer it starts then): while a picker of the catcher's is open or its photos
  // are being protected, the window's `focus` is held, and given to the page once the
  // files are on its input (or the picker was cancelled, or the upload held back).
  let pickersOpen = 0;
  let heldFocus = false;

  function onWindowFocus(event) {
    if (!event.isTrusted || event.target !== window || pickersOpen === 0) return;
    event.stopImmediatePropagation();
    heldFocus = true;
  }

  function pickerSettled() {
    pickersOpen = Math.max(0, pickersOpen - 1);
    if (pickersOpen === 0 && heldFocus) {
      heldFocus = false;
      window.dispatchEvent(new FocusEvent("focus"));
    }
  }

  function openPicker({ accept, multiple, directory }, deliver, cancel) {
    const picker = document.createElement("input");
    picker.type = "file";
    if (accept) picker.accept = accept;
    picker.multiple = Boolean(multiple);
    if (directory) picker.webkitdirectory = true;
    let settled = false;
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      pickerSettled();
    };
    // The held focus follows the files onto the page's input at once.
    const deliverThenRelease = (files) => {
      const outcome = deliver(files);
      release();
      return outcome;
    };
    picker.addEventListener("change", () => {
      if (settled) return;
      settled = true;
      const files = Array.from(picker.files || []);
      if (files.length) screen(files, deliverThenRelease).finally(release);
      else {
        cancel();
        release();
      }
    });
    picker.addEventListener("cancel", () => {
      if (settled) return;
      settled = true;
      cancel();
      release();
    });
    pickersOpen += 1;
    picker.click();
  }

  const pickerOptions = (input) => ({
    accept: input.accept,
    multiple: input.multiple,
    directory: input.webkitdirectory,
  });

  // The element a click activates: the file input whose picker it opens, or null. A label
  // is not followed: activating it clicks its control, a click seen here in turn.
  function chooserInputOf(event) {
    let el = event.composedPath()[0];
    if (event.isTrusted && shadowRootOf(el)) {
      // A closed shadow root hides the real target: find it where the user pointed or typed.
      el = event.detail > 0 ? deepElementAt(event.clientX, event.clientY, el) : deepActiveElement(el);
    }
    for (; el instanceof Element; el = el.parentElement || el.getRootNode()?.host) {
      if (el instanceof HTMLInputElement) return el.type === "file" ? el : null;
      if (
        el instanceof HTMLLabelElement ||
        el instanceof HTMLButtonElement ||
        el instanceof HTMLSelectElement ||
        el instanceof HTMLTextAreaElement ||
        ((el instanceof HTMLAnchorElement || el instanceof HTMLAreaElement) && el.hasAttribute("href")) ||
        el.localName === "summary"
      ) {
        return null;
      }
    }
    return null;
  }

  function onClick(event) {
    // A click cancelled before it was dispatched was routed by the page guard already.
    if (!active() || event.defaultPrevented) return;
    const input = chooserInputOf(event);
    if (!input || input.disabled) return;
    event.preventDefault(); // no picker for the page's input
    openPicker(
      pickerOptions(input),
      (files) => deliverTo(input, files),
      () => input.dispatchEvent(new Event("cancel", { bubbles: true })),
    );
  }

  // ---- the page guard's line -----------------------------------------------------------
  // Each side makes a private element that is never in the document and learns the
  // other's from a `facecloak-hello` event on `document` at document_start, before any of
  // the page's scripts run. The guard asks for a picker with a cancelable `facecloak-pick`
  // on the catcher's element (cancelled: the catcher opened it); the catcher answers with
  // `facecloak-deliver` (screened files, or cancelled) on the guard's element.

  const HELLO = "facecloak-hello";
  const box = document.createElement("facecloak-line");
  if (framesOnly) box.setAttribute("frames-only", ""); // the guard reads these at the hello
  if (standDown) box.setAttribute("stand-down", "");
  let guard = null;

  function meet(event) {
    const other = event.relatedTarget;
    if (guard || !(other instanceof Element) || other === box) return;
    guard = other;
    document.removeEventListener(HELLO, meet, true);
    if (event.currentTarget === document) other.dispatchEvent(new MouseEvent(HELLO, { relatedTarget: box }));
  }

  function answer(detail) {
    guard?.dispatchEvent(new CustomEvent("facecloak-deliver", { detail }));
  }

  box.addEventListener("facecloak-outcome", (event) => {
    const { id, outcome } = event.detail || {};
    const resolve = waiting.get(id);
    if (!resolve || !["read", "handed", "ignored"].includes(outcome)) return;
    waiting.delete(id);
    resolve(outcome);
  });

  box.addEventListener(HELLO, meet);
  box.addEventListener("facecloak-pick", (event) => {
    const { id, accept, multiple, directory } = event.detail || {};
    if (!active() || typeof id !== "string") return;
    event.preventDefault();
    openPicker(
      { accept: String(accept || ""), multiple: Boolean(multiple), directory: Boolean(directory) },
      (files) => {
        const outcome = outcomeOf(id);
        answer({ id, files });
        return outcome;
      },
      () => answer({ id, cancelled: true }),
    );
  });
  document.addEventListener(HELLO, meet, true);
  document.dispatchEvent(new MouseEvent(HELLO, { relatedTarget: box }));
  if (standDown) return;

  // ---- files set on an input without a picker (dropped on it, or by automation) ---------
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
    if (!event.isTrusted || !active()) return;
    const input = fileInputOf(event);
    if (!input) return;
    const files = Array.from(input.files || []);
    if (!files.length) {
      if (heldInputs.has(input)) event.stopImmediatePropagation();
      return;
    }
    event.stopImmediatePropagation();
    input.value = "";
    const token = {};
    heldInputs.set(input, token);
    if (event.type === "input") swallowCompanion(input);
    screen(files, (out) => {
      if (heldInputs.get(input) !== token) return "ignored"; // the user picked other files meanwhile
      heldInputs.delete(input);
      return deliverTo(input, out);
    });
  }

  // ---- drag and drop -----------------------------------------------------------------

  function onDrop(event) {
    if (!event.isTrusted || !event.dataTransfer || !active()) return;
    const files = Array.from(event.dataTransfer.files);
    if (!files.length) return;
    swallow(event);
    const target = deepElementAt(event.clientX, event.clientY, event.composedPath()[0]);
    const strings = stringsOf(event.dataTransfer);
    // As dragged: some pages ignore a drag that allows no effect (a new DataTransfer's "none").
    const effects = { effectAllowed: event.dataTransfer.effectAllowed, dropEffect: event.dataTransfer.dropEffect };
    const init = {
      bubbles: true, cancelable: true, composed: true,
      clientX: event.clientX, clientY: event.clientY, screenX: event.screenX, screenY: event.screenY,
      ctrlKey: event.ctrlKey, shiftKey: event.shiftKey, altKey: event.altKey, metaKey: event.metaKey,
    };
    // The page saw the drag enter and move over it: end it there while the drop is held,
    // as if the pointer had left, so its drop area does not stay in its drag-over look.
    // Its coordinates are 0, 0, as when a drag leaves the window (pages that track whether
    // the drag left the document, such as Fine Uploader, look at them).
    const leave = { ...init, cancelable: false, clientX: 0, clientY: 0, screenX: 0, screenY: 0 };
    target.dispatchEvent(new DragEvent("dragleave", { ...leave, dataTransfer: transferOf([], strings) }));
    screen(files, (out) => {
      const receiver = target?.isConnected ? target : document.documentElement;
      return handOver("drop", receiver, out, strings, init, effects);
    });
  }

  // ---- paste -------------------------------------------------------------------------

  function onPaste(event) {
    if (!event.isTrusted || !event.clipboardData || !active()) return;
    const files = Array.from(event.clipboardData.files);
    if (!files.length) return;
    swallow(event);
    const first = event.composedPath()[0];
    const target = first instanceof Element ? deepActiveElement(first) : first;
    const strings = stringsOf(event.clipboardData);
    screen(files, (out) => {
      const receiver = target?.isConnected ? target : document;
      return handOver("paste", receiver, out, strings, { bubbles: true, cancelable: true, composed: true });
    });
  }

  const capture = { capture: true };
  window.addEventListener("click", onClick, capture);
  window.addEventListener("input", onFileInput, capture);
  window.addEventListener("change", onFileInput, capture);
  window.addEventListener("drop", onDrop, capture);
  window.addEventListener("paste", onPaste, capture);
  window.addEventListener("focus", onWindowFocus, capture);
})();
