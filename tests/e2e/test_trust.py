"""What FaceCloak trusts, tried in real Chromium.

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
from uploads import PHOTO, assert_held_back, notice, upload

pytestmark = pytest.mark.browser

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
