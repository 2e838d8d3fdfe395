"""How much protection changes an image: PSNR, SSIM and LPIPS between original and protected.

PSNR and SSIM work on RGB uint8 images ``(H, W, 3)`` (0..255). SSIM is Wang et al.'s
(2004) index with an 11x11 Gaussian window of sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``,
computed on each colour channel and averaged over the pixels whose window lies inside
the image and over channels (the convention of ``skimage.metrics.structural_similarity``
with ``gaussian_weights=True``, ``use_sample_covariance=False``, ``channel_axis=-1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cloak_core.errors import UsageError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise UsageError(f"need two (H, W, 3) images of one shape, got {a.shape} and {b.shape}")


def psnr(original: np.ndarray, changed: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of ``changed`` against ``original`` (both ``(H, W, 3)``).

    Pixels in 0..``data_range``; identical images give ``inf``.
    """
    _check_pair(original, changed)
    mse = float(np.mean((original.astype(np.float64) - changed.astype(np.float64)) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian ``(size,)`` in float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    original: np.ndarray,
    changed: np.ndarray,
    data_range: float = 255.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> float:
    """Mean structural similarity (1 for identical images) of two ``(H, W, 3)`` images.

    Pixels in 0..``data_range``; both sides need at least ``window`` pixels.
    """
    _check_pair(original, changed)
    if min(original.shape[:2]) < window:
        raise UsageError(f"SSIM needs images of at least {window}x{window} pixels")
    x = torch.from_numpy(original.astype(np.float64)).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
    y = torch.from_numpy(changed.astype(np.float64)).permute(2, 0, 1)[:, None]
    g = _gaussian_window(window, sigma)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable, "valid" (window inside the image)
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


@dataclass(frozen=True)
class QualityStats:
    """Summary of one metric over the protected images: mean, median, min and max."""

    mean: float
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> QualityStats:
        """Statistics of the finite ``values`` (``inf`` PSNRs of unchanged images left out)."""
        v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
        if v.size == 0:
            nan = float("nan")
            return cls(nan, nan, nan, nan)
        return cls(float(v.mean()), float(np.median(v)), float(v.min()), float(v.max()))

    def as_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {"mean": self.mean, "median": self.median, "min": self.min, "max": self.max}


@torch.no_grad()
def lpips_distances(
    lpips: torch.nn.Module,
    originals: Sequence[np.ndarray],
    changed: Sequence[np.ndarray],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> list[float]:
    """LPIPS of each pair of RGB uint8 ``(H, W, 3)`` images with the module ``lpips``.

    ``lpips(x, y)`` takes two ``(B, 3, H, W)`` RGB batches in 0..1 (as
    :func:`cloak_core.lpips.load_lpips` gives). Images of different sizes go one by one.
    """
    out: list[float] = []
    i = 0
    while i < len(originals):
        shape = originals[i].shape
        j = i
        while j < len(originals) and j - i < batch_size and originals[j].shape == shape:
            j += 1
        a = torch.from_numpy(np.stack(originals[i:j])).permute(0, 3, 1, 2).float() / 255.0
        b = torch.from_numpy(np.stack(changed[i:j])).permute(0, 3, 1, 2).float() / 255.0
        out.extend(lpips(a.to(device), b.to(device)).float().cpu().tolist())
        i = j
    return out
