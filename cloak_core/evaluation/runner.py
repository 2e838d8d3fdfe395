"""``facecloak eval`` end to end: load a dataset, protect galleries, identify probes, report.

The steps, in order:

1. Split every identity into gallery and probes (:mod:`~cloak_core.evaluation.protocol`).
   The first ``identities`` identities (in name order; all by default) are the protected
   users, whose probes are scored; the other identities' galleries stay in, clean, as
   distractors.
2. Find each image's face: aligned 112x112 crops use the ArcFace template's landmarks,
   other images the detector (the largest face is the one evaluated; the attack protects
   every face it finds). The pipeline's own detector also runs on every image, and the
   report states its recall. With ``landmarks="detector"`` the attack protects only the
   faces the detector finds, where it finds them: a gallery image with no face found stays
   in the gallery unprotected, exactly as it would be uploaded (the evaluators still see
   it as they see any image: the template's face for aligned crops).
3. Choose the attack ensembles (:mod:`~cloak_core.evaluation.ensembles`). Leave-one-out
   (default): each evaluator is scored on images protected by the ensemble minus every
   model sharing a weight file with it, so every protected figure is black-box;
   evaluators that need the same ensemble share one attack run. ``attack_models`` fixes
   one ensemble for all; evaluators that share weights with it are then marked white-box.
4. Protect the protected users' gallery images with :class:`cloak_core.pipeline.Protector`
   (many images per call, each call one collection, a person's photos in one call where
   they fit: with the preset's ``centroid`` a person's faces are pushed from their shared
   identity), and measure LPIPS, PSNR and SSIM of each. Attacked batches are kept in the
   attack cache (:mod:`~cloak_core.evaluation.cache`); with ``jobs`` above 1, worker
   processes attack them first (:mod:`~cloak_core.evaluation.workers`).
5. For each condition (PNG, JPEG, downscaling), re-encode clean and protected galleries,
   embed them with every evaluator, and compute rank-1 / rank-5 accuracy, clean and
   protected.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cloak_core import __version__
from cloak_core.errors import FaceCloakError, ImageError, UsageError
from cloak_core.evaluation import photos as photos_module
from cloak_core.evaluation import protocol
from cloak_core.evaluation.cache import CACHE_DIR, AttackCache, attack_code, read_batch, write_batch
from cloak_core.evaluation.conditions import DEFAULT_CONDITIONS, Condition, parse_condition
from cloak_core.evaluation.ensembles import AttackGroup, attack_groups, attack_pool
from cloak_core.evaluation.evaluators import (
    DlibPipelineEvaluator,
    Evaluator,
    OpenCVPipelineEvaluator,
    RegistryEvaluator,
)
from cloak_core.evaluation.photos import Photo
from cloak_core.evaluation.versions import software_versions
from cloak_core.evaluation.workers import AttackTask, attack_in_workers, protect_batch
from cloak_core.presets import Setting
from cloak_core.visibility import (
    GridRow,
    Visibility,
    VisibilityMeter,
    calibration,
    display_pair,
    face_region,
    summarise,
)

if TYPE_CHECKING:
    from cloak_core.detect import DetectorConfig, Face
    from cloak_core.store import ModelStore

PIPELINES = ("dlib-bin", "opencv-sface")
ALIGNED_SIZE = (112, 112)


@dataclass(frozen=True)
class EvalSettings:
    """Everything one evaluation run depends on (the command line builds it from flags).

    ``identities``: protect and score the first N identities (None: all); the rest are
    clean distractors. ``gallery_per_identity`` / ``probes_per_identity`` cap the splits.
    ``attack_models`` fixes the ensemble (None: leave-one-out from the preset's ensemble).
    ``eval_models``: evaluator names (None: every registry model whose weights are on this
    machine, plus both pipelines). ``landmarks``: ``"auto"`` (template when every image is
    112x112), ``"template"``, ``"detect"`` (both: the same faces for the attack and the
    evaluators; images without a detected face are left out) or ``"detector"`` (the attack
    gets the pipeline detector's faces, as ``facecloak protect`` would; images where it
    finds none stay unprotected). ``joint``: protect all protected identities'
    galleries at once instead of one identity at a time. ``attack``: False for clean
    accuracy only. ``resume``: keep every attacked batch in ``out/attack-cache`` as it is
    done and reuse the batches a run with the same settings and attack code already made
    (a long CPU run can stop and go on); False recomputes and overwrites them. ``jobs``:
    attack in that many worker processes (CPU only; each gets an equal share of the
    cores), one batch at a time from every ensemble, so a multi-core CPU is kept busy even
    where one ensemble's batches take longer than another's. ``overrides``: attack
    settings replacing the preset's, as ``(field, value)`` pairs (the frontier's sweep).
    ``worst_images``: how many of each ensemble's most visible images the report names
    (and the grid shows beside the first image of ``grid_identities`` identities).
    ``grid_photos``: how many of the whole photos' most visible faces the photos' grid
    shows (``None``: every protected face, in photo order).
    ``batch_size``: photos per attack batch (None: 32 on a CPU, 64 on a GPU); a person
    with more is split, and each batch is handed their photos in the other batches, as
    the daemon hands each part of a split upload the rest of it. ``photos``: a folder of
    whole photos, each protected alone as an upload and written as ``protect`` writes it,
    scored against its own original face by face (:mod:`~cloak_core.evaluation.photos`):
    small faces and several to a photo, which aligned crops never show.
    """

    dataset: Path
    out: Path
    identities: int | None = None
    gallery_per_identity: int | None = None
    probes_per_identity: int | None = None
    preset: str = "balanced"
    steps: int | None = None
    overrides: tuple[tuple[str, Setting], ...] = ()
    attack_models: tuple[str, ...] | None = None
    eval_models: tuple[str, ...] | None = None
    conditions: tuple[Condition, ...] = field(
        default_factory=lambda: tuple(parse_condition(c) for c in DEFAULT_CONDITIONS)
    )
    seed: int = 0
    device: str = "auto"
    attack: bool = True
    joint: bool = False
    landmarks: str = "auto"
    batch_size: int | None = None
    grid_identities: int = 6
    worst_images: int = 3
    grid_photos: int | None = 8
    resume: bool = True
    jobs: int = 1
    photos: Path | None = None

    def as_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["dataset"], d["out"] = str(self.dataset), str(self.out)
        d["photos"] = None if self.photos is None else str(self.photos)
        d["conditions"] = [c.name for c in self.conditions]
        return d


@dataclass
class _Image:
    """One dataset image and its face(s): ``pixels`` RGB uint8 ``(H, W, 3)``."""

    identity: str
    path: Path
    pixels: np.ndarray
    faces: list[Face]
    attack_faces: list[Face]  # what the attack protects; empty: the image stays as it is

    @property
    def face(self) -> Face:
        """The evaluated face: the largest one."""
        return max(self.faces, key=lambda f: f.size)


def person_batches(images: Sequence[_Image], size: int) -> list[list[_Image]]:
    """``images`` (in identity order) in attack batches of at most ``size``, a person's
    photos kept in one batch: each batch is protected as one collection, so a person split
    across two would be pushed from two half identities. Only a person with more than
    ``size`` photos fills whole batches of their own, their rest joining the next."""
    batches: list[list[_Image]] = []
    current: list[_Image] = []
    for _, photos in groupby(images, key=lambda im: im.identity):
        person = list(photos)
        if current and len(current) + len(person) > size:
            batches.append(current)
            current = []
        while len(person) > size:
            batches.append(person[:size])
            person = person[size:]
        current += person
    if current:
        batches.append(current)
    return batches


def detector_recall(found: dict[Path, list[Face]], gallery: set[Path]) -> dict:
    """The pipeline detector's recall: the share of images (every one shows a face) where it
    found at least one, over the whole dataset and over the gallery, the images it missed,
    and how many faces each detector found (``"blazeface"``, ``"retinaface"``; with
    ``+estimated`` where the keypoints were estimated from the box)."""
    missed = sorted(str(p) for p, fs in found.items() if not fs)
    in_gallery = [p for p in found if p in gallery]
    gallery_found = sum(1 for p in in_gallery if found[p])
    by_detector: dict[str, int] = {}
    for fs in found.values():
        if fs:
            name = max(fs, key=lambda f: f.size).detector
            by_detector[name] = by_detector.get(name, 0) + 1
    return {
        "images": len(found),
        "found": len(found) - len(missed),
        "recall": (len(found) - len(missed)) / len(found) if found else None,
        "gallery_images": len(in_gallery),
        "gallery_found": gallery_found,
        "gallery_recall": gallery_found / len(in_gallery) if in_gallery else None,
        "largest_face_by_detector": by_detector,
        "missed": missed,
    }


@dataclass(frozen=True)
class EvalResult:
    """The report (JSON-ready dict) and the face grid: face regions at display scale, each
    original beside its protected versions (one column pair per ensemble); ``grid_height``
    is the height rows are shown at (``None``: their own size). ``photo_grid``: the whole
    photos' most visible faces, at display scale, the same way (empty without photos)."""

    report: dict
    grid: list[GridRow]
    grid_height: int | None = None
    photo_grid: list[GridRow] = field(default_factory=list)


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read the image ({exc})") from exc


class Evaluation:
    """One evaluation run; :meth:`run` returns the report as a JSON-ready dict.

    ``progress``: show tqdm progress bars (on stderr). ``log`` receives one-line notes.
    ``embeddings``: a dict shared by runs on one dataset (the frontier's points), where
    the embeddings of unprotected images are kept and reused; the evaluators' detector
    fallbacks are then counted for the images embedded in this run only.
    """

    def __init__(
        self,
        settings: EvalSettings,
        store: ModelStore,
        *,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        embeddings: dict | None = None,
        detector_config: DetectorConfig | None = None,
    ) -> None:
        from cloak_core.pipeline import resolve_device
        from cloak_core.presets import get_preset

        self.settings = settings
        self.store = store
        self.progress = progress
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.embeddings = embeddings
        self.device = resolve_device(settings.device)
        config = get_preset(settings.preset)
        if settings.steps is not None:
            config = config.with_overrides(steps=settings.steps)
        self.config = config.with_settings(settings.overrides)
        if settings.jobs < 1:
            raise UsageError("jobs must be at least 1")
        if settings.jobs > 1 and self.device.type != "cpu":
            raise UsageError(
                "jobs above 1 needs device cpu: on a GPU one process batches the images"
            )
        self.cache = AttackCache(settings.out / CACHE_DIR, attack_code(), self.device.type)
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self._prefilled: set[Path] = set()  # cache entries this run's workers made
        self.meter = VisibilityMeter(store, self.device)
        self.mode = "template"
        self.whole_crops = True  # visibility and grid on whole aligned crops, not face boxes
        self.detector_config = detector_config
        self.recall: dict = {}
        self.photos: list[Photo] = []

    # -- data ----------------------------------------------------------------------------

    def _splits(self) -> tuple[list[protocol.IdentitySplit], list[str]]:
        s = self.settings
        found = protocol.list_identities(s.dataset)
        names = list(found)
        if s.identities is not None:
            if s.identities < 1:
                raise UsageError("identities must be at least 1")
            if s.identities > len(names):
                raise UsageError(
                    f"identities {s.identities}: the dataset has {len(names)} identities"
                )
        protected = list(names[: s.identities])  # a copy: names is iterated below
        splits = []
        for name in names:
            if len(found[name]) < 2:
                self.notes.append(f"identity {name} left out: fewer than 2 images")
                if name in protected:
                    protected.remove(name)
                continue
            splits.append(
                protocol.split_identity(
                    name,
                    found[name],
                    gallery_per_identity=s.gallery_per_identity,
                    probes_per_identity=s.probes_per_identity,
                )
            )
        if not protected:
            raise UsageError(f"dataset {s.dataset}: no identity with at least 2 images")
        return splits, protected

    def _load(
        self, splits: Sequence[protocol.IdentitySplit]
    ) -> tuple[list[_Image], list[_Image], str]:
        from cloak_core.detect import Face, FaceDetector
        from cloak_core.models.base import ARCFACE_TEMPLATE_112

        gallery = [(sp.identity, p) for sp in splits for p in sp.gallery]
        probes = [(sp.identity, p) for sp in splits for p in sp.probes]
        pixels = {p: _load_rgb(p) for _, p in gallery + probes}
        mode = self.settings.landmarks
        aligned = all(px.shape[:2] == ALIGNED_SIZE for px in pixels.values())
        if mode == "auto":
            mode = "template" if aligned else "detect"
        if mode not in ("template", "detect", "detector"):
            raise UsageError(f"landmarks {mode!r}: use auto, template, detect or detector")
        found: dict[Path, list[Face]] = {}
        with FaceDetector(self.store, config=self.detector_config) as detector:
            for p, px in pixels.items():
                found[p] = detector.detect(px)
        self.recall = detector_recall(found, {p for _, p in gallery})
        self.whole_crops = mode == "template" or (mode == "detector" and aligned)
        if self.whole_crops:
            template_face = Face.from_template(ARCFACE_TEMPLATE_112)
            faces = {p: [template_face] for p in pixels}
        else:
            faces = found
        for p, fs in faces.items():
            if not fs:
                self.notes.append(f"{p}: no face found; left out")
        attack_faces = found if mode == "detector" else faces

        def build(items: list[tuple[str, Path]]) -> list[_Image]:
            return [
                _Image(i, p, pixels[p], faces[p], attack_faces[p]) for i, p in items if faces[p]
            ]

        return build(gallery), build(probes), mode

    def _load_photos(self) -> list[Photo]:
        """The ``photos`` folder's photos and their faces (none without ``photos``)."""
        from cloak_core.detect import FaceDetector

        if self.settings.photos is None:
            return []
        yunet = OpenCVPipelineEvaluator(self.store)
        with FaceDetector(self.store, config=self.detector_config) as detector:
            found, notes = photos_module.load_photos(self.settings.photos, detector, yunet)
        self.notes += notes
        if not found:
            raise UsageError(f"photos: no face found in any photo of {self.settings.photos}")
        return found

    # -- evaluators and ensembles --------------------------------------------------------

    def _evaluators(self) -> list[Evaluator]:
        from cloak_core.models import REGISTRY, available, load_model

        requested = self.settings.eval_models
        names = list(requested) if requested else [*available(self.store), *PIPELINES]
        unknown = [n for n in names if n not in REGISTRY and n not in PIPELINES]
        if unknown:
            raise UsageError(
                f"eval_models: unknown {', '.join(unknown)}; known: "
                f"{', '.join([*REGISTRY, *PIPELINES])}"
            )
        out: list[Evaluator] = []
        for name in names:
            try:
                if name == "dlib-bin":
                    out.append(DlibPipelineEvaluator(self.store))
                elif name == "opencv-sface":
                    out.append(OpenCVPipelineEvaluator(self.store))
                else:
                    model = load_model(name, self.store, self.device)
                    out.append(RegistryEvaluator(model, device=self.device))
            except (ImportError, FaceCloakError) as exc:
                if requested:
                    if isinstance(exc, ImportError):
                        raise UsageError(f"evaluator {name} needs {exc.name}: {exc}") from exc
                    raise
                self.notes.append(f"evaluator {name} left out: {exc}")
                self.log(f"facecloak eval: evaluator {name} left out: {exc}")
        if not out:
            raise UsageError("no evaluator could be loaded")
        return out

    # -- attack --------------------------------------------------------------------------

    def _protect(self, group: AttackGroup, gallery: Sequence[_Image], scored: set[str]) -> None:
        from tqdm import tqdm

        from cloak_core.pipeline import Protector

        targets = [im for im in gallery if im.identity in scored and im.attack_faces]
        protected: list[np.ndarray] = []
        label = "attack -" + ",".join(group.ensemble)
        with (
            Protector(
                replace(self.config, models=group.ensemble),
                store=self.store,
                device=str(self.device),
                models=group.ensemble,
            ) as protector,
            tqdm(total=len(targets), desc=label, disable=not self.progress, unit="img") as bar,
        ):
            seconds, resumed = 0.0, 0
            for seed, chunk, others, cached in self._batches(group, targets):
                done = bar.n

                def step(f: float, done: float = done, n: int = len(chunk)) -> None:
                    bar.n = round(done + f * n, 2)
                    bar.refresh()

                reuse = self.settings.resume or cached in self._prefilled
                hit = read_batch(cached) if reuse else None
                if hit is None:
                    t = time.perf_counter()
                    pixels = protect_batch(
                        protector,
                        [im.pixels for im in chunk],
                        [im.attack_faces for im in chunk],
                        seed,
                        [im.pixels for im in others],
                        [im.attack_faces for im in others],
                        progress=step,
                    )
                    hit = (pixels, time.perf_counter() - t)
                    write_batch(cached, *hit)
                elif cached not in self._prefilled:
                    resumed += len(chunk)
                protected += hit[0]
                seconds += hit[1]
                bar.n = done + len(chunk)
                bar.refresh()
            group.seconds = seconds
            self._protect_photos(group, protector)
        if resumed:
            self.notes.append(
                f"attack {','.join(group.ensemble)}: {resumed} of {len(targets)} images "
                f"taken from {self.cache.directory} (their recorded attack time counted)"
            )
        by_path = {im.path: px for im, px in zip(targets, protected, strict=True)}
        # Unprotected identities keep their clean pixels (they are never used protected), and
        # so do the images on which the detector found no face (they are uploaded as they are).
        group.protected = [by_path.get(im.path, im.pixels) for im in gallery]
        group.visibility = self._visibility(targets, protected)

    def _photo_tasks(self, group: AttackGroup) -> list[tuple[int, Photo, Path]]:
        """``group``'s photos of ``photos`` to attack: the seed, the photo, its cache entry.
        Each is one upload, attacked alone from the run's seed (a batch of one photo: its
        faces are each their own person's, as ``protect`` takes a photo)."""
        config = replace(self.config, models=group.ensemble)
        seed = self.settings.seed
        return [
            (seed, photo, self.cache.path(config, seed, [photo.pixels], [photo.faces]))
            for photo in self.photos
        ]

    def _protect_photos(self, group: AttackGroup, protector) -> None:
        """Protect each photo of ``photos`` (or read it from the cache) and keep it as
        ``protect`` writes it, in ``group.photos``."""
        group.photos, group.photo_seconds = [], 0.0
        for seed, photo, cached in self._photo_tasks(group):
            reuse = self.settings.resume or cached in self._prefilled
            hit = read_batch(cached) if reuse else None
            if hit is None:
                t = time.perf_counter()
                pixels = protect_batch(protector, [photo.pixels], [photo.faces], seed)
                hit = (pixels, time.perf_counter() - t)
                write_batch(cached, *hit)
            group.photos.append(photos_module.written(photo, hit[0][0]))
            group.photo_seconds += hit[1]

    def _batches(
        self, group: AttackGroup, targets: Sequence[_Image]
    ) -> list[tuple[int, Sequence[_Image], Sequence[_Image], Path]]:
        """``group``'s attack batches: the seed, the images, the photos of the same people
        in the other batches (a person with more photos than a batch holds is split, and
        each batch's shared identity counts their photos in the others, earlier and later,
        as the daemon's parts of a split upload count the rest of it) and the cache entry
        of each."""
        size = self.settings.batch_size or (64 if self.device.type == "cuda" else 32)
        config = replace(self.config, models=group.ensemble)
        out = []
        batches = person_batches(targets, size)
        for b, chunk in enumerate(batches):
            seed = self.settings.seed + b
            people = {im.identity for im in chunk}
            others = [
                im for j, c in enumerate(batches) if j != b for im in c if im.identity in people
            ]
            path = self.cache.path(
                config,
                seed,
                [im.pixels for im in chunk],
                [im.attack_faces for im in chunk],
                [im.pixels for im in others],
                [im.attack_faces for im in others],
            )
            out.append((seed, chunk, others, path))
        return out

    def _prefill(
        self, groups: Sequence[AttackGroup], gallery: Sequence[_Image], scored: set[str]
    ) -> None:
        """Attack every batch not in the cache yet in ``jobs`` worker processes, which keep
        their results in the cache; :meth:`_protect` then reads them from there."""
        targets = [im for im in gallery if im.identity in scored and im.attack_faces]
        tasks = [
            AttackTask(
                replace(self.config, models=group.ensemble),
                [im.pixels for im in chunk],
                [im.attack_faces for im in chunk],
                seed,
                path,
                [im.pixels for im in others],
                [im.attack_faces for im in others],
            )
            for group in groups
            for seed, chunk, others, path in self._batches(group, targets)
            if not (self.settings.resume and read_batch(path) is not None)
        ]
        tasks += [
            AttackTask(
                replace(self.config, models=group.ensemble),
                [photo.pixels],
                [photo.faces],
                seed,
                path,
            )
            for group in groups
            for seed, photo, path in self._photo_tasks(group)
            if not (self.settings.resume and read_batch(path) is not None)
        ]
        self.timings["attack_worker_batches"] = len(tasks)
        self._prefilled |= attack_in_workers(
            tasks, self.settings.jobs, self.store, str(self.device), progress=self.progress
        )

    def _region(self, im: _Image) -> tuple[int, int, int, int]:
        """Where ``im``'s visibility is measured: an aligned crop whole, otherwise the
        evaluated face's box grown as :func:`~cloak_core.visibility.face_region` does."""
        if self.whole_crops:
            return (0, 0, im.pixels.shape[1], im.pixels.shape[0])
        return face_region(im.pixels.shape[:2], im.face.box)

    def _visibility(
        self, originals: Sequence[_Image], protected: Sequence[np.ndarray]
    ) -> list[Visibility]:
        """The visibility panel of each protected image on its face region (display
        scale): CIEDE2000, PSNR, SSIM, DISTS and VGG LPIPS, which no preset optimises
        against, beside AlexNet LPIPS, the attack's own metric."""
        pairs = [
            display_pair(im.pixels, px, self._region(im))
            for im, px in zip(originals, protected, strict=True)
        ]
        return self.meter.measure_pairs(pairs)

    # -- identification ------------------------------------------------------------------

    def run(self) -> EvalResult:
        """Run the evaluation; returns the report (what ``report.json`` holds) and the grid."""
        s = self.settings
        t0 = time.perf_counter()
        splits, protected_ids = self._splits()
        gallery, probes, mode = self._load(splits)
        self.photos = self._load_photos() if s.attack else []
        self.mode = mode
        scored = set(protected_ids)
        probes_scored = [p for p in probes if p.identity in scored]
        if not probes_scored:
            raise UsageError("no probe image of a protected identity has a face")
        self.timings["load_seconds"] = time.perf_counter() - t0

        t = time.perf_counter()
        evaluators = self._evaluators()
        pool = attack_pool(s.attack_models, self.config.models, self.store)
        groups, info = attack_groups(evaluators, pool, fixed=s.attack_models is not None)
        self.timings["evaluators_load_seconds"] = time.perf_counter() - t

        if s.attack:
            if s.jobs > 1:
                self._prefill(groups, gallery, scored)
            for group in groups:
                self._protect(group, gallery, scored)
            attacked = sum(1 for im in gallery if im.identity in scored and im.attack_faces)
            attacked *= len(groups)
            self.timings["attack_seconds"] = sum(g.seconds for g in groups)
            self.timings["attack_images"] = attacked
            if attacked:
                self.timings["attack_seconds_per_image"] = self.timings["attack_seconds"] / attacked
            t = time.perf_counter()
            targets = [im for im in gallery if im.identity in scored and im.attack_faces]
            self.calibration = calibration(
                self.meter, [im.pixels for im in targets], [self._region(im) for im in targets]
            )
            self.timings["calibration_seconds"] = time.perf_counter() - t
        group_of = {name: g for g in groups for name in g.evaluators}

        t = time.perf_counter()
        results = self._identify(evaluators, gallery, probes_scored, group_of, scored)
        self.timings["identify_seconds"] = time.perf_counter() - t
        photo_report = None
        if self.photos:
            t = time.perf_counter()
            photo_report = self._score_photos(evaluators, groups, group_of)
            self.timings["photos_seconds"] = time.perf_counter() - t
        self.timings["total_seconds"] = time.perf_counter() - t0
        for ev in evaluators:
            info[ev.name]["fallbacks"] = ev.fallbacks
            ev.close()
        report = self._report(splits, protected_ids, gallery, probes, mode, groups, info, results)
        report["photos"] = photo_report
        height = 2 * ALIGNED_SIZE[0] if self.whole_crops else None
        photo_grid = []
        if self.photos and groups:
            photo_grid = photos_module.grid_rows(
                self.photos,
                {",".join(g.ensemble): g.photos for g in groups},
                groups[0].photo_visibility,
                s.grid_photos,
            )
        return EvalResult(report, self._grid(gallery, groups, protected_ids), height, photo_grid)

    def _grid(
        self, gallery: Sequence[_Image], groups: Sequence[AttackGroup], protected_ids: Sequence[str]
    ) -> list[GridRow]:
        """Face regions at display scale: the first gallery image of the first few protected
        identities, then the first ensemble's most visible images, each with its versions."""
        if not self.settings.attack or not groups:
            return []
        picked: list[tuple[int, str]] = []
        for identity in list(protected_ids)[: self.settings.grid_identities]:
            k = next((k for k, im in enumerate(gallery) if im.identity == identity), None)
            if k is not None:
                picked.append((k, identity.replace("_", " ")))
        targets = [
            k
            for k, im in enumerate(gallery)
            if im.identity in set(protected_ids) and im.attack_faces
        ]
        first = groups[0]
        by_seen = sorted(
            range(len(targets)), key=lambda j: first.visibility[j].scielab_mean, reverse=True
        )
        for j in by_seen[: self.settings.worst_images]:
            k = targets[j]
            seen = first.visibility[j].scielab_mean
            if all(k != p for p, _ in picked):
                label = f"{gallery[k].path.parent.name}/{gallery[k].path.name}"
                picked.append((k, f"{label}: most visible, S-CIELAB {seen:.2f}"))
        rows = []
        for k, label in picked:
            region = self._region(gallery[k])
            original = display_pair(gallery[k].pixels, gallery[k].pixels, region)[0]
            versions = {
                ",".join(g.ensemble): display_pair(gallery[k].pixels, g.protected[k], region)[1]
                for g in groups
            }
            rows.append(GridRow(label, original, versions))
        return rows

    def _identify(
        self,
        evaluators: Sequence[Evaluator],
        gallery: Sequence[_Image],
        probes_scored: Sequence[_Image],
        group_of: dict[str, AttackGroup],
        scored: set[str],
    ) -> dict[str, dict[str, dict]]:
        from tqdm import tqdm

        s = self.settings
        g_labels = [im.identity for im in gallery]
        p_labels = [im.identity for im in probes_scored]
        g_faces = [im.face for im in gallery]
        results: dict[str, dict[str, dict]] = {c.name: {} for c in s.conditions}
        total = len(evaluators) * (1 + len(s.conditions))
        with tqdm(total=total, desc="identify", disable=not self.progress) as bar:
            for ev in evaluators:
                probe_emb = self._embed(
                    ev, "probe", probes_scored, [im.pixels for im in probes_scored]
                )
                bar.update(1)
                group = group_of.get(ev.name) if s.attack else None
                for cond in s.conditions:
                    clean_px = [cond.apply(im.pixels) for im in gallery]
                    clean_emb = self._embed(ev, cond.name, gallery, clean_px)
                    s_clean = protocol.cosine_similarity_matrix(probe_emb, clean_emb)
                    entry: dict = {
                        "clean": protocol.accuracy(s_clean, p_labels, g_labels).as_dict(),
                        "protected": None,
                    }
                    if group is not None:
                        # Only the protected identities' images change: embed those alone.
                        idx = [k for k, im in enumerate(gallery) if im.identity in scored]
                        prot_emb = clean_emb.copy()
                        prot_emb[idx] = ev.embed(
                            [cond.apply(group.protected[k]) for k in idx], [g_faces[k] for k in idx]
                        )
                        sim = protocol.protected_similarity(
                            probe_emb,
                            p_labels,
                            clean_emb,
                            prot_emb,
                            g_labels,
                            sorted(scored),
                            joint=s.joint,
                        )
                        entry["protected"] = protocol.accuracy(sim, p_labels, g_labels).as_dict()
                        # Each protected gallery image against the very photo it was made
                        # from, by the recogniser's own rule; one the detector found no
                        # face in went up unprotected and counts as the match it is.
                        entry["own_original"] = protocol.own_original_match(
                            clean_emb[idx], prot_emb[idx], ev.rule
                        )
                    results[cond.name][ev.name] = entry
                    bar.update(1)
        return results

    def _score_photos(
        self,
        evaluators: Sequence[Evaluator],
        groups: Sequence[AttackGroup],
        group_of: dict[str, AttackGroup],
    ) -> dict:
        """The ``photos`` folder's report: what was scored, each ensemble's attack time,
        and every evaluator's verdicts (:func:`~cloak_core.evaluation.photos.score`)."""
        shared = self.embeddings if self.embeddings is not None else {}
        scored = [ev for ev in evaluators if ev.name in group_of]
        verdicts = photos_module.score(
            self.photos,
            {ev.name: group_of[ev.name].photos for ev in scored},
            scored,
            self.settings.conditions,
            shared,
        )
        faces = sum(len(p.faces) for p in self.photos)
        seconds = {",".join(g.ensemble): g.photo_seconds for g in groups}
        for g in groups:
            g.photo_visibility = photos_module.seen(self.meter, self.photos, g.photos)
        # Each protected face's panel per ensemble, beside its verdicts (a missed face is
        # the original, unmeasured).
        k = 0
        for face in verdicts["per_face"]:
            face["visibility"] = None
            if face["protected"]:
                face["visibility"] = {
                    ",".join(g.ensemble): g.photo_visibility[k].as_dict() for g in groups
                }
                k += 1
        return {
            **photos_module.summary(self.photos, self.settings.photos),
            "attack_seconds": seconds,
            "seconds_per_face": {k: v / faces if faces else None for k, v in seconds.items()},
            "visibility": {",".join(g.ensemble): summarise(g.photo_visibility) for g in groups},
            "visibility_calibration": {
                name: summarise(p)
                for name, p in photos_module.calibration(self.meter, self.photos).items()
            },
            **verdicts,
        }

    def _embed(
        self, ev: Evaluator, key: str, images: Sequence[_Image], pixels: Sequence[np.ndarray]
    ) -> np.ndarray:
        """``ev``'s embeddings ``(N, D)`` of unprotected ``pixels`` (one per image of
        ``images``), taken from the shared ``embeddings`` store where an earlier run of the
        same dataset already made them (``key`` names the condition, or ``"probe"``)."""
        memo = self.embeddings
        if memo is None:
            return ev.embed(pixels, [im.face for im in images])
        keys = [(ev.name, key, str(im.path)) for im in images]
        todo = [k for k, name in enumerate(keys) if name not in memo]
        if todo:
            new = ev.embed([pixels[k] for k in todo], [images[k].face for k in todo])
            for k, e in zip(todo, new, strict=True):
                memo[keys[k]] = e
        return np.stack([memo[name] for name in keys])

    # -- report --------------------------------------------------------------------------

    def _report(
        self,
        splits: Sequence[protocol.IdentitySplit],
        protected_ids: Sequence[str],
        gallery: Sequence[_Image],
        probes: Sequence[_Image],
        mode: str,
        groups: Sequence[AttackGroup],
        info: dict[str, dict],
        results: dict[str, dict[str, dict]],
    ) -> dict:
        s = self.settings
        scored = set(protected_ids)
        attack_groups = []
        if s.attack:
            targets = [im for im in gallery if im.identity in scored and im.attack_faces]
            for g in groups:
                attack_groups.append(
                    {
                        "ensemble": list(g.ensemble),
                        "evaluators": g.evaluators,
                        "images": len(targets),
                        "seconds": g.seconds,
                        "seconds_per_image": g.seconds / len(targets) if targets else None,
                        "visibility": summarise(g.visibility),
                        "worst": [
                            {
                                "identity": targets[j].identity,
                                "path": str(targets[j].path),
                                **g.visibility[j].as_dict(),
                            }
                            for j in sorted(
                                range(len(targets)),
                                key=lambda j, g=g: g.visibility[j].scielab_mean,
                                reverse=True,
                            )[: s.worst_images]
                        ],
                        "per_image": [
                            {
                                "identity": im.identity,
                                "path": str(im.path),
                                "visibility": g.visibility[k].as_dict(),
                            }
                            for k, im in enumerate(targets)
                        ],
                    }
                )
        config = asdict(self.config)
        return {
            "facecloak": __version__,
            "versions": software_versions(),
            "seed": s.seed,
            "settings": s.as_dict(),
            "device": str(self.device),
            "attack_config": config if s.attack else None,
            "mode": "leave-one-out" if s.attack_models is None else "fixed-ensemble",
            "protocol": {
                "probe_every": protocol.PROBE_EVERY,
                "gallery_protection": "joint" if s.joint else "per-identity",
                "ranking": "cosine similarity; rank-k: a gallery image of the probe's "
                "identity among the k most similar gallery images",
                "landmarks": mode,
            },
            "dataset": {
                "path": str(s.dataset),
                "identities": len(splits),
                "protected_identities": list(protected_ids),
                "distractor_identities": [
                    sp.identity for sp in splits if sp.identity not in scored
                ],
                "gallery_images": len(gallery),
                "protected_gallery_images": sum(
                    1 for im in gallery if im.identity in scored and im.attack_faces
                ),
                "unprotected_gallery_images": [
                    str(im.path) for im in gallery if im.identity in scored and not im.attack_faces
                ],
                "probe_images": sum(1 for im in probes if im.identity in scored),
            },
            "evaluators": info,
            "attack": attack_groups,
            "visibility_calibration": (
                {name: summarise(panels) for name, panels in self.calibration.items()}
                if s.attack
                else None
            ),
            "detector_recall": self.recall,
            "results": results,
            "timings": self.timings,
            "notes": self.notes,
        }
