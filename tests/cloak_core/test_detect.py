"""Face detection on the real photos of shared/data/photos (counts checked by eye)."""

from __future__ import annotations

import ctypes
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.detect import DetectorConfig, Face, FaceDetector
from cloak_core.errors import CancelledError, ModelStoreError, SystemLibraryError, UsageError
from cloak_core.imageio import decode_image
from cloak_core.models.base import ARCFACE_TEMPLATE_112

# Photos with one face, and photos with several: (file, faces, identities left to right).
ONE_FACE = [
    "32bit.png",
    "alex-lacamoire.png",
    "alex_lacamoire1.jpg",
    "alex_lacamoire2.jpg",
    "biden.jpg",
    "biden2.jpg",
    "john1.jpeg",
    "john2.jpeg",
    "johnsnow_test1.jpg",
    "lin-manuel-miranda.png",
    "obama-1080p.jpg",
    "obama-240p.jpg",
    "obama-480p.jpg",
    "obama-720p.jpg",
    "obama.jpg",
    "obama1.jpg",
    "obama2.jpg",
    "obama3.jpg",
    "obama_small.jpg",
    "rose_leslie1.jpg",
    "rose_leslie2.jpg",
]
# obama_and_biden.jpg: Biden and Obama waving (faces about 200 px in a 2000 px photo,
# which the short-range model alone misses) and a girl in the lower right.
SEVERAL = {
    "two_people.jpg": 2,
    "kit_with_rose.jpg": 2,
    "obama_and_biden.jpg": 3,
}


@pytest.fixture(scope="module")
def detector(store):
    with FaceDetector(store) as det:
        yield det


def load(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes()).pixels


def check_upright(face: Face) -> None:
    """Keypoint order and geometry of an upright face."""
    eye_l, eye_r, nose, mouth, ear_l, ear_r = face.keypoints
    size = face.size
    assert eye_l[0] < nose[0] < eye_r[0], face.keypoints
    assert ear_l[0] < eye_r[0] and eye_l[0] < ear_r[0], face.keypoints  # turned heads too
    assert max(eye_l[1], eye_r[1]) < nose[1] < mouth[1], face.keypoints
    assert abs(eye_l[1] - eye_r[1]) < 0.15 * size
    x0, y0, x1, y1 = face.box
    assert x0 < nose[0] < x1 and y0 < nose[1] < y1


@pytest.mark.parametrize("name", ONE_FACE)
def test_one_face(detector, photos_dir, name):
    faces = detector.detect(load(photos_dir / name))
    assert len(faces) == 1, [(f.score, f.box) for f in faces]
    check_upright(faces[0])
    assert faces[0].score >= 0.5
    assert faces[0].keypoints.shape == (6, 2) and faces[0].landmarks.shape == (4, 2)


@pytest.mark.parametrize(("name", "count"), sorted(SEVERAL.items()))
def test_several_faces(detector, photos_dir, name, count):
    faces = detector.detect(load(photos_dir / name))
    assert len(faces) == count, [(f.score, f.box) for f in faces]
    for face in faces:
        check_upright(face)
    boxes = np.array([f.box for f in faces])
    for i in range(len(faces)):  # distinct faces do not overlap
        for j in range(i + 1, len(faces)):
            assert (
                boxes[i, 2] < boxes[j, 0]
                or boxes[j, 2] < boxes[i, 0]
                or (boxes[i, 3] < boxes[j, 1] or boxes[j, 3] < boxes[i, 1])
            )


@pytest.mark.parametrize("name", ["obama_partial_face.jpg", "obama_partial_face2.jpg"])
def test_partial_faces(detector, photos_dir, name):
    """Faces cut by the photo's edge are found, with a box that may leave the photo."""
    rgb = load(photos_dir / name)
    faces = detector.detect(rgb)
    assert len(faces) == 1
    check_upright(faces[0])
    if name == "obama_partial_face.jpg":  # the face is cut by the left edge
        assert faces[0].box[0] < 0 < faces[0].box[2]


def test_no_face(detector, photos_dir):
    rgb = load(photos_dir / "obama.jpg")
    h, w = rgb.shape[:2]
    flag_and_curtain = np.ascontiguousarray(rgb[: h // 3, : w // 4])  # no face up there
    yy, xx = np.mgrid[0:480, 0:640]
    gradient = np.stack([xx * 255 // 639, yy * 255 // 479, (xx + yy) * 255 // 1118], -1)
    gradient = gradient.astype(np.uint8)
    gradient[:160, :200] = rgb[:160, :200]  # plus the photo's top-left corner
    for image in (flag_and_curtain, gradient, np.zeros((300, 400, 3), np.uint8)):
        assert detector.detect(image) == []


def test_exif_orientation_applied_first(detector, photos_dir):
    """A photo stored rotated with EXIF orientation 6 is decoded and detected upright."""
    upright = Image.open(photos_dir / "obama.jpg").convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=92, exif=exif)
    decoded = decode_image(buf.getvalue())
    assert decoded.pixels.shape[:2] == (upright.height, upright.width)
    faces = detector.detect(decoded.pixels)
    assert len(faces) == 1
    check_upright(faces[0])
    # The stored pixels show the face lying on its side: no upright face there.
    sideways = detector.detect(np.asarray(stored))
    for face in sideways:
        eye_l, eye_r, _, mouth = face.landmarks
        assert not max(eye_l[1], eye_r[1]) < mouth[1] - 0.2 * face.size


def test_same_frame_at_four_resolutions(detector, photos_dir):
    """obama-{240,480,720,1080}p are one frame: landmarks agree once scaled (pixel-centre
    convention included) to within 2.5% of the face size."""
    ref = None
    for height in (240, 480, 720, 1080):
        rgb = load(photos_dir / f"obama-{height}p.jpg")
        (face,) = detector.detect(rgb)
        scale = 1080 / rgb.shape[0]
        landmarks = (face.landmarks + 0.5) * scale - 0.5
        if ref is None:
            ref = (landmarks, face.size * scale)
        else:
            err = np.abs(landmarks - ref[0]).max()
            assert err < 0.025 * ref[1], (height, err, ref[1])


def test_landmarks_on_aligned_faces(detector, faces_dir):
    """On faces aligned to the ArcFace template, MediaPipe's landmarks land on it.

    The template is an independent reference: median errors of the eyes and the mouth are
    about 1 px on a 112 px crop; MediaPipe's nose tip sits 2-4 px off the template's (its
    nose is a different point, and it moves with the head's pose)."""
    template = Face.from_template(ARCFACE_TEMPLATE_112).landmarks
    errors, missed = [], 0
    for person in sorted(faces_dir.iterdir())[:12]:
        for path in sorted(person.glob("*.png"))[:2]:
            rgb = np.asarray(Image.open(path).convert("RGB"))
            padded = np.pad(rgb, ((56, 56), (56, 56), (0, 0)))
            faces = detector.detect(padded)
            if not faces:
                missed += 1
                continue
            errors.append(faces[0].landmarks - 56 - template)
    errors = np.abs(np.stack(errors))
    assert missed <= 1
    median = np.median(errors, axis=0)
    assert median[[0, 1, 3]].max() < 2.0 and median[2].max() < 6.0, median


def test_large_photos(detector, photos_dir):
    """A 30-megapixel photo with one big face, and small faces in a 24-megapixel canvas."""
    photo = Image.open(photos_dir / "obama.jpg").convert("RGB")
    (small_face,) = detector.detect(np.asarray(photo))
    scale = 5000 / photo.width
    big = photo.resize((5000, round(photo.height * scale)), Image.Resampling.BILINEAR)
    start = time.perf_counter()
    faces = detector.detect(np.asarray(big))
    print(f"\n{big.width}x{big.height}: {time.perf_counter() - start:.2f} s")
    assert len(faces) == 1
    expected = (small_face.landmarks + 0.5) * scale - 0.5
    assert np.abs(faces[0].landmarks - expected).max() < 0.03 * faces[0].size

    group = Image.open(photos_dir / "obama_and_biden.jpg").convert("RGB")
    ref = detector.detect(np.asarray(group))
    canvas = Image.new("RGB", (6000, 4000), (96, 104, 112))
    shrink = 0.4  # faces of about 80 px, 1.3% of the canvas
    small = group.resize((round(group.width * shrink), round(group.height * shrink)))
    canvas.paste(small, (3700, 2500))
    start = time.perf_counter()
    found = detector.detect(np.asarray(canvas))
    print(f"6000x4000 with small faces: {time.perf_counter() - start:.2f} s")
    assert len(found) == len(ref) == 3
    for face in ref:
        centre = np.array(face.box).reshape(2, 2).mean(0) * shrink + (3700, 2500)
        dist = min(np.linalg.norm(np.array(f.box).reshape(2, 2).mean(0) - centre) for f in found)
        assert dist < 0.2 * face.size * shrink


def test_min_score_and_min_face(store, photos_dir):
    rgb = load(photos_dir / "two_people.jpg")
    # min_score is BlazeFace's: past it only the recall pass (RetinaFace) finds the faces,
    # and a face_threshold no score reaches leaves none.
    with FaceDetector(store, min_score=0.99) as strict:
        assert [f.detector for f in strict.detect(rgb)] == ["retinaface", "retinaface"]
    with FaceDetector(store, config=DetectorConfig(min_score=0.99, face_threshold=1.0)) as none:
        assert none.detect(rgb) == []
    tiny = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // 8, rgb.shape[0] // 8)))
    with FaceDetector(store, config=DetectorConfig(min_face=25)) as det:
        assert det.detect(tiny) == []  # faces of about 20 px are dropped
    with FaceDetector(store, config=DetectorConfig(min_face=10)) as det:
        assert len(det.detect(tiny)) == 2


def test_threads_share_a_detector(detector, photos_dir):
    images = [load(photos_dir / n) for n in ("two_people.jpg", "obama.jpg", "kit_with_rose.jpg")]
    expected = [[f.box for f in detector.detect(im)] for im in images]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = [f.box for f in detector.detect(images[i % 3])]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert results[i] == expected[i % 3]


def test_tiles_in_threads_find_the_same_faces(store, detector, photos_dir):
    """Sharing the tiles among threads (the default on two or more cores) finds exactly
    what one thread finds, on a 24 MP canvas whose three small faces only the tiles
    see; a cancelled detection stops every thread; the thread count is checked."""
    assert detector.config.tile_threads == min(2, os.cpu_count() or 1)
    group = Image.open(photos_dir / "obama_and_biden.jpg").convert("RGB")
    canvas = Image.new("RGB", (6000, 4000), (96, 104, 112))
    canvas.paste(group.resize((round(group.width * 0.4), round(group.height * 0.4))), (3700, 2500))
    rgb = np.asarray(canvas)
    with FaceDetector(store, config=DetectorConfig(tile_threads=1)) as one:
        alone = one.detect(rgb)
    with FaceDetector(store, config=DetectorConfig(tile_threads=3)) as three:
        used = set()
        look = three._detect

        def spy(key, *args, **kwargs):
            used.add((key, threading.current_thread() is threading.main_thread()))
            return look(key, *args, **kwargs)

        three._detect = spy
        shared = three.detect(rgb)
        # Every tiling detector looked at tiles, the two extra ones in helper threads.
        assert {("full", True), ("full1", False), ("full2", False)} <= used
        del three._detect
        running = threading.active_count()
        stop = threading.Event()
        timer = threading.Timer(0.2, stop.set)  # while the tiles are being looked at
        timer.start()
        with pytest.raises(CancelledError):
            three.detect(rgb, cancel=stop)
        timer.join()
        assert threading.active_count() == running
    assert len(alone) == 3
    for a, b in zip(alone, shared, strict=True):
        assert a.box == b.box and a.score == b.score and a.detector == b.detector
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
    with pytest.raises(UsageError, match="tile_threads"):
        DetectorConfig(tile_threads=0)


def test_bad_input_and_closed(store):
    with FaceDetector(store) as det:
        with pytest.raises(UsageError):
            det.detect(np.zeros((10, 10), np.uint8))
        with pytest.raises(UsageError):
            det.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(UsageError, match="closed"):
        det.detect(np.zeros((10, 10, 3), np.uint8))


def test_face_from_template():
    face = Face.from_template(ARCFACE_TEMPLATE_112)
    t = np.array(ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(face.landmarks[:3], t[:3])
    np.testing.assert_allclose(face.landmarks[3], t[3:].mean(0))
    x0, y0, x1, y1 = face.box
    assert x0 < t[:, 0].min() and t[:, 0].max() < x1 and y0 < t[:, 1].min()
    assert 0 <= x0 and x1 <= 112 and 70 < x1 - x0 < 112
    assert Face.from_template(t, box=(0, 0, 112, 112)).box == (0.0, 0.0, 112.0, 112.0)
    with pytest.raises(ValueError):
        face.keypoints[0, 0] = 1.0  # read-only
    with pytest.raises(UsageError):
        Face.from_template(t[:4])


def test_same_person_embeds_closer(detector, store, photos_dir):
    """Aligned with the detector's landmarks, SFace embeds photos of one person closer than
    photos of different people, and names the people in the group photos."""
    from cloak_core.align import estimate_similarity, template_keypoints, translate, warp_affine
    from cloak_core.models import load_model

    torch.set_num_threads(2)
    model = load_model("sface", store)
    spec = model.spec
    template = template_keypoints(spec.template)

    def aligned(rgb: np.ndarray, face: Face) -> torch.Tensor:
        """``(1, 3, 112, 112)`` crop aligned to SFace's template, warping only a padded
        region around the face (as the pipeline does)."""
        matrix = estimate_similarity(torch.as_tensor(face.landmarks)[None], template)
        x0, y0, x1, y1 = face.box
        pad = 0.5 * face.size
        left, top = max(int(x0 - pad), 0), max(int(y0 - pad), 0)
        region = rgb[top : int(y1 + pad) + 1, left : int(x1 + pad) + 1]
        image = torch.from_numpy(region.copy()).permute(2, 0, 1)[None].float() / 255
        matrix = translate(matrix, torch.tensor([[left, top]], dtype=torch.float64))
        return warp_affine(image, matrix, spec.input_size)

    gallery = {
        "obama": ["obama.jpg", "obama1.jpg", "obama2.jpg", "obama3.jpg"],
        "biden": ["biden.jpg", "biden2.jpg"],
        "lacamoire": ["alex_lacamoire1.jpg", "alex_lacamoire2.jpg", "alex-lacamoire.png"],
        "leslie": ["rose_leslie1.jpg", "rose_leslie2.jpg"],
        "harington": ["john1.jpeg", "john2.jpeg", "johnsnow_test1.jpg"],
    }
    groups = {
        "two_people.jpg": ["obama", "biden"],
        "obama_and_biden.jpg": ["biden", "obama"],  # and a girl, not in the gallery
        "kit_with_rose.jpg": ["leslie", "harington"],
    }
    names, crops = [], []
    for person, files in gallery.items():
        for name in files:
            rgb = load(photos_dir / name)
            (face,) = detector.detect(rgb)
            names.append(person)
            crops.append(aligned(rgb, face))
    probes = []
    for name, people in groups.items():
        rgb = load(photos_dir / name)
        faces = sorted(detector.detect(rgb), key=lambda f: -f.size)[: len(people)]
        faces.sort(key=lambda f: f.box[0])  # left to right
        for face, person in zip(faces, people, strict=True):
            probes.append((name, person))
            crops.append(aligned(rgb, face))
    with torch.no_grad():
        everything = torch.nn.functional.normalize(model(torch.cat(crops)), dim=1)
    emb, probe_emb = everything[: len(names)], everything[len(names) :]
    sim = (emb @ emb.T).numpy()
    label = np.array(names)
    same = (label[:, None] == label[None]) & ~np.eye(len(label), dtype=bool)
    diff = label[:, None] != label[None]
    print(f"\nsame person {sim[same].min():.3f}..{sim[same].max():.3f}, ", end="")
    print(f"different {sim[diff].min():.3f}..{sim[diff].max():.3f}")
    assert sim[same].min() > sim[diff].max()
    for (name, person), probe in zip(probes, probe_emb, strict=True):
        scores = (emb @ probe).numpy()
        assert label[scores.argmax()] == person, (name, person, scores)


def test_corrupt_model_file_is_a_model_store_error(tmp_path):
    class CorruptStore:
        def resolve(self, name: str) -> Path:
            path = tmp_path / name
            path.write_bytes(b"not a tflite model" * 100)
            return path

    with pytest.raises(ModelStoreError, match="facecloak models"):
        FaceDetector(CorruptStore())


def test_a_missing_system_library_is_named_with_its_package(store, monkeypatch):
    """MediaPipe's native library links EGL and GLES; where the system lacks them (a
    headless GPU server did) the detector says which packages to install, and the daemon
    answers 503, instead of a bare OSError from ctypes."""
    from mediapipe.tasks.python import vision

    from backend.errors import describe

    try:  # the very error ctypes gives for a library it cannot find
        ctypes.CDLL("libfacecloak-absent.so.1")
    except OSError as exc:
        missing = exc
    assert missing.errno is None

    def fail(options):
        raise missing

    monkeypatch.setattr(vision.FaceDetector, "create_from_options", staticmethod(fail))
    with pytest.raises(SystemLibraryError, match="apt-get install libegl1 libgles2") as info:
        FaceDetector(store)
    assert "libfacecloak-absent.so.1" in str(info.value)
    assert describe(info.value)[:2] == (503, "unavailable")

    def gone(options):  # a file error is not a missing library
        raise FileNotFoundError(2, "No such file or directory", "face.tflite")

    monkeypatch.setattr(vision.FaceDetector, "create_from_options", staticmethod(gone))
    with pytest.raises(FileNotFoundError):
        FaceDetector(store)
