"""``facecloak eval``: measure protection the way the LowKey paper does, against unseen models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cloak_core.commands.common import (
    add_scoring_flags,
    add_set_flag,
    detector_config,
    model_list,
    positive_int,
)
from cloak_core.evaluation.conditions import DEFAULT_CONDITIONS, conditions_from_flags
from cloak_core.presets import DEFAULT_PRESET, PRESETS

if TYPE_CHECKING:  # the runner pulls in torch: imported only when the command runs
    from cloak_core.evaluation.runner import EvalSettings


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="measure identification accuracy on clean and protected galleries",
        description="Split each identity of DATASET (one folder per identity) into probes "
        "(every tenth image) and gallery (the rest); protect the galleries of the first N "
        "identities (the others stay clean as distractors); identify every probe by its "
        "nearest gallery embeddings and report rank-1/rank-5 accuracy, clean and protected, "
        "per evaluator and condition, with the visibility panel of the protected faces "
        "(CIEDE2000, PSNR, SSIM, DISTS, LPIPS; JPEG q90/q75 for scale) and a face grid. By "
        "default each evaluator is scored on images protected by an ensemble without its "
        "weights (leave-one-out, black-box).",
    )
    p.add_argument("--dataset", required=True, type=Path, metavar="DIR", help="dataset folder")
    p.add_argument(
        "--identities",
        type=positive_int,
        metavar="N",
        help="protect and score the first N identities (default: all)",
    )
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="attack preset")
    p.add_argument("--steps", type=positive_int, help="override the preset's number of steps")
    add_set_flag(p, "a frontier point evaluated in full")
    p.add_argument(
        "--eval-models",
        type=model_list,
        metavar="A,B",
        help="evaluators: registry model names, dlib-bin, opencv-sface (default: every "
        "registry model whose weights are here, and both pipelines)",
    )
    p.add_argument(
        "--conditions",
        metavar="C,D",
        help=f"png, jpegQ, scaleP-jpegQ, resizeN-jpegQ (default: {','.join(DEFAULT_CONDITIONS)})",
    )
    p.add_argument("--jpeg", type=int, metavar="Q", help="add the condition jpegQ")
    p.add_argument(
        "--resize", type=positive_int, metavar="PX", help="add resizePX-jpegQ (Q: --jpeg or 85)"
    )
    add_scoring_flags(p)
    p.add_argument(
        "--joint",
        action="store_true",
        help="protect all protected identities' galleries at once (default: one at a time)",
    )
    p.add_argument("--out", type=Path, default=Path("eval-out"), metavar="DIR", help="outputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack's start noise")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute"
    )
    p.add_argument("--no-attack", action="store_true", help="clean accuracy only")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        metavar="N",
        help="attack in N worker processes on a CPU, each with 1/N of the cores (default 1)",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="attack again instead of reusing the attacked images kept in OUT/attack-cache",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The :class:`EvalSettings` the flags describe."""
    from cloak_core.evaluation.runner import EvalSettings

    return EvalSettings(
        dataset=args.dataset,
        out=args.out,
        identities=args.identities,
        gallery_per_identity=args.gallery_per_identity,
        probes_per_identity=args.probes_per_identity,
        preset=args.preset,
        steps=args.steps,
        overrides=tuple(args.settings),
        attack_models=args.attack_models,
        eval_models=args.eval_models,
        conditions=conditions_from_flags(args.conditions, args.jpeg, args.resize),
        seed=args.seed,
        device=args.device,
        attack=not args.no_attack,
        joint=args.joint,
        landmarks=args.landmarks,
        resume=not args.fresh,
        jobs=args.jobs,
        batch_size=args.batch_size,
        photos=args.photos,
    )


def run(args: argparse.Namespace) -> int:
    from cloak_core.evaluation.report import REPORT_MD, write_outputs
    from cloak_core.store import ModelStore

    settings = settings_from_args(args)
    store = ModelStore.from_env()
    from cloak_core.evaluation.runner import Evaluation

    result = Evaluation(
        settings, store, progress=sys.stderr.isatty(), detector_config=detector_config(args)
    ).run()
    written = write_outputs(result, settings.out)
    print((settings.out / REPORT_MD).read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
