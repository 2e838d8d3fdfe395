"""MobileFaceNet: the CASIA-WebFace checkpoint loads strictly, aligns, embeds and differentiates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core import align
from cloak_core.errors import ModelStoreError
from cloak_core.models import REGISTRY, mobilefacenet
from cloak_core.models.base import ARCFACE_TEMPLATE_112

WEIGHTS = "mobilefacenet_casia_068.ckpt"


@pytest.fixture(scope="module")
def checkpoint_path(store) -> Path:
    path = store.find_local(WEIGHTS)
    if path is None:
        pytest.skip(f"{WEIGHTS} is not in FACECLOAK_MODEL_PATH or the cache (evaluation-only file)")
    return path


@pytest.fixture(scope="module")
def model(checkpoint_path: Path) -> mobilefacenet.MobileFaceNet:
    return mobilefacenet.build(checkpoint_path).freeze()


@pytest.fixture(scope="module")
def faces(faces_dir: Path) -> torch.Tensor:
    """Eight real ArcFace-aligned faces ``(8, 3, 112, 112)``, RGB in 0..1."""
    files = [p / f"{i:03d}.png" for p in sorted(faces_dir.iterdir())[:4] for i in (0, 5)]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def _to_model_input(faces: torch.Tensor) -> torch.Tensor:
    spec = REGISTRY["mobilefacenet"]
    src = align.template_keypoints(ARCFACE_TEMPLATE_112).unsqueeze(0)
    matrix = align.estimate_similarity(src, align.template_keypoints(spec.template))
    return align.warp_affine(faces, matrix.expand(len(faces), 2, 3), spec.input_size)


def test_checkpoint_state_dict_matches_the_architecture(checkpoint_path: Path) -> None:
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["net_state_dict"]
    built = mobilefacenet.build(checkpoint_path).state_dict()
    assert set(built) == set(state)
    for key, value in state.items():
        assert torch.equal(built[key], value), key


def test_build_names_the_file_when_a_tensor_is_missing(
    checkpoint_path: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    del checkpoint["net_state_dict"]["linear1.bn.running_var"]
    broken = tmp_path / "broken.ckpt"
    torch.save(checkpoint, broken)
    with pytest.raises(ModelStoreError, match="broken.ckpt"):
        mobilefacenet.build(broken)


def test_template_is_arcface_moved_8_pixels_left(faces: torch.Tensor) -> None:
    """Warping an ArcFace 112x112 crop to the 112x96 template is cropping columns 8..103."""
    warped = _to_model_input(faces)
    assert warped.shape == (len(faces), 3, 112, 96)
    torch.testing.assert_close(warped, faces[..., 8:104], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batch_size_does_not_change_embeddings(
    model: mobilefacenet.MobileFaceNet, faces: torch.Tensor, batch: int
) -> None:
    x = _to_model_input(faces)
    with torch.no_grad():
        whole = model(x)
        parts = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    assert whole.shape == (len(faces), 128)
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=1e-4)


def test_same_person_is_closer_than_strangers(
    model: mobilefacenet.MobileFaceNet, faces: torch.Tensor
) -> None:
    """Faces come in pairs of one identity: each one's nearest neighbour is its pair."""
    with torch.no_grad():
        e = torch.nn.functional.normalize(model(_to_model_input(faces)), dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    pair = torch.arange(len(faces)) ^ 1
    assert torch.equal(sim.argmax(1), pair)


def test_gradient_reaches_input_and_matches_finite_differences(
    checkpoint_path: Path, faces: torch.Tensor
) -> None:
    model = mobilefacenet.build(checkpoint_path).double().freeze()
    x = _to_model_input(faces[:1]).double().requires_grad_(True)
    target = model(_to_model_input(faces[2:3]).double()).detach()
    loss = (model(x) - target).square().sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.9
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())

    # Piecewise linear (PReLU): a tiny step crosses few kinks, hence h and rtol.
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    h = 1e-7
    with torch.no_grad():
        plus = (model(x + h * direction) - target).square().sum()
        minus = (model(x - h * direction) - target).square().sum()
    numeric = (plus - minus) / (2 * h)
    analytic = (grad * direction).sum()
    assert torch.isclose(analytic, numeric, rtol=2e-3), (analytic.item(), numeric.item())


def test_spec_is_registered_but_not_default() -> None:
    spec = REGISTRY["mobilefacenet"]
    assert not spec.default and spec.weights == (WEIGHTS,)
    assert spec.input_size == (112, 96) and spec.embedding_dim == 128
