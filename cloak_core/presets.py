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

# A value ``with_settings`` takes: a number, a switch, or none.
Setting = float | bool | None


@dataclass(frozen=True)
class AttackConfig:
    """Settings of one protection run, field by field. Pixel quantities are in 0..1 units.

    What is optimised:

    - ``name``: the preset's name.
    - ``steps``: update steps per batch of faces.
    - ``models``: the attack ensemble (``None``: the store's default ensemble).
    - ``cosine_target``: a cosine model's term stops pulling once the cosine between
      original and protected embedding is at or below this (``None``: no cap, the paper's
      plain normalised squared distance).
    - ``euclidean_target_ratio``: a Euclidean model's term stops pulling once the distance
      is this many times its same-person threshold (``None``: no cap).
    - ``blur``, ``blur_kernel``, ``blur_sigma``: the objective also sees the protected
      face through a Gaussian blur of that kernel and sigma (working pixels).
    - ``flips``: the objective also sees each face mirrored.
    - ``sample_views``: each step uses one view (plain or blurred, flipped or not, in
      turn) instead of all: the same expected gradient at a quarter of the cost per step.
    - ``diversity``: each step, every model sees the faces under a random alignment
      jitter (scale, rotation and shift within that fraction) and, every other step on
      average, resampled down by up to half and back (input diversity: perturbations
      that survive other detectors' alignment and a site's resizing).
    - ``spectrum``: each step, every model's crops also get Gaussian noise of four grey
      levels and each coefficient of their 2-D DCT a random gain within ``1 +-
      spectrum`` (spectrum simulation, Long et al. 2022): the surrogates stand in for
      models that weigh the face's frequencies differently, so the perturbation relies
      less on what one network happens to be sensitive to (``None``: plain crops).
      Measured and left off in every preset: on the product's eval it moved along the
      step curve (docs/DECISIONS.md).
    - ``hold_out``: with at least three ensemble models, each face's attack leaves one
      out in turn, and that model's measurement of the face is an honest black-box check
      (a model the perturbation was not made with), at one model fewer per face.

    How visible it may be:

    - ``lpips_weight``: the ``c`` of the LowKey objective, the LPIPS penalty's weight
      (0: no penalty, LPIPS is not computed).
    - ``lpips_net``: ``alex`` or ``vgg``, the network of that penalty.
    - ``lpips_size``: the longer side at which LPIPS is computed (``None``: the working
      resolution).
    - ``lpips_budget``: a face whose LPIPS against its original (at the working size)
      passes this goes back to its previous step and stays there.
    - ``perceptual``: the perturbation is bounded per pixel by that many just-noticeable
      differences of the original face, in YCbCr (:mod:`cloak_core.perceptual`); the
      update becomes a projected step (:class:`cloak_core.attack.BudgetSteps`).
    - ``texture_masking``: with ``perceptual``, how much local contrast raises the bound
      (grey levels per grey level of local standard deviation).
    - ``chroma``: with ``perceptual``, the colour channels' bound as a fraction of the
      luminance one.
    - ``detail``: with ``perceptual``, the perturbation's fine detail (what a Gaussian of
      1.5 working pixels smooths away) is bounded by this fraction of the bound, so a
      change of sign is a ramp rather than a step (steps read as drawn lines on smooth
      skin); ``None`` (or 2 and above): no such bound.
    - ``colour_steps``: without ``perceptual``, each step is taken in YCbCr, the colour
      channels moving at this fraction of the luminance rate (``None``: LowKey's steps on
      R, G and B, whose independent signs make strong colour noise; ``0``: luminance
      alone, start noise included, so the face keeps its colours but where a channel
      clips). Whatever the setting, a grey face (a black-and-white photo) is perturbed in
      luminance alone.
    - ``face_mask``: the perturbation is limited to a soft ellipse over the detected face
      box grown by this factor (``None``: the whole region around the face).

    How it steps:

    - ``step_size``: without ``perceptual``, the size of each signed step; with it, the
      fraction of each pixel's bound a step may move it.
    - ``noise``: the uniform start noise, in pixels (a fraction of the bound with
      ``perceptual``).
    - ``momentum``: the gradient is accumulated with this decay, each step's normalised
      to unit mean absolute value (MI-FGSM: steadier directions that transfer better).
    - ``grad_sigma``: the gradient is smoothed by a Gaussian of this many working pixels
      before it is used (smoother perturbations that survive JPEG and resizing).
    - ``smooth_upscaled``: a face optimised on a grid coarser than its photo is measured
      at (the whole photo at most 4 MP) gets its gradient smoothed by a Gaussian of sigma
      this factor times that ratio, so single working pixels do not become coarse
      texture once enlarged.
    - ``contrast``: without ``perceptual``, each pixel's step is scaled by the original
      face's local luminance contrast there (its standard deviation over a Gaussian of
      this many pixels of a 112-pixel face region, the window growing with the region):
      none where the face is flat (smooth cheeks and forehead, where any change reads as
      a patch), all of it from a deviation of 0.04 on (features, hair, textured skin),
      a ramp between from 0.01 (``None``: every pixel alike).
    - ``sign_steps``: every pixel steps by the sign of its gradient (LowKey); ``False``:
      in proportion to it (per face, its 90th percentile moves a full step), so pixels
      that matter little to the models change little. With ``perceptual`` a full step is
      ``step_size`` of the pixel's bound, without it ``step_size``.
    - ``early_stop``: the attack ends once every model's capped term is met for every
      face in the last step(s) (later steps could only trade quality for protection).
    - ``shrink``: a face that meets every model's cap in a step's view takes no step
      there; its perturbation shrinks by this fraction instead (decoupled direction and
      norm, Rony et al. 2019), so a face hovers at its caps with the least change that
      holds them, and what earlier steps added in vain decays (``None``: such a face
      steps along the LPIPS penalty's gradient alone, at a full step's size). Measured
      and left off in every preset: it moves along the step curve (docs/DECISIONS.md).
    - ``work_scale``: a face region is optimised at most at this many times the largest
      model input; larger faces on a coarser grid, the perturbation interpolated back.
    - ``centroid``: when several photos are protected together (``together``), faces in
      different photos that every ensemble model verifies as the same person are each
      pushed away from their shared identity, the mean of their embeddings, instead of
      from their own embedding alone: what a clean photo of that person would match.
      Alone, a face is pushed from its own embedding as before.
    - ``centroid_mix``: with ``centroid``, where between a face's own embedding (0) and
      the shared identity (1) the point it is pushed from lies. At 1 each photo can stay
      close to itself (a recogniser that holds the original still matches it); halfway
      (``balanced``) protected best against new photos and halved that leak, on two
      seeds of the full leave-one-out eval (issue 18, DECISIONS.md); for ``strong`` it
      moved neither way beyond a seed's reach, so ``strong`` keeps 1.
    - ``dropout``: model augmentation. During the attack's steps every convolution of
      every ensemble model has its output dropped at a rate (a fresh random mask at each
      forward, the rest scaled up to keep the mean), so the perturbation is made against
      many networks near the surrogates rather than the surrogates exactly, and transfers
      better to recognisers it never saw (Li et al., "ghost networks"). Each model's rate
      is set per batch so that its augmented embeddings of the clean faces sit this far
      from its own, in units of its cap (its term; models differ tenfold in how far one
      rate moves them). The originals' embeddings, the shared identity, the early stop
      and every measurement use the models as they are. ``None``: no augmentation.
    - ``seed``: the start noise's and the random views' seed (``None``: random).
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
    shrink: float | None = None
    sample_views: bool = False
    grad_sigma: float | None = None
    contrast: float | None = None
    face_mask: float | None = None
    momentum: float | None = None
    lpips_budget: float | None = None
    smooth_upscaled: float | None = None
    perceptual: float | None = None
    texture_masking: float = 0.3
    chroma: float = 0.5
    detail: float | None = None
    colour_steps: float | None = None
    diversity: float | None = None
    spectrum: float | None = None
    sign_steps: bool = True
    hold_out: bool = False
    centroid: bool = False
    centroid_mix: float = 1.0
    dropout: float | None = None
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

    @property
    def measures_lpips(self) -> bool:
        """Whether the attack computes LPIPS at all (a penalty weight or a budget)."""
        return bool(self.lpips_weight) or self.lpips_budget is not None

    def with_settings(self, overrides: Sequence[tuple[str, Setting]]) -> AttackConfig:
        """A copy with each ``(field, value)`` of ``overrides`` set: how a frontier sweep
        moves one strength setting of a preset, and what ``eval --set`` changes.

        Values take the field's type: ``steps`` and ``seed`` are rounded to whole numbers,
        a switch (``centroid``, ``flips`` ...) takes ``True``/``False`` or 1/0, and
        ``None`` (no cap, no bound, off) only where the field allows it."""
        types = {f.name: str(f.type) for f in fields(self)}
        known = set(types) - {"name", "models", "lpips_net"}
        changes: dict[str, Setting] = {}
        for name, value in overrides:
            if name not in known:
                raise UsageError(
                    f"{name!r} is not an attack setting; known: {', '.join(sorted(known))}"
                )
            changes[name] = _typed(name, types[name], value)
        if changes.get("steps", 1) < 1:
            raise UsageError("steps must be at least 1")
        if not 0.0 <= changes.get("centroid_mix", 1.0) <= 1.0:
            raise UsageError("centroid_mix is a fraction from 0 to 1")
        if not 0.0 <= (changes.get("spectrum") or 0.0) <= 1.0:
            raise UsageError("spectrum is a gain spread from 0 to 1 (or none)")
        return replace(self, **changes)


def _typed(name: str, kind: str, value: Setting) -> Setting:
    """``value`` as the type the field ``name`` is declared with (``kind``, its annotation)."""
    if value is None:
        if "None" not in kind:
            raise UsageError(f"{name} needs a value; it cannot be none")
        return None
    if kind.startswith("bool"):
        if value not in (0, 1):  # True and False are 1 and 0
            raise UsageError(f"{name} is a switch: true or false (1 or 0), got {value}")
        return bool(value)
    if isinstance(value, bool):
        raise UsageError(f"{name} takes a number, got {str(value).lower()}")
    if kind.startswith("int"):
        return int(round(value))
    return float(value)


_BALANCED = AttackConfig(
    name="balanced",
    steps=36,
    step_size=0.0035,
    lpips_weight=2.0,
    work_scale=1.5,
    lpips_size=None,
    early_stop=True,
    sample_views=True,
    grad_sigma=1.0,
    contrast=2.0,
    face_mask=1.7,
    colour_steps=0.0,
    sign_steps=False,
    centroid=True,
    centroid_mix=0.5,
    diversity=0.07,
)

PRESETS: dict[str, AttackConfig] = {
    p.name: p
    for p in (
        # `balanced`'s attack in twelve steps three times as long: a third of its time,
        # about its protection (whole photos' faces included), a little more change
        # (docs/DECISIONS.md, "`fast`: the default's attack in twelve steps").
        replace(_BALANCED, name="fast", steps=12, step_size=0.0105),
        _BALANCED,
        AttackConfig(
            name="strong",
            steps=50,
            step_size=0.002,
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
            grad_sigma=1.0,
            colour_steps=0.0,
            sign_steps=False,
            centroid=True,
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
            grad_sigma=1.0,
            face_mask=1.7,
            momentum=0.9,
            perceptual=1.0,
            texture_masking=0.3,
            chroma=0.2,
            detail=0.25,
            diversity=0.05,
            sign_steps=False,
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
