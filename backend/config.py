"""The daemon's configuration: one frozen dataclass built once from flags, passed down."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cloak_core.detect import DetectorConfig
from cloak_core.errors import UsageError
from cloak_core.presets import DEFAULT_PRESET, PRESETS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

# ``local-only``: images live in memory only, never on disk or in logs, never leave the
# machine, and the daemon listens on loopback only. It is the only mode so far; the
# setting exists so that a future mode is an explicit, visible choice.
PRIVACY_MODES = ("local-only",)


def default_config_dir() -> Path:
    """``$FACECLOAK_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/facecloak``, else ``~/.config/...``."""
    explicit = os.environ.get("FACECLOAK_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "facecloak"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (``127.0.0.0/8``, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``facecloak serve`` is told, with the documented defaults.

    Sizes: ``max_bytes`` is the request body limit in bytes, ``max_pixels`` the decoded
    image limit in pixels (width * height), ``max_decoded_bytes`` in bytes (pixels x
    channels x bytes per sample: 8-bit RGBA at 50 megapixels, 16-bit RGBA at 25), and
    ``max_batch_decoded_bytes`` the decoded bytes of all the images of one batch. Times are
    in seconds. ``queue_size`` bounds the jobs waiting in front of the worker (a full queue
    answers 429); ``batch_size`` is how many waiting jobs of one preset the worker hands to
    the protector at once. A collection (one upload of several photos, see
    ``POST /v1/jobs``) waits in the queue until all its photos have come, at most
    ``collection_wait`` after its first. Connections: at most ``max_connections`` open
    (fewer if the process's descriptors do not allow as many), each closed when it has not sent a
    request's headers within ``header_timeout`` of opening or of its last answer; a request
    body must arrive within ``body_timeout``. ``face_threshold`` is the lowest score (0..1)
    of the detector's recall pass at which a region is protected (see
    :class:`cloak_core.detect.DetectorConfig`). ``verify``: load every recogniser here
    that the attack ensemble leaves out, so each preview says how models the perturbation
    was not made with see its faces (off: less memory and a faster preview, and the
    preview reports the ensemble alone).
    """

    config_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    privacy: str = "local-only"
    preset: str = DEFAULT_PRESET
    device: str = "auto"
    face_threshold: float = DetectorConfig.face_threshold
    max_bytes: int = 40 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_decoded_bytes: int = 200_000_000
    max_batch_decoded_bytes: int = 400_000_000
    queue_size: int = 16
    batch_size: int = 4
    job_timeout: float = 300.0
    result_ttl: float = 300.0
    max_results: int = 64
    shutdown_deadline: float = 30.0
    pairing_failures_per_minute: int = 5
    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    collection_wait: float = 5.0
    verify: bool = True

    def __post_init__(self) -> None:
        if self.privacy not in PRIVACY_MODES:
            raise UsageError(
                f"unknown privacy mode {self.privacy!r}; choose one of {', '.join(PRIVACY_MODES)}"
            )
        if self.privacy == "local-only" and not is_loopback_host(self.host):
            raise UsageError(
                f"refusing to listen on {self.host!r}: privacy mode local-only allows only "
                "a loopback address (127.0.0.1, ::1 or localhost)"
            )
        if self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if not 0.0 <= self.face_threshold <= 1.0:
            raise UsageError(f"face_threshold must be within 0..1, got {self.face_threshold}")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port {self.port} is not between 0 and 65535")
        for name in (
            "max_bytes",
            "max_pixels",
            "max_decoded_bytes",
            "queue_size",
            "batch_size",
            "max_results",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        for name in (
            "job_timeout",
            "result_ttl",
            "shutdown_deadline",
            "header_timeout",
            "body_timeout",
            "collection_wait",
        ):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive")
        if self.max_batch_decoded_bytes < self.max_decoded_bytes:
            raise UsageError(
                "max_batch_decoded_bytes must be at least max_decoded_bytes (a batch always "
                "takes one image)"
            )
