"""Drives Chromium with the FaceCloak extension loaded from the repository root.

Launches Debian's Chromium (never a Playwright download) in a persistent context with
the unpacked extension, finds the extension's id from its service worker, and works the
extension's own pages the way a user would: the options page to pair, the popup (opened
in a tab as ``popup.html?tab=ID``) to turn a site on or off.

Host access: turning a site on calls ``chrome.permissions.request`` from the popup's
click. The test site runs on 127.0.0.1, which the manifest already grants (the daemon's
address), so the request resolves without a prompt; a site on another host would show
Chrome's permission prompt, which a headless browser cannot answer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, Playwright, expect

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("FACECLOAK_CHROMIUM", "/usr/bin/chromium"))


def launch(playwright: Playwright, profile: Path) -> BrowserContext:
    """A headless Chromium with the extension loaded; its profile lives in ``profile``."""
    return playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=str(CHROMIUM),
        headless=True,
        viewport={"width": 900, "height": 700},
        args=[
            "--headless=new",
            f"--disable-extensions-except={REPO}",
            f"--load-extension={REPO}",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


class ExtensionDriver:
    """The loaded extension: its id, service worker and pages."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        workers = [w for w in context.service_workers if w.url.startswith("chrome-extension://")]
        worker = workers[0] if workers else context.wait_for_event("serviceworker", timeout=30000)
        self.worker = worker
        self.id = worker.url.split("/")[2]
        self.pairing_message = ""  # what the options page said after the last pairing

    def url(self, path: str) -> str:
        return f"chrome-extension://{self.id}/extension/{path}"

    def tab_id(self, page: Page) -> int:
        """Chrome's tab id of ``page`` (asked of the service worker)."""
        return self.worker.evaluate(
            """async (url) => (await chrome.tabs.query({})).find((t) => t.url === url).id""",
            page.url,
        )

    def open_popup(self, page: Page, viewport: dict | None = None) -> Page:
        """The popup for ``page``'s tab, opened in a tab of its own."""
        popup = self.context.new_page()
        popup.set_viewport_size(viewport or {"width": 340, "height": 520})
        popup.goto(self.url(f"popup.html?tab={self.tab_id(page)}"))
        expect(popup.locator("#daemon-state")).not_to_have_text("Checking…")
        return popup

    def set_site(self, page: Page, on: bool) -> None:
        """Turn protection on or off for ``page``'s site with the popup's switch, then reload."""
        popup = self.open_popup(page)
        toggle = popup.locator("#site-toggle")
        toggle.wait_for(state="visible")
        expect(toggle).to_be_enabled()
        if toggle.is_checked() != on:
            toggle.click()
            expected = "On." if on else "Off for this site."
            expect(popup.locator("#site-message")).to_have_text(
                re.compile(f"^{re.escape(expected)}")
            )
        expect(toggle).to_be_checked(checked=on)
        popup.close()
        page.reload()

    def pair(self, code: str) -> str:
        """Enter ``code`` on the options page; returns the pairing state it then shows."""
        options = self.context.new_page()
        options.goto(self.url("options.html"))
        options.fill("#pair-code", code)
        options.click("#pair")
        expect(options.locator("#pair-message")).not_to_have_text(re.compile(r"^(Pairing…)?$"))
        message = options.text_content("#pair-message")
        if message.startswith("Paired"):  # the page then reloads the pairing state
            expect(options.locator("#pair-state")).to_have_text(re.compile("^Paired"))
        state = options.text_content("#pair-state")
        options.close()
        return f"{message} {state}"

    def unpair(self) -> None:
        """Forget the pairing token with the options page's button."""
        options = self.context.new_page()
        options.goto(self.url("options.html"))
        options.click("#unpair")
        expect(options.locator("#pair-message")).to_contain_text("forgot")
        options.close()
