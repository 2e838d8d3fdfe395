"""Image filters shared by the attack and the perceptual budget."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def gaussian_blur(images: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images, reflect padding, same shape."""
    half = kernel // 2
    x = torch.arange(kernel, dtype=images.dtype, device=images.device) - half
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (half, half, half, half), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(out, k.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


@functools.cache
def _dct_matrix(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


def dct_matrix(n: int, like: torch.Tensor) -> torch.Tensor:
    """The orthonormal DCT-II of length ``n`` as an ``(n, n)`` matrix, in ``like``'s dtype
    and device: ``D @ x`` transforms the columns of ``x``, ``D.T @ X`` inverts it."""
    return _dct_matrix(n).to(dtype=like.dtype, device=like.device)
