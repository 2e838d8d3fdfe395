"""The protection pipeline on real photos: every face protected, nothing else touched."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cloak_core.errors import CancelledError, ImageError, UnsupportedImageError, UsageError
from cloak_core.imageio import decode_image
from cloak_core.pipeline import Protector
from cloak_core.presets import get_preset


@pytest.fixture(scope="module")
def fast(store):
    with Protector(get_preset("fast"), store=store, device="cpu") as p:
        yield p


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_default_ensemble_is_every_default_model(fast):
    assert set(fast.model_names) >= {"dlib", "sface"}
    assert "facenet" not in fast.model_names  # about as costly as dlib + SFace together


def test_lpips_is_loaded_only_for_presets_that_measure_it(store, photos_dir):
    """`natural` has no LPIPS in its loop: it protects a photo without loading the
    network; `balanced` loads it when the Protector is made."""
    with Protector(get_preset("balanced"), store=store, models=("sface",)) as p:
        assert set(p._lpips) == {"alex"}
    natural = replace(get_preset("natural"), steps=1)
    with Protector(natural, store=store, models=("sface",)) as p:
        result = p.protect_bytes((photos_dir / "obama-240p.jpg").read_bytes())
        assert result.faces == 1
        assert p._lpips == {}


def test_pixels_outside_face_regions_are_unchanged(fast, photos_dir):
    data = (photos_dir / "two_people.jpg").read_bytes()
    image = decode_image(data).pixels
    faces = fast.detector.detect(image)
    assert len(faces) == 2
    config = get_preset("fast").with_overrides(steps=3)
    out = fast.protect_pixels([image], [faces], seed=1, config=config)[0]
    assert out.shape == image.shape and out.dtype == image.dtype
    changed = np.abs(out.astype(int) - image.astype(int)).max(-1) > 0
    regions = fast.plan_regions(image.shape[:2], faces, config)
    inside = np.zeros_like(changed)
    for r in regions:
        x0, y0, x1, y1 = r.box
        inside[y0:y1, x0:x1] = True
    assert changed.any()
    assert not (changed & ~inside).any()
    # Both faces were perturbed, not only the first.
    for r in regions:
        x0, y0, x1, y1 = r.box
        assert changed[y0:y1, x0:x1].mean() > 0.2


@pytest.mark.parametrize("name", ["fast", "balanced"])
def test_fast_and_balanced_change_luminance_alone(fast, photos_dir, name):
    """Both step in luminance alone (``colour_steps`` 0): the three channels of every
    changed pixel move together, so faces get no colour mottling (the old ``fast`` stepped
    R, G and B apart and tinted faces pink and green)."""
    image = decode_image((photos_dir / "obama-240p.jpg").read_bytes()).pixels
    faces = fast.detector.detect(image)
    config = get_preset(name).with_overrides(steps=3)
    out = fast.protect_pixels([image], [faces], seed=2, config=config)[0]
    delta = out.astype(int) - image.astype(int)
    moved = np.abs(delta).max(-1) > 0
    assert moved.sum() > 1000
    spread = delta.max(-1) - delta.min(-1)  # 0 or 1 level where only luminance moved
    assert (spread[moved] <= 1).mean() > 0.99


def test_same_seed_same_result_and_seeds_differ(fast, photos_dir):
    image = decode_image((photos_dir / "obama_small.jpg").read_bytes()).pixels
    faces = fast.detector.detect(image)
    config = get_preset("fast").with_overrides(steps=2)
    a = fast.protect_pixels([image], [faces], seed=3, config=config)[0]
    b = fast.protect_pixels([image], [faces], seed=3, config=config)[0]
    c = fast.protect_pixels([image], [faces], seed=4, config=config)[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_work_region_does_not_grow_with_photo_size(fast, photos_dir):
    with Image.open(photos_dir / "obama.jpg") as im:
        small = np.asarray(im.convert("RGB"))
        big = np.asarray(im.convert("RGB").resize((im.width * 4, im.height * 4)))
    config = get_preset("balanced")
    f_small = fast.detector.detect(small)[0]
    f_big = fast.detector.detect(big)[0]
    (r_small,) = fast.plan_regions(small.shape[:2], [f_small], config)
    (r_big,) = fast.plan_regions(big.shape[:2], [f_big], config)
    # The full-resolution region grows 4x per side, the working grid stays put.
    assert (r_big.box[2] - r_big.box[0]) > 3 * (r_small.box[2] - r_small.box[0])
    h_s, w_s = r_small.work_size
    h_b, w_b = r_big.work_size
    assert abs(h_b - h_s) <= 0.1 * h_s and abs(w_b - w_s) <= 0.1 * w_s


def test_progress_reaches_one_and_cancel_stops(fast, photos_dir):
    data = (photos_dir / "obama_small.jpg").read_bytes()
    seen: list[float] = []
    config = get_preset("fast").with_overrides(steps=3)
    fast.protect_bytes(data, progress=seen.append, config=config)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and len(seen) == 3
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        fast.protect_bytes(data, cancel=cancel, config=config)


def test_protect_many_batches_and_reports_bad_items(fast, photos_dir):
    good = (photos_dir / "obama_small.jpg").read_bytes()
    two = (photos_dir / "two_people.jpg").read_bytes()
    config = get_preset("fast").with_overrides(steps=2)
    results = fast.protect_many([good, b"not an image", two, good[:500]], config=config)
    assert results[0].faces == 1 and results[2].faces == 2
    assert isinstance(results[1], UnsupportedImageError)
    assert isinstance(results[3], ImageError)


def test_photo_without_face_is_reencoded_without_metadata(fast, photos_dir):
    with Image.open(photos_dir / "obama.jpg") as im:
        corner = im.convert("RGB").crop((0, 0, 160, 120))  # curtain and window only
    exif = Image.Exif()
    exif[0x010F] = "FaceCloak test camera"
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # GPS latitude
    data = _jpeg(corner, exif=exif.tobytes())
    result = fast.protect_bytes(data)
    assert result.faces == 0
    assert result.data != data
    with Image.open(io.BytesIO(result.data)) as out:
        assert out.size == corner.size
        assert len(out.getexif()) == 0


def test_rgba_png_keeps_alpha_and_size(fast, photos_dir):
    data = (photos_dir / "32bit.png").read_bytes()
    with Image.open(io.BytesIO(data)) as src:
        assert src.mode == "RGBA"
        alpha = np.asarray(src.getchannel("A"))
    result = fast.protect_bytes(data, config=get_preset("fast").with_overrides(steps=2))
    with Image.open(io.BytesIO(result.data)) as out:
        assert out.format == "PNG" and out.mode == "RGBA"
        assert np.array_equal(np.asarray(out.getchannel("A")), alpha)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["balanced", "strong"])
def test_preset_fools_every_model_on_every_photo(photos_dir, store, preset):
    """White-box, on every photo of data/photos: each model's own rule says "different person".

    Also the quality bound of the preset: LPIPS (AlexNet) on the whole photo.
    """
    # A fixed seed: the start noise is random otherwise, and the figures move a little.
    with Protector(replace(get_preset(preset), seed=0), store=store, device="cpu") as protector:
        _fools_every_model_on_every_photo(photos_dir, protector)


def _fools_every_model_on_every_photo(photos_dir, protector) -> None:
    failures = []
    photos = sorted(
        p for p in photos_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
    )
    assert len(photos) >= 20
    for path in photos:
        result = protector.protect_bytes(path.read_bytes(), measure=True)
        cells = []
        for model, reports in result.models.items():
            assert len(reports) == result.faces
            for r in reports:
                cells.append(f"{model} {r.similarity_before:.2f}->{r.similarity_after:.2f}")
                if r.similarity_before < 0.9:  # re-encoding alone must keep the identity
                    failures.append(f"{path.name}: {model} re-encoded {r.similarity_before:.3f}")
                if r.same_person_after:
                    failures.append(f"{path.name}: {model} still matches ({r.score_after:.3f})")
        if result.faces == 0:
            failures.append(f"{path.name}: no face found")
        if result.lpips > 0.05:
            failures.append(f"{path.name}: LPIPS {result.lpips:.4f} over 0.05")
        print(
            f"{path.name}: faces={result.faces} lpips={result.lpips:.4f} "
            f"lpips_faces={result.lpips_faces or 0:.4f} {result.seconds:.1f}s | " + ", ".join(cells)
        )
    assert not failures, "\n".join(failures)


def _aligned_crops(paths) -> tuple[list[np.ndarray], list[list]]:
    """RGB arrays of aligned 112x112 crops of data/faces, each with its one template face."""
    from cloak_core.detect import Face
    from cloak_core.models.base import ARCFACE_TEMPLATE_112

    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    faces = [[Face.from_template(ARCFACE_TEMPLATE_112, box=(0, 0, 112, 112))] for _ in images]
    return images, faces


@pytest.mark.slow
def test_strong_transfers_to_a_model_outside_its_ensemble(store, faces_dir):
    """Black-box on real aligned faces: made with dlib and MobileFaceNet, SFace is fooled.

    SFace never sees the attack; its own rule (cosine >= its threshold) must say "a
    different person" for most faces, at LPIPS (AlexNet, whole crop) under the budget.
    """
    from cloak_core.lpips import load_lpips
    from cloak_core.models import load_model

    identities = sorted(d for d in faces_dir.iterdir() if d.is_dir())[::6]
    images, faces = _aligned_crops(d / "002.png" for d in identities)
    config = replace(get_preset("strong"), seed=0, models=("dlib", "mobilefacenet"))
    with Protector(config, store=store, device="cpu", models=config.models) as p:
        out = p.protect_pixels(images, faces)
    sface = load_model("sface", store)
    lpips = load_lpips("alex", store=store)

    def tensor(arrays):
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255

    def embed(arrays):
        return sface(F.interpolate(tensor(arrays), size=sface.spec.input_size, mode="bilinear"))

    with torch.no_grad():
        cos = F.cosine_similarity(embed(images), embed(out)).tolist()
        distances = lpips(tensor(images), tensor(out)).flatten().tolist()
    rule = sface.spec.verification.threshold
    print(f"sface cosine {[round(c, 3) for c in cos]} (rule {rule}), LPIPS {distances}")
    assert sum(c < rule for c in cos) >= len(images) - 1
    assert max(distances) <= 0.05


@pytest.mark.slow
def test_balanced_stays_under_the_lpips_goal_on_soft_crops(store, faces_dir):
    """`balanced` keeps its most visible crops of data/faces under LPIPS 0.05, all fooled.

    These four came out at LPIPS 0.09-0.11 with the earlier LPIPS weight 0.2 (0.02-0.04
    at 2). Each must stay at LPIPS (AlexNet, whole crop) <= 0.05, the quality goal, and be
    "a different person" white-box for both default models, by their own rules.
    """
    from cloak_core.evaluation.evaluators import RegistryEvaluator
    from cloak_core.lpips import load_lpips
    from cloak_core.models import load_model

    names = ["Daniel_Radcliffe/017", "Keanu_Reeves/009", "Hugh_Laurie/018", "Barack_Obama/013"]
    images, faces = _aligned_crops(faces_dir / f"{n}.png" for n in names)
    config = replace(get_preset("balanced"), seed=0)
    with Protector(config, store=store, device="cpu") as p:
        out = p.protect_pixels(images, faces)
        ensemble = p.model_names
    lpips = load_lpips("alex", store=store)
    tensor = torch.from_numpy(np.stack(images + out)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        distances = lpips(tensor[: len(images)], tensor[len(images) :]).flatten().tolist()
    same = {}
    for name in ensemble:
        model = load_model(name, store)
        evaluator = RegistryEvaluator(model)  # aligned to the model's own template
        before = torch.from_numpy(evaluator.embed(images, [f[0] for f in faces]))
        after = torch.from_numpy(evaluator.embed(out, [f[0] for f in faces]))
        same[name] = model.spec.verification.same_person(before, after).tolist()
    print(f"LPIPS {[round(d, 4) for d in distances]}, same person {same}")
    assert max(distances) <= 0.05
    assert not any(any(v) for v in same.values())


def test_measure_reports_every_model_on_the_encoded_output(fast, photos_dir):
    config = get_preset("fast").with_overrides(steps=1)
    result = fast.protect_bytes(
        (photos_dir / "obama_small.jpg").read_bytes(), measure=True, config=config
    )
    assert set(result.models) == set(fast.model_names)
    assert 0.0 <= result.lpips < 0.2 and result.lpips_faces is not None
    assert torch.is_tensor(torch.tensor(result.seconds))


def test_light_measure_gives_the_models_verdicts_and_crops_only(fast, photos_dir):
    """``measure="models"``: the same verdicts as the full measurement (same seed, same
    output), crops of the face before and after, and none of the costly parts."""
    config = replace(get_preset("fast").with_overrides(steps=2), seed=0)
    data = (photos_dir / "obama_small.jpg").read_bytes()
    light = fast.protect_bytes(data, measure="models", config=config)
    full = fast.protect_bytes(data, measure=True, config=config)
    assert light.data == full.data and light.faces == 1
    assert light.lpips is None and light.models == {} and light.visibility == ()
    assert full.previews == ()
    [face] = light.previews
    assert face.same_person == {n: full.models[n][0].same_person_after for n in fast.model_names}
    for name in fast.model_names:
        assert face.similarity[name] == pytest.approx(
            full.models[name][0].similarity_after, abs=1e-3
        )
    before, after = (Image.open(io.BytesIO(b)) for b in (face.before, face.after))
    assert before.format == after.format == "JPEG"
    assert before.size == after.size and max(before.size) <= 96
    # The protection shows in the crop (the face is in it).
    assert np.abs(np.asarray(before, float) - np.asarray(after, float)).mean() > 0.5
    with pytest.raises(UsageError, match="measure"):
        fast.protect_bytes(data, measure="panel", config=config)


def _mode_variant(photos_dir, mode: str) -> tuple[bytes, str]:
    """obama_small.jpg converted to ``mode`` and saved in a format that keeps it."""
    with Image.open(photos_dir / "obama_small.jpg") as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    if mode == "CMYK":
        rgb.convert("CMYK").save(buf, "JPEG", quality=90)
        return buf.getvalue(), "JPEG"
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(buf, "PNG")  # Pillow makes this mode I;16
        return buf.getvalue(), "PNG"
    if mode == "WEBP":
        rgb.save(buf, "WEBP", quality=90)
        return buf.getvalue(), "WEBP"
    rgb.convert(mode).save(buf, "PNG")
    return buf.getvalue(), "PNG"


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "LA", "I;16", "RGBA", "WEBP"])
def test_every_image_mode_is_protected(fast, photos_dir, mode):
    data, fmt = _mode_variant(photos_dir, mode)
    result = fast.protect_bytes(data, config=get_preset("fast").with_overrides(steps=1))
    assert result.faces == 1
    with Image.open(io.BytesIO(data)) as src, Image.open(io.BytesIO(result.data)) as out:
        assert out.size == src.size
        assert out.format == fmt
        assert ("A" in out.getbands()) == ("A" in src.getbands() or "transparency" in src.info)
    assert result.data != data


def test_hold_out_leaves_each_model_out_in_turn_and_reports_it(store, photos_dir, monkeypatch):
    """With three models, each face's attack runs without one of them, in turn, and that
    unseen model's measurement of the face is reported as its held-out check."""
    import cloak_core.pipeline as pipeline

    ensembles: list[tuple[tuple[str, ...], int]] = []
    real = pipeline.lowkey

    def spy(batch, models, *args, **kwargs):
        ensembles.append((tuple(sorted(models)), batch.pixels.shape[0]))
        return real(batch, models, *args, **kwargs)

    monkeypatch.setattr(pipeline, "lowkey", spy)
    names = ("dlib", "sface", "mobilefacenet")
    config = replace(get_preset("fast"), steps=2, models=names, hold_out=True, seed=0)
    with Protector(config, store=store, device="cpu", models=names) as p:
        result = p.protect_bytes((photos_dir / "obama_and_biden.jpg").read_bytes(), measure=True)
        assert result.faces == 3
        assert result.held_out == names  # face k leaves out model k
        # Each face was attacked by the other two models only.
        assert sorted(ensembles) == sorted((tuple(sorted(set(names) - {n})), 1) for n in names)
        for k, name in enumerate(result.held_out):
            assert len(result.models[name]) == 3 and result.models[name][k].similarity_before > 0.9
        # Two models are too few to leave one out.
        two = replace(config, models=("dlib", "sface"))
        assert p.plan_hold_out([[None, None]], two) == [[None, None]]
        # The turn goes on from call to call (three faces above).
        assert p.plan_hold_out([[None], [None, None]], config) == [
            ["dlib"],
            ["sface", "mobilefacenet"],
        ]
        assert p.plan_hold_out([[None]], config) == [["dlib"]]
