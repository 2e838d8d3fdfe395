"""An upload of more photos than the daemon's queue holds at once (a carousel of up to 20
photos, an album of more, against a queue of 16): the daemon answers the photos that
find no room 429, and the extension offers each again until there is room, within the
photo's time limit, so every photo of the upload arrives protected and none is refused.

The daemon here holds one waiting photo (``--queue-size 1``), so an upload of two
photos fills it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon
from test_upload_paths import assert_protected
from uploads import PHOTO, PROTECT_TIMEOUT_MS

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def daemon(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """``facecloak serve --preset fast --queue-size 1`` (this module's extension pairs with it)."""
    folder = tmp_path_factory.mktemp("daemon-one-place")
    process = Daemon(folder / "config", folder / "serve.log", extra=("--queue-size", "1"))
    process.start()
    yield process
    process.stop()


def test_photos_that_find_the_queue_full_are_offered_again(
    extension, daemon, site, page, photos_dir, embedder, tmp_path
):
    photo = photos_dir / PHOTO
    first, second = tmp_path / "first.jpg", tmp_path / "second.jpg"
    for path in (first, second):
        shutil.copyfile(photo, path)
    page.goto(site.url("fetch"))
    extension.set_site(page, True)
    site.clear()
    logged = daemon.log_path.stat().st_size
    page.locator("#picker").set_input_files([str(first), str(second)])

    site.wait_for("fetch", count=2, timeout_s=PROTECT_TIMEOUT_MS / 1000)
    uploads = site.received("fetch")
    assert sorted(u.name for u in uploads) == ["first.jpg", "second.jpg"]
    for upload in uploads:
        assert_protected(upload.data, photo.read_bytes(), embedder)
    with daemon.log_path.open("rb") as log:
        log.seek(logged)
        seen = log.read()
    # One photo found the queue full at least once, and was taken later.
    assert b"POST /v1/jobs 429" in seen, daemon.log_tail()
    assert seen.count(b"POST /v1/jobs 202") == 2, daemon.log_tail()
