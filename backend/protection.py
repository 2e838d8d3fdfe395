"""What the daemon needs of the protection library, and the cheap checks made before queueing.

The daemon calls one entry point of :mod:`cloak_core`: a
:class:`cloak_core.pipeline.Protector`, through :meth:`ProtectorLike.protect_many`. It is
built by a *protector factory* given to :func:`backend.app.create_app`; the production
factory, :func:`load_protector`, imports the library (and so torch) lazily, inside the
worker thread, so that the daemon answers ``/v1/health`` ("starting") while models load.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

from backend.config import DaemonConfig
from cloak_core.errors import ImageError, ImageTooLargeError, UnsupportedImageError


class ProtectorLike(Protocol):
    """The part of :class:`cloak_core.pipeline.Protector` the daemon uses."""

    model_names: list[str]
    device: Any

    def protect_many(
        self,
        items: list[bytes],
        *,
        progress: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
        config: Any = None,
        max_pixels: int | None = None,
    ) -> Sequence[Any]:
        """One result (with ``data``, ``mime``, ``faces``, ``seconds``) or error per item.

        ``config`` is the :class:`cloak_core.presets.AttackConfig` of every item;
        ``max_pixels`` the decoded-size limit (over it: ImageTooLargeError for that item).
        """
        ...

    def close(self) -> None:
        """Release models and device memory."""
        ...


ProtectorFactory = Callable[[DaemonConfig], ProtectorLike]


def load_protector(config: DaemonConfig) -> ProtectorLike:
    """The production protector: cloak_core's Protector with weights from the model store.

    Blocking (loads every model of the ensemble); the worker calls it in its own thread.
    """
    from cloak_core.pipeline import Protector
    from cloak_core.presets import get_preset
    from cloak_core.store import ModelStore

    return Protector(get_preset(config.preset), store=ModelStore.from_env(), device=config.device)


def inspect_image(data: bytes, *, max_pixels: int) -> tuple[str, int, int]:
    """``(format, width, height)`` from the image's header only, before the job is queued.

    Decodes no pixels, so it is cheap enough for the event loop; the protector decodes
    fully later and reports damage past the header (a truncated JPEG) itself.
    Raises :class:`ImageError` for an empty body, :class:`UnsupportedImageError` when the
    bytes are no image format Pillow knows, :class:`ImageTooLargeError` when the header
    announces more than ``max_pixels`` pixels.
    """
    if not data:
        raise ImageError("the request body is empty; send the image's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format or "", image.size
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"the image has more pixels than the limit of {max_pixels / 1e6:.0f} megapixels"
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedImageError(
            "the body is not an image in a format FaceCloak reads"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"the image header cannot be read ({type(exc).__name__})") from None
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} pixels, over the limit of "
            f"{max_pixels / 1e6:.0f} megapixels"
        )
    return fmt, width, height
