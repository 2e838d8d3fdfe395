// FaceCloak's notice in the page: a small card (element #facecloak-notice, its content in
// an open shadow root so the site's CSS cannot restyle it) that says a photo is being
// protected, that it was, or why an upload was held back and how to fix that.
// Runs in the extension's isolated world; classic script (content scripts are not modules).

(() => {
  if (globalThis.FaceCloakNotice) return;

  const STYLE = `
    :host { all: initial; position: fixed; z-index: 2147483647; right: 16px; bottom: 16px;
      max-width: 360px; font: 14px/1.4 system-ui, sans-serif; color: #1d2433; }
    .card { background: #fff; border-radius: 10px; box-shadow: 0 6px 24px rgba(0,0,0,.25);
      padding: 12px 14px; border-left: 5px solid #3b6fd8; }
    .card.error { border-left-color: #c62828; }
    .card.done { border-left-color: #2e7d32; }
    .title { font-weight: 600; margin: 0 24px 4px 0; }
    .message { margin: 0; white-space: pre-line; }
    .bar { height: 4px; background: #e3e8f2; border-radius: 2px; margin-top: 8px; overflow: hidden; }
    .bar > div { height: 100%; background: #3b6fd8; width: 0; transition: width .2s; }
    .close { position: absolute; top: 6px; right: 8px; border: 0; background: none;
      font-size: 18px; cursor: pointer; color: #5b6478; }
    code { background: #f0f2f7; padding: 0 3px; border-radius: 3px; }
  `;

  let host = null;
  let hideTimer = 0;

  function ensure() {
    if (host?.isConnected) return host.shadowRoot;
    host = document.createElement("facecloak-notice");
    host.id = "facecloak-notice";
    const root = host.attachShadow({ mode: "open" });
    const style = document.createElement("style");
    style.textContent = STYLE;
    root.append(style);
    (document.body || document.documentElement).append(host);
    return root;
  }

  // Text with `code` spans, built from nodes (never innerHTML: messages may quote the daemon).
  function richText(parent, text) {
    text.split("`").forEach((part, i) => {
      if (!part) return;
      if (i % 2) {
        const code = document.createElement("code");
        code.textContent = part;
        parent.append(code);
      } else {
        parent.append(document.createTextNode(part));
      }
    });
  }

  /**
   * Show the notice. kind: "progress" | "done" | "error"; progress: 0..1 or undefined;
   * autoHideMs: hide after that long (0 keeps it until closed).
   */
  function show({ kind, title, message, progress, autoHideMs = 0, reason = "" }) {
    const root = ensure();
    clearTimeout(hideTimer);
    root.querySelector(".card")?.remove();
    const card = document.createElement("div");
    card.className = `card ${kind}`;
    card.setAttribute("role", kind === "error" ? "alert" : "status");
    host.dataset.kind = kind;
    host.dataset.reason = reason;
    const heading = document.createElement("p");
    heading.className = "title";
    heading.textContent = title;
    const body = document.createElement("p");
    body.className = "message";
    richText(body, message);
    const close = document.createElement("button");
    close.className = "close";
    close.type = "button";
    close.title = "Close";
    close.textContent = "×";
    close.addEventListener("click", hide);
    card.append(close, heading, body);
    if (typeof progress === "number") {
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.style.width = `${Math.round(Math.max(0, Math.min(1, progress)) * 100)}%`;
      bar.append(fill);
      card.append(bar);
    }
    root.append(card);
    if (autoHideMs) hideTimer = setTimeout(hide, autoHideMs);
  }

  function hide() {
    clearTimeout(hideTimer);
    host?.remove();
    host = null;
  }

  globalThis.FaceCloakNotice = Object.freeze({ show, hide });
})();
