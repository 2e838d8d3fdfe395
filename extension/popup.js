// The popup: the daemon's state, the global switch, on/off for the current tab's site
// (asking for host access on the click that turns it on), and the photos in progress
// and done. `?tab=ID` shows the popup for a given tab (used when it is opened in a tab).

import { ACTIVITY_KEY, readActivity } from "./lib/activity.js";
import { ask } from "./lib/messages.js";
import { matchWords, PREVIEW_KEY, readPreview } from "./lib/preview.js";
import { presetOptions } from "./lib/strength.js";
import { originPatterns, siteLabel } from "./lib/sites.js";

const $ = (id) => document.getElementById(id);
let status = null;
let tab = null;

async function currentTab() {
  const id = Number(new URLSearchParams(location.search).get("tab"));
  if (id) return chrome.tabs.get(id);
  const [active] = await chrome.tabs.query({ active: true, currentWindow: true });
  return active;
}

const DAEMON_TEXT = {
  connected: "Connected",
  unpaired: "Not paired",
  unverified: "Not verified",
  unreachable: "Not running",
  error: "Error",
};

function renderDaemon(daemon, settings) {
  const pill = $("daemon-state");
  pill.textContent = DAEMON_TEXT[daemon.state] || daemon.state;
  pill.className = `pill ${daemon.state}`;
  // The preset this tab's uploads get: the site's own strength, else the global choice.
  const own = status?.site?.on && settings.sitePresets?.[status.site.site];
  const preset = own || settings.preset || daemon.preset;
  const detail = {
    connected: `Service ${daemon.version || ""} on ${daemon.device || "?"} · preset ${preset || "?"}${own ? " here" : ""}`,
    unpaired: "Open the options below and enter the code that “facecloak pair” prints.",
    unreachable: "Start the FaceCloak service: run “facecloak serve”.",
    unverified: `${daemon.message || ""} FaceCloak sends it nothing.`,
    error: daemon.message || "",
  }[daemon.state];
  $("daemon-detail").textContent = detail || "";
}

// While the service cannot protect, every upload on a site that is on is held back.
const HELD_BACK = {
  unreachable: "the FaceCloak service is not running.",
  unpaired: "FaceCloak is not paired with the service.",
  unverified: "the program on the service's port is not the paired service.",
  error: "the FaceCloak service reports an error.",
};

function renderSite(site, settings, daemon) {
  const toggle = $("site-toggle");
  if (!site) {
    $("site-name").textContent = "This page";
    $("site-hint").textContent = "FaceCloak works on web sites (http and https) only.";
    toggle.disabled = true;
    toggle.checked = false;
    $("strength-row").hidden = true;
    return;
  }
  $("site-name").textContent = siteLabel(site.site);
  toggle.disabled = false;
  toggle.checked = site.on;
  let hint = site.on ? "Uploads of photos are protected." : "Uploads go to the site unprotected.";
  if (site.on && settings.enabled && HELD_BACK[daemon.state]) {
    hint = `Uploads of photos are held back: ${HELD_BACK[daemon.state]}`;
  }
  if (site.wanted && !site.granted) hint = "FaceCloak needs access to this site: turn it on to allow.";
  if (site.on && !settings.enabled) hint = "Protection is switched off everywhere.";
  renderStrength(site, settings);
  $("site-row").dataset.held = String(hint.startsWith("Uploads of photos are held back"));
  $("site-hint").textContent = hint;
}

// The strength (preset) of the current site's uploads; shown while the site is on.
function renderStrength(site, settings) {
  const row = $("strength-row");
  row.hidden = !site.on;
  if (row.hidden || document.activeElement === $("site-preset")) return;
  const fallback = settings.preset || status.daemon.preset;
  presetOptions($("site-preset"), status.presets, settings.sitePresets?.[site.site], fallback);
}

function renderPreview(preview) {
  const list = $("preview-faces");
  list.replaceChildren();
  $("preview").hidden = !preview?.faces?.length;
  if (!preview?.faces?.length) return;
  const where = [preview.name, preview.site].filter(Boolean).join(" on ");
  $("preview-caption").textContent = `${where}${preview.preset ? ` · preset ${preview.preset}` : ""}`;
  preview.faces.forEach((face, i) => {
    const li = document.createElement("li");
    for (const [key, label] of [["before", "Before"], ["after", "After (posted)"]]) {
      const img = document.createElement("img");
      img.src = face[key]; // a data: URL from the daemon (checked in lib/preview.js)
      img.alt = `${label}, face ${i + 1}`;
      img.className = key;
      li.append(img);
    }
    const words = document.createElement("div");
    words.className = "words";
    words.textContent = matchWords(face);
    const note = document.createElement("small");
    note.textContent = `Face ${i + 1}: before, and as posted`;
    words.append(note);
    li.append(words);
    list.append(li);
  });
}

const STATE_TEXT = {
  sending: "Sending to FaceCloak",
  queued: "Waiting",
  running: "Protecting",
  done: "Protected",
  failed: "Not uploaded",
};

// A protected photo is "Protected" once the page read it (see content/catcher.js).
const DELIVERY_TEXT = {
  pending: "Protected, handing it to the page",
  read: "Protected",
  handed: "Protected, handed to the page",
  ignored: "Protected, but the page did not take it",
};

function stateText(entry) {
  if (entry.state === "done" && entry.delivery) return DELIVERY_TEXT[entry.delivery] || STATE_TEXT.done;
  return STATE_TEXT[entry.state] || entry.state;
}

function renderActivity(entries) {
  const list = $("activity");
  list.replaceChildren();
  $("no-activity").hidden = entries.length > 0;
  for (const entry of entries) {
    const li = document.createElement("li");
    li.dataset.state = entry.state;
    if (entry.delivery) li.dataset.delivery = entry.delivery;
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = entry.name || "photo";
    const line = document.createElement("div");
    line.className = "line";
    const what = document.createElement("span");
    const faces = entry.faces == null ? "" : ` · ${entry.faces} face${entry.faces === 1 ? "" : "s"}`;
    const seconds = entry.state === "done" && entry.seconds != null ? ` · ${entry.seconds.toFixed(1)} s` : "";
    const preset = entry.state === "done" && entry.preset ? ` · ${entry.preset}` : "";
    what.textContent = `${stateText(entry)}${faces}${seconds}${preset}`;
    const where = document.createElement("span");
    where.textContent = entry.site || "";
    line.append(what, where);
    const bar = document.createElement("div");
    bar.className = `bar ${entry.state}`;
    const fill = document.createElement("div");
    const fraction = entry.state === "done" || entry.state === "failed" ? 1 : Number(entry.progress) || 0;
    fill.style.width = `${Math.round(fraction * 100)}%`;
    bar.append(fill);
    li.append(name, line, bar);
    if (entry.state === "failed" && entry.error) {
      const error = document.createElement("div");
      error.className = "error";
      error.textContent = entry.error;
      li.append(error);
    }
    list.append(li);
  }
}

async function refresh() {
  status = await ask("get-status", { url: tab?.url });
  renderDaemon(status.daemon, status.settings);
  $("global").checked = status.settings.enabled;
  renderSite(status.site, status.settings, status.daemon);
}

function say(text, kind = "") {
  $("site-message").textContent = text;
  $("site-message").className = `message ${kind}`;
}

// chrome.permissions.request needs the user's click: it is called first thing in the handler.
$("site-toggle").addEventListener("change", (event) => {
  const on = event.target.checked;
  const site = status?.site?.site;
  if (!site) return;
  // Access for the scheme of the page the user is on (the options page asks for both).
  const patterns = originPatterns(site, [status.site.scheme]);
  const access = on ? chrome.permissions.request({ origins: patterns }) : Promise.resolve(true);
  access
    .then(async (granted) => {
      if (!granted) {
        event.target.checked = false;
        say("FaceCloak was not given access to this site, so it cannot protect uploads here.", "bad");
        return;
      }
      await ask("set-site", { site, on });
      say(on ? "On. Reload the page so FaceCloak can watch its uploads." : "Off for this site.", "good");
      $("reload").hidden = !on || !tab;
      await refresh();
    })
    .catch((err) => {
      event.target.checked = !on;
      say(err.message, "bad");
    });
});

$("site-preset").addEventListener("change", (event) => {
  const site = status?.site?.site;
  if (!site) return;
  ask("set-site-preset", { site, preset: event.target.value || null })
    .then(() => say(`Strength on ${site}: ${event.target.value || "default"}.`, "good"))
    .then(refresh)
    .catch((err) => say(err.message, "bad"));
});

$("global").addEventListener("change", (event) => {
  ask("set-enabled", { enabled: event.target.checked })
    .then(refresh)
    .catch((err) => say(err.message, "bad"));
});

$("reload").addEventListener("click", () => {
  chrome.tabs.reload(tab.id);
  $("reload").hidden = true;
  say("");
});

chrome.storage.onChanged.addListener((changes, area) => {
  if (area === "session" && changes[ACTIVITY_KEY]) renderActivity(changes[ACTIVITY_KEY].newValue || []);
  if (area === "session" && changes[PREVIEW_KEY]) renderPreview(changes[PREVIEW_KEY].newValue || null);
});

(async () => {
  tab = await currentTab().catch(() => null);
  renderActivity(await readActivity());
  renderPreview(await readPreview());
  await refresh();
  setInterval(() => refresh().catch(() => {}), 3000);
})().catch((err) => say(err.message, "bad"));
