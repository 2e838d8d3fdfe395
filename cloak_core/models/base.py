"""The one small interface every face-recognition model sits behind.

A model family lives in its own file (``dlib_resnet.py``, ``sface.py``, ...): the
``nn.Module`` classes first, then a factory, then its :class:`ModelSpec` entries in a
``SPECS`` tuple that :mod:`cloak_core.models` collects into the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from cloak_core.store import ModelStore

# Five landmarks, (x, y) in the pixels of a model's input, in this order: the eye on
# the image's left, the eye on the image's right, the nose tip, the mouth corner on
# the image's left, the mouth corner on the image's right.
Template = tuple[tuple[float, float], ...]

ARCFACE_TEMPLATE_112: Template = (
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
)


@dataclass(frozen=True)
class VerificationRule:
    """A model's own rule for "same person": Euclidean distance below, or cosine at or above.

    ``metric`` is ``"euclidean"`` (on raw embeddings) or ``"cosine"``.
    """

    metric: Literal["euclidean", "cosine"]
    threshold: float

    def score(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance or cosine between rows of ``a`` and ``b``, both ``(B, D)``; returns ``(B,)``."""
        if self.metric == "euclidean":
            return (a - b).norm(dim=-1)
        return nn.functional.cosine_similarity(a, b, dim=-1)

    def same_person(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Boolean ``(B,)``: does the rule say rows of ``a`` and ``b`` show the same person."""
        s = self.score(a, b)
        return s < self.threshold if self.metric == "euclidean" else s >= self.threshold


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of FaceCloak knows about a face-recognition model, as data.

    ``input_size`` is ``(height, width)`` in pixels; ``template`` gives the five landmarks
    of :data:`Template` in those pixels; ``weights`` names files of the model store;
    ``default`` marks members of the default ensemble; ``build`` makes the module from
    resolved weight paths.
    """

    name: str
    family: str
    input_size: tuple[int, int]
    template: Template
    embedding_dim: int
    weights: tuple[str, ...]
    verification: VerificationRule
    build: Callable[..., FaceModel]
    default: bool = False
    description: str = ""


class FaceModel(nn.Module):
    """A frozen face-recognition network with its preprocessing inside ``forward``.

    ``forward(faces)`` takes ``(B, 3, H, W)`` RGB in 0..1, aligned to ``spec.template`` at
    ``spec.input_size``, and returns ``(B, D)`` raw (not normalised) embeddings.
    """

    spec: ModelSpec

    def freeze(self) -> FaceModel:
        """Put the model in eval mode with no parameter gradients (only input gradients)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


def load(spec: ModelSpec, store: ModelStore, device: str | torch.device = "cpu") -> FaceModel:
    """Resolve ``spec``'s weights through ``store``, build the module, freeze it, move it."""
    paths = [store.resolve(name) for name in spec.weights]
    model = spec.build(*paths)
    model.spec = spec
    return model.freeze().to(device)
