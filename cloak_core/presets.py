"""Attack presets: frozen settings of the LowKey attack, chosen by name.

``paper`` is the published LowKey configuration (Cherepanova et al., ICLR 2021): 50 steps
of 0.0025, LPIPS weight 0.05, AlexNet LPIPS, uniform start noise 0.005, no epsilon ball.
The others trade protection for speed on a CPU; they also change how the ensemble's
terms are balanced (see :mod:`cloak_core.attack`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from cloak_core.errors import UsageError


@dataclass(frozen=True)
class AttackConfig:
    """Settings of one protection run.

    Pixel quantities (``step_size``, ``noise``) are in 0..1 units. ``lpips_weight`` is the
    ``c`` of the LowKey objective. ``cosine_target`` and ``euclidean_target_ratio`` are the
    per-model goals past which a model's term stops pulling (``None`` disables the cap and
    gives the paper's plain sum): a cosine model is satisfied once the cosine between
    original and protected embedding is at or below ``cosine_target``; a Euclidean model
    once the distance is ``euclidean_target_ratio`` times its same-person threshold.
    ``work_scale`` caps the working resolution of a face region at that many times the
    largest model input (faces larger than that are optimised on a coarser grid and the
    perturbation is interpolated smoothly back to full resolution). ``lpips_size`` caps the
    longer side at which LPIPS is computed (``None``: the working resolution). With
    ``early_stop``, the attack ends once every model's capped term is met for every face
    in the last step (the remaining steps could only trade protection for quality).
    With ``sample_views``, each step uses one view of the objective (plain or blurred,
    flipped or not, in turn) instead of all of them: the expected gradient is the same
    (expectation over transformations) at a quarter of the cost per step. ``grad_sigma``
    smooths the gradient with a Gaussian of that many working pixels before its sign.
    ``face_mask`` limits the perturbation to a soft ellipse over the detected face box
    grown by that factor (``None``: the whole region around the face).
    ``momentum`` accumulates the gradient, each step's normalised to unit mean absolute
    value, with that decay before its sign (MI-FGSM: steadier directions that transfer
    better to models outside the ensemble). With ``lpips_budget``, a face whose LPIPS
    against its original (at the working size) passes the budget goes back to its
    previous step and is left there; the others keep going.
    ``smooth_upscaled``: a face optimised on a grid coarser than the scale its photo is
    measured at (the whole photo at most 4 MP) gets its gradient smoothed by a Gaussian of
    sigma this factor times that ratio (working pixels), so single working pixels do not
    become coarse texture once enlarged (which LPIPS at the working size cannot see).
    ``perceptual``: the perturbation is bounded per pixel by that many just-noticeable
    differences of the original face (:mod:`cloak_core.perceptual`), in YCbCr, and the
    update is a projected step of ``step_size`` times each pixel's own bound (so
    ``step_size`` is then a fraction, not a pixel quantity, and ``noise`` a fraction of the
    bound). ``texture_masking`` is how much local contrast raises the bound (grey levels
    per grey level of local standard deviation) and ``chroma`` the colour channels'
    bound as a fraction of the luminance one. ``diversity``: each step, every model sees
    the faces under a random alignment jitter (scale, rotation and shift within that
    fraction) and, every other step on average, resampled down by up to half and back:
    input diversity, for perturbations that survive other detectors and resizing.
    ``sign_steps`` (with ``perceptual``): every pixel steps by the sign of its gradient;
    ``False``: in proportion to the gradient (per face, its 90th percentile moves a full
    step), so pixels that matter little to the models change little. ``soften`` (with
    ``perceptual``): the final perturbation is blurred by a Gaussian of that many working
    pixels, so regions at the bound meet in soft ramps rather than visible contour lines.
    ``hold_out``: with at least three ensemble models, each face's attack leaves one out
    in turn, and that model's measurement of the face is an honest black-box check of the
    protection (a model the perturbation was not made with), at the cost of one model
    fewer per face.
    """

    name: str
    steps: int
    step_size: float
    lpips_weight: float
    noise: float = 0.005
    blur_kernel: int = 7
    blur_sigma: float = 3.0
    blur: bool = True
    flips: bool = True
    lpips_net: str = "alex"
    models: tuple[str, ...] | None = None
    cosine_target: float | None = 0.0
    euclidean_target_ratio: float | None = 1.5
    work_scale: float = 2.0
    lpips_size: int | None = 192
    early_stop: bool = False
    sample_views: bool = False
    grad_sigma: float | None = None
    face_mask: float | None = None
    momentum: float | None = None
    lpips_budget: float | None = None
    smooth_upscaled: float | None = None
    perceptual: float | None = None
    texture_masking: float = 0.3
    chroma: float = 0.5
    diversity: float | None = None
    sign_steps: bool = True
    soften: float | None = None
    hold_out: bool = False
    seed: int | None = None

    def with_overrides(
        self, *, steps: int | None = None, models: tuple[str, ...] | None = None
    ) -> AttackConfig:
        """A copy with ``--steps`` / ``--models`` applied (``None`` keeps the preset's value)."""
        if steps is not None and steps < 1:
            raise UsageError(f"--steps must be at least 1, got {steps}")
        return replace(
            self,
            steps=self.steps if steps is None else steps,
            models=self.models if models is None else models,
        )

    def with_settings(self, overrides: Sequence[tuple[str, float]]) -> AttackConfig:
        """A copy with each ``(field, value)`` of ``overrides`` set (``steps`` rounded to an
        int): how a frontier sweep moves one strength setting of a preset."""
        known = {f.name for f in fields(self)} - {"name", "models"}
        changes: dict[str, float | int] = {}
        for name, value in overrides:
            if name not in known:
                raise UsageError(
                    f"{name!r} is not an attack setting; known: {', '.join(sorted(known))}"
                )
            changes[name] = int(round(value)) if name == "steps" else value
        if changes.get("steps", 1) < 1:
            raise UsageError("steps must be at least 1")
        return replace(self, **changes)


PRESETS: dict[str, AttackConfig] = {
    p.name: p
    for p in (
        AttackConfig(
            name="fast",
            steps=10,
            step_size=0.006,
            lpips_weight=0.05,
            flips=False,
            work_scale=1.25,
            lpips_size=128,
            early_stop=True,
            sample_views=True,
        ),
        AttackConfig(
            name="balanced",
            steps=36,
            step_size=0.0025,
            lpips_weight=2.0,
            work_scale=1.5,
            lpips_size=None,
            early_stop=True,
            sample_views=True,
            grad_sigma=2.0,
            face_mask=1.7,
        ),
        AttackConfig(
            name="strong",
            steps=50,
            step_size=0.004,
            lpips_weight=1.0,
            cosine_target=-1.0,
            euclidean_target_ratio=4.0,
            work_scale=1.5,
            lpips_size=None,
            sample_views=True,
            face_mask=1.7,
            momentum=0.5,
            lpips_budget=0.035,
            smooth_upscaled=1.5,
        ),
        AttackConfig(
            name="natural",
            steps=40,
            step_size=0.15,
            lpips_weight=0.0,
            noise=0.5,
            cosine_target=-1.0,
            euclidean_target_ratio=4.0,
            work_scale=1.5,
            lpips_size=None,
            sample_views=True,
            grad_sigma=2.0,
            face_mask=1.7,
            momentum=0.9,
            perceptual=1.0,
            texture_masking=0.3,
            chroma=0.2,
            diversity=0.05,
            sign_steps=False,
            soften=1.5,
        ),
        AttackConfig(
            name="paper",
            steps=50,
            step_size=0.0025,
            lpips_weight=0.05,
            cosine_target=None,
            euclidean_target_ratio=None,
        ),
    )
}

DEFAULT_PRESET = "balanced"


def get_preset(name: str) -> AttackConfig:
    """The preset called ``name``; a :class:`UsageError` listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
