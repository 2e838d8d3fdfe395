"""The identification protocol of the LowKey paper: splits, ranking and rank-k accuracy.

A dataset is a folder with one sub-folder per identity. Each identity's images, in name
order, are split into a *probe* split (every tenth image, the first, eleventh, ... one;
at least one) and a *gallery* split (the rest). Each probe is matched against the whole
gallery by cosine similarity of embeddings; it counts as identified at rank ``k`` when
one of its ``k`` most similar gallery images shows the same identity.

Protection is measured per identity ("one user at a time", as a social network sees one
user who protects their photos among many who do not): for a probe of a protected
identity, that identity's gallery images are replaced by their protected versions while
every other identity's gallery stays clean. ``joint=True`` instead protects the galleries
of all protected identities at once. Identities that are not protected only contribute
clean gallery images (distractors) and are not scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cloak_core.errors import UsageError

if TYPE_CHECKING:
    from cloak_core.models import VerificationRule

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
PROBE_EVERY = 10


@dataclass(frozen=True)
class IdentitySplit:
    """One identity's images split into gallery and probe paths (both in name order)."""

    identity: str
    gallery: tuple[Path, ...]
    probes: tuple[Path, ...]


def list_identities(root: Path) -> dict[str, list[Path]]:
    """Identity name -> its image paths (sorted), for every sub-folder of ``root`` with images.

    Raises :class:`UsageError` when ``root`` is not a folder or holds no identity folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"dataset {root}: not a folder")
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(
            p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if images:
            found[sub.name] = images
    if not found:
        raise UsageError(f"dataset {root}: no identity sub-folders with images")
    return found


def split_identity(
    identity: str,
    images: Sequence[Path],
    *,
    gallery_per_identity: int | None = None,
    probes_per_identity: int | None = None,
) -> IdentitySplit:
    """Split ``images`` (in order) into probes (indices 0, 10, 20, ...) and gallery (the rest).

    ``gallery_per_identity`` / ``probes_per_identity`` keep only the first K / P of each
    split. An identity needs at least two images (one probe and one gallery image).
    """
    if len(images) < 2:
        raise UsageError(f"identity {identity!r} has {len(images)} image(s); at least 2 needed")
    probes = [p for i, p in enumerate(images) if i % PROBE_EVERY == 0]
    gallery = [p for i, p in enumerate(images) if i % PROBE_EVERY != 0]
    if gallery_per_identity is not None:
        gallery = gallery[:gallery_per_identity]
    if probes_per_identity is not None:
        probes = probes[:probes_per_identity]
    return IdentitySplit(identity, tuple(gallery), tuple(probes))


def cosine_similarity_matrix(probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(P, G)`` of rows of ``probes`` ``(P, D)`` and ``gallery`` ``(G, D)``."""
    p = np.asarray(probes, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return p @ g.T


def rank_gallery(similarity: np.ndarray) -> np.ndarray:
    """Gallery indices ``(P, G)`` ordered from most to least similar for each probe row.

    Ties keep gallery order (a stable sort), so results do not depend on the platform.
    """
    return np.argsort(-np.asarray(similarity), axis=1, kind="stable")


def rank_k_hits(
    similarity: np.ndarray,
    probe_labels: Sequence[str],
    gallery_labels: Sequence[str],
    ks: Sequence[int] = (1, 5),
) -> dict[int, np.ndarray]:
    """For each ``k``, a boolean ``(P,)``: is a gallery image of the probe's identity in its top k.

    ``similarity`` is ``(P, G)`` (higher means more alike).
    """
    order = rank_gallery(similarity)
    g_labels = np.asarray(gallery_labels, dtype=object)
    p_labels = np.asarray(probe_labels, dtype=object)
    same = g_labels[order] == p_labels[:, None]  # (P, G), in rank order
    return {k: same[:, :k].any(axis=1) for k in ks}


def protected_similarity(
    probe_embeddings: np.ndarray,
    probe_labels: Sequence[str],
    clean_gallery: np.ndarray,
    protected_gallery: np.ndarray,
    gallery_labels: Sequence[str],
    protected_identities: Sequence[str],
    *,
    joint: bool = False,
) -> np.ndarray:
    """Similarity ``(P, G)`` of probes to the gallery that each probe is searched in.

    ``clean_gallery`` and ``protected_gallery`` are ``(G, D)`` embeddings of the same gallery
    images, before and after protection (rows of unprotected identities may be anything
    in ``protected_gallery``; they are never used). Per identity (default): a probe sees
    its own identity's gallery protected, if that identity is protected, and every other
    gallery image clean. ``joint``: every protected identity's gallery is protected.
    """
    s_clean = cosine_similarity_matrix(probe_embeddings, clean_gallery)
    s_prot = cosine_similarity_matrix(probe_embeddings, protected_gallery)
    g_labels = np.asarray(gallery_labels, dtype=object)
    g_protected = np.isin(g_labels, np.asarray(list(protected_identities), dtype=object))
    if joint:
        use_protected = np.broadcast_to(g_protected[None, :], s_clean.shape)
    else:
        p_labels = np.asarray(probe_labels, dtype=object)
        use_protected = (g_labels[None, :] == p_labels[:, None]) & g_protected[None, :]
    return np.where(use_protected, s_prot, s_clean)


@dataclass(frozen=True)
class Accuracy:
    """Rank-1 and rank-5 identification accuracy (fractions 0..1) over ``probes`` probes."""

    rank1: float
    rank5: float
    probes: int

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return {"rank1": self.rank1, "rank5": self.rank5, "probes": self.probes}


def accuracy(
    similarity: np.ndarray, probe_labels: Sequence[str], gallery_labels: Sequence[str]
) -> Accuracy:
    """Rank-1 and rank-5 accuracy of the probes (rows of ``similarity`` ``(P, G)``)."""
    if len(probe_labels) == 0:
        raise UsageError("no probes to score")
    hits = rank_k_hits(similarity, probe_labels, gallery_labels, ks=(1, 5))
    return Accuracy(float(hits[1].mean()), float(hits[5].mean()), len(probe_labels))


def own_original_match(
    clean: np.ndarray, protected: np.ndarray, rule: VerificationRule
) -> dict[str, float | int]:
    """How far each protected face still matches the very photo it was made from.

    ``clean`` and ``protected`` are ``(N, D)`` embeddings of the same N faces before and
    after protection (under the same condition); ``rule`` is the recogniser's own
    same-person rule (its :class:`~cloak_core.models.VerificationRule`). Returns the mean
    cosine, the fraction the rule still calls the same person, and N. A per-face,
    continuous measure beside rank-k: a face counts even when no probe of its identity
    happens to rank it, and the worst case for the person (a recogniser holding the
    original itself) is what it scores.
    """
    return own_original_summary(*own_original_faces(clean, protected, rule))


def own_original_summary(cos: np.ndarray, same: np.ndarray) -> dict[str, float | int]:
    """:func:`own_original_match`'s figures from :func:`own_original_faces`' per-face ones."""
    return {
        "cosine": float(cos.mean()) if len(cos) else float("nan"),
        "matched": float(same.mean()) if len(same) else float("nan"),
        "faces": len(cos),
    }


def own_original_faces(
    clean: np.ndarray, protected: np.ndarray, rule: VerificationRule
) -> tuple[np.ndarray, np.ndarray]:
    """Per face, as :func:`own_original_match` counts it: the cosine ``(N,)`` between
    ``clean`` and ``protected`` and whether ``rule`` calls them the same person ``(N,)``."""
    a = np.asarray(clean, dtype=np.float64)
    b = np.asarray(protected, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings of different shapes: {a.shape} and {b.shape}")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    same = rule.same_person(torch.from_numpy(a), torch.from_numpy(b)).numpy().astype(bool)
    return cos, same
