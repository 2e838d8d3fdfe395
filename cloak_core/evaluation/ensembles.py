"""Which ensemble attacks the images each evaluator is scored on.

Leave-one-out (default): each evaluator is scored on images protected by the attack pool
minus every model sharing a weight file with it, so every protected figure is black-box;
evaluators that need the same ensemble share one attack run (an :class:`AttackGroup`).
A fixed ensemble (``attack_models``) attacks for all; evaluators that share weights with
it are then marked white-box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cloak_core.evaluation.evaluators import Evaluator, black_box_ensemble, shares_weights

if TYPE_CHECKING:
    from cloak_core.store import ModelStore
    from cloak_core.visibility import Visibility


@dataclass
class AttackGroup:
    """One attack run: an ensemble and the evaluators scored on its images.

    The run fills in the rest: ``protected``, the gallery as this ensemble protects it
    (RGB uint8 ``(H, W, 3)`` each, in gallery order); ``seconds``, the attack time;
    ``visibility``, the visibility panel of each protected image (protected identities'
    images only, in gallery order); ``photos``, the whole photos of the run's ``photos``
    folder as this ensemble's attack writes them (decoded RGB uint8), ``photo_seconds``,
    their attack time, and ``photo_visibility``, the panel of each of their protected faces
    (in photo order).
    """

    ensemble: tuple[str, ...]
    evaluators: list[str]
    protected: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0
    visibility: list[Visibility] = field(default_factory=list)
    photos: list[np.ndarray] = field(default_factory=list)
    photo_seconds: float = 0.0
    photo_visibility: list[Visibility] = field(default_factory=list)


def attack_pool(
    attack_models: Sequence[str] | None, preset_models: Sequence[str], store: ModelStore
) -> tuple[str, ...]:
    """The models attacks are drawn from: ``attack_models``, else the preset's ensemble,
    else every registry model whose weights are here.

    Leave-one-out removes from this pool whatever shares weights with an evaluator, so
    each evaluator is attacked by all the other models available (with only the two
    default models, each black-box ensemble would be a single model, far weaker than
    what a user runs); an evaluator outside the default ensemble is scored against every
    other model present. Raises UsageError for unknown names.
    """
    from cloak_core.models import available, get_spec

    names = attack_models or preset_models or available(store)
    for n in names:
        get_spec(n)  # UsageError for unknown names
    return tuple(names)


def attack_groups(
    evaluators: Sequence[Evaluator], pool: tuple[str, ...], *, fixed: bool
) -> tuple[list[AttackGroup], dict[str, dict]]:
    """The attack runs, and per evaluator (by name) its ensemble and whether it is
    black-box. ``fixed``: ``pool`` attacks for every evaluator (else leave-one-out)."""
    groups: dict[tuple[str, ...], AttackGroup] = {}
    info: dict[str, dict] = {}
    for ev in evaluators:
        ensemble = pool if fixed else tuple(black_box_ensemble(pool, ev))
        white = fixed and shares_weights(pool, ev)
        info[ev.name] = {
            "independent": ev.independent,
            "weights": sorted(ev.weights),
            "ensemble": list(ensemble),
            "white_box": bool(white),
        }
        if not ensemble:
            info[ev.name]["note"] = "every ensemble member shares its weights: not scored"
            continue
        groups.setdefault(ensemble, AttackGroup(ensemble, [])).evaluators.append(ev.name)
    return list(groups.values()), info
