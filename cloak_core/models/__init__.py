"""The registry of face-recognition models: name -> :class:`ModelSpec`.

To add a model: write one file here with the module, a factory, a ``SPECS`` tuple and a
``WEIGHTS`` tuple declaring its weight files (:class:`cloak_core.weights.WeightFile`),
then add the file to ``_FAMILIES`` below; the model store collects the declarations
from there (:func:`cloak_core.weights.catalogue`). Weights are resolved by the model store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cloak_core.errors import UsageError
from cloak_core.models import (
    dlib_resnet,
    evolve,
    facenet,
    mobilefacenet,
    mobilefacenet128,
    sface,
)
from cloak_core.models.base import FaceModel, ModelSpec, VerificationRule, load

if TYPE_CHECKING:
    from cloak_core.store import ModelStore

__all__ = [
    "REGISTRY",
    "FaceModel",
    "ModelSpec",
    "VerificationRule",
    "available",
    "default_ensemble",
    "get_spec",
    "load_model",
    "unseen",
]

_FAMILIES = (dlib_resnet, sface, facenet, mobilefacenet128, mobilefacenet, evolve)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for fam in _FAMILIES for spec in fam.SPECS}


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; a :class:`UsageError` listing the names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}"
        ) from None


def load_model(name: str, store: ModelStore, device: str | torch.device = "cpu") -> FaceModel:
    """Build the frozen model ``name`` with weights from ``store`` on ``device``."""
    return load(get_spec(name), store, device)


def available(store: ModelStore) -> list[str]:
    """Names of registered models whose weight files are already on this machine."""
    return [n for n, s in REGISTRY.items() if all(store.find_local(w) for w in s.weights)]


def unseen(store: ModelStore, ensemble: Sequence[str]) -> list[str]:
    """Names of the models here (:func:`available`) that ``ensemble`` leaves out: the
    recognisers that can check a protected face as a scraper's model would."""
    left_out = set(ensemble)
    return [n for n in available(store) if n not in left_out]


def default_ensemble(store: ModelStore) -> list[str]:
    """The default attack ensemble: every default model, plus face.evoLVe models present locally."""
    present = set(available(store))
    return [n for n, s in REGISTRY.items() if s.default or (s.family == "evolve" and n in present)]
