"""The identification protocol: splits, cosine ranking and rank-k accuracy on hand-made cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloak_core.errors import UsageError
from cloak_core.evaluation import protocol
from cloak_core.models import VerificationRule, get_spec


def _paths(n: int) -> list[Path]:
    return [Path(f"id/{i:03d}.png") for i in range(n)]


def test_split_takes_every_tenth_image_as_probe() -> None:
    sp = protocol.split_identity("a", _paths(20))
    assert [p.name for p in sp.probes] == ["000.png", "010.png"]
    assert len(sp.gallery) == 18
    assert set(sp.gallery).isdisjoint(sp.probes)
    sp = protocol.split_identity("a", _paths(21))
    assert [p.name for p in sp.probes] == ["000.png", "010.png", "020.png"]


def test_split_has_at_least_one_probe_and_caps() -> None:
    sp = protocol.split_identity("a", _paths(3))
    assert [p.name for p in sp.probes] == ["000.png"]
    assert [p.name for p in sp.gallery] == ["001.png", "002.png"]
    sp = protocol.split_identity("a", _paths(20), gallery_per_identity=4, probes_per_identity=1)
    assert [p.name for p in sp.gallery] == ["001.png", "002.png", "003.png", "004.png"]
    assert [p.name for p in sp.probes] == ["000.png"]
    with pytest.raises(UsageError):
        protocol.split_identity("lonely", _paths(1))


def test_list_identities_sorts_and_skips_non_images(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        for i in (1, 0):
            (tmp_path / name / f"{i}.png").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    found = protocol.list_identities(tmp_path)
    assert list(found) == ["a", "b"]
    assert [p.name for p in found["a"]] == ["0.png", "1.png"]
    with pytest.raises(UsageError):
        protocol.list_identities(tmp_path / "empty")


def test_cosine_matrix_by_hand() -> None:
    probes = np.array([[3.0, 0.0], [1.0, 1.0]])
    gallery = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    s = protocol.cosine_similarity_matrix(probes, gallery)
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(s, [[1, 0, -1], [r, r, -r]], atol=1e-12)


def test_rank1_and_rank5_by_hand() -> None:
    # Gallery on the unit circle at angles 0, 10, ..., 60 degrees: cosine falls with angle.
    angles = np.deg2rad(np.arange(0, 70, 10))
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1)
    g_labels = ["x", "y", "y", "y", "y", "z", "x"]  # identity at each angle
    # Probe 0 at 0 deg: nearest is x (0 deg) -> rank-1 hit.
    # Probe 1 (label z) at 0 deg: z is 6th nearest (50 deg) -> miss at rank 1 and rank 5.
    # Probe 2 (label z) at 21 deg: order 20,30,10,40,0,50,... -> z (50 deg) 6th: miss.
    # Probe 3 (label x) at 44 deg: order 40,50,30,60,20 -> x (60 deg) 4th: rank-5 hit only.
    p_angles = np.deg2rad([0, 0, 21, 44])
    probes = np.stack([np.cos(p_angles), np.sin(p_angles)], 1)
    p_labels = ["x", "z", "z", "x"]
    s = protocol.cosine_similarity_matrix(probes, gallery)
    order = protocol.rank_gallery(s)
    assert order[3].tolist()[:5] == [4, 5, 3, 6, 2]
    hits = protocol.rank_k_hits(s, p_labels, g_labels, ks=(1, 5, 6))
    assert hits[1].tolist() == [True, False, False, False]
    assert hits[5].tolist() == [True, False, False, True]
    assert hits[6].tolist() == [True, True, True, True]
    acc = protocol.accuracy(s, p_labels, g_labels)
    assert (acc.rank1, acc.rank5, acc.probes) == (0.25, 0.5, 4)


def test_ties_keep_gallery_order() -> None:
    s = np.array([[0.5, 0.9, 0.9, 0.1]])
    assert protocol.rank_gallery(s).tolist() == [[1, 2, 0, 3]]
    hits = protocol.rank_k_hits(s, ["b"], ["a", "a", "b", "b"], ks=(1, 2))
    assert hits[1].tolist() == [False] and hits[2].tolist() == [True]


def test_protected_similarity_per_identity_and_joint() -> None:
    # Two identities, one gallery image each, both protected. Clean: each probe sits on
    # its own gallery image. Protected: each gallery image moved far from its identity.
    clean = np.array([[1.0, 0.0], [0.0, 1.0]])
    moved = np.array([[-1.0, 0.2], [0.2, -1.0]])
    probes = np.array([[1.0, 0.1], [0.1, 1.0]])
    labels = ["a", "b"]
    s_clean = protocol.cosine_similarity_matrix(probes, clean)
    assert protocol.accuracy(s_clean, labels, labels).rank1 == 1.0
    per_id = protocol.protected_similarity(probes, labels, clean, moved, labels, ["a", "b"])
    # Probe a sees a's protected image and b's clean one, and vice versa.
    expect = protocol.cosine_similarity_matrix(probes, clean)
    s_moved = protocol.cosine_similarity_matrix(probes, moved)
    expect[0, 0], expect[1, 1] = s_moved[0, 0], s_moved[1, 1]
    np.testing.assert_allclose(per_id, expect)
    assert protocol.accuracy(per_id, labels, labels).rank1 == 0.0
    joint = protocol.protected_similarity(
        probes, labels, clean, moved, labels, ["a", "b"], joint=True
    )
    np.testing.assert_allclose(joint, s_moved)
    # Only "a" protected: b's probe still sees b's clean image.
    only_a = protocol.protected_similarity(probes, labels, clean, moved, labels, ["a"])
    assert only_a[1, 1] == pytest.approx(s_clean[1, 1])
    assert only_a[0, 0] == pytest.approx(s_moved[0, 0])


def test_runner_selects_protected_identities_and_leaves_out_singletons(tmp_path: Path) -> None:
    from cloak_core.evaluation.runner import EvalSettings, Evaluation

    for name, n in (("a", 12), ("b", 1), ("c", 3), ("d", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            (tmp_path / name / f"{i:02d}.png").write_bytes(b"")
    settings = EvalSettings(dataset=tmp_path, out=tmp_path / "out", device="cpu")
    splits, protected = Evaluation(settings, store=None)._splits()
    assert protected == ["a", "c", "d"]
    assert [sp.identity for sp in splits] == ["a", "c", "d"]
    assert [len(sp.probes) for sp in splits] == [2, 1, 1]
    two = EvalSettings(dataset=tmp_path, out=tmp_path / "out", device="cpu", identities=2)
    splits, protected = Evaluation(two, store=None)._splits()
    assert protected == ["a"] and [sp.identity for sp in splits] == ["a", "c", "d"]
    with pytest.raises(UsageError):
        Evaluation(
            EvalSettings(dataset=tmp_path, out=tmp_path, device="cpu", identities=5), store=None
        )._splits()


def test_attack_batches_keep_a_persons_photos_together() -> None:
    """Each attack batch is one collection: a person's photos are never split between two
    batches unless they alone are more than a batch, and no batch passes its size."""
    from cloak_core.evaluation.runner import _Image, person_batches

    def person(name: str, n: int) -> list[_Image]:
        return [
            _Image(name, Path(f"{name}/{i}.png"), np.zeros((2, 2, 3)), [], []) for i in range(n)
        ]

    def names(batches: list[list[_Image]]) -> list[str]:
        return ["".join(im.identity for im in b) for b in batches]

    # Three photos each in batches of four: one person per batch (not aaab, bbcc, c).
    assert names(person_batches(person("a", 3) + person("b", 3) + person("c", 3), 4)) == [
        "aaa",
        "bbb",
        "ccc",
    ]
    assert names(person_batches(person("a", 2) + person("b", 2) + person("c", 1), 4)) == [
        "aabb",
        "c",
    ]
    # A person with more photos than a batch fills whole batches, the rest goes on.
    assert names(person_batches(person("a", 9) + person("b", 2), 4)) == ["aaaa", "aaaa", "abb"]
    everyone = person("a", 5) + person("b", 1) + person("c", 7) + person("d", 3)
    batches = person_batches(everyone, 4)
    assert [im for b in batches for im in b] == everyone
    assert max(len(b) for b in batches) <= 4
    assert person_batches([], 4) == []


def test_a_person_split_between_batches_counts_their_photos_in_the_others(tmp_path) -> None:
    """A person with more photos than a batch is split, and their photos in the other
    batches, earlier and later, go with each batch (the daemon hands each part of a split
    upload the rest of it the same way); other people's photos never do. The cache entry
    names those companions: the same batch with other companions is another entry, one
    without any keeps its old key."""
    from cloak_core.detect import Face
    from cloak_core.evaluation.ensembles import AttackGroup
    from cloak_core.evaluation.runner import EvalSettings, Evaluation, _Image
    from cloak_core.models.base import ARCFACE_TEMPLATE_112

    face = Face.from_template(ARCFACE_TEMPLATE_112, box=(0, 0, 112, 112))
    rng = np.random.default_rng(0)

    def person(name: str, n: int) -> list[_Image]:
        return [
            _Image(
                name,
                Path(f"{name}/{i}.png"),
                rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
                [face],
                [face],
            )
            for i in range(n)
        ]

    settings = EvalSettings(dataset=tmp_path, out=tmp_path, device="cpu", batch_size=3)
    run = Evaluation(settings, store=None)
    a, b = person("a", 7), person("b", 2)
    batches = run._batches(AttackGroup(("dlib", "sface"), []), a + b)
    assert [[im.identity for im in chunk] for _, chunk, _, _ in batches] == [
        ["a"] * 3,
        ["a"] * 3,
        ["a", "b", "b"],
    ]
    assert [len(others) for _, _, others, _ in batches] == [4, 4, 6]
    assert batches[0][2] == a[3:] and batches[1][2] == a[:3] + a[6:]
    assert batches[2][2] == a[:6]
    assert len({path for *_, path in batches}) == 3
    config = run.config
    chunk = batches[1][1]
    pixels, faces = [im.pixels for im in chunk], [im.attack_faces for im in chunk]
    seed = batches[1][0]
    alone = run.cache.path(config, seed, pixels, faces)
    other = run.cache.path(config, seed, pixels, faces, [b[0].pixels], [[face]])
    assert len({alone, other, batches[1][3]}) == 3
    assert run.cache.path(config, seed, pixels, faces, [], []) == alone


def test_own_original_match_against_scipy() -> None:
    """Mean cosine and the share still matched, by either kind of rule, against SciPy's
    own distances on random embeddings (thresholds at a quartile of the faces' values, so
    the share is neither 0 nor 1 and tells the rule's direction)."""
    from scipy.spatial import distance

    rng = np.random.default_rng(3)
    clean = rng.normal(size=(40, 128))
    protected = clean + rng.normal(scale=1.2, size=(40, 128))
    cos = np.array([1 - distance.cosine(a, b) for a, b in zip(clean, protected, strict=True)])
    dist = np.array([distance.euclidean(a, b) for a, b in zip(clean, protected, strict=True)])

    threshold = float(np.quantile(cos, 0.25))
    got = protocol.own_original_match(clean, protected, VerificationRule("cosine", threshold))
    assert got["faces"] == 40
    assert got["cosine"] == pytest.approx(cos.mean(), abs=1e-12)
    assert got["matched"] == pytest.approx((cos >= threshold).mean())
    assert 0.7 <= got["matched"] <= 0.8  # at or above: the upper three quarters

    threshold = float(np.quantile(dist, 0.3))
    got = protocol.own_original_match(clean, protected, VerificationRule("euclidean", threshold))
    assert got["matched"] == pytest.approx((dist < threshold).mean())
    assert got["cosine"] == pytest.approx(cos.mean(), abs=1e-12)
    # An unchanged face (one the detector missed) is matched, at cosine 1.
    same = protocol.own_original_match(clean[:5], clean[:5], get_spec("dlib").verification)
    assert same["matched"] == 1.0 and same["cosine"] == pytest.approx(1.0)

    with pytest.raises(ValueError, match="different shapes"):
        protocol.own_original_match(clean, protected[:3], VerificationRule("cosine", 0.3))
