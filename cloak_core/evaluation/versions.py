"""The versions of the software an evaluation's figures depend on, for its report."""

from __future__ import annotations

import platform
import sys

from cloak_core import __version__

# Libraries whose version changes the figures: (module, attribute holding its version).
LIBRARIES = (
    ("torch", "__version__"),
    ("numpy", "__version__"),
    ("mediapipe", "__version__"),
    ("dlib", "__version__"),
    ("cv2", "__version__"),
    ("PIL", "__version__"),
)


def software_versions() -> dict[str, str | None]:
    """FaceCloak's, Python's, the platform's and each library's version (None: missing)."""
    out: dict[str, str | None] = {
        "facecloak": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for module, attr in LIBRARIES:
        try:
            out[module] = str(getattr(__import__(module), attr))
        except Exception:  # noqa: BLE001 - a missing optional library is reported as None
            out[module] = None
    return out
