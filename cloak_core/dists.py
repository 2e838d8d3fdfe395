"""DISTS (Ding et al., TPAMI 2020): a perceptual distance that tolerates texture resampling.

Written in torch alone (torchvision does not import beside the CPU torch build). Two
weight files from the model store:

- ``lpips_vgg16.ckpt``: the ImageNet VGG16 trunk, shared with LPIPS
  (:func:`cloak_core.lpips.build_vgg16_trunk`);
- ``dists_alpha_beta.pt``: DISTS's learned per-channel weights, ``DISTS_pytorch/weights.pt``
  of the ``dists-pytorch==0.1`` wheel (MIT): a torch pickle of ``alpha`` and ``beta``,
  each ``(1, 1475, 1, 1)``, one weight per channel of the six stages below.

The distance between images ``x`` and ``y`` (RGB in 0..1):

1. ImageNet mean/std normalisation, then VGG16 with each max pool replaced by an L2 pool
   (a normalised 3x3 Hann window, stride 2, on the squared activations, then the root);
2. six stages: the raw input (3 channels, not normalised), ``relu1_2``, ``relu2_2``,
   ``relu3_3``, ``relu4_3``, ``relu5_3`` (1475 channels in all);
3. per channel, over the whole image: a structure term from the means,
   ``S1 = (2 mx my + c) / (mx^2 + my^2 + c)``, and a texture term from the variances and
   the covariance, ``S2 = (2 cxy + c) / (vx + vy + c)``, with ``c = 1e-6``;
4. ``1 - sum(alpha * S1 + beta * S2)`` with alpha and beta divided by their joint sum:
   ``(B,)`` distances, 0 for identical images; on 112x112 aligned faces about 0.03-0.07
   after JPEG q75, 0.1-0.13 with Gaussian noise of sigma 0.03, 0.33 for another person.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from cloak_core.errors import ModelStoreError, UsageError
from cloak_core.lpips import Trunk, build_vgg16_trunk, vgg16_trunk
from cloak_core.weights import PypiSource, WeightFile

if TYPE_CHECKING:
    from cloak_core.store import ModelStore

WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        name="dists_alpha_beta.pt",
        sha256="f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218",
        sources=(PypiSource("dists-pytorch==0.1", "DISTS_pytorch/weights.pt"),),
        description="DISTS alpha/beta channel weights (VGG16 trunk from lpips_vgg16.ckpt)",
        license="MIT",
        auto_fetch=True,
    ),
)  # the VGG16 trunk, lpips_vgg16.ckpt, is declared in cloak_core.lpips
TRUNK_FILE = "lpips_vgg16.ckpt"
WEIGHTS_FILE = "dists_alpha_beta.pt"

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
# Stabilising constants of the structure (c1) and texture (c2) terms.
_C1 = 1e-6
_C2 = 1e-6
# The reference's L2 pool: a 5-tap Hann window without its zero ends, padding 1.
_L2POOL_TAPS = (0.5, 1.0, 0.5)
_L2POOL_EPS = 1e-12


def l2_pool(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """DISTS's anti-aliased downsampling: ``sqrt(conv(x^2, window) + 1e-12)`` per channel.

    ``x``: ``(B, C, H, W)``; ``window``: ``(3, 3)``, summing to 1. Stride 2, padding 1:
    returns ``(B, C, ceil(H / 2), ceil(W / 2))``.
    """
    channels = x.shape[1]
    kernel = window.to(x.dtype).expand(channels, 1, *window.shape)
    out = F.conv2d(x * x, kernel, stride=2, padding=1, groups=channels)
    return (out + _L2POOL_EPS).sqrt()


class DISTS(nn.Module):
    """The DISTS distance on a VGG16 trunk.

    Built with random weights; :func:`load_dists` gives the trained, frozen one.
    ``forward(x, y)``: two ``(B, 3, H, W)`` RGB batches in 0..1 (H, W at least 16) ->
    ``(B,)`` distances, 0 for identical images. Gradients flow to both inputs.
    """

    def __init__(self, trunk: Trunk | None = None) -> None:
        super().__init__()
        self.trunk = vgg16_trunk() if trunk is None else trunk
        self.stage_channels = (3, *self.trunk.tap_channels)
        n = sum(self.stage_channels)
        self.alpha = nn.Parameter(torch.full((1, n, 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, n, 1, 1), 0.1))
        taps = torch.tensor(_L2POOL_TAPS)
        window = taps[:, None] * taps[None, :]
        self.register_buffer("window", window / window.sum())
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six stages of ``x`` (``(B, 3, H, W)`` RGB in 0..1), ``(B, C_k, H_k, W_k)`` each."""
        out = [x]
        h = (x - self.mean) / self.std
        last = self.trunk.taps[-1]
        for i, conv in enumerate(self.trunk.convs):
            h = F.relu(conv(h))
            if i in self.trunk.taps:
                out.append(h)
            if i == last:
                break
            if i in self.trunk.pool_after:
                h = l2_pool(h, self.window)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DISTS between ``x`` and ``y``, both ``(B, 3, H, W)`` RGB in 0..1; returns ``(B,)``."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise UsageError(
                f"DISTS needs two (B, 3, H, W) batches of the same shape, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        total = self.alpha.sum() + self.beta.sum()
        alphas = (self.alpha / total).split(self.stage_channels, dim=1)
        betas = (self.beta / total).split(self.stage_channels, dim=1)
        feats = self.features(torch.cat([x, y]))  # one trunk pass for both batches
        distance = x.new_zeros(x.shape[0])
        for feat, alpha, beta in zip(feats, alphas, betas, strict=True):
            fx, fy = feat.chunk(2)
            mx = fx.mean(dim=(2, 3), keepdim=True)
            my = fy.mean(dim=(2, 3), keepdim=True)
            dx, dy = fx - mx, fy - my
            vx = (dx * dx).mean(dim=(2, 3), keepdim=True)
            vy = (dy * dy).mean(dim=(2, 3), keepdim=True)
            cxy = (dx * dy).mean(dim=(2, 3), keepdim=True)
            s1 = (2 * mx * my + _C1) / (mx * mx + my * my + _C1)
            s2 = (2 * cxy + _C2) / (vx + vy + _C2)
            # 1 - sum(w * s) written as sum(w * (1 - s)), the weights summing to 1:
            # exactly 0 for identical images, and no cancellation near 0.
            distance = distance + (alpha * (1 - s1) + beta * (1 - s2)).sum(dim=(1, 2, 3))
        return distance


def read_alpha_beta(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """DISTS's ``alpha`` and ``beta``, each ``(1, 1475, 1, 1)`` float32, from ``path``.

    Raises :class:`ModelStoreError` naming the file when it is not such a torch pickle;
    nothing but tensors is unpickled.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise ModelStoreError(f"{path}: not a torch pickle of DISTS weights ({exc})") from exc
    if not isinstance(data, dict) or not {"alpha", "beta"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ModelStoreError(f"{path}: expected DISTS 'alpha' and 'beta', got {keys}")
    out = []
    for key in ("alpha", "beta"):
        value = data[key]
        if not isinstance(value, torch.Tensor) or value.shape != (1, value.numel(), 1, 1):
            raise ModelStoreError(f"{path}: DISTS {key!r} is not a (1, C, 1, 1) tensor")
        out.append(value.float())
    return out[0], out[1]


def build_dists(trunk_path: str | Path, weights_path: str | Path) -> DISTS:
    """A :class:`DISTS` with the VGG16 trunk of ``trunk_path`` (``lpips_vgg16.ckpt``) and
    the alpha/beta of ``weights_path`` (``dists_alpha_beta.pt``), not yet frozen."""
    model = DISTS(build_vgg16_trunk(trunk_path))
    alpha, beta = read_alpha_beta(weights_path)
    if alpha.shape != model.alpha.shape or beta.shape != model.beta.shape:
        raise ModelStoreError(
            f"{weights_path}: DISTS alpha/beta are {tuple(alpha.shape)}/{tuple(beta.shape)}, "
            f"expected {tuple(model.alpha.shape)} each"
        )
    with torch.no_grad():
        model.alpha.copy_(alpha)
        model.beta.copy_(beta)
    return model


def load_dists(store: ModelStore | None = None, device: str | torch.device = "cpu") -> DISTS:
    """The trained DISTS, frozen (eval, no parameter gradients), on ``device``.

    Weights come from ``store`` (``ModelStore.from_env()`` when ``None``): ``lpips_vgg16.ckpt``
    and ``dists_alpha_beta.pt``. Gradients still flow to the input images. Build it once
    and keep it: loading reads about 60 MB.
    """
    if store is None:
        from cloak_core.store import ModelStore

        store = ModelStore.from_env()
    model = build_dists(store.resolve(TRUNK_FILE), store.resolve(WEIGHTS_FILE))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)
