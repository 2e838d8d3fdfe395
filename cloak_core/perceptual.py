"""A perceptual budget for the perturbation: how much each pixel may change unnoticed.

People notice a change of a few levels on a smooth cheek and miss one several times as
large in hair, eyebrows or along edges. The budget follows that, per pixel, from the
original face alone (nothing the attack optimises can move it):

- **luminance masking** (Chou and Li, 1995): the visibility threshold of a change over a
  background of grey level ``b`` (0..255) is ``17 (1 - sqrt(b / 127)) + 3`` below 127 and
  ``3 / 128 (b - 127) + 3`` above, in grey levels: lowest around mid-grey, higher in the
  dark and the bright;
- **texture masking**: busy regions hide more, in proportion to the local contrast (the
  local standard deviation of luminance);
- the two combine as in the nonlinear additivity model of Yang et al. (2005):
  ``T = T_lum + T_tex - 0.3 min(T_lum, T_tex)``.

Luminance and colour are budgeted apart, in the YCbCr opponent space: eyes forgive fine
luminance grain far more readily than a colour shift, which on skin reads as a bruise or
a stain, so the chroma channels get only a fraction of the luminance budget.
"""

from __future__ import annotations

import torch

from cloak_core.filters import gaussian_blur

# ITU-R BT.601 (JPEG's) RGB -> YCbCr, without the offsets: a perturbation has none.
_RGB_TO_YCC = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)

# Yang et al.'s overlap between the two maskings.
_OVERLAP = 0.3


def _matrix(inverse: bool, like: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(_RGB_TO_YCC, dtype=torch.float64)
    if inverse:
        m = torch.linalg.inv(m)
    return m.to(dtype=like.dtype, device=like.device)


def rgb_to_ycc(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB differences to YCbCr differences (linear, no offsets)."""
    return torch.einsum("ij,bjhw->bihw", _matrix(False, images), images)


def ycc_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_ycc`."""
    return torch.einsum("ij,bjhw->bihw", _matrix(True, images), images)


def ycc_gradient(grad: torch.Tensor) -> torch.Tensor:
    """A gradient with respect to RGB ``(B, 3, H, W)`` as one with respect to the same
    change expressed in YCbCr (the chain rule through :func:`ycc_to_rgb`)."""
    return torch.einsum("ji,bjhw->bihw", _matrix(True, grad), grad)


def luminance_threshold(background: torch.Tensor) -> torch.Tensor:
    """Chou and Li's visibility threshold (grey levels) over a ``background`` (0..255)."""
    dark = 17.0 * (1.0 - torch.sqrt(background.clamp(0.0, 255.0) / 127.0)) + 3.0
    bright = 3.0 / 128.0 * (background - 127.0) + 3.0
    return torch.where(background <= 127.0, dark, bright)


def jnd_map(images: torch.Tensor, texture: float, sigma: float = 1.5) -> torch.Tensor:
    """The just-noticeable luminance change ``(B, 1, H, W)``, in 0..1 units, of ``images``
    ``(B, 3, H, W)`` (RGB, 0..1).

    ``texture`` scales the texture term (grey levels per grey level of local standard
    deviation); ``sigma`` is the Gaussian window, in pixels, of the local mean and
    deviation.
    """
    mean, deviation = local_luminance(images, 2 * round(2 * sigma) + 1, sigma)
    mean, deviation = mean * 255.0, deviation * 255.0
    t_lum = luminance_threshold(mean)
    t_tex = texture * deviation
    return (t_lum + t_tex - _OVERLAP * torch.minimum(t_lum, t_tex)) / 255.0


def local_luminance(
    images: torch.Tensor, kernel: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local mean and standard deviation ``(B, 1, H, W)`` each, in 0..1 units, of the
    luminance of ``images`` ``(B, 3, H, W)`` (RGB, 0..1), over a Gaussian window of
    ``sigma`` pixels (``kernel`` wide)."""
    y = rgb_to_ycc(images)[:, :1]
    mean = gaussian_blur(y, kernel, sigma)
    var = (gaussian_blur(y * y, kernel, sigma) - mean * mean).clamp_min(0.0)
    return mean, var.sqrt()


def budget(images: torch.Tensor, scale: float, texture: float, chroma: float) -> torch.Tensor:
    """Per-pixel, per-channel bound ``(B, 3, H, W)`` on a YCbCr perturbation of ``images``:
    ``scale`` JNDs of luminance, ``chroma`` times that on each colour channel."""
    jnd = scale * jnd_map(images, texture)
    return jnd * channel_weights(chroma, jnd)


# A face is grey (a black-and-white photo) when nearly all of it has its R, G and B within
# a few levels of each other: decoded greyscale files have them equal, re-encoded ones
# differ by a level or two.
GREY_SPREAD = 3.0 / 255.0
GREY_SHARE = 0.99


def colour_kept(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 1, 1)`` factors on Y, Cb and Cr per face of ``images`` ``(B, 3, H, W)``
    (RGB, 0..1) inside ``masks`` ``(B, 1, H, W)``: 1, 1, 1 for a face in colour and 1, 0, 0
    for a grey one, whose perturbation must stay grey (any colour added to a
    black-and-white photo is plain to see)."""
    spread = images.amax(1, keepdim=True) - images.amin(1, keepdim=True)
    inside = masks > 0.5
    grey_pixels = ((spread <= GREY_SPREAD) & inside).flatten(1).sum(1)
    share = grey_pixels / inside.flatten(1).sum(1).clamp_min(1)
    grey = (share >= GREY_SHARE).to(images.dtype).view(-1, 1, 1, 1)
    return 1.0 - grey * (1.0 - channel_weights(0.0, images))


def channel_weights(chroma: float, like: torch.Tensor) -> torch.Tensor:
    """``(1, 3, 1, 1)`` weights of Y, Cb, Cr: 1 for luminance, ``chroma`` for each colour
    channel, with ``like``'s dtype and device."""
    weights = torch.tensor([1.0, chroma, chroma], dtype=like.dtype, device=like.device)
    return weights.view(1, 3, 1, 1)
