"""The LowKey attack: signed gradient ascent on face regions against an ensemble.

For a batch of face regions ``x`` (each a padded crop of a photo around one face, at a
working resolution), the attack looks for ``x'`` maximising

    sum over models f of  D_f(A_f(x), A_f(x')) + D_f(A_f(x), A_f(G(x')))  -  c * LPIPS(x, x')

where ``A_f`` aligns a face to model ``f``'s template (:mod:`cloak_core.align`), ``G`` is a
Gaussian blur, embeddings are averaged with those of the horizontally flipped crops, and
``D_f`` is either the paper's normalised squared distance ``||f(a) - f(b)||^2 / ||f(a)||^2``
(``paper`` preset) or a capped, per-model term that follows the model's own verification
rule: ``min(1, (1 - cos) / (1 - target))`` for cosine models and
``min(1, distance / (ratio * threshold))`` for Euclidean ones. The paper's plain sum is
dominated by the model whose distance grows fastest (SFace saturates near 4 while dlib's
term stays small); capping each term at "decisively a different person" lets a model that
is already fooled stop pulling, so the remaining steps go to the models that are not.

All faces of a call are optimised together, one batched forward and backward per model
per step, so a GPU runs a whole step in a few large calls.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cloak_core.align import warp_affine
from cloak_core.errors import CancelledError
from cloak_core.lpips import LPIPS
from cloak_core.models.base import FaceModel
from cloak_core.presets import AttackConfig


@dataclass(frozen=True)
class FaceBatch:
    """Face regions ready for the attack, all on one device.

    ``pixels``: ``(B, 3, H, W)`` RGB in 0..1, regions zero-padded to a common size.
    ``masks``: ``(B, 1, H, W)`` feathered masks in 0..1 (0 on padding and region borders).
    ``matrices``: per model name, ``(B, 2, 3)`` maps from region pixels to the model input.
    ``area``: ``(B,)`` fraction of the padded area each region really covers.
    ``upscale``: per region, how many pixels one working pixel becomes where the photo's
    quality is measured (the whole photo scaled to at most a few megapixels), at least 1;
    empty means 1 for all.
    """

    pixels: torch.Tensor
    masks: torch.Tensor
    matrices: Mapping[str, torch.Tensor]
    area: torch.Tensor
    upscale: tuple[float, ...] = ()


def gaussian_blur(images: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images, reflect padding, same shape."""
    half = kernel // 2
    x = torch.arange(kernel, dtype=images.dtype, device=images.device) - half
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (half, half, half, half), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(out, k.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def embed(
    model: FaceModel, regions: torch.Tensor, matrices: torch.Tensor, flips: bool
) -> torch.Tensor:
    """Embeddings ``(B, D)`` of faces aligned from ``regions`` ``(B, 3, H, W)`` (0..1).

    With ``flips``, the embedding is the mean of the crop's and its mirror image's.
    """
    crops = warp_affine(regions, matrices, model.spec.input_size)
    if not flips:
        return model(crops).float()
    both = model(torch.cat([crops, crops.flip(-1)], 0)).float()
    return 0.5 * (both[: crops.shape[0]] + both[crops.shape[0] :])


def model_term(
    model: FaceModel, original: torch.Tensor, protected: torch.Tensor, config: AttackConfig
) -> torch.Tensor:
    """Per-face objective ``(B,)`` of one model: how far ``protected`` moved from ``original``.

    Both are ``(B, D)`` embeddings. See the module docstring for the two forms.
    """
    rule = model.spec.verification
    if rule.metric == "cosine" and config.cosine_target is not None:
        cos = F.cosine_similarity(protected, original, dim=-1)
        return ((1 - cos) / (1 - config.cosine_target)).clamp(max=1.0)
    if rule.metric == "euclidean" and config.euclidean_target_ratio is not None:
        dist = ((protected - original).pow(2).sum(-1) + 1e-12).sqrt()
        return (dist / (config.euclidean_target_ratio * rule.threshold)).clamp(max=1.0)
    return (protected - original).pow(2).sum(-1) / original.pow(2).sum(-1)


class StageTimes:
    """Accumulates wall-clock seconds per named stage (synchronising CUDA for honest numbers)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` body under ``name``."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def lowkey(
    batch: FaceBatch,
    models: Mapping[str, FaceModel],
    lpips: LPIPS,
    config: AttackConfig,
    *,
    generator: torch.Generator | None = None,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
    times: StageTimes | None = None,
) -> torch.Tensor:
    """Run the attack; returns the perturbation ``(B, 3, H, W)`` (masked, within [0, 1] bounds).

    ``batch.pixels + perturbation`` is the protected region, in 0..1. ``progress`` is called
    with steps done / steps planned after every step; setting ``cancel`` stops the attack
    with :class:`CancelledError`. ``times``, when given, collects seconds per stage:
    alignment, each model's forward and backward, LPIPS.
    """
    x = batch.pixels
    mask = batch.masks
    times = times or StageTimes(x.device)
    use_amp = x.device.type == "cuda"
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_amp)
    with torch.no_grad(), autocast:
        originals = {
            name: embed(m, x, batch.matrices[name], config.flips) for name, m in models.items()
        }
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    delta = ((noise * 2 - 1) * config.noise).requires_grad_(True)
    views = view_schedule(config)
    lpips_x = _lpips_view(x, config.lpips_size)
    capped = config.cosine_target is not None or config.euclidean_target_ratio is not None
    met_streak = 0  # consecutive steps whose views all met every model's cap
    needed = len(views) if config.sample_views else 1  # ... covering every view once
    velocity = torch.zeros_like(delta) if config.momentum else None
    # Faces still moving (1) or frozen at their LPIPS budget (0), and the last delta.
    active = torch.ones(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)
    previous = delta.detach().clone() if config.lpips_budget is not None else None
    for step in range(config.steps):
        if cancel is not None and cancel.is_set():
            raise CancelledError("protection was cancelled")
        delta.grad = None
        step_views = [views[step % len(views)]] if config.sample_views else views
        blurred = [b for b, _ in step_views]
        with times.stage("blur"):
            adv = (x + mask * delta).clamp(0.0, 1.0)
            images = [
                gaussian_blur(adv, config.blur_kernel, config.blur_sigma) if b else adv
                for b in dict.fromkeys(blurred)
            ]
            stacked = torch.cat(images, 0)
        n_images = len(images)
        # One backward per model (gradients accumulate in delta.grad): the graph of one
        # model is freed before the next one runs, and each stage can be timed.
        met = True
        for name, model in models.items():
            with times.stage("align"):
                crops = warp_affine(
                    stacked, batch.matrices[name].repeat(n_images, 1, 1), model.spec.input_size
                )
                flip_all = config.flips and not config.sample_views
                if flip_all:
                    crops = torch.cat([crops, crops.flip(-1)], 0)
                elif step_views[0][1]:
                    crops = crops.flip(-1)
            with times.stage(f"{name} forward"), autocast:
                emb = model(crops).float()
                if flip_all:
                    half = emb.shape[0] // 2
                    emb = 0.5 * (emb[:half] + emb[half:])
                orig = originals[name].repeat(n_images, 1)
                terms = model_term(model, orig, emb, config)
                met = met and bool((terms >= 1.0).all())
            with times.stage(f"{name} backward"):
                (terms.sum() / n_images).backward(retain_graph=True)
        met_streak = met_streak + 1 if met else 0
        if config.early_stop and capped and met_streak >= needed:
            if progress is not None:
                progress(1.0)
            break
        with times.stage("lpips forward"), autocast:
            # LPIPS averages over the padded area: scale back to each region's own area.
            per_face = _per_face_lpips(lpips, lpips_x, adv, batch, config)
        with times.stage("lpips backward"):
            (-config.lpips_weight * per_face.sum()).backward()
        with torch.no_grad():
            if previous is not None:
                # A face past its budget goes back to its last delta and stays there.
                _hold_budget(per_face, config.lpips_budget, delta, previous, active)
                if not bool(active.any()):
                    break
            grad = delta.grad
            if config.grad_sigma:
                # Smoothing the gradient before its sign (as translation-invariant attacks
                # do) gives a smoother perturbation: less visible texture, more of it
                # surviving JPEG and resizing, and better transfer to unseen models.
                grad = _smooth(grad, config.grad_sigma)
            if config.smooth_upscaled:
                grad = _smooth_upscaled(grad, batch, config.smooth_upscaled)
            if velocity is not None:
                scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                velocity.mul_(config.momentum).add_(grad / scale)
                grad = velocity
            if previous is not None:
                previous.copy_(delta)
            delta += config.step_size * active * grad.sign()
            # Keep x + delta inside [0, 1] so the clamp never hides a step.
            delta.copy_((x + delta).clamp(0.0, 1.0) - x)
        if progress is not None:
            progress((step + 1) / config.steps)
    with torch.no_grad():
        if previous is not None:
            # The last step was never measured: undo it where it passed the budget.
            adv = (x + mask * delta).clamp(0.0, 1.0)
            with times.stage("lpips forward"), autocast:
                per_face = _per_face_lpips(lpips, lpips_x, adv, batch, config)
            _hold_budget(per_face, config.lpips_budget, delta, previous, active)
        return (x + mask * delta).clamp(0.0, 1.0) - x


def _per_face_lpips(
    lpips: LPIPS, original: torch.Tensor, adv: torch.Tensor, batch: FaceBatch, config: AttackConfig
) -> torch.Tensor:
    """``(B,)`` LPIPS of ``adv`` against ``original`` (already in its LPIPS view), each
    scaled back from the padded area to its region's own."""
    return lpips(original, _lpips_view(adv, config.lpips_size)).float() / batch.area


def _smooth(grad: torch.Tensor, sigma: float) -> torch.Tensor:
    """``grad`` blurred by a Gaussian of ``sigma`` pixels (kernel out to 2 sigma)."""
    return gaussian_blur(grad, 2 * math.ceil(2 * sigma) + 1, sigma)


def _hold_budget(
    lpips: torch.Tensor,
    budget: float,
    delta: torch.Tensor,
    previous: torch.Tensor,
    active: torch.Tensor,
) -> None:
    """Faces whose ``lpips`` ``(B,)`` passed ``budget`` go back to ``previous`` and stop
    (``active`` set to 0). In place."""
    over = (lpips > budget).view(-1, 1, 1, 1).to(delta.dtype)
    active.mul_(1 - over)
    delta.copy_(over * previous + (1 - over) * delta)


def _smooth_upscaled(grad: torch.Tensor, batch: FaceBatch, factor: float) -> torch.Tensor:
    """``grad`` with each region optimised on a coarser grid than it is shown at smoothed
    by a Gaussian of sigma ``factor`` times that ratio (working pixels): a sign pattern of
    single working pixels, enlarged, would be a coarse texture that LPIPS at the working
    size does not see."""
    out = grad
    for k, ratio in enumerate(batch.upscale):
        if ratio > 1.05:
            if out is grad:
                out = grad.clone()
            out[k : k + 1] = _smooth(grad[k : k + 1], factor * ratio)
    return out


def view_schedule(config: AttackConfig) -> list[tuple[bool, bool]]:
    """The (blurred, flipped) views of the objective, in the order sampled views cycle."""
    blurs = [False, True] if config.blur else [False]
    flips = [False, True] if config.flips else [False]
    return [(b, f) for f in flips for b in blurs]


def _lpips_view(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``images`` ``(B, 3, H, W)`` scaled (anti-aliased) so the longer side is at most ``size``."""
    h, w = images.shape[-2:]
    if size is None or max(h, w) <= size:
        return images
    f = size / max(h, w)
    out = (max(16, round(h * f)), max(16, round(w * f)))
    return F.interpolate(images, size=out, mode="bilinear", antialias=True, align_corners=False)
