// Runs at document_start in the page's MAIN world of every frame of a site the user
// turned on, before the page's own scripts. It does only what needs the page's world and
// talks to nothing: it removes the File System Access pickers, whose files reach the page
// without any event the catcher could hold. Sites feature-detect them (as the common
// libraries do) and fall back to <input type=file>, which FaceCloak protects.

(() => {
  for (const name of ["showOpenFilePicker", "showDirectoryPicker"]) {
    for (const owner of [globalThis, Object.getPrototypeOf(globalThis)]) {
      try {
        if (Object.prototype.hasOwnProperty.call(owner, name)) delete owner[name];
      } catch {
        // not configurable here: nothing to hide
      }
    }
  }
})();
