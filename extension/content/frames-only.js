// Injected before the catcher and the page guard in frames of sites that are not on
// themselves: there the tab's top-level site decides whether uploads are protected (see
// lib/registration.js). In the page's world the guard reads and deletes this at once,
// before any of the page's own scripts run.
globalThis.FaceCloakFramesOnly = true;
