"""What happens to a photo between upload and a face recogniser: re-encoding and resizing.

A condition is named by a short spec, parsed by :func:`parse_condition`:

- ``png``: the protected pixels as written (lossless);
- ``jpegQ``: JPEG at quality Q (e.g. ``jpeg85``);
- ``scaleP-jpegQ``: downscaled to P percent (area averaging), then JPEG at quality Q;
- ``resizeN-jpegQ``: downscaled so that the longer side is N pixels, then JPEG at Q.

A downscaled image is enlarged back to its original size (bicubic) after decoding, so
every evaluator sees the face where its landmarks say it is; recognisers enlarge small
faces anyway when they align them, and the detail lost by downscaling stays lost. The
same condition is applied to the clean gallery, so clean and protected accuracy under a
condition compare like with like.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cloak_core.errors import UsageError

DEFAULT_CONDITIONS = ("png", "jpeg85", "jpeg75", "scale50-jpeg85")

_SPEC = re.compile(r"^(?:(?:scale(?P<scale>\d+)|resize(?P<side>\d+))-)?jpeg(?P<q>\d+)$")


@dataclass(frozen=True)
class Condition:
    """One transformation of a gallery image: optional downscale, optional JPEG re-encode.

    ``scale`` is a factor in (0, 1]; ``max_side`` a longer side in pixels; ``jpeg`` a
    quality 1..100 (``None``: lossless, the pixels as they are).
    """

    name: str
    jpeg: int | None = None
    scale: float | None = None
    max_side: int | None = None

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image ``(H, W, 3)`` RGB uint8 after this condition, same shape and dtype."""
        if self.jpeg is None and self.scale is None and self.max_side is None:
            return image
        h, w = image.shape[:2]
        pil = Image.fromarray(image)
        factor = self.scale
        if self.max_side is not None:
            factor = min(1.0, self.max_side / max(h, w))
        if factor is not None and factor < 1.0:
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            pil = pil.resize(size, Image.Resampling.BOX)
        if self.jpeg is not None:
            buffer = io.BytesIO()
            pil.save(buffer, format="JPEG", quality=self.jpeg)
            pil = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.Resampling.BICUBIC)
        return np.array(pil, dtype=np.uint8)


def parse_condition(spec: str) -> Condition:
    """The :class:`Condition` named by ``spec`` (see the module docstring); UsageError if bad."""
    spec = spec.strip().lower()
    if spec == "png":
        return Condition("png")
    m = _SPEC.match(spec)
    if m is None:
        raise UsageError(
            f"unknown condition {spec!r}: use png, jpegQ, scaleP-jpegQ or resizeN-jpegQ "
            "(e.g. jpeg85, scale50-jpeg85)"
        )
    q = int(m["q"])
    if not 1 <= q <= 100:
        raise UsageError(f"condition {spec!r}: JPEG quality must be 1..100")
    if m["scale"] is not None:
        pct = int(m["scale"])
        if not 1 <= pct <= 100:
            raise UsageError(f"condition {spec!r}: scale must be 1..100 percent")
        return Condition(spec, jpeg=q, scale=pct / 100.0)
    if m["side"] is not None:
        side = int(m["side"])
        if side < 16:
            raise UsageError(f"condition {spec!r}: resize to at least 16 pixels")
        return Condition(spec, jpeg=q, max_side=side)
    return Condition(spec, jpeg=q)


def conditions_from_flags(
    conditions: str | None, jpeg: int | None = None, resize: int | None = None
) -> tuple[Condition, ...]:
    """The conditions of ``--conditions a,b,...`` plus those ``--jpeg Q`` / ``--resize PX`` add.

    Without ``--conditions``: the defaults, or, when ``--jpeg``/``--resize`` are given, ``png``
    plus ``jpegQ`` and ``resizePX-jpegQ`` (Q defaults to 85 there). Duplicates are dropped.
    """
    if conditions:
        specs = [s for s in conditions.split(",") if s.strip()]
    elif jpeg is None and resize is None:
        specs = list(DEFAULT_CONDITIONS)
    else:
        specs = ["png"]
    if jpeg is not None:
        specs.append(f"jpeg{jpeg}")
    if resize is not None:
        specs.append(f"resize{resize}-jpeg{jpeg if jpeg is not None else 85}")
    parsed = [parse_condition(s) for s in specs]
    unique: dict[str, Condition] = {}
    for c in parsed:
        unique.setdefault(c.name, c)
    if not unique:
        raise UsageError("--conditions is empty")
    return tuple(unique.values())
