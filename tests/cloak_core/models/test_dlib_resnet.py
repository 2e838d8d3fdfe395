"""The torch port of dlib's face descriptor, checked against dlib itself (``dlib-bin``).

dlib cuts the 150x150 chips (frontal detector, 5-point shape, ``get_face_chip``) from
real photos; the port must give dlib's descriptors on the same chips, and aligning the
same faces from MediaPipe's keypoints to the port's template must land close to dlib's
own pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cloak_core.align import estimate_similarity, template_keypoints, warp_affine
from cloak_core.errors import ModelStoreError, UsageError
from cloak_core.models.dlib_resnet import SPECS, DlibResNet, build, read_dlib_net

dlib = pytest.importorskip("dlib", reason="dlib-bin is the reference implementation")

# One face each of distinct people (two_people.jpg has two), moderate sizes, RGBA included.
PHOTOS = (
    "obama.jpg",
    "lin-manuel-miranda.png",
    "rose_leslie2.jpg",
    "john2.jpeg",
    "two_people.jpg",
    "biden2.jpg",
)


@dataclass(frozen=True)
class Face:
    photo: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    chip: np.ndarray  # (150, 150, 3) uint8 RGB, cut by dlib
    box: tuple[int, int, int, int]  # dlib's detection: left, top, right, bottom
    descriptor: np.ndarray  # (128,) dlib's own pipeline: compute_face_descriptor(image, shape)


def _chips_to_tensor(chips: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, 150, 150) float32 RGB in 0..1 from uint8 (150, 150, 3) chips."""
    return torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def weights(store) -> Path:
    return store.resolve("dlib_resnet_v1.dat")


@pytest.fixture(scope="module")
def model(weights: Path) -> DlibResNet:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build(weights).freeze()


@pytest.fixture(scope="module")
def recognizer(weights: Path):
    return dlib.face_recognition_model_v1(str(weights))


@pytest.fixture(scope="module")
def faces(store, photos_dir: Path, recognizer) -> list[Face]:
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(store.resolve("shape_predictor_5_face_landmarks.dat")))
    out = []
    for name in PHOTOS:
        with Image.open(photos_dir / name) as im:
            image = np.ascontiguousarray(ImageOps.exif_transpose(im).convert("RGB"))
        for det in detector(image, 0):
            shape = predictor(image, det)
            out.append(
                Face(
                    photo=name,
                    image=image,
                    chip=dlib.get_face_chip(image, shape, size=150, padding=0.25),
                    box=(det.left(), det.top(), det.right(), det.bottom()),
                    descriptor=np.array(recognizer.compute_face_descriptor(image, shape)),
                )
            )
    assert len(out) >= len(PHOTOS), "dlib should find a face in every test photo"
    return out


def test_descriptors_match_dlib_on_its_own_chips(model, recognizer, faces) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)  # the full 0..255 range
    chips = [f.chip for f in faces] + [noise]
    reference = np.stack([np.array(recognizer.compute_face_descriptor(c)) for c in chips])
    with torch.no_grad():
        ours = model(_chips_to_tensor(chips)).double().numpy()
    err = np.abs(ours - reference).max()
    print(f"parity over {len(chips)} chips: max abs error {err:.2e}")
    assert ours.shape == (len(chips), 128)
    assert err < 1e-4
    # a single chip gives the same as inside a batch
    with torch.no_grad():
        single = model(_chips_to_tensor(chips[:1]))[0].double().numpy()
    assert np.abs(single - ours[0]).max() < 1e-5


def _corrupt_name(data: bytes) -> bytes:
    i = data.index(b"con_4", 1000)  # a convolution past the first
    return data[:i] + b"cxn_4" + data[i + 5 :]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d[: len(d) // 2], "file ends inside"),
        (lambda d: d[:-7], "file ends inside"),
        (lambda d: b"", "file ends inside"),
        (_corrupt_name, "unsupported layer type 'cxn_4'"),
        (lambda d: d + b"\x00\x01", "unexpected bytes after the last layer"),
        (lambda d: d[:4] + b"X" + d[5:], "loss layer"),
    ],
    ids=["half", "short-tail", "empty", "bad-layer-name", "trailing-bytes", "bad-loss-name"],
)
def test_a_damaged_file_is_refused_clearly(weights, tmp_path, corrupt, message) -> None:
    bad = tmp_path / "dlib_resnet_v1.dat"
    bad.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(ModelStoreError, match=message) as info:
        build(bad)
    assert str(bad) in str(info.value)


def test_another_dlib_file_is_refused(store) -> None:
    path = store.resolve("shape_predictor_5_face_landmarks.dat")
    with pytest.raises(ModelStoreError, match="not a valid dlib network file"):
        build(path)


def test_the_parser_reads_the_whole_network(weights) -> None:
    net = read_dlib_net(weights.read_bytes())
    kinds = [layer.kind for layer in net.layers]
    assert (kinds.count("con"), kinds.count("affine"), kinds.count("fc")) == (29, 29, 1)
    assert (kinds.count("max_pool"), kinds.count("avg_pool")) == (1, 5)
    assert net.input_size == (150, 150)
    np.testing.assert_allclose(net.mean_rgb, (122.782, 117.001, 104.298), atol=1e-4)


def _mediapipe_keypoints(store, image: np.ndarray) -> list[np.ndarray]:
    """Per face, (4, 2) pixel coordinates: image-left eye, image-right eye, nose tip, mouth."""
    mp = pytest.importorskip("mediapipe")
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.FaceDetectorOptions(
        base_options=BaseOptions(
            model_asset_path=str(store.resolve("face_detection_short_range.tflite"))
        ),
        min_detection_confidence=0.5,
    )
    with vision.FaceDetector.create_from_options(options) as detector:
        result = detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
    h, w = image.shape[:2]
    return [
        np.array([[k.x * w - 0.5, k.y * h - 0.5] for k in d.keypoints[:4]])
        for d in result.detections
    ]


def test_template_alignment_is_close_to_dlibs_pipeline(store, model, faces) -> None:
    template = template_keypoints(SPECS[0].template)
    descriptors, distances = [], []
    for face in faces:
        left, top, right, bottom = face.box
        matches = [
            kp
            for kp in _mediapipe_keypoints(store, face.image)
            if left <= kp[:2, 0].mean() <= right and top <= kp[:2, 1].mean() <= bottom
        ]
        assert len(matches) == 1, f"MediaPipe should find the face dlib found in {face.photo}"
        keypoints = torch.from_numpy(matches[0])[None]
        assert keypoints[0, 0, 0] < keypoints[0, 1, 0], "keypoint 0 is the image-left eye"
        matrix = estimate_similarity(keypoints, template)
        image = torch.from_numpy(face.image.copy()).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            ours = model(warp_affine(image, matrix, (150, 150)))[0].double().numpy()
        descriptors.append(ours)
        distances.append(float(np.linalg.norm(ours - face.descriptor)))
    print("our alignment vs dlib's pipeline:", ", ".join(f"{d:.3f}" for d in distances))
    # dlib's own rule calls faces the same person below 0.6; landmark differences between
    # MediaPipe and dlib's shape predictor leave about 0.13 to 0.25 on these photos.
    assert max(distances) < 0.3
    assert np.mean(distances) < 0.22
    # and each face is nearest to its own dlib descriptor among these different people
    reference = np.stack([f.descriptor for f in faces])
    nearest = np.linalg.norm(np.stack(descriptors)[:, None] - reference[None], axis=-1).argmin(1)
    assert nearest.tolist() == list(range(len(faces)))


def test_gradients_reach_the_input(model, faces) -> None:
    x = _chips_to_tensor([faces[0].chip]).double().requires_grad_(True)
    model64 = _float64_copy(model)
    target = model64(x).detach() + 0.1
    loss = (model64(x) - target).square().sum()
    loss.backward()
    grad = x.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
    assert all(p.grad is None for p in model64.parameters())
    # the gradient agrees with a central finite difference along a random direction
    direction = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    direction /= direction.norm()
    eps = 1e-6  # small enough not to cross ReLU and max-pool kinks
    with torch.no_grad():
        plus = (model64(x + eps * direction) - target).square().sum()
        minus = (model64(x - eps * direction) - target).square().sum()
    numeric = float((plus - minus) / (2 * eps))
    analytic = float((grad * direction).sum())
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic)


def _float64_copy(model: DlibResNet) -> DlibResNet:
    """A float64 copy of ``model`` for finite differences (the original stays float32)."""
    copy = DlibResNet()
    copy.load_state_dict(model.state_dict())
    return copy.double().freeze()


def test_wrong_input_shape_is_a_usage_error(model) -> None:
    with pytest.raises(UsageError, match="150, 150"):
        model(torch.zeros(1, 3, 112, 112))
