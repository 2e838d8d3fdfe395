"""An upload of more photos than the daemon's queue holds at once (a carousel of up to 20
photos, an album of more, against a queue of 16): the daemon answers the photos that
find no room 429, and the extension offers each again until there is room, within the
photo's time limit, so every photo of the upload arrives protected and none is refused.

The daemon here holds one waiting photo (``--queue-size 1``): of an upload of three
photos, the first runs at once (a full queue does not wait for the rest of its upload),
the second waits, and the third finds no room."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon
from uploads import PHOTO, upload_copies

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
    names = ["first.jpg", "second.jpg", "third.jpg"]
    uploads, logged = upload_copies(
        extension, daemon, site, page, photos_dir / PHOTO, tmp_path, names, embedder
    )
    assert sorted(u.name for u in uploads) == names
    # One photo found the queue full at least once, and was taken later: the worker ran
    # each photo in a batch of its own (the queue holds one).
    assert b"POST /v1/jobs 429" in logged, daemon.log_tail()
    assert logged.count(b"INFO batch of 1 ") == 3, daemon.log_tail()
