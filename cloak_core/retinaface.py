"""RetinaFace with a MobileNet-0.25 backbone: the recall detector beside BlazeFace.

The weights are the widely used ``mobilenet0.25_Final.pth`` (WIDER FACE, MIT), resolved
by the model store as :data:`RETINAFACE_WEIGHTS`. The network, as the state dict's keys
name it:

- ``body``: MobileNet v1 at width 0.25 in three stages (strides 8, 16 and 32 at their
  ends, 64, 128 and 256 channels); every convolution is followed by batch norm and a
  leaky ReLU of slope 0.1;
- ``fpn``: 1x1 lateral convolutions to 64 channels, nearest upsampling added top-down,
  a 3x3 ``merge`` convolution on the two finer levels;
- ``ssh1..3``: a context module per level (3x3, 5x5 and 7x7 receptive fields as chains
  of 3x3 convolutions, concatenated, ReLU);
- ``ClassHead``, ``BboxHead``, ``LandmarkHead``: one 1x1 convolution per level giving, for
  each of 2 anchors per cell, face/background logits, a box offset and 5 landmark offsets.

Anchors are square, ``16, 32`` pixels at stride 8, ``64, 128`` at 16 and ``256, 512`` at 32,
centred on each cell; offsets are decoded with variances 0.1 (centres, landmarks) and 0.2
(log sizes). The input is BGR, 0..255, minus the per-channel means ``(104, 117, 123)``.

Landmarks come in the order of the ArcFace template: the eye on the image's left, the
eye on the image's right, the nose tip, the mouth corners image-left and image-right.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloak_core.errors import ModelStoreError, UsageError

RETINAFACE_WEIGHTS = "retinaface_mobilenet0.25.pth"

_BGR_MEAN = (104.0, 117.0, 123.0)
_STEPS = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
_CENTRE_VARIANCE = 0.1
_SIZE_VARIANCE = 0.2
_SLOPE = 0.1

# MobileNet v1 x0.25 after its first convolution: (stage, channels in, out, stride) of the
# depthwise-separable blocks.
_BLOCKS = (
    ("stage1", 8, 16, 1),
    ("stage1", 16, 32, 2),
    ("stage1", 32, 32, 1),
    ("stage1", 32, 64, 2),
    ("stage1", 64, 64, 1),
    ("stage2", 64, 128, 2),
    *(("stage2", 128, 128, 1),) * 5,
    ("stage3", 128, 256, 2),
    ("stage3", 256, 256, 1),
)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, slope: float | None) -> nn.Sequential:
    """Conv (no bias), batch norm, then a leaky ReLU unless ``slope`` is None: indices 0, 1, 2."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope) if slope > 0 else nn.ReLU())
    return nn.Sequential(*layers)


def _separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 and pointwise 1x1, each with batch norm and leaky ReLU: indices 0..5."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.LeakyReLU(_SLOPE),
        nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(_SLOPE),
    )


class _Backbone(nn.Module):
    """MobileNet v1 x0.25: ``(B, 3, H, W)`` to features at strides 8, 16 and 32."""

    def __init__(self) -> None:
        super().__init__()
        stages: dict[str, list[nn.Module]] = {"stage1": [_conv_bn(3, 8, 3, 2, _SLOPE)]}
        for stage, c_in, c_out, stride in _BLOCKS:
            stages.setdefault(stage, []).append(_separable(c_in, c_out, stride))
        self.stage1 = nn.Sequential(*stages["stage1"])
        self.stage2 = nn.Sequential(*stages["stage2"])
        self.stage3 = nn.Sequential(*stages["stage3"])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class _Pyramid(nn.Module):
    """Feature pyramid: three levels in, three 64-channel levels out, fine to coarse."""

    def __init__(self, channels: tuple[int, int, int], width: int) -> None:
        super().__init__()
        self.output1 = _conv_bn(channels[0], width, 1, 1, _SLOPE)
        self.output2 = _conv_bn(channels[1], width, 1, 1, _SLOPE)
        self.output3 = _conv_bn(channels[2], width, 1, 1, _SLOPE)
        self.merge1 = _conv_bn(width, width, 3, 1, _SLOPE)
        self.merge2 = _conv_bn(width, width, 3, 1, _SLOPE)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p3 = self.output3(feats[2])
        p2 = self.output2(feats[1]) + F.interpolate(p3, size=feats[1].shape[-2:], mode="nearest")
        p2 = self.merge2(p2)
        p1 = self.output1(feats[0]) + F.interpolate(p2, size=feats[0].shape[-2:], mode="nearest")
        return [self.merge1(p1), p2, p3]


class _Context(nn.Module):
    """SSH context module: half the channels from one 3x3, a quarter each from two and
    three stacked 3x3 convolutions (5x5 and 7x7 receptive fields), then ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(width, width // 2, 3, 1, None)
        self.conv5X5_1 = _conv_bn(width, width // 4, 3, 1, _SLOPE)
        self.conv5X5_2 = _conv_bn(width // 4, width // 4, 3, 1, None)
        self.conv7X7_2 = _conv_bn(width // 4, width // 4, 3, 1, _SLOPE)
        self.conv7x7_3 = _conv_bn(width // 4, width // 4, 3, 1, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five = self.conv5X5_1(x)
        seven = self.conv7x7_3(self.conv7X7_2(five))
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(five), seven], 1))


class _Head(nn.Module):
    """A 1x1 convolution giving ``per_anchor`` values for each anchor of each cell."""

    def __init__(self, width: int, anchors: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(width, anchors * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)  # cells row-major, anchors within a cell
        return out.reshape(x.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """RetinaFace MobileNet-0.25: ``(B, 3, H, W)`` BGR minus means to raw per-anchor outputs.

    :meth:`forward` returns ``(offsets (B, A, 4), probabilities (B, A) of a face,
    landmark offsets (B, A, 10))`` for the ``A`` anchors of :func:`anchors`.
    """

    def __init__(self) -> None:
        super().__init__()
        width, n_anchors = 64, 2
        self.body = _Backbone()
        self.fpn = _Pyramid((64, 128, 256), width)
        self.ssh1, self.ssh2, self.ssh3 = (_Context(width) for _ in range(3))
        self.ClassHead = nn.ModuleList(_Head(width, n_anchors, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(width, n_anchors, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(width, n_anchors, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(self.body(x))
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), levels, strict=True)]
        boxes = torch.cat([h(f) for h, f in zip(self.BboxHead, feats, strict=True)], 1)
        logits = torch.cat([h(f) for h, f in zip(self.ClassHead, feats, strict=True)], 1)
        marks = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats, strict=True)], 1)
        return boxes, logits.softmax(-1)[..., 1], marks


def anchors(height: int, width: int) -> np.ndarray:
    """The anchors of an ``height x width`` input: ``(A, 4)`` centre x, y and side, pixels,
    in the order of the network's outputs (level, row, column, size)."""
    out = []
    for step, sizes in zip(_STEPS, _ANCHOR_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid(
            (np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step, indexing="ij"
        )
        for_sizes = [np.stack([cx, cy, np.full_like(cx, s)], -1) for s in sizes]
        out.append(np.stack(for_sizes, 2).reshape(-1, 3))
    return np.concatenate(out, 0)


def load_retinaface(path: Path) -> RetinaFace:
    """The network with the weights at ``path`` (a state dict), in eval mode, frozen."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelStoreError(
            f"cannot read the RetinaFace weights {Path(path).name} ({path}): {first}; check "
            "them with 'facecloak models verify' and fetch them again with 'facecloak models "
            "fetch'"
        ) from exc
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = RetinaFace()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(
            f"{path} is not a RetinaFace MobileNet-0.25 state dict: {exc}"
        ) from exc
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    # run_retinaface's input is (H, W, C) in memory; weights in that layout too make the
    # forward pass 10-20% faster on a CPU (outputs move by about 1e-5 pixels).
    return net.to(memory_format=torch.channels_last)


@torch.no_grad()
def run_retinaface(
    net: RetinaFace, rgb: np.ndarray, min_score: float, nms_iou: float = 0.4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces in ``rgb`` ``(H, W, 3)`` uint8 RGB (0..255) at its own resolution.

    Returns ``(boxes (N, 4) x0, y0, x1, y1, landmarks (N, 5, 2) x, y, scores (N,))`` in the
    input's pixels, best first, after non-maximum suppression at ``nms_iou``. Coordinates
    follow the network's training convention (pixel edges: ``0`` is the image's left edge).
    """
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise UsageError(
            f"RetinaFace takes an (H, W, 3) RGB array, got {getattr(rgb, 'shape', None)}"
        )
    h, w = rgb.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1], dtype=np.float32))
    x = (x - torch.tensor(_BGR_MEAN)).permute(2, 0, 1)[None]
    offsets, probs, marks = (t[0].numpy().astype(np.float64) for t in net(x))
    keep = np.flatnonzero(probs > min_score)
    if keep.size == 0:
        return np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros(0)
    prior = anchors(h, w)[keep]
    offsets, probs, marks = offsets[keep], probs[keep], marks[keep].reshape(-1, 5, 2)
    centre = prior[:, :2] + offsets[:, :2] * _CENTRE_VARIANCE * prior[:, 2:]
    size = prior[:, 2:] * np.exp(offsets[:, 2:] * _SIZE_VARIANCE)
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
    landmarks = prior[:, None, :2] + marks * _CENTRE_VARIANCE * prior[:, None, 2:]
    order = _nms_order(boxes, probs, nms_iou)
    return boxes[order], landmarks[order], probs[order]


def _nms_order(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = []
    while order.size:
        i, rest = order[0], order[1:]
        kept.append(i)
        iw = np.clip(
            np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]),
            0,
            None,
        )
        ih = np.clip(
            np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]),
            0,
            None,
        )
        inter = iw * ih
        order = rest[inter / (area[i] + area[rest] - inter) <= iou]
    return np.array(kept, dtype=np.int64)
