"""The protection pipeline, end to end: bytes in, faces found, attack, bytes out.

:class:`Protector` is the one entry point the daemon and the command line call. It loads
the ensemble once, then for each call: decode (:mod:`cloak_core.imageio`), detect
(:mod:`cloak_core.detect`), cut a padded region around every face, run the attack on all
faces of all images together (:mod:`cloak_core.attack`), blend each perturbation back
into the original pixels, encode. Pixels outside the face regions are never touched.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Collection, Hashable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cloak_core.align import (
    align_faces,
    estimate_similarity,
    footprint,
    resized_to_region,
    template_keypoints,
    translate,
)
from cloak_core.attack import FaceBatch, StageTimes, embed, lowkey, shared_identity
from cloak_core.detect import DetectorConfig, Face, FaceDetector
from cloak_core.errors import CancelledError, FaceCloakError, UsageError
from cloak_core.imageio import DecodedImage, decode_image, encode_image
from cloak_core.lpips import LPIPS, load_lpips
from cloak_core.models import default_ensemble, get_spec, load_model, unseen
from cloak_core.models.base import FaceModel, ModelSpec
from cloak_core.presets import AttackConfig
from cloak_core.store import ModelStore
from cloak_core.visibility import Visibility, VisibilityMeter

Progress = Callable[[float], None]

# Margin added around the union of the models' crops, as a fraction of its size; the
# perturbation fades out over it, so there is no visible seam.
REGION_MARGIN = 0.12
# Per collection label, per model, the clean embeddings of the faces a split upload's
# earlier calls protected (:meth:`Protector.protect_pixels`'s ``carried``).
Carried = MutableMapping[Hashable, dict[str, torch.Tensor]]
# Per collection label, per photo of it that a later call will protect, per model, the
# clean embeddings of that photo's faces (:meth:`Protector.protect_pixels`'s ``waiting``).
Waiting = Mapping[Hashable, Sequence[Mapping[str, torch.Tensor]]]

# Faces optimised together in one batch (larger batches are split, one after the other).
MAX_BATCH = {"cpu": 8, "cuda": 64}
# ``hold_out`` leaves one model out of each face's attack only when the ensemble has at
# least this many (with two, each face would be attacked by one model alone).
HOLD_OUT_MIN_MODELS = 3
# Whole-photo LPIPS is measured on copies scaled down to at most this many pixels.
LPIPS_MEASURE_PIXELS = 4_000_000
# Side of the preview crops (``measure="models"``), their JPEG quality, and how much of
# the face box's larger side the square around a face takes.
PREVIEW_SIZE = 96
PREVIEW_QUALITY = 80
PREVIEW_MARGIN = 1.4


@dataclass(frozen=True)
class ModelReport:
    """How one model sees one face before and after protection."""

    similarity_before: float
    similarity_after: float
    score_after: float
    same_person_after: bool


@dataclass(frozen=True)
class FacePreview:
    """One face as the user sees it: small crops and what the models say after protection.

    ``before`` and ``after`` are JPEG crops (at most PREVIEW_SIZE pixels a side) of the
    same square around the face, from the original and from the encoded output.
    ``same_person[model]`` is whether that model still matches the protected face to the
    original one (its own verification rule), ``similarity[model]`` their cosine, for
    each ensemble model; ``unseen_same_person`` and ``unseen_similarity`` the same for
    the recognisers outside the ensemble the protector verifies with (``verify``).
    """

    before: bytes
    after: bytes
    same_person: dict[str, bool]
    similarity: dict[str, float]
    unseen_same_person: dict[str, bool] = field(default_factory=dict)
    unseen_similarity: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ProtectResult:
    """The protected image and what was done to it.

    ``boxes`` are the faces' detector boxes ``(x0, y0, x1, y1)`` in pixels. When measured:
    ``lpips`` (AlexNet, the attack's own metric) on the whole photo, ``lpips_faces`` on
    the face crops (mean); ``models`` holds one :class:`ModelReport` per face per model;
    ``visibility`` one :class:`~cloak_core.visibility.Visibility` panel per face, on the
    face region at display scale (the independent verdict on how visible the change is).
    ``held_out`` names, per face, the ensemble model its attack left out (``hold_out``),
    whose report in ``models`` is then a black-box check: how a model the perturbation
    was not made with sees the face. ``unseen`` holds the same reports from the
    recognisers the protector was asked to verify with (``verify``): models outside the
    attack ensemble, so every face's report there is a black-box check.
    """

    data: bytes
    mime: str
    format: str
    faces: int
    seconds: float
    width: int
    height: int
    lpips: float | None = None
    lpips_faces: float | None = None
    models: dict[str, list[ModelReport]] = field(default_factory=dict)
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    visibility: tuple[Visibility, ...] = ()
    held_out: tuple[str | None, ...] = ()
    previews: tuple[FacePreview, ...] = ()
    unseen: dict[str, list[ModelReport]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Region:
    """Where one face's working region lies in its image and how the models see it."""

    image: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels
    work_size: tuple[int, int]  # (h, w) at the working resolution
    matrices: dict[str, torch.Tensor]  # model name -> (2, 3), working pixels -> model input
    open_sides: tuple[bool, bool, bool, bool]  # left, top, right, bottom are inside the image
    face: tuple[float, float, float, float]  # the face's box in working pixels (x0, y0, x1, y1)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def feather_mask(
    size: tuple[int, int], border: int, open_sides: tuple[bool, bool, bool, bool]
) -> torch.Tensor:
    """``(1, h, w)`` mask in 0..1: 1 inside, a raised-cosine ramp to 0 over ``border`` pixels.

    Only sides in ``open_sides`` (left, top, right, bottom) fade: a side on the image's
    own edge has no seam to hide.
    """
    h, w = size

    def ramp(n: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32)
        dist = torch.full((n,), float(border))
        if fade_start:
            dist = torch.minimum(dist, pos)
        if fade_end:
            dist = torch.minimum(dist, n - 1 - pos)
        t = (dist / max(border, 1)).clamp(0, 1)
        return 0.5 - 0.5 * torch.cos(torch.pi * t)

    left, top, right, bottom = open_sides
    return (ramp(h, top, bottom)[:, None] * ramp(w, left, right)[None, :]).unsqueeze(0)


def face_mask(
    size: tuple[int, int], box: tuple[float, float, float, float], scale: float
) -> torch.Tensor:
    """``(1, h, w)`` soft ellipse over a face box ``(x0, y0, x1, y1)`` grown by ``scale``.

    1 inside the ellipse, a raised-cosine fade to 0 over its outer third: the perturbation
    stays on the face, not on the background, hair or clothes the models' crops include.
    """
    h, w = size
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max(1.0, (x1 - x0) / 2 * scale), max(1.0, (y1 - y0) / 2 * scale)
    ys = torch.arange(h, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, w)
    r = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2).sqrt()
    t = ((1.0 - r) / (1.0 / 3.0)).clamp(0, 1)  # 1 inside 2/3 of the radius, 0 outside
    return (0.5 - 0.5 * torch.cos(torch.pi * t)).unsqueeze(0)


# ``Protector``'s ``verify`` for every recogniser here outside its ensemble.
UNSEEN = "unseen"


class Protector:
    """Loads an ensemble once and protects images with it; not thread-safe (one worker).

    ``verify``: recognisers outside the ensemble that measured results also report, in
    :attr:`ProtectResult.unseen` (``measure=True``) and in each preview
    (``measure="models"``): how models the perturbation was not made with see each
    protected face; :data:`UNSEEN` names every model here that the ensemble leaves out.
    Loaded with the ensemble, so a missing weight file fails here rather than on the
    first photo.
    """

    def __init__(
        self,
        config: AttackConfig,
        *,
        store: ModelStore,
        device: str = "auto",
        models: Sequence[str] | None = None,
        detector_config: DetectorConfig | None = None,
        verify: Sequence[str] | str = (),
    ) -> None:
        self.config = config
        self.detector_config = detector_config or DetectorConfig()
        self.store = store
        self.device = resolve_device(device)
        names = list(models or config.models or default_ensemble(store))
        if not names:
            raise UsageError("the attack ensemble is empty: name at least one model")
        self.model_names = names
        if isinstance(verify, str):
            if verify != UNSEEN:
                raise UsageError(f"verify takes model names or {UNSEEN!r}, got {verify!r}")
            verify = unseen(store, names)
        for name in verify:
            get_spec(name)  # an unknown name fails here, listing the known ones
            if name in names:
                raise UsageError(
                    f"{name} is in the attack ensemble: how it sees the face says nothing "
                    "about recognisers the perturbation was not made with"
                )
        self.verify_names = list(dict.fromkeys(verify))
        self._models: dict[str, FaceModel] = {}
        self._lpips: dict[str, LPIPS] = {}
        self._detector: FaceDetector | None = None
        self._meter: VisibilityMeter | None = None
        self._hold_out_turn = 0  # faces planned with ``hold_out`` so far
        for name in [*names, *self.verify_names]:
            self._model(name)
        if config.measures_lpips:
            self._lpips_net(config.lpips_net)

    # -- resources ---------------------------------------------------------------------

    def _model(self, name: str) -> FaceModel:
        if name not in self._models:
            self._models[name] = load_model(name, self.store, self.device)
        return self._models[name]

    def _lpips_net(self, net: str) -> LPIPS:
        if net not in self._lpips:
            self._lpips[net] = load_lpips(net, store=self.store, device=self.device)
        return self._lpips[net]

    @property
    def detector(self) -> FaceDetector:
        """The face detector, created on first use."""
        if self._detector is None:
            self._detector = FaceDetector(self.store, config=self.detector_config)
        return self._detector

    @property
    def meter(self) -> VisibilityMeter:
        """The visibility panel's networks, loaded on first use."""
        if self._meter is None:
            self._meter = VisibilityMeter(self.store, self.device)
        return self._meter

    def close(self) -> None:
        """Release the detector; the models go with the object."""
        if self._detector is not None:
            self._detector.close()
            self._detector = None

    def __enter__(self) -> Protector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes in, bytes out -----------------------------------------------------------

    def protect_bytes(
        self,
        data: bytes,
        *,
        out_format: str = "same",
        quality: int | None = None,
        measure: bool | str = False,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        config: AttackConfig | None = None,
        max_pixels: int = 50_000_000,
        max_decoded_bytes: int | None = None,
        times: StageTimes | None = None,
    ) -> ProtectResult:
        """Protect every face of one encoded image; see :meth:`protect_many`."""
        result = self.protect_many(
            [data],
            out_format=out_format,
            quality=quality,
            measure=measure,
            progress=progress,
            cancel=cancel,
            config=config,
            max_pixels=max_pixels,
            max_decoded_bytes=max_decoded_bytes,
            times=times,
        )[0]
        if isinstance(result, FaceCloakError):
            raise result
        return result

    def protect_many(
        self,
        items: Sequence[bytes],
        *,
        out_format: str = "same",
        quality: int | None = None,
        measure: bool | str = False,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        config: AttackConfig | None = None,
        max_pixels: int = 50_000_000,
        max_decoded_bytes: int | None = None,
        times: StageTimes | None = None,
        together: bool = False,
        collections: Sequence[Hashable | None] | None = None,
        carried: Carried | None = None,
        waiting: Waiting | None = None,
        faces: Sequence[Sequence[Face] | None] | None = None,
    ) -> list[ProtectResult | FaceCloakError]:
        """Protect several encoded images in one batched attack.

        Returns, per item, a :class:`ProtectResult` or the :class:`FaceCloakError` that
        item failed with (a bad image does not fail the others). ``max_pixels`` and
        ``max_decoded_bytes`` limit each decoded image (see
        :func:`cloak_core.imageio.decode_image`). Setting ``cancel`` stops every stage,
        decoding, detection, the attack and encoding, part way, and raises
        :class:`~cloak_core.errors.CancelledError`.
        ``times`` collects seconds per stage (decode, detect, the attack's stages, encode).
        ``measure``: ``True`` fills LPIPS, per-model reports and the visibility panel
        (seconds per photo); ``"models"`` only :attr:`ProtectResult.previews`, the models'
        verdicts on the encoded output and small crops (one forward pass per model).
        ``together``: the items are one person's collection; ``collections``: per item, the
        collection it is part of, or None; ``carried``: what earlier calls saw of those
        collections, ``waiting``: what later calls will protect of them (see
        :meth:`protect_pixels`). ``faces``: per item, the faces :meth:`embed_photos` already
        found in those very bytes (its ``found``), or None to detect them here.
        """
        if measure not in (False, True, "models"):
            raise UsageError(f"measure must be False, True or 'models', got {measure!r}")
        if collections is not None and len(collections) != len(items):
            raise UsageError(f"{len(collections)} collections for {len(items)} items")
        if faces is not None and len(faces) != len(items):
            raise UsageError(f"faces for {len(faces)} items, not {len(items)}")
        start = time.perf_counter()
        times = times or StageTimes(self.device)
        decoded: list[DecodedImage | FaceCloakError] = []
        with times.stage("decode"):
            for data in items:
                try:
                    decoded.append(
                        decode_image(
                            data,
                            max_pixels=max_pixels,
                            max_decoded_bytes=max_decoded_bytes,
                            cancel=cancel,
                        )
                    )
                except CancelledError:
                    raise
                except FaceCloakError as exc:
                    decoded.append(exc)
        good = [i for i, d in enumerate(decoded) if isinstance(d, DecodedImage)]
        images = [decoded[i].pixels for i in good]  # type: ignore[union-attr]
        known = [None] * len(good) if faces is None else [faces[i] for i in good]
        with times.stage("detect"):
            found = [
                list(k) if k is not None else self.detector.detect(_as_uint8(img), cancel=cancel)
                for img, k in zip(images, known, strict=True)
            ]
        held_out = self.plan_hold_out(found, config)
        protected = self.protect_pixels(
            images,
            found,
            progress=progress,
            cancel=cancel,
            config=config,
            times=times,
            held_out=held_out,
            together=together,
            collections=None if collections is None else [collections[i] for i in good],
            carried=carried,
            waiting=waiting,
        )
        seconds = time.perf_counter() - start
        results: list[ProtectResult | FaceCloakError] = list(decoded)  # type: ignore[arg-type]
        for k, i in enumerate(good):
            source: DecodedImage = decoded[i]  # type: ignore[assignment]
            try:
                with times.stage("encode"):
                    data, mime = encode_image(
                        protected[k], source, format=out_format, quality=quality, cancel=cancel
                    )
            except CancelledError:
                raise
            except FaceCloakError as exc:
                results[i] = exc
                continue
            height, width = source.pixels.shape[:2]
            result = ProtectResult(
                data=data,
                mime=mime,
                format=mime.split("/")[-1].upper(),
                faces=len(found[k]),
                seconds=seconds,
                width=width,
                height=height,
                boxes=tuple(f.box for f in found[k]),
                held_out=tuple(held_out[k]),
            )
            if measure == "models":
                result = self._measure_models(result, source, found[k])
            elif measure:
                result = self._measure(result, source, found[k])
            results[i] = result
        return results

    # -- pixels in, pixels out ---------------------------------------------------------

    def protect_pixels(
        self,
        images: Sequence[np.ndarray],
        faces: Sequence[Sequence[Face]],
        *,
        seed: int | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        config: AttackConfig | None = None,
        times: StageTimes | None = None,
        held_out: Sequence[Sequence[str | None]] | None = None,
        together: bool = False,
        collections: Sequence[Hashable | None] | None = None,
        carried: Carried | None = None,
        waiting: Waiting | None = None,
    ) -> list[np.ndarray]:
        """The attack on given faces: ``images`` are ``(H, W, 3)`` RGB uint8 or uint16.

        ``faces[i]`` lists the faces of ``images[i]`` (their landmarks are used). Returns
        copies of the images with every face protected, same shape and dtype; pixels
        outside the face regions are unchanged. ``held_out[i][j]``, when given, names the
        ensemble model left out of face ``j`` of image ``i``'s attack (:meth:`plan_hold_out`).
        ``together``: the images are one person's collection (one upload of several
        photos, or the files of one ``protect`` call), so with the preset's ``centroid``
        the faces that show one person are pushed away from their shared identity
        (:func:`~cloak_core.attack.shared_identity`); never across unrelated uploads.
        ``collections``, instead: per image, the collection it is part of (images with equal
        labels are one collection, as with ``together``), or None for an image alone; so
        one call can hold several uploads of several photos each.
        ``carried``, with ``collections``: per collection label, per model, the clean
        embeddings of that collection's faces protected by earlier calls (an upload
        larger than one call, split between calls): they count in the shared identity as
        photos of the collection, and are not attacked again. This call's faces of each
        of its collections are added to it, so the caller keeps one ``carried`` for the
        calls of a split upload.
        ``waiting``, with ``collections``: per collection label, the clean embeddings
        (:meth:`embed_photos`) of each photo of that collection a later call will protect;
        they count in the shared identity as ``carried`` does, so the first part of a split
        upload is pushed from the identity of the whole upload too, and are not added to
        ``carried`` (their own call adds them).
        """
        config = config or self.config
        times = times or StageTimes(self.device)
        seed = config.seed if seed is None else seed
        names, models, regions = self._regions(images, faces, config)
        outputs = [np.array(img, copy=True) for img in images]
        if not regions:
            if progress is not None:
                progress(1.0)
            return outputs
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        if seed is None:
            generator.seed()
        left_out = [h for hs in (held_out or [[None] * len(fs) for fs in faces]) for h in hs]
        # Faces with the same ensemble together, similar sizes together within it, so
        # padding to a common size wastes little.
        order = sorted(
            range(len(regions)),
            key=lambda r: (left_out[r] or "", regions[r].work_size),
            reverse=True,
        )
        limit = MAX_BATCH.get(self.device.type, 8)
        chunks: list[list[int]] = []
        for r in order:
            if chunks and len(chunks[-1]) < limit and left_out[chunks[-1][0]] == left_out[r]:
                chunks[-1].append(r)
            else:
                chunks.append([r])
        lpips = self._lpips_net(config.lpips_net) if config.measures_lpips else None
        targets = None
        if (carried is not None or waiting is not None) and together:
            raise UsageError("carried or waiting collections need collection labels, not together")
        elsewhere = {*(carried or {}), *(k for k, photos in (waiting or {}).items() if photos)}
        collection, labels = _collection_ids(together, collections, len(images), elsewhere)
        if collection is not None and config.centroid:
            with times.stage("shared identity"):
                clean = self._clean_embeddings(regions, images, chunks, models, config)
                targets = self._shared_identity(
                    regions, clean, models, config, collection, labels, carried, waiting
                )
        for c, chunk in enumerate(chunks):
            chunk_regions = [regions[r] for r in chunk]
            members = [n for n in names if n != left_out[chunk[0]]]
            with times.stage("prepare regions"):
                batch = self._batch(chunk_regions, images, members, config)

            def chunk_progress(f: float, c: int = c) -> None:
                if progress is not None:
                    progress((c + f) / len(chunks))

            delta = lowkey(
                batch,
                {n: models[n] for n in members},
                lpips,
                config,
                generator=generator,
                progress=chunk_progress,
                cancel=cancel,
                times=times,
                targets=None if targets is None else {n: targets[n][chunk] for n in members},
            )
            with times.stage("blend"):
                for k, region in enumerate(chunk_regions):
                    _blend(outputs[region.image], region, delta[k])
        return outputs

    def _regions(
        self,
        images: Sequence[np.ndarray],
        faces: Sequence[Sequence[Face]],
        config: AttackConfig,
    ) -> tuple[list[str], dict[str, FaceModel], list[_Region]]:
        """The ensemble's names and models, and the region of every face of ``images``
        (``faces[i]`` those of image ``i``), in order."""
        names = list(config.models or self.model_names)
        models = {n: self._model(n) for n in names}
        specs = [get_spec(n) for n in names]
        regions = [
            self._plan(i, img.shape[:2], face, specs, config)
            for i, (img, fs) in enumerate(zip(images, faces, strict=True))
            for face in fs
        ]
        return names, models, regions

    def _shared_identity(
        self,
        regions: Sequence[_Region],
        embeddings: Mapping[str, torch.Tensor],
        models: Mapping[str, FaceModel],
        config: AttackConfig,
        collection: torch.Tensor,
        labels: Mapping[Hashable, int],
        carried: Carried | None,
        waiting: Waiting | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per model, ``(len(regions), D)``: what each face is pushed away from, the mean
        of the clean ``embeddings`` of the faces in the other photos of its collection
        (``collection``, per image; ``labels``, the number of each label) that every model
        verifies as the same person, itself included, with the faces ``carried`` from
        earlier calls and those of the photos ``waiting`` for later ones
        (:func:`~cloak_core.attack.shared_identity`); this call's faces join ``carried``."""
        names = list(models)
        photo = torch.tensor([r.image for r in regions])
        face_collection = collection[photo]
        before: dict[Hashable, dict[str, torch.Tensor]] = {}
        for label in labels:
            parts = [
                e
                for e in [(carried or {}).get(label), *(waiting or {}).get(label, ())]
                if e is not None and set(names) <= set(e) and len(e[names[0]])
            ]
            if parts:
                before[label] = {n: torch.cat([e[n].to(self.device) for e in parts]) for n in names}
        companions, companion_collection = None, None
        if before:
            companions = {
                n: torch.cat([e[n].to(self.device) for e in before.values()]) for n in names
            }
            companion_collection = torch.cat(
                [torch.full((len(e[names[0]]),), labels[label]) for label, e in before.items()]
            )
        targets = shared_identity(
            embeddings,
            models,
            photo,
            face_collection,
            mix=config.centroid_mix,
            companions=companions,
            companion_collection=companion_collection,
        )
        if carried is not None:
            for label, number in labels.items():
                mine = face_collection == number
                if bool(mine.any()):
                    new = {n: embeddings[n][mine.to(self.device)] for n in names}
                    old = carried.get(label)
                    if old is not None and set(names) <= set(old):
                        new = {n: torch.cat([old[n].to(self.device), new[n]]) for n in names}
                    carried[label] = new
        return targets

    def _clean_embeddings(
        self,
        regions: Sequence[_Region],
        images: Sequence[np.ndarray],
        chunks: Sequence[Sequence[int]],
        models: Mapping[str, FaceModel],
        config: AttackConfig,
    ) -> dict[str, torch.Tensor]:
        """Per model, ``(len(regions), D)``: each face's embedding before protection, as
        the attack sees it (its working crop, flipped too with ``flips``)."""
        names = list(models)
        found: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        order = [r for chunk in chunks for r in chunk]
        autocast = torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
        )
        with torch.no_grad(), autocast:
            for chunk in chunks:
                batch = self._batch([regions[r] for r in chunk], images, names, config)
                for n in names:
                    found[n].append(embed(models[n], batch.pixels, batch.matrices[n], config.flips))
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        return {n: torch.cat(found[n], 0)[back.to(self.device)] for n in names}

    def embed_faces(
        self,
        images: Sequence[np.ndarray],
        faces: Sequence[Sequence[Face]],
        config: AttackConfig | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per ensemble model, ``(F, D)``: the clean embeddings of every face of ``images``
        (``faces[i]`` those of image ``i``, in order), as :meth:`protect_pixels` computes
        them for a shared identity: what ``carried`` holds of a collection's earlier photos."""
        config = config or self.config
        names, models, regions = self._regions(images, faces, config)
        if not regions:
            return {n: torch.empty(0, models[n].spec.embedding_dim) for n in names}
        limit = MAX_BATCH.get(self.device.type, 8)
        chunks = [
            list(range(k, min(k + limit, len(regions)))) for k in range(0, len(regions), limit)
        ]
        return self._clean_embeddings(regions, images, chunks, models, config)

    def embed_photos(
        self,
        items: Sequence[bytes],
        *,
        max_pixels: int = 50_000_000,
        max_decoded_bytes: int | None = None,
        config: AttackConfig | None = None,
        cancel: threading.Event | None = None,
        found: list[list[Face] | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per ensemble model, ``(F, D)`` on the CPU: the clean embeddings of every face the
        detector finds in the encoded photos ``items`` (:meth:`embed_faces`), one photo
        decoded at a time; a photo that does not decode adds nothing (protecting it
        reports why). What ``carried`` holds of photos protected in another call, and
        ``waiting`` of each photo a later call will protect. ``found``, when given, gets
        each photo's faces appended (None for a photo that does not decode), for
        :meth:`protect_many`'s ``faces``. Setting ``cancel`` stops it part way
        (:class:`~cloak_core.errors.CancelledError`)."""
        parts = [self.embed_faces([], [], config)]  # no face: an empty (0, D) per model
        for data in items:
            try:
                pixels = decode_image(
                    data, max_pixels=max_pixels, max_decoded_bytes=max_decoded_bytes, cancel=cancel
                ).pixels
            except CancelledError:
                raise
            except FaceCloakError:
                if found is not None:
                    found.append(None)
                continue
            faces = self.detector.detect(_as_uint8(pixels), cancel=cancel)
            if found is not None:
                found.append(faces)
            parts.append(self.embed_faces([pixels], [faces], config))
        return {n: torch.cat([part[n].float().cpu() for part in parts]) for n in parts[0]}

    def plan_hold_out(
        self, faces: Sequence[Sequence[Face]], config: AttackConfig | None = None
    ) -> list[list[str | None]]:
        """Per image, per face, the ensemble model its attack leaves out: with
        ``hold_out`` and at least three models, each in turn, counting on from the faces
        this protector planned before (so one-face photos do not all leave out the
        same model); otherwise none."""
        config = config or self.config
        names = list(config.models or self.model_names)
        if not config.hold_out or len(names) < HOLD_OUT_MIN_MODELS:
            return [[None] * len(fs) for fs in faces]
        plan = []
        for fs in faces:
            plan.append([names[(self._hold_out_turn + k) % len(names)] for k in range(len(fs))])
            self._hold_out_turn += len(fs)
        return plan

    def plan_regions(
        self, shape: tuple[int, int], faces: Sequence[Face], config: AttackConfig | None = None
    ) -> list[_Region]:
        """Each face's region in an image of ``shape`` = ``(H, W)``, and its working size."""
        config = config or self.config
        specs = [get_spec(n) for n in (config.models or self.model_names)]
        return [self._plan(0, shape, f, specs, config) for f in faces]

    def _plan(
        self,
        image: int,
        shape: tuple[int, int],
        face: Face,
        specs: Sequence[ModelSpec],
        config: AttackConfig,
    ) -> _Region:
        height, width = shape
        landmarks = torch.tensor(face.landmarks, dtype=torch.float64).reshape(1, 4, 2)
        mats = {
            s.name: estimate_similarity(landmarks, template_keypoints(s.template)) for s in specs
        }
        boxes = torch.cat([footprint(mats[s.name], s.input_size) for s in specs], 0)
        x0, y0 = boxes[:, 0].min().item(), boxes[:, 1].min().item()
        x1, y1 = boxes[:, 2].max().item(), boxes[:, 3].max().item()
        mx, my = (x1 - x0) * REGION_MARGIN, (y1 - y0) * REGION_MARGIN
        box = (
            max(0, int(np.floor(x0 - mx))),
            max(0, int(np.floor(y0 - my))),
            min(width, int(np.ceil(x1 + mx))),
            min(height, int(np.ceil(y1 + my))),
        )
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            box = (0, 0, width, height)
        # Image pixels per model-input pixel; the working grid keeps work_scale of those.
        src_per_model = min(
            1.0 / float(torch.linalg.det(mats[s.name][0, :, :2]).abs().sqrt()) for s in specs
        )
        scale = max(1.0, src_per_model / config.work_scale)
        h, w = box[3] - box[1], box[2] - box[0]
        work = (max(2, round(h / scale)), max(2, round(w / scale)))
        to_region = resized_to_region(h, w, *work)
        offset = torch.tensor([[box[0], box[1]]], dtype=torch.float64)
        matrices = {n: (translate(m, offset) @ to_region)[0] for n, m in mats.items()}
        open_sides = (box[0] > 0, box[1] > 0, box[2] < width, box[3] < height)
        sy, sx = h / work[0], w / work[1]
        fx0, fy0, fx1, fy1 = face.box
        face_box = (
            (fx0 - box[0] + 0.5) / sx - 0.5,
            (fy0 - box[1] + 0.5) / sy - 0.5,
            (fx1 - box[0] + 0.5) / sx - 0.5,
            (fy1 - box[1] + 0.5) / sy - 0.5,
        )
        return _Region(image, box, work, matrices, open_sides, face_box)

    def _batch(
        self,
        regions: Sequence[_Region],
        images: Sequence[np.ndarray],
        names: Sequence[str],
        config: AttackConfig,
    ) -> FaceBatch:
        hmax = max(r.work_size[0] for r in regions)
        wmax = max(r.work_size[1] for r in regions)
        pixels = torch.zeros(len(regions), 3, hmax, wmax, device=self.device)
        masks = torch.zeros(len(regions), 1, hmax, wmax, device=self.device)
        area = torch.empty(len(regions), device=self.device)
        upscale = []
        for k, r in enumerate(regions):
            h, w = r.work_size
            f = measure_factor(images[r.image].shape[:2])
            bw, bh = r.box[2] - r.box[0], r.box[3] - r.box[1]
            upscale.append(max(1.0, bh * f / h, bw * f / w))
            region = _to_tensor(images[r.image], r.box, self.device)
            if region.shape[-2:] != (h, w):
                region = F.interpolate(
                    region, size=(h, w), mode="bilinear", antialias=True, align_corners=False
                )
            pixels[k, :, :h, :w] = region[0].clamp(0, 1)
            border = max(2, round(min(h, w) * REGION_MARGIN))
            mask = feather_mask((h, w), border, r.open_sides)
            if config.face_mask:
                mask = mask * face_mask((h, w), r.face, config.face_mask)
            masks[k, :, :h, :w] = mask.to(self.device)
            area[k] = (h * w) / (hmax * wmax)
        matrices = {n: torch.stack([r.matrices[n] for r in regions]).to(self.device) for n in names}
        return FaceBatch(
            pixels=pixels,
            masks=masks,
            matrices=matrices,
            area=area,
            upscale=tuple(upscale),
        )

    # -- measurement -------------------------------------------------------------------

    def _measure_models(
        self, result: ProtectResult, source: DecodedImage, faces: Sequence[Face]
    ) -> ProtectResult:
        """Fill in :attr:`ProtectResult.previews`: per face, crops before and after, and
        whether each model of the ensemble, and each recogniser of ``verify``, still
        matches the protected face (measured on the encoded output, as :meth:`_measure`
        does, but without LPIPS, the re-encoded baseline or the visibility panel)."""
        if not faces:
            return result
        limit = max(50_000_000, result.width * result.height)
        output = decode_image(result.data, max_pixels=limit)
        original = _to_tensor(source.pixels, None, self.device)[0]
        after = _to_tensor(output.pixels, None, self.device)[0]
        landmarks = torch.as_tensor(np.stack([f.landmarks for f in faces]), dtype=torch.float64)
        with torch.no_grad():
            same, cosines = self._verdicts(self.model_names, original, after, landmarks)
            unseen_same, unseen_cosines = self._verdicts(
                self.verify_names, original, after, landmarks
            )
        before_pixels, after_pixels = _as_uint8(source.pixels), _as_uint8(output.pixels)
        previews = []
        for i, face in enumerate(faces):
            box = _preview_box(face.box, before_pixels.shape[:2])
            previews.append(
                FacePreview(
                    before=_jpeg_crop(before_pixels, box),
                    after=_jpeg_crop(after_pixels, box),
                    same_person=same[i],
                    similarity=cosines[i],
                    unseen_same_person=unseen_same[i],
                    unseen_similarity=unseen_cosines[i],
                )
            )
        return replace(result, previews=tuple(previews))

    def _verdicts(
        self,
        names: Sequence[str],
        original: torch.Tensor,
        after: torch.Tensor,
        landmarks: torch.Tensor,
    ) -> tuple[list[dict[str, bool]], list[dict[str, float]]]:
        """Per face (``landmarks``): whether each model of ``names`` still matches it in
        ``after`` to ``original`` (its own rule), and their cosine."""
        same: list[dict[str, bool]] = [{} for _ in landmarks]
        cosines: list[dict[str, float]] = [{} for _ in landmarks]
        for name in names:
            rule = self._model(name).spec.verification
            e0, e2 = self._embeddings(name, (original, after), landmarks)
            cos = F.cosine_similarity(e0, e2, dim=-1)
            verdict = rule.same_person(e0, e2)
            for i in range(len(landmarks)):
                same[i][name] = bool(verdict[i])
                cosines[i][name] = round(float(cos[i]), 4)
        return same, cosines

    def _measure(
        self, result: ProtectResult, source: DecodedImage, faces: Sequence[Face]
    ) -> ProtectResult:
        """Fill in LPIPS and per-model similarities, measured on the encoded output.

        ``similarity_before`` compares the original with the original re-encoded the same
        way without protection (what the upload would have been); ``similarity_after``
        compares it with the protected output. Both are cosines; ``score_after`` is the
        model's own rule score (Euclidean distance for dlib) behind ``same_person_after``.
        """
        plain, _ = encode_image(source.pixels, source, format=result.format.lower())
        limit = max(50_000_000, result.width * result.height)
        original = _to_tensor(source.pixels, None, self.device)[0]
        reencoded = _to_tensor(decode_image(plain, max_pixels=limit).pixels, None, self.device)[0]
        output = decode_image(result.data, max_pixels=limit)
        after = _to_tensor(output.pixels, None, self.device)[0]
        lp = self._lpips_net("alex")
        reports: dict[str, list[ModelReport]] = {}
        unseen: dict[str, list[ModelReport]] = {}
        lpips_faces: list[float] = []
        with torch.no_grad():
            whole = float(lp(*_measure_copies(original, after)).item())
            if faces:
                landmarks = torch.as_tensor(
                    np.stack([f.landmarks for f in faces]), dtype=torch.float64
                )
                images = (original, reencoded, after)
                for name in self.model_names:
                    reports[name] = self._reports(name, images, landmarks)
                for name in self.verify_names:
                    unseen[name] = self._reports(name, images, landmarks)
                ref = get_spec(self.model_names[0])
                a = align_faces(original, landmarks, ref.template, (224, 224))
                b = align_faces(after, landmarks, ref.template, (224, 224))
                lpips_faces = lp(a, b).tolist()
        visibility = self.meter.measure_faces(source.pixels, output.pixels, result.boxes)
        return replace(
            result,
            lpips=whole,
            lpips_faces=float(np.mean(lpips_faces)) if lpips_faces else None,
            models=reports,
            visibility=tuple(visibility),
            unseen=unseen,
        )

    def _embeddings(
        self, name: str, images: Sequence[torch.Tensor], landmarks: torch.Tensor
    ) -> list[torch.Tensor]:
        """Model ``name``'s embedding of each face (``landmarks``) in each of ``images``,
        aligned as that model expects."""
        model = self._model(name)
        spec = model.spec
        return [
            model(align_faces(img, landmarks, spec.template, spec.input_size)).float()
            for img in images
        ]

    def _reports(
        self,
        name: str,
        images: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        landmarks: torch.Tensor,
    ) -> list[ModelReport]:
        """How model ``name`` sees each face (``landmarks``) of the original, its plain
        re-encoding and the protected output (``images``, in that order)."""
        rule = self._model(name).spec.verification
        e0, e1, e2 = self._embeddings(name, images, landmarks)
        before_cos = F.cosine_similarity(e0, e1, dim=-1)
        after_cos = F.cosine_similarity(e0, e2, dim=-1)
        score = rule.score(e0, e2)
        same = rule.same_person(e0, e2)
        return [
            ModelReport(
                similarity_before=float(before_cos[i]),
                similarity_after=float(after_cos[i]),
                score_after=float(score[i]),
                same_person_after=bool(same[i]),
            )
            for i in range(len(landmarks))
        ]


def _collection_ids(
    together: bool,
    collections: Sequence[Hashable | None] | None,
    count: int,
    elsewhere: Collection[Hashable] = (),
) -> tuple[torch.Tensor | None, dict[Hashable, int]]:
    """Per image, a number naming its collection (an image alone gets one of its own), or
    None when no two of the ``count`` images share one and none has photos ``elsewhere``
    (carried from an earlier call, or waiting for a later one); and the number of each
    collection label."""
    if collections is None:
        ids = torch.zeros(count, dtype=torch.long) if together and count > 1 else None
        return ids, {}
    if together:
        raise UsageError("give together or collections, not both")
    if len(collections) != count:
        raise UsageError(f"{len(collections)} collections for {count} images")
    labels: dict[Hashable, int] = {}
    ids = [
        labels.setdefault(c, len(labels)) if c is not None else -1 - i
        for i, c in enumerate(collections)
    ]
    alone = len(labels) == len([c for c in collections if c is not None])
    if alone and not any(label in elsewhere for label in labels):
        return None, labels  # every collection holds one image at most
    return torch.tensor(ids), labels


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit view of an image for the detector (16-bit images are scaled down)."""
    if pixels.dtype == np.uint8:
        return pixels
    return (pixels.astype(np.float32) * (255.0 / np.iinfo(pixels.dtype).max) + 0.5).astype(np.uint8)


def _preview_box(
    box: tuple[float, float, float, float], shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A square around a face box (PREVIEW_MARGIN times its larger side), kept inside an
    image of ``shape`` = ``(H, W)`` (smaller at the image's edges)."""
    height, width = shape
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * PREVIEW_MARGIN
    side = max(2, min(int(round(side)), width, height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def _jpeg_crop(pixels: np.ndarray, box: tuple[int, int, int, int]) -> bytes:
    """``pixels[box]`` (RGB uint8) scaled to at most PREVIEW_SIZE a side, as JPEG bytes."""
    x0, y0, x1, y1 = box
    crop = Image.fromarray(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
    crop.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE), Image.LANCZOS)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=PREVIEW_QUALITY)
    return buf.getvalue()


def _to_tensor(
    pixels: np.ndarray, box: tuple[int, int, int, int] | None, device: torch.device
) -> torch.Tensor:
    """``(1, 3, h, w)`` float tensor in 0..1 of ``pixels[box]`` (the whole image for ``None``)."""
    if box is not None:
        x0, y0, x1, y1 = box
        pixels = pixels[y0:y1, x0:x1]
    scale = 1.0 / np.iinfo(pixels.dtype).max
    pixels = np.ascontiguousarray(pixels)
    if not pixels.flags.writeable:  # torch.from_numpy wants a writable array
        pixels = pixels.copy()
    t = torch.from_numpy(pixels).to(device)
    return (t.permute(2, 0, 1).unsqueeze(0).float() * scale).contiguous()


def _blend(output: np.ndarray, region: _Region, delta: torch.Tensor) -> None:
    """Add one face's perturbation ``(3, H, W)`` (working resolution) into ``output`` in place."""
    x0, y0, x1, y1 = region.box
    h, w = region.work_size
    d = delta[:, :h, :w].unsqueeze(0).float()
    if (y1 - y0, x1 - x0) != (h, w):
        d = F.interpolate(d, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
    maxval = np.iinfo(output.dtype).max
    current = _to_tensor(output, region.box, d.device)
    blended = ((current + d).clamp(0, 1) * maxval).round()
    output[y0:y1, x0:x1] = blended[0].permute(1, 2, 0).cpu().numpy().astype(output.dtype)


def measure_factor(shape: tuple[int, int]) -> float:
    """The scale at which a photo of ``shape`` (h, w) is measured: at most
    LPIPS_MEASURE_PIXELS, never enlarged."""
    h, w = shape
    return min(1.0, (LPIPS_MEASURE_PIXELS / (h * w)) ** 0.5)


def _measure_copies(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 3, h, w)`` copies for whole-photo LPIPS, scaled to at most LPIPS_MEASURE_PIXELS."""
    _, h, w = before.shape
    a, b = before.unsqueeze(0), after.unsqueeze(0)
    f = measure_factor((h, w))
    if f < 1.0:
        size = (max(16, int(h * f)), max(16, int(w * f)))
        a = F.interpolate(a, size=size, mode="bilinear", antialias=True, align_corners=False)
        b = F.interpolate(b, size=size, mode="bilinear", antialias=True, align_corners=False)
    return a, b
