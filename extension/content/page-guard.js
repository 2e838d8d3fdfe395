// Runs at document_start in the page's MAIN world, before the page's own scripts. It does
// only what needs the page's world:
//
// - It sends to the catcher every file picker that no event shows: `click()`, a dispatched
//   click and `showPicker()` on a file input (or on a label of one) that is not in the
//   document, or `showPicker()` anywhere. The catcher (catcher.js, the extension's isolated
//   world) opens the picker on an input of its own, protects the photos and sends the
//   files back here; the guard puts them on the page's input and fires `input` and
//   `change`. Clicks on inputs in the document reach the catcher as events anyway.
// - It does the same in the JavaScript worlds of same-origin frames and windows the page
//   creates, as soon as they exist (their own copies of click() and showPicker() would
//   otherwise be untouched).
// - On a site that is on, it removes the File System Access pickers, whose files reach the
//   page without any event; sites feature-detect them (as the common libraries do) and
//   fall back to <input type=file>. In cross-origin frames Chrome refuses them anyway.
//
// The page can replace any function after this script ran, so everything used later is
// captured here first; what the page can still do is break the guard, which then opens
// no picker at all (it never lets one through unprotected).

(() => {
  // frames-only.js says "a frame of a site that is off". Chromium runs a file once per
  // frame, so where the catcher's registration ran it first (in the isolated world) it
  // is not run here again: the catcher then says so at the hello, below.
  const flaggedFramesOnly = globalThis.FaceCloakFramesOnly === true;
  delete globalThis.FaceCloakFramesOnly;
  if (flaggedFramesOnly && window === window.top) return; // a page of a site that is off
  if (globalThis.document === undefined) return;

  // ---- captured before any page script runs ---------------------------------------------
  const { apply } = Reflect;
  const { getOwnPropertyDescriptor, defineProperty } = Object;
  const accessor = (proto, name) => getOwnPropertyDescriptor(proto, name);
  const getter = (proto, name) => accessor(proto, name).get;
  const doc = document;
  const createElement = Document.prototype.createElement;
  const dispatch = EventTarget.prototype.dispatchEvent;
  const listen = EventTarget.prototype.addEventListener;
  const unlisten = EventTarget.prototype.removeEventListener;
  const preventDefault = Event.prototype.preventDefault;
  const eventType = getter(Event.prototype, "type");
  const eventCancelable = getter(Event.prototype, "cancelable");
  const eventBubbles = getter(Event.prototype, "bubbles");
  const eventComposed = getter(Event.prototype, "composed");
  const mouseButton = getter(MouseEvent.prototype, "button");
  const relatedTarget = getter(MouseEvent.prototype, "relatedTarget");
  const customDetail = getter(CustomEvent.prototype, "detail");
  const localName = getter(Element.prototype, "localName");
  const hasAttribute = Element.prototype.hasAttribute;
  const parentElement = getter(Node.prototype, "parentElement");
  const getRootNode = Node.prototype.getRootNode;
  const shadowHost = getter(ShadowRoot.prototype, "host");
  const inputType = getter(HTMLInputElement.prototype, "type");
  const inputDisabled = getter(HTMLInputElement.prototype, "disabled");
  const inputAccept = getter(HTMLInputElement.prototype, "accept");
  const inputMultiple = getter(HTMLInputElement.prototype, "multiple");
  const inputDirectory = getter(HTMLInputElement.prototype, "webkitdirectory");
  const setInputFiles = accessor(HTMLInputElement.prototype, "files").set;
  const labelControl = getter(HTMLLabelElement.prototype, "control");
  const userActivation = navigator.userActivation;
  const isActive = getter(UserActivation.prototype, "isActive");
  const transferItems = getter(DataTransfer.prototype, "items");
  const transferFiles = getter(DataTransfer.prototype, "files");
  const addItem = DataTransferItemList.prototype.add;
  const windowLength = accessor(window, "length")?.get;
  const mapGet = Map.prototype.get;
  const mapSet = Map.prototype.set;
  const mapDelete = Map.prototype.delete;
  const weakHas = WeakSet.prototype.has;
  const weakAdd = WeakSet.prototype.add;
  const MakeEvent = Event;
  const MakeMouseEvent = MouseEvent;
  const MakeCustomEvent = CustomEvent;
  const MakeDataTransfer = DataTransfer;
  const MakeMutationObserver = MutationObserver;
  const observe = MutationObserver.prototype.observe;

  const call = (fn, self, ...args) => apply(fn, self, args);
  function attempt(fn, self, ...args) {
    try {
      return apply(fn, self, args);
    } catch {
      return undefined;
    }
  }

  // ---- the catcher's line (see catcher.js) ---------------------------------------------
  const HELLO = "facecloak-hello";
  const box = call(createElement, doc, "facecloak-line");
  const pending = new Map(); // request id -> the page's input
  let catcher = null;
  let requests = 0;

  function meet(event) {
    const other = call(relatedTarget, event);
    if (catcher || !other || other === box || attempt(localName, other) !== "facecloak-line") return;
    catcher = other;
    call(unlisten, doc, HELLO, meet, true);
    if (event.currentTarget === doc) call(dispatch, other, new MakeMouseEvent(HELLO, { relatedTarget: box }));
  }

  call(listen, box, HELLO, meet);
  call(listen, box, "facecloak-deliver", (event) => {
    const detail = call(customDetail, event);
    const input = detail && call(mapGet, pending, detail.id);
    if (!input) return;
    call(mapDelete, pending, detail.id);
    if (detail.cancelled) {
      call(dispatch, input, new MakeEvent("cancel", { bubbles: true }));
      return;
    }
    handInput(input, detail.files, detail.id);
  });
  call(listen, doc, HELLO, meet, true);
  call(dispatch, doc, new MakeMouseEvent(HELLO, { relatedTarget: box }));

  // A page of a site that is off: leave its world as it was (nothing wrapped, nothing
  // removed). Without a catcher here, the guard behaves as on a site that is on.
  if (catcher && call(hasAttribute, catcher, "stand-down")) {
    call(unlisten, doc, HELLO, meet, true);
    return;
  }
  const framesOnly = flaggedFramesOnly || (catcher !== null && call(hasAttribute, catcher, "frames-only"));

  if (!framesOnly) {
    for (const name of ["showOpenFilePicker", "showDirectoryPicker"]) {
      for (const owner of [globalThis, Object.getPrototypeOf(globalThis)]) {
        try {
          if (Object.prototype.hasOwnProperty.call(owner, name)) delete owner[name];
        } catch {
          // not configurable here: nothing to hide
        }
      }
    }
  }

  // ---- handing the page its protected files ----------------------------------------------
  // The catcher screens every file first; what arrives here is only ever protected photos
  // and files that are not photos. The guard hands them over in the page's own world, so
  // that they look like the browser's: a drop whose items give a file entry
  // (`webkitGetAsEntry()`, whose `file()` gives the File) and a file handle
  // (`getAsFileSystemHandle()`, where the browser has it), as a real drop's do; a paste;
  // files on an input. It watches whether the page reads them (the files, an item's file,
  // an entry's or a handle's file) and tells the catcher: "read", or after OUTCOME_MS
  // "handed" (the page took the event or has the input) or "ignored" (nobody took it).

  const OUTCOME_MS = 3000;
  const { create } = Object;
  const later = setTimeout;
  const MakePromise = Promise;
  const MakeDragEvent = DragEvent;
  const MakeClipboardEvent = ClipboardEvent;
  const MakeDOMException = DOMException;
  const iteratorOf = Array.prototype[Symbol.iterator];
  const setData = DataTransfer.prototype.setData;
  const itemsLength = getter(DataTransferItemList.prototype, "length");
  const itemAt = (list, i) => list[i]; // an indexed getter: the page cannot replace it
  const itemKind = getter(DataTransferItem.prototype, "kind");
  const fileName = getter(File.prototype, "name");
  const defaultPrevented = getter(Event.prototype, "defaultPrevented");
  const inputFilesGet = getter(HTMLInputElement.prototype, "files");
  const listProto = DataTransferItemList.prototype;
  const entryProto = globalThis.FileSystemFileEntry?.prototype || Object.prototype;
  const directoryProto = globalThis.FileSystemDirectoryEntry?.prototype || Object.prototype;
  const handleProto = globalThis.FileSystemFileHandle?.prototype || Object.prototype;
  const hasHandles = typeof DataTransferItem.prototype.getAsFileSystemHandle === "function";
  let nextReceiver = null;

  const fixed = (value) => ({ value, enumerable: true, configurable: true });
  function define(target, props) {
    for (const key of Reflect.ownKeys(props)) defineProperty(target, key, fixed(props[key]));
    return target;
  }
  const soon = (fn, ...args) => call(later, window, () => attempt(fn, undefined, ...args), 0);
  const resolved = (value) => new MakePromise((ok) => ok(value));

  function reporter(id) {
    let done = false;
    const report = (outcome) => {
      if (done || !catcher) return;
      done = true;
      call(dispatch, catcher, new MakeCustomEvent("facecloak-outcome", { detail: { id, outcome } }));
    };
    return report;
  }

  /** A file entry (and its root folder) such as a real drop's item gives for `file`. */
  function fileEntry(file, onRead) {
    const name = call(fileName, file);
    const root = create(directoryProto);
    const entry = create(entryProto);
    const filesystem = define({}, { name: "facecloak-drop", root });
    define(root, {
      isFile: false, isDirectory: true, name: "", fullPath: "/", filesystem,
      createReader() {
        let given = false;
        return define({}, {
          readEntries(ok) {
            const out = given ? [] : [entry];
            given = true;
            if (typeof ok === "function") soon(ok, out);
          },
        });
      },
      getParent(ok) {
        if (typeof ok === "function") soon(ok, root);
      },
    });
    define(entry, {
      isFile: true, isDirectory: false, name, fullPath: `/${name}`, filesystem,
      file(ok) {
        onRead();
        if (typeof ok === "function") soon(ok, file);
      },
      getParent(ok) {
        if (typeof ok === "function") soon(ok, root);
      },
    });
    return entry;
  }

  /** A file handle such as `getAsFileSystemHandle()` gives for a dropped `file`. */
  function fileHandle(file, onRead) {
    const handle = create(handleProto);
    return define(handle, {
      kind: "file", name: call(fileName, file),
      getFile() {
        onRead();
        return resolved(file);
      },
      isSameEntry(other) {
        return resolved(other === handle);
      },
      queryPermission() {
        return resolved("granted");
      },
      requestPermission() {
        return resolved("granted");
      },
      createWritable() {
        return new MakePromise((_, fail) => fail(new MakeDOMException("Not allowed.", "NotAllowedError")));
      },
    });
  }

  /** A DataTransfer of `files` and `strings` whose every way of reading a file is watched. */
  function watchedTransfer(files, strings, onRead) {
    const transfer = new MakeDataTransfer();
    for (let i = 0; i < strings.length; i += 1) attempt(setData, transfer, strings[i].type, strings[i].data);
    const list = call(transferItems, transfer);
    for (let i = 0; i < files.length; i += 1) call(addItem, list, files[i]);
    const fileList = call(transferFiles, transfer);
    // The browser makes new item objects at every access; the page gets fixed ones.
    const items = [];
    const count = call(itemsLength, list);
    for (let i = 0, f = 0; i < count; i += 1) {
      const item = itemAt(list, i);
      items[i] = item;
      if (call(itemKind, item) !== "file") continue;
      const file = files[f];
      f += 1;
      let entry = null;
      let handle = null;
      define(item, {
        getAsFile() {
          onRead();
          return file;
        },
        webkitGetAsEntry() {
          entry = entry || fileEntry(file, onRead);
          return entry;
        },
      });
      if (hasHandles) {
        define(item, {
          getAsFileSystemHandle() {
            handle = handle || fileHandle(file, onRead);
            return resolved(handle);
          },
        });
      }
    }
    const itemList = create(listProto);
    for (let i = 0; i < items.length; i += 1) defineProperty(itemList, i, fixed(items[i]));
    define(itemList, {
      length: items.length,
      [Symbol.iterator]() {
        return call(iteratorOf, items);
      },
    });
    defineProperty(transfer, "items", {
      get: define({}, { items() { return itemList; } }).items, configurable: true, enumerable: true,
    });
    defineProperty(transfer, "files", {
      get: define({}, { files() { onRead(); return fileList; } }).files, configurable: true, enumerable: true,
    });
    return transfer;
  }

  /** Put `files` on the page's `input`, fire `input` and `change`, and watch for a read. */
  function handInput(input, files, id) {
    const report = reporter(id);
    const transfer = new MakeDataTransfer();
    const list = call(transferItems, transfer);
    for (let i = 0; i < files.length; i += 1) call(addItem, list, files[i]);
    call(setInputFiles, input, call(transferFiles, transfer));
    // Watch reads of this input's files for a while (an own accessor over the browser's).
    const watch = define({}, {
      files() {
        report("read");
        return call(inputFilesGet, this);
      },
    }).files;
    const set = define({}, {
      files(value) {
        call(setInputFiles, this, value);
      },
    }).files;
    attempt(defineProperty, undefined, input, "files", { get: watch, set, configurable: true, enumerable: true });
    call(dispatch, input, new MakeEvent("input", { bubbles: true, composed: true }));
    call(dispatch, input, new MakeEvent("change", { bubbles: true }));
    call(later, window, () => {
      attempt(Reflect.deleteProperty, undefined, input, "files");
      report("handed");
    }, OUTCOME_MS);
  }

  function handEvent(receiver, { id, kind, files, strings, init, effects }) {
    const report = reporter(id);
    const transfer = watchedTransfer(files, strings || [], () => report("read"));
    // A new DataTransfer allows no effect ("none", and the browser keeps it so outside a
    // dragstart); some pages ignore such a drag. It gets the effects the user's drag had.
    if (effects && kind !== "paste") {
      for (const name of ["effectAllowed", "dropEffect"]) {
        let value = String(effects[name]);
        const access = define({}, {
          get() {
            return value;
          },
          set(next) {
            value = String(next);
          },
        });
        defineProperty(transfer, name, { get: access.get, set: access.set, configurable: true, enumerable: true });
      }
    }
    let last;
    if (kind === "paste") {
      last = new MakeClipboardEvent("paste", { ...init, clipboardData: transfer });
      call(dispatch, receiver, last);
    } else {
      // A fresh drag: entered, over, dropped (the held one was left with a dragleave).
      for (const type of ["dragenter", "dragover", "drop"]) {
        last = new MakeDragEvent(type, { ...init, dataTransfer: transfer });
        call(dispatch, receiver, last);
      }
    }
    const taken = call(defaultPrevented, last);
    call(later, window, () => report(taken ? "handed" : "ignored"), OUTCOME_MS);
  }

  call(listen, box, "facecloak-receiver", (event) => {
    nextReceiver = call(relatedTarget, event);
  });
  call(listen, box, "facecloak-hand", (event) => {
    const detail = call(customDetail, event);
    const receiver = nextReceiver;
    nextReceiver = null;
    if (!receiver || !detail || typeof detail.id !== "string" || !detail.files) return;
    if ((detail.kind === "input") !== isFileInput(receiver)) return; // the catcher does it
    call(preventDefault, event); // handed here: the catcher does not dispatch it itself
    if (detail.kind === "input") handInput(receiver, detail.files, detail.id);
    else handEvent(receiver, detail);
  });

  /**
   * Ask the catcher to open a picker for `input`: "taken" (it did; the files come back
   * later), "declined" (protection is off in this frame) or "blocked" (no catcher here:
   * no picker at all).
   */
  function route(input) {
    if (!catcher) return "blocked";
    requests += 1;
    const id = `pick-${requests}`;
    const detail = {
      id,
      accept: call(inputAccept, input),
      multiple: call(inputMultiple, input),
      directory: call(inputDirectory, input),
    };
    const request = new MakeCustomEvent("facecloak-pick", { cancelable: true, detail });
    if (call(dispatch, catcher, request)) return "declined";
    call(mapSet, pending, id, input);
    return "taken";
  }

  // ---- which input a click opens a picker for --------------------------------------------

  function isFileInput(node) {
    return attempt(localName, node) === "input" && attempt(inputType, node) === "file";
  }

  function parentOf(node) {
    return call(parentElement, node) || attempt(shadowHost, call(getRootNode, node)) || null;
  }

  /** The file input whose picker a click on `target` opens, or null. */
  function chooserInputOf(target) {
    for (let node = target; node; node = parentOf(node)) {
      const name = attempt(localName, node);
      switch (name) {
        case undefined:
          return null; // not an element
        case "input":
          return isFileInput(node) ? node : null;
        case "label": {
          const control = attempt(labelControl, node);
          return control && isFileInput(control) ? control : null;
        }
        case "button":
        case "select":
        case "textarea":
        case "summary":
          return null;
        case "a":
        case "area":
          if (call(hasAttribute, node, "href")) return null;
          break;
        default:
          break;
      }
    }
    return null;
  }

  /** The input to route a picker for: a file input that can open one now, else null. */
  function routable(input) {
    if (!input || call(inputDisabled, input)) return null;
    return call(isActive, userActivation) ? input : null; // without activation none opens
  }

  // A click the page still sees, cancelled before it is dispatched, so that it opens no
  // picker of its own (and the catcher, seeing it cancelled, leaves it alone).
  function cancelledClick(init = { bubbles: true, cancelable: true, composed: true }, Make = MakeMouseEvent) {
    const click = new Make("click", { ...init, cancelable: true });
    call(preventDefault, click);
    return click;
  }

  // ---- the hooks, in this window and in every same-origin window it opens -----------------
  const installed = new WeakSet();

  // Every wrapper looks like the function it replaces: a method (no `prototype`, not a
  // constructor), the original's `name` and `length`, the same property flags, and
  // Function.prototype.toString shows what it showed for the original ("[native code]"),
  // also when asked from another same-origin frame. The text is read when the wrapper is
  // made, through that world's toString as it is then: a frame's world may have been
  // wrapped already by the guard that runs in the frame itself, whose record this one
  // cannot see.
  const disguised = new WeakMap(); // wrapper -> what toString shows for it
  const weakGet = WeakMap.prototype.get;
  const weakSet = WeakMap.prototype.set;
  const nameOf = (fn) => getOwnPropertyDescriptor(fn, "name")?.value;
  const lengthOf = (fn) => getOwnPropertyDescriptor(fn, "length")?.value;

  function disguise(wrapper, original, sourceOf) {
    defineProperty(wrapper, "length", { value: lengthOf(original) });
    defineProperty(wrapper, "name", { value: nameOf(original) });
    const text = attempt(sourceOf, original);
    if (typeof text === "string") call(weakSet, disguised, wrapper, text);
    return wrapper;
  }

  function replace(owner, name, wrap, sourceOf) {
    const descriptor = getOwnPropertyDescriptor(owner, name);
    if (!descriptor || typeof descriptor.value !== "function") return;
    const wrapper = disguise(wrap(descriptor.value), descriptor.value, sourceOf);
    defineProperty(owner, name, { ...descriptor, value: wrapper });
  }

  function replaceSetter(owner, name, wrap, sourceOf) {
    const descriptor = getOwnPropertyDescriptor(owner, name);
    if (!descriptor?.set) return;
    defineProperty(owner, name, { ...descriptor, set: disguise(wrap(descriptor.set), descriptor.set, sourceOf) });
  }

  const INSERTING = [
    ["Node", ["appendChild", "insertBefore", "replaceChild"]],
    [
      "Element",
      ["append", "prepend", "before", "after", "replaceWith", "replaceChildren", "insertAdjacentElement", "insertAdjacentHTML", "setHTMLUnsafe"],
    ],
    ["CharacterData", ["before", "after", "replaceWith"]],
    ["DocumentFragment", ["append", "prepend", "replaceChildren"]],
    ["ShadowRoot", ["setHTMLUnsafe"]],
    ["Document", ["append", "prepend", "replaceChildren", "write", "writeln"]],
    ["Range", ["insertNode", "surroundContents"]],
  ];
  const INSERTING_SETTERS = [
    ["Element", ["innerHTML", "outerHTML"]],
    ["ShadowRoot", ["innerHTML"]],
  ];

  /** Install the hooks in the JavaScript world of `win` (same-origin), once. */
  function install(win) {
    const prototype = win.HTMLElement.prototype;
    if (call(weakHas, installed, prototype)) return;
    call(weakAdd, installed, prototype);

    // The event click() makes in this world: a PointerEvent with this window as its view.
    const MakeClick = win.PointerEvent || MakeMouseEvent;
    const nativeClick = { bubbles: true, cancelable: true, composed: true, view: win, pointerId: -1 };

    // This world's toString as it is now (the browser's, or the frame's own guard's).
    const sourceOf = win.Function.prototype.toString;
    replace(
      win.Function.prototype,
      "toString",
      (original) =>
        ({
          toString() {
            const shown = call(weakGet, disguised, this);
            return shown === undefined ? apply(original, this, arguments) : shown;
          },
        }).toString,
      sourceOf,
    );

    replace(win.HTMLElement.prototype, "click", (original) =>
      ({
        click() {
          const input = routable(chooserInputOf(this));
          if (input && route(input) !== "declined") {
            call(dispatch, this, cancelledClick(nativeClick, MakeClick));
            return undefined;
          }
          return apply(original, this, arguments);
        },
      }).click,
      sourceOf,
    );

    replace(win.HTMLInputElement.prototype, "showPicker", (original) =>
      ({
        showPicker() {
          const input = isFileInput(this) ? routable(this) : null;
          if (input && route(input) !== "declined") return undefined;
          return apply(original, this, arguments);
        },
      }).showPicker,
      sourceOf,
    );

    replace(win.EventTarget.prototype, "dispatchEvent", (original) =>
      ({
        dispatchEvent(event) {
          const isClick = attempt(eventType, event) === "click" && attempt(mouseButton, event) !== undefined;
          const input = isClick ? routable(chooserInputOf(this)) : null;
          if (input && route(input) !== "declined") {
            if (call(eventCancelable, event)) {
              call(preventDefault, event);
              return apply(original, this, [event]);
            }
            const init = { bubbles: call(eventBubbles, event), composed: call(eventComposed, event) };
            apply(original, this, [cancelledClick(init)]);
            return true;
          }
          return apply(original, this, arguments);
        },
      }).dispatchEvent,
      sourceOf,
    );

    // New same-origin frames start with a JavaScript world of their own that FaceCloak's
    // scripts reach only when their document loads: hook it as soon as it exists.
    // (Index loops: the page may have replaced the array iterator by now.)
    const adopt = () => adoptFrames(win);
    for (let i = 0; i < INSERTING.length; i += 1) {
      const owner = win[INSERTING[i][0]]?.prototype;
      const methods = owner ? INSERTING[i][1] : [];
      for (let j = 0; j < methods.length; j += 1) {
        const name = methods[j];
        replace(owner, name, (original) =>
          ({
            [name]() {
              try {
                return apply(original, this, arguments);
              } finally {
                adopt();
              }
            },
          })[name],
          sourceOf,
        );
      }
    }
    for (let i = 0; i < INSERTING_SETTERS.length; i += 1) {
      const owner = win[INSERTING_SETTERS[i][0]]?.prototype;
      const properties = owner ? INSERTING_SETTERS[i][1] : [];
      for (let j = 0; j < properties.length; j += 1) {
        const name = properties[j];
        replaceSetter(owner, name, (original) =>
          getOwnPropertyDescriptor(
            {
              set [name](value) {
                try {
                  apply(original, this, [value]);
                } finally {
                  adopt();
                }
              },
            },
            name,
          ).set,
          sourceOf,
        );
      }
    }
    replace(win, "open", (original) =>
      ({
        open() {
          const opened = apply(original, this, arguments);
          if (opened) adoptWindow(opened);
          return opened;
        },
      }).open,
      sourceOf,
    );
    // Frames the parser inserts: the observer runs before the next script does.
    call(observe, new MakeMutationObserver(adopt), win.document, { childList: true, subtree: true });
  }

  function adoptWindow(win) {
    try {
      install(win); // throws for a cross-origin window: its own scripts guard it
    } catch {
      // not ours to reach
    }
  }

  function adoptFrames(win) {
    // The page may have replaced this window's `length`; a new frame's world is untouched.
    const count = (win === window && windowLength ? attempt(windowLength, win) : win.length) || 0;
    for (let i = 0; i < count; i += 1) adoptWindow(win[i]);
  }

  install(window);
  adoptFrames(window);
})();
