"""``facecloak frontier``: protection against visibility, one curve per preset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cloak_core.commands.common import (
    add_scoring_flags,
    add_set_flag,
    detector_config,
    model_list,
    positive_int,
)
from cloak_core.errors import UsageError
from cloak_core.evaluation.conditions import parse_condition
from cloak_core.evaluation.frontier import (
    DEFAULT_FACTORS,
    DEFAULT_PRESETS,
    QUICK_GALLERY,
    QUICK_IDENTITIES,
    SWEEPS,
    FrontierSettings,
)
from cloak_core.presets import PRESETS


def _presets(text: str) -> tuple[tuple[str, tuple[float, ...] | None], ...]:
    """``balanced,strong,paper@1``: preset names, each optionally with factors of its own
    (``@F/G``)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, own = item.partition("@")
        if name not in PRESETS:
            raise argparse.ArgumentTypeError(
                f"unknown preset {name!r}; presets: {', '.join(PRESETS)}"
            )
        out.append((name, _factors(own.replace("/", ",")) if own else None))
    if not out:
        raise argparse.ArgumentTypeError("name at least one preset")
    return tuple(out)


def _runs(text: str) -> tuple[tuple[str, Path], ...]:
    """``before=a/frontier.json,after=b/frontier.json``: labelled frontier files."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        label, sep, path = item.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise argparse.ArgumentTypeError(f"{item!r}: write LABEL=PATH/frontier.json")
        out.append((label.strip(), Path(path.strip())))
    if not out:
        raise argparse.ArgumentTypeError("name at least one LABEL=PATH")
    return tuple(out)


def _factors(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated numbers, e.g. 0.5,1,2") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("factors must be positive")
    return values


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "frontier",
        help="plot black-box protection against face visibility for presets",
        description="For each preset, scale one strength setting by each factor; evaluate "
        "every point leave-one-out (every evaluator, both independent pipelines included, "
        "scored on images protected without its weights) or with one fixed attack ensemble "
        "(--attack-models), and plot protected rank-1 against the faces' S-CIELAB, with JPEG "
        "q90/q75 re-encoding as calibration points. --landmarks detector scores the faces the "
        "pipeline's detector finds, as uploads are protected. Writes "
        "frontier.json, frontier.md and frontier.png; attacked images are kept in "
        "OUT/attack-cache and reused.",
    )
    p.add_argument(
        "--dataset", type=Path, metavar="DIR", help="dataset folder (needed unless --combine)"
    )
    p.add_argument(
        "--combine",
        type=_runs,
        metavar="LABEL=JSON,...",
        help="attack nothing: draw earlier runs' frontier.json files in one table and plot, "
        "each preset named by its run's label (e.g. before=old/frontier.json,"
        "after=new/frontier.json); the runs must share split, conditions and evaluators",
    )
    p.add_argument(
        "--presets",
        type=_presets,
        default=tuple((name, None) for name in DEFAULT_PRESETS),
        metavar="A,B@F/G",
        help=f"presets to sweep (default: {','.join(DEFAULT_PRESETS)}); PRESET@F/G sweeps "
        "that preset by its own factors, e.g. paper@1 for the published setting alone",
    )
    p.add_argument(
        "--sweep",
        default="step_size",
        choices=SWEEPS,
        help="the setting scaled (default step_size)",
    )
    p.add_argument(
        "--factors",
        type=_factors,
        default=DEFAULT_FACTORS,
        metavar="F,G",
        help="multiples of each preset's own value (default: 0.5,1,2)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help=f"the first {QUICK_IDENTITIES} identities, {QUICK_GALLERY} protected faces each "
        "(default)",
    )
    mode.add_argument(
        "--full", dest="mode", action="store_const", const="full", help="the whole dataset"
    )
    p.set_defaults(mode="quick")
    p.add_argument(
        "--conditions",
        default="png,scale50-jpeg85",
        metavar="C,D",
        help="how galleries reach the recogniser (default: png,scale50-jpeg85)",
    )
    add_set_flag(p, "changed on every point (a technique turned off, say)")
    p.add_argument("--eval-models", type=model_list, metavar="A,B", help="evaluators")
    add_scoring_flags(p)
    p.add_argument("--out", type=Path, default=Path("frontier-out"), metavar="DIR", help="outputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack's start noise")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute"
    )
    p.add_argument(
        "--jobs", type=positive_int, default=1, metavar="N", help="attack in N processes (CPU)"
    )
    return p


_FRONTIER_KEYS = {"settings", "evaluators", "scored", "points", "calibration"}


def _combine(args: argparse.Namespace) -> int:
    import json

    from cloak_core.evaluation.frontier import FRONTIER_MD, combine, write_outputs

    runs = []
    for label, path in args.combine:
        try:
            runs.append((label, json.loads(path.read_text())))
        except OSError as exc:
            raise UsageError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise UsageError(f"{label}: {path} is not a frontier.json: {exc}") from None
        data = runs[-1][1]
        missing = sorted(_FRONTIER_KEYS - set(data if isinstance(data, dict) else ()))
        if missing:
            raise UsageError(f"{label}: {path} is not a frontier.json (no {', '.join(missing)})")
    written = write_outputs(combine(runs), args.out)
    print((args.out / FRONTIER_MD).read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from cloak_core.evaluation.frontier import FRONTIER_MD, Frontier, write_outputs
    from cloak_core.store import ModelStore

    if args.combine:
        return _combine(args)
    if args.dataset is None:
        raise UsageError("name the dataset (--dataset DIR), or runs to draw (--combine)")

    conditions = tuple(parse_condition(c.strip()) for c in args.conditions.split(",") if c.strip())
    settings = FrontierSettings(
        dataset=args.dataset,
        out=args.out,
        presets=tuple(name for name, _ in args.presets),
        sweep=args.sweep,
        factors=args.factors,
        only=tuple((name, own) for name, own in args.presets if own is not None),
        mode=args.mode,
        conditions=conditions,
        eval_models=args.eval_models,
        seed=args.seed,
        device=args.device,
        jobs=args.jobs,
        gallery_per_identity=args.gallery_per_identity,
        probes_per_identity=args.probes_per_identity,
        landmarks=args.landmarks,
        attack_models=args.attack_models,
        batch_size=args.batch_size,
        overrides=tuple(args.settings),
        photos=args.photos,
    )
    runner = Frontier(
        settings,
        ModelStore.from_env(),
        progress=sys.stderr.isatty(),
        detector_config=detector_config(args),
    )
    frontier = runner.run()
    written = write_outputs(frontier, settings.out, runner.photo_grid)
    print((settings.out / FRONTIER_MD).read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
