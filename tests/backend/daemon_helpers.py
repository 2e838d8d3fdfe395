"""Helpers for the daemon's tests: an in-process daemon, pairing, test images.

:class:`ReencodingProtector` has the daemon-facing methods of cloak_core's Protector and
does the real Protector's image work (cloak_core.imageio's decode and encode, with the same
limits and ``cancel``), but it protects nothing: it reports ``faces=0``. It is used only
where protection itself is not what is tested (security, limits, queue, job life cycle,
time limits); the full flow runs the real Protector in a real ``facecloak serve`` process
(test_daemon_process.py, test_load.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from backend.app import create_app, runner_options
from backend.config import DaemonConfig
from backend.pairing import PairingCodes
from cloak_core.errors import CancelledError, ImageError
from cloak_core.imageio import decode_image, encode_image

EXTENSION = "chrome-extension://" + "abcdefghijklmnopabcdefghijklmnop"


@dataclass(frozen=True)
class ReencodedImage:
    """The fields of cloak_core's ProtectResult that the daemon reads."""

    data: bytes
    mime: str
    format: str
    faces: int
    seconds: float
    width: int
    height: int


class ReencodingProtector:
    """Decodes and re-encodes each image as the Protector does (same format, same limits,
    stopped by ``cancel``); protects nothing (``faces=0``).

    ``steps`` progress reports ``step_seconds`` apart, checking ``cancel`` before each.
    ``batches`` records the size of every ``protect_many`` call, ``collections`` the
    collection labels it was given (None when it was given none), ``carried`` how many
    photos of each collection it was handed from earlier calls, ``waiting`` how many it
    was handed of photos later calls will protect; like the Protector it adds a row per
    photo of each collection to ``carried``. ``embedded`` lists the size of each photo
    given to :meth:`embed_photos` (one row and one face per photo), ``faces`` the faces
    each call was handed; ``embed_error``, when set, is raised by it instead.
    """

    def __init__(self, steps: int = 4, step_seconds: float = 0.0):
        self.steps = steps
        self.step_seconds = step_seconds
        self.device = "cpu"
        self.model_names = ["reencode-only"]
        self.batches: list[int] = []
        self.configs: list[object] = []
        self.measures: list[object] = []
        self.collections: list[object] = []
        self.carried: list[dict | None] = []
        self.waiting: list[dict | None] = []
        self.faces: list[list | None] = []
        self.embedded: list[int] = []
        self.embed_error: Exception | None = None
        self.closed = False
        self.thread_names: set[str] = set()

    def protect_many(
        self,
        items,
        *,
        progress=None,
        cancel=None,
        config=None,
        max_pixels=None,
        max_decoded_bytes=None,
        measure=False,
        collections=None,
        carried=None,
        waiting=None,
        faces=None,
    ):
        self.batches.append(len(items))
        self.faces.append(faces)
        self.waiting.append(
            None
            if waiting is None
            else {c: sum(len(e["rows"]) for e in photos) for c, photos in waiting.items()}
        )
        self.collections.append(collections)
        self.carried.append(
            None if carried is None else {c: len(e["rows"]) for c, e in carried.items()}
        )
        for label in set(collections or []) - {None}:
            if carried is not None:
                rows = carried.get(label, {}).get("rows", [])
                carried[label] = {"rows": [*rows, *(c for c in collections if c == label)]}
        self.measures.append(measure)
        self.configs.append(config)
        self.thread_names.add(threading.current_thread().name)
        for step in range(self.steps):
            if cancel is not None and cancel.is_set():
                raise CancelledError("cancelled")
            time.sleep(self.step_seconds)
            if progress is not None:
                progress((step + 1) / self.steps)
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled")
        out = []
        for data in items:
            try:
                out.append(self._reencode(data, max_pixels, max_decoded_bytes, cancel))
            except CancelledError:
                raise
            except ImageError as exc:
                out.append(exc)
        return out

    def _reencode(
        self,
        data: bytes,
        max_pixels: int | None,
        max_decoded_bytes: int | None,
        cancel: threading.Event | None,
    ) -> ReencodedImage:
        started = time.perf_counter()
        limit = {"max_pixels": max_pixels} if max_pixels is not None else {}
        source = decode_image(data, **limit, max_decoded_bytes=max_decoded_bytes, cancel=cancel)
        if cancel is not None and cancel.is_set():  # between the stages, as the Protector
            raise CancelledError("cancelled")
        encoded, mime = encode_image(source.pixels, source, cancel=cancel)
        return ReencodedImage(
            data=encoded,
            mime=mime,
            format=mime.split("/")[-1].upper(),
            faces=0,
            seconds=time.perf_counter() - started,
            width=source.width,
            height=source.height,
        )

    def embed_photos(self, items, *, max_pixels, max_decoded_bytes, config, cancel, found=None):
        if cancel is not None and cancel.is_set():
            raise CancelledError("cancelled")
        if self.embed_error is not None:
            raise self.embed_error
        self.embedded.extend(len(data) for data in items)
        if found is not None:  # a face per photo, named by its size
            found.extend([f"face of {len(data)} bytes"] for data in items)
        return {"rows": ["waiting"] * len(items)}

    def close(self) -> None:
        self.closed = True


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    """A small real JPEG (smooth noise), for tests that need a decodable image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@contextlib.asynccontextmanager
async def serve(
    config: DaemonConfig,
    protector: ReencodingProtector | None = None,
    factory: Callable | None = None,
) -> AsyncIterator[TestClient]:
    """The daemon in this process on a free loopback port, with a client; waits until ready."""
    protector = protector or ReencodingProtector()
    app = create_app(config, factory or (lambda _config: protector))
    server = TestServer(app, host="127.0.0.1")
    options = runner_options()
    options.pop("handler_cancellation")  # TestServer always sets it
    await server.start_server(**options)
    client = TestClient(server)
    await client.start_server()
    try:
        for _ in range(200):
            health = await (await client.get("/v1/health")).json()
            if health["status"] != "starting":
                break
            await asyncio.sleep(0.01)
        yield client
    finally:
        await client.close()


async def pair(client: TestClient, config: DaemonConfig, origin: str | None = EXTENSION) -> str:
    """Pair as ``facecloak pair`` + the extension would; returns the bearer token."""
    code = PairingCodes(config.config_dir).issue()
    headers = {"Origin": origin} if origin else {}
    body = {"code": code, "origin": origin} if origin else {"code": code}
    resp = await client.post("/v1/pair", json=body, headers=headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["token"]


def auth(token: str, origin: str | None = EXTENSION) -> dict[str, str]:
    """Request headers carrying the token and, as the extension sends, its Origin.

    A token is bound to the origin it was paired with: ``origin=None`` for a token paired
    without one (a command-line client).
    """
    headers = {"Authorization": f"Bearer {token}"}
    if origin:
        headers["Origin"] = origin
    return headers


def with_changes(config: DaemonConfig, **changes) -> DaemonConfig:
    """``config`` with some fields changed."""
    return replace(config, **changes)


# -- a real `facecloak serve` process ----------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(config_dir: Path) -> dict[str, str]:
    """The environment a user's shell would give ``facecloak`` (this checkout on the path)."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FACECLOAK_CONFIG_DIR": str(config_dir),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class DaemonProcess:
    """A ``facecloak serve`` process on a free loopback port, its log in ``log_path``."""

    proc: subprocess.Popen
    port: int
    config_dir: Path
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, how: signal.Signals = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Send ``how`` (SIGTERM, or SIGINT as Ctrl-C does), then wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(how)
        return self.proc.wait(timeout)

    def pair(self) -> str:
        """``facecloak pair --json`` then ``POST /v1/pair``, as a user and the extension do."""
        out = subprocess.run(
            [sys.executable, "-m", "cloak_core.cli", "pair", "--json"],
            capture_output=True,
            text=True,
            env=cli_env(self.config_dir),
            timeout=120,
            check=True,
        )
        code = json.loads(out.stdout)["code"]
        request = urllib.request.Request(
            self.url("/v1/pair"),
            data=json.dumps({"code": code, "origin": EXTENSION}).encode(),
            headers={"Content-Type": "application/json", "Origin": EXTENSION},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())["token"]

    def health(self) -> dict:
        with urllib.request.urlopen(self.url("/v1/health"), timeout=10) as resp:
            return json.loads(resp.read())


def _soft_nofile(limit: int) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def start_daemon(
    workdir: Path,
    *flags: str,
    ready_timeout: float = 600.0,
    reencoding: bool = False,
    descriptors: int | None = None,
) -> DaemonProcess:
    """Start ``python -m cloak_core.cli serve`` (the real Protector) and wait until it is ready.

    ``reencoding``: serve with :class:`ReencodingProtector` instead (reencoding_serve.py),
    for tests of the process's sockets and log that need no models. ``descriptors``: start
    the process with this soft limit of open files (``ulimit -n``), the hard one unchanged.
    """
    config_dir = workdir / "config"
    port = free_port()
    log_path = workdir / "daemon.log"
    if reencoding:
        command = [sys.executable, str(Path(__file__).with_name("reencoding_serve.py"))]
    else:
        command = [sys.executable, "-m", "cloak_core.cli", "serve"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port), "--config-dir", str(config_dir), *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env(config_dir),
            preexec_fn=None if descriptors is None else lambda: _soft_nofile(descriptors),
        )
    daemon = DaemonProcess(proc, port, config_dir, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"facecloak serve exited {proc.returncode}:\n{daemon.log()[-3000:]}")
        try:
            status = daemon.health()["status"]
        except OSError:
            status = "not listening"
        if status == "ready":
            return daemon
        if status == "failed":
            daemon.stop()
            raise RuntimeError(f"the daemon's models failed to load:\n{daemon.log()[-3000:]}")
        time.sleep(0.5)
    daemon.stop()
    raise RuntimeError("facecloak serve did not become ready in time")
