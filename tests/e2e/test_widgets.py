"""Real upload widgets from npm, and pages that read files in unusual ways, with the
extension in real Chromium against a real daemon.

Four widely used widgets (Dropzone, FilePond, Uppy's Dashboard with XHRUpload, Fine
Uploader), each from its published browser bundle (``tests/e2e/widgets``, installed by
``make widgets`` with ``npm ci``), get a photo every way each supports: picked, dropped,
pasted. For every combination:

- site on: the server receives exactly one file, protected (other bytes, the face's SFace
  embedding moved away), the page read it (the popup's record says so), and the widget's
  own interface shows the file's name, a finished upload and its preview;
- site off: exactly one file, the original;
- daemon stopped: nothing, FaceCloak's notice says why, the widget's list stays empty and
  its drop area is not left in its drag-over look; the popup's site line says "held back".

The hand-written pages read the input when the window gets the focus back, on a timer
started by the click, on ``input``, and read drops through ``webkitGetAsEntry()`` and
``getAsFileSystemHandle()``.

The tests run in file order: site on, then off, then with the daemon stopped (module
scoped fixtures: one daemon, one Chromium). The last test prints the table.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect
from uploads import (
    PHOTO,
    PROTECT_TIMEOUT_MS,
    copy_image,
    cosine,
    notice,
    rgb,
)
from widget_pages import NODE_MODULES, WIDGETS, installed_versions

pytestmark = pytest.mark.browser

# The fast preset protects the small photo in seconds; a widget that lost it never uploads.
UPLOAD_TIMEOUT_MS = min(PROTECT_TIMEOUT_MS, 120_000)
COMBOS = [(w.name, way) for w in WIDGETS.values() for way in w.ways]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
COLUMNS = ("protected", "one upload", "off → original", "down → blocked + notice", "UI intact")
RESULTS: dict[tuple[str, str], dict[str, bool]] = {}


@pytest.fixture(scope="module", autouse=True)
def widgets_installed():
    if not NODE_MODULES.is_dir():
        reason = "npm is missing" if shutil.which("npm") is None else "run `make widgets`"
        pytest.skip(f"the npm widgets are not installed in {NODE_MODULES} ({reason})")


def _site_on(extension, page, on: bool) -> None:
    """Turn the test site on or off once per phase (the popup's switch), then reload."""
    state = getattr(extension, "_widget_site_on", None)
    if state is not on:
        extension.set_site(page, on)
        extension._widget_site_on = on
    else:
        page.reload()


def _drop(page, selector: str, path) -> None:
    """A real drag of ``path`` from the desktop onto ``selector``'s middle."""
    box = page.locator(selector).first.bounding_box()
    cdp = page.context.new_cdp_session(page)
    data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}
    x, y = box["x"] + box["width"] / 2, box["y"] + min(box["height"] / 2, 60)
    for step in ("dragEnter", "dragOver", "drop"):
        cdp.send("Input.dispatchDragEvent", {"type": step, "x": x, "y": y, "data": data})
    cdp.detach()


def _paste(page, focus: str, path) -> None:
    """Put the photo on the clipboard as a PNG image and press Ctrl+V in ``focus``."""
    copy_image(page, path)
    page.bring_to_front()
    page.click("h1")
    page.locator(focus).first.focus()
    page.keyboard.press("Control+V")


def _hand(page, widget, way: str, path) -> None:
    if way == "pick":
        with page.expect_file_chooser() as chooser:
            page.locator(widget.browse).first.click()
        chooser.value.set_files(str(path))
    elif way == "drop":
        _drop(page, widget.drop, path)
    else:
        _paste(page, widget.paste_focus, path)


def _wait_uploaded(page, timeout_ms: int = UPLOAD_TIMEOUT_MS) -> None:
    """Wait until the page's status changes; it must say "uploaded" (not "cancelled"...)."""
    page.wait_for_function(
        "() => document.getElementById('status').textContent !== 'ready'", timeout=timeout_ms
    )
    assert page.text_content("#status").startswith("uploaded"), page.text_content("#status")


def _latest_activity(extension) -> dict:
    entries = extension.worker.evaluate(
        "async () => (await chrome.storage.session.get('activity')).activity || []"
    )
    return entries[0] if entries else {}


def _wait_delivery(extension, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        delivery = _latest_activity(extension).get("delivery")
        if delivery not in (None, "pending"):
            return delivery
        time.sleep(0.2)
    return str(_latest_activity(extension).get("delivery"))


def _ui_shows(page, widget, name: str | None) -> None:
    page.locator(widget.finished).first.wait_for(timeout=30_000)
    shown = page.locator(widget.item_name).first.inner_text().strip()
    if name is not None:
        assert shown == name or name.startswith(shown.rstrip("…. ")), (shown, name)
    else:
        assert shown, "the widget shows no name"
    assert page.locator(widget.item_name).count() == 1
    if widget.preview:
        page.locator(widget.preview).first.wait_for(timeout=30_000)


def _record(combo, column: str) -> None:
    RESULTS.setdefault(combo, {})[column] = True


# -- the options page, paired and connected --------------------------------------------------


def test_options_page_says_the_service_runs_and_hides_pairing_help(extension, daemon):
    options = extension.context.new_page()
    options.set_viewport_size({"width": 760, "height": 1000})
    options.goto(extension.url("options.html"))
    running = options.locator("#daemon-running")
    expect(running).to_have_text(re.compile(f"^Running on port {daemon.port} \\(service "))
    headings = options.locator("h2").all_text_contents()
    assert headings.index("Service") < headings.index("Pairing")  # the port comes first
    expect(options.locator("#pair-state")).to_have_text(re.compile("^Paired and connected"))
    for help_part in ("#pair-help", "#pair-code", "#pair"):
        expect(options.locator(help_part)).to_be_hidden()
    # The list is drawn after the pairing state: wait for it, then it is there whole.
    expect(options.locator("#sites label", has_text="X (twitter.com)")).to_have_count(1)
    labels = options.locator("#sites label").all_inner_texts()
    assert labels[:2] == ["Facebook (facebook.com)", "Instagram (instagram.com)"]
    assert len(labels) >= 9  # every suggested site
    assert len(set(labels)) == len(labels) and not [x for x in labels if x.count("(") > 1]
    if os.environ.get("FACECLOAK_UPDATE_SCREENSHOTS"):
        options.screenshot(path=str(SCREENSHOTS / "options.png"), full_page=True)
    options.close()


# -- hand-written pages: site on ------------------------------------------------------------


def _focus_back(page) -> None:
    """The window gets the focus back as after a picker closed (a trusted focus event)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Emulation.setFocusEmulationEnabled", {"enabled": False})
    other = page.context.new_page()
    other.bring_to_front()
    page.bring_to_front()
    other.close()
    cdp.detach()


@pytest.mark.parametrize("kind", ["focus", "poll", "oninput", "entry", "handle"])
def test_pages_that_read_files_their_own_way(kind, extension, site, page, photos_dir, embedder):
    photo = photos_dir / PHOTO
    page.goto(site.url(kind))
    _site_on(extension, page, True)
    site.clear()
    if kind in ("entry", "handle"):
        page.locator("#zone").wait_for()
        _drop(page, "#zone", photo)
    else:
        with page.expect_file_chooser() as chooser:
            page.click("#picker")
        chooser.value.set_files(str(photo))
        if kind == "focus":
            _focus_back(page)
    _wait_uploaded(page)
    (received,) = site.wait_for(kind)
    assert received.name == PHOTO
    assert received.data != photo.read_bytes()
    similarity = cosine(embedder(rgb(photo.read_bytes())), embedder(rgb(received.data)))
    assert similarity < 0.5, similarity
    assert _wait_delivery(extension) == "read"


def test_a_drop_the_page_does_not_take_is_not_called_protected(extension, site, page, photos_dir):
    """Dropped where the page has no drop listener: protected, but not taken; both the
    page's card and the popup say so, and nothing is uploaded."""
    page.goto(site.url("fetch"))
    _site_on(extension, page, True)
    site.clear()
    page.locator("h1").wait_for()
    # It accepts drags (as pages that keep the browser from opening a dropped file do) but
    # has no drop listener: without the first, the browser would not fire a drop at all.
    page.evaluate("() => document.addEventListener('dragover', (e) => e.preventDefault())")
    _drop(page, "h1", photos_dir / PHOTO)
    page.wait_for_function(
        "() => document.getElementById('facecloak-notice')?.dataset.reason === 'ignored'",
        timeout=UPLOAD_TIMEOUT_MS,
    )
    assert "did not read" in notice(page)["text"]
    assert _wait_delivery(extension) == "ignored"
    popup = extension.open_popup(page)
    expect(popup.locator("#activity li").first).to_contain_text(
        "Protected, but the page did not take it"
    )
    popup.close()
    assert site.received() == []


# -- widgets: site on -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "way"), COMBOS)
def test_widget_gets_the_protected_photo(name, way, extension, site, page, photos_dir, embedder):
    widget = WIDGETS[name]
    photo = photos_dir / PHOTO
    original = photo.read_bytes()
    page.goto(site.url(name))
    _site_on(extension, page, True)
    site.clear()
    page.locator(widget.drop).first.wait_for()
    _hand(page, widget, way, photo)
    _wait_uploaded(page)
    received = site.wait_for(name)
    assert len(received) == 1, f"{len(received)} uploads"
    _record((name, way), "one upload")
    data = received[0].data
    before, after = rgb(original), rgb(data)
    assert data != original and after.shape == before.shape
    assert not np.array_equal(after, before)
    similarity = cosine(embedder(before), embedder(after))
    print(f"{name}/{way}: SFace cosine original vs uploaded {similarity:.3f}")
    assert similarity < 0.5
    assert _wait_delivery(extension) == "read"
    assert notice(page).get("kind") in ("done", None)
    _record((name, way), "protected")
    _ui_shows(page, widget, PHOTO if way != "paste" else None)
    _record((name, way), "UI intact")


# -- widgets: site off ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "way"), COMBOS)
def test_widget_site_off_gets_the_original(name, way, extension, site, page, photos_dir):
    widget = WIDGETS[name]
    photo = photos_dir / PHOTO
    page.goto(site.url(name))
    _site_on(extension, page, False)
    site.clear()
    page.locator(widget.drop).first.wait_for()
    _hand(page, widget, way, photo)
    _wait_uploaded(page, 30_000)
    (received,) = site.wait_for(name)
    if way == "paste":  # the clipboard holds a PNG of the photo's pixels
        assert np.array_equal(rgb(received.data), rgb(photo.read_bytes()))
    else:
        assert received.data == photo.read_bytes()
    assert notice(page) == {}
    _ui_shows(page, widget, PHOTO if way != "paste" else None)
    _record((name, way), "off → original")


# -- widgets: daemon stopped ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "way"), COMBOS)
def test_widget_daemon_down_blocks_with_notice(
    name, way, extension, daemon, site, page, photos_dir
):
    widget = WIDGETS[name]
    daemon.stop()
    page.goto(site.url(name))
    _site_on(extension, page, True)
    site.clear()
    page.locator(widget.drop).first.wait_for()
    _hand(page, widget, way, photos_dir / PHOTO)
    page.wait_for_function(
        "() => document.getElementById('facecloak-notice')?.dataset.kind === 'error'",
        timeout=60_000,
    )
    shown = notice(page)
    assert shown["reason"] == "unreachable" and "facecloak serve" in shown["text"]
    time.sleep(1.0)
    assert site.received(name) == []
    assert page.text_content("#status") == "ready"
    assert page.locator(widget.item_name).count() == 0  # nothing reached the widget
    assert page.locator(widget.dragging).count() == 0  # and its drop area let go of the drag
    if (name, way) == COMBOS[0]:
        popup = extension.open_popup(page)
        assert (
            popup.locator("#site-hint").inner_text().startswith("Uploads of photos are held back")
        )
        popup.close()
    _record((name, way), "down → blocked + notice")


def test_widget_table():
    """Every cell green; the table goes to the test's output (pytest -s or -rA)."""
    versions = installed_versions()
    lines = [
        "| widget | way in | " + " | ".join(COLUMNS) + " |",
        "| --- | --- |" + " --- |" * len(COLUMNS),
    ]
    for name, way in COMBOS:
        cells = RESULTS.get((name, way), {})
        marks = ["yes" if cells.get(c) else "NO" for c in COLUMNS]
        package = WIDGETS[name].package
        lines.append(
            f"| {package} {versions.get(package, '?')} | {way} | " + " | ".join(marks) + " |"
        )
    print("\n" + "\n".join(lines))
    missing = [(combo, c) for combo in COMBOS for c in COLUMNS if not RESULTS.get(combo, {}).get(c)]
    assert not missing, missing
