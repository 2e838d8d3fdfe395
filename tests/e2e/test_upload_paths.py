"""Ways to pass an original photo to a site that is on, closed in real Chromium.

- File pickers that no event on the page shows: an input never put in the document (its
  ``click()`` or ``showPicker()``), an input removed from the document once clicked.
- Photos whose name and type do not say "image" (no extension, a generic type), picked
  together: one upload of two photos, which the daemon protects as one collection.
- File inputs in frames of other origins inside a page of a site that is on: a frame of
  another site, a sandboxed frame.

Each test picks the photo through a real file chooser (or the input, for the type test)
and checks that the site received a protected photo, never the original.
"""

from __future__ import annotations

import pytest
from uploads import PHOTO, PROTECT_TIMEOUT_MS, assert_protected, notice, upload_copies

pytestmark = pytest.mark.browser


def received_one(site, kind: str) -> bytes:
    """Wait until the site received exactly one file on ``kind``; returns its bytes."""
    site.wait_for(kind, timeout_s=PROTECT_TIMEOUT_MS / 1000)
    uploads = site.received(kind)
    assert len(uploads) == 1, f"expected one upload, got {len(uploads)}"
    return uploads[0].data


@pytest.mark.parametrize("kind", ["detached", "showpicker", "removed"])
def test_pickers_no_event_shows_give_the_site_the_protected_photo(
    kind, extension, site, page, photos_dir, embedder
):
    photo = photos_dir / PHOTO
    page.goto(site.url(kind))
    extension.set_site(page, True)
    site.clear()
    with page.expect_file_chooser() as chooser:
        page.click("#picker" if kind == "removed" else "#pick")
    chooser.value.set_files(str(photo))

    data = received_one(site, kind)
    assert_protected(data, photo.read_bytes(), embedder)
    assert site.received(kind)[0].name == PHOTO
    assert notice(page).get("kind") in ("done", None)  # the success card hides itself


def test_photos_without_an_image_name_or_type_are_protected(
    extension, daemon, site, page, photos_dir, embedder, tmp_path
):
    # A JPEG named "photo" (no type at all) and one named "photo.bin" (a generic type).
    names = ["photo", "photo.bin"]
    uploads, logged = upload_copies(
        extension, daemon, site, page, photos_dir / PHOTO, tmp_path, names, embedder
    )
    assert [u.name for u in uploads] == names
    # The two photos of one upload went to the protector together, as one collection.
    assert b"batch of 2 (fast, collections of 2)" in logged, daemon.log_tail()


@pytest.mark.parametrize("kind", ["frame", "sandboxed"])
def test_frames_of_other_origins_are_protected_by_the_top_level_site(
    kind, extension, site, page, photos_dir, embedder
):
    photo = photos_dir / PHOTO
    page.goto(site.url(kind))
    extension.set_site(page, True)  # 127.0.0.1; the frame is localhost, or opaque
    site.clear()
    frame = page.frame_locator("#frame")
    frame.locator("#picker").wait_for()
    with page.expect_file_chooser() as chooser:
        frame.locator("#picker").click()
    chooser.value.set_files(str(photo))

    received = "framed" if kind == "frame" else kind
    assert_protected(received_one(site, received), photo.read_bytes(), embedder)
