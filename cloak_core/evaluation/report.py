"""The files an evaluation leaves in ``--out``: report.json, report.md, a plot and a grid.

- ``report.json``: every figure, the settings, the attack configuration, versions, seed,
  timings and each protected image's visibility panel;
- ``report.md``: a table per condition (evaluator x clean / protected rank-1 and rank-5,
  and how many protected faces still match their own originals),
  the visibility panel of each attack run beside the JPEG calibration rows, and the most
  visible images;
- ``accuracy.png``: rank-1 accuracy per evaluator, clean and protected, one panel per
  condition;
- ``grid.png``: face regions at display scale, original | protected | |difference| x 10
  per ensemble;
- ``photos-grid.png`` (with ``--photos``): the whole photos' most visible protected faces,
  the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cloak_core.evaluation.runner import EvalResult
from cloak_core.visibility import write_grid

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "accuracy.png"
GRID_PNG = "grid.png"
PHOTOS_GRID_PNG = "photos-grid.png"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f}%"


def _num(value: float, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _setting_text(value: object) -> str:
    """A ``--set`` value as the run's configuration took it, written as it is typed:
    ``true``/``false`` for a switch, ``none`` for no cap, a number in its shortest form."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown(report: dict) -> str:
    """``report.md``'s text for a report dict (as :class:`EvalResult` holds it)."""
    d = report["dataset"]
    lines = [
        "# FaceCloak evaluation",
        "",
        f"- dataset: `{d['path']}`: {len(d['protected_identities'])} protected identities, "
        f"{len(d['distractor_identities'])} distractor identities; "
        f"{d['gallery_images']} gallery images ({d['protected_gallery_images']} protected), "
        f"{d['probe_images']} scored probes; landmarks: {report['protocol']['landmarks']}",
        f"- protocol: probes every {report['protocol']['probe_every']}th image, "
        f"{report['protocol']['gallery_protection']} gallery protection, "
        f"{report['protocol']['ranking']}",
    ]
    cfg = report.get("attack_config")
    if cfg:
        run = report.get("settings", {})
        jobs = run.get("jobs", 1)
        settings = ", ".join(
            f"{name}={_setting_text(cfg.get(name, value))}"
            for name, value in run.get("overrides") or []
        )
        lines.append(
            f"- attack: preset `{cfg['name']}` ({cfg['steps']} steps of {cfg['step_size']}, "
            f"LPIPS weight {cfg['lpips_weight']}"
            + (f"; with --set {settings}" if settings else "")
            + f"); {report['mode']}; seed {report['seed']}; "
            f"device {report['device']}" + (f" ({jobs} processes)" if jobs > 1 else "")
        )
        if cfg.get("centroid"):
            mix = cfg.get("centroid_mix", 1.0)
            point = (
                "their shared identity"
                if mix == 1.0
                else f"{_setting_text(mix)} of the way from their own embedding to their "
                "shared identity"
            )
            size = run.get("batch_size")
            lines.append(
                "- each attack batch was protected as one collection, a person's gallery "
                f"photos kept in one batch where they fit: their faces were pushed from {point} "
                "(`centroid`, `centroid_mix`); "
                "a photo uploaded alone gets only its own push (`--set centroid=0` measures that)"
                + (
                    f"; batches of at most {size} photos (`--batch-size`), a person with more "
                    "split between batches, each batch's shared identity counting their faces in "
                    "the other batches as the daemon's parts of a split upload count the rest"
                    if size
                    else ""
                )
            )
    else:
        lines.append("- no attack (clean accuracy only)")
    rc = report.get("detector_recall")
    if rc:
        unprotected = len(d.get("unprotected_gallery_images", []))
        lines.append(
            f"- detector recall: {rc['found']}/{rc['images']} images "
            f"({_pct(rc['recall'])}), gallery {rc['gallery_found']}/{rc['gallery_images']} "
            f"({_pct(rc['gallery_recall'])}); largest face found by "
            + (", ".join(f"{k} {v}" for k, v in rc["largest_face_by_detector"].items()) or "none")
            + (
                f"; {unprotected} protected identities' gallery images left unprotected "
                "(no face found)"
                if report["protocol"]["landmarks"] == "detector"
                else ""
            )
        )
    # Every library version: re-encoding (Pillow) and the independent pipelines (dlib, cv2)
    # move the figures too, so a rerun on a fresh install can be told from a changed attack.
    software = ", ".join(
        f"{name} {version}"
        for name, version in report["versions"].items()
        if name not in ("facecloak", "platform") and version is not None
    )
    lines.append(
        f"- facecloak {report['facecloak']} ({software}), "
        f"total {report['timings'].get('total_seconds', 0):.0f} s"
    )
    lines.append("")
    evaluators = report["evaluators"]
    if report["attack"]:
        lines += [
            "Matches its own original: the share of the protected identities' gallery images "
            "that the evaluator, by its own same-person rule, still matches to the very photo "
            "each was made from (an image the detector found no face in went up unprotected "
            "and counts as matched), and the mean cosine between the two: per face, and the "
            "worst case for the person, a recogniser that holds the original itself.",
            "",
        ]
    for cond, rows in report["results"].items():
        lines += [
            f"## Condition `{cond}`",
            "",
            "| evaluator | attacked by | clean rank-1 | protected rank-1 "
            "| clean rank-5 | protected rank-5 | matches its own original | cosine to it |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in rows.items():
            ev = evaluators[name]
            kind = "white-box" if ev["white_box"] else "black-box"
            tag = f"{name}{' (independent)' if ev['independent'] else ''}"
            by = (",".join(ev["ensemble"]) or "–") if cfg else "–"
            prot = r["protected"] or {}
            own = r.get("own_original") or {}
            cosine = _num(own["cosine"], 3) if own else "–"
            lines.append(
                f"| {tag} | {by}{f' ({kind})' if cfg else ''} | {_pct(r['clean']['rank1'])} | "
                f"{_pct(prot.get('rank1'))} | {_pct(r['clean']['rank5'])} | "
                f"{_pct(prot.get('rank5'))} | {_pct(own.get('matched'))} | {cosine} |"
            )
        lines.append("")
    if report.get("photos"):
        lines += photos_markdown(report)
    if report["attack"]:
        lines += visibility_markdown(report)
    fallbacks = {n: e.get("fallbacks", 0) for n, e in evaluators.items() if e.get("fallbacks")}
    if fallbacks:
        lines.append(
            "Detector fallbacks (no face found by the pipeline's own detector; the image was "
            "taken as a tight aligned crop): "
            + ", ".join(f"{n}: {k}" for n, k in fallbacks.items())
        )
        lines.append("")
    if rc and rc["missed"]:
        lines.append("Faces the detector missed: " + ", ".join(f"`{m}`" for m in rc["missed"]))
        lines.append("")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def photos_markdown(report: dict) -> list[str]:
    """The whole photos' section: per condition, each evaluator's share of faces still
    matched to the original photo's face, then every face's cosines."""
    ph = report["photos"]
    evaluators = report["evaluators"]
    conditions = list(ph["results"])
    missed = ", ".join(f"`{Path(m['path']).name}` ({m['size']} px)" for m in ph["missed"])
    seconds = ", ".join(f"{k}: {v:.2f}" for k, v in ph["seconds_per_face"].items() if v is not None)
    lines = [
        f"## Whole photos (`{ph['folder']}`)",
        "",
        f"- {ph['photos']} photos, {ph['faces']} faces of {min(ph['face_sizes'])}-"
        f"{max(ph['face_sizes'])} px; {ph['protected_faces']} found by the pipeline's "
        "detector and protected"
        + (f", missed (YuNet finds them; uploaded unprotected): {missed}" if missed else ""),
        "- each photo protected alone, as one upload, and written as `protect` writes it (a "
        "JPEG stays a JPEG at its own quality); each face cut out with context from the "
        "written photo and from the original, both after the condition, and compared",
        f"- attack seconds per protected face: {seconds}",
        "",
        "| evaluator | attacked by | "
        + " | ".join(f"matched, `{c}` | cosine, `{c}`" for c in conditions)
        + " |",
        "| --- | --- | " + " | ".join("---: | ---:" for _ in conditions) + " |",
    ]
    for name in ph["results"][conditions[0]]:
        ev = evaluators[name]
        kind = "white-box" if ev["white_box"] else "black-box"
        tag = f"{name}{' (independent)' if ev['independent'] else ''}"
        cells = []
        for c in conditions:
            r = ph["results"][c][name]
            cells.append(f"{_pct(r['matched'])} | {_num(r['cosine'], 3)}")
        lines.append(
            f"| {tag} | {','.join(ev['ensemble']) or '–'} ({kind}) | " + " | ".join(cells) + " |"
        )
    names = list(ph["results"][conditions[0]])
    ensembles = list(ph.get("visibility") or {})
    if ensembles:
        lines += [
            "",
            "Visibility of the protected faces of the written photos, on the face region at "
            "display scale, as the dataset's faces are measured (each cell mean / median / "
            f"worst; the grid `{PHOTOS_GRID_PNG}` shows the most visible):",
            "",
        ]
        per_face = ph["seconds_per_face"]
        rows = [
            (f"protected by {e}", ph["protected_faces"], per_face.get(e), {"visibility": seen})
            for e, seen in ph["visibility"].items()
        ]
        lines += _panel_table(rows, ph.get("visibility_calibration") or {}, "s/face")
    lines += [
        "",
        "Each face's cosine to its original, "
        + " / ".join(f"`{c}`" for c in conditions)
        + " (`*`: still the same person by that evaluator's rule)"
        + ("; its S-CIELAB mean under each ensemble, in the order above" if ensembles else "")
        + ":",
        "",
        "| photo | face (px) | protected | "
        + " | ".join(names)
        + (" | S-CIELAB" if ensembles else "")
        + " |",
        "| --- | ---: | --- | "
        + " | ".join("---:" for _ in names)
        + (" | ---:" if ensembles else "")
        + " |",
    ]
    for face in ph["per_face"]:
        cells = [
            " / ".join(
                f"{face['cosine'][c][n]:.2f}{'*' if face['matched'][c][n] else ''}"
                for c in conditions
            )
            for n in names
        ]
        if ensembles:
            seen = face.get("visibility")
            cells.append(
                "-" if not seen else " / ".join(_num(seen[e]["scielab_mean"], 2) for e in ensembles)
            )
        lines.append(
            f"| `{Path(face['path']).name}` | {face['size']} | "
            f"{'yes' if face['protected'] else 'missed'} | " + " | ".join(cells) + " |"
        )
    fallbacks = {n: k for n, k in ph["fallbacks"].items() if k}
    if fallbacks:
        lines += [
            "",
            "Cuts where an independent pipeline's own detector found no face (then taken as "
            "an aligned crop): " + ", ".join(f"{n}: {k}" for n, k in fallbacks.items()),
        ]
    return [*lines, ""]


# Panel columns: metric, heading, digits.
_PANEL = (
    ("scielab_mean", "S-CIELAB mean", 2),
    ("scielab_p95", "S-CIELAB p95", 2),
    ("ssimulacra2", "SSIMULACRA2 (90 unseen)", 1),
    ("de2000_mean", "CIEDE2000 mean", 2),
    ("de2000_p95", "CIEDE2000 p95", 2),
    ("psnr", "PSNR (dB)", 2),
    ("ssim", "SSIM", 4),
    ("dists", "DISTS", 4),
    ("lpips_vgg", "LPIPS-VGG", 4),
    ("lpips_alex", "LPIPS-Alex (the attack's own)", 4),
)


def _panel_table(
    rows: Sequence[tuple[str, int, float | None, dict]], calibration: dict, per: str
) -> list[str]:
    """A visibility table: a row per ``(label, n, seconds, summary)`` (``summary``'s
    ``"visibility"``: :func:`~cloak_core.visibility.summarise`), then one per JPEG
    calibration summary, each panel metric's cell mean / median / worst; ``per`` heads
    the seconds column."""
    lines = [
        f"| faces of | n | {per} | " + " | ".join(h for _, h, _ in _PANEL) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in _PANEL) + " |",
    ]
    rows = [
        *rows,
        *(
            (f"{name} re-encode (calibration)", None, None, {"visibility": v})
            for name, v in calibration.items()
        ),
    ]
    for label, n, sec, g in rows:
        v = g["visibility"]
        cells = [
            "{} / {} / {}".format(
                *(_num(v.get(key, {}).get(k), digits) for k in ("mean", "median", "worst"))
            )
            for key, _, digits in _PANEL
        ]
        lines.append(
            f"| {label} | {'' if n is None else n} | {'' if sec is None else _num(sec, 2)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def visibility_markdown(report: dict) -> list[str]:
    """The visibility section: per ensemble and per JPEG calibration row, each panel
    metric's mean / median / worst on the faces, then the most visible images."""
    lines = [
        "## Visibility of the protected faces",
        "",
        "Face region at display scale; each cell mean / median / worst. The JPEG rows are the "
        "same original images only re-encoded, for scale: q90 looks unchanged, q75 barely "
        "changed. S-CIELAB is CIEDE2000 on both faces as the eye resolves them (a screen of "
        "120 pixels per inch at 50 cm): JPEG's fine grain counts little, patches and creases "
        "in full. LPIPS-Alex is what the attack optimises against, not a verdict.",
        "",
    ]
    rows = [
        (f"protected by {','.join(g['ensemble'])}", g["images"], g["seconds_per_image"], g)
        for g in report["attack"]
    ]
    lines += _panel_table(rows, report.get("visibility_calibration") or {}, "s/image")
    lines += ["", "Most visible protected images (by S-CIELAB mean):", ""]
    for g in report["attack"]:
        for w in g.get("worst", []):
            lines.append(
                f"- {','.join(g['ensemble'])}: `{Path(w['path']).parent.name}/"
                f"{Path(w['path']).name}`: S-CIELAB {_num(w.get('scielab_mean'), 2)}, "
                f"CIEDE2000 {_num(w['de2000_mean'], 2)} "
                f"(p95 {_num(w['de2000_p95'], 2)}), PSNR {_num(w['psnr'], 2)} dB, "
                f"SSIM {_num(w['ssim'], 4)}, DISTS {_num(w['dists'], 4)}"
            )
    lines.append("")
    return lines


def plot(report: dict, path: Path) -> None:
    """Bar chart of rank-1 accuracy, clean and protected, per evaluator and condition (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    conditions = list(report["results"])
    evaluators = list(report["evaluators"])
    fig, axes = plt.subplots(
        1, len(conditions), figsize=(3.2 * len(conditions) + 1, 3.8), sharey=True, squeeze=False
    )
    x = np.arange(len(evaluators))
    for ax, cond in zip(axes[0], conditions, strict=True):
        rows = report["results"][cond]
        clean = [100 * rows[e]["clean"]["rank1"] if e in rows else 0 for e in evaluators]
        prot = [
            100 * rows[e]["protected"]["rank1"] if e in rows and rows[e]["protected"] else 0
            for e in evaluators
        ]
        ax.bar(x - 0.2, clean, 0.4, label="clean", color="#9aa5b1")
        ax.bar(x + 0.2, prot, 0.4, label="protected", color="#c0392b")
        ax.set_xticks(x, evaluators, rotation=45, ha="right", fontsize=8)
        ax.set_title(cond, fontsize=10)
        ax.set_ylim(0, 100)
        ax.axhline(10, color="black", lw=0.6, ls=":")
    axes[0][0].set_ylabel("rank-1 accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def json_ready(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_outputs(result: EvalResult, out: Path) -> list[Path]:
    """Write every output file of ``result`` into the folder ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / REPORT_JSON
    path.write_text(json.dumps(json_ready(result.report), indent=2, allow_nan=False) + "\n")
    written.append(path)
    path = out / REPORT_MD
    path.write_text(markdown(result.report))
    written.append(path)
    path = out / PLOT_PNG
    plot(result.report, path)
    written.append(path)
    if result.grid:
        path = out / GRID_PNG
        write_grid(result.grid, path, height=result.grid_height)
        written.append(path)
    if result.photo_grid:
        path = out / PHOTOS_GRID_PNG
        write_grid(result.photo_grid, path)
        written.append(path)
    return written
