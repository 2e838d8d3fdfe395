"""How visible protection is to a person: a panel of metrics on each face, at display scale.

The attack keeps AlexNet LPIPS small, so AlexNet LPIPS cannot tell whether a face still
looks the same: the attack finds changes that network misses and people see. The panel
therefore measures what the attack never optimises:

- S-CIELAB (Zhang and Wandell's spatial CIELAB), its mean and 95th percentile: both faces
  first filtered, per opponent colour channel, by the eye's contrast sensitivity at a
  stated viewing distance (:data:`SAMPLES_PER_DEGREE`), then compared pixel by pixel with
  CIEDE2000. This is the colour difference to read: plain CIEDE2000 counts JPEG's fine
  grain, which nobody sees, as much as the patches and creases a person sees at once;
- SSIMULACRA2 (JPEG XL's perceptual score: 100 identical, about 90 a change no one sees
  side by side, 30 low quality), the structural comparison to read beside it: it sees the
  soft patches and creases on smooth skin that a mean colour difference calls small;
- CIEDE2000 colour difference per pixel (CIE 2000, in CIELAB from sRGB with a D65 white),
  its mean and 95th percentile: about 1 is a just-noticeable difference between two
  uniform patches side by side, not between two pictures;
- PSNR (dB) and SSIM on the face region;
- DISTS (Ding et al. 2020) and VGG16 LPIPS, two learned perceptual distances;
- AlexNet LPIPS, only as *the attack's own number*, never as the verdict.

Where: each face's box grown :data:`FACE_GROW` times about its centre, in the photo as
written (a 112x112 aligned crop is measured whole). A region whose longer side exceeds
:data:`DISPLAY_SIDE` pixels is first scaled down to it (antialiased), since a person sees
a face at most about that large on a screen; smaller regions are measured as they are.
The learned metrics see regions of at least :data:`NETWORK_MIN_SIDE` pixels (smaller ones
are enlarged for them alone: their pooling layers need the room).

Grids (:func:`write_grid`) show the same crops, original | protected | ``|difference| x 10``,
at one display height, as a PNG.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cloak_core.errors import UsageError

if TYPE_CHECKING:
    from cloak_core.store import ModelStore

FACE_GROW = 1.3
DISPLAY_SIDE = 512
NETWORK_MIN_SIDE = 64
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
# JPEG qualities of the calibration rows: "looks unchanged" and "barely changed".
CALIBRATION_QUALITIES = (90, 75)

# sRGB (D65) to XYZ, and the D65 reference white (CIE 1931 2-degree observer).
_RGB_TO_XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])

# Spatial CIELAB (Zhang and Wandell 1996, the filters of their distributed code as ISETCam
# keeps them). CIE XYZ (2-degree observer) to the opponent channels luminance, red-green,
# blue-yellow (Poirson and Wandell):
_XYZ_TO_OPPONENT = np.array(
    [
        [0.2787336, 0.7218031, -0.1065520],
        [-0.4487736, 0.2898056, 0.0771569],
        [0.0859513, -0.5899859, 0.5011089],
    ]
)
# Per opponent channel, the eye's spatial sensitivity as a weighted sum of Gaussians: (weight,
# half width at half maximum in degrees of visual angle). Each channel's weights sum to 1,
# so a uniform area keeps its colour; the luminance filter's wide negative lobe makes it a
# band-pass, like the eye's contrast sensitivity.
_OPPONENT_FILTERS = (
    ((1.00327, 0.05), (0.114416, 0.225), (-0.117686, 7.0)),
    ((0.616725, 0.0685), (0.383275, 0.826)),
    ((0.567885, 0.092), (0.432115, 0.6451)),
)
# Image pixels per degree of visual angle: a screen of 120 pixels per inch seen from 50 cm
# (S-CIELAB's usual viewing conditions), the face at the display scale the panel measures.
SAMPLES_PER_DEGREE = 41.0


# --------------------------------------------------------------------------- colour


def srgb_to_xyz(rgb: np.ndarray) -> np.ndarray:
    """CIE XYZ ``(..., 3)`` float64 (Y 1 for white) of sRGB pixels ``(..., 3)``, uint8
    (0..255) or float in 0..1."""
    rgb = np.asarray(rgb)
    v = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    linear = np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    return linear @ _RGB_TO_XYZ.T


def xyz_to_lab(xyz: np.ndarray) -> np.ndarray:
    """CIELAB ``(..., 3)`` float64 (L in 0..100) of CIE XYZ ``(..., 3)``, D65 white."""
    t = np.asarray(xyz, np.float64) / _WHITE_D65
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB ``(..., 3)`` float64 (L in 0..100) of sRGB pixels ``(..., 3)``.

    ``rgb`` is uint8 (0..255) or float in 0..1; the white point is D65.
    """
    return xyz_to_lab(srgb_to_xyz(rgb))


def ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (Sharma, Wu and Dalal 2005) per pixel: ``(...)`` float64.

    ``lab1``, ``lab2``: CIELAB ``(..., 3)`` of one shape; ``kL = kC = kH = 1``.
    """
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    if lab1.shape != lab2.shape or lab1.shape[-1] != 3:
        raise UsageError(f"need two (..., 3) Lab arrays of one shape: {lab1.shape}, {lab2.shape}")
    l1, a1, b1 = np.moveaxis(lab1, -1, 0)
    l2, a2, b2 = np.moveaxis(lab2, -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    c7 = c_bar**7
    g = 0.5 * (1 - np.sqrt(c7 / (c7 + 25.0**7)))
    a1p, a2p = a1 * (1 + g), a2 * (1 + g)
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    chroma_zero = (c1p * c2p) == 0

    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(chroma_zero, 0.0, dh)
    dh_big = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh) / 2)

    l_bar = (l1 + l2) / 2
    cp_bar = (c1p + c2p) / 2
    h_sum = h1p + h2p
    wrap = np.where(h_sum < 360, h_sum + 360, h_sum - 360)
    h_bar = np.where(np.abs(h1p - h2p) > 180, wrap, h_sum)
    h_bar = np.where(chroma_zero, h_sum, h_bar / 2)

    t = (
        1
        - 0.17 * np.cos(np.radians(h_bar - 30))
        + 0.24 * np.cos(np.radians(2 * h_bar))
        + 0.32 * np.cos(np.radians(3 * h_bar + 6))
        - 0.20 * np.cos(np.radians(4 * h_bar - 63))
    )
    d_theta = 30 * np.exp(-(((h_bar - 275) / 25) ** 2))
    cp7 = cp_bar**7
    r_c = 2 * np.sqrt(cp7 / (cp7 + 25.0**7))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / np.sqrt(20 + (l_bar - 50) ** 2)
    s_c = 1 + 0.045 * cp_bar
    s_h = 1 + 0.015 * cp_bar * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    tl, tc, th = dl / s_l, dc / s_c, dh_big / s_h
    return np.sqrt(np.maximum(tl**2 + tc**2 + th**2 + r_t * tc * th, 0.0))


def _sampled_gaussian_gain(f: np.ndarray, sd: float) -> np.ndarray:
    """Frequency response at ``f`` (cycles per pixel) of a Gaussian of ``sd`` pixels sampled
    on the pixel grid and normalised to sum 1: the continuous response repeated every
    cycle per pixel (the samples' aliases), 1 at ``f`` = 0."""
    aliases = np.arange(-3, 4)
    total = np.exp(-2 * math.pi**2 * sd**2 * (f[..., None] + aliases) ** 2).sum(-1)
    return total / np.exp(-2 * math.pi**2 * sd**2 * aliases**2.0).sum()


def _eye_filtered(xyz: np.ndarray, samples_per_degree: float) -> np.ndarray:
    """CIE XYZ ``(N, H, W, 3)`` as the eye resolves it: each opponent channel filtered by
    its sum of Gaussians (:data:`_OPPONENT_FILTERS`), then back to XYZ.

    The Gaussians are applied whole, in the frequency domain, to the image mirrored about
    its edges (half-sample symmetric, the FFT then seeing no seam), so the wide luminance
    lobe needs no truncation however small the face.
    """
    h, w = xyz.shape[1:3]
    opponent = np.moveaxis(xyz @ _XYZ_TO_OPPONENT.T, -1, 1)  # (N, 3, H, W)
    mirrored = np.concatenate([opponent, opponent[:, :, ::-1]], axis=2)
    mirrored = np.concatenate([mirrored, mirrored[:, :, :, ::-1]], axis=3)
    spectrum = np.fft.rfft2(mirrored)
    fy = np.fft.fftfreq(2 * h)[:, None]
    fx = np.fft.rfftfreq(2 * w)[None, :]
    gains = []
    for lobes in _OPPONENT_FILTERS:
        gain = np.zeros(np.broadcast_shapes(fy.shape, fx.shape))
        for weight, hwhm in lobes:
            sd = hwhm * samples_per_degree / math.sqrt(2 * math.log(2))
            gain += weight * _sampled_gaussian_gain(fy, sd) * _sampled_gaussian_gain(fx, sd)
        gains.append(gain)
    spectrum *= np.stack(gains)[None]
    filtered = np.fft.irfft2(spectrum, s=mirrored.shape[-2:])[:, :, :h, :w]
    return np.moveaxis(filtered, 1, -1) @ np.linalg.inv(_XYZ_TO_OPPONENT).T


def scielab(
    original: np.ndarray, changed: np.ndarray, samples_per_degree: float = SAMPLES_PER_DEGREE
) -> np.ndarray:
    """S-CIELAB colour difference per pixel ``(H, W)`` float64 of two sRGB images
    ``(H, W, 3)`` (uint8, or float in 0..1): CIEDE2000 between the two as the eye resolves
    them at ``samples_per_degree`` image pixels per degree of visual angle.

    A uniform change scores as CIEDE2000 does; detail finer than the eye resolves at that
    distance (JPEG's grain) counts little, patches a few tenths of a degree across in full.
    """
    _check_pair(np.asarray(original), np.asarray(changed))
    xyz = np.stack([srgb_to_xyz(original), srgb_to_xyz(changed)])
    seen = _eye_filtered(xyz, samples_per_degree)
    return ciede2000(xyz_to_lab(seen[0]), xyz_to_lab(seen[1]))


# --------------------------------------------------------------------------- pixel metrics


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

    Wang et al.'s (2004) index with a Gaussian window (11x11, sigma 1.5), ``K1 = 0.01``,
    ``K2 = 0.03``, per colour channel, averaged over the pixels whose window lies inside
    the image and over channels (``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True``, ``use_sample_covariance=False``, ``channel_axis=-1``).
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


# --------------------------------------------------------------------------- SSIMULACRA2

# SSIMULACRA2 (Jon Sneyers, 2023; libjxl's tools/ssimulacra2.cc defines it): the constants
# of its colour space, XYB (JPEG XL's opsin absorbance: a mix of linear R, G and B plus a
# bias, then a cube root), of its comparison, and the weights it was fitted with.
_XYB_MIX = np.array(
    [
        [0.30, 0.622, 0.078],
        [0.23, 0.692, 0.078],
        [0.24342268924547819, 0.20476744424496821, 0.5518098665095536],
    ]
)
_XYB_BIAS = 0.0037930732552754493
_SSIMULACRA2_C2 = 0.0009
_SSIMULACRA2_SCALES = 6
_SSIMULACRA2_SIGMA = 1.5
# Per feature, in the order channel (X, Y, B), scale (full size first), norm (1, then 4),
# then the three maps: a line per channel, scale and norm holds structure, added edges,
# lost detail.
# fmt: off
_SSIMULACRA2_WEIGHTS = np.array(
    [
        0.0, 0.0007376606707406586, 0.0,
        0.0, 0.0007793481682867309, 0.0,
        0.0, 0.0004371155730107379, 0.0,
        1.1041726426657346, 0.00066284834129271, 0.00015231632783718752,
        0.0, 0.0016406437456599754, 0.0,
        1.8422455520539298, 11.441172603757666, 0.0,
        0.0007989109436015163, 0.000176816438078653, 0.0,
        1.8787594979546387, 10.94906990605142, 0.0,
        0.0007289346991508072, 0.9677937080626833, 0.0,
        0.00014003424285435884, 0.9981766977854967, 0.00031949755934435053,
        0.0004550992113792063, 0.0, 0.0,
        0.0013648766163243398, 0.0, 0.0,
        0.0, 0.0, 0.0,
        7.466890328078848, 0.0, 17.445833984131262,
        0.0006235601634041466, 0.0, 0.0,
        6.683678146179332, 0.00037724407979611296, 1.027889937768264,
        225.20515300849274, 0.0, 0.0,
        19.213238186143016, 0.0011401524586618361, 0.001237755635509985,
        176.39317598450694, 0.0, 0.0,
        24.43300999870476, 0.28520802612117757, 0.0004485436923833408,
        0.0, 0.0, 0.0,
        34.77906344483772, 44.835625328877896, 0.0,
        0.0, 0.0, 0.0,
        0.0, 0.0, 0.0,
        0.0, 0.0008680556573291698, 0.0,
        0.0, 0.0, 0.0,
        0.0, 0.0005313191874358747, 0.0,
        0.00016533814161379112, 0.0, 0.0,
        0.0, 0.0, 0.0,
        0.0004179171803251336, 0.0017290828234722833, 0.0,
        0.0020827005846636437, 0.0, 0.0,
        8.826982764996862, 23.19243343998926, 0.0,
        95.1080498811086, 0.9863978034400682, 0.9834382792465353,
        0.0012286405048278493, 171.2667255897307, 0.9807858872435379,
        0.0, 0.0, 0.0,
        0.0005130064588990679, 0.0, 0.00010854057858411537,
    ]
)
# fmt: on


def _linear_srgb(pixels: np.ndarray) -> torch.Tensor:
    """uint8 sRGB ``(H, W, 3)`` as linear light ``(1, 3, H, W)`` float64."""
    v = torch.from_numpy(pixels.astype(np.float64) / 255.0).permute(2, 0, 1)[None]
    return torch.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _positive_xyb(linear: torch.Tensor) -> torch.Tensor:
    """Linear RGB ``(N, 3, H, W)`` in SSIMULACRA2's shifted XYB, every channel about 0..1."""
    mix = torch.from_numpy(_XYB_MIX)
    cone = torch.einsum("ij,njhw->nihw", mix, linear) + _XYB_BIAS
    cone = cone.clamp(min=0.0) ** (1.0 / 3.0) - _XYB_BIAS ** (1.0 / 3.0)
    x = (cone[:, 0] - cone[:, 1]) / 2
    y = (cone[:, 0] + cone[:, 1]) / 2
    return torch.stack([x * 14.0 + 0.42, y + 0.01, cone[:, 2] - y + 0.55], dim=1)


def _ssimulacra2_blur(t: torch.Tensor) -> torch.Tensor:
    """Gaussian of sigma 1.5 (radius 5) of ``(N, C, H, W)``, as the reference's recursive
    filter treats the borders: zero beyond the left and right sides, mirrored (the edge row
    repeated) beyond the top and bottom; every scale is at least 8 > 5 pixels high."""
    radius = round(3.2795 * _SSIMULACRA2_SIGMA + 0.2546)
    g = _gaussian_window(2 * radius + 1, _SSIMULACRA2_SIGMA)
    n, c, h, w = t.shape
    flat = t.reshape(n * c, 1, h, w)
    out = F.conv2d(F.pad(flat, (radius, radius, 0, 0)), g.view(1, 1, 1, -1))
    mirrored = torch.cat([out[..., :radius, :].flip(-2), out, out[..., -radius:, :].flip(-2)], -2)
    return F.conv2d(mirrored, g.view(1, 1, -1, 1)).reshape(n, c, h, w)


def _norms(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of ``(1, 3, H, W)`` maps: the mean, and the 4-norm mean ``mean(d^4)^(1/4)``."""
    return d.mean(dim=(0, 2, 3)), (d**4).mean(dim=(0, 2, 3)) ** 0.25


def ssimulacra2(original: np.ndarray, changed: np.ndarray) -> float:
    """SSIMULACRA2 score of ``changed`` against ``original`` (uint8 sRGB ``(H, W, 3)``, one
    shape): 100 identical, about 90 a change no one sees side by side at 1:1, 70 high
    quality, 50 medium, 30 low, and below for plain damage (the anchors its authors give,
    from JPEG XL's subjective tests; it can go negative).

    Both images in XYB, at six scales (each half the last, by 2x2 means in linear light,
    while both sides keep at least 8 pixels, so a region under 256 pixels is scored on
    fewer, each feature keeping its own weight: the reference reads its weights in sequence,
    so there a small region's later channels take other features' weights, and a JPEG q90
    of a 112-pixel face scores about 50 against 90 here);
    per scale and channel, against Gaussian local means, an SSIM map without its
    luminance term (``1 - (mu1 - mu2)^2`` instead), the edges the change added and the
    detail it lost, each pooled as its mean and 4-norm; the weighted sum of those 108
    numbers is mapped onto the score. Unlike PSNR or a colour difference it was fitted to
    people's ratings of whole pictures, and it sees soft patches and creases on smooth skin
    that a mean colour difference calls small.
    """
    _check_pair(original, changed)
    a, b = _linear_srgb(to_uint8(original)), _linear_srgb(to_uint8(changed))
    features: list[torch.Tensor] = []  # per scale: (3 channels, 2 norms, 3 maps)
    for scale in range(_SSIMULACRA2_SCALES):
        if min(a.shape[-2:]) < 8:
            break
        if scale:
            a = F.avg_pool2d(a, 2, ceil_mode=True)
            b = F.avg_pool2d(b, 2, ceil_mode=True)
            if min(a.shape[-2:]) < 8:
                break
        x, y = _positive_xyb(a), _positive_xyb(b)
        mx, my = _ssimulacra2_blur(x), _ssimulacra2_blur(y)
        vx = _ssimulacra2_blur(x * x) - mx * mx
        vy = _ssimulacra2_blur(y * y) - my * my
        cxy = _ssimulacra2_blur(x * y) - mx * my
        structure = 1.0 - (1.0 - (mx - my) ** 2) * (2 * cxy + _SSIMULACRA2_C2) / (
            vx + vy + _SSIMULACRA2_C2
        )
        edges = (1.0 + (y - my).abs()) / (1.0 + (x - mx).abs()) - 1.0
        maps = [structure.clamp(min=0.0), edges.clamp(min=0.0), (-edges).clamp(min=0.0)]
        pooled = [_norms(m) for m in maps]  # map -> (mean, 4-norm), each (3,)
        features.append(
            torch.stack([torch.stack([p[n] for p in pooled], dim=-1) for n in range(2)], dim=1)
        )
    if not features:
        raise UsageError("SSIMULACRA2 needs images of at least 8x8 pixels")
    # Each feature on its own weight: a scale not measured (a small region) adds nothing.
    f = torch.stack(features, dim=1).abs().numpy()  # (channel, scale, norm, map)
    weights = _SSIMULACRA2_WEIGHTS.reshape(3, _SSIMULACRA2_SCALES, 2, 3)[:, : f.shape[1]]
    total = float((f * weights).sum()) * 0.9562382616834844
    total = (
        2.326765642916932 * total
        - 0.020884521182843837 * total**2
        + 6.248496625763138e-05 * total**3
    )
    return 100.0 - 10.0 * total**0.6276336467831387 if total > 0 else 100.0


# --------------------------------------------------------------------------- face regions


def face_region(
    shape: tuple[int, int], box: Sequence[float], grow: float = FACE_GROW
) -> tuple[int, int, int, int]:
    """The face box ``(x0, y0, x1, y1)`` grown ``grow`` times about its centre, as integer
    pixel bounds clipped to an image of ``shape`` = ``(H, W)``."""
    height, width = shape
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) * grow / 2, (y1 - y0) * grow / 2
    bx0, by0 = max(0, int(np.floor(cx - hw))), max(0, int(np.floor(cy - hh)))
    bx1, by1 = min(width, int(np.ceil(cx + hw))), min(height, int(np.ceil(cy + hh)))
    if bx1 - bx0 < 2 or by1 - by0 < 2:
        return (0, 0, width, height)
    return (bx0, by0, bx1, by1)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 of an 8- or 16-bit image (a uint8 input is returned as is)."""
    if pixels.dtype == np.uint8:
        return pixels
    scale = 255.0 / np.iinfo(pixels.dtype).max
    return np.clip(pixels.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``pixels`` (uint8 ``(H, W, 3)``) resized to ``size`` = ``(w, h)`` with Lanczos."""
    if (pixels.shape[1], pixels.shape[0]) == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


def display_pair(
    original: np.ndarray,
    changed: np.ndarray,
    region: tuple[int, int, int, int],
    max_side: int = DISPLAY_SIDE,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``region`` of both images as uint8 ``(h, w, 3)`` at display scale (the longer
    side at most ``max_side``; never enlarged)."""
    x0, y0, x1, y1 = region
    a = to_uint8(np.ascontiguousarray(original[y0:y1, x0:x1, :3]))
    b = to_uint8(np.ascontiguousarray(changed[y0:y1, x0:x1, :3]))
    h, w = a.shape[:2]
    f = max_side / max(h, w)
    if f < 1.0:
        size = (max(1, round(w * f)), max(1, round(h * f)))
        a, b = _resize(a, size), _resize(b, size)
    return a, b


def jpeg_roundtrip(pixels: np.ndarray, quality: int) -> np.ndarray:
    """``pixels`` (RGB uint8 ``(H, W, 3)``) encoded as baseline JPEG at ``quality`` (4:2:0,
    Pillow's default) and decoded again: what "re-encoded, unchanged" looks like."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(pixels)).save(buf, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- the panel


@dataclass(frozen=True)
class Visibility:
    """The panel for one face: how far the changed face is from the original.

    ``scielab_mean`` / ``scielab_p95``: S-CIELAB over the region's pixels, the colour
    difference as the eye resolves it at :data:`SAMPLES_PER_DEGREE` (0 identical; JPEG
    q90 of a face about 0.3); ``ssimulacra2``: :func:`ssimulacra2`, a score fitted to
    people's ratings (100 identical, about 90 unseen side by side, 70 high quality, 30 low;
    ``nan`` under 8 pixels); ``de2000_mean`` / ``de2000_p95``: plain CIEDE2000 per pixel
    (about 1 is a just-noticeable difference between uniform patches); ``psnr`` in dB
    (``inf`` identical); ``ssim`` (1 identical); ``dists`` and ``lpips_vgg`` (0 identical);
    ``lpips_alex``: the attack's own metric, kept for comparison only. ``size``: the
    measured region's ``(h, w)`` at display scale.
    """

    scielab_mean: float
    scielab_p95: float
    ssimulacra2: float
    de2000_mean: float
    de2000_p95: float
    psnr: float
    ssim: float
    dists: float
    lpips_vgg: float
    lpips_alex: float
    size: tuple[int, int]

    def as_dict(self) -> dict:
        """JSON-ready form: a non-finite value (the ``inf`` PSNR of an unchanged face, the
        SSIM of a face under 11 pixels) becomes ``None``."""
        d = {k: (v if np.isfinite(v) else None) for k, v in asdict(self).items() if k != "size"}
        d["size"] = list(self.size)
        return d


# Which way is worse for each panel metric, for summaries and "worst image" lists.
HIGHER_IS_WORSE = {
    "scielab_mean": True,
    "scielab_p95": True,
    "ssimulacra2": False,
    "de2000_mean": True,
    "de2000_p95": True,
    "psnr": False,
    "ssim": False,
    "dists": True,
    "lpips_vgg": True,
    "lpips_alex": True,
}
PANEL_METRICS = tuple(HIGHER_IS_WORSE)


class VisibilityMeter:
    """Measures the panel; loads DISTS and the two LPIPS networks once from the store.

    ``device``: where the learned metrics run (``"cpu"`` or ``"cuda"``).
    """

    def __init__(self, store: ModelStore, device: torch.device | str = "cpu") -> None:
        self.store = store
        self.device = torch.device(device)
        self._nets: dict[str, torch.nn.Module] = {}

    def _net(self, name: str) -> torch.nn.Module:
        net = self._nets.get(name)
        if net is None:
            if name == "dists":
                from cloak_core.dists import load_dists

                net = load_dists(self.store, self.device)
            else:
                from cloak_core.lpips import load_lpips

                net = load_lpips(name, store=self.store, device=self.device)
            self._nets[name] = net
        return net

    @torch.no_grad()
    def _learned(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, list[float]]:
        """DISTS and both LPIPS for each pair, batching pairs of one size together."""
        out: dict[str, list[float]] = {"dists": [], "vgg": [], "alex": []}
        values: dict[str, dict[int, float]] = {k: {} for k in out}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, (a, _) in enumerate(pairs):
            by_shape.setdefault(a.shape, []).append(k)
        for shape, idx in by_shape.items():
            for start in range(0, len(idx), 32):
                chunk = idx[start : start + 32]
                a = torch.from_numpy(np.stack([pairs[k][0] for k in chunk])).permute(0, 3, 1, 2)
                b = torch.from_numpy(np.stack([pairs[k][1] for k in chunk])).permute(0, 3, 1, 2)
                a = a.float().div(255).to(self.device)
                b = b.float().div(255).to(self.device)
                short = min(shape[0], shape[1])
                if short < NETWORK_MIN_SIDE:
                    f = NETWORK_MIN_SIDE / short
                    size = (round(shape[0] * f), round(shape[1] * f))
                    a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                    b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
                for name in out:
                    d = self._net(name)(a, b).float().cpu().reshape(-1).tolist()
                    for k, v in zip(chunk, d, strict=True):
                        values[name][k] = v
        for name in out:
            out[name] = [values[name][k] for k in range(len(pairs))]
        return out

    def measure_pairs(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[Visibility]:
        """The panel of each ``(original, changed)`` pair of uint8 ``(h, w, 3)`` crops at
        display scale (as :func:`display_pair` gives)."""
        for a, b in pairs:
            _check_pair(a, b)
        learned = self._learned(pairs)
        panels = []
        for k, (a, b) in enumerate(pairs):
            de = ciede2000(srgb_to_lab(a), srgb_to_lab(b))
            seen = scielab(a, b)
            small = min(a.shape[:2]) < SSIM_WINDOW
            panels.append(
                Visibility(
                    scielab_mean=float(seen.mean()),
                    scielab_p95=float(np.percentile(seen, 95)),
                    ssimulacra2=ssimulacra2(a, b) if min(a.shape[:2]) >= 8 else float("nan"),
                    de2000_mean=float(de.mean()),
                    de2000_p95=float(np.percentile(de, 95)),
                    psnr=psnr(a, b),
                    ssim=float("nan") if small else ssim(a, b),
                    dists=learned["dists"][k],
                    lpips_vgg=learned["vgg"][k],
                    lpips_alex=learned["alex"][k],
                    size=(int(a.shape[0]), int(a.shape[1])),
                )
            )
        return panels

    def measure_faces(
        self,
        original: np.ndarray,
        changed: np.ndarray,
        boxes: Sequence[Sequence[float]],
    ) -> list[Visibility]:
        """The panel of every face of one image: ``boxes`` are detector boxes
        ``(x0, y0, x1, y1)`` in pixels of ``original`` and ``changed`` (RGB ``(H, W, 3)``,
        8 or 16 bits, one shape)."""
        if original.shape != changed.shape:
            raise UsageError(f"images differ in shape: {original.shape} and {changed.shape}")
        pairs = [
            display_pair(original, changed, face_region(original.shape[:2], box)) for box in boxes
        ]
        return self.measure_pairs(pairs)


def summarise(panels: Sequence[Visibility]) -> dict[str, dict[str, float]]:
    """Per metric: ``mean``, ``median`` and ``worst`` (the largest, or the smallest where
    larger is better) over the finite values of ``panels``."""
    out: dict[str, dict[str, float]] = {}
    for name in PANEL_METRICS:
        v = np.asarray([getattr(p, name) for p in panels], dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            nan = float("nan")
            out[name] = {"mean": nan, "median": nan, "worst": nan}
            continue
        worst = v.max() if HIGHER_IS_WORSE[name] else v.min()
        out[name] = {"mean": float(v.mean()), "median": float(np.median(v)), "worst": float(worst)}
    return out


def calibration(
    meter: VisibilityMeter,
    images: Sequence[np.ndarray],
    regions: Sequence[tuple[int, int, int, int]],
    qualities: Sequence[int] = CALIBRATION_QUALITIES,
) -> dict[str, list[Visibility]]:
    """The panel of the same images re-encoded as JPEG at each quality (``"jpeg90"``, ...):
    what "unchanged" and "barely changed" score. ``regions[k]`` is the face region of
    ``images[k]``, as :func:`face_region` gives (one face per image)."""
    out: dict[str, list[Visibility]] = {}
    for q in qualities:
        pairs = [
            display_pair(img, jpeg_roundtrip(img, q), region)
            for img, region in zip(images, regions, strict=True)
        ]
        out[f"jpeg{q}"] = meter.measure_pairs(pairs)
    return out


# --------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class GridRow:
    """One row of a face grid: a face crop and its changed versions, uint8 ``(h, w, 3)``.

    ``changed`` maps a column label (an ensemble, a preset) to the changed crop of the same
    region; ``label`` names the row (identity, file).
    """

    label: str
    original: np.ndarray
    changed: dict[str, np.ndarray]


def write_grid(
    rows: Sequence[GridRow],
    path: Path,
    *,
    height: int | None = None,
    amplify: float = 10.0,
) -> None:
    """A PNG of face crops: per row the original, then for each changed version the version
    and ``|version - original| x amplify``.

    ``height``: every row scaled to that many pixels (Lanczos, aspect kept); ``None`` shows
    each crop at its own size, the display scale :func:`display_pair` gives. Rows are
    labelled above, columns on top.
    """
    if not rows:
        raise UsageError("a grid needs at least one row")
    labels = list(rows[0].changed)
    head, gap, caption = 18, 4, 14
    cells: list[list[np.ndarray]] = []
    for row in rows:
        h, w = row.original.shape[:2]
        size = (w, h) if height is None else (max(1, round(w * height / h)), height)
        line = [_resize(row.original, size)]
        for lab in labels:
            changed = row.changed[lab]
            diff = np.abs(changed.astype(np.int16) - row.original.astype(np.int16)) * amplify
            line += [_resize(changed, size), _resize(np.clip(diff, 0, 255).astype(np.uint8), size)]
        cells.append(line)
    widths = [max(line[c].shape[1] for line in cells) for c in range(len(cells[0]))]
    heights = [line[0].shape[0] for line in cells]
    total_w = sum(widths) + gap * (len(widths) + 1)
    total_h = head + sum(caption + h + gap for h in heights) + gap
    canvas = Image.new("RGB", (total_w, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    titles = ["original"]
    for lab in labels:
        titles += [lab, f"|diff| x{amplify:g}"]
    x = gap
    for c, title in enumerate(titles):
        draw.text((x, 3), title, fill=(0, 0, 0))
        x += widths[c] + gap
    y = head
    for row, line, h in zip(rows, cells, heights, strict=True):
        draw.text((gap, y), row.label, fill=(60, 60, 60))
        y += caption
        x = gap
        for c, img in enumerate(line):
            canvas.paste(Image.fromarray(img), (x, y))
            x += widths[c] + gap
        y += h + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=True)
