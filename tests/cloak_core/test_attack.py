"""The attack's building blocks against references: blur against OpenCV, masks, terms."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cloak_core.attack import gaussian_blur, model_term
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
    config = get_preset("balanced")
    original = torch.tensor([[1.0, 0.0]])
    cosine = type(
        "M", (), {"spec": type("S", (), {"verification": VerificationRule("cosine", 0.36)})}
    )
    euclid = type(
        "M", (), {"spec": type("S", (), {"verification": VerificationRule("euclidean", 0.6)})}
    )
    # Cosine 0 reaches the balanced target (0.0): the term is capped at 1.
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
