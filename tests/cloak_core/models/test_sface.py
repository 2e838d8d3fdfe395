"""SFace's torch port against onnxruntime running the original int8 block-quantized file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.errors import ModelStoreError
from cloak_core.models import REGISTRY, sface

WEIGHTS = "sface_int8bq.onnx"


@pytest.fixture(scope="module")
def sface_path(store) -> Path:
    path = store.find_local(WEIGHTS)
    if path is None:
        try:
            path = store.resolve(WEIGHTS)
        except ModelStoreError as exc:
            pytest.skip(f"{WEIGHTS} is not available: {exc}")
    return path


@pytest.fixture(scope="module")
def model(sface_path: Path) -> sface.SFace:
    return sface.build(sface_path).freeze()


@pytest.fixture(scope="module")
def faces(faces_dir: Path) -> torch.Tensor:
    """Ten real ArcFace-aligned faces ``(10, 3, 112, 112)``, RGB in 0..1."""
    files = [p / f"{i:03d}.png" for p in sorted(faces_dir.iterdir())[:5] for i in (0, 7)]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def reference(sface_path: Path, faces: torch.Tensor) -> np.ndarray:
    """``fc1`` of the original graph in onnxruntime for each face, ``(10, 128)``."""
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the file lists its initializers as inputs too
    session = ort.InferenceSession(str(sface_path), options, providers=["CPUExecutionProvider"])
    # The graph declares the float weights it dequantizes as inputs that no node reads.
    unused = [i for i in session.get_inputs() if i.name != "data"]
    assert len(unused) == 29
    feeds = {i.name: np.zeros(i.shape, np.float32) for i in unused}
    data = (faces.numpy() * 255.0).astype(np.float32)
    # The file fixes the batch to 1.
    return np.concatenate(
        [session.run(["fc1"], {"data": data[i : i + 1], **feeds})[0] for i in range(len(data))]
    )


@pytest.mark.parametrize("batch", [1, 4, 10])
def test_matches_onnxruntime_on_real_faces(
    model: sface.SFace, faces: torch.Tensor, reference: np.ndarray, batch: int
) -> None:
    with torch.no_grad():
        out = torch.cat([model(faces[i : i + batch]) for i in range(0, len(faces), batch)])
    assert out.shape == (len(faces), 128)
    err = np.abs(out.numpy() - reference).max()
    print(f"SFace batch {batch}: max abs difference to onnxruntime {err:.2e}")
    assert err < 1e-4, f"max abs difference {err:.2e} to onnxruntime"
    cos = torch.nn.functional.cosine_similarity(out, torch.from_numpy(reference), dim=1)
    assert cos.min() > 0.99999


def test_gradient_reaches_input_and_matches_finite_differences(
    sface_path: Path, faces: torch.Tensor
) -> None:
    # float64 so that a central difference is accurate enough to check the backward pass.
    model = sface.build(sface_path).double().freeze()
    x = faces[:1].double().clone().requires_grad_(True)
    target = model(faces[2:3].double()).detach()
    loss = (model(x) - target).square().sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.9  # every pixel of the face influences the embedding
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())

    # The network is piecewise linear (PReLU): a tiny step crosses few kinks, hence h and rtol.
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    h = 1e-7
    with torch.no_grad():
        plus = (model(x + h * direction) - target).square().sum()
        minus = (model(x - h * direction) - target).square().sum()
    numeric = (plus - minus) / (2 * h)
    analytic = (grad * direction).sum()
    assert torch.isclose(analytic, numeric, rtol=2e-3), (analytic.item(), numeric.item())


def test_dequantize_blocked_matches_onnxruntime() -> None:
    """Blocked DequantizeLinear, a short last block included, against onnxruntime's own."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, size=(5, 22), dtype=np.int8)
    scale = rng.uniform(0.001, 0.1, size=(5, 3)).astype(np.float32)  # blocks of 8, 8, 6
    zero_point = rng.integers(-20, 20, size=(5, 3), dtype=np.int8)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, block_size=8)
    graph = helper.make_graph(
        [node],
        "dq",
        [helper.make_tensor_value_info("q", TensorProto.INT8, q.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, q.shape)],
        initializer=[numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(["y"], {"q": q})[0]
    got = sface._dequantize_blocked(q, scale, zero_point, axis=1, block_size=8)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_build_rejects_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "sface_int8bq.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelStoreError, match="sface_int8bq.onnx"):
        sface.build(bad)


def test_spec_is_registered_as_a_default_model() -> None:
    spec = REGISTRY["sface"]
    assert spec.default and spec.weights == (WEIGHTS,)
    assert spec.input_size == (112, 112) and spec.embedding_dim == 128
    assert spec.verification.metric == "cosine"
