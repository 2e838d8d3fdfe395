"""cloak_core.align against OpenCV and exact references, on real photos."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.align import estimate_similarity, template_keypoints, translate, warp_affine
from cloak_core.models.base import ARCFACE_TEMPLATE_112


@pytest.fixture(scope="module")
def photo(photos_dir) -> np.ndarray:
    """obama.jpg, (1137, 910, 3) uint8 RGB."""
    return np.asarray(Image.open(photos_dir / "obama.jpg").convert("RGB"))


def similarity(scale: float, degrees: float, tx: float, ty: float) -> np.ndarray:
    t = math.radians(degrees)
    c, s = scale * math.cos(t), scale * math.sin(t)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def as_batch(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) -> (1, 3, H, W) float64 in 0..255."""
    return torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]


def to_image(batch: torch.Tensor) -> np.ndarray:
    return batch[0].permute(1, 2, 0).detach().numpy()


# Landmarks of the face in obama.jpg as a detector reports them (x, y pixels).
FACE = np.array([[441.9, 223.9], [558.8, 221.1], [510.1, 287.2], [508.4, 343.3]])


def test_similarity_recovers_an_exact_transform():
    template = template_keypoints(ARCFACE_TEMPLATE_112).numpy()
    for scale, degrees, tx, ty in [(0.31, 8.0, -120.5, 40.25), (2.5, -170.0, 3.0, -7.0)]:
        truth = similarity(scale, degrees, tx, ty)
        src = FACE
        dst = apply(truth, src)
        got = estimate_similarity(torch.from_numpy(src)[None], torch.from_numpy(dst))[0]
        np.testing.assert_allclose(got.numpy(), truth, atol=1e-9)
        # OpenCV's robust estimator agrees on noise-free points.
        cv, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
        np.testing.assert_allclose(got.numpy(), cv, atol=1e-3)  # LMEDS refines iteratively
    # and the template maps onto itself by the identity
    eye = estimate_similarity(torch.from_numpy(template)[None], torch.from_numpy(template))[0]
    np.testing.assert_allclose(eye.numpy(), np.eye(2, 3), atol=1e-12)


def test_similarity_is_the_least_squares_fit():
    """With noisy points: the same as a direct linear least-squares solve of
    [x -y 1 0; y x 0 1] (a, b, tx, ty) = dst, for a batch."""
    rng = np.random.default_rng(0)
    template = template_keypoints(ARCFACE_TEMPLATE_112).numpy()
    src = FACE[None] + rng.normal(0, 6.0, (5, 4, 2))
    got = estimate_similarity(torch.from_numpy(src), torch.from_numpy(template)).numpy()
    assert got.shape == (5, 2, 3)
    for i in range(5):
        x, y = src[i, :, 0], src[i, :, 1]
        one, zero = np.ones(4), np.zeros(4)
        a = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
        b = np.concatenate([template[:, 0], template[:, 1]])
        (p, q, tx, ty), *_ = np.linalg.lstsq(a, b, rcond=None)
        np.testing.assert_allclose(got[i], [[p, -q, tx], [q, p, ty]], atol=1e-9)
        assert np.linalg.det(got[i, :, :2]) > 0  # a rotation and scale, never a mirror


def bilinear_reference(image: np.ndarray, matrix: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Independent bilinear warp in numpy: zeros outside, pixel centres at integers."""
    h, w = image.shape[:2]
    inv = cv2.invertAffineTransform(matrix)
    v, u = np.mgrid[0 : out[0], 0 : out[1]].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)))

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = (yy >= -1) & (yy <= h) & (xx >= -1) & (xx <= w)
        val = padded[np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]
        return np.where(inside[..., None], val, 0.0)

    return (
        at(y0, x0) * (1 - fx) * (1 - fy)
        + at(y0, x0 + 1) * fx * (1 - fy)
        + at(y0 + 1, x0) * (1 - fx) * fy
        + at(y0 + 1, x0 + 1) * fx * fy
    )


MATRICES = {
    "face to 112": lambda: estimate_similarity(
        torch.from_numpy(FACE)[None], template_keypoints(ARCFACE_TEMPLATE_112)
    )[0].numpy(),
    "upscale, rotated, off the edge": lambda: similarity(1.7, -25.0, 60.0, 50.0),
    "downscale": lambda: similarity(0.2, 3.0, 10.5, -4.25),
}


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_warp_matches_opencv_and_numpy(photo, name):
    matrix = MATRICES[name]()
    out = (112, 112) if name == "face to 112" else (240, 200)
    got = to_image(warp_affine(as_batch(photo), torch.from_numpy(matrix)[None], out))
    cv = cv2.warpAffine(
        photo.astype(np.float32),
        matrix,
        (out[1], out[0]),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    assert np.abs(got - cv).max() < 0.02  # 0..255 units; OpenCV computes in float32
    np.testing.assert_allclose(got, bilinear_reference(photo, matrix, out), atol=1e-6)
    if name == "upscale, rotated, off the edge":
        assert (got == 0).all(-1).any() and (got > 0).any()  # both outside and inside


def test_warp_of_a_padded_region_equals_the_full_image(photo):
    """Warping only a region around the face, with ``translate``, gives the same crop."""
    matrix = torch.from_numpy(MATRICES["face to 112"]())[None]
    full = warp_affine(as_batch(photo), matrix, (112, 112))
    x0, y0, x1, y1 = 250, 40, 760, 540  # the face (box 352..630, 145..423) and a margin
    region = np.ascontiguousarray(photo[y0:y1, x0:x1])
    moved = translate(matrix, torch.tensor([[x0, y0]], dtype=torch.float64))
    crop = warp_affine(as_batch(region), moved, (112, 112))
    torch.testing.assert_close(crop, full, atol=1e-9, rtol=0)
    # float32 (what the attack uses) agrees too
    crop32 = warp_affine(as_batch(region).float(), moved, (112, 112))
    torch.testing.assert_close(crop32.double(), full, atol=1e-2, rtol=0)  # of 255


def test_aligned_faces_realign_to_themselves(faces_dir):
    """ArcFace-aligned crops re-aligned from the template's own keypoints are unchanged."""
    template = template_keypoints(ARCFACE_TEMPLATE_112)
    paths = [sorted(p.glob("*.png"))[0] for p in sorted(faces_dir.iterdir())[:6]]
    faces = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    batch = torch.from_numpy(faces.astype(np.float32) / 255).permute(0, 3, 1, 2)
    matrices = estimate_similarity(template.expand(len(paths), 4, 2), template)
    out = warp_affine(batch, matrices, (112, 112))
    torch.testing.assert_close(out, batch, atol=1e-5, rtol=0)  # float32 rounding only


def test_gradients_flow_through_the_warp(photo):
    matrix = torch.from_numpy(MATRICES["face to 112"]())[None]
    region = torch.from_numpy(photo[40:540, 250:760].astype(np.float32) / 255)
    x = region.permute(2, 0, 1)[None].clone().requires_grad_(True)
    moved = translate(matrix, torch.tensor([[250.0, 40.0]], dtype=torch.float64))
    out = warp_affine(x, moved, (112, 112))
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Bilinear sampling reads 4 source pixels per output pixel: shrinking a 373-pixel face
    # to 112 pixels reaches about (2 * 112 / 373)^2 = 36% of the face's pixels, 20% of
    # this region; pixels outside the face get none.
    touched = (x.grad.abs().sum(1)[0] > 0).float().mean()
    assert 0.15 < touched < 0.25, touched
    small = x.detach()[:, :, :12, :12].double().requires_grad_(True)
    scaled = torch.tensor([[[0.9, -0.1, 1.3], [0.1, 0.9, 0.7]]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: warp_affine(t, scaled, (10, 10)), (small,))
