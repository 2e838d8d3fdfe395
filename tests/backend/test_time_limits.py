"""The job time limit, against a real ``facecloak serve`` process: hostile or merely huge
photos are refused at once or stopped at their deadline, and the next photo is served.

The process runs the re-encoding test double (reencoding_serve.py), which decodes and
encodes with cloak_core.imageio exactly as the Protector does, ``cancel`` included.
"""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from daemon_helpers import DaemonProcess, auth, jpeg_bytes, start_daemon
from fuzz.hostile import many_scans_jpeg, progressive_jpeg
from PIL import Image

from backend.jobs import STOP_GRACE

# Well under every workload below (each takes 1.5 s or more here), so that a machine
# several times faster still runs past it.
JOB_TIMEOUT = 0.4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("daemon")
    process = start_daemon(
        workdir,
        "--job-timeout",
        str(JOB_TIMEOUT),
        "--batch-size",
        "1",
        reencoding=True,
        ready_timeout=120,
    )
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def token(daemon):
    return daemon.pair()


def post(daemon: DaemonProcess, token: str, data: bytes) -> tuple[int, dict, float]:
    """``POST /v1/protect``: status, JSON error (or ``{}``), seconds to the answer."""
    request = urllib.request.Request(daemon.url("/v1/protect"), data=data, headers=auth(token))
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            resp.read()
            return resp.status, {}, time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), time.monotonic() - started


def noisy_png(width: int, height: int) -> bytes:
    """A real photo-like PNG with noise in its low bits: quick to decode, slow to encode."""
    base = np.asarray(Image.open(io.BytesIO(progressive_jpeg(width, height, seed=3))))
    noise = np.random.default_rng(0).integers(0, 16, base.shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray((base & 0xF0) | noise).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_a_jpeg_of_many_scans_is_refused_at_once_and_the_next_photo_served(daemon, token):
    # 15 KB, 1,000 scans of 49 megapixels: about 10 s of decoding, past any time limit,
    # in a call that nothing could interrupt. Refused from its structure instead.
    status, error, seconds = post(daemon, token, many_scans_jpeg(7000, 7000, 1000))
    assert status == 413 and error["error"] == "too_large", error
    assert "scans" in error["message"]
    assert seconds < 1.0
    status, _, seconds = post(daemon, token, jpeg_bytes())
    assert status == 200 and seconds < 1.0


@pytest.mark.parametrize(
    "name",
    [
        # 100 scans, the most allowed, of 49 megapixels: 2 s of decoding in one 2 KB block,
        # so the decoder cannot look at the deadline before the end of it.
        "JPEG of 100 scans",
        # 48 megapixels, 4 MB: 1 s decoding, 0.7 s encoding; stopped between blocks.
        "large progressive JPEG",
        # 12 megapixels: 0.7 s decoding, 3 s encoding; stopped between blocks of output.
        "noisy PNG",
    ],
)
def test_a_job_over_its_time_limit_fails_at_its_deadline_and_frees_the_worker(daemon, token, name):
    data = {
        "JPEG of 100 scans": lambda: many_scans_jpeg(7000, 7000, 90),
        "large progressive JPEG": lambda: progressive_jpeg(8000, 6000, seed=2),
        "noisy PNG": lambda: noisy_png(4000, 3000),
    }[name]()
    status, error, seconds = post(daemon, token, data)
    print(f"\n{name}: {status} after {seconds:.2f} s", end="")
    assert status == 504 and error["error"] == "timeout", (status, error)
    assert JOB_TIMEOUT <= seconds < JOB_TIMEOUT + STOP_GRACE + 1.0
    status, _, seconds = post(daemon, token, jpeg_bytes())
    print(f"; the next photo: {status} after {seconds:.2f} s", end="")
    assert status == 200 and seconds < 2.0
    health = daemon.health()
    assert health["status"] == "ready" and health["queue"]["running"] == 0


def tiled_photo(photo: Path, across: int, down: int) -> bytes:
    """A JPEG of one real photo repeated ``across`` x ``down`` times: that many faces."""
    image = Image.open(photo).convert("RGB")
    sheet = Image.new("RGB", (image.width * across, image.height * down))
    for column in range(across):
        for row in range(down):
            sheet.paste(image, (column * image.width, row * image.height))
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.slow
def test_the_real_protector_stops_at_the_deadline_and_serves_the_next_photo(tmp_path, photos_dir):
    # The real pipeline: decoding, detection, the attack and encoding, each looking at the
    # deadline. Twelve faces of obama-720p.jpg on one 11-megapixel sheet took about 12 s
    # of work on two cores here with the old `fast`, 1.4 times quicker (a 48-megapixel photo
    # without faces took about 2 s, too close to a limit to be stopped reliably), so a
    # machine several times faster still runs past the 4 s limit; the one small face next
    # takes about 0.7 s alone, so it is served within the limit even on a machine busy
    # with something else (at 2 s it was not, beside another evaluation).
    daemon = start_daemon(
        tmp_path, "--preset", "fast", "--device", "cpu", "--job-timeout", "4", "--batch-size", "1"
    )
    try:
        token = daemon.pair()
        status, error, seconds = post(daemon, token, many_scans_jpeg(7000, 7000, 1000))
        assert status == 413 and seconds < 1.0, error
        sheet = tiled_photo(photos_dir / "obama-720p.jpg", 4, 3)
        status, error, seconds = post(daemon, token, sheet)
        print(f"\ntwelve faces with a 4 s limit: {status} after {seconds:.2f} s", end="")
        assert status == 504 and error["error"] == "timeout"
        assert seconds < 4.0 + STOP_GRACE + 1.0
        photo = (photos_dir / "obama-240p.jpg").read_bytes()
        request = urllib.request.Request(daemon.url("/v1/protect"), data=photo, headers=auth(token))
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 200 and resp.headers["X-FaceCloak-Faces"] == "1"
        print(f"; a real photo next: 200 after {time.monotonic() - started:.2f} s", end="")
    finally:
        assert daemon.stop() == 0
