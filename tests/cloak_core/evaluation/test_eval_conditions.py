"""Upload conditions: parsing the specs, mapping --jpeg/--resize, and what they do to pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cloak_core.errors import UsageError
from cloak_core.evaluation.conditions import (
    DEFAULT_CONDITIONS,
    conditions_from_flags,
    parse_condition,
)
from cloak_core.visibility import psnr


def _face(faces_dir) -> np.ndarray:
    return np.asarray(Image.open(faces_dir / "Tom_Hanks" / "001.png").convert("RGB"))


def test_parse() -> None:
    assert parse_condition("png").jpeg is None
    c = parse_condition("JPEG85")
    assert (c.name, c.jpeg, c.scale) == ("jpeg85", 85, None)
    c = parse_condition("scale50-jpeg85")
    assert (c.scale, c.jpeg) == (0.5, 85)
    c = parse_condition("resize640-jpeg75")
    assert (c.max_side, c.jpeg) == (640, 75)
    for bad in ("jpeg", "jpeg0", "jpeg101", "scale0-jpeg85", "gif", "resize8-jpeg85"):
        with pytest.raises(UsageError):
            parse_condition(bad)


def test_flags_map_onto_conditions() -> None:
    names = lambda cs: [c.name for c in cs]  # noqa: E731
    assert names(conditions_from_flags(None)) == list(DEFAULT_CONDITIONS)
    assert names(conditions_from_flags(None, jpeg=70)) == ["png", "jpeg70"]
    assert names(conditions_from_flags(None, resize=56)) == ["png", "resize56-jpeg85"]
    assert names(conditions_from_flags(None, jpeg=60, resize=56)) == [
        "png",
        "jpeg60",
        "resize56-jpeg60",
    ]
    assert names(conditions_from_flags("png,jpeg85,png", jpeg=85)) == ["png", "jpeg85"]


def test_png_is_identity_and_jpeg_matches_pillow(faces_dir) -> None:
    img = _face(faces_dir)
    assert parse_condition("png").apply(img) is img
    out = parse_condition("jpeg75").apply(img)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=75)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(out, ref)


def test_downscaling_keeps_geometry_and_loses_detail(faces_dir) -> None:
    img = _face(faces_dir)
    jpeg = parse_condition("jpeg85").apply(img)
    half = parse_condition("scale50-jpeg85").apply(img)
    assert half.shape == img.shape and half.dtype == np.uint8
    # Degradation grows: JPEG 85 < JPEG 75 < half size then JPEG 85; still the same face.
    p85, p75, phalf = (
        psnr(img, jpeg),
        psnr(img, parse_condition("jpeg75").apply(img)),
        psnr(img, half),
    )
    assert p85 > p75 > phalf > 20
    # resize112 on a 112x112 image changes nothing but the JPEG step.
    np.testing.assert_array_equal(parse_condition("resize112-jpeg85").apply(img), jpeg)
