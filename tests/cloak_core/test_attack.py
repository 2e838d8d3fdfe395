"""The attack's building blocks against references: blur against OpenCV, masks, terms."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.attack import gaussian_blur, model_term
from cloak_core.errors import CancelledError, UsageError
from cloak_core.models.base import VerificationRule
from cloak_core.pipeline import feather_mask
from cloak_core.presets import PRESETS, get_preset


def test_gaussian_blur_matches_opencv_on_a_real_photo(photos_dir):
    rgb = np.asarray(Image.open(photos_dir / "obama.jpg").convert("RGB"), dtype=np.float32) / 255
    ours = gaussian_blur(torch.from_numpy(rgb).permute(2, 0, 1)[None], 7, 3.0)[0].permute(1, 2, 0)
    ref = cv2.GaussianBlur(rgb, (7, 7), 3.0, borderType=cv2.BORDER_REFLECT_101)
    assert np.abs(ours.numpy() - ref).max() < 1e-5


def test_feather_mask_fades_only_open_sides():
    m = feather_mask((40, 60), 8, (True, False, True, True))[0]
    assert m.shape == (40, 60)
    assert float(m[20, 30]) == pytest.approx(1.0)
    assert float(m[20, 0]) == pytest.approx(0.0)  # left side fades
    assert float(m[0, 30]) == pytest.approx(1.0)  # top side is the image's edge: no fade
    assert float(m[39, 30]) == pytest.approx(0.0)
    assert torch.all(m[20, :9].diff() >= 0)  # monotonic ramp


def test_capped_terms_follow_each_models_rule():
    config = replace(get_preset("balanced"), cosine_target=0.0, euclidean_target_ratio=1.5)
    original = torch.tensor([[1.0, 0.0]])
    cosine = type(
        "M", (), {"spec": type("S", (), {"verification": VerificationRule("cosine", 0.36)})}
    )
    euclid = type(
        "M", (), {"spec": type("S", (), {"verification": VerificationRule("euclidean", 0.6)})}
    )
    # Cosine 0 reaches the target (0.0): the term is capped at 1.
    assert float(model_term(cosine, original, torch.tensor([[0.0, 1.0]]), config)) == 1.0
    assert float(model_term(cosine, original, torch.tensor([[1.0, 1.0]]), config)) < 1.0
    # Distance 0.45 is half of 1.5 * 0.6.
    far = torch.tensor([[1.0, 0.45]])
    assert float(model_term(euclid, original, far, config)) == pytest.approx(0.5, abs=1e-4)
    # The paper preset has no caps: the normalised squared distance of the published code.
    paper = get_preset("paper")
    assert float(model_term(cosine, original, torch.tensor([[-1.0, 0.0]]), paper)) == 4.0


def test_paper_preset_is_the_published_setting():
    p = PRESETS["paper"]
    assert (p.steps, p.step_size, p.lpips_weight, p.noise, p.lpips_net) == (
        50,
        0.0025,
        0.05,
        0.005,
        "alex",
    )
    assert (p.blur_kernel, p.blur_sigma, p.flips) == (7, 3.0, True)


def test_settings_take_each_fields_type():
    """``--set`` values become what each field holds: a switch a bool, a count an int,
    ``None`` only where a field may be off; anything else is a usage error."""
    base = PRESETS["balanced"]
    changed = base.with_settings(
        [("centroid", False), ("momentum", None), ("steps", 20.4), ("seed", 3.0), ("noise", 0)]
    )
    assert changed.centroid is False and changed.momentum is None
    assert (changed.steps, changed.seed) == (20, 3)
    assert type(changed.steps) is int and type(changed.noise) is float
    assert base.with_settings([("centroid", 0.0)]).centroid is False
    assert base.with_settings([("flips", 1.0)]).flips is True
    assert (
        base.centroid_mix == 0.5 and base.with_settings([("centroid_mix", 1)]).centroid_mix == 1.0
    )
    for setting, message in (
        (("centroid", 0.5), "a switch"),
        (("steps", None), "cannot be none"),
        (("grad_sigma", True), "takes a number"),
        (("lpips_net", 1.0), "not an attack setting"),
        (("steps", 0.2), "at least 1"),
        (("centroid_mix", 1.5), "fraction from 0 to 1"),
        (("centroid_mix", -0.1), "fraction from 0 to 1"),
        (("spectrum", 1.5), "gain spread from 0 to 1"),
    ):
        with pytest.raises(UsageError, match=message):
            base.with_settings([setting])


def test_lpips_budget_bounds_every_face(store, faces_dir):
    """A face reaching the LPIPS budget stops there; without a budget it goes past it."""
    from cloak_core.attack import StageTimes, _lpips_view, lowkey
    from cloak_core.detect import Face
    from cloak_core.models.base import ARCFACE_TEMPLATE_112
    from cloak_core.pipeline import Protector

    images = [
        np.asarray(Image.open(d / "001.png").convert("RGB"))
        for d in sorted(faces_dir.iterdir())[:2]
    ]
    face = Face.from_template(ARCFACE_TEMPLATE_112, box=(0, 0, 112, 112))
    base = replace(
        get_preset("strong"), steps=12, step_size=0.01, models=("mobilefacenet",), seed=0
    )
    with Protector(base, store=store, device="cpu", models=base.models) as p:
        specs = [p._model("mobilefacenet").spec]
        regions = [p._plan(i, (112, 112), face, specs, base) for i in range(2)]
        batch = p._batch(regions, images, ["mobilefacenet"], base)
        models = {"mobilefacenet": p._model("mobilefacenet")}
        lpips = p._lpips_net("alex")

        def distances(config):
            perturbation = lowkey(
                batch,
                models,
                lpips,
                config,
                generator=torch.Generator().manual_seed(0),
                times=StageTimes(torch.device("cpu")),
            )
            with torch.no_grad():
                x = _lpips_view(batch.pixels, config.lpips_size)
                adv = _lpips_view(batch.pixels + perturbation, config.lpips_size)
                return (lpips(x, adv).float() / batch.area).tolist()

        free = distances(replace(base, lpips_budget=None))
        bounded = distances(replace(base, lpips_budget=0.01))
    assert min(free) > 0.01
    assert all(0 < d <= 0.01 + 1e-6 for d in bounded), bounded


def test_only_regions_shown_larger_than_optimised_get_smoothed():
    from cloak_core.attack import FaceBatch, _smooth_upscaled

    grad = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    batch = FaceBatch(
        pixels=torch.zeros(2, 3, 24, 24),
        masks=torch.ones(2, 1, 24, 24),
        matrices={},
        area=torch.ones(2),
        upscale=(1.0, 3.0),
    )
    out = _smooth_upscaled(grad, batch, 1.0)
    assert torch.equal(out[0], grad[0])  # shown as optimised: untouched
    assert torch.allclose(out[1], gaussian_blur(grad[1:], 13, 3.0)[0])
    assert float(out[1].std()) < 0.3 * float(grad[1].std())
    assert torch.equal(grad, torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0)))


def _face_batch(image: np.ndarray, side: int | None = None):
    """A batch of one real face region (no padding unless ``side`` names the region's
    own side inside a larger padded batch)."""
    from cloak_core.attack import FaceBatch

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    h, w = image.shape[:2]
    area = 1.0 if side is None else side * side / (h * w)
    return FaceBatch(pixels, torch.ones(1, 1, h, w), {}, torch.tensor([area]))


def test_contrast_steps_leave_flat_skin_alone(faces_dir):
    """``contrast``: a flat patch on a real face takes no step, its features the full one,
    and the window grows with the region, so an enlarged face is judged as at 112 pixels."""
    from cloak_core.attack import SignSteps, contrast_weights

    face = np.array(Image.open(faces_dir / "Tina_Fey" / "003.png").convert("RGB"))
    flat = face.copy()
    flat[60:100, 8:48] = face[80, 28]  # a flat 40-pixel patch over the cheek
    weights = contrast_weights(_face_batch(flat), 2.0)[0, 0]
    assert weights.shape == (112, 112) and 0 <= float(weights.min()) <= float(weights.max()) <= 1
    assert float(weights[80, 28]) == 0.0
    assert float(weights[40:55, 30:80].mean()) > 0.8  # the eyes
    # Three times larger: the window grows with the region; held at 2 pixels, most of the
    # enlarged face would count as flat.
    large = np.array(Image.fromarray(face).resize((336, 336), Image.Resampling.BICUBIC))
    small = float(contrast_weights(_face_batch(face), 2.0).mean())
    grown = float(contrast_weights(_face_batch(large), 2.0).mean())
    fixed = float(contrast_weights(_face_batch(large, side=112), 2.0).mean())
    assert abs(grown - small) < 0.1 and fixed < small - 0.2
    # One step: nothing moves on the flat patch, the features move.
    config = replace(get_preset("balanced"), contrast=2.0)
    steps = SignSteps(_face_batch(flat), config, torch.Generator().manual_seed(0))
    before = steps.delta.detach().clone()
    steps.delta.grad = torch.randn(before.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # as the attack's loop takes its steps
        assert steps.step(None)
    moved = (steps.delta.detach() - before).abs().sum(1)[0]
    assert float(moved[75:85, 23:33].max()) < 1e-6  # float rounding of the pixel clamp
    assert float(moved[40:55, 30:80].mean()) > 0.5 * config.step_size


def test_a_face_past_its_caps_shrinks_instead_of_stepping(faces_dir):
    """``shrink``: of two faces, the one that met every cap takes no step and its
    perturbation shrinks by that fraction; the other steps as before."""
    from cloak_core.attack import FaceBatch, SignSteps

    faces = [
        np.array(Image.open(faces_dir / name / "003.png").convert("RGB"))
        for name in ("Tina_Fey", sorted(p.name for p in faces_dir.iterdir())[0])
    ]
    pixels = torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 255
    batch = FaceBatch(pixels, torch.ones(2, 1, 112, 112), {}, torch.ones(2))
    grad = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(1))
    moved = {}
    for shrink in (None, 0.25):
        config = replace(get_preset("balanced"), shrink=shrink, noise=0.02)
        steps = SignSteps(batch, config, torch.Generator().manual_seed(0))
        before = steps.delta.detach().clone()
        steps.delta.grad = grad.clone()
        with torch.no_grad():
            assert steps.step(None, torch.tensor([True, False]))
        moved[shrink] = steps.delta.detach()
        if shrink:
            shrunk = (pixels[0] + 0.75 * before[0]).clamp(0.0, 1.0) - pixels[0]
            assert torch.allclose(moved[shrink][0], shrunk, atol=1e-7)
    assert torch.equal(moved[None][1], moved[0.25][1])  # the face still short of its caps
    assert float((moved[None][0] - before[0]).abs().max()) > 0.5 * config.step_size
    # Projected steps inside a perceptual budget follow the same rule.
    from cloak_core.attack import BudgetSteps
    from cloak_core.perceptual import ycc_to_rgb

    config = replace(get_preset("natural"), shrink=0.25, detail=None)
    steps = BudgetSteps(batch, config, torch.Generator().manual_seed(0))
    before = steps.param.detach().clone()
    steps.param.grad = grad.clone()
    with torch.no_grad():
        steps.step(None, torch.tensor([True, False]))
    shrunk = (pixels[0] + ycc_to_rgb(0.75 * before)[0]).clamp(0.0, 1.0) - pixels[0]
    assert torch.allclose(ycc_to_rgb(steps.param.detach())[0], shrunk, atol=1e-5)
    assert float((steps.param.detach()[1] - before[1]).abs().max()) > 1e-3


def _aligned_embeddings(p, images, face, config, names) -> dict:
    """Per model, the clean embeddings of aligned 112-pixel ``images`` (one ``face`` each)
    as the attack sees them, computed here from the pipeline's own planning and ``embed``."""
    from cloak_core.attack import embed

    models = {n: p._model(n) for n in names}
    specs = [m.spec for m in models.values()]
    regions = [p._plan(i, (112, 112), face, specs, config) for i in range(len(images))]
    batch = p._batch(regions, images, names, config)
    with torch.no_grad():
        return {n: embed(m, batch.pixels, batch.matrices[n], True) for n, m in models.items()}


def test_photos_of_one_person_are_pushed_from_their_shared_identity(store, faces_dir):
    """With `centroid` and photos protected together, faces that every model verifies as
    one person (in different photos) are pushed away from the mean of their embeddings
    (from halfway to it, the preset's `centroid_mix`); another person, or two faces of one
    photo, keep their own; without `together` (the daemon's separate uploads) nothing is
    shared."""
    import torch.nn.functional as F

    from cloak_core.attack import shared_identity
    from cloak_core.detect import Face
    from cloak_core.models.base import ARCFACE_TEMPLATE_112
    from cloak_core.pipeline import Protector

    folders = sorted(faces_dir.iterdir())
    load = lambda d, k: np.asarray(Image.open(d / f"{k:03d}.png").convert("RGB"))  # noqa: E731
    images = [load(folders[1], 1), load(folders[1], 3), load(folders[2], 1)]
    face = Face.from_template(ARCFACE_TEMPLATE_112, box=(0, 0, 112, 112))
    config = replace(get_preset("balanced"), steps=16, seed=0)
    assert get_preset("balanced").centroid
    names = ["dlib", "sface"]
    with Protector(config, store=store, device="cpu", models=names) as p:
        models = {n: p._model(n) for n in names}
        own = _aligned_embeddings(p, images, face, config, names)
        unit = F.normalize(own["sface"], dim=-1)
        shared = shared_identity(own, models, torch.tensor([0, 1, 2]))
        assert torch.allclose(shared["sface"][0], shared["sface"][1])
        assert torch.allclose(shared["sface"][0], unit[:2].mean(0), atol=1e-6)
        assert torch.allclose(shared["dlib"][0], own["dlib"][:2].mean(0), atol=1e-6)
        assert torch.allclose(shared["sface"][2], unit[2], atol=1e-6)
        assert torch.allclose(shared["dlib"][2], own["dlib"][2])
        # Mixed: that fraction of the way from each face's own (unit) embedding to the
        # shared identity; 0 is the face's own.
        half = shared_identity(own, models, torch.tensor([0, 1, 2]), mix=0.25)
        assert torch.allclose(half["sface"], 0.25 * shared["sface"] + 0.75 * unit, atol=1e-6)
        assert torch.allclose(half["dlib"], 0.25 * shared["dlib"] + 0.75 * own["dlib"], atol=1e-6)
        none = shared_identity(own, models, torch.tensor([0, 1, 2]), mix=0.0)
        assert torch.allclose(none["sface"], unit, atol=1e-6)
        # Two faces of one photo are two people, whatever the models say.
        apart = shared_identity(own, models, torch.tensor([0, 0, 2]))
        assert torch.allclose(apart["sface"], unit, atol=1e-6)
        # Two uploads are two collections, whoever is in them.
        uploads = shared_identity(own, models, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        assert torch.allclose(uploads["sface"], unit, atol=1e-6)

        faces = [[face]] * 3
        outputs = {
            together: p.protect_pixels(images, faces, seed=0, together=together)
            for together in (False, True)
        }
        plain = replace(config, centroid=False)
        unshared = p.protect_pixels(images, faces, seed=0, config=plain, together=True)
        assert config.centroid_mix == 0.5  # the preset's: halfway
        whole = replace(config, centroid_mix=1.0)
        from_shared = p.protect_pixels(images, faces, seed=0, config=whole, together=True)
        assert all(np.array_equal(a, b) for a, b in zip(outputs[False], unshared, strict=True))
        # One call holding several uploads (the daemon's batches): shared within each.
        labelled = p.protect_pixels(images, faces, seed=0, collections=["up", "up", None])
        assert all(np.array_equal(a, b) for a, b in zip(outputs[True], labelled, strict=True))
        sface = models["sface"]
        centre = unit[:2].mean(0, keepdim=True)

        def from_centre(pixels: list[np.ndarray]) -> list[float]:
            x = torch.from_numpy(np.stack(pixels[:2])).permute(0, 3, 1, 2).float() / 255
            with torch.no_grad():
                return F.cosine_similarity(sface(x).float(), centre, dim=-1).tolist()

    alone, halfway = from_centre(outputs[False]), from_centre(outputs[True])
    assert all(t < a - 0.05 for t, a in zip(halfway, alone, strict=True)), (halfway, alone)
    # The mix reaches the attack: from the shared identity itself, other faces; the third
    # face, a person of their own, is the same either way.
    assert not np.array_equal(from_shared[0], outputs[True][0])
    assert np.array_equal(from_shared[2], outputs[True][2])


def test_an_upload_split_between_calls_is_pushed_from_the_whole_uploads_identity(store, faces_dir):
    """An upload larger than one call (the daemon's batches) carries each call's clean
    embeddings to the next: a later part is pushed from the shared identity of every
    photo of the upload so far, as if all were in one call, and a photo left on its own
    is pushed from it instead of being protected alone."""
    import torch.nn.functional as F

    from cloak_core.attack import shared_identity
    from cloak_core.detect import Face
    from cloak_core.models.base import ARCFACE_TEMPLATE_112
    from cloak_core.pipeline import Protector

    folders = sorted(faces_dir.iterdir())
    load = lambda d, k: np.asarray(Image.open(d / f"{k:03d}.png").convert("RGB"))  # noqa: E731
    # Three photos of one person, then a fourth of them and one of another person.
    images = [load(folders[1], k) for k in (1, 3, 5, 7)] + [load(folders[2], 1)]
    face = Face.from_template(ARCFACE_TEMPLATE_112, box=(0, 0, 112, 112))
    config = replace(get_preset("balanced"), steps=16, seed=0)
    names = ["dlib", "sface"]
    with Protector(config, store=store, device="cpu", models=names) as p:
        models = {n: p._model(n) for n in names}
        own = _aligned_embeddings(p, images, face, config, names)
        for mix in (1.0, 0.5):
            whole = shared_identity(own, models, torch.arange(5), mix=mix)
            later = shared_identity(
                {n: e[3:] for n, e in own.items()},
                models,
                torch.arange(2),
                mix=mix,
                companions={n: e[:3] for n, e in own.items()},
                companion_collection=torch.zeros(3, dtype=torch.long),
            )
            for n in names:
                assert torch.allclose(later[n], whole[n][3:], atol=1e-6), (n, mix)
            # Companions of another upload count for nothing.
            other = shared_identity(
                {n: e[3:] for n, e in own.items()},
                models,
                torch.arange(2),
                torch.zeros(2, dtype=torch.long),
                mix=mix,
                companions={n: e[:3] for n, e in own.items()},
                companion_collection=torch.ones(3, dtype=torch.long),
            )
            assert torch.allclose(other["sface"], F.normalize(own["sface"][3:], dim=-1))

        faces = [[face]] * 5
        carried: dict = {}
        outputs_first = p.protect_pixels(
            images[:3], faces[:3], seed=0, collections=["up"] * 3, carried=carried
        )
        assert set(carried) == {"up"}
        assert all(torch.allclose(carried["up"][n], own[n][:3], atol=1e-5) for n in names)
        snapshot = {n: e.clone() for n, e in carried["up"].items()}
        last = p.protect_pixels(
            images[3:], faces[3:], seed=0, collections=["up", None], carried=carried
        )
        assert [len(carried["up"][n]) for n in names] == [4, 4]
        assert torch.allclose(carried["up"]["dlib"][3], own["dlib"][3], atol=1e-5)
        alone = p.protect_pixels(images[3:], faces[3:], seed=0, collections=["up", None])
        # The photo of another person is protected as it would be alone.
        assert np.array_equal(last[1], alone[1])
        assert not np.array_equal(last[0], alone[0])
        # Without the preset's centroid nothing is carried or shared.
        plain = replace(config, centroid=False)
        kept: dict = {"up": snapshot}
        unshared = p.protect_pixels(
            images[3:4], faces[3:4], seed=0, config=plain, collections=["up"], carried=kept
        )
        assert np.array_equal(
            unshared[0], p.protect_pixels(images[3:4], faces[3:4], seed=0, config=plain)[0]
        )
        assert len(kept["up"]["sface"]) == 3
        with pytest.raises(UsageError, match="collection labels"):
            p.protect_pixels(images[:2], faces[:2], together=True, carried={})
        # The evaluation's batches carry a split person the same way, from their photos.
        from cloak_core.evaluation.workers import protect_batch

        assert all(
            torch.allclose(e, own[n][:3], atol=1e-5)
            for n, e in p.embed_faces(images[:3], faces[:3]).items()
        )
        carried_once = p.protect_pixels(
            images[3:4], faces[3:4], seed=0, collections=["up"], carried={"up": snapshot}
        )
        from_photos = protect_batch(p, images[3:4], faces[3:4], 0, images[:3], faces[:3])
        assert np.array_equal(carried_once[0], from_photos[0])
        assert not np.array_equal(carried_once[0], alone[0])
        # The daemon's call: encoded photos, the face found by the detector.
        png = io.BytesIO()
        Image.fromarray(images[3]).save(png, format="PNG")
        daemons = {"up": dict(snapshot)}
        (result,) = p.protect_many([png.getvalue()], collections=["up"], carried=daemons)
        assert result.faces == 1 and len(daemons["up"]["sface"]) == 4
        # The first part of a split upload is handed the photos still waiting (the
        # daemon embeds them before it runs): they count as carried ones do, and are not
        # added to what is carried (their own call adds them).
        fourth = {n: own[n][3:4] for n in names}
        as_carried = p.protect_pixels(
            images[:3], faces[:3], seed=0, collections=["up"] * 3, carried={"up": fourth}
        )
        first: dict = {}
        as_waiting = p.protect_pixels(
            images[:3], faces[:3], seed=0, collections=["up"] * 3, carried=first,
            waiting={"up": [fourth, {n: e[:0] for n, e in fourth.items()}]},
        )  # fmt: skip
        assert all(np.array_equal(a, b) for a, b in zip(as_carried, as_waiting, strict=True))
        assert not np.array_equal(as_waiting[0], outputs_first[0])
        assert [len(first["up"][n]) for n in names] == [3, 3]
        # A single photo of an upload whose other photos all wait is pushed from them too.
        (one,) = p.protect_pixels(
            images[3:4], faces[3:4], seed=0, collections=["up"],
            waiting={"up": [snapshot]},
        )  # fmt: skip
        assert np.array_equal(one, carried_once[0])
        # What the daemon embeds of a waiting photo: its detected face, per model; a stop
        # asked for stops it.
        found: list = []
        waited = p.embed_photos([png.getvalue(), b"not an image"], found=found)
        assert [tuple(waited[n].shape) for n in names] == [(1, 128), (1, 128)]
        assert len(found) == 2 and len(found[0]) == 1 and found[1] is None
        # ... and when that photo's own call comes, its faces are not looked for again:
        # the faces handed over are the ones protected (none given, none protected).
        kept = {"up": dict(snapshot)}
        (again,) = p.protect_many(
            [png.getvalue()], collections=["up"], carried=kept, faces=found[:1]
        )
        assert again.faces == 1 and again.data == result.data
        (none,) = p.protect_many([png.getvalue()], faces=[[]])
        assert none.faces == 0
        stop = threading.Event()
        stop.set()
        with pytest.raises(CancelledError):
            p.embed_photos([png.getvalue()], cancel=stop)
        with pytest.raises(UsageError, match="collection labels"):
            p.protect_pixels(images[:2], faces[:2], together=True, waiting={})
        centre = F.normalize(own["sface"][:4], dim=-1).mean(0, keepdim=True)
        sface = models["sface"]

        def from_centre(pixels: np.ndarray) -> float:
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                return float(F.cosine_similarity(sface(x).float(), centre, dim=-1))

    # Pushed from the upload's identity, the photo ends further from it than alone.
    assert from_centre(last[0]) < from_centre(alone[0]) - 0.05, (
        from_centre(last[0]),
        from_centre(alone[0]),
    )


def test_feature_dropout_augments_only_the_attacks_steps(store, faces_dir):
    """Model augmentation: with gradients on, SFace's convolutions drop about 5% of
    their outputs (the rest scaled to keep the mean), reproducibly from the seed; without
    gradients, and once the block is left, SFace gives its own embedding."""
    from torch import nn

    from cloak_core.attack import feature_dropout, mask_generator
    from cloak_core.errors import UsageError
    from cloak_core.models import load_model

    sface = load_model("sface", store)
    face = np.array(Image.open(sorted(faces_dir.iterdir())[0] / "000.png").convert("RGB"))
    x = torch.from_numpy(face).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        clean = sface(x)
    layer = next(m for m in sface.modules() if isinstance(m, nn.Conv2d))
    seen = []
    # Registered before the block's hooks, so it sees each output before it is dropped.
    raw = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))

    def augmented(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        masks = mask_generator(torch.Generator().manual_seed(seed), x.device)
        seen.clear()
        dropped = []
        with feature_dropout({"sface": sface}, {"sface": 0.05}, masks):
            grip = layer.register_forward_hook(lambda _m, _i, o: dropped.append(o.detach()))
            with torch.no_grad():
                untouched = sface(x)
            out = sface(x.clone().requires_grad_(True))
            grip.remove()
        return untouched, out.detach(), dropped[-1] / seen[-1].where(seen[-1] != 0, 1e-30)

    untouched, first, ratio = augmented(0)
    assert torch.equal(untouched, clean)
    kept = ratio.abs() > 0.5
    assert 0.94 < kept.float().mean().item() < 0.96  # about 5% dropped
    assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / 0.95), rtol=1e-4)
    cosine = torch.nn.functional.cosine_similarity(first, clean).item()
    assert cosine < 0.999  # a different network ...
    assert cosine > 0.6  # ... near SFace (0.76 on this face)
    assert torch.equal(augmented(0)[1], first)
    assert not torch.equal(augmented(1)[1], first)
    raw.remove()
    after = sface(x.clone().requires_grad_(True)).detach()
    assert torch.allclose(after, clean, atol=1e-5)  # the hooks are gone
    with pytest.raises(UsageError):
        with feature_dropout({"sface": sface}, {"sface": 1.0}, masks=torch.Generator()):
            pass


def test_dropout_rates_put_each_model_at_the_same_distance(store, faces_dir):
    """Each model's rate is calibrated so that its augmented embeddings sit the asked
    fraction of its cap from its own: a tenfold different rate for SFace and
    MobileFaceNet-128, the same distance. Checked with fresh masks, by the models."""
    from cloak_core.attack import dropout_rates, embed, feature_dropout, mask_generator
    from cloak_core.detect import Face
    from cloak_core.models.base import ARCFACE_TEMPLATE_112
    from cloak_core.pipeline import Protector

    folders = sorted(faces_dir.iterdir())[:4]
    images = [np.array(Image.open(d / "001.png").convert("RGB")) for d in folders]
    face = Face.from_template(ARCFACE_TEMPLATE_112, box=(0, 0, 112, 112))
    names = ["dlib", "sface", "mobilefacenet128"]
    config = replace(get_preset("balanced"), dropout=0.3)
    with Protector(config, store=store, device="cpu", models=names) as p:
        models = {n: p._model(n) for n in names}
        specs = [m.spec for m in models.values()]
        regions = [p._plan(i, (112, 112), face, specs, config) for i in range(4)]
        batch = p._batch(regions, images, names, config)
        masks = mask_generator(torch.Generator().manual_seed(0), batch.pixels.device)
        rates = dropout_rates(models, batch, config, masks)
        assert 0.02 < rates["sface"] < 0.08, rates
        assert rates["mobilefacenet128"] < rates["sface"] / 1.5, rates
        for name, model in models.items():
            terms = []
            for _ in range(4):
                with feature_dropout(models, rates, masks), torch.enable_grad():
                    ghost = embed(model, batch.pixels, batch.matrices[name], False).detach()
                own = embed(model, batch.pixels, batch.matrices[name], False)
                terms.append(model_term(model, own, ghost, config).mean().item())
            assert 0.2 < np.mean(terms) < 0.4, (name, rates[name], terms)


@pytest.mark.parametrize("length", [1, 2, 10, 3 * 97 * 89, 3 * 359 * 359])
def test_percentile_is_quantiles_number(photos_dir, length):
    """The proportional step's 90th percentile (two selections, not a sort) is
    ``torch.quantile``'s number exactly and numpy's linear percentile to float precision,
    on a real photo's values (ties included) and on noise."""
    from cloak_core.attack import _percentile

    with Image.open(photos_dir / "rose_leslie1.jpg") as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1)[:length] / 255
    noise = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    rows = torch.from_numpy(np.stack([pixels, np.abs(noise)]))
    for q in (0.9, 0.5):
        got = _percentile(rows, q)
        assert torch.equal(got, torch.quantile(rows, q, dim=1))
        want = np.percentile(rows.numpy().astype(np.float64), 100 * q, axis=1)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=0)
