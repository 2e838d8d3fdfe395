"""Differentiable face alignment: similarity transforms and warps on tensors.

Pixel coordinates follow OpenCV: the centre of pixel ``(i, j)`` (row, column) is at
``(x, y) = (j, i)``. A matrix of shape ``(2, 3)`` maps source pixel coordinates to
output pixel coordinates, as ``cv2.warpAffine`` takes it.

Alignment uses four landmarks that both the detector and every template have: the eye
on the image's left, the eye on the image's right, the nose tip and the mouth centre.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def template_keypoints(template: Sequence[Sequence[float]]) -> torch.Tensor:
    """The four alignment keypoints ``(4, 2)`` of a five-point template (mouth corners averaged)."""
    t = torch.as_tensor(template, dtype=torch.float64)
    return torch.cat([t[:3], t[3:5].mean(0, keepdim=True)], 0)


def estimate_similarity(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) from ``src`` to ``dst``.

    ``src`` is ``(B, K, 2)`` pixel coordinates, ``dst`` ``(K, 2)`` or ``(B, K, 2)``.
    Returns ``(B, 2, 3)`` matrices mapping ``src`` points onto ``dst`` (Umeyama, no
    reflection), in float64.
    """
    src = src.to(torch.float64)
    dst = dst.to(torch.float64).expand_as(src)
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - mu_s, dst - mu_d
    # Complex-number form of the 2-D similarity: d ~ a * s with a = scale * e^{i theta}.
    sx, sy, dx, dy = s[..., 0], s[..., 1], d[..., 0], d[..., 1]
    norm = (sx * sx + sy * sy).sum(1)
    a = (sx * dx + sy * dy).sum(1) / norm
    b = (sx * dy - sy * dx).sum(1) / norm
    rot = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (B, 2, 2)
    t = mu_d.squeeze(1) - (rot @ mu_s.squeeze(1).unsqueeze(-1)).squeeze(-1)
    return torch.cat([rot, t.unsqueeze(-1)], -1)


def translate(matrices: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Re-express ``(B, 2, 3)`` matrices for a source cropped at ``offset`` ``(B, 2)`` = (x0, y0).

    If ``M`` maps full-image pixels to output pixels, the result maps crop pixels (whose
    origin is the full image's pixel ``offset``) to the same output pixels.
    """
    out = matrices.clone()
    out[..., 2] = matrices[..., 2] + (
        matrices[..., :2] @ offset.to(matrices).unsqueeze(-1)
    ).squeeze(-1)
    return out


def _normaliser(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(3, 3)`` map from pixel coordinates to grid_sample's [-1, 1] (align_corners=False)."""
    return torch.tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0, 0, 1]],
        dtype=dtype,
        device=device,
    )


def warp_affine(
    images: torch.Tensor, matrices: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """Warp ``images`` ``(B, C, H, W)`` by ``matrices`` ``(B, 2, 3)`` to ``(B, C, h, w)``.

    ``out_size`` is ``(h, w)``. Bilinear sampling, zeros outside the source; differentiable
    in ``images`` (``affine_grid`` + ``grid_sample``). ``images`` may be a padded region
    around a face: use :func:`translate` to express the matrices in its coordinates.
    """
    b, _, h_in, w_in = images.shape
    h_out, w_out = out_size
    dev = images.device
    full = torch.zeros(b, 3, 3, dtype=torch.float64, device=dev)
    full[:, :2] = matrices.to(device=dev, dtype=torch.float64)
    full[:, 2, 2] = 1.0
    n_in = _normaliser(h_in, w_in, torch.float64, dev)
    n_out = _normaliser(h_out, w_out, torch.float64, dev)
    # output grid [-1,1] -> output pixels -> source pixels -> source grid [-1,1]
    theta = n_in @ torch.linalg.inv(full) @ torch.linalg.inv(n_out)
    grid = F.affine_grid(
        theta[:, :2].to(images.dtype), [b, images.shape[1], h_out, w_out], align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def footprint(matrices: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Bounding boxes ``(B, 4)`` = (x0, y0, x1, y1), in source pixels, of what a warp samples.

    ``matrices`` ``(B, 2, 3)`` map source pixels to an output of ``out_size`` = ``(h, w)``;
    the box covers the source area that the output's corners map back to.
    """
    h, w = out_size
    corners = torch.tensor(
        [[-0.5, -0.5, 1.0], [w - 0.5, -0.5, 1.0], [-0.5, h - 0.5, 1.0], [w - 0.5, h - 0.5, 1.0]],
        dtype=torch.float64,
    )
    full = torch.zeros(matrices.shape[0], 3, 3, dtype=torch.float64)
    full[:, :2] = matrices.to(torch.float64).cpu()
    full[:, 2, 2] = 1.0
    src = (torch.linalg.inv(full) @ corners.T).transpose(1, 2)[..., :2]  # (B, 4, 2)
    return torch.cat([src.amin(1), src.amax(1)], -1)


def align_faces(
    image: torch.Tensor,
    landmarks: torch.Tensor,
    template: Sequence[Sequence[float]],
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Aligned crops ``(N, C, h, w)`` of the faces of one image, warped from a padded region only.

    ``image`` is ``(C, H, W)`` (any value range), ``landmarks`` ``(N, 4, 2)`` in its pixels
    (the four alignment keypoints), ``template`` a five-point template in the pixels of an
    output of ``out_size`` = ``(h, w)``. Only the region each crop samples is read, so the
    cost does not grow with the image's size.
    """
    if landmarks.shape[0] == 0:
        return image.new_zeros((0, image.shape[0], *out_size))
    mats = estimate_similarity(landmarks, template_keypoints(template))
    boxes = footprint(mats, out_size)
    _, height, width = image.shape
    crops = []
    for m, box in zip(mats, boxes, strict=True):
        x0 = int(max(0, min(width - 1, float(box[0]) - 2)))
        y0 = int(max(0, min(height - 1, float(box[1]) - 2)))
        x1 = int(max(x0 + 1, min(width, float(box[2]) + 3)))
        y1 = int(max(y0 + 1, min(height, float(box[3]) + 3)))
        region = image[:, y0:y1, x0:x1].unsqueeze(0)
        local = translate(m.unsqueeze(0), torch.tensor([[x0, y0]], dtype=torch.float64))
        # Shrink large faces first with an anti-aliased resize, so the bilinear warp does not
        # alias (as dlib's chip extractor and cv2.INTER_AREA avoid it too).
        src_per_out = 1.0 / float(torch.linalg.det(m[:, :2]).abs().sqrt())
        if src_per_out > 1.5:
            h_r, w_r = region.shape[-2:]
            size = (max(1, round(h_r / src_per_out)), max(1, round(w_r / src_per_out)))
            region, local = resize_region(region, local, size)
        crops.append(warp_affine(region, local, out_size))
    return torch.cat(crops, 0)


def resize_region(
    region: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anti-aliased bilinear resize of ``region`` ``(B, C, H, W)`` to ``size`` = ``(h, w)``.

    Returns the resized ``(B, C, h, w)`` and ``matrices`` ``(B, 2, 3)`` re-expressed so they
    map resized pixels to the same outputs as they mapped ``region`` pixels. Differentiable.
    """
    h_in, w_in = region.shape[-2:]
    h, w = size
    resized = F.interpolate(region, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized, matrices @ resized_to_region(h_in, w_in, h, w).to(matrices)


def resized_to_region(h_in: int, w_in: int, h: int, w: int) -> torch.Tensor:
    """``(3, 3)`` map from pixels of a resized ``(h, w)`` copy to its ``(h_in, w_in)`` original."""
    sx, sy = w_in / w, h_in / h
    return torch.tensor(
        [[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64
    )
