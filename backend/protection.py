"""What the daemon needs of the protection library, and the cheap checks made before queueing.

The daemon calls one entry point of :mod:`cloak_core`: a
:class:`cloak_core.pipeline.Protector`, through :meth:`ProtectorLike.protect_many`. It is
built by a *protector factory* given to :func:`backend.app.create_app`; the production
factory, :func:`load_protector`, imports the library (and so torch) lazily, inside the
worker thread, so that the daemon answers ``/v1/health`` ("starting") while models load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from backend.config import DaemonConfig
from cloak_core.errors import ImageError
from cloak_core.imageio import ImageHeader, probe_image


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
        max_decoded_bytes: int | None = None,
        measure: bool | str = False,
        collections: Sequence[Any] | None = None,
        carried: dict[Any, Any] | None = None,
        waiting: dict[Any, Sequence[Any]] | None = None,
        faces: Sequence[Any] | None = None,
    ) -> Sequence[Any]:
        """One result (with ``data``, ``mime``, ``faces``, ``seconds``) or error per item.

        ``measure="models"`` (passed only for jobs that want a preview) adds ``previews``.
        ``collections`` (passed only when some items are one upload's photos): per item,
        the upload it is part of, or None; with them ``carried``, what the protector
        kept of each upload's photos in earlier calls, which it reads and adds to, and
        ``waiting``, per upload, what :meth:`embed_photos` gave for each of its photos
        that a later call will protect, which it reads only; ``faces`` (passed only when
        some items were embedded so), per item, the faces ``embed_photos`` found in it, or
        None.

        ``config`` is the :class:`cloak_core.presets.AttackConfig` of every item;
        ``max_pixels`` and ``max_decoded_bytes`` the decoded-size limits (over them:
        ImageTooLargeError for that item). Setting ``cancel`` must stop every stage part
        way and raise :class:`cloak_core.errors.CancelledError`.
        """
        ...

    def embed_photos(
        self,
        items: Sequence[bytes],
        *,
        max_pixels: int,
        max_decoded_bytes: int | None,
        config: Any,
        cancel: threading.Event | None,
        found: list[Any] | None = None,
    ) -> Any:
        """What ``waiting`` holds of a photo: its faces' clean embeddings, per model
        (nothing for a photo that does not decode); ``found`` gets the faces of each photo
        appended (None for one that does not decode). Setting ``cancel`` stops it part
        way."""
        ...

    def close(self) -> None:
        """Release models and device memory."""
        ...


ProtectorFactory = Callable[[DaemonConfig], ProtectorLike]


def load_protector(config: DaemonConfig) -> ProtectorLike:
    """The production protector: cloak_core's Protector with weights from the model store.

    Blocking (loads every model of the ensemble); the worker calls it in its own thread.
    With ``config.verify`` (the default) every recogniser here that the ensemble leaves
    out is loaded too, so each job's preview says how models the perturbation was not
    made with see its faces, not only the ensemble, which the attack fools by
    construction.
    """
    from cloak_core.detect import DetectorConfig
    from cloak_core.pipeline import UNSEEN, Protector
    from cloak_core.presets import get_preset
    from cloak_core.store import ModelStore

    return Protector(
        get_preset(config.preset),
        store=ModelStore.from_env(),
        device=config.device,
        detector_config=DetectorConfig(face_threshold=config.face_threshold),
        verify=UNSEEN if config.verify else (),
    )


def inspect_image(data: bytes, *, max_pixels: int, max_decoded_bytes: int) -> ImageHeader:
    """The image's format, size and decoded bytes, from its header only, before the job is
    queued.

    The library's own check (:func:`cloak_core.imageio.probe_image`), so the daemon refuses
    at once what the protector would refuse later: formats it does not read (415), images
    of several frames (415), more than ``max_pixels`` pixels or ``max_decoded_bytes``
    decoded bytes, or more decoding work than the library allows (too many JPEG scans,
    413). It decodes no pixels and its walk of the file is bounded, so it is cheap enough
    for the event loop; the protector decodes fully later and reports damage past the
    header (a truncated JPEG) itself. An empty body is an :class:`ImageError` (400).
    """
    if not data:
        raise ImageError("the request body is empty; send the image's bytes")
    return probe_image(data, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes)
