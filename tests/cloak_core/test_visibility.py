"""The visibility panel against scikit-image, on real faces and photos, and the face grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cloak_core.errors import UsageError
from cloak_core.visibility import (
    GridRow,
    Visibility,
    VisibilityMeter,
    calibration,
    ciede2000,
    display_pair,
    face_region,
    jpeg_roundtrip,
    psnr,
    scielab,
    srgb_to_lab,
    ssim,
    ssimulacra2,
    summarise,
    write_grid,
)


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def meter(store) -> VisibilityMeter:
    return VisibilityMeter(store)


def test_lab_and_ciede2000_match_scikit_image(faces_dir, photos_dir) -> None:
    color = pytest.importorskip("skimage.color")
    face = _rgb(faces_dir / "Keanu_Reeves" / "009.png")
    photo = _rgb(photos_dir / "obama.jpg")[:300, :300]
    for img in (face, photo):
        assert np.abs(srgb_to_lab(img) - color.rgb2lab(img)).max() < 1e-3
        for changed in (jpeg_roundtrip(img, 75), _noisy(img, 6)):
            ours = ciede2000(srgb_to_lab(img), srgb_to_lab(changed))
            ref = color.deltaE_ciede2000(color.rgb2lab(img), color.rgb2lab(changed))
            assert np.abs(ours - ref).max() < 1e-3
            assert ours.mean() > 0.3


def test_ciede2000_is_zero_for_identical_images_and_grows_with_noise(faces_dir) -> None:
    face = _rgb(faces_dir / "Tina_Fey" / "003.png")
    lab = srgb_to_lab(face)
    assert np.all(ciede2000(lab, lab) == 0.0)
    means = [float(ciede2000(lab, srgb_to_lab(_noisy(face, s))).mean()) for s in (1, 4, 16)]
    assert 0 < means[0] < means[1] < means[2]
    with pytest.raises(UsageError):
        ciede2000(lab, lab[:10])


def _scielab_reference(a: np.ndarray, b: np.ndarray, samples_per_degree: float) -> np.ndarray:
    """S-CIELAB from scikit-image's colour conversions and CIEDE2000 and SciPy's spatial
    Gaussian filters (the image mirrored at its edges, as the panel does)."""
    color = pytest.importorskip("skimage.color")
    ndimage = pytest.importorskip("scipy.ndimage")
    to_opp = np.array(
        [
            [0.2787336, 0.7218031, -0.1065520],
            [-0.4487736, 0.2898056, 0.0771569],
            [0.0859513, -0.5899859, 0.5011089],
        ]
    )
    lobes = (
        ((1.00327, 0.05), (0.114416, 0.225), (-0.117686, 7.0)),
        ((0.616725, 0.0685), (0.383275, 0.826)),
        ((0.567885, 0.092), (0.432115, 0.6451)),
    )
    labs = []
    for img in (a, b):
        opp = color.rgb2xyz(img) @ to_opp.T
        for c, channel in enumerate(lobes):
            opp[..., c] = sum(
                w
                * ndimage.gaussian_filter(
                    opp[..., c],
                    hwhm * samples_per_degree / math.sqrt(2 * math.log(2)),
                    mode="reflect",
                    truncate=8.0,
                )
                for w, hwhm in channel
            )
        labs.append(color.xyz2lab(opp @ np.linalg.inv(to_opp).T))
    return color.deltaE_ciede2000(labs[0], labs[1])


def test_scielab_matches_a_spatial_reference(faces_dir, photos_dir) -> None:
    face = _rgb(faces_dir / "Keanu_Reeves" / "009.png")
    photo = _rgb(photos_dir / "rose_leslie1.jpg")[40:240, 60:300]
    for img, spd in ((face, 41.0), (photo, 41.0), (photo, 20.0)):
        for changed in (jpeg_roundtrip(img, 75), _noisy(img, 6)):
            ours = scielab(img, changed, spd)
            ref = _scielab_reference(img, changed, spd)
            assert ours.shape == img.shape[:2]
            assert np.abs(ours - ref).max() < 1e-3
    with pytest.raises(UsageError):
        scielab(face, face[:10])


def test_scielab_scores_a_uniform_change_as_ciede2000() -> None:
    a = np.full((40, 60, 3), (182, 140, 120), np.uint8)  # skin
    for shift in ((3, 3, 3), (6, 0, -4)):
        b = (a.astype(int) + shift).astype(np.uint8)
        plain = ciede2000(srgb_to_lab(a), srgb_to_lab(b))
        assert scielab(a, b) == pytest.approx(plain, abs=1e-6)
        assert plain.mean() > 0.5


def test_scielab_counts_patches_a_person_sees_over_fine_grain(photos_dir) -> None:
    """On a real face at display scale, fine grain and soft patches of one plain CIEDE2000:
    S-CIELAB scores the patches several times higher than the grain, and near their plain
    CIEDE2000. Plain CIEDE2000 calls the two equally visible; people do not."""
    import torch

    from cloak_core.filters import gaussian_blur

    photo = _rgb(photos_dir / "rose_leslie1.jpg")
    face, _ = display_pair(photo, photo, (40, 0, 340, 300))
    rng = np.random.default_rng(0)

    def luminance_change(field: np.ndarray, amplitude: float) -> np.ndarray:
        field = field / np.abs(field).std() * amplitude
        return np.clip(face + field[..., None], 0, 255).round().astype(np.uint8)

    grain = rng.normal(0, 1, face.shape[:2])
    soft = gaussian_blur(torch.tensor(rng.normal(0, 1, (1, 1, *face.shape[:2]))), 41, 8.0)
    soft = soft[0, 0].numpy()
    lab = srgb_to_lab(face)
    fine = luminance_change(grain, 3.0)
    target = ciede2000(lab, srgb_to_lab(fine)).mean()
    # The patches' amplitude set so their plain CIEDE2000 matches the grain's.
    low, high = 0.5, 10.0
    for _ in range(30):
        mid = (low + high) / 2
        if ciede2000(lab, srgb_to_lab(luminance_change(soft, mid))).mean() < target:
            low = mid
        else:
            high = mid
    patches = luminance_change(soft, (low + high) / 2)
    assert ciede2000(lab, srgb_to_lab(patches)).mean() == pytest.approx(target, rel=0.02)
    seen_fine, seen_patches = scielab(face, fine).mean(), scielab(face, patches).mean()
    assert seen_patches > 3 * seen_fine
    assert seen_patches > 0.8 * target


def test_ssimulacra2_matches_the_reference_package(
    tmp_path, faces_dir, photos_dir, monkeypatch
) -> None:
    """Against the PyPI ``ssimulacra2`` package (its own port of libjxl's tool), on real
    faces: a close-up's face region at display scale, an aligned face and an oblong crop
    of it (the borders are treated differently across and down), a grey face.

    Under 256 pixels the reference measures fewer than six scales and then reads its
    weights in sequence, so later channels' features land on other features' weights;
    ours keeps each feature on its own. The reference is given, for such a region, the
    weights of the scales it measured, in its order."""
    reference = pytest.importorskip("ssimulacra2")
    module = pytest.importorskip("ssimulacra2.ssimulacra2")
    full = module.weights.copy()
    score = module.Msssim.score

    def aligned_score(self):
        kept = full.reshape(3, 6, 6)[:, : len(self.scales)].reshape(-1)
        monkeypatch.setattr(module, "weights", np.concatenate([kept, np.zeros(full.size)]))
        return score(self)

    monkeypatch.setattr(module.Msssim, "score", aligned_score)
    photo = _rgb(photos_dir / "rose_leslie1.jpg")
    close, _ = display_pair(photo, photo, (580, 80, 920, 430))
    aligned = _rgb(faces_dir / "Keanu_Reeves" / "009.png")
    grey = np.repeat(aligned.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    cases = [
        (close, jpeg_roundtrip(close, 90)),
        (close, _noisy(close, 3)),
        (aligned, jpeg_roundtrip(aligned, 50)),
        (aligned[:61, :97].copy(), _noisy(aligned[:61, :97], 6)),
        (grey, jpeg_roundtrip(grey, 75)),
    ]
    for k, (a, b) in enumerate(cases):
        Image.fromarray(a).save(tmp_path / f"{k}a.png")
        Image.fromarray(b).save(tmp_path / f"{k}b.png")
        ref = reference.compute_ssimulacra2(
            str(tmp_path / f"{k}a.png"), str(tmp_path / f"{k}b.png")
        )
        assert ssimulacra2(a, b) == pytest.approx(ref, abs=1e-6)
    assert ssimulacra2(close, close) == 100.0
    q90, q50 = jpeg_roundtrip(aligned, 90), jpeg_roundtrip(aligned, 50)
    assert 100 > ssimulacra2(aligned, q90) > 85 > ssimulacra2(aligned, q50) > 0
    with pytest.raises(UsageError):
        ssimulacra2(close, close[:, :-1])


def test_ssimulacra2_sees_soft_patches_that_ciede2000_calls_small(photos_dir) -> None:
    """On a real face at display scale, soft luminance patches with less than half the
    plain CIEDE2000 of a JPEG q90 re-encoding (which nobody sees) score lower than it."""
    import torch

    from cloak_core.filters import gaussian_blur

    photo = _rgb(photos_dir / "rose_leslie1.jpg")
    face, _ = display_pair(photo, photo, (580, 80, 920, 430))
    field = gaussian_blur(
        torch.tensor(np.random.default_rng(0).normal(0, 1, (1, 1, *face.shape[:2]))), 41, 8.0
    )
    field = field[0, 0].numpy()
    patches = np.clip(face + (field / field.std() * 1.5)[..., None], 0, 255).round()
    patches = patches.astype(np.uint8)
    q90, q75 = jpeg_roundtrip(face, 90), jpeg_roundtrip(face, 75)
    lab = srgb_to_lab(face)
    assert (
        ciede2000(lab, srgb_to_lab(patches)).mean() < 0.5 * ciede2000(lab, srgb_to_lab(q90)).mean()
    )
    assert ssimulacra2(face, patches) < ssimulacra2(face, q90)
    assert 0 < ssimulacra2(face, q75) < ssimulacra2(face, q90) < 100


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
    img = _rgb(faces_dir / "Barack_Obama" / "000.png")
    rng = np.random.default_rng(0)
    values = []
    for sigma in (2, 8, 32):
        noisy = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
        values.append(ssim(img, noisy))
    assert 1.0 > values[0] > values[1] > values[2] > 0.0


def test_ssim_and_psnr_match_scikit_image(faces_dir) -> None:
    metrics = pytest.importorskip("skimage.metrics")
    img = _rgb(faces_dir / "Barack_Obama" / "000.png")
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


def test_summary_leaves_out_inf_and_names_the_worst() -> None:
    def panel(de: float, p: float) -> Visibility:
        return Visibility(de, de, 100 - de, de, de, p, 0.9, 0.1, 0.1, 0.01, (112, 112))

    s = summarise([panel(1.0, 30.0), panel(3.0, math.inf), panel(2.0, 40.0)])
    assert s["de2000_mean"] == {"mean": 2.0, "median": 2.0, "worst": 3.0}
    assert s["psnr"] == {"mean": 35.0, "median": 35.0, "worst": 30.0}
    assert math.isnan(summarise([panel(1.0, math.inf)])["psnr"]["mean"])


def test_learned_metrics_batch_like_single_calls(meter, faces_dir) -> None:
    face = _rgb(faces_dir / "Barack_Obama" / "000.png")
    small = face[:64, :80].copy()
    pairs = [
        (face, _noisy(face, 2)),
        (small, np.clip(small.astype(int) + 9, 0, 255).astype(np.uint8)),
        (face, _noisy(face, 20)),
        (face[:40, :50].copy(), _noisy(face[:40, :50], 5)),
    ]
    together = meter.measure_pairs(pairs)
    alone = [meter.measure_pairs([p])[0] for p in pairs]
    for a, b in zip(together, alone, strict=True):
        for key in ("dists", "lpips_vgg", "lpips_alex"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-4, abs=1e-6)
    assert 0 < together[0].dists < together[2].dists
    assert math.isnan(meter.measure_pairs([(face[:8, :8].copy(), face[:8, :8].copy())])[0].ssim)


def test_face_region_grows_the_box_and_stays_inside() -> None:
    assert face_region((100, 200), (50, 20, 90, 60)) == (44, 14, 96, 66)
    assert face_region((100, 200), (0, 0, 100, 100)) == (0, 0, 115, 100)


def test_display_pair_scales_large_regions_down_only(photos_dir) -> None:
    photo = _rgb(photos_dir / "obama.jpg")
    a, b = display_pair(photo, photo, (0, 0, photo.shape[1], photo.shape[0]), max_side=256)
    assert max(a.shape[:2]) == 256 and a.shape == b.shape
    a, _ = display_pair(photo, photo, (10, 10, 110, 60))
    assert a.shape == (50, 100, 3)


def test_panel_on_real_photos(meter, photos_dir) -> None:
    from cloak_core.detect import FaceDetector
    from cloak_core.store import ModelStore

    photo = _rgb(photos_dir / "obama.jpg")
    with FaceDetector(ModelStore.from_env()) as detector:
        boxes = [f.box for f in detector.detect(photo)]
    assert boxes
    same = meter.measure_faces(photo, photo, boxes)[0]
    assert same.de2000_mean == 0 and same.psnr == math.inf and same.ssim == pytest.approx(1.0)
    assert same.dists == pytest.approx(0.0, abs=1e-4) and same.lpips_vgg == pytest.approx(0.0)
    assert same.as_dict()["psnr"] is None
    q90 = meter.measure_faces(photo, jpeg_roundtrip(photo, 90), boxes)[0]
    q75 = meter.measure_faces(photo, jpeg_roundtrip(photo, 75), boxes)[0]
    noisy = meter.measure_faces(photo, _noisy(photo, 8), boxes)[0]
    assert same.scielab_mean == 0 and 0 < q90.scielab_mean < 0.6 < q90.de2000_mean
    assert same.ssimulacra2 == 100 and same.as_dict()["ssimulacra2"] == 100
    for worse, better in ((q75, q90), (noisy, q75)):
        assert worse.ssimulacra2 < better.ssimulacra2
        assert worse.scielab_mean > better.scielab_mean
        assert worse.scielab_p95 > better.scielab_p95
        assert worse.de2000_mean > better.de2000_mean
        assert worse.de2000_p95 > better.de2000_p95
        assert worse.psnr < better.psnr
        assert worse.ssim < better.ssim
        assert worse.dists > better.dists
        assert worse.lpips_vgg > better.lpips_vgg
    # The panel sees the face region at display scale: PSNR there is that of the crop.
    region = face_region(photo.shape[:2], boxes[0])
    a, b = display_pair(photo, jpeg_roundtrip(photo, 75), region)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert q75.psnr == pytest.approx(10 * math.log10(255**2 / mse))


def test_calibration_rows_are_measured(meter, faces_dir) -> None:
    faces = [_rgb(p) for p in sorted((faces_dir / "Will_Smith").glob("*.png"))[:3]]
    regions = [(0, 0, 112, 112)] * len(faces)
    rows = calibration(meter, faces, regions)
    assert list(rows) == ["jpeg90", "jpeg75"]
    direct = meter.measure_pairs([(f, jpeg_roundtrip(f, 75)) for f in faces])
    assert [p.de2000_mean for p in rows["jpeg75"]] == [p.de2000_mean for p in direct]
    s90, s75 = summarise(rows["jpeg90"]), summarise(rows["jpeg75"])
    assert 0 < s90["de2000_mean"]["mean"] < s75["de2000_mean"]["mean"]
    assert s75["psnr"]["worst"] == min(p.psnr for p in rows["jpeg75"])


def test_grid_shows_original_protected_and_amplified_difference(tmp_path, faces_dir) -> None:
    face = _rgb(faces_dir / "Hugh_Laurie" / "018.png")
    changed = face.copy()
    changed[40:60, 40:60] = np.clip(changed[40:60, 40:60].astype(int) + 3, 0, 255)
    path = tmp_path / "grid.png"
    write_grid([GridRow("Hugh Laurie", face, {"balanced": changed})], path, height=112)
    grid = np.array(Image.open(path).convert("RGB"))
    assert grid.shape[0] == 18 + 14 + 112 + 4 + 4 and grid.shape[1] == 3 * 112 + 4 * 4
    diff = grid[36:148, 4 + 2 * (112 + 4) : 4 + 2 * (112 + 4) + 112]
    assert diff[50, 50].min() >= 25  # 3 levels x 10, up to rounding of unchanged edges
    assert diff[5, 5].max() == 0
    with pytest.raises(UsageError):
        write_grid([], path)
