"""Whole photos in ``facecloak eval --photos``: faces found (and missed), protected as
uploads are, and scored against their own originals, on the shared photos."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from cloak_core.cli import main
from cloak_core.detect import FaceDetector
from cloak_core.evaluation import photos
from cloak_core.evaluation.cache import CACHE_DIR, AttackCache, attack_code, read_batch
from cloak_core.evaluation.conditions import parse_condition
from cloak_core.evaluation.evaluators import OpenCVPipelineEvaluator, RegistryEvaluator
from cloak_core.imageio import decode_image
from cloak_core.models import load_model
from cloak_core.pipeline import Protector
from cloak_core.presets import get_preset
from cloak_core.visibility import VisibilityMeter, face_region


@pytest.fixture(scope="module")
def yunet(store):
    return OpenCVPipelineEvaluator(store)


def test_yunet_faces_are_opencvs_detections_in_our_keypoint_order(store, photos_dir, yunet):
    pixels = decode_image((photos_dir / "kit_with_rose.jpg").read_bytes()).pixels
    # OpenCV's own detector, called directly, as the reference.
    raw = cv2.FaceDetectorYN.create(
        str(store.resolve("yunet_int8bq.onnx")), "", (pixels.shape[1], pixels.shape[0]), 0.6
    )
    _, rows = raw.detect(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    faces = yunet.faces(pixels)
    assert len(faces) == len(rows) == 2
    for face, row in zip(faces, rows, strict=True):
        x, y, w, h = row[:4]
        assert face.box == pytest.approx((x, y, x + w, y + h), abs=1e-3)
        assert face.score == pytest.approx(row[14], abs=1e-6) and face.detector == "yunet"
        assert face.keypoints[0, 0] < face.keypoints[1, 0]  # image-left eye first
        assert face.keypoints[3] == pytest.approx(row[10:14].reshape(2, 2).mean(0), abs=1e-3)
    # The same four points as the pipeline's own detector puts on these faces, within a
    # tenth of the face's size: the scored faces align as the protected ones do.
    with FaceDetector(store) as detector:
        ours = detector.detect(pixels)
    for face in faces:
        mine = min(ours, key=lambda f: np.abs(f.landmarks - face.landmarks).sum())
        assert np.abs(mine.landmarks - face.landmarks).max() < 0.1 * face.size


def test_load_photos_counts_the_faces_the_detector_missed(store, photos_dir, yunet, tmp_path):
    for name in ("obama_and_biden.jpg", "two_people.jpg"):
        shutil.copy(photos_dir / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with FaceDetector(store) as detector:
        loaded, notes = photos.load_photos(tmp_path, detector, yunet)
    assert [p.path.name for p in loaded] == ["obama_and_biden.jpg", "two_people.jpg"]
    assert len(notes) == 1 and "broken.jpg" in notes[0]
    # Every face is found: YuNet's low-scored "face" on a hand does not count as missed.
    assert [len(p.faces) for p in loaded] == [3, 2]
    assert [p.missed for p in loaded] == [[], []]
    # Faces YuNet finds where the detector found none are missed, and scored.
    found = yunet.faces(loaded[1].pixels)
    assert photos.missed_faces([], found) == found
    assert photos.missed_faces(loaded[1].faces, found) == []
    assert photos.missed_faces(loaded[1].faces[:1], found) != []
    with pytest.raises(Exception, match="not a folder"):
        photos.list_photos(tmp_path / "notes.txt")


def test_a_missed_face_scores_as_the_match_it_is(store, photos_dir, yunet) -> None:
    """A face the detector missed goes up as it was: matched. A face changed beyond
    recognition is not; and each face is judged on its own."""
    path = photos_dir / "two_people.jpg"
    source = decode_image(path.read_bytes())
    faces = yunet.faces(source.pixels)
    photo = photos.Photo(path, source, [], faces)  # nothing protected: both missed
    as_written = photos.written(photo, source.pixels)
    assert not np.array_equal(as_written, source.pixels)  # a JPEG, re-encoded
    erased = as_written.copy()
    x0, y0, x1, y1 = (int(v) for v in faces[0].box)
    erased[y0:y1, x0:x1] = cv2.GaussianBlur(erased[y0:y1, x0:x1], (0, 0), 12)
    mobilefacenet = RegistryEvaluator(load_model("mobilefacenet", store, "cpu"))
    evaluators = [mobilefacenet, yunet]
    conditions = [parse_condition("png"), parse_condition("scale50-jpeg85")]
    kept = photos.score([photo], {e.name: [as_written] for e in evaluators}, evaluators, conditions)
    for cond in ("png", "scale50-jpeg85"):
        for name in ("mobilefacenet", "opencv-sface"):
            r = kept["results"][cond][name]
            assert r["faces"] == 2 and r["matched"] == 1.0 and r["cosine"] > 0.9
    assert [f["protected"] for f in kept["per_face"]] == [False, False]
    blurred = photos.score([photo], {e.name: [erased] for e in evaluators}, evaluators, conditions)
    for name in ("mobilefacenet", "opencv-sface"):
        first, second = (f["cosine"]["png"][name] for f in blurred["per_face"])
        assert first < 0.6 < 0.9 < second
        assert [f["matched"]["png"][name] for f in blurred["per_face"]] == [False, True]
        assert blurred["results"]["png"][name]["matched"] == 0.5


def test_photo_faces_are_seen_one_by_one_on_their_regions(store, photos_dir) -> None:
    """The panel on a whole photo's faces: each protected face on its own region, checked
    against scikit-image on crops cut by hand; the JPEG rows; the grid's order."""
    metrics = pytest.importorskip("skimage.metrics")
    color = pytest.importorskip("skimage.color")
    path = photos_dir / "two_people.jpg"
    source = decode_image(path.read_bytes())
    with FaceDetector(store) as detector:
        faces = list(detector.detect(source.pixels))
    photo = photos.Photo(path, source, faces, [])
    assert len(faces) == 2
    # Only the first face's box is changed: six grey levels brighter.
    changed = photo.pixels.copy()
    x0, y0, x1, y1 = (int(v) for v in faces[0].box)
    changed[y0:y1, x0:x1] = np.clip(changed[y0:y1, x0:x1].astype(int) + 6, 0, 255)
    meter = VisibilityMeter(store)
    panels = photos.seen(meter, [photo], [changed])
    assert len(panels) == 2
    for face, panel in zip(faces, panels, strict=True):
        a0, b0, a1, b1 = face_region(photo.pixels.shape[:2], face.box)
        assert max(a1 - a0, b1 - b0) < 512  # shown at its own size
        ref, new = photo.pixels[b0:b1, a0:a1], changed[b0:b1, a0:a1]
        assert panel.size == ref.shape[:2]
        if np.array_equal(ref, new):
            assert panel.psnr == np.inf and panel.de2000_mean == 0
            continue
        assert panel.psnr == pytest.approx(metrics.peak_signal_noise_ratio(ref, new), abs=1e-6)
        de = color.deltaE_ciede2000(color.rgb2lab(ref), color.rgb2lab(new))
        assert panel.de2000_mean == pytest.approx(de.mean(), abs=0.02)
    assert panels[0].scielab_mean > 0.5 > panels[1].scielab_mean
    # A face the detector missed is the original: it is not measured.
    missed = photos.Photo(path, source, faces[:1], faces[1:])
    assert len(photos.seen(meter, [missed], [changed])) == 1
    # The same faces only re-encoded: q75 shows more than q90, both something.
    jpeg = photos.calibration(meter, [photo])
    assert [len(v) for v in jpeg.values()] == [2, 2]
    for k in range(2):
        assert 0 < jpeg["jpeg90"][k].de2000_mean < jpeg["jpeg75"][k].de2000_mean
    # The grid: the most visible face first, its changed version cut from the written photo.
    rows = photos.grid_rows([photo], {"sface": [changed]}, panels, 1)
    assert len(rows) == 1 and rows[0].label.startswith(f"two_people.jpg, a {round(faces[0].size)}")
    a0, b0, a1, b1 = face_region(photo.pixels.shape[:2], faces[0].box)
    assert np.array_equal(rows[0].changed["sface"], changed[b0:b1, a0:a1])
    assert np.array_equal(rows[0].original, photo.pixels[b0:b1, a0:a1])
    assert len(photos.grid_rows([photo], {"sface": [changed]}, panels, 8)) == 2


@pytest.mark.slow
def test_eval_protects_whole_photos_as_uploads(
    faces_dir, photos_dir, store, tmp_path, capsys
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("obama-240p.jpg", "kit_with_rose.jpg"):
        shutil.copy(photos_dir / name, folder / name)
    out = tmp_path / "eval"
    args = ["eval", "--dataset", str(faces_dir), "--identities", "1"]
    args += ["--gallery-per-identity", "1", "--probes-per-identity", "1", "--preset", "fast"]
    args += ["--steps", "3", "--device", "cpu", "--attack-models", "sface", "--seed", "0"]
    args += ["--eval-models", "mobilefacenet,opencv-sface", "--conditions", "png,scale50-jpeg85"]
    args += ["--photos", str(folder), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    ph = report["photos"]
    assert report["settings"]["photos"] == str(folder)
    assert (ph["photos"], ph["faces"], ph["protected_faces"], ph["missed"]) == (2, 3, 3, [])
    assert ph["face_sizes"][0] < 70 < 80 < ph["face_sizes"][1]  # obama-240p's face is small
    assert ph["seconds_per_face"]["sface"] > 0
    assert [f["size"] for f in ph["per_face"]] == [106, 86, 60]
    for cond in ("png", "scale50-jpeg85"):
        for name in ("mobilefacenet", "opencv-sface"):
            r = ph["results"][cond][name]
            assert r["faces"] == 3 and 0 <= r["matched"] <= 1
            cosines = [f["cosine"][cond][name] for f in ph["per_face"]]
            assert r["cosine"] == pytest.approx(np.mean(cosines))
            # Every face was changed by the attack, none beyond recognition by 3 steps.
            assert all(0.2 < c < 0.995 for c in cosines), (cond, name, cosines)
    # SFace was attacked (white-box): its pipeline sees the faces move further than the
    # black-box MobileFaceNet does.
    png = ph["results"]["png"]
    assert png["opencv-sface"]["cosine"] < png["mobilefacenet"]["cosine"]
    # Each photo was attacked as `protect` takes one, alone, from the seed.
    config = replace(get_preset("fast").with_overrides(steps=3), models=("sface",))
    cache = AttackCache(out / CACHE_DIR, attack_code(), "cpu")
    source = decode_image((folder / "kit_with_rose.jpg").read_bytes())
    with FaceDetector(store) as detector:
        faces = detector.detect(source.pixels)
    kept = read_batch(cache.path(config, 0, [source.pixels], [faces]))
    with Protector(config, store=store, device="cpu", models=("sface",)) as protector:
        alone = protector.protect_pixels([source.pixels], [faces], seed=0)[0]
    assert kept is not None and np.array_equal(kept[0][0], alone)
    # Every protected face is seen at display scale, beside the JPEG rows, and the most
    # visible are in the photos' grid (all three here).
    seen = ph["visibility"]["sface"]
    assert 0 < seen["scielab_mean"]["mean"] <= seen["scielab_mean"]["worst"]
    assert seen["psnr"]["worst"] <= seen["psnr"]["mean"] < 60
    assert set(ph["visibility_calibration"]) == {"jpeg90", "jpeg75"}
    per_face = [f["visibility"]["sface"]["scielab_mean"] for f in ph["per_face"]]
    assert np.mean(per_face) == pytest.approx(seen["scielab_mean"]["mean"])
    with Image.open(out / "photos-grid.png") as grid:
        # Three rows of faces shown at their regions' own sizes, 1.3 times each face.
        assert grid.height > 1.3 * (106 + 86 + 60) and grid.width > 3 * 1.3 * 106
    assert "Visibility of the protected faces of the written photos" in printed
    assert "| protected by sface | 3 |" in printed
    assert f"## Whole photos (`{folder}`)" in printed
    assert "| opencv-sface (independent) | sface (white-box) |" in printed
    assert "| `obama-240p.jpg` | 60 | yes |" in printed
    assert f"| {per_face[2]:.2f} |" in printed.split("| `obama-240p.jpg` | 60 | yes |")[1]
