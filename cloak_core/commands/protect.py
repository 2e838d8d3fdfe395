"""``facecloak protect``: protect the faces in image files."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloak_core.commands.common import (
    add_attack_flags,
    add_detector_flags,
    add_set_flag,
    attack_config,
    detector_config,
    positive_int,
    progress_bar,
)
from cloak_core.errors import FaceCloakError, UsageError

if TYPE_CHECKING:  # the pipeline pulls in torch: imported only when the command runs
    from cloak_core.pipeline import Protector, ProtectResult
    from cloak_core.visibility import GridRow, VisibilityMeter

    Outcome = ProtectResult | FaceCloakError | OSError

_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
# Photos decoded and attacked at a time with --together (a 12 MP photo holds about 36 MB
# decoded, and the attack's regions a few MB per face).
TOGETHER_BATCH = 8
# The collection label of --together's photos, split between batches.
_THE_SET = "together"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "protect",
        help="protect the faces in image files",
        description="Add a LowKey perturbation to every face of each image. Without -o or "
        "--out-dir, IMAGE.jpg is written beside the input as IMAGE.cloaked.jpg.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="OUT", help="output file (one input only)")
    out.add_argument("--out-dir", metavar="DIR", help="folder for the outputs")
    add_attack_flags(p)
    add_set_flag(p, "the photos are protected with the preset so changed")
    add_detector_flags(p)
    p.add_argument(
        "--format", default="same", choices=["same", "png", "jpeg", "webp"], help="output format"
    )
    p.add_argument("--quality", type=int, help="JPEG/WebP quality 1..100 (default: the input's)")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per image on stdout, with each face's similarities and "
        "visibility panel (S-CIELAB, CIEDE2000, PSNR, SSIM, DISTS on the face region)",
    )
    p.add_argument(
        "--hold-out",
        action="store_true",
        help="with three or more models: leave one out of each face's attack in turn and "
        "report, with --json, how that unseen model sees the face (an honest check that "
        "a model the perturbation was not made with no longer matches it)",
    )
    p.add_argument(
        "--verify",
        metavar="MODELS",
        help="with --json: also report how these recognisers, kept out of the attack, see "
        "each protected face (comma-separated registry names, or 'unseen' for every model "
        "here outside the ensemble): a check with models the perturbation was not made "
        "with, as a scraper's would be",
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="the inputs are one person's photos: push the faces that show the same person "
        "in several of them away from their shared identity (what a new photo of that "
        "person would match), not only each from itself",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help=f"with --together: photos decoded and attacked at a time (default "
        f"{TOGETHER_BATCH}); each batch is written as soon as it is done, and every batch is "
        "pushed from the shared identity of all the inputs, seen in a first, lighter pass",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="with --json: also the panel of each face after plain JPEG q90 and q75 "
        "re-encoding of the input, for scale (q90 looks unchanged)",
    )
    p.add_argument(
        "--grid",
        metavar="PNG",
        type=Path,
        help="also write a PNG of every face at display scale: original | protected | "
        "|difference| x 10",
    )
    return p


def output_path(args: argparse.Namespace, source: Path, result: ProtectResult) -> Path:
    """Where the protected copy of ``source`` goes."""
    if args.output:
        return Path(args.output)
    suffix = source.suffix if args.format == "same" and source.suffix else _SUFFIX[result.format]
    name = f"{source.stem}.cloaked{suffix}"
    return Path(args.out_dir) / name if args.out_dir else source.with_name(name)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_line(
    source: Path, target: Path, result: ProtectResult, calibration: dict | None = None
) -> str:
    """The ``--json`` record of DESIGN.md for one image; ``calibration`` maps ``jpeg90`` /
    ``jpeg75`` to one visibility panel per face (``--calibrate``)."""
    record = {
        "input": str(source),
        "output": str(target),
        "faces": result.faces,
        "seconds": round(result.seconds, 3),
        "lpips": result.lpips,
        "lpips_faces": result.lpips_faces,
        "width": result.width,
        "height": result.height,
        "format": result.format,
        "models": {name: [asdict(r) for r in reports] for name, reports in result.models.items()},
        "visibility": [v.as_dict() for v in result.visibility],
    }
    if result.unseen:
        # Recognisers outside the attack ensemble (--verify): black-box checks of each face.
        record["unseen"] = {
            name: [asdict(r) for r in reports] for name, reports in result.unseen.items()
        }
    if any(result.held_out):
        # Per face: the model left out of its attack, and how that model sees the face.
        record["held_out"] = [
            None
            if name is None or name not in result.models
            else {"model": name, **asdict(result.models[name][i])}
            for i, name in enumerate(result.held_out)
        ]
    if calibration is not None:
        record["calibration"] = {
            name: [v.as_dict() for v in panels] for name, panels in calibration.items()
        }
    return json.dumps(record)


def calibrate(meter: VisibilityMeter, data: bytes, result: ProtectResult) -> dict:
    """The panel of each face of the input after plain JPEG re-encoding (q90, q75)."""
    from cloak_core.imageio import decode_image
    from cloak_core.visibility import calibration, face_region

    original = decode_image(data, max_pixels=max(50_000_000, result.width * result.height))
    pixels = original.pixels
    regions = [face_region(pixels.shape[:2], box) for box in result.boxes]
    return calibration(meter, [pixels] * len(regions), regions)


def grid_rows(source: Path, data: bytes, result: ProtectResult) -> list[GridRow]:
    """One grid row per face of ``result``: the face region of the input and the output."""
    from cloak_core.imageio import decode_image
    from cloak_core.visibility import GridRow, display_pair, face_region

    limit = max(50_000_000, result.width * result.height)
    original = decode_image(data, max_pixels=limit).pixels
    protected = decode_image(result.data, max_pixels=limit).pixels
    rows = []
    for k, box in enumerate(result.boxes):
        a, b = display_pair(original, protected, face_region(original.shape[:2], box))
        rows.append(GridRow(f"{source.name} face {k + 1}", a, {"protected": b}))
    return rows


def verify_models(spec: str | None) -> list[str] | str:
    """What ``--verify`` names: a comma-separated list of models, or ``unseen`` for every
    registry model here that the attack ensemble leaves out (the protector resolves it)."""
    from cloak_core.pipeline import UNSEEN

    if not spec:
        return []
    if spec.strip() == UNSEEN:
        return UNSEEN
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UsageError(f"--verify needs model names, or {UNSEEN!r}")
    return names


def run(args: argparse.Namespace) -> int:
    if args.output and len(args.inputs) > 1:
        raise UsageError("-o/--output takes one input; use --out-dir for several")
    if args.calibrate and not args.json:
        raise UsageError("--calibrate adds to the --json records: give --json too")
    if args.verify and not args.json:
        raise UsageError("--verify adds to the --json records: give --json too")
    if args.batch_size is not None and not args.together:
        raise UsageError("--batch-size sets how many photos --together attacks at a time")
    if args.quality is not None and not 1 <= args.quality <= 100:
        raise UsageError(f"--quality must be within 1..100, got {args.quality}")
    from cloak_core.pipeline import Protector
    from cloak_core.store import ModelStore

    config = attack_config(args)
    if args.hold_out:
        config = replace(config, hold_out=True)
    protector = Protector(
        config,
        store=ModelStore.from_env(),
        device=args.device,
        detector_config=detector_config(args),
        verify=verify_models(args.verify),
    )
    if args.verify and not protector.verify_names:
        raise UsageError(
            "--verify unseen: no recogniser outside the attack ensemble is here "
            "(`facecloak models fetch` gets FaceNet and MobileFaceNet-128)"
        )
    failed = 0
    rows: list[GridRow] = []
    bar = progress_bar(len(args.inputs), "protecting")
    with protector, bar:
        outcomes = _protect_together if args.together else _protect_each
        for i, source, data, outcome in outcomes(protector, args, bar):
            if isinstance(outcome, OSError):
                failed += 1
                print(f"facecloak: {source}: cannot read: {outcome.strerror}", file=sys.stderr)
                continue
            try:
                if isinstance(outcome, FaceCloakError):
                    raise outcome
                result = outcome
                target = output_path(args, source, result)
                write_atomic(target, result.data)
                if args.grid:
                    rows += grid_rows(source, data, result)
            except FaceCloakError as exc:
                failed += 1
                print(f"facecloak: {source}: {exc}", file=sys.stderr)
                continue
            except OSError as exc:
                failed += 1
                print(f"facecloak: {source}: cannot write output: {exc}", file=sys.stderr)
                continue
            bar.update(max(0, i + 1 - bar.n))  # --together has filled it already
            if args.json:
                cal = calibrate(protector.meter, data, result) if args.calibrate else None
                print(json_line(source, target, result, cal), flush=True)
            elif not bar.disable:
                bar.write(f"{source} -> {target}: {result.faces} face(s), {result.seconds:.1f} s")
            else:
                print(f"{source} -> {target}: {result.faces} face(s), {result.seconds:.1f} s")
    if args.grid:
        if rows:
            from cloak_core.visibility import write_grid

            write_grid(rows, args.grid)
            print(f"wrote {args.grid}", file=sys.stderr)
        else:
            print(f"facecloak: no face found: {args.grid} not written", file=sys.stderr)
    return 1 if failed else 0


def _read(name: str) -> tuple[Path, bytes | OSError]:
    source = Path(name)
    try:
        return source, source.read_bytes()
    except OSError as exc:
        return source, exc


def _protect_each(
    protector: Protector, args: argparse.Namespace, bar: Any
) -> Iterator[tuple[int, Path, bytes, Outcome]]:
    """Each input read and protected on its own, as the loop reaches it."""
    for i, name in enumerate(args.inputs):
        source, data = _read(name)
        if isinstance(data, OSError):
            yield i, source, b"", data
            continue
        try:
            result: Outcome = protector.protect_bytes(
                data,
                out_format=args.format,
                quality=args.quality,
                measure=args.json,
                progress=lambda f, i=i: bar.update(i + f - bar.n),
            )
        except FaceCloakError as exc:
            result = exc
        yield i, source, data, result


def _protect_together(
    protector: Protector, args: argparse.Namespace, bar: Any
) -> Iterator[tuple[int, Path, bytes, Outcome]]:
    """The inputs as one person's collection (``--together``): the faces that show one
    person are pushed away from their shared identity.

    At most ``--batch-size`` photos are decoded and attacked at a time, and each batch is
    handed on (written) as soon as it is done. When the inputs take several batches, a
    first pass reads every input once to embed its faces (decode, detect, one forward pass
    per model), and each batch is handed the other batches' faces (``carried``), so every
    face is pushed from the shared identity of all the inputs, as in one batch; the faces
    the first pass found are handed back with each file whose bytes have not changed since,
    so none is detected twice."""
    import torch

    names = list(args.inputs)
    size = args.batch_size or TOGETHER_BATCH
    parts = [names[k : k + size] for k in range(0, len(names), size)]
    first: dict[str, tuple[bytes, Any]] = {}  # name: the digest of what was read, its faces
    seen = [_first_pass(protector, part, first) for part in parts] if len(parts) > 1 else []
    done = 0
    for k, part in enumerate(parts):
        read = [_read(name) for name in part]
        good = [data for _, data in read if isinstance(data, bytes)]
        known = [
            _found_in(first.get(name), data)
            for name, (_, data) in zip(part, read, strict=True)
            if isinstance(data, bytes)
        ]
        carried = None
        others = [seen[j] for j in range(len(parts)) if j != k]
        if others and any(len(next(iter(o.values()))) for o in others):
            carried = {_THE_SET: {n: torch.cat([o[n] for o in others]) for n in others[0]}}
        start, span = done, len(part)

        def advance(fraction: float, start: int = start, span: int = span) -> None:
            bar.update(start + fraction * span - bar.n)

        results = iter(
            protector.protect_many(
                good,
                out_format=args.format,
                quality=args.quality,
                measure=args.json,
                progress=advance,
                together=carried is None,
                collections=None if carried is None else [_THE_SET] * len(good),
                carried=carried,
                faces=known if any(f is not None for f in known) else None,
            )
            if good
            else []
        )
        for i, (source, data) in enumerate(read):
            if isinstance(data, OSError):
                yield done + i, source, b"", data
            else:
                yield done + i, source, data, next(results)
        done += len(part)


def _first_pass(
    protector: Protector, names: list[str], first: dict[str, tuple[bytes, Any]]
) -> dict[str, Any]:
    """The clean embeddings of the faces in the files of ``names`` that can be read (the
    others are reported when their batch is protected); ``first`` gets, per file read, the
    digest of its bytes and the faces found in them."""
    read = [(name, data) for name in names if isinstance(data := _read(name)[1], bytes)]
    found: list[Any] = []
    embeddings = protector.embed_photos([data for _, data in read], found=found)
    for (name, data), faces in zip(read, found, strict=True):
        first[name] = (hashlib.sha256(data).digest(), faces)
    return embeddings


def _found_in(first: tuple[bytes, Any] | None, data: bytes) -> Any:
    """The faces the first pass found in a file, if it read these very bytes; else None."""
    if first is None or first[0] != hashlib.sha256(data).digest():
        return None
    return first[1]
