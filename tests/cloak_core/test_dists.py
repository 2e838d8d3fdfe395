"""DISTS in torch against the authors' DISTS_pytorch code on real faces, and its behaviour."""

from __future__ import annotations

import importlib.util
import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cloak_core.dists import DISTS, load_dists, read_alpha_beta
from cloak_core.errors import ModelStoreError, UsageError
from cloak_core.lpips import read_flax_checkpoint

PARITY_ATOL = 1e-4
# torchvision's vgg16().features: 3x3 convolutions (each followed by a ReLU) and "M" pools.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                 512, 512, 512, "M")  # fmt: skip
# A region of rose_leslie1.jpg around the face BlazeFace finds at about (614, 121, 883, 391):
# 197 x 203 pixels, odd on purpose (the L2 pools then round up).
_PHOTO_FACE = ("rose_leslie1.jpg", (650, 155, 847, 358))


@pytest.fixture(scope="module")
def model(store) -> DISTS:
    torch.set_num_threads(1)
    return load_dists(store)


def _vgg16_features(ckpt: Path) -> nn.Sequential:
    """torchvision's VGG16 ``features`` (31 modules) with the ImageNet weights of ``ckpt``."""
    flat = read_flax_checkpoint(ckpt)
    layers: list[nn.Module] = []
    width_in, conv = 3, 0
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layer = nn.Conv2d(width_in, item, kernel_size=3, padding=1)
        kernel = flat[f"VGG16_0/Conv_{conv}/kernel"]  # Flax (kh, kw, in, out)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            layer.bias.copy_(torch.from_numpy(flat[f"VGG16_0/Conv_{conv}/bias"]))
        layers += [layer, nn.ReLU(inplace=True)]
        width_in, conv = item, conv + 1
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def reference(store) -> nn.Module:
    """The authors' DISTS (dists-pytorch 0.1) with the store's VGG16 and its own alpha/beta.

    Its module imports torchvision, which does not import beside the CPU torch build; a
    stand-in gives it ``models.vgg16(pretrained=True).features`` in torchvision's layout.
    """
    spec = importlib.util.find_spec("DISTS_pytorch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("reference implementation not installed (pip install dists-pytorch==0.1)")
    package = Path(next(iter(spec.submodule_search_locations)))
    features = _vgg16_features(store.resolve("lpips_vgg16.ckpt"))
    torchvision = types.ModuleType("torchvision")
    torchvision.models = types.SimpleNamespace(  # type: ignore[attr-defined]
        vgg16=lambda pretrained=False: types.SimpleNamespace(features=features)
    )
    torchvision.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torchvision", torchvision)
        mp.setitem(sys.modules, "torchvision.transforms", torchvision.transforms)
        source = importlib.util.spec_from_file_location("_dists_reference", package / "DISTS_pt.py")
        assert source is not None and source.loader is not None
        module = importlib.util.module_from_spec(source)
        source.loader.exec_module(module)
        ref = module.DISTS(load_weights=False)
    weights = torch.load(package / "weights.pt", map_location="cpu", weights_only=True)
    ref.alpha.data = weights["alpha"]
    ref.beta.data = weights["beta"]
    return ref.eval()


def _load(path: Path, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """An image (or a box of it) as ``(H, W, 3)`` float32 RGB in 0..1."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    if box is not None:
        rgb = rgb.crop(box)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, img.shape).astype(np.float32)
    return np.clip(img + noise, 0.0, 1.0)


def _nchw(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _faces(faces_dir: Path) -> list[np.ndarray]:
    """Three aligned 112x112 faces of different people."""
    identities = sorted(d for d in faces_dir.iterdir() if d.is_dir())[::8][:3]
    return [_load(d / "000.png") for d in identities]


def _parity_pairs(faces_dir: Path, photos_dir: Path, source: str) -> tuple[np.ndarray, ...]:
    """Clean images against their JPEG q75 and noisy versions (and another person's face)."""
    if source == "faces":
        a, b, c = _faces(faces_dir)
        x = [a, a, b, b, c, c, a]
        y = [_jpeg(a, 75), _noisy(a, 0.03), _jpeg(b, 75), _noisy(b, 0.03, 1), _jpeg(c, 75),
             _noisy(c, 0.03, 2), b]  # fmt: skip
    else:
        name, box = _PHOTO_FACE
        a = _load(photos_dir / name, box)
        x = [a, a]
        y = [_jpeg(a, 75), _noisy(a, 0.03)]
    return np.stack(x), np.stack(y)


@pytest.mark.parametrize("source", ["faces", "photo"])
def test_matches_the_reference_on_real_faces(
    model: DISTS, reference: nn.Module, faces_dir: Path, photos_dir: Path, source: str
):
    x, y = _parity_pairs(faces_dir, photos_dir, source)
    tx, ty = _nchw(*x), _nchw(*y)
    with torch.no_grad():
        got = model(tx, ty).numpy()
        expected = reference(tx, ty).reshape(-1).numpy()
    assert got.shape == (len(x),)
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL)
    assert (got > 0).all()
    if source == "faces":  # another person is farther than any distortion of one's own face
        assert got[-1] > got[:-1].max()


def test_identical_images_have_zero_distance(model: DISTS, faces_dir: Path):
    x = _nchw(*_faces(faces_dir))
    with torch.no_grad():
        assert model(x, x.clone()).tolist() == [0.0, 0.0, 0.0]


def test_distance_grows_with_noise(model: DISTS, faces_dir: Path):
    img = _nchw(_faces(faces_dir)[0])
    pattern = torch.randn(img.shape, generator=torch.Generator().manual_seed(1))
    noisy = torch.cat([(img + s * pattern).clamp(0, 1) for s in (0.01, 0.03, 0.1)])
    with torch.no_grad():
        d = model(img.expand_as(noisy), noisy)
    assert d[0] > 0 and torch.all(d[1:] > d[:-1]), d.tolist()


def test_gradients_reach_the_pixels_not_the_weights(model: DISTS, faces_dir: Path):
    x = _nchw(*_faces(faces_dir)[:2])
    x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    model(x, x_adv).sum().backward()
    assert x_adv.grad is not None and torch.isfinite(x_adv.grad).all()
    assert (x_adv.grad.abs().flatten(1).sum(1) > 0).all()
    assert not model.training
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_bad_shapes_are_usage_errors(model: DISTS):
    with pytest.raises(UsageError, match="same shape"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 32))
    with pytest.raises(UsageError, match="same shape"):
        model(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))


def test_weight_file_must_hold_alpha_and_beta(tmp_path: Path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"alpha": torch.ones(1, 1475, 1, 1)}, wrong)
    with pytest.raises(ModelStoreError, match="'alpha' and 'beta'"):
        read_alpha_beta(wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ModelStoreError, match="garbage.pt"):
        read_alpha_beta(garbage)
