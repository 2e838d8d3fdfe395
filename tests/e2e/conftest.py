"""Fixtures of the browser end-to-end tests: a real daemon, the test site, Chromium.

Everything is module-scoped: one ``facecloak serve`` (fast preset, its own config
folder, a free port), one test site, one Chromium with the extension, paired with that
daemon through the options page.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from extension_driver import CHROMIUM, REPO, ExtensionDriver, launch
from upload_site import UploadSite
from uploads import SFaceEmbedder

DAEMON_READY_SECONDS = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A ``facecloak serve`` subprocess with the fast preset (and ``extra`` flags)."""

    def __init__(self, config_dir: Path, log_path: Path, extra: tuple[str, ...] = ()) -> None:
        self.config_dir = config_dir
        self.log_path = log_path
        self.extra = extra  # more ``facecloak serve`` flags
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        self.env = {**os.environ, "PYTHONPATH": path}

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cloak_core.cli", *args]

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self._cli(
                "serve",
                "--port",
                str(self.port),
                "--config-dir",
                str(self.config_dir),
                "--preset",
                "fast",
                *self.extra,
            ),
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + DAEMON_READY_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"facecloak serve exited {self.proc.returncode}:\n{self.log_tail()}")
            health = self.health()
            if health and health.get("status") == "ready":
                return
            if health and health.get("status") == "failed":
                pytest.fail(f"facecloak serve could not load its models:\n{self.log_tail()}")
            time.sleep(0.5)
        pytest.fail(f"facecloak serve not ready in {DAEMON_READY_SECONDS} s:\n{self.log_tail()}")

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/health", timeout=2) as r:
                return json.load(r)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def pairing_code(self) -> str:
        out = subprocess.run(
            self._cli("pair", "--config-dir", str(self.config_dir), "--json"),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return json.loads(out.stdout)["code"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium; the tests skip with a reason when it is not installed."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def daemon(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A running ``facecloak serve --preset fast`` with its own config folder."""
    folder = tmp_path_factory.mktemp("daemon")
    process = Daemon(folder / "config", folder / "serve.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def site() -> Iterator[UploadSite]:
    """The test site with its four upload pages."""
    server = UploadSite().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def extension(
    chromium: Path, daemon: Daemon, site: UploadSite, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExtensionDriver]:
    """Chromium with the extension, told the daemon's port and paired on the options page."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        context = launch(playwright, tmp_path_factory.mktemp("profile"))
        try:
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.origin)
            driver = ExtensionDriver(context)
            options = context.new_page()
            options.goto(driver.url("options.html"))
            expect(options.locator("#timeout")).not_to_have_value("")
            options.fill("#port", str(daemon.port))
            options.fill("#timeout", "300")
            options.click("#save-options")
            expect(options.locator("#options-message")).to_have_text("Saved.")
            options.close()
            driver.pairing_message = driver.pair(daemon.pairing_code())
            yield driver
        finally:
            context.close()


@pytest.fixture(scope="module")
def embedder(store) -> SFaceEmbedder:
    """OpenCV's SFace pipeline, independent of cloak_core's models."""
    return SFaceEmbedder(store)


@pytest.fixture
def page(extension):
    """A new tab, closed after the test."""
    tab = extension.context.new_page()
    yield tab
    tab.close()
