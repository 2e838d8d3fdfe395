// The options page: pairing with the daemon, its port, the preset, the time limit, and
// the list of sites (the suggested social sites plus any the user adds).

import { ask } from "./lib/messages.js";
import { presetOptions } from "./lib/strength.js";
import {
  grantedPatterns,
  normalizeSite,
  originPatterns,
  siteLabel,
  SUGGESTED_SITES,
} from "./lib/sites.js";

const $ = (id) => document.getElementById(id);
let status = null;

function say(id, text, kind = "") {
  $(id).textContent = text;
  $(id).className = `message ${kind}`;
}

function renderPairing() {
  const d = status.daemon;
  let text;
  if (!status.paired) text = "Not paired yet.";
  else if (d.state === "connected") text = `Paired and connected (service ${d.version}, ${d.device}).`;
  else if (d.state === "unreachable") text = "Paired, but the service is not running: start it with “facecloak serve”.";
  else if (d.state === "unpaired") text = "The service no longer knows this browser: pair again.";
  else if (d.state === "unverified") text = `${d.message} FaceCloak sends it nothing: stop it and start “facecloak serve”.`;
  else text = `Paired; the service answered: ${d.message}`;
  $("pair-state").textContent = text;
  $("unpair").hidden = !status.paired;
  // The help and the code field are for pairing: hidden while paired and connected.
  const done = status.paired && d.state === "connected";
  $("pair-help").hidden = done;
  $("pair-code").hidden = done;
  $("pair").hidden = done;
}

function renderDaemon() {
  const d = status.daemon;
  const port = status.settings.port;
  const text = {
    connected: `Running on port ${port} (service ${d.version || "?"}, ${d.device || "?"}).`,
    unpaired: `Running on port ${port}; this browser is not paired with it yet.`,
    unverified: `Something answers on port ${port}, but it is not the paired service.`,
    unreachable: `Not running on port ${port}: start it with “facecloak serve” (or “make run”).`,
  }[d.state];
  $("daemon-running").textContent = text || `Port ${port}: ${d.message || d.state}`;
  $("daemon-running").dataset.state = d.state;
}

/** A pairing failure in plain words, with what to do next. */
function pairingError(err) {
  const message = String(err?.message || err);
  const port = status?.settings?.port;
  if (status?.daemon?.state === "unreachable" || /fetch|network|not running|unreachable/i.test(message)) {
    return `The FaceCloak service is not running on port ${port}. Start it with “facecloak serve”, check the port above, then try again.`;
  }
  if (!$("pair-code").value.trim()) return "Enter the code that “facecloak pair” printed.";
  if (/code|expired|invalid|401|403|refused|denied/i.test(message)) {
    return "The service did not accept that code. Codes work once and expire: run “facecloak pair” again and enter the new code.";
  }
  return `Pairing did not work: ${message}`;
}

// What each preset is for; a preset of the daemon's that is not named here shows its name.
const PRESET_HELP = {
  fast: "fast: a third of the time, a little more visible change",
  strong: "strong: strongest protection, visibly alters faces",
  paper: "paper: the LowKey paper's settings",
};

function renderOptions() {
  const s = status.settings;
  $("port").value = s.port;
  const select = $("preset");
  select.replaceChildren();
  const names = status.presets.includes(s.preset) || !s.preset ? status.presets : [...status.presets, s.preset];
  for (const [value, text] of [["", "The service's own setting"], ...names.map((n) => [n, PRESET_HELP[n] || n])]) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.append(option);
  }
  select.value = s.preset || "";
  $("timeout").value = s.timeoutSeconds;
}

/** Turn `site` on (asking for access: this must run inside the click) or off. */
function setSite(site, on) {
  const access = on ? chrome.permissions.request({ origins: originPatterns(site) }) : Promise.resolve(true);
  return access.then(async (granted) => {
    if (!granted) {
      say("sites-message", `FaceCloak was not given access to ${site}.`, "bad");
      return;
    }
    await ask("set-site", { site, on });
    say("sites-message", on ? `${site}: on (reload its open tabs).` : `${site}: off.`, "good");
  });
}

async function renderSites() {
  const configured = status.settings.sites;
  const suggested = SUGGESTED_SITES.map((s) => s.host);
  const added = Object.keys(configured).filter((s) => !suggested.includes(s)).sort();
  const sites = [...suggested, ...added];
  // Every site's access is asked first and the list goes in whole: a half-drawn list
  // never shows, and two renders that overlap (a click's reload) cannot mix their rows.
  const access = await Promise.all(sites.map(async (site) => (await grantedPatterns(site)).length > 0));
  const rows = [];
  for (const [i, site] of sites.entries()) {
    const granted = access[i];
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.site = site;
    const label = document.createElement("label");
    const name = siteLabel(site);
    // A label that names its host already ("X (twitter.com)") does not get it twice.
    label.textContent = name === site || name.includes(`(${site})`) ? name : `${name} (${site})`;
    const controls = document.createElement("div");
    controls.className = "inline";
    const toggle = document.createElement("input");
    toggle.type = "checkbox";
    toggle.setAttribute("role", "switch");
    toggle.checked = Boolean(configured[site]) && granted;
    toggle.setAttribute("aria-label", `Protect uploads on ${site}`);
    toggle.addEventListener("change", () => {
      setSite(site, toggle.checked)
        .catch((err) => say("sites-message", err.message, "bad"))
        .finally(load);
    });
    if (!suggested.includes(site)) {
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Remove";
      remove.addEventListener("click", () => {
        ask("remove-site", { site })
          .catch((err) => say("sites-message", err.message, "bad"))
          .finally(load);
      });
      controls.append(remove);
    }
    // The strength of this site's uploads (default: the preset above, else the service's).
    const strength = document.createElement("select");
    strength.className = "strength";
    strength.setAttribute("aria-label", `Strength on ${site}`);
    const fallback = status.settings.preset || status.daemon.preset;
    presetOptions(strength, status.presets, status.settings.sitePresets?.[site], fallback);
    strength.addEventListener("change", () => {
      ask("set-site-preset", { site, preset: strength.value || null })
        .then(() => say("sites-message", `Strength on ${site}: ${strength.value || "default"}.`, "good"))
        .catch((err) => say("sites-message", err.message, "bad"))
        .finally(load);
    });
    controls.prepend(strength);
    controls.append(toggle);
    row.append(label, controls);
    rows.push(row);
  }
  $("sites").replaceChildren(...rows);
}

async function load() {
  status = await ask("get-status", {});
  renderPairing();
  renderDaemon();
  renderOptions();
  await renderSites();
}

$("pair").addEventListener("click", async () => {
  say("pair-message", "Pairing…");
  try {
    await ask("pair", { code: $("pair-code").value });
    $("pair-code").value = "";
    say("pair-message", "Paired with the FaceCloak service.", "good");
  } catch (err) {
    say("pair-message", pairingError(err), "bad");
  }
  await load();
});

$("unpair").addEventListener("click", async () => {
  await ask("unpair");
  say("pair-message", "This browser forgot its pairing.");
  await load();
});

$("save-options").addEventListener("click", async () => {
  try {
    await ask("set-options", {
      port: Number($("port").value),
      preset: $("preset").value || null,
      timeoutSeconds: Number($("timeout").value),
    });
    say("options-message", "Saved.", "good");
  } catch (err) {
    say("options-message", err.message, "bad");
  }
  await load();
});

$("add-site").addEventListener("click", () => {
  const site = normalizeSite($("new-site").value);
  if (!site) {
    say("sites-message", "Enter a site's address, like mastodon.social.", "bad");
    return;
  }
  setSite(site, true)
    .then(() => {
      $("new-site").value = "";
    })
    .catch((err) => say("sites-message", err.message, "bad"))
    .finally(load);
});

load().catch((err) => say("pair-message", err.message, "bad"));
