"""The files an evaluation leaves in ``--out``: report.json, report.md, a plot and a grid.

- ``report.json``: every figure, the settings, the attack configuration, versions, seed,
  timings and per-image quality;
- ``report.md``: a table per condition (evaluator x clean / protected rank-1 and rank-5)
  and the quality statistics of each attack run;
- ``accuracy.png``: rank-1 accuracy per evaluator, clean and protected, one panel per
  condition;
- ``grid.png``: original gallery images beside their protected versions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cloak_core.evaluation.runner import EvalResult, GridRow

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "accuracy.png"
GRID_PNG = "grid.png"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.1f}%"


def _num(value: float, digits: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


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
        jobs = report.get("settings", {}).get("jobs", 1)
        lines.append(
            f"- attack: preset `{cfg['name']}` ({cfg['steps']} steps of {cfg['step_size']}, "
            f"LPIPS weight {cfg['lpips_weight']}); {report['mode']}; seed {report['seed']}; "
            f"device {report['device']}" + (f" ({jobs} processes)" if jobs > 1 else "")
        )
    else:
        lines.append("- no attack (clean accuracy only)")
    lines.append(
        f"- facecloak {report['facecloak']}, torch {report['versions'].get('torch')}, "
        f"total {report['timings'].get('total_seconds', 0):.0f} s"
    )
    lines.append("")
    evaluators = report["evaluators"]
    for cond, rows in report["results"].items():
        lines += [
            f"## Condition `{cond}`",
            "",
            "| evaluator | attacked by | clean rank-1 | protected rank-1 "
            "| clean rank-5 | protected rank-5 |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in rows.items():
            ev = evaluators[name]
            kind = "white-box" if ev["white_box"] else "black-box"
            tag = f"{name}{' (independent)' if ev['independent'] else ''}"
            by = (",".join(ev["ensemble"]) or "–") if cfg else "–"
            prot = r["protected"] or {}
            lines.append(
                f"| {tag} | {by}{f' ({kind})' if cfg else ''} | {_pct(r['clean']['rank1'])} | "
                f"{_pct(prot.get('rank1'))} | {_pct(r['clean']['rank5'])} | "
                f"{_pct(prot.get('rank5'))} |"
            )
        lines.append("")
    if report["attack"]:
        lines += [
            "## Image quality of the protected gallery images",
            "",
            "| ensemble | images | s/image | LPIPS mean | median | max | LPIPS-VGG mean | max "
            "| PSNR mean (dB) | min | SSIM mean | min |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for g in report["attack"]:
            q = g["quality"]
            lines.append(
                f"| {','.join(g['ensemble'])} | {g['images']} | "
                f"{_num(g['seconds_per_image'], 2)} | {_num(q['lpips']['mean'], 4)} | "
                f"{_num(q['lpips']['median'], 4)} | {_num(q['lpips']['max'], 4)} | "
                f"{_num(q['lpips_vgg']['mean'], 4)} | {_num(q['lpips_vgg']['max'], 4)} | "
                f"{_num(q['psnr']['mean'], 2)} | {_num(q['psnr']['min'], 2)} | "
                f"{_num(q['ssim']['mean'], 4)} | {_num(q['ssim']['min'], 4)} |"
            )
        lines.append("")
    fallbacks = {n: e.get("fallbacks", 0) for n, e in evaluators.items() if e.get("fallbacks")}
    if fallbacks:
        lines.append(
            "Detector fallbacks (no face found by the pipeline's own detector; the image was "
            "taken as a tight aligned crop): "
            + ", ".join(f"{n}: {k}" for n, k in fallbacks.items())
        )
        lines.append("")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


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


def grid(rows: Sequence[GridRow], path: Path, *, amplify: float = 10.0) -> None:
    """Originals beside protected versions (one row per identity), plus the amplified change.

    The last column shows ``|protected - original| * amplify`` of the first ensemble.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = list(rows[0].protected)
    cols = 2 + len(labels)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.8 * cols, 1.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        first = row.protected[labels[0]]
        diff = np.abs(first.astype(np.int16) - row.original.astype(np.int16)) * amplify
        panels = [row.original, *row.protected.values(), np.clip(diff, 0, 255).astype(np.uint8)]
        titles = ["original", *(f"by {lab}" for lab in labels), f"|diff| x{amplify:g}"]
        for c, (img, title) in enumerate(zip(panels, titles, strict=True)):
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(row.identity.replace("_", " "), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no inf/NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_outputs(result: EvalResult, out: Path) -> list[Path]:
    """Write every output file of ``result`` into the folder ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / REPORT_JSON
    path.write_text(json.dumps(_finite(result.report), indent=2, allow_nan=False) + "\n")
    written.append(path)
    path = out / REPORT_MD
    path.write_text(markdown(result.report))
    written.append(path)
    path = out / PLOT_PNG
    plot(result.report, path)
    written.append(path)
    if result.grid:
        path = out / GRID_PNG
        grid(result.grid, path)
        written.append(path)
    return written
