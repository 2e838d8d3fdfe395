"""Flags and helpers shared by the commands that run the attack (protect, bench, eval,
frontier)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from cloak_core.detect import DetectorConfig
from cloak_core.presets import DEFAULT_PRESET, PRESETS, AttackConfig, Setting, get_preset


def add_attack_flags(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--steps``, ``--models``, ``--device``."""
    parser.add_argument(
        "--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="attack preset"
    )
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument(
        "--models", type=model_list, help="comma-separated attack ensemble (default: the store's)"
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to compute"
    )


def unit_interval(text: str) -> float:
    """Parse a number within 0..1 (an argparse type)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {value}")
    return value


def add_detector_flags(parser: argparse.ArgumentParser) -> None:
    """``--face-threshold``."""
    parser.add_argument(
        "--face-threshold",
        type=unit_interval,
        default=DetectorConfig.face_threshold,
        metavar="S",
        help="protect every region the recall detector (RetinaFace) scores at least S, 0..1 "
        "(default %(default)s: just under its usual 0.9, since a perturbed non-face costs "
        "little and a missed face costs the photo); lower finds more, with more false alarms",
    )


def add_set_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--set NAME=VALUE`` (repeatable, into ``settings``): one attack setting of the
    preset changed; ``what`` says what that makes of the run."""
    parser.add_argument(
        "--set",
        dest="settings",
        type=setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one attack setting of the preset, e.g. perceptual=0.7, centroid=false or "
        f"momentum=none (repeatable): {what}",
    )


WORDS: dict[str, Setting] = {"true": True, "false": False, "none": None}


def setting(text: str) -> tuple[str, Setting]:
    """``NAME=VALUE`` as ``(name, value)``: a number, ``true``/``false`` for a switch or
    ``none`` (no cap, no bound); name and type are checked against the preset's fields
    when the run starts."""
    name, sep, value = text.partition("=")
    word = value.strip().lower()
    number: Setting
    if word in WORDS:
        number = WORDS[word]
    else:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected NAME=NUMBER, NAME=true|false or NAME=none, got {text!r}"
            ) from None
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), number


def add_scoring_flags(parser: argparse.ArgumentParser) -> None:
    """How ``eval`` and ``frontier`` split, protect and find the faces they score:
    ``--gallery-per-identity``, ``--probes-per-identity``, ``--attack-models``,
    ``--batch-size``, ``--landmarks``, ``--photos`` and the detector's ``--face-threshold``."""
    parser.add_argument(
        "--gallery-per-identity", type=positive_int, metavar="K", help="cap the gallery"
    )
    parser.add_argument(
        "--probes-per-identity", type=positive_int, metavar="P", help="cap the probes"
    )
    parser.add_argument(
        "--attack-models",
        type=model_list,
        metavar="A,B",
        help="one fixed attack ensemble instead of leave-one-out (evaluators sharing its "
        "weights are reported as white-box)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="photos per attack batch (default 32 on a CPU, 64 on a GPU); a person with more "
        "is split between batches, each batch pushed from their photos in the others too, as "
        "the daemon splits an upload larger than its --batch-size",
    )
    parser.add_argument(
        "--landmarks",
        default="auto",
        choices=["auto", "template", "detect", "detector"],
        help="template: images are 112x112 ArcFace-aligned crops; detect: find faces "
        "(images without one left out); detector: the attack protects only the faces the "
        "pipeline's detector finds, and a gallery image without one stays unprotected, as "
        "it would be uploaded (auto: template when every image is 112x112). Every report "
        "states the detector's recall",
    )
    parser.add_argument(
        "--photos",
        type=Path,
        metavar="DIR",
        help="also protect every photo of DIR whole, one upload each, written as protect "
        "writes it, and score each face against its own original, a face the detector "
        "misses (OpenCV's YuNet finds it) included as the leak it is: small faces and "
        "several to a photo, which aligned crops never show; each protected face's "
        "visibility is measured at display scale too (eval: the most visible in "
        "photos-grid.png)",
    )
    add_detector_flags(parser)


def detector_config(args: argparse.Namespace) -> DetectorConfig:
    """The detector settings the flags describe."""
    return DetectorConfig(face_threshold=args.face_threshold)


def positive_int(text: str) -> int:
    """Parse a count of at least 1 (an argparse type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_list(text: str) -> tuple[str, ...]:
    """Parse ``a,b,c`` into a tuple of model names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of model names")
    return names


def attack_config(args: argparse.Namespace) -> AttackConfig:
    """The preset named by the flags, with ``--steps``, ``--models`` and each ``--set``
    applied (a bad setting is a :class:`UsageError` before any model loads)."""
    config = get_preset(args.preset).with_overrides(steps=args.steps, models=args.models)
    return config.with_settings(getattr(args, "settings", ()))


def progress_bar(total: float, desc: str) -> tqdm:
    """A progress bar on a terminal's stderr; silent when stderr is not a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        disable=not sys.stderr.isatty(),
        leave=False,
        bar_format="{l_bar}{bar}| {n:.2f}/{total_fmt} [{elapsed}<{remaining}]",
    )
