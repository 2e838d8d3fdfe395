"""``make extension`` writes a zip that Chromium loads: unpacked into a fresh folder, the
extension's service worker starts, and its popup and options pages render."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import pytest
from extension_driver import CHROMIUM, REPO
from playwright.sync_api import expect, sync_playwright

pytestmark = pytest.mark.browser


def test_make_extension_zip_loads_in_chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium")
    if shutil.which("make") is None:
        pytest.skip("make is missing")
    zipped = REPO / "dist" / "facecloak-extension.zip"
    subprocess.run(["make", "-s", "-B", "extension"], cwd=REPO, check=True, timeout=120)
    with zipfile.ZipFile(zipped) as archive:
        names = archive.namelist()
        assert "manifest.json" in names and "extension/background.js" in names
        assert not [n for n in names if n.startswith(("tests/", "backend/", "cloak_core/"))]
        archive.extractall(tmp_path / "unpacked")
    unpacked = tmp_path / "unpacked"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--headless=new",
                f"--disable-extensions-except={unpacked}",
                f"--load-extension={unpacked}",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ],
        )
        try:
            workers = [
                w for w in context.service_workers if w.url.startswith("chrome-extension://")
            ]
            worker = (
                workers[0] if workers else context.wait_for_event("serviceworker", timeout=30000)
            )
            assert worker.url.endswith("/extension/background.js")
            ext_id = worker.url.split("/")[2]
            page = context.new_page()
            page.goto(f"chrome-extension://{ext_id}/extension/popup.html")
            expect(page.locator("#daemon-state")).not_to_have_text("Checking…")
            page.goto(f"chrome-extension://{ext_id}/extension/options.html")
            expect(page.locator("#port")).not_to_have_value("")
        finally:
            context.close()
