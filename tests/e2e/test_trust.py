"""What FaceCloak trusts, tried in real Chromium.

- Code running in FaceCloak's content-script world (what a compromised page renderer can
  run) can neither read the pairing token nor switch protection off: extension storage
  is closed to content scripts, and the service worker answers them nothing but a frame's
  status.
- A program that took the daemon's port while the daemon was stopped gets neither the
  token nor a photo: it cannot prove it is the paired daemon, and the upload is held back.
- A daemon that hands a photo back unchanged (while saying it found a face) is never
  reported as having protected it, and the original is not uploaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_daemon import FakeDaemon
from uploads import PHOTO, assert_held_back, notice, upload, wait_for_upload

pytestmark = pytest.mark.browser

TRY_FROM_CONTENT_SCRIPT = """(async () => {
  const out = {};
  const attempt = async (name, fn) => {
    try {
      out[name] = { ok: true, value: await fn() };
    } catch (err) {
      out[name] = { ok: false, error: String(err && err.message || err) };
    }
  };
  await attempt("read local", () => chrome.storage.local.get(null));
  await attempt("write local", () => chrome.storage.local.set({ enabled: false }));
  await attempt("read session", () => chrome.storage.session.get(null));
  const ask = (message) => () => chrome.runtime.sendMessage(message);
  await attempt("message set-enabled", ask({ type: "set-enabled", enabled: false }));
  await attempt("message get-status", ask({ type: "get-status" }));
  return out;
})()"""


def in_content_script_world(page, expression: str):
    """Evaluate ``expression`` in FaceCloak's isolated world of ``page``'s main frame."""
    cdp = page.context.new_cdp_session(page)
    contexts: list[dict] = []
    cdp.on("Runtime.executionContextCreated", lambda event: contexts.append(event["context"]))
    cdp.send("Runtime.enable")
    frame_id = cdp.send("Page.getFrameTree")["frameTree"]["frame"]["id"]
    page.wait_for_timeout(200)
    (context,) = [
        c
        for c in contexts
        if c["name"] == "FaceCloak" and c.get("auxData", {}).get("frameId") == frame_id
    ]
    answer = cdp.send(
        "Runtime.evaluate",
        {
            "expression": expression,
            "contextId": context["id"],
            "awaitPromise": True,
            "returnByValue": True,
        },
    )
    cdp.detach()
    return answer["result"]["value"]


def test_content_scripts_cannot_read_the_token_or_switch_protection_off(
    extension, site, page, photos_dir
):
    page.goto(site.url("fetch"))
    extension.set_site(page, True)
    tried = in_content_script_world(page, TRY_FROM_CONTENT_SCRIPT)
    for name in ("read local", "write local", "read session"):
        assert not tried[name]["ok"], f"{name}: {tried[name]}"
    for name in ("message set-enabled", "message get-status"):
        assert not (tried[name]["ok"] and tried[name].get("value")), f"{name}: {tried[name]}"

    stored = extension.worker.evaluate("chrome.storage.local.get(null)")
    assert stored.get("enabled", True) is True and stored.get("token")
    site.clear()
    upload(page, "fetch", photos_dir / PHOTO)
    received = wait_for_upload(page, site, "fetch")
    assert received.data != (photos_dir / PHOTO).read_bytes()


# FaceCloak held the upload back, or the page uploaded something.
SETTLED = """() => document.getElementById("facecloak-notice")?.dataset.kind === "error"
  || document.getElementById("status").textContent !== "ready" """


def assert_not_uploaded(page, site, photo: Path, reason: str, hint: str) -> None:
    """FaceCloak held the upload back (``reason``); the site got nothing, original or not."""
    page.wait_for_function(SETTLED, timeout=60_000)
    page.wait_for_timeout(1000)
    uploaded = site.received("fetch")
    originals = [u for u in uploaded if u.data == photo.read_bytes()]
    shown = notice(page)
    assert shown.get("kind") == "error", (
        f"FaceCloak said {shown.get('text')!r}; the site received {len(uploaded)} file(s), "
        f"{len(originals)} of them the original"
    )
    assert_held_back(page, site, "fetch", reason, hint)


def paired_proof_key(daemon) -> bytes | None:
    """The proof key the daemon holds for the extension's pairing (None: a daemon older
    than proofs)."""
    records = json.loads((daemon.config_dir / "tokens.json").read_text())["tokens"]
    key = records[-1].get("proof_key")
    return bytes.fromhex(key) if key else None


def test_a_program_on_the_daemons_port_gets_neither_token_nor_photo(
    extension, daemon, site, page, photos_dir
):
    daemon.stop()
    impostor = FakeDaemon(daemon.port).start()
    try:
        page.goto(site.url("fetch"))
        extension.set_site(page, True)
        site.clear()
        upload(page, "fetch", photos_dir / PHOTO)
        assert_not_uploaded(page, site, photos_dir / PHOTO, "unverified", "facecloak serve")
        popup = extension.open_popup(page)
        assert popup.locator("#daemon-state").inner_text() == "Not verified"
        popup.close()
    finally:
        impostor.stop()
    assert impostor.seen, "the extension never asked the program on the port"
    assert not [s for s in impostor.seen if s.token], "the token was sent to the impostor"
    assert not [s for s in impostor.seen if s.path.startswith("/v1/jobs")], "a photo was sent"


def test_a_photo_sent_back_unchanged_is_never_called_protected(
    extension, daemon, site, page, photos_dir
):
    daemon.stop()  # (already stopped by the test before, when run in order)
    lazy = FakeDaemon(daemon.port, proof_key=paired_proof_key(daemon)).start()
    try:
        page.goto(site.url("fetch"))
        extension.set_site(page, True)
        site.clear()
        upload(page, "fetch", photos_dir / PHOTO)
        assert_not_uploaded(page, site, photos_dir / PHOTO, "failed", "unchanged")
    finally:
        lazy.stop()
    assert [s for s in lazy.seen if s.path == "/v1/jobs" and s.token]  # it was trusted
    assert "protected" not in notice(page)["text"].split("\n")[0]
