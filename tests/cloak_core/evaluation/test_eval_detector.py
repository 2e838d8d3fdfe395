"""``eval --landmarks detector``: the attack gets the pipeline detector's faces; an image
without one stays in the gallery unprotected; every report states the detector's recall."""

from __future__ import annotations

import numpy as np
import pytest

from cloak_core.detect import DetectorConfig
from cloak_core.evaluation.conditions import conditions_from_flags
from cloak_core.evaluation.report import markdown
from cloak_core.evaluation.runner import EvalSettings, Evaluation

pytestmark = pytest.mark.slow


def _settings(faces_dir, out, landmarks: str) -> EvalSettings:
    return EvalSettings(
        dataset=faces_dir,
        out=out,
        identities=2,
        gallery_per_identity=1,
        probes_per_identity=1,
        preset="fast",
        steps=1,
        eval_models=("sface",),
        conditions=conditions_from_flags("png", None, None),
        landmarks=landmarks,
        device="cpu",
    )


def test_a_face_the_detector_misses_stays_unprotected(faces_dir, store, tmp_path):
    # Faces under 1000 px are dropped: the detector finds none on the 112x112 crops.
    blind = DetectorConfig(min_face=1000)
    report = (
        Evaluation(_settings(faces_dir, tmp_path, "detector"), store, detector_config=blind)
        .run()
        .report
    )
    recall = report["detector_recall"]
    assert recall["images"] == 48 and recall["found"] == 0 and recall["recall"] == 0.0
    assert len(recall["missed"]) == 48 and recall["gallery_images"] == 24
    d = report["dataset"]
    assert d["protected_gallery_images"] == 0 and len(d["unprotected_gallery_images"]) == 2
    assert all(g["images"] == 0 for g in report["attack"])
    # The gallery as uploaded: protected accuracy is the clean one.
    for row in report["results"]["png"].values():
        assert row["protected"]["rank1"] == row["clean"]["rank1"]
    text = markdown(report)
    assert "detector recall: 0/48 images" in text
    assert "2 protected identities' gallery images left unprotected" in text


def test_detector_faces_are_protected_and_recall_is_reported(faces_dir, store, tmp_path):
    evaluation = Evaluation(_settings(faces_dir, tmp_path / "d", "detector"), store)
    report = evaluation.run().report
    recall = report["detector_recall"]
    assert recall["found"] == recall["images"] == 48 and recall["missed"] == []
    assert report["dataset"]["protected_gallery_images"] == 2
    assert report["protocol"]["landmarks"] == "detector"
    (group,) = report["attack"]
    assert group["images"] == 2 and group["visibility"]["psnr"]["worst"] < 60
    # Template mode states the detector's recall too, and attacks the template's face.
    template = Evaluation(_settings(faces_dir, tmp_path / "t", "template"), store).run().report
    assert template["detector_recall"]["recall"] == 1.0
    assert template["dataset"]["protected_gallery_images"] == 2
    assert np.isfinite(template["attack"][0]["visibility"]["psnr"]["worst"])
