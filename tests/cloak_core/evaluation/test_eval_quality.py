"""PSNR, SSIM and the LPIPS helper against hand-computed values and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cloak_core.errors import UsageError
from cloak_core.evaluation.quality import QualityStats, lpips_distances, psnr, ssim


def _face(faces_dir) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(faces_dir / "Barack_Obama" / "000.png").convert("RGB"))


def test_psnr_by_hand() -> None:
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a + 5
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))
    assert psnr(a, a) == math.inf
    with pytest.raises(UsageError):
        psnr(a, a[:8])


def test_ssim_of_constant_images_by_hand() -> None:
    # Constant images: no variance, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) exactly.
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    x = np.full((20, 20, 3), a, np.uint8)
    y = np.full((20, 20, 3), b, np.uint8)
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
    assert ssim(x, x) == pytest.approx(1.0)


def test_ssim_falls_with_noise(faces_dir) -> None:
    img = _face(faces_dir)
    rng = np.random.default_rng(0)
    values = []
    for sigma in (2, 8, 32):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
        values.append(ssim(img, noisy))
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ssim_and_psnr_match_scikit_image(faces_dir) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    img = _face(faces_dir)
    rng = np.random.default_rng(1)
    for sigma in (3, 12):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
        ref = metrics.structural_similarity(
            img,
            noisy,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        assert ssim(img, noisy) == pytest.approx(ref, abs=1e-9)
        ref_psnr = metrics.peak_signal_noise_ratio(img, noisy, data_range=255)
        assert psnr(img, noisy) == pytest.approx(ref_psnr, abs=1e-9)


def test_quality_stats_leave_out_inf() -> None:
    st = QualityStats.of([30.0, math.inf, 40.0, 20.0])
    assert (st.mean, st.median, st.min, st.max) == (30.0, 30.0, 20.0, 40.0)
    assert math.isnan(QualityStats.of([math.inf]).mean)


def test_lpips_distances_batches_like_single_calls(store, faces_dir) -> None:
    import torch

    from cloak_core.lpips import load_lpips

    lpips = load_lpips("alex", store=store)
    img = _face(faces_dir)
    rng = np.random.default_rng(2)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255).astype(np.uint8) for s in (2, 20)]
    small = img[:64, :80].copy()
    originals = [img, img, small, img]
    changed = [img, noisy[0], np.clip(small.astype(int) + 9, 0, 255).astype(np.uint8), noisy[1]]
    got = lpips_distances(lpips, originals, changed, batch_size=2)
    with torch.no_grad():
        ref = [
            float(
                lpips(
                    torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255,
                    torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255,
                )
            )
            for a, b in zip(originals, changed, strict=True)
        ]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert got[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < got[1] < got[3]
