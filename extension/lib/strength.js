// The strength (preset) choices of the popup and the options page. The list is the
// daemon's (GET /v1/health), else this extension's own (settings.js PRESETS).

/** Fill `select` with "default" and the presets; `fallback` names what "default" means. */
export function presetOptions(select, presets, chosen, fallback) {
  select.replaceChildren();
  const options = [["", `Default (${fallback || "the service's"})`], ...presets.map((p) => [p, p])];
  if (chosen && !presets.includes(chosen)) options.push([chosen, `${chosen} (unknown to the service)`]);
  for (const [value, text] of options) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = text;
    select.append(option);
  }
  select.value = chosen || "";
}
