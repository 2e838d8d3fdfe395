"""``facecloak bench``: seconds per photo, per stage, and peak memory.

Test photos are real photos (one face, two faces) scaled to each size in megapixels and
encoded as JPEG in memory, so the numbers include decoding, detection and encoding.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from cloak_core import __version__
from cloak_core.commands.common import (
    add_attack_flags,
    add_detector_flags,
    add_set_flag,
    attack_config,
    detector_config,
)
from cloak_core.errors import UsageError

if TYPE_CHECKING:  # torch is imported only when the command runs
    import torch

DEFAULT_PHOTOS = {1: "obama.jpg", 2: "two_people.jpg"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure speed and memory of protection")
    add_attack_flags(p)
    add_set_flag(p, "the preset so changed is timed")
    add_detector_flags(p)
    p.add_argument(
        "--sizes",
        type=lambda t: [float(v) for v in t.split(",")],
        default=[0.3, 2.0, 12.0],
        help="photo sizes in megapixels, comma-separated (default 0.3,2,12)",
    )
    p.add_argument(
        "--faces",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[1, 2],
        help="photos with this many faces, comma-separated (default 1,2)",
    )
    p.add_argument(
        "--photo",
        action="append",
        default=[],
        metavar="FACES=PATH",
        help="photo to use for a face count (default: shared/data/photos)",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per case (the median is kept)")
    p.add_argument("--json", action="store_true", help="one JSON object per case on stdout")
    return p


def _photos(args: argparse.Namespace) -> dict[int, Path]:
    chosen: dict[int, Path] = {}
    for item in args.photo:
        count, _, path = item.partition("=")
        if not count.isdigit() or not path:
            raise UsageError(f"--photo expects FACES=PATH, got {item!r}")
        chosen[int(count)] = Path(path)
    shared = os.environ.get("FACECLOAK_SHARED")
    for count in args.faces:
        if count in chosen:
            continue
        if count in DEFAULT_PHOTOS and shared:
            chosen[count] = Path(shared) / "data" / "photos" / DEFAULT_PHOTOS[count]
        else:
            raise UsageError(
                f"no photo with {count} face(s): pass --photo {count}=PATH "
                "(or set FACECLOAK_SHARED to the shared/ folder)"
            )
    return chosen


def scaled_jpeg(path: Path, megapixels: float) -> bytes:
    """``path`` resized to about ``megapixels`` and encoded as JPEG quality 90, in memory."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        f = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
        im = im.resize((max(16, round(im.width * f)), max(16, round(im.height * f))), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()


class PeakMemory:
    """Peak resident memory (CPU, sampled) or peak allocated memory (CUDA) of a block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def run(args: argparse.Namespace) -> int:
    import torch

    from cloak_core.attack import StageTimes
    from cloak_core.imageio import decode_image
    from cloak_core.pipeline import Protector
    from cloak_core.store import ModelStore

    config = attack_config(args)
    photos = _photos(args)
    protector = Protector(
        config,
        store=ModelStore.from_env(),
        device=args.device,
        detector_config=detector_config(args),
    )
    with protector:
        # Warm-up: first calls pay for lazy initialisation (detector, kernels).
        protector.protect_bytes(scaled_jpeg(photos[args.faces[0]], 0.1))
        header = {
            "facecloak": __version__,
            "torch": torch.__version__,
            "device": str(protector.device),
            "device_name": torch.cuda.get_device_name(protector.device)
            if protector.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "preset": config.name,
            "steps": config.steps,
            "models": protector.model_names,
        }
        if args.settings:  # what --set changed, so a row says what it timed
            header["settings"] = {name: getattr(config, name) for name, _ in args.settings}
        if not args.json:
            print(" ".join(f"{k}={v}" for k, v in header.items()))
        for faces in args.faces:
            for mp in args.sizes:
                data = scaled_jpeg(photos[faces], mp)
                runs = []
                for _ in range(max(1, args.repeat)):
                    times = StageTimes(protector.device)
                    with PeakMemory(protector.device) as mem:
                        start = time.perf_counter()
                        result = protector.protect_bytes(data, times=times)
                        seconds = time.perf_counter() - start
                    runs.append((seconds, times.seconds, mem.peak, result))
                runs.sort(key=lambda r: r[0])
                seconds, stages, peak, result = runs[len(runs) // 2]
                # How visible this run's change is (not part of the timed protection).
                start = time.perf_counter()
                panels = protector.meter.measure_faces(
                    decode_image(data).pixels, decode_image(result.data).pixels, result.boxes
                )
                measure_seconds = time.perf_counter() - start
                row = {
                    **header,
                    "faces_expected": faces,
                    "faces_found": result.faces,
                    "megapixels": round(result.width * result.height / 1e6, 2),
                    "size": f"{result.width}x{result.height}",
                    "seconds": round(seconds, 3),
                    "seconds_per_step": round(
                        sum(v for k, v in stages.items() if k not in _OUTSIDE_STEPS)
                        / max(1, config.steps),
                        4,
                    ),
                    "stages": {k: round(v, 4) for k, v in stages.items()},
                    "peak_memory_mb": round(peak / 2**20, 1),
                    "visibility": [_rounded(p.as_dict()) for p in panels],
                    "visibility_seconds": round(measure_seconds, 3),
                }
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    stage_text = ", ".join(f"{k} {v:.2f}s" for k, v in stages.items())
                    seen = "; ".join(
                        f"S-CIELAB {p.scielab_mean:.2f} (p95 {p.scielab_p95:.1f}), "
                        f"SSIMULACRA2 {p.ssimulacra2:.0f}, "
                        f"CIEDE2000 {p.de2000_mean:.2f} (p95 {p.de2000_p95:.1f}), "
                        f"PSNR {p.psnr:.1f} dB, DISTS {p.dists:.3f}"
                        for p in panels
                    )
                    print(
                        f"{faces} face(s) {row['size']} ({row['megapixels']} MP): "
                        f"{seconds:.2f} s, {row['seconds_per_step'] * 1000:.0f} ms/step, "
                        f"peak {row['peak_memory_mb']:.0f} MB, found {result.faces} | {stage_text}"
                        f" | faces: {seen or 'none'} (measured in {measure_seconds:.1f} s)"
                    )
    return 0


def _rounded(panel: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in panel.items()}


_OUTSIDE_STEPS = {"decode", "detect", "prepare regions", "blend", "encode"}
