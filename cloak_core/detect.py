"""Face detection with MediaPipe's BlazeFace models (Tasks API), for photos of any size.

Strategy, in two stages:

1. **Proposals.** BlazeFace sees a 128x128 (short range) or 192x192 (full range) copy of
   what it is given, so a face must cover a fair part of the view to be found: the
   full-range model finds faces down to about 7% of the view's long side, the
   short-range one about 15%. Both run on the whole photo; the full-range model also
   runs on a pyramid of square tiles (each level half the side of the previous, tiles
   overlapping by a third so that any face up to a third of a tile fits whole in one),
   down to tiles in which a face of :attr:`DetectorConfig.smallest_face` pixels covers 7%.
   Overlapping proposals are merged by non-maximum suppression (IoU).
2. **Verification and refinement.** Each proposal is looked at again in three square
   views centred on it (short range at 1.5x and 2x the box, full range at 3x), where
   the face fills a large part of the model's input. The face's score is the mean of
   the three views' scores (0 for a view that does not find it); at least two views
   must find it and agree on where its eyes, nose and mouth are. This removes the
   proposals on textures (windows, water, dark corners) that score up to 0.7 in one
   view. Its box and keypoints are the score-weighted means of the views, which are
   more precise than the proposal's for small faces in large photos.

Every view is taken from the photo's copies reduced 2, 4, 8, ... times (box filter, made
once per photo): tiles are cut from the copy in which they are 192 to 384 pixels, the
whole photo and the verification views are downscaled (antialiased) to at most
:attr:`DetectorConfig.view_size` pixels, so memory and time per view do not grow with the
photo. The tiles are shared among two threads, each with its own full-range detector
(:attr:`DetectorConfig.tile_threads`). Measured on a 2-core machine: 0.1-0.5 s for photos
of 1-5 megapixels, 0.8-0.95 s at 12 megapixels (a hundred-odd tiles, over half of the
work; the tiling stops at faces of 1% of the long side, see :class:`DetectorConfig`).

Boxes of faces cut by the photo's edge extend past it (negative or beyond the size).

Keypoints are MediaPipe's six, in its order, which is anatomical: the subject's right
eye (on the image's LEFT for an upright, unmirrored face), the subject's left eye, the
nose tip, the mouth centre, the right ear tragion (image-left) and the left one. This is
the project's landmark convention for upright faces; for a face rotated past 90 degrees
the order stays anatomical so that alignment never mirrors a face.

Coordinates are pixels with pixel centres at integers (OpenCV convention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cloak_core.errors import CancelledError, ModelStoreError, SystemLibraryError, UsageError
from cloak_core.weights import PypiSource, WeightFile

if TYPE_CHECKING:
    from cloak_core.store import ModelStore

# The member is the same in every platform's mediapipe wheel; pin one so pip fetches a
# wheel whatever the machine's own Python and platform are.
_MEDIAPIPE = "mediapipe==0.10.21"
_MEDIAPIPE_ARGS = (
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux_2_28_x86_64",
)
WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        name="face_detection_short_range.tflite",
        sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        sources=(
            PypiSource(
                _MEDIAPIPE,
                "mediapipe/modules/face_detection/face_detection_short_range.tflite",
                _MEDIAPIPE_ARGS,
            ),
        ),
        description="BlazeFace short range with TFLite metadata, 6 keypoints",
        license="Apache-2.0",
        auto_fetch=True,
    ),
    WeightFile(
        name="face_detection_full_range_sparse.tflite",
        sha256="2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
        sources=(
            PypiSource(
                _MEDIAPIPE,
                "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
                _MEDIAPIPE_ARGS,
            ),
        ),
        description="BlazeFace full range: small faces in large photos",
        license="Apache-2.0",
        auto_fetch=True,
    ),
    WeightFile(
        name="retinaface_mobilenet0.25.pth",
        sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
        sources=(
            PypiSource("facesdk==0.0.8", "facesdk/retinaface/weights/mobilenet0.25_Final.pth"),
        ),
        description="RetinaFace MobileNet-0.25 (WIDER FACE): the detector's recall pass",
        license="MIT",
        auto_fetch=True,
    ),
)
SHORT_RANGE_MODEL = "face_detection_short_range.tflite"
FULL_RANGE_MODEL = "face_detection_full_range_sparse.tflite"

# The full-range model finds faces reliably down to about this fraction of its view's
# long side (measured on photos pasted at known scales into larger canvases).
_FULL_RANGE_MIN_FRACTION = 0.07

_MODELS = {"short": SHORT_RANGE_MODEL, "full": FULL_RANGE_MODEL}

# The full-range model's input side: MediaPipe resizes every view to 192 x 192. Tiles are
# cut, not resampled, from the photo's reduced copy (see _Pyramid) in which they are 192 to
# 384 pixels: resampling each level to 256-pixel tiles cost 0.055 s of CPU on a 12 MP
# photo and found no more faces (small faces pasted into 12 MP photos: 518 of 576 found
# with resampled tiles, 520 with cut ones).
_FULL_RANGE_INPUT = 192

# The recall pass's second look: a view of this many times the proposal's box side,
# downscaled to at most this many pixels. On face-free images the first look scores up to
# 0.76 (a blurred background), the second finds nothing there (0 to 0.2); on faces both
# look at 0.93 or more.
_RECALL_VERIFY_FACTOR = 2.0
_RECALL_VERIFY_SIZE = 320

# Verification views: (model, crop side as a multiple of the proposal's box side).
_VERIFY_VIEWS = (("short", 1.5), ("short", 2.0), ("full", 3.0))


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One face in a photo.

    ``box`` is ``(x0, y0, x1, y1)`` in pixels; ``keypoints`` is ``(K, 2)`` float64 ``(x, y)``
    pixels: the eye on the image's left, the eye on the image's right, the nose tip, the
    mouth centre, then (from BlazeFace, K = 6) the ear tragions image-left and
    image-right; ``score`` is the detector's confidence in 0..1. ``detector`` names what
    found the face: ``"blazeface"`` (verified), ``"retinaface"`` (the recall pass), or
    ``"template"``; with ``+estimated`` when its alignment keypoints were estimated from the
    box because the detector's were not usable (see :func:`estimate_keypoints`).
    """

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float
    detector: str = "blazeface"

    def __post_init__(self) -> None:
        kp = np.array(self.keypoints, dtype=np.float64).reshape(-1, 2)
        if kp.shape[0] < 4:
            raise UsageError(f"a face needs at least 4 keypoints, got {kp.shape[0]}")
        kp.setflags(write=False)
        object.__setattr__(self, "keypoints", kp)
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))
        object.__setattr__(self, "score", float(self.score))

    @property
    def landmarks(self) -> np.ndarray:
        """The four alignment keypoints ``(4, 2)``: eyes (image-left, image-right), nose, mouth.

        A writable copy (``keypoints`` itself is read-only), ready for ``torch.as_tensor``.
        """
        return self.keypoints[:4].copy()

    @property
    def size(self) -> float:
        """The box's longer side in pixels."""
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0)

    @classmethod
    def from_template(
        cls,
        template: Sequence[Sequence[float]],
        box: Sequence[float] | None = None,
        score: float = 1.0,
    ) -> Face:
        """A face whose landmarks are a five-point template, for already-aligned crops.

        ``template`` is ``(5, 2)`` pixels: eyes image-left and image-right, nose tip, mouth
        corners image-left and image-right; the keypoints are the four alignment points
        (mouth corners averaged). ``box`` defaults to a square around the landmarks sized
        like a detector's box (side 2.3 times the mean of the eye distance and the
        eye-to-mouth distance), e.g. ``(0, 0, 112, 112)`` may be given for a whole crop.
        """
        t = np.asarray(template, dtype=np.float64)
        if t.shape != (5, 2):
            raise UsageError(f"a face template is 5 (x, y) points, got shape {t.shape}")
        kp = np.concatenate([t[:3], t[3:5].mean(0, keepdims=True)], 0)
        if box is None:
            eyes = (kp[0] + kp[1]) / 2
            scale = (np.linalg.norm(kp[1] - kp[0]) + np.linalg.norm(kp[3] - eyes)) / 2
            cx, cy = kp.mean(0)
            half = 1.15 * scale
            box = (cx - half, cy - half, cx + half, cy + half)
        return cls(box=tuple(box), keypoints=kp, score=score, detector="template")


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Settings of :class:`FaceDetector`.

    ``min_score``: the lowest verified score (0..1) kept. ``min_face``: faces whose box's
    longer side is below this many pixels are dropped (too small to protect or to
    recognise). ``smallest_face`` and ``smallest_fraction``: the tiling goes fine enough to
    find faces of ``max(smallest_face, smallest_fraction * long side)`` pixels (``0`` and
    ``0`` turn tiling off); sites shrink uploads to about 2048 pixels, where a face under
    1% of the long side is some 20 pixels, too small to recognise, so finer tiles of very
    large photos would cost time and protect nothing. ``proposal_score``: the lowest score of
    a first-stage proposal. ``max_spread``: the largest root-mean-square spread of the
    verification views' keypoints, as a fraction of the box side. ``nms_iou``: overlap
    above which two boxes are the same face. ``view_size``: the whole photo's and the
    verification views are downscaled to at most this many pixels before MediaPipe sees
    them (tiles are 192 to 384).

    ``face_threshold``: the lowest RetinaFace probability (0..1) at which a region of the
    recall pass is protected. RetinaFace's own code calls a face at 0.9; the default 0.75
    protects the regions just under that too (when in doubt, protect: a light perturbation
    on a non-face costs little, a missed face costs the photo). Measured: every face of
    data/faces scores at least 0.83, the face-free images at most 0.67 (docs/DECISIONS.md).
    ``recall_size``: the recall pass sees the photo downscaled to at most this many pixels
    on its long side, with ``recall_pad`` times that side of black border around it, so a
    face that fills the frame still has the margin RetinaFace was trained with.

    ``tile_threads``: the tiles are shared among this many threads, each with a full-range
    detector of its own (MediaPipe lets go of Python's lock while it infers, so on two
    cores two threads take about a third off the tiling); 1 runs them all in the calling
    thread. The faces found are the same either way. Default: 2, or 1 on a one-core
    machine.
    """

    min_score: float = 0.5
    min_face: float = 20.0
    max_spread: float = 0.05
    smallest_face: float = 40.0
    smallest_fraction: float = 0.01
    proposal_score: float = 0.4
    nms_iou: float = 0.3
    view_size: int = 512
    face_threshold: float = 0.75
    recall_size: int = 640
    recall_pad: float = 0.25
    tile_threads: int = dataclasses.field(default_factory=lambda: min(2, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        if not 1 <= self.tile_threads <= 16:
            raise UsageError(f"tile_threads must be in 1..16, got {self.tile_threads}")
        for name in ("min_score", "face_threshold", "proposal_score", "nms_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{name} must be in 0..1, got {value}")
        if self.recall_size < 32 or self.view_size < 32:
            raise UsageError("recall_size and view_size must be at least 32 pixels")
        if not 0.0 <= self.recall_pad <= 1.0:
            raise UsageError(f"recall_pad must be in 0..1, got {self.recall_pad}")


@dataclasses.dataclass
class _Candidate:
    box: np.ndarray  # (4,) x0, y0, x1, y1
    keypoints: np.ndarray  # (K, 2): 6 from BlazeFace, 4 from RetinaFace
    score: float
    detector: str = "blazeface"


class FaceDetector:
    """BlazeFace short- and full-range detectors, loaded once and reused.

    ``store`` resolves the two ``.tflite`` files. Use as a context manager or call
    :meth:`close`. :meth:`detect` may be called from several threads: calls on one
    detector are serialised by a lock (MediaPipe's task runners are not documented as
    re-entrant); create one detector per thread for parallel detection.
    """

    def __init__(
        self,
        store: ModelStore,
        *,
        min_score: float | None = None,
        config: DetectorConfig | None = None,
    ) -> None:
        cfg = config or DetectorConfig()
        if min_score is not None:
            cfg = dataclasses.replace(cfg, min_score=float(min_score))
        self.config = cfg
        self._lock = threading.Lock()
        self._detectors: dict[str, object] = {}
        paths = {key: store.resolve(name) for key, name in _MODELS.items()}
        # One more full-range detector per extra tiling thread ("full1", "full2", ...).
        self._tile_keys = ["full"] + [f"full{k}" for k in range(1, cfg.tile_threads)]
        paths.update({key: paths["full"] for key in self._tile_keys[1:]})
        # Imported here: torch is loaded only by those who detect.
        from cloak_core.retinaface import RETINAFACE_WEIGHTS, load_retinaface

        self._retinaface = load_retinaface(store.resolve(RETINAFACE_WEIGHTS))
        try:
            # MediaPipe logs dozens of lines to the process's stderr while it loads and
            # runs its first inference; errors still arrive as Python exceptions.
            with _native_stderr_silenced():
                for key, path in paths.items():
                    self._detectors[key] = _load_detector(path, cfg)
                for key in self._detectors:
                    self._detect(key, np.zeros((64, 64, 3), np.uint8), 0.0, 0.0, 1.0, 1.0)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release MediaPipe's detectors; the object cannot detect afterwards."""
        with self._lock:
            detectors, self._detectors = self._detectors, {}
        if detectors:
            with _native_stderr_silenced():
                for det in detectors.values():
                    det.close()

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def detect(self, rgb: np.ndarray, *, cancel: threading.Event | None = None) -> list[Face]:
        """Every face in ``rgb`` ``(H, W, 3)`` uint8 RGB (0..255), best score first.

        16-bit photos must be reduced to uint8 first (detection needs no more). Setting
        ``cancel`` stops the detection before its next view (a large photo has a hundred
        or so) with :class:`~cloak_core.errors.CancelledError`.
        """
        if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
            shape = getattr(rgb, "shape", None)
            raise UsageError(f"detect() takes an (H, W, 3) RGB array, got shape {shape}")
        if rgb.dtype != np.uint8:
            raise UsageError(f"detect() takes uint8 pixels (0..255), got {rgb.dtype}")
        with self._lock:
            if not self._detectors:
                raise UsageError("this FaceDetector is closed; create a new one")
            cfg = self.config
            photo = _Pyramid(rgb)
            proposals = self._proposals(photo, cancel)
            proposals = _nms(proposals, cfg.nms_iou)
            faces = [c for c in (self._verify(photo, p, cancel) for p in proposals) if c]
            faces = [c for c in faces if c.score >= cfg.min_score]
            faces = _nms(faces, cfg.nms_iou)
            # BlazeFace's verified faces first (six keypoints, the design's detector); the
            # recall pass adds the faces none of them covers.
            faces += self._recall_pass(photo, faces, cancel)
        out = []
        for c in faces:
            keypoints, detector = c.keypoints, c.detector
            if not keypoints_usable(c.box, keypoints):
                keypoints = keypoints.copy()
                keypoints[:4] = estimate_keypoints(c.box)
                detector += "+estimated"
            face = Face(box=tuple(c.box), keypoints=keypoints, score=c.score, detector=detector)
            if face.size >= cfg.min_face:
                out.append(face)
        return sorted(out, key=lambda f: -f.score)

    # -- stages ---------------------------------------------------------------------

    def _recall_pass(
        self, photo: _Pyramid, covered: list[_Candidate], cancel: threading.Event | None
    ) -> list[_Candidate]:
        """RetinaFace on the whole photo (downscaled, black border), then a second look at each
        proposal that no face of ``covered`` overlaps, in a view twice its box's side; a
        region is kept when the two looks' mean score is at least ``face_threshold``.
        Keypoints eyes, nose, mouth centre, in source pixels, from the second look (more
        pixels on the face)."""
        cfg = self.config
        h, w = photo.rgb.shape[:2]
        small, sx, sy = photo.downscaled(cfg.recall_size / max(w, h))
        pad = round(cfg.recall_pad * max(small.shape[:2]))
        view = np.zeros((small.shape[0] + 2 * pad, small.shape[1] + 2 * pad, 3), np.uint8)
        view[pad : pad + small.shape[0], pad : pad + small.shape[1]] = small
        found = self._retina(view, -pad / sx, -pad / sy, sx, sy, cfg.proposal_score, cancel)
        found = [c for c in found if all(_iou(c.box, f.box) <= cfg.nms_iou for f in covered)]
        out = []
        for first in _nms(found, cfg.nms_iou):
            cx, cy = (first.box[:2] + first.box[2:]) / 2
            side = float(max(first.box[2] - first.box[0], first.box[3] - first.box[1]))
            crop = int(math.ceil(side * _RECALL_VERIFY_FACTOR))
            x0, y0 = int(math.floor(cx - crop / 2)), int(math.floor(cy - crop / 2))
            look, scale = photo.view(x0, y0, crop, crop, _RECALL_VERIFY_SIZE)
            seen = self._retina(look, float(x0), float(y0), scale, scale, 0.05, cancel)
            second = max(
                (c for c in seen if _iou(c.box, first.box) >= cfg.nms_iou),
                key=lambda c: c.score,
                default=None,
            )
            score = (first.score + (second.score if second else 0.0)) / 2
            if score >= cfg.face_threshold:
                best = second or first
                out.append(_Candidate(best.box, best.keypoints, score, detector="retinaface"))
        return _nms(out, cfg.nms_iou)

    def _retina(
        self,
        view: np.ndarray,
        x0: float,
        y0: float,
        sx: float,
        sy: float,
        min_score: float,
        cancel: threading.Event | None,
    ) -> list[_Candidate]:
        """RetinaFace on ``view``, whose pixel ``u`` covers source pixels
        ``[x0 + u / sx, x0 + (u + 1) / sx)`` (likewise in y); candidates in source pixels."""
        from cloak_core.retinaface import run_retinaface

        if cancel is not None and cancel.is_set():
            raise CancelledError("face detection was stopped (cancelled or past its time limit)")
        boxes, marks, scores = run_retinaface(self._retinaface, view, min_score)
        scale, origin = np.array([sx, sy]), np.array([x0, y0])
        out = []
        for box, mk, score in zip(boxes, marks, scores, strict=True):
            # RetinaFace's coordinates are pixel edges; keypoints to pixel centres.
            corners = box.reshape(2, 2) / scale + origin
            points = mk / scale + origin - 0.5
            keypoints = np.concatenate([points[:3], points[3:5].mean(0, keepdims=True)], 0)
            out.append(_Candidate(corners.reshape(4), keypoints, float(score), "retinaface"))
        return out

    def _proposals(self, photo: _Pyramid, cancel: threading.Event | None) -> list[_Candidate]:
        """First-stage boxes: both models on the whole photo, full range on the tiles."""
        h, w = photo.rgb.shape[:2]
        cfg = self.config
        found: list[_Candidate] = []
        whole, sx, sy = photo.downscaled(cfg.view_size / max(w, h))
        for key in ("short", "full"):
            found += self._detect(key, whole, 0.0, 0.0, sx, sy, cancel)
        smallest = max(cfg.smallest_face, cfg.smallest_fraction * max(w, h))
        tiles = []  # (level, its reduction factor, tile side there, u0, v0)
        for side in _tile_sides(max(w, h), smallest):
            level, factor = photo.reduced(_FULL_RANGE_INPUT / side)
            tile = round(side / factor)
            origins = _tile_origins(level.shape[1], level.shape[0], tile)
            tiles += [(level, factor, tile, u0, v0) for u0, v0 in origins]
        for per_tile in self._share_tiles(tiles, cancel):
            found += per_tile
        return [c for c in found if c.score >= cfg.proposal_score]

    def _share_tiles(
        self, tiles: list[tuple[np.ndarray, int, int, int, int]], cancel: threading.Event | None
    ) -> list[list[_Candidate]]:
        """The full-range model on every tile, each thread (see ``tile_threads``) taking
        every n-th with its own detector; the candidates per tile, in the tiles' order."""
        found: list[list[_Candidate]] = [[] for _ in tiles]

        def run(k: int) -> None:
            key, n = self._tile_keys[k], len(self._tile_keys)
            for i in range(k, len(tiles), n):
                level, factor, tile, u0, v0 = tiles[i]
                view = np.ascontiguousarray(level[v0 : v0 + tile, u0 : u0 + tile])
                x0, y0, scale = u0 * factor, v0 * factor, 1 / factor
                found[i] = self._detect(key, view, x0, y0, scale, scale, cancel)

        errors: list[BaseException] = []
        helpers = [
            threading.Thread(target=_keep_error, args=(run, k, errors), daemon=True)
            for k in range(1, min(len(self._tile_keys), len(tiles)))
        ]
        for t in helpers:
            t.start()
        try:
            run(0)
        finally:
            # The helpers use this detector's models: wait for them before it is free.
            for t in helpers:
                t.join()
        if errors:
            raise errors[0]
        return found

    def _verify(
        self, photo: _Pyramid, proposal: _Candidate, cancel: threading.Event | None
    ) -> _Candidate | None:
        """Second look at a proposal in three views centred on it; ``None`` if not a face."""
        cx, cy = (proposal.box[:2] + proposal.box[2:]) / 2
        side = float(max(proposal.box[2] - proposal.box[0], proposal.box[3] - proposal.box[1]))
        expected = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
        found, missed = [], 0
        for key, factor in _VERIFY_VIEWS:
            crop = int(math.ceil(side * factor))
            x0, y0 = int(math.floor(cx - crop / 2)), int(math.floor(cy - crop / 2))
            view, scale = photo.view(x0, y0, crop, crop, self.config.view_size)
            seen = self._detect(key, view, float(x0), float(y0), scale, scale, cancel)
            best = max(
                (c for c in seen if _iou(c.box, expected) >= self.config.nms_iou),
                key=lambda c: c.score,
                default=None,
            )
            if best is not None:
                found.append(best)
            else:
                missed += 1
                if missed > len(_VERIFY_VIEWS) - 2:  # two views can no longer find it
                    return None
        # A face is where the views agree on the eyes, nose and mouth; on textures that
        # look face-like to one view the keypoints scatter (measured: at most 0.03 of the
        # box side on the real faces of data/photos, 0.05 to 0.3 on false proposals).
        kps = np.stack([m.keypoints[:4] for m in found])
        spread = np.sqrt(((kps - kps.mean(0)) ** 2).sum(-1).mean())
        if spread > self.config.max_spread * side:
            return None
        weights = np.array([m.score for m in found])
        weights = weights / weights.sum()
        box = sum(wt * m.box for wt, m in zip(weights, found, strict=True))
        keypoints = sum(wt * m.keypoints for wt, m in zip(weights, found, strict=True))
        score = sum(m.score for m in found) / len(_VERIFY_VIEWS)
        return _Candidate(box=box, keypoints=keypoints, score=float(score))

    def _detect(
        self,
        key: str,
        view: np.ndarray,
        x0: float,
        y0: float,
        sx: float,
        sy: float,
        cancel: threading.Event | None = None,
    ) -> list[_Candidate]:
        """Run model ``key`` on ``view``, whose pixel ``u`` covers source pixels
        ``[x0 + u / sx, x0 + (u + 1) / sx)`` (likewise in y); candidates in source pixels."""
        import mediapipe as mp

        if cancel is not None and cancel.is_set():
            raise CancelledError("face detection was stopped (cancelled or past its time limit)")

        vh, vw = view.shape[:2]
        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=view)
        result = self._detectors[key].detect(image)
        out = []
        for det in result.detections:
            bb = det.bounding_box
            box = np.array(
                [
                    x0 + bb.origin_x / sx,
                    y0 + bb.origin_y / sy,
                    x0 + (bb.origin_x + bb.width) / sx,
                    y0 + (bb.origin_y + bb.height) / sy,
                ]
            )
            # Keypoints are fractions of the view's extent (pixel edges); shift by half a
            # pixel to the pixel-centre convention.
            kp = np.array([[k.x * vw / sx + x0, k.y * vh / sy + y0] for k in det.keypoints])
            out.append(_Candidate(box=box, keypoints=kp - 0.5, score=det.categories[0].score))
        return out


# -- keypoints ----------------------------------------------------------------------

# Where the alignment keypoints sit in a detector's box, as fractions of the box's width
# (x) and height (y) from its top-left corner: eyes image-left and image-right, nose tip,
# mouth centre. The means of RetinaFace's landmarks in its boxes on the 480 aligned faces
# of data/faces (docs/DECISIONS.md gives how well a crop aligned with them matches).
_BOX_LAYOUT = np.array([[0.2702, 0.4050], [0.7148, 0.4166], [0.4894, 0.6089], [0.4863, 0.7620]])


def _keep_error(fn, arg, errors: list[BaseException]) -> None:
    """``fn(arg)`` in a helper thread, its exception kept in ``errors`` for the caller."""
    try:
        fn(arg)
    except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
        errors.append(exc)


def estimate_keypoints(box: Sequence[float]) -> np.ndarray:
    """Alignment keypoints ``(4, 2)`` pixels for a face of which only the box is known.

    An upright, frontal face's eyes, nose and mouth centre where they sit on average in a
    detector's box (``box`` ``(x0, y0, x1, y1)`` pixels): good enough to align a profile or
    a half-covered face for the attack, whose perturbation covers the whole box anyway.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([x0, y0]) + _BOX_LAYOUT * np.array([x1 - x0, y1 - y0])


def keypoints_usable(box: Sequence[float], keypoints: np.ndarray) -> bool:
    """Whether a detector's keypoints ``(K >= 4, 2)`` can align its face: finite, inside
    the box grown by a quarter on each side, eyes apart by at least a tenth of the box
    side and the mouth at least a fifth of it from the eyes (a collapsed set of points
    on a profile or a covered face gives a degenerate, mirrored or tiny alignment)."""
    kp = np.asarray(keypoints, dtype=np.float64)[:4]
    if kp.shape != (4, 2) or not np.isfinite(kp).all():
        return False
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    if side <= 0:
        return False
    margin = 0.25 * side
    inside = (kp[:, 0] >= x0 - margin) & (kp[:, 0] <= x1 + margin)
    inside &= (kp[:, 1] >= y0 - margin) & (kp[:, 1] <= y1 + margin)
    eyes = np.linalg.norm(kp[1] - kp[0])
    mouth = np.linalg.norm(kp[3] - (kp[0] + kp[1]) / 2)
    return bool(inside.all() and eyes >= 0.1 * side and mouth >= 0.2 * side)


# -- helpers ------------------------------------------------------------------------


def _load_detector(path: Path, cfg: DetectorConfig) -> object:
    """A MediaPipe Tasks ``FaceDetector`` for the ``.tflite`` file at ``path``."""
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    # Low: a verification view that sees the face at 0.3 still counts towards its mean.
    options = vision.FaceDetectorOptions(
        base_options=BaseOptions(model_asset_path=str(path)),
        min_detection_confidence=min(cfg.proposal_score, 0.2),
    )
    try:
        return vision.FaceDetector.create_from_options(options)
    except OSError as exc:
        # MediaPipe's native library links the system's EGL and GLES libraries even for
        # the CPU detector; a headless server may have neither (seen on a GPU machine).
        # ctypes reports a library that cannot be loaded as an OSError without an errno;
        # a file error (with one) is not this.
        if exc.errno is not None:
            raise
        raise SystemLibraryError(
            f"MediaPipe's native library could not load: {exc}. It needs the system's "
            f"EGL and OpenGL ES libraries: on Debian or Ubuntu run "
            f"'sudo apt-get install libegl1 libgles2' (they come with Chromium too)"
        ) from exc
    except (RuntimeError, ValueError) as exc:
        raise ModelStoreError(
            f"MediaPipe could not load {path.name} ({path}): {exc}; check it with "
            f"'facecloak models verify' and fetch it again with 'facecloak models fetch'"
        ) from exc


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 (where C++ libraries log) to /dev/null for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr (e.g. a daemon without one)
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _Pyramid:
    """A photo ``(H, W, 3)`` uint8 RGB and its copies reduced 2, 4, 8, ... times (box filter),
    each made from the previous one when first needed.

    Every view is resampled from the smallest copy that still has its resolution, so a
    large photo is read in full once (one PIL copy, one halving) rather than once per view
    and per tiling level (measured on a 12 MP photo: 0.1-0.2 s of CPU instead of 0.45-0.6 s).
    """

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = np.ascontiguousarray(rgb)
        self._copies: list[Image.Image] = []

    def _factor(self, scale: float) -> int:
        """The largest reduction factor whose copy has at least ``scale`` times the photo's
        resolution (copy pixel ``u`` covers photo pixels ``[u * factor, (u + 1) * factor)``)."""
        h, w = self.rgb.shape[:2]
        factor = 1
        while 2 * factor * scale <= 1.0 and 2 * factor <= min(w, h):
            factor *= 2
        return factor

    def _copy(self, factor: int) -> Image.Image:
        """The copy reduced ``factor`` (a power of 2) times, as a PIL image."""
        if not self._copies:
            self._copies.append(Image.fromarray(self.rgb))
        while len(self._copies) < factor.bit_length():
            self._copies.append(self._copies[-1].reduce(2))
        return self._copies[factor.bit_length() - 1]

    def reduced(self, scale: float) -> tuple[np.ndarray, int]:
        """The smallest reduced copy with at least ``scale`` times the photo's resolution,
        ``(copy (h', w', 3) uint8, factor)``, without resampling it further."""
        factor = self._factor(scale)
        return (self.rgb if factor == 1 else np.asarray(self._copy(factor))), factor

    def downscaled(self, scale: float) -> tuple[np.ndarray, float, float]:
        """The photo resized by about ``scale <= 1`` (antialiased), with the exact x and y
        scales: ``(image (h', w', 3) uint8, w' / W, h' / H)``."""
        h, w = self.rgb.shape[:2]
        if scale >= 1.0:
            return self.rgb, 1.0, 1.0
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        factor = self._factor(max(nw / w, nh / h))
        small = self._copy(factor).resize(
            (nw, nh), Image.Resampling.BILINEAR, box=(0, 0, w / factor, h / factor)
        )
        return np.asarray(small), nw / w, nh / h

    def view(self, x0: int, y0: int, w: int, h: int, max_side: int) -> tuple[np.ndarray, float]:
        """The region ``[x0, x0 + w) x [y0, y0 + h)`` of the photo, zero outside it,
        downscaled by ``scale <= 1`` so that its longer side is at most ``max_side``.

        Returns ``(view (h', w', 3) uint8 C-contiguous, scale)``, with ``w' = w * scale``
        and ``h' = h * scale`` exactly (the scale is chosen so), so view pixel ``u`` covers
        photo pixels ``[x0 + u / scale, x0 + (u + 1) / scale)``.
        """
        img_h, img_w = self.rgb.shape[:2]
        long = max(w, h)
        out_long = min(long, max_side)
        scale = out_long / long
        vw, vh = max(1, round(w * scale)), max(1, round(h * scale))
        scale_x, scale_y = vw / w, vh / h
        view = np.zeros((vh, vw, 3), dtype=np.uint8)
        xs0, ys0, xs1, ys1 = max(x0, 0), max(y0, 0), min(x0 + w, img_w), min(y0 + h, img_h)
        if xs1 <= xs0 or ys1 <= ys0:
            return view, scale_x
        if vw == w and vh == h:
            view[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = self.rgb[ys0:ys1, xs0:xs1]
            return view, 1.0
        # Output pixels wholly inside the photo, and the exact photo box they cover.
        u0, u1 = math.ceil((xs0 - x0) * scale_x - 1e-9), math.floor((xs1 - x0) * scale_x + 1e-9)
        v0, v1 = math.ceil((ys0 - y0) * scale_y - 1e-9), math.floor((ys1 - y0) * scale_y + 1e-9)
        if u1 <= u0 or v1 <= v0:
            return view, scale_x
        factor = self._factor(max(scale_x, scale_y))
        box = (
            (x0 + u0 / scale_x) / factor,
            (y0 + v0 / scale_y) / factor,
            (x0 + u1 / scale_x) / factor,
            (y0 + v1 / scale_y) / factor,
        )
        small = self._copy(factor).resize((u1 - u0, v1 - v0), Image.Resampling.BILINEAR, box=box)
        view[v0:v1, u0:u1] = np.asarray(small)
        # Non-square regions have (almost) equal scales; MediaPipe's boxes use one scale.
        return view, (scale_x + scale_y) / 2


def _tile_sides(long_side: int, smallest_face: float) -> list[int]:
    """Square tile sides for the full-range model, coarse to fine.

    Each level halves the previous, from half the photo's long side down to the side in
    which a ``smallest_face``-pixel face covers the model's smallest detectable fraction.
    With tiles overlapping by a third (see :func:`_tile_origins`), a face of side ``f``
    fits whole in a tile of any level with ``f <= side / 3``, and some level has
    ``0.07 * side <= f <= side / 3`` (a range wider than the factor 2 between levels).
    """
    if smallest_face <= 0:
        return []
    finest = math.ceil(smallest_face / _FULL_RANGE_MIN_FRACTION)
    sides: list[int] = []
    side = long_side / 2
    while side > finest:
        sides.append(math.ceil(side))
        side /= 2
    if long_side > finest and (not sides or sides[-1] > 1.25 * finest):
        sides.append(finest)  # unless the last level is nearly as fine already
    return sides


def _tile_origins(width: int, height: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners of ``side``-pixel tiles covering the photo, overlapping by a third."""

    def starts(extent: int) -> list[int]:
        if extent <= side:
            return [0]
        n = math.ceil((extent - side) / (side * 2 / 3)) + 1
        return [round(i * (extent - side) / (n - 1)) for i in range(n)]

    return [(x, y) for y in starts(height) for x in starts(width)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def _nms(candidates: list[_Candidate], iou: float) -> list[_Candidate]:
    """Keep the best-scoring of every group of boxes overlapping by more than ``iou``."""
    kept: list[_Candidate] = []
    for c in sorted(candidates, key=lambda c: -c.score):
        if all(_iou(c.box, k.box) <= iou for k in kept):
            kept.append(c)
    return kept
