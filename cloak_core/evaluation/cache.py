"""The attack cache: attacked batches kept in ``out/attack-cache``, named by what made them.

A long CPU evaluation can stop and go on: every attacked batch is written as one ``.npz``
file as soon as it is done, named by a digest of everything its pixels depend on (the
attack config with its ensemble, the seed, the device type, torch's version, the attack's
source files, the images and their faces). A run with the same settings finds them there;
a change to any of these gives new names, so a stale batch is never read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cloak_core.detect import Face
    from cloak_core.presets import AttackConfig

CACHE_DIR = "attack-cache"
# The sources whose change makes earlier attacked images stale (the presets' values are
# in the key already, as the attack config, so retuning one preset keeps the others' cache).
ATTACK_SOURCES = ("attack.py", "pipeline.py", "align.py", "lpips.py")


def attack_code() -> str:
    """A hex sha256 digest of the attack's source files (:data:`ATTACK_SOURCES`)."""
    import cloak_core

    root = Path(cloak_core.__file__).parent
    digest = hashlib.sha256()
    for name in ATTACK_SOURCES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class AttackCache:
    """Where one run keeps its attacked batches.

    ``directory``: the cache folder (``out/attack-cache``). ``code``: :func:`attack_code`,
    read once when the run starts. ``device``: the device type the attack runs on
    (``"cpu"``, ``"cuda"``), as its pixels differ from one to the other.
    """

    directory: Path
    code: str
    device: str

    def path(
        self,
        config: AttackConfig,
        seed: int,
        pixels: Sequence[np.ndarray],
        faces: Sequence[Sequence[Face]],
        companions: Sequence[np.ndarray] = (),
        companion_faces: Sequence[Sequence[Face]] = (),
    ) -> Path:
        """The file of one batch: ``pixels`` (RGB uint8 ``(H, W, 3)`` each) attacked with
        ``config`` (its ``models`` the ensemble) and ``seed``, ``faces`` the faces of each;
        ``companions``, its people's photos in other batches counted in it, and their faces."""
        import torch

        key = {
            "config": asdict(config),
            "seed": seed,
            "device": self.device,
            "torch": torch.__version__,
            "code": self.code,
            "images": [hashlib.sha256(px.tobytes()).hexdigest() for px in pixels],
            "faces": [[[list(f.box), f.keypoints.tolist()] for f in fs] for fs in faces],
        }
        if companions:  # only then: the keys of batches without any stay as they were
            key["companions"] = [hashlib.sha256(px.tobytes()).hexdigest() for px in companions]
            key["companion_faces"] = [
                [[list(f.box), f.keypoints.tolist()] for f in fs] for fs in companion_faces
            ]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"{digest}.npz"


def read_batch(path: Path) -> tuple[list[np.ndarray], float] | None:
    """The attacked images (RGB uint8 ``(H, W, 3)``) kept at ``path`` and their attack
    seconds; None if the file is absent or unreadable."""
    try:
        with np.load(path) as data:
            n = int(data["count"])
            return [data[f"image{k}"] for k in range(n)], float(data["seconds"])
    except (OSError, KeyError, ValueError):
        return None


def write_batch(path: Path, images: Sequence[np.ndarray], seconds: float) -> None:
    """Keep attacked ``images`` and their attack ``seconds`` at ``path`` (written aside,
    then renamed: a reader never finds half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    arrays = {f"image{k}": im for k, im in enumerate(images)}
    np.savez_compressed(partial, count=len(images), seconds=seconds, **arrays)
    partial.replace(path)
