"""The LowKey attack: gradient ascent on face regions against an ensemble.

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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cloak_core.align import warp_affine
from cloak_core.errors import CancelledError, UsageError
from cloak_core.filters import dct_matrix, gaussian_blur
from cloak_core.lpips import LPIPS
from cloak_core.models.base import FaceModel
from cloak_core.perceptual import (
    budget,
    channel_weights,
    colour_kept,
    local_luminance,
    rgb_to_ycc,
    ycc_gradient,
    ycc_to_rgb,
)
from cloak_core.presets import AttackConfig

# Halvings of the log-scale interval when a model's dropout rate is calibrated (7 put it
# within 4% of the rate that meets the target).
DROPOUT_BISECTIONS = 7


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


def shared_identity(
    embeddings: Mapping[str, torch.Tensor],
    models: Mapping[str, FaceModel],
    photo: torch.Tensor,
    collection: torch.Tensor | None = None,
    mix: float = 1.0,
    companions: Mapping[str, torch.Tensor] | None = None,
    companion_collection: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per model, each face's embedding ``(N, D)`` replaced by the mean over the faces that
    every model verifies as the same person, in other photos (``photo``, ``(N,)``, says
    which photo each face is in: two faces of one photo are two people) of the same
    collection (``collection``, ``(N,)``; all one collection when None), itself included;
    with ``mix`` below 1, by the point that fraction of the way from the face's own
    embedding to that mean (``centroid_mix``).

    ``companions``: per model, ``(M, D)`` embeddings of more faces of these collections
    (``companion_collection``, ``(M,)``), from photos protected before (an upload larger
    than a batch): they count in the mean like the faces of another photo, and get no
    row of their own.

    Cosine models average unit vectors (their rule ignores length). A face that matches
    no other keeps its own embedding.
    """
    n = len(photo)
    extra = 0 if companions is None else len(next(iter(companions.values())))
    if extra:
        assert companions is not None and companion_collection is not None
        if collection is None:
            collection = torch.zeros(n, dtype=torch.long)
        embeddings = {k: torch.cat([e, companions[k].to(e)], 0) for k, e in embeddings.items()}
        # Each companion in a photo of its own, none of them one of this call's.
        photo = torch.cat([photo, int(photo.max()) + 1 + torch.arange(extra)])
        collection = torch.cat([collection, companion_collection])
    same = photo[:n].view(-1, 1) != photo.view(1, -1)
    if collection is not None:
        same &= collection[:n].view(-1, 1) == collection.view(1, -1)
    for name, e in embeddings.items():
        rule = models[name].spec.verification
        for k in range(n):  # a row at a time: n x (n + M) x D would not fit for many photos
            same[k] &= rule.same_person(e[k : k + 1].expand_as(e), e).cpu()
    own = torch.eye(n, n + extra, dtype=torch.bool)
    same |= own
    weights = same.float() / same.float().sum(1, keepdim=True)
    weights = mix * weights + (1.0 - mix) * own.float()
    out = {}
    for name, e in embeddings.items():
        if models[name].spec.verification.metric == "cosine":
            e = F.normalize(e, dim=-1)
        out[name] = weights.to(e.device) @ e
    return out


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
    lpips: LPIPS | None,
    config: AttackConfig,
    *,
    generator: torch.Generator | None = None,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
    times: StageTimes | None = None,
    targets: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the attack; returns the perturbation ``(B, 3, H, W)`` (masked, within [0, 1] bounds).

    ``batch.pixels + perturbation`` is the protected region, in 0..1. ``progress`` is called
    with steps done / steps planned after every step; setting ``cancel`` stops the attack
    with :class:`CancelledError`. ``times``, when given, collects seconds per stage:
    alignment, each model's forward and backward, LPIPS. ``lpips`` may be ``None`` when
    the config does not measure it (:attr:`AttackConfig.measures_lpips`). ``targets``, per
    model ``(B, D)``, are the embeddings the faces are pushed away from (default: each
    face's own; :func:`shared_identity` for photos of one person protected together).

    Each step computes the objective's gradient (:func:`ascend_identity` for the models'
    terms, then the LPIPS penalty when ``lpips_weight`` is set) and hands it to the update
    rule: sign steps with an optional LPIPS budget (:class:`SignSteps`), or projected steps
    inside a per-pixel perceptual budget (:class:`BudgetSteps`, with ``perceptual``).
    """
    x = batch.pixels
    times = times or StageTimes(x.device)
    use_amp = x.device.type == "cuda"
    autocast = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_amp)
    if targets is not None:
        originals = {name: targets[name].to(x.device) for name in models}
    else:
        with torch.no_grad(), autocast:
            originals = {
                name: embed(m, x, batch.matrices[name], config.flips) for name, m in models.items()
            }
    rule: SignSteps | BudgetSteps
    if config.perceptual is not None:
        rule = BudgetSteps(batch, config, generator)
    else:
        rule = SignSteps(batch, config, generator)
    measured = config.measures_lpips
    if measured and lpips is None:
        raise ValueError(f"preset {config.name!r} measures LPIPS: pass its network")
    # The originals' LPIPS features, fixed for the whole attack: taken once, under the
    # same autocast as every step's, so each step passes only its own image.
    reference: list[torch.Tensor] = []
    if measured:
        with times.stage("lpips forward"), autocast, torch.no_grad():
            reference = lpips.features(_lpips_view(x, config.lpips_size))

    def penalty(adv: torch.Tensor) -> torch.Tensor:
        with times.stage("lpips forward"), autocast:
            # LPIPS averages over the padded area: scale back to each region's own area.
            return _per_face_lpips(lpips, reference, adv, batch, config)

    views = view_schedule(config)
    capped = config.cosine_target is not None or config.euclidean_target_ratio is not None
    met_streak = 0  # consecutive steps whose views all met every model's cap
    needed = len(views) if config.sample_views else 1  # ... covering every view once
    # Model augmentation, only where gradients flow (the steps), never the originals.
    rates: dict[str, float] = {}
    masks = mask_generator(generator, x.device) if config.dropout else None
    if masks is not None:
        with times.stage("dropout rates"), autocast:
            rates = dropout_rates(models, batch, config, masks)
    with feature_dropout(models, rates, masks) if masks is not None else nullcontext():
        for step in range(config.steps):
            if cancel is not None and cancel.is_set():
                raise CancelledError("protection was cancelled")
            adv = rule.protected()
            step_views = [views[step % len(views)]] if config.sample_views else views
            met = ascend_identity(
                adv, models, originals, batch, config, step_views, times, autocast, generator
            )
            met_streak = met_streak + 1 if bool(met.all()) else 0
            stop = config.early_stop and capped and met_streak >= needed
            if stop and config.dropout:  # the augmented models said so: ask the models
                with times.stage("caps check"), autocast:
                    stop = caps_met(adv, models, originals, batch, config, views)
            if stop:
                if progress is not None:
                    progress(1.0)
                break
            per_face = None
            if measured:
                per_face = penalty(adv)
                with times.stage("lpips backward"):
                    (-config.lpips_weight * per_face.sum()).backward()
            with torch.no_grad():
                if not rule.step(per_face, met):
                    break
            if progress is not None:
                progress((step + 1) / config.steps)
    with torch.no_grad():
        return rule.finish(penalty)


def caps_met(
    adv: torch.Tensor,
    models: Mapping[str, FaceModel],
    originals: Mapping[str, torch.Tensor],
    batch: FaceBatch,
    config: AttackConfig,
    views: list[tuple[bool, bool]],
) -> bool:
    """Whether every face of ``adv`` meets every model's cap in every view (blurred or
    not, the mirror image averaged in as the step's views do), by the models as they are:
    no gradients, so no model augmentation."""
    with torch.no_grad():
        for blurred in dict.fromkeys(b for b, _ in views):
            image = gaussian_blur(adv, config.blur_kernel, config.blur_sigma) if blurred else adv
            for name, model in models.items():
                emb = embed(model, image, batch.matrices[name], config.flips)
                if not bool((model_term(model, originals[name], emb, config) >= 1.0).all()):
                    return False
    return True


@contextmanager
def feature_dropout(
    models: Mapping[str, FaceModel],
    rates: Mapping[str, float],
    masks: torch.Generator,
) -> Iterator[None]:
    """Within the block, every convolution of each of ``models`` drops its output at the
    model's rate in ``rates`` (the rest scaled up to keep the mean), in forwards with
    gradients enabled; forwards without them see the models as they are. A fresh mask
    each forward, drawn from ``masks`` (a generator on the models' device)."""
    hooks = []
    for name, model in models.items():
        rate = rates.get(name, 0.0)
        if not 0.0 <= rate < 1.0:
            raise UsageError(f"a dropout rate must be within 0..1, got {rate}")
        if rate == 0.0:
            continue
        keep = 1.0 - rate

        def drop(
            _module: nn.Module, _inputs: object, output: torch.Tensor, keep: float = keep
        ) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            kept = torch.rand(output.shape, generator=masks, device=output.device) < keep
            return output * kept.to(output.dtype) / keep

        hooks += [
            layer.register_forward_hook(drop)
            for layer in model.modules()
            if isinstance(layer, nn.Conv2d)
        ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def mask_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` for dropout masks, seeded from ``generator`` (or at random)."""
    masks = torch.Generator(device=device)
    if generator is not None:
        masks.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    else:
        masks.seed()
    return masks


def dropout_rates(
    models: Mapping[str, FaceModel],
    batch: FaceBatch,
    config: AttackConfig,
    masks: torch.Generator,
) -> dict[str, float]:
    """Per model, the dropout rate at which its augmented embeddings of the batch's faces
    sit ``config.dropout`` from its own, measured by its term (so in units of its cap),
    mean over the faces: models differ tenfold in how much a rate moves them. Found by
    bisection on a log scale between 1e-4 and 0.5."""
    rates = {}
    with torch.no_grad():
        for name, model in models.items():
            own = embed(model, batch.pixels, batch.matrices[name], False)
            low, high = math.log(1e-4), math.log(0.5)
            for _ in range(DROPOUT_BISECTIONS):
                rate = math.exp((low + high) / 2)
                with feature_dropout({name: model}, {name: rate}, masks), torch.enable_grad():
                    ghost = embed(model, batch.pixels, batch.matrices[name], False).detach()
                if float(model_term(model, own, ghost, config).mean()) > config.dropout:
                    high = math.log(rate)
                else:
                    low = math.log(rate)
            rates[name] = math.exp((low + high) / 2)
    return rates


def ascend_identity(
    adv: torch.Tensor,
    models: Mapping[str, FaceModel],
    originals: Mapping[str, torch.Tensor],
    batch: FaceBatch,
    config: AttackConfig,
    step_views: list[tuple[bool, bool]],
    times: StageTimes,
    autocast: torch.autocast,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Back-propagate the identity part of the objective, the mean over ``step_views`` of
    ``sum over models f of D_f(f(A_f(x)), f(A_f(view(adv))))``, into the perturbation.

    One backward per model (gradients accumulate): the graph of one model is freed before
    the next one runs, and each stage can be timed. With ``diversity``, each model sees
    the faces under a fresh random alignment jitter and resampling (input diversity);
    with ``spectrum``, under fresh noise and random gains of its frequencies.
    Returns, per face ``(B,)``, whether it met every model's cap in every view.
    """
    blurred = [b for b, _ in step_views]
    with times.stage("blur"):
        images = [
            gaussian_blur(adv, config.blur_kernel, config.blur_sigma) if b else adv
            for b in dict.fromkeys(blurred)
        ]
        stacked = torch.cat(images, 0)
    n_images = len(images)
    flip_all = config.flips and not config.sample_views
    met = torch.ones(adv.shape[0], dtype=torch.bool, device=adv.device)
    for name, model in models.items():
        with times.stage("align"):
            matrices = batch.matrices[name].repeat(n_images, 1, 1)
            size = model.spec.input_size
            if config.diversity:
                matrices = _jitter(matrices, size, config.diversity, generator)
            crops = warp_affine(stacked, matrices, size)
            if config.diversity:
                crops = _resample(crops, config.diversity, generator)
            if config.spectrum:
                crops = _spectrum(crops, config.spectrum, generator)
            if flip_all:
                crops = torch.cat([crops, crops.flip(-1)], 0)
            elif step_views[0][1]:
                crops = crops.flip(-1)
        with times.stage(f"{name} forward"), autocast:
            emb = model(crops).float()
            if flip_all:
                half = emb.shape[0] // 2
                emb = 0.5 * (emb[:half] + emb[half:])
            terms = model_term(model, originals[name].repeat(n_images, 1), emb, config)
            met &= (terms.detach() >= 1.0).view(n_images, -1).all(0)
        with times.stage(f"{name} backward"):
            (terms.sum() / n_images).backward(retain_graph=True)
    return met


class SignSteps:
    """LowKey's update: gradient steps of ``step_size`` on an RGB perturbation started
    from uniform noise, the LPIPS penalty in the gradient, and with ``lpips_budget`` a
    face that passes the budget goes back one step and stays there. The steps are signed
    (LowKey) or in proportion to the gradient (``sign_steps`` off), on R, G and B or in
    YCbCr with colour at a fraction of luminance's rate (``colour_steps``). With
    ``shrink``, a face that met every cap takes no step and its perturbation shrinks."""

    def __init__(
        self, batch: FaceBatch, config: AttackConfig, generator: torch.Generator | None
    ) -> None:
        x = batch.pixels
        self.batch, self.config = batch, config
        # Y, Cb, Cr factors per face: a grey face is perturbed in luminance alone, and so
        # is every face when colour does not move (``colour_steps`` 0).
        self.kept = colour_kept(x, batch.masks)
        self.grey = (self.kept[:, 1:2] == 0) | (config.colour_steps == 0)
        self.any_grey = bool(self.grey.any())  # once, not a device sync per step
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        noise = torch.where(self.grey, noise[:, :1].expand_as(noise), noise)
        self.delta = ((noise * 2 - 1) * config.noise).requires_grad_(True)
        self.velocity = torch.zeros_like(self.delta) if config.momentum else None
        # Faces still moving (1) or frozen at their LPIPS budget (0), and the last delta.
        self.active = torch.ones(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)
        budget = config.lpips_budget is not None
        self.previous = self.delta.detach().clone() if budget else None
        colour = config.colour_steps
        self.rates = None if colour is None else channel_weights(colour, self.delta)
        self.contrast = (
            None if config.contrast is None else contrast_weights(batch, config.contrast)
        )

    def protected(self) -> torch.Tensor:
        """The protected regions, in the autograd graph of the perturbation."""
        self.delta.grad = None
        x = self.batch.pixels
        return (x + self.batch.masks * self.delta).clamp(0.0, 1.0)

    def step(self, lpips: torch.Tensor | None, met: torch.Tensor | None = None) -> bool:
        """One update from the accumulated gradient; ``False`` once every face is frozen.

        ``met`` ``(B,)``: the faces that met every model's cap this step (for ``shrink``).
        """
        delta, x = self.delta, self.batch.pixels
        if self.previous is not None and lpips is not None:
            # A face past its budget goes back to its last delta and stays there.
            _hold_budget(lpips, self.config.lpips_budget, delta, self.previous, self.active)
            if not bool(self.active.any()):
                return False
        direction = _direction(delta.grad, self.velocity, self.batch, self.config)
        if self.previous is not None:
            self.previous.copy_(delta)
        if self.rates is None and not self.any_grey:
            step = _unit_step(direction, self.config)
        else:
            # Steps in YCbCr: colour moves at ``colour_steps`` of luminance's rate (RGB
            # steps where that is unset), a grey face's not at all.
            rates = 1.0 if self.rates is None else self.rates
            unit = _unit_step(ycc_gradient(direction) * self.kept, self.config)
            step = ycc_to_rgb(rates * unit)
            if self.rates is None:
                step = torch.where(self.grey, step, _unit_step(direction, self.config))
        if self.contrast is not None:
            step = step * self.contrast
        step = _shrink_met(delta, step, met, self.config)
        delta += self.config.step_size * self.active * step
        # Keep x + delta inside [0, 1] so the clamp never hides a step.
        delta.copy_((x + delta).clamp(0.0, 1.0) - x)
        return True

    def finish(self, penalty: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The final masked perturbation (the last step undone where it passed the budget)."""
        x, mask = self.batch.pixels, self.batch.masks
        if self.previous is not None:
            # The last step was never measured: undo it where it passed the budget.
            adv = (x + mask * self.delta).clamp(0.0, 1.0)
            _hold_budget(
                penalty(adv), self.config.lpips_budget, self.delta, self.previous, self.active
            )
        return (x + mask * self.delta).clamp(0.0, 1.0) - x


# ``contrast``: the local luminance deviation (0..1) below which a pixel takes no step and
# from which it takes a full one, and the region side its window is given for.
_CONTRAST_FLAT, _CONTRAST_FULL = 0.01, 0.04
_CONTRAST_REGION = 112


def contrast_weights(batch: FaceBatch, sigma: float) -> torch.Tensor:
    """``(B, 1, H, W)`` share of a step each pixel of ``batch`` takes under ``contrast``:
    0 where the original's luminance deviation over a Gaussian window is at most
    :data:`_CONTRAST_FLAT`, 1 from :data:`_CONTRAST_FULL`, linear between, smoothed by the
    same Gaussian. The window is ``sigma`` pixels for a region of 112 pixels and grows with
    the region (each face's own, padding aside), so a close-up's skin is judged at the
    scale a small face's is: at a fixed window, the pores of an enlarged face fall below
    the threshold and most of it would take no step."""
    x = batch.pixels
    height, width = x.shape[-2:]
    weights = []
    for k in range(x.shape[0]):
        side = math.sqrt(float(batch.area[k]) * height * width)
        s = max(0.5, sigma * side / _CONTRAST_REGION)
        kernel = min(2 * math.ceil(3 * s) + 1, 2 * (min(height, width) // 2) - 1)
        _, deviation = local_luminance(x[k : k + 1], kernel, s)
        ramp = ((deviation - _CONTRAST_FLAT) / (_CONTRAST_FULL - _CONTRAST_FLAT)).clamp(0, 1)
        weights.append(gaussian_blur(ramp, kernel, s))
    return torch.cat(weights)


# Alternating projections onto the perceptual budget and the valid pixel range per step.
_PROJECTIONS = 4
# The Gaussian that separates a perturbation's fine detail from its smooth part (``detail``).
_DETAIL_SIGMA = 1.5
_DETAIL_KERNEL = 7


class BudgetSteps:
    """Projected steps inside a perceptual budget (:mod:`cloak_core.perceptual`).

    The perturbation lives in YCbCr. Each pixel's luminance may move by at most
    ``perceptual`` just-noticeable differences of the original face there (more in hair
    and along edges, less on smooth skin), each colour channel by ``chroma`` times that.
    A step moves every pixel by ``step_size`` of its own bound in the sign of the
    (smoothed, momentum-accumulated) gradient, then projects back onto the budget and the
    valid pixel range. No penalty term is needed: the budget is the constraint.
    """

    def __init__(
        self, batch: FaceBatch, config: AttackConfig, generator: torch.Generator | None
    ) -> None:
        x = batch.pixels
        self.batch, self.config = batch, config
        assert config.perceptual is not None
        bound = budget(x, config.perceptual, config.texture_masking, config.chroma)
        self.bound = bound * colour_kept(x, batch.masks)  # no colour budget on a grey face
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        self.param = ((noise * 2 - 1) * config.noise * self.bound).requires_grad_(True)
        self.velocity = torch.zeros_like(self.param) if config.momentum else None

    def _delta(self) -> torch.Tensor:
        return ycc_to_rgb(self.param)

    def protected(self) -> torch.Tensor:
        """The protected regions, in the autograd graph of the perturbation."""
        self.param.grad = None
        return (self.batch.pixels + self.batch.masks * self._delta()).clamp(0.0, 1.0)

    def step(self, lpips: torch.Tensor | None, met: torch.Tensor | None = None) -> bool:
        """One projected step; always ``True`` (no face stops early). With ``shrink``,
        the faces that ``met`` every cap shrink instead of stepping, as in
        :meth:`SignSteps.step`."""
        direction = _unit_step(
            _direction(self.param.grad, self.velocity, self.batch, self.config), self.config
        )
        p = self.param
        direction = _shrink_met(p, direction, met, self.config)
        p += self.config.step_size * self.bound * direction
        # Onto the budget and into the valid pixel range: clipping one RGB channel at 0 or
        # 1 shifts colour, so the two projections alternate a few times (they converge to
        # a point inside both, up to a fraction of a grey level).
        x = self.batch.pixels
        for _ in range(_PROJECTIONS):
            p.copy_(torch.maximum(torch.minimum(p, self.bound), -self.bound))
            if self.config.detail is not None and self.config.detail < 2:
                smooth = gaussian_blur(p, _DETAIL_KERNEL, _DETAIL_SIGMA)
                limit = self.config.detail * self.bound
                p.copy_(smooth + torch.maximum(torch.minimum(p - smooth, limit), -limit))
            p.copy_(rgb_to_ycc((x + ycc_to_rgb(p)).clamp(0.0, 1.0) - x))
        return True

    def finish(self, penalty: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The final masked perturbation."""
        x = self.batch.pixels
        return (x + self.batch.masks * self._delta()).clamp(0.0, 1.0) - x


def _shrink_met(
    perturbation: torch.Tensor,
    step: torch.Tensor,
    met: torch.Tensor | None,
    config: AttackConfig,
) -> torch.Tensor:
    """``shrink``: the faces that ``met`` every cap shrink in place by that fraction and
    take no step (without it, their step would follow the LPIPS gradient alone, at full
    size); returns the step with theirs zeroed. Unchanged without ``shrink``."""
    if not config.shrink or met is None:
        return step
    done = met.to(perturbation.dtype).view(-1, 1, 1, 1)
    perturbation.mul_(1.0 - config.shrink * done)
    return step * (1.0 - done)


def _direction(
    grad: torch.Tensor, velocity: torch.Tensor | None, batch: FaceBatch, config: AttackConfig
) -> torch.Tensor:
    """The step direction from a gradient: smoothed (``grad_sigma``, ``smooth_upscaled``)
    and accumulated with momentum (updating ``velocity`` in place)."""
    if config.grad_sigma:
        # Smoothing the gradient before its sign (as translation-invariant attacks do)
        # gives a smoother perturbation that survives JPEG and resizing better.
        grad = _smooth(grad, config.grad_sigma)
    if config.smooth_upscaled:
        grad = _smooth_upscaled(grad, batch, config.smooth_upscaled)
    if velocity is not None:
        scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        velocity.mul_(config.momentum).add_(grad / scale)
        grad = velocity
    return grad


def _unit_step(direction: torch.Tensor, config: AttackConfig) -> torch.Tensor:
    """A step of at most 1 per element from a direction: its sign (``sign_steps``), or in
    proportion to it, per face the 90th percentile of its magnitude moving a full step
    and larger ones no more. Pixels that matter little to the models then change little,
    where sign steps move every pixel alike."""
    if config.sign_steps:
        return direction.sign()
    scale = _percentile(direction.abs().flatten(1), 0.9).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (direction / scale).clamp(-1.0, 1.0)


def _percentile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(rows, q, dim=1)`` (linear interpolation), the same numbers, from
    at most two selections instead of a full sort of each row: a fifth of the time on a
    close-up's few hundred thousand values."""
    rank = torch.tensor(q, dtype=rows.dtype) * (rows.shape[1] - 1)  # as quantile rounds it
    below, above = int(rank.floor()), int(rank.ceil())
    low = rows.kthvalue(below + 1, dim=1).values
    high = low if above == below else rows.kthvalue(above + 1, dim=1).values
    return torch.lerp(low, high, (rank - below).to(rows.device))


def _jitter(
    matrices: torch.Tensor,
    size: tuple[int, int],
    amount: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``matrices`` ``(B, 2, 3)`` followed by a random similarity about the output's centre:
    scale within ``1 +- amount``, rotation within ``+- amount`` radians, shift within
    ``+- amount`` of the output size. How another detector's landmarks would align it."""
    b = matrices.shape[0]
    u = torch.rand(b, 4, generator=generator, dtype=torch.float64) * 2 - 1
    scale, angle = 1 + amount * u[:, 0], amount * u[:, 1]
    h, w = size
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    jitter = torch.zeros(b, 3, 3, dtype=torch.float64)
    jitter[:, 0, 0], jitter[:, 0, 1], jitter[:, 1, 0], jitter[:, 1, 1] = cos, -sin, sin, cos
    jitter[:, 0, 2] = cx - cos * cx + sin * cy + amount * w * u[:, 2]
    jitter[:, 1, 2] = cy - sin * cx - cos * cy + amount * h * u[:, 3]
    jitter[:, 2, 2] = 1.0
    full = torch.zeros(b, 3, 3, dtype=torch.float64)
    full[:, :2] = matrices.to(device="cpu", dtype=torch.float64)
    full[:, 2, 2] = 1.0
    return (jitter @ full)[:, :2].to(device=matrices.device, dtype=matrices.dtype)


def _resample(
    crops: torch.Tensor, amount: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``crops`` scaled down by a random factor between 1 and half and back (every other
    call keeps them as they are): the resizing a site applies before a recogniser sees
    the face. ``amount`` 0 never resamples."""
    if amount <= 0 or float(torch.rand(1, generator=generator)) < 0.5:
        return crops
    factor = 1.0 - 0.5 * float(torch.rand(1, generator=generator))
    h, w = crops.shape[-2:]
    small = F.interpolate(
        crops,
        size=(max(8, round(h * factor)), max(8, round(w * factor))),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


# The standard deviation of the Gaussian noise a spectrum view adds (``spectrum``): four
# grey levels, about the perturbation's own size.
_SPECTRUM_NOISE = 4 / 255


def _spectrum(
    crops: torch.Tensor, amount: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``crops`` plus Gaussian noise of :data:`_SPECTRUM_NOISE`, each coefficient of their
    2-D DCT then scaled by its own random gain within ``1 +- amount`` (spectrum
    simulation, Long et al. 2022): the surrogate seen as a model that weighs frequencies
    differently would see the face. Linear in ``crops``, so gradients pass through."""
    h, w = crops.shape[-2:]
    rows, cols = dct_matrix(h, crops), dct_matrix(w, crops)
    # Two crop-sized draws per model and step: made where the crops are (a GPU would wait
    # on the CPU's), from a generator seeded by the attack's own.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    draws = torch.Generator(device=crops.device).manual_seed(seed)
    noise = torch.randn(crops.shape, generator=draws, dtype=crops.dtype, device=crops.device)
    unit = torch.rand(crops.shape, generator=draws, dtype=crops.dtype, device=crops.device)
    gain = 1 + amount * (2 * unit - 1)
    return rows.T @ ((rows @ (crops + noise * _SPECTRUM_NOISE) @ cols.T) * gain) @ cols


def _per_face_lpips(
    lpips: LPIPS,
    reference: list[torch.Tensor],
    adv: torch.Tensor,
    batch: FaceBatch,
    config: AttackConfig,
) -> torch.Tensor:
    """``(B,)`` LPIPS of ``adv`` against the originals whose LPIPS features (in their
    LPIPS view) are ``reference``, each scaled back from the padded area to its region's
    own."""
    view = _lpips_view(adv, config.lpips_size)
    return lpips.to_reference(reference, view).float() / batch.area


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
