"""The protection-visibility frontier: black-box rank-1 against CIEDE2000, per preset.

For each preset, one strength setting (``steps``, ``step_size``, ``lpips_budget`` or
``lpips_weight``) is scaled by each factor, and every such point is a leave-one-out
evaluation (:class:`~cloak_core.evaluation.runner.Evaluation`): each evaluator, the two
independent pipelines included, is scored on images protected by an ensemble without its
weights. A point's visibility is the mean face-region CIEDE2000 of the images its
evaluator was scored on. Every point keeps its attacked images in one shared attack cache,
so a rerun, or another sweep through the same point, costs no attack.

Two calibration points per evaluator mark what plain JPEG re-encoding (quality 90 and 75)
does: its CIEDE2000 on the same faces, and the rank-1 of a gallery that was only
re-encoded (no protection).

Modes: ``quick`` scores the first :data:`QUICK_IDENTITIES` identities with
:data:`QUICK_GALLERY` protected gallery images and :data:`QUICK_PROBES` probes each
(32 protected faces; the other identities stay in, clean, as distractors), for tuning in
minutes; ``full`` uses the whole dataset.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cloak_core.errors import UsageError
from cloak_core.evaluation.conditions import Condition, parse_condition
from cloak_core.presets import Setting, get_preset

if TYPE_CHECKING:
    from cloak_core.detect import DetectorConfig
    from cloak_core.store import ModelStore
    from cloak_core.visibility import GridRow

QUICK_IDENTITIES = 8
QUICK_GALLERY = 4
QUICK_PROBES = 2
SWEEPS = (
    "steps",
    "step_size",
    "lpips_budget",
    "lpips_weight",
    "perceptual",
    "diversity",
    "detail",
)
DEFAULT_PRESETS = ("balanced", "strong", "paper")
DEFAULT_FACTORS = (0.5, 1.0, 2.0)
FRONTIER_JSON = "frontier.json"
FRONTIER_MD = "frontier.md"
FRONTIER_PNG = "frontier.png"
# The same plot against SSIMULACRA2, for runs that measured it on every point.
FRONTIER_SSIMULACRA2_PNG = "frontier-ssimulacra2.png"
# With --photos: the most visible photo faces under every point, side by side.
FRONTIER_PHOTOS_GRID_PNG = "frontier-photos-grid.png"
CALIBRATION_QUALITIES = (90, 75)
# The colour of each preset's curve (others cycle through matplotlib's defaults).
_COLOURS = {
    "balanced": "#1f77b4",
    "natural": "#ff7f0e",
    "strong": "#d62728",
    "paper": "#2ca02c",
    "fast": "#9467bd",
}
_OTHER_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22")
# One colour per run where combined runs drew one preset each (matplotlib's tab10).
_RUN_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass(frozen=True)
class FrontierSettings:
    """One frontier sweep.

    ``sweep`` names the :class:`~cloak_core.presets.AttackConfig` field scaled by each of
    ``factors`` (``steps`` is rounded, at least 1; a preset without an ``lpips_budget``
    cannot sweep it); ``only`` gives some presets factors of their own, as
    ``(preset, factors)`` pairs (a reference preset can be one point). ``mode``:
    ``"quick"`` or ``"full"``; ``identities``, ``gallery_per_identity`` and
    ``probes_per_identity`` replace the mode's own when given.
    ``conditions``: how the gallery reaches the recogniser (a row of the plot each).
    ``landmarks``, ``attack_models`` and ``batch_size`` are the evaluation's
    (:class:`~cloak_core.evaluation.runner.EvalSettings`): ``landmarks="detector"``
    protects and scores only the faces the pipeline's detector finds, so a missed face
    counts as a leak; ``attack_models`` replaces leave-one-out by one fixed ensemble (the
    product's, say), and evaluators sharing its weights are white-box, left out of every
    point's worst. ``overrides``: settings changed on every point, as ``eval --set`` (a
    technique turned off, say: its curve beside the preset's shows what it contributes);
    they cannot name the swept setting. ``photos``: the evaluation's whole photos, scored on
    every point beside the dataset; ``grid_photos``: how many of their faces the photos'
    grid shows under every point (the most visible, :func:`photo_grid`).
    """

    dataset: Path
    out: Path
    presets: tuple[str, ...] = DEFAULT_PRESETS
    sweep: str = "step_size"
    factors: tuple[float, ...] = DEFAULT_FACTORS
    only: tuple[tuple[str, tuple[float, ...]], ...] = ()
    mode: str = "quick"
    conditions: tuple[Condition, ...] = field(
        default_factory=lambda: (parse_condition("png"), parse_condition("scale50-jpeg85"))
    )
    eval_models: tuple[str, ...] | None = None
    identities: int | None = None
    gallery_per_identity: int | None = None
    probes_per_identity: int | None = None
    seed: int = 0
    device: str = "auto"
    jobs: int = 1
    landmarks: str = "auto"
    attack_models: tuple[str, ...] | None = None
    batch_size: int | None = None
    overrides: tuple[tuple[str, Setting], ...] = ()
    photos: Path | None = None
    grid_photos: int = 8

    def __post_init__(self) -> None:
        if self.sweep not in SWEEPS:
            raise UsageError(f"sweep {self.sweep!r}: choose one of {', '.join(SWEEPS)}")
        if self.mode not in ("quick", "full"):
            raise UsageError(f"mode {self.mode!r}: use quick or full")
        for factors in (self.factors, *(f for _, f in self.only)):
            if not factors or any(f <= 0 for f in factors):
                raise UsageError("factors must be positive numbers")
        if not self.presets:
            raise UsageError("name at least one preset")
        if self.sweep in dict(self.overrides):
            raise UsageError(f"--set {self.sweep} is the swept setting; sweep another or drop it")
        for name in self.presets:
            config = get_preset(name)
            # A preset without the swept setting can still stand as its own point (x1).
            if getattr(config, self.sweep) is None and self.preset_factors(name) != (1.0,):
                raise UsageError(
                    f"preset {name} has no {self.sweep} to sweep; give it as {name}@1 to "
                    "show it as it is"
                )

    def preset_factors(self, preset: str) -> tuple[float, ...]:
        """The factors ``preset`` is swept by."""
        return dict(self.only).get(preset, self.factors)


def point_value(preset: str, sweep: str, factor: float) -> float | None:
    """The swept setting's value at ``factor`` times the preset's own (``None`` for a
    preset that does not use it, shown as it is)."""
    base = getattr(get_preset(preset), sweep)
    if base is None:
        return None
    if sweep == "steps":
        return float(max(1, round(base * factor)))
    return float(base * factor)


class Frontier:
    """Runs the sweep; :meth:`run` returns the JSON-ready frontier (also written to ``out``)
    and leaves the photos' grid rows in ``photo_grid`` (:func:`photo_grid`; none without
    photos)."""

    def __init__(
        self,
        settings: FrontierSettings,
        store: ModelStore,
        *,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        detector_config: DetectorConfig | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.detector_config = detector_config
        self.progress = progress
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.photo_grid: list[GridRow] = []

    def _eval_settings(self, **changes):
        from cloak_core.evaluation.runner import EvalSettings

        s = self.settings
        quick = s.mode == "quick"
        base = EvalSettings(
            dataset=s.dataset,
            out=s.out,
            identities=s.identities or (QUICK_IDENTITIES if quick else None),
            gallery_per_identity=s.gallery_per_identity or (QUICK_GALLERY if quick else None),
            probes_per_identity=s.probes_per_identity or (QUICK_PROBES if quick else None),
            eval_models=s.eval_models,
            conditions=s.conditions,
            seed=s.seed,
            device=s.device,
            jobs=s.jobs,
            landmarks=s.landmarks,
            attack_models=s.attack_models,
            batch_size=s.batch_size,
            grid_identities=0,
            photos=s.photos,
            grid_photos=None,
        )
        return replace(base, **changes)

    def run(self) -> dict:
        """Evaluate every point and the calibration; the frontier as a JSON-ready dict."""
        from cloak_core.evaluation.runner import Evaluation

        s = self.settings
        points = []
        views: list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]] = []
        embeddings: dict = {}  # unprotected images' embeddings, shared by every point
        for preset in s.presets:
            for factor in s.preset_factors(preset):
                value = point_value(preset, s.sweep, factor)
                shown = "unused" if value is None else f"{value:g}"
                self.log(f"frontier: {preset}, {s.sweep} = {shown} (x{factor:g})")
                overrides = s.overrides + (() if value is None else ((s.sweep, value),))
                settings = self._eval_settings(preset=preset, overrides=overrides)
                result = Evaluation(
                    settings,
                    self.store,
                    progress=self.progress,
                    log=self.log,
                    embeddings=embeddings,
                    detector_config=self.detector_config,
                )
                evaluated = result.run()
                points.append(_point(evaluated.report, preset, factor, s.sweep, value))
                # Each photo face under the point's first ensemble, in photo order.
                first = [(r.original, next(iter(r.changed.values()))) for r in evaluated.photo_grid]
                views.append((f"{preset} {s.sweep} {shown}", first))
        self.photo_grid = photo_grid(points, views, s.grid_photos)
        # The calibration: galleries only re-encoded, scored clean under those JPEGs.
        jpegs = tuple(parse_condition(f"jpeg{q}") for q in CALIBRATION_QUALITIES)
        clean = (
            Evaluation(
                self._eval_settings(attack=False, conditions=jpegs),
                self.store,
                progress=self.progress,
                log=self.log,
                embeddings=embeddings,
                detector_config=self.detector_config,
            )
            .run()
            .report
        )
        calibration = _calibration(points[0]["visibility_calibration"], clean)
        return {
            "settings": {
                **asdict(s),
                "dataset": str(s.dataset),
                "out": str(s.out),
                "photos": None if s.photos is None else str(s.photos),
                "conditions": [c.name for c in s.conditions],
            },
            "evaluators": list(clean["evaluators"]),
            "scored": points[0]["scored"],
            "points": points,
            "calibration": calibration,
        }


def _point(report: dict, preset: str, factor: float, sweep: str, value: float | None) -> dict:
    """One frontier point from an evaluation report: rank-1 and visibility per evaluator."""
    groups = report["attack"]
    by_evaluator = {}
    for group in groups:
        for name in group["evaluators"]:
            by_evaluator[name] = group
    evaluators = {}
    for name, group in by_evaluator.items():
        evaluators[name] = {
            "ensemble": group["ensemble"],
            "white_box": bool(report["evaluators"][name]["white_box"]),
            "visibility": group["visibility"],
            "rank1": {
                cond: rows[name]["protected"]["rank1"]
                for cond, rows in report["results"].items()
                if name in rows and rows[name]["protected"] is not None
            },
            "own_original": {
                cond: rows[name]["own_original"]
                for cond, rows in report["results"].items()
                if name in rows and rows[name].get("own_original") is not None
            },
        }
    everything = [p for g in groups for p in g["per_image"]]
    photos = report.get("photos")
    if photos:
        seen = photos.get("visibility") or {}
        for name, e in evaluators.items():
            e["photos"] = {
                cond: rows[name] for cond, rows in photos["results"].items() if name in rows
            }
            mine = seen.get(",".join(e["ensemble"]))
            if mine:
                e["photos_visibility"] = {k: v["mean"] for k, v in mine.items()}
    return {
        "preset": preset,
        "factor": factor,
        "sweep": sweep,
        "value": value,
        "evaluators": evaluators,
        "visibility": _mean_panel(everything),
        "seconds_per_image": float(np.mean([g["seconds_per_image"] or 0.0 for g in groups])),
        "visibility_calibration": report["visibility_calibration"],
        "detector_recall": report.get("detector_recall"),
        "photos": (
            None
            if not photos
            else {
                k: photos[k]
                for k in ("folder", "photos", "faces", "protected_faces", "missed", "per_face")
            }
            | {
                "seconds_per_face": photos["seconds_per_face"],
                "visibility": _mean_of_means(photos.get("visibility") or {}),
            }
        ),
        "scored": {
            "identities": len(report["dataset"]["protected_identities"]),
            "protected_gallery_images": report["dataset"]["protected_gallery_images"],
            "probes": report["dataset"]["probe_images"],
        },
    }


def _mean_panel(per_image: Sequence[dict]) -> dict[str, float]:
    """The mean of each panel metric over images (non-finite values left out)."""
    from cloak_core.visibility import PANEL_METRICS

    out = {}
    for key in PANEL_METRICS:
        v = np.asarray(
            [p["visibility"][key] for p in per_image if p["visibility"].get(key) is not None],
            float,
        )
        v = v[np.isfinite(v)]
        out[key] = float(v.mean()) if v.size else float("nan")
    return out


def _mean_of_means(summaries: dict[str, dict]) -> dict[str, float]:
    """Each panel metric's mean over several :func:`~cloak_core.visibility.summarise`
    summaries (one per ensemble), non-finite ones left out ({} for none)."""
    from cloak_core.visibility import PANEL_METRICS

    if not summaries:
        return {}
    out = {}
    for key in PANEL_METRICS:
        v = np.asarray([m[key]["mean"] for m in summaries.values()], float)
        v = v[np.isfinite(v)]
        out[key] = float(v.mean()) if v.size else float("nan")
    return out


def _calibration(visibility: dict, clean: dict) -> dict:
    """Per JPEG quality: its visibility summary and each evaluator's clean rank-1 under it."""
    out = {}
    for q in CALIBRATION_QUALITIES:
        name = f"jpeg{q}"
        rows = clean["results"][name]
        out[name] = {
            "visibility": {k: v["mean"] for k, v in visibility[name].items()},
            "rank1": {ev: rows[ev]["clean"]["rank1"] for ev in rows},
        }
    return out


# --------------------------------------------------------------------------- outputs


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def black_box(point: dict) -> dict[str, dict]:
    """A point's evaluators that the attack did not use (all of them under leave-one-out;
    with a fixed ensemble, those that share none of its weights): what its worst counts."""
    return {n: e for n, e in point["evaluators"].items() if not e.get("white_box", False)}


def _factors(frontier: dict) -> str:
    """Each preset's swept factors, as ``balanced x0.5/1/2``."""
    by_preset: dict[str, list[str]] = {}
    for p in frontier["points"]:
        by_preset.setdefault(p["preset"], []).append(f"{p['factor']:g}")
    return ", ".join(f"{name} x{'/'.join(fs)}" for name, fs in by_preset.items())


def _seen(v: dict) -> str:
    """S-CIELAB mean (p95) of a visibility summary; "-" for runs from before it was measured."""
    mean, p95 = v.get("scielab_mean"), v.get("scielab_p95")
    if mean is None or not np.isfinite(mean):
        return "-"
    return f"{mean:.2f} ({p95:.1f})"


def _score(v: dict) -> str:
    """SSIMULACRA2 mean of a visibility summary; "-" for runs from before it was measured."""
    score = v.get("ssimulacra2")
    return "-" if score is None or not np.isfinite(score) else f"{score:.1f}"


def visibility_axis(frontier: dict) -> tuple[str, str]:
    """The plot's visibility axis, ``(key, label)``: S-CIELAB mean, the colour difference
    as the eye resolves it; CIEDE2000 mean where some point (a combined run from before
    S-CIELAB was measured) lacks it."""
    if measured_everywhere(frontier, "scielab_mean"):
        return "scielab_mean", "face S-CIELAB mean"
    return "de2000_mean", "face CIEDE2000 mean"


def _own(point: dict, cond: str) -> str:
    """The worst evaluator's share of protected faces still matched to their own originals,
    and the mean cosine to them over evaluators ("-" for a run from before they were kept)."""
    own = [
        e["own_original"][cond]
        for e in black_box(point).values()
        if cond in e.get("own_original", {})
    ]
    if not own:
        return "-"
    worst = max(o["matched"] for o in own)
    return f"{_pct(worst)} ({np.mean([o['cosine'] for o in own]):.2f})"


def _photo_own(point: dict, cond: str) -> str:
    """As :func:`_own`, over the faces of the whole photos ("-" for a point without)."""
    own = [e["photos"][cond] for e in black_box(point).values() if cond in e.get("photos", {})]
    if not own:
        return "-"
    worst = max(o["matched"] for o in own)
    return f"{_pct(worst)} ({np.mean([o['cosine'] for o in own]):.2f})"


def _photo_seen(point: dict) -> dict:
    """A point's mean visibility panel on the whole photos' faces ({} for a point without)."""
    return (point.get("photos") or {}).get("visibility") or {}


def _photos(frontier: dict) -> list[str]:
    """The header line naming the whole photos scored beside the dataset, if any."""
    seen = next((p["photos"] for p in frontier["points"] if p.get("photos")), None)
    if seen is None:
        return []
    missed = len(seen["missed"])
    return [
        f"- whole photos `{seen['folder']}`: {seen['photos']} photos, {seen['faces']} faces "
        f"({missed} missed by the detector, uploaded unprotected), each photo protected "
        "alone and written as `protect` writes it; photo faces matched: the worst "
        "evaluator's share still matched to the original photo's face (mean cosine); "
        "photo faces seen: S-CIELAB mean (p95) of the protected faces of the written photos, "
        "the face region at display scale"
    ]


def _ensemble(frontier: dict) -> str:
    """How the points were attacked, for the table's header."""
    fixed = frontier["settings"].get("attack_models")
    if not fixed:
        return "leave-one-out (every rank-1 is black-box)"
    white = sorted(
        {n for p in frontier["points"] for n in p["evaluators"]}
        - {n for p in frontier["points"] for n in black_box(p)}
    )
    return f"one attack ensemble, {', '.join(fixed)}" + (
        f" (white-box, left out of worst: {', '.join(white)})" if white else ""
    )


def _faces(frontier: dict) -> str:
    """Which faces were protected and scored, and how many of them the detector found."""
    landmarks = frontier["settings"].get("landmarks", "auto")
    told = {
        "auto": "the template's on aligned crops, else the detector's",
        "template": "the ArcFace template's (aligned crops)",
        "detect": "the detector's (images without a face left out)",
        "detector": "the pipeline's detector's: a gallery face it misses stays unprotected",
    }.get(landmarks, landmarks)
    recalls = [p.get("detector_recall") for p in frontier["points"]]
    recall = next((r for r in recalls if r), None)
    if recall is None:
        return told
    return (
        f"{told}; detector recall {recall['found']}/{recall['images']} images, gallery "
        f"{recall['gallery_found']}/{recall['gallery_images']}"
    )


def _set(overrides: Sequence[Sequence]) -> str:
    """``--set`` settings as the table shows them: `name=value`, ..."""
    return ", ".join(f"`{name}={value}`" for name, value in overrides)


def _runs(settings: dict) -> str:
    """A combined frontier's runs, each with the settings its ``--set`` changed."""
    changed = settings.get("combined_overrides") or {}
    return ", ".join(
        f"{label} ({_set(changed[label])})" if changed.get(label) else label
        for label in settings["combined"]
    )


def _value(point: dict, sweep: str) -> str:
    """A point's swept value, named when the table mixes sweeps (a combined frontier)."""
    value = "-" if point["value"] is None else format(point["value"], "g")
    return value if point["sweep"] == sweep else f"{point['sweep']} {value}"


def markdown(frontier: dict) -> str:
    """The frontier as a Markdown table: one row per point, one column per evaluator."""
    s = frontier["settings"]
    evaluators = frontier["evaluators"]
    conditions = s["conditions"]
    sc = frontier["scored"]
    lines = [
        "# FaceCloak protection-visibility frontier",
        "",
        f"- dataset `{s['dataset']}`, mode {s['mode']}: {sc['identities']} protected "
        f"identities, {sc['protected_gallery_images']} protected faces, {sc['probes']} probes",
        f"- sweep: `{s['sweep']}`, as multiples of each preset's own value: {_factors(frontier)};"
        f" {_ensemble(frontier)}",
        *(["- set on every point: " + _set(s["overrides"])] if s.get("overrides") else []),
        f"- faces: {_faces(frontier)}",
        *(
            [f"- combined runs: {_runs(s)} (each preset named by its run)"]
            if s.get("combined")
            else []
        ),
        "- visibility on the face region at display scale: S-CIELAB mean (p95), the colour "
        "difference as the eye resolves it, SSIMULACRA2 (100 identical, about 90 unseen side "
        "by side, 30 low quality), then CIEDE2000 mean (p95), PSNR, SSIM, DISTS, "
        "LPIPS-VGG; LPIPS-Alex is the attack's own metric",
        "- matches own original: the share of protected faces that an evaluator, by its own "
        "same-person rule, still matches to the very photo each was made from (a face the "
        "detector missed counts as matched); the worst evaluator's, with the mean cosine",
        *_photos(frontier),
        "",
    ]
    with_photos = bool(_photos(frontier))
    for cond in conditions:
        lines += [
            f"## Protected rank-1, condition `{cond}`",
            "",
            "| preset | "
            + s["sweep"]
            + " | "
            + " | ".join(evaluators)
            + " | worst | matches own original, worst (mean cosine) | "
            + (
                "photo faces matched, worst (mean cosine) | photo faces seen | "
                if with_photos
                else ""
            )
            + "S-CIELAB | SSIMULACRA2 "
            "| CIEDE2000 | PSNR | SSIM | DISTS | LPIPS-VGG | LPIPS-Alex (attack's) | s/image |",
            "| --- | ---: | "
            + " | ".join("---:" for _ in evaluators)
            + " | ---: " * (13 if with_photos else 11)
            + "|",
        ]
        for p in frontier["points"]:
            ranks = [p["evaluators"].get(e, {}).get("rank1", {}).get(cond) for e in evaluators]
            known = [e["rank1"][cond] for e in black_box(p).values() if cond in e["rank1"]]
            v = p["visibility"]
            lines.append(
                f"| {p['preset']} | {_value(p, s['sweep'])} | "
                + " | ".join(_pct(r) for r in ranks)
                + f" | {_pct(max(known) if known else None)} | {_own(p, cond)} | "
                + (f"{_photo_own(p, cond)} | {_seen(_photo_seen(p))} | " if with_photos else "")
                + f"{_seen(v)} | "
                f"{_score(v)} | {v['de2000_mean']:.2f} "
                f"({v['de2000_p95']:.1f}) | {v['psnr']:.1f} | {v['ssim']:.3f} | "
                f"{v['dists']:.3f} | {v['lpips_vgg']:.3f} | {v['lpips_alex']:.4f} | "
                f"{p['seconds_per_image']:.2f} |"
            )
        lines.append("")
    lines += [
        "## Calibration: the same faces only re-encoded as JPEG (clean rank-1)",
        "",
        "| re-encoding | "
        + " | ".join(evaluators)
        + " | S-CIELAB | SSIMULACRA2 | CIEDE2000 | PSNR | SSIM | DISTS | LPIPS-VGG |",
        "| --- | " + " | ".join("---:" for _ in evaluators) + " | ---: " * 7 + "|",
    ]
    for name, c in frontier["calibration"].items():
        v = c["visibility"]
        lines.append(
            f"| {name} | "
            + " | ".join(_pct(c["rank1"].get(e)) for e in evaluators)
            + f" | {_seen(v)} | {_score(v)} | {v['de2000_mean']:.2f} ({v['de2000_p95']:.1f}) | "
            f"{v['psnr']:.1f} | "
            f"{v['ssim']:.3f} | {v['dists']:.3f} | {v['lpips_vgg']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def curve_style(
    preset: str, k: int, presets: Sequence[str], combined: Sequence[str]
) -> tuple[str, str, float]:
    """Line and marker, colour and opacity of curve ``k``, ``preset``, of the plot's
    ``presets``. Alone, a curve's colour is its preset's. In a combined frontier
    (``combined`` names its runs; presets read ``run: preset``) the colour stays the
    preset's and the line says the run, the last one solid, earlier ones dashed and
    paler; but where every run drew one preset (one technique turned off per run, say, or
    one candidate setting of a preset per run), each run gets a colour of its own, all
    solid."""
    run, _, base = preset.rpartition(": ") if combined else ("", "", preset)
    if combined and len(presets) == len(combined):
        return "o-", _RUN_COLOURS[combined.index(run) % len(_RUN_COLOURS)], 1.0
    earlier = bool(combined) and run != combined[-1]
    colour = _COLOURS.get(base) or _OTHER_COLOURS[k % len(_OTHER_COLOURS)]
    return ("s--" if earlier else "o-"), colour, (0.55 if earlier else 1.0)


def measured_everywhere(frontier: dict, key: str) -> bool:
    """Whether every point and calibration row of ``frontier`` has a finite ``key``."""
    rows = [p["visibility"] for p in frontier["points"]]
    rows += [c["visibility"] for c in frontier["calibration"].values()]
    return bool(rows) and all(r.get(key) is not None and np.isfinite(r[key]) for r in rows)


def plot(frontier: dict, path: Path, axis: tuple[str, str] | None = None) -> None:
    """Rank-1 against visibility (``axis`` = ``(key, label)``, by default
    :func:`visibility_axis`: S-CIELAB mean): a panel per evaluator (and the worst of
    them), a row per condition, a curve per preset, the JPEG calibration points as grey
    crosses. A score where higher looks more like the original (SSIMULACRA2) runs from
    right to left, so that more visible is to the right on every plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from cloak_core.visibility import HIGHER_IS_WORSE

    evaluators = [*frontier["evaluators"], "worst"]
    conditions = frontier["settings"]["conditions"]
    # A row per condition of rank-1 on the dataset, then, where points scored whole
    # photos, a row per condition of their faces still matched to the originals.
    rows = [("rank1", c) for c in conditions]
    if any(_photo_seen(p) for p in frontier["points"]):
        rows += [("photos", c) for c in conditions]
    fig, axes = plt.subplots(
        len(rows),
        len(evaluators),
        figsize=(2.9 * len(evaluators), 2.9 * len(rows) + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    presets = list(dict.fromkeys(p["preset"] for p in frontier["points"]))
    axis, axis_label = axis or visibility_axis(frontier)
    combined = frontier["settings"].get("combined") or []
    for r, (kind, cond) in enumerate(rows):
        for c, ev in enumerate(evaluators):
            ax = axes[r][c]
            for k, preset in enumerate(presets):
                xs, ys = [], []
                for p in frontier["points"]:
                    if p["preset"] != preset:
                        continue
                    y, x = _plotted(p, ev, kind, cond, axis)
                    if y is not None and x is not None:
                        xs.append(x)
                        ys.append(100 * y)
                order = np.argsort(xs)
                style, colour, alpha = curve_style(preset, k, presets, combined)
                ax.plot(
                    np.asarray(xs)[order],
                    np.asarray(ys)[order],
                    style,
                    color=colour,
                    alpha=alpha,
                    label=preset,
                    ms=4,
                )
            # JPEG alone, on the dataset's rows (the photos were not scored re-encoded).
            for name, cal in frontier["calibration"].items() if kind == "rank1" else ():
                ranks = list(cal["rank1"].values()) if ev == "worst" else [cal["rank1"].get(ev)]
                ranks = [x for x in ranks if x is not None]
                if ranks:
                    x = cal["visibility"][axis]
                    ax.plot([x], [100 * max(ranks)], "x", color="grey", ms=7)
                    ax.annotate(name, (x, 100 * max(ranks)), fontsize=6, color="grey")
            ax.axhline(10, color="black", lw=0.5, ls=":")
            ax.set_ylim(-3, 103)
            if r == 0:
                ax.set_title(ev, fontsize=9)
            if c == 0:
                what = "protected rank-1" if kind == "rank1" else "photo faces matched"
                ax.set_ylabel(f"{cond}\n{what} (%)", fontsize=8)
            if r == len(conditions) - 1 or r == len(rows) - 1:
                where = axis_label if kind == "rank1" else f"whole photos: {axis_label}"
                ax.set_xlabel(where, fontsize=8)
            ax.tick_params(labelsize=7)
    if not HIGHER_IS_WORSE.get(axis, True):
        axes[0][0].invert_xaxis()  # the axes are shared: one call turns them all
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"protection vs visibility, sweep of {frontier['settings']['sweep']} "
        f"({frontier['settings']['mode']} mode); grey x: JPEG only",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plotted(
    point: dict, ev: str, kind: str, cond: str, axis: str
) -> tuple[float | None, float | None]:
    """Where ``point`` sits in the plot's panel of evaluator ``ev`` (or ``"worst"``, the
    worst black-box one) on the row ``(kind, cond)``: ``(y, x)``, y in 0..1, each ``None``
    where not measured. ``kind`` ``"rank1"``: protected rank-1 on the dataset against the
    faces' visibility; ``"photos"``: the share of photo faces still matched against the
    photo faces' visibility."""
    if ev == "worst":
        if kind == "rank1":
            ys = [e["rank1"].get(cond) for e in black_box(point).values()]
            x = point["visibility"][axis]
        else:
            ys = [
                (e.get("photos", {}).get(cond) or {}).get("matched")
                for e in black_box(point).values()
            ]
            x = _photo_seen(point).get(axis)
        ys = [y for y in ys if y is not None]
        return (max(ys) if ys else None), x
    e = point["evaluators"].get(ev)
    if e is None:
        return None, None
    if kind == "rank1":
        return e["rank1"].get(cond), e["visibility"][axis]["mean"]
    verdict = e.get("photos", {}).get(cond) or {}
    return verdict.get("matched"), e.get("photos_visibility", {}).get(axis)


def photo_grid(
    points: Sequence[dict],
    views: Sequence[tuple[str, Sequence[tuple[np.ndarray, np.ndarray]]]],
    count: int,
) -> list[GridRow]:
    """The whole photos' faces under every point, side by side: per point ``views`` gives
    a column label and each protected face's ``(original, protected)`` crop at display
    scale under its first ensemble, in photo order (as its report's ``per_face`` lists
    them). Rows are the ``count`` faces most visible under any point (S-CIELAB mean),
    most visible first, each labelled with its S-CIELAB under every point."""
    from cloak_core.visibility import GridRow

    if count <= 0 or not views or not views[0][1]:
        return []
    faces = [f for f in points[0]["photos"]["per_face"] if f["protected"]]
    seen = []  # per point, each face's S-CIELAB under the point's first ensemble
    for p in points:
        mine = [f["visibility"] for f in p["photos"]["per_face"] if f["protected"]]
        seen.append([next(iter(v.values()))["scielab_mean"] for v in mine])
    order = sorted(range(len(faces)), key=lambda j: max(s[j] for s in seen), reverse=True)
    rows = []
    for j in order[:count]:
        label = (
            f"{Path(faces[j]['path']).name}, a {faces[j]['size']}-pixel face: S-CIELAB "
            + " / ".join(f"{s[j]:.2f}" for s in seen)
        )
        changed = {name: crops[j][1] for name, crops in views}
        rows.append(GridRow(label, views[0][1][j][0], changed))
    return rows


# What a frontier.json from before a setting was recorded used.
_OLD_SETTINGS = {"landmarks": "auto", "attack_models": None}


def combine(runs: Sequence[tuple[str, dict]]) -> dict:
    """One frontier from several runs' ``frontier.json`` (before and after a change, say),
    each ``(label, frontier)``: every run's points, each preset renamed ``label: preset``
    so that one plot shows the runs' curves side by side. The runs must have scored the same
    split (mode and counts), conditions, faces (landmarks), attack ensembles and
    evaluators, or the curves would not be
    comparable; the calibration points are the first run's. Raises :class:`UsageError`
    otherwise."""
    if not runs:
        raise UsageError("name at least one frontier.json to combine")
    first_label, first = runs[0]
    points = []
    for label, run in runs:
        for name in ("mode", "conditions", "landmarks", "attack_models"):
            mine, theirs = (r["settings"].get(name, _OLD_SETTINGS.get(name)) for r in (run, first))
            if mine != theirs:
                raise UsageError(
                    f"{label}: {name} {mine!r} differs from {first_label}'s {theirs!r}; only "
                    "runs scored the same way combine"
                )
        if run["evaluators"] != first["evaluators"]:
            raise UsageError(
                f"{label}: evaluators {', '.join(run['evaluators'])} differ from "
                f"{first_label}'s {', '.join(first['evaluators'])}"
            )
        if run["scored"] != first["scored"]:
            raise UsageError(
                f"{label}: scored {run['scored']} differs from {first_label}'s {first['scored']}"
            )
        points += [{**p, "preset": f"{label}: {p['preset']}"} for p in run["points"]]
    sweeps = list(dict.fromkeys(p["sweep"] for p in points))
    settings = {
        **first["settings"],
        "sweep": sweeps[0] if len(sweeps) == 1 else "setting",
        "combined": [label for label, _ in runs],
        # Each run's own --set (the first run's would otherwise stand for all).
        "overrides": [],
        "combined_overrides": {
            label: [list(o) for o in run["settings"].get("overrides", [])] for label, run in runs
        },
    }
    return {**first, "settings": settings, "points": points}


def write_outputs(frontier: dict, out: Path, photo_rows: Sequence[GridRow] = ()) -> list[Path]:
    """frontier.json, frontier.md and frontier.png in ``out``, frontier-ssimulacra2.png
    where every point measured SSIMULACRA2, and frontier-photos-grid.png of
    ``photo_rows`` (:func:`photo_grid`) where there are any; returns their paths."""
    from cloak_core.evaluation.report import json_ready
    from cloak_core.visibility import write_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / FRONTIER_JSON, out / FRONTIER_MD, out / FRONTIER_PNG]
    paths[0].write_text(json.dumps(json_ready(frontier), indent=2, allow_nan=False) + "\n")
    paths[1].write_text(markdown(frontier))
    plot(frontier, paths[2])
    scored = out / FRONTIER_SSIMULACRA2_PNG
    if measured_everywhere(frontier, "ssimulacra2"):
        paths.append(scored)
        plot(frontier, scored, ("ssimulacra2", "face SSIMULACRA2 (100 = identical)"))
    else:  # not a stale one from an earlier run in the same folder
        scored.unlink(missing_ok=True)
    grid = out / FRONTIER_PHOTOS_GRID_PNG
    if photo_rows:
        write_grid(photo_rows, grid)
        paths.append(grid)
    else:
        grid.unlink(missing_ok=True)
    return paths
