"""face.evoLVe backbones (IR-50, IR-152, ResNet-152): the published LowKey ensemble.

LowKey (Cherepanova et al., ICLR 2021) attacks four face.evoLVe checkpoints trained on
MS1M: IR-152 and ResNet-152, each with an ArcFace and a CosFace head. The modules here
reproduce face.evoLVe's ``backbone/model_irse.py`` and ``backbone/model_resnet.py`` module
for module, so the published ``.pth`` files (plain state dicts) load with ``strict=True``.

Input: 112x112 RGB faces aligned to the ArcFace 5-point template (face.evoLVe's own
112x112 reference points are the same five points), normalised ``(x - 0.5) / 0.5``.
Output: a 512-d embedding (the ``BatchNorm1d`` after the last linear layer), not
normalised; LowKey L2-normalises it (and adds the flipped face's embedding) outside.

Layouts, for 112x112 inputs:

- IR (improved residual, "IR-SE" without the SE): ``input_layer`` (3x3 conv 3 -> 64,
  BN, PReLU); ``body``: 4 stages of ``bottleneck_IR`` units (BN, 3x3 conv, PReLU,
  3x3 conv with the stage's stride on the first unit, BN; the shortcut is a strided
  identity (``MaxPool2d(1, stride)``) or a 1x1 conv + BN when the width changes) with
  widths 64, 128, 256, 512 and units (3, 4, 14, 3) for IR-50, (3, 8, 36, 3) for IR-152;
  ``output_layer``: BN, dropout, flatten, linear 512*7*7 -> 512, BatchNorm1d.
- ResNet-152: torchvision-style bottleneck ResNet (7x7/2 conv, 3x3/2 max pool, stages of
  (3, 8, 36, 3) units, expansion 4) whose head is BN (``bn_o1``), dropout, linear
  2048*4*4 -> 512 (``fc``), BatchNorm1d (``bn_o2``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cloak_core.errors import ModelStoreError
from cloak_core.models.base import ARCFACE_TEMPLATE_112, FaceModel, ModelSpec, VerificationRule
from cloak_core.weights import UrlSource, WeightFile

INPUT_SIZE = (112, 112)
EMBEDDING_DIM = 512

# Units per stage. IR widths are 64, 128, 256, 512; ResNet widths 64, 128, 256, 512 (x4).
IR_50_UNITS = (3, 4, 14, 3)
IR_152_UNITS = (3, 8, 36, 3)
RESNET_152_UNITS = (3, 8, 36, 3)

# Cosine at or above which two embeddings are called the same person. Not measured here:
# the checkpoints are not reachable from this machine. For 512-d ArcFace-family models
# thresholds tuned on LFW sit near 0.3; deepface's ArcFace threshold is a cosine distance
# of 0.68, i.e. a cosine similarity of 0.32 (serengil/deepface, deepface/config/threshold.py).
# `facecloak eval` reports each model's own best threshold on real pairs.
COSINE_THRESHOLD = 0.32


_EVOLVE_URL = "https://github.com/cmu-spuds/lowkey_gradio/releases/download/weights/"


def _weight_file(name: str, description: str) -> WeightFile:
    return WeightFile(
        name=name,
        sha256=None,  # not published: recorded at the first download, enforced after
        sources=(UrlSource(_EVOLVE_URL + name),),
        description=description,
        license="MIT (face.evoLVe project)",
    )


WEIGHTS: tuple[WeightFile, ...] = (
    _weight_file(
        "Backbone_IR_152_Arcface_Epoch_112.pth", "face.evoLVe IR-152 ArcFace, 112x112, 512-d"
    ),
    _weight_file(
        "Backbone_IR_152_Cosface_Epoch_70.pth", "face.evoLVe IR-152 CosFace, 112x112, 512-d"
    ),
    _weight_file(
        "Backbone_ResNet_152_Arcface_Epoch_65.pth",
        "face.evoLVe ResNet-152 ArcFace, 112x112, 512-d",
    ),
    _weight_file(
        "Backbone_ResNet_152_Cosface_Epoch_68.pth",
        "face.evoLVe ResNet-152 CosFace, 112x112, 512-d",
    ),
)


class IRUnit(nn.Module):
    """face.evoLVe's ``bottleneck_IR``: ``(B, C_in, H, W) -> (B, C_out, H/stride, W/stride)``.

    Attribute names (``shortcut_layer``, ``res_layer`` and their indices) are those of the
    published state dicts.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        if c_in == c_out:
            # A 1x1 max pool with a stride is a strided identity: no parameters.
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRBackbone(nn.Module):
    """face.evoLVe's IR ``Backbone`` for 112x112 inputs.

    ``forward(x)``: ``(B, 3, 112, 112)`` RGB already normalised to -1..1 -> ``(B, 512)``.
    """

    def __init__(self, units: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        layers: list[nn.Module] = []
        c_in = 64
        for width, n in zip((64, 128, 256, 512), units, strict=True):
            # Every stage, the first included, halves the resolution: 112 -> 56 -> 28 -> 14 -> 7.
            layers.append(IRUnit(c_in, width, 2))
            layers.extend(IRUnit(width, width, 1) for _ in range(n - 1))
            c_in = width
        self.body = nn.Sequential(*layers)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, EMBEDDING_DIM),
            nn.BatchNorm1d(EMBEDDING_DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


class ResNetUnit(nn.Module):
    """face.evoLVe's ResNet ``Bottleneck`` (expansion 4), stride on the 3x3 conv.

    ``(B, C_in, H, W) -> (B, 4 * width, H/stride, W/stride)``.
    """

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNetBackbone(nn.Module):
    """face.evoLVe's ``ResNet`` with bottleneck units, for 112x112 inputs.

    ``forward(x)``: ``(B, 3, 112, 112)`` RGB already normalised to -1..1 -> ``(B, 512)``.
    """

    def __init__(self, units: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        stages = []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), units, strict=True)):
            stride = 1 if i == 0 else 2
            c_out = width * ResNetUnit.expansion
            downsample = None
            if stride != 1 or c_in != c_out:
                downsample = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
                )
            stage = [ResNetUnit(c_in, width, stride, downsample)]
            stage.extend(ResNetUnit(c_out, width, 1, None) for _ in range(n - 1))
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # 112 -> 56 (conv1) -> 28 (max pool) -> 28, 14, 7, 4 after the four stages.
        self.bn_o1 = nn.BatchNorm2d(2048)
        self.dropout = nn.Dropout()
        self.fc = nn.Linear(2048 * 4 * 4, EMBEDDING_DIM)
        self.bn_o2 = nn.BatchNorm1d(EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn_o1(x))
        return self.bn_o2(self.fc(x.flatten(1)))


class EvolveModel(FaceModel):
    """A face.evoLVe backbone with its input normalisation inside.

    ``forward(faces)``: ``(B, 3, 112, 112)`` RGB in 0..1, aligned to the ArcFace template,
    returns ``(B, 512)`` raw embeddings. ``backbone`` holds the face.evoLVe module whose
    state dict the published checkpoints are.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` RGB in 0..1 -> ``(B, 512)`` raw embeddings."""
        return self.backbone((faces - 0.5) / 0.5)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a face.evoLVe state dict saved with ``torch.save`` into ``backbone``, strictly.

    Raises :class:`ModelStoreError` naming the file when it is not a state dict of exactly
    this architecture (missing, unexpected or mis-shaped tensors).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelStoreError(f"{path}: not a readable torch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise ModelStoreError(f"{path}: expected a state dict, found {type(state).__name__}")
    arch = type(backbone).__name__
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected = backbone.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        reshaped = sorted(
            k
            for k in set(expected) & set(state)
            if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)
        )
        parts = [
            f"{label} {len(keys)} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", reshaped),
            )
            if keys
        ]
        detail = "; ".join(parts) or str(exc).splitlines()[0]
        raise ModelStoreError(
            f"{path}: tensors do not fit the face.evoLVe {arch} architecture: {detail}"
        ) from exc


def _build(backbone: nn.Module, weights: str | Path | None) -> EvolveModel:
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return EvolveModel(backbone)


def ir_50(weights: str | Path | None = None) -> EvolveModel:
    """face.evoLVe IR-50 (112x112 -> 512-d); loads a state dict from ``weights`` if given."""
    return _build(IRBackbone(IR_50_UNITS), weights)


def ir_152(weights: str | Path | None = None) -> EvolveModel:
    """face.evoLVe IR-152 (112x112 -> 512-d); loads a state dict from ``weights`` if given."""
    return _build(IRBackbone(IR_152_UNITS), weights)


def resnet_152(weights: str | Path | None = None) -> EvolveModel:
    """face.evoLVe ResNet-152 (112x112 -> 512-d); loads a state dict from ``weights`` if given."""
    return _build(ResNetBackbone(RESNET_152_UNITS), weights)


def _spec(name: str, file: str, build, what: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="evolve",
        input_size=INPUT_SIZE,
        template=ARCFACE_TEMPLATE_112,
        embedding_dim=EMBEDDING_DIM,
        weights=(file,),
        verification=VerificationRule("cosine", COSINE_THRESHOLD),
        build=build,
        default=False,
        description=(
            f"face.evoLVe {what} (LowKey's published ensemble, MS1M): 112x112 ArcFace "
            f"alignment, (x-0.5)/0.5, 512-d; same person when cosine >= {COSINE_THRESHOLD} "
            "(typical for ArcFace-family models, not tuned for this checkpoint)"
        ),
    )


SPECS: tuple[ModelSpec, ...] = (
    _spec("ir152_arcface", "Backbone_IR_152_Arcface_Epoch_112.pth", ir_152, "IR-152, ArcFace"),
    _spec("ir152_cosface", "Backbone_IR_152_Cosface_Epoch_70.pth", ir_152, "IR-152, CosFace"),
    _spec(
        "resnet152_arcface",
        "Backbone_ResNet_152_Arcface_Epoch_65.pth",
        resnet_152,
        "ResNet-152, ArcFace",
    ),
    _spec(
        "resnet152_cosface",
        "Backbone_ResNet_152_Cosface_Epoch_68.pth",
        resnet_152,
        "ResNet-152, CosFace",
    ),
)
