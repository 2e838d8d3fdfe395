"""MobileFaceNet (Chen et al. 2018) trained on CASIA-WebFace: 112x96 input, 128-d.

The architecture follows the layout of the Xiaoccer/MobileFaceNet_Pytorch checkpoints
(``{"epoch", "net_state_dict"}``), so its state dict loads with ``strict=True``:
a 3x3 stride-2 stem, a depthwise 3x3, fifteen inverted-residual bottlenecks, a 1x1 to
512 channels, a global depthwise 7x6 "linear" convolution and a linear 1x1 to 128.

Input faces use SphereFace's 96x112 alignment, which is the ArcFace 112x112 template
shifted 8 pixels left. Pixels are RGB, normalised as ``(x * 255 - 127.5) / 128`` as in
training. ``forward`` returns the single image's 128-d feature. The reference LFW
evaluation concatenates the features of the image and of its mirror image; on
``data/faces`` that raised leave-one-out rank-1 identification only from 0.992 to 0.998
(both 1.000 with one probe per identity) at twice the cost, and the attack already
averages horizontal flips, so the single feature is used.

Verification threshold: cosine 0.215, measured on ``data/faces`` (24 identities, 480
images, ArcFace-aligned crops warped to this template) as the threshold that maximises
the balanced accuracy (mean of the true-match and true-non-match rates) over all 4560
same-identity and 110400 different-identity pairs; it reached 0.968 there. (The same
procedure gives 0.31 for SFace, whose published threshold is 0.363.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cloak_core.errors import ModelStoreError
from cloak_core.models.base import ARCFACE_TEMPLATE_112, FaceModel, ModelSpec, VerificationRule
from cloak_core.weights import WeightFile

WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        name="mobilefacenet_casia_068.ckpt",
        sha256="e839247cdbdfc023fb7cadeaf53a4549d50c8fc24ad154c02e35920ea8910d99",
        sources=(),
        description="MobileFaceNet 112x96, CASIA-WebFace (evaluation only; local folders)",
        license="none stated: evaluation use only",
    ),
)

# SphereFace's 96x112 template is ArcFace's 112x112 template moved 8 pixels to the left.
SPHEREFACE_TEMPLATE_112X96 = tuple((x - 8.0, y) for x, y in ARCFACE_TEMPLATE_112)

# Bottleneck stages: (expansion, output channels, repeats, stride of the first repeat).
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBlock(nn.Module):
    """Convolution without bias, batch norm, and a PReLU unless ``linear``.

    ``(B, C_in, H, W) -> (B, C_out, H', W')``; ``depthwise`` makes it one group per channel.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int],
        stride: int,
        padding: int,
        depthwise: bool = False,
        linear: bool = False,
    ) -> None:
        super().__init__()
        groups = c_in if depthwise else 1
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.prelu = None if linear else nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, linear 1x1 project; skip if shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileFaceNet(FaceModel):
    """MobileFaceNet with its input normalisation inside.

    ``forward(faces)``: ``(B, 3, 112, 96)`` RGB in 0..1, aligned to
    :data:`SPHEREFACE_TEMPLATE_112X96`, returns ``(B, 128)`` raw embeddings.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, depthwise=True)
        blocks: list[nn.Module] = []
        c_in = 64
        for expansion, c_out, repeats, stride in _STAGES:
            for i in range(repeats):
                blocks.append(Bottleneck(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(128, 512, 1, 1, 0)
        # After four stride-2 stages a 112x96 input is 7x6: this is a global depthwise conv.
        self.linear7 = ConvBlock(512, 512, (7, 6), 1, 0, depthwise=True, linear=True)
        self.linear1 = ConvBlock(512, 128, 1, 1, 0, linear=True)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 96)`` RGB in 0..1 -> ``(B, 128)`` raw embeddings."""
        x = (faces * 255.0 - 127.5) / 128.0
        x = self.blocks(self.dw_conv1(self.conv1(x)))
        x = self.linear1(self.linear7(self.conv2(x)))
        return x.flatten(1)


def build(path: str | Path) -> MobileFaceNet:
    """MobileFaceNet with the weights of the ``{"epoch", "net_state_dict"}`` file at ``path``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["net_state_dict"]
    except Exception as exc:
        raise ModelStoreError(f"{path}: not a MobileFaceNet checkpoint ({exc})") from exc
    model = MobileFaceNet()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(
            f"{path}: tensors do not fit the MobileFaceNet architecture ({exc})"
        ) from exc
    return model


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="mobilefacenet",
        family="mobilefacenet",
        input_size=(112, 96),
        template=SPHEREFACE_TEMPLATE_112X96,
        embedding_dim=128,
        weights=("mobilefacenet_casia_068.ckpt",),
        verification=VerificationRule("cosine", 0.215),
        build=build,
        default=False,
        description=(
            "MobileFaceNet trained on CASIA-WebFace (no licence stated: evaluation only): "
            "112x96 SphereFace alignment, 128-d; same person when cosine >= 0.215 "
            "(measured on data/faces)"
        ),
    ),
)
