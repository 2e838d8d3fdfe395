"""Whole photos protected as uploads are, and scored against their own originals (``--photos``).

The aligned crops of a faces dataset fill every model's input. An upload does not: its
faces may be 60 pixels wide or 500, several to a photo, and the file is written back as
the input was (a JPEG stays a JPEG at its own quality). A setting can protect the crops
and leave a small face in a real photo matched, so the evaluation scores a folder of
photos beside the dataset:

1. The pipeline's detector finds each photo's faces, as ``facecloak protect`` would, and
   OpenCV's YuNet (the independent pipeline's detector) looks too: a face YuNet finds
   (scored at least :data:`MISSED_SCORE`) whose centre lies in none of the detector's
   boxes is a face the product missed. It goes up unprotected, and it is scored like
   every other face.
2. Each photo is protected alone (one upload) by every attack ensemble, and encoded as
   ``protect`` writes it (:func:`~cloak_core.imageio.encode_image`, format ``same``).
3. For every condition, each face of the written photo and of the original (both after
   that condition, as the dataset's own-original figure compares them) is cut out with
   some context, and each evaluator compares the two by its own same-person rule
   (:func:`~cloak_core.evaluation.protocol.own_original_match`).
4. Each protected face of the written photo is measured against the original at display
   scale by the visibility panel (:func:`seen`), beside the same photos only re-encoded
   as JPEG (:func:`calibration`), and the most visible are shown in a grid
   (:func:`grid_rows`): how the faces a person uploads look, not only the aligned crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cloak_core.errors import FaceCloakError, UsageError
from cloak_core.evaluation import protocol
from cloak_core.imageio import DecodedImage, decode_image, encode_image

if TYPE_CHECKING:
    from cloak_core.detect import Face, FaceDetector
    from cloak_core.evaluation.conditions import Condition
    from cloak_core.evaluation.evaluators import Evaluator, OpenCVPipelineEvaluator
    from cloak_core.visibility import GridRow, Visibility, VisibilityMeter

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
# The scored cut: the face's box grown by this much of its longer side on every side, so
# the independent pipelines' own detectors see the face with its surroundings.
CONTEXT = 0.75
# YuNet's score for a face the pipeline's detector missed to count: well above the 0.6 its
# evaluator matches with, as below 0.8 it takes hands for faces (a 0.63 "face" on
# obama_and_biden.jpg is three fingers; every real face of the shared photos scores 0.89+).
MISSED_SCORE = 0.8


@dataclass
class Photo:
    """One photo of the folder: the decoded file, and its faces.

    ``faces``: the pipeline detector's, which the attack protects. ``missed``: faces
    YuNet found that the detector did not, uploaded unprotected.
    """

    path: Path
    source: DecodedImage
    faces: list[Face]
    missed: list[Face]

    @property
    def pixels(self) -> np.ndarray:
        """RGB uint8 ``(H, W, 3)`` (a 16-bit photo is scored at 8 bits)."""
        return _eight_bit(self.source.pixels)

    @property
    def scored(self) -> list[Face]:
        """Every face scored: the protected ones, then the missed ones."""
        return [*self.faces, *self.missed]


def list_photos(folder: Path) -> list[Path]:
    """The photos of ``folder`` (not its subfolders), in name order."""
    if not folder.is_dir():
        raise UsageError(f"photos: {folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not paths:
        raise UsageError(f"photos: no {', '.join(PHOTO_SUFFIXES)} file in {folder}")
    return paths


def missed_faces(found: Sequence[Face], others: Sequence[Face]) -> list[Face]:
    """The faces of ``others`` whose box centre lies in no box of ``found``."""

    def inside(face: Face) -> bool:
        x0, y0, x1, y1 = face.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in (f.box for f in found))

    return [f for f in others if not inside(f)]


def load_photos(
    folder: Path, detector: FaceDetector, yunet: OpenCVPipelineEvaluator
) -> tuple[list[Photo], list[str]]:
    """Every readable photo of ``folder`` with its faces, and a note per photo left out."""
    photos, notes = [], []
    for path in list_photos(folder):
        try:
            source = decode_image(path.read_bytes())
        except FaceCloakError as exc:
            notes.append(f"photo {path}: left out: {exc}")
            continue
        photo = Photo(path, source, [], [])
        photo.faces = list(detector.detect(photo.pixels))
        sure = [f for f in yunet.faces(photo.pixels) if f.score >= MISSED_SCORE]
        photo.missed = missed_faces(photo.faces, sure)
        if not photo.scored:
            notes.append(f"photo {path}: left out: neither detector found a face")
            continue
        photos.append(photo)
    return photos, notes


def written(photo: Photo, protected: np.ndarray) -> np.ndarray:
    """``protected`` (RGB uint8) as the file ``protect`` writes, decoded again."""
    data, _ = encode_image(protected, photo.source)
    return _eight_bit(decode_image(data).pixels)


def _eight_bit(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` as uint8 (a 16-bit image's high bytes)."""
    return pixels if pixels.dtype == np.uint8 else (pixels >> 8).astype(np.uint8)


def cut(pixels: np.ndarray, face: Face) -> tuple[np.ndarray, Face]:
    """The face's box grown by :data:`CONTEXT` on every side (within the photo), and the
    face moved into it."""
    from cloak_core.detect import Face

    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = face.box
    grow = CONTEXT * face.size
    left, top = max(0, int(x0 - grow)), max(0, int(y0 - grow))
    right, bottom = min(w, int(np.ceil(x1 + grow))), min(h, int(np.ceil(y1 + grow)))
    shifted = Face(
        (x0 - left, y0 - top, x1 - left, y1 - top),
        face.keypoints - [left, top],
        face.score,
        face.detector,
    )
    return np.ascontiguousarray(pixels[top:bottom, left:right]), shifted


def embed_faces(ev: Evaluator, pixels: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """``ev``'s embeddings ``(N, D)`` of ``faces`` in ``pixels``, each from its own cut."""
    cuts = [cut(pixels, f) for f in faces]
    return ev.embed([c for c, _ in cuts], [f for _, f in cuts])


def score(
    photos: Sequence[Photo],
    written_by: dict[str, Sequence[np.ndarray]],
    evaluators: Sequence[Evaluator],
    conditions: Sequence[Condition],
    clean: dict | None = None,
) -> dict:
    """Each evaluator's verdict on each face of each written photo against its original.

    ``written_by``: per evaluator name, the written photos (decoded RGB uint8) of the
    ensemble it is scored on. ``clean``: a dict shared by runs on the same photos, where
    the originals' embeddings are kept. Returns the ``"results"`` (per condition, per
    evaluator: :func:`~cloak_core.evaluation.protocol.own_original_match` over every
    face), ``"per_face"`` and each independent pipeline's ``"fallbacks"`` (cuts where its
    own detector found no face: for a written cut, the face is one it would not index).
    """
    clean = {} if clean is None else clean
    results: dict[str, dict] = {c.name: {} for c in conditions}
    cosines: dict[str, dict[str, list[float]]] = {c.name: {} for c in conditions}
    matched: dict[str, dict[str, list[bool]]] = {c.name: {} for c in conditions}
    fallbacks: dict[str, int] = {}
    for ev in evaluators:
        before = ev.fallbacks
        for cond in conditions:
            originals = []
            for photo in photos:
                key = ("photo", ev.name, cond.name, str(photo.path))
                if key not in clean:
                    clean[key] = embed_faces(ev, cond.apply(photo.pixels), photo.scored)
                originals.append(clean[key])
            a = np.concatenate(originals, 0)
            b = np.concatenate(
                [
                    embed_faces(ev, cond.apply(px), photo.scored)
                    for photo, px in zip(photos, written_by[ev.name], strict=True)
                ],
                0,
            )
            cos, same = protocol.own_original_faces(a, b, ev.rule)
            results[cond.name][ev.name] = protocol.own_original_summary(cos, same)
            cosines[cond.name][ev.name] = [float(c) for c in cos]
            matched[cond.name][ev.name] = [bool(m) for m in same]
        if ev.independent:
            fallbacks[ev.name] = ev.fallbacks - before
    per_face = []
    k = 0
    for photo in photos:
        for j, face in enumerate(photo.scored):
            per_face.append(
                {
                    "path": str(photo.path),
                    "size": round(face.size),
                    "protected": j < len(photo.faces),
                    "cosine": {c: {e: v[k] for e, v in by.items()} for c, by in cosines.items()},
                    "matched": {c: {e: v[k] for e, v in by.items()} for c, by in matched.items()},
                }
            )
            k += 1
    return {"results": results, "per_face": per_face, "fallbacks": fallbacks}


def summary(photos: Sequence[Photo], folder: Path) -> dict:
    """What was scored: the folder, its photos and faces, and the faces the detector missed."""
    return {
        "folder": str(folder),
        "photos": len(photos),
        "faces": sum(len(p.scored) for p in photos),
        "protected_faces": sum(len(p.faces) for p in photos),
        "face_sizes": sorted(round(f.size) for p in photos for f in p.scored),
        "missed": [
            {"path": str(p.path), "box": [round(v) for v in f.box], "size": round(f.size)}
            for p in photos
            for f in p.missed
        ],
    }


def _regions(photo: Photo) -> list[tuple[int, int, int, int]]:
    """Where each protected face of ``photo`` is seen: its box grown as the panel grows it."""
    from cloak_core.visibility import face_region

    return [face_region(photo.pixels.shape[:2], f.box) for f in photo.faces]


def seen(
    meter: VisibilityMeter, photos: Sequence[Photo], written_photos: Sequence[np.ndarray]
) -> list[Visibility]:
    """The visibility panel of every protected face (the detector's, in photo order) of
    ``written_photos`` (one per photo, decoded RGB uint8) against the original photo, on
    the face region at display scale. A missed face is unchanged and not measured."""
    from cloak_core.visibility import display_pair

    pairs = [
        display_pair(photo.pixels, px, region)
        for photo, px in zip(photos, written_photos, strict=True)
        for region in _regions(photo)
    ]
    return meter.measure_pairs(pairs) if pairs else []


def calibration(meter: VisibilityMeter, photos: Sequence[Photo]) -> dict[str, list[Visibility]]:
    """The panel of the same protected faces with each photo only re-encoded as JPEG
    (``"jpeg90"``, ``"jpeg75"``): what "unchanged" and "barely changed" score on them."""
    from cloak_core.visibility import calibration as jpeg_calibration

    images = [photo.pixels for photo in photos for _ in photo.faces]
    regions = [region for photo in photos for region in _regions(photo)]
    return jpeg_calibration(meter, images, regions) if images else {}


def grid_rows(
    photos: Sequence[Photo],
    written_by: dict[str, Sequence[np.ndarray]],
    panels: Sequence[Visibility],
    count: int | None,
) -> list[GridRow]:
    """The ``count`` most visible protected faces (by S-CIELAB mean in ``panels``, the
    first ensemble's :func:`seen`), most visible first, or every one in photo order
    (``count`` ``None``): each at display scale beside its version under every ensemble
    of ``written_by`` (label: written photos)."""
    from cloak_core.visibility import GridRow, display_pair

    faces = [
        (photo, k, face, region)
        for k, photo in enumerate(photos)
        for face, region in zip(photo.faces, _regions(photo), strict=True)
    ]
    order = list(range(len(faces)))
    if count is not None:
        order = sorted(order, key=lambda j: panels[j].scielab_mean, reverse=True)[:count]
    rows = []
    for j in order:
        photo, k, face, region = faces[j]
        pairs = {
            label: display_pair(photo.pixels, written[k], region)
            for label, written in written_by.items()
        }
        original = next(iter(pairs.values()))[0]
        versions = {label: pair[1] for label, pair in pairs.items()}
        seen_as = panels[j].scielab_mean
        label = f"{photo.path.name}, a {round(face.size)}-pixel face: S-CIELAB {seen_as:.2f}"
        rows.append(GridRow(label, original, versions))
    return rows
