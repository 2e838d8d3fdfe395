"""Decoding and encoding: every mode, every bad input, metadata, JPEG quality."""

from __future__ import annotations

import importlib.util
import io
import struct
import time
import zlib

import cv2
import numpy as np
import psutil
import pytest
from PIL import Image, ImageCms, ImageOps

from cloak_core.errors import ImageError, ImageTooLargeError, UnsupportedImageError, UsageError
from cloak_core.imageio import decode_image, encode_image, estimate_jpeg_quality, probe_image

ACTIONS = ("try again", "export", "choose", "download", "install", "resize")


@pytest.fixture(scope="module")
def photo(photos_dir) -> Image.Image:
    """A real photo, 320x240 RGB."""
    return Image.open(photos_dir / "obama_small.jpg").convert("RGB")


@pytest.fixture(scope="module")
def rgba(photos_dir) -> Image.Image:
    """A real RGBA PNG, reduced to keep the tests fast, with an alpha channel that has
    transparent, partly transparent and opaque parts (the photo's own is all opaque)."""
    im = Image.open(photos_dir / "lin-manuel-miranda.png")
    im = im.resize((im.width // 2, im.height // 2))
    yy, xx = np.mgrid[0 : im.height, 0 : im.width]
    alpha = np.clip((np.hypot(xx - im.width / 2, yy - im.height / 2) - 80) * 3, 0, 255)
    im.putalpha(Image.fromarray(255 - alpha.astype(np.uint8)))
    return im


def save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB, with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + png_chunk(b"IEND", b"")
    )


# -- the real photos --------------------------------------------------------------------


def test_every_photo_decodes_like_pillow(photos_dir):
    for path in sorted(photos_dir.iterdir()):
        data = path.read_bytes()
        decoded = decode_image(data)
        ref = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert decoded.pixels.dtype == np.uint8
        np.testing.assert_array_equal(decoded.pixels, np.asarray(ref.convert("RGB")))
        if ref.mode == "RGBA":
            np.testing.assert_array_equal(decoded.alpha, np.asarray(ref)[..., 3])
        else:
            assert decoded.alpha is None
        assert decoded.icc_profile == ref.info.get("icc_profile")


# -- modes ------------------------------------------------------------------------------


def make(photo: Image.Image, rgba: Image.Image, kind: str) -> tuple[bytes, np.ndarray, object]:
    """Test image bytes of ``kind`` with the pixels and alpha decoding must give."""
    rgb = np.asarray(photo)
    if kind == "L":
        im = photo.convert("L")
        return save(im, "PNG"), np.repeat(np.asarray(im)[..., None], 3, 2), None
    if kind == "LA":
        im = rgba.convert("LA")
        a = np.asarray(im)
        return save(im, "PNG"), np.repeat(a[..., :1], 3, 2), a[..., 1]
    if kind == "1":
        im = photo.convert("1")
        return save(im, "PNG"), np.repeat(np.asarray(im.convert("L"))[..., None], 3, 2), None
    if kind == "P":
        im = photo.quantize(64)
        return save(im, "PNG"), np.asarray(im.convert("RGB")), None
    if kind == "P+transparency":
        im = rgba.convert("RGBA").quantize(64)
        im.info["transparency"] = 0
        data = save(im, "PNG", transparency=0)
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
        return data, ref[..., :3], ref[..., 3]
    if kind == "GIF":
        im = photo.quantize(128)
        return save(im, "GIF"), np.asarray(im.convert("RGB")), None
    if kind == "RGBA":
        a = np.asarray(rgba)
        return save(rgba, "PNG"), a[..., :3], a[..., 3]
    if kind == "CMYK-JPEG":
        return save(photo.convert("CMYK"), "JPEG", quality=95), rgb, None
    if kind == "CMYK-TIFF":
        return save(photo.convert("CMYK"), "TIFF"), rgb, None
    if kind == "I;16":
        grey = (np.asarray(photo.convert("L")).astype(np.uint16) * 257) ^ 0x5A
        return save(Image.fromarray(grey), "PNG"), np.repeat(grey[..., None], 3, 2), None
    if kind in ("RGB48", "RGBA64"):
        wide = (
            rgb.astype(np.uint16) * 257
            + np.arange(rgb.size, dtype=np.uint16).reshape(rgb.shape) % 251
        )
        alpha = None
        if kind == "RGBA64":
            alpha = (np.arange(wide.shape[0] * wide.shape[1]) % 65536).astype(np.uint16)
            alpha = alpha.reshape(wide.shape[:2])
            bgr = np.dstack([wide[..., ::-1], alpha])
        else:
            bgr = wide[..., ::-1]
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
        assert ok
        return buf.tobytes(), wide, alpha
    if kind == "BMP":
        return save(photo, "BMP"), rgb, None
    if kind == "WEBP-lossless":
        return save(photo, "WEBP", lossless=True), rgb, None
    raise AssertionError(kind)


MODES = [
    "L",
    "LA",
    "1",
    "P",
    "P+transparency",
    "GIF",
    "RGBA",
    "CMYK-JPEG",
    "CMYK-TIFF",
    "I;16",
    "RGB48",
    "RGBA64",
    "BMP",
    "WEBP-lossless",
]
GREY = {"L", "LA", "1", "I;16"}
LOSSY = {"CMYK-JPEG"}


@pytest.mark.parametrize("kind", MODES)
def test_modes_decode_and_round_trip(photo, rgba, kind):
    data, expected, expected_alpha = make(photo, rgba, kind)
    decoded = decode_image(data)
    assert decoded.pixels.shape == expected.shape and decoded.pixels.dtype == expected.dtype
    if kind in LOSSY:
        assert np.abs(decoded.pixels.astype(int) - expected).mean() < 3
    else:
        np.testing.assert_array_equal(decoded.pixels, expected)
    if expected_alpha is None:
        assert decoded.alpha is None
    else:
        np.testing.assert_array_equal(decoded.alpha, expected_alpha)

    out, mime = encode_image(decoded.pixels, decoded)
    again = decode_image(out)
    assert mime == f"image/{again.format.lower()}"
    assert again.pixels.shape == decoded.pixels.shape
    assert again.pixels.dtype == decoded.pixels.dtype  # 16-bit stays 16-bit
    assert again.grey == (kind in GREY)
    if kind.startswith("CMYK"):
        assert again.format in ("JPEG", "TIFF") and again.mode == "RGB"
        assert np.abs(again.pixels.astype(int) - decoded.pixels).mean() < 2
    else:
        np.testing.assert_array_equal(again.pixels, decoded.pixels)  # lossless
    if decoded.alpha is None:
        assert again.alpha is None
    else:
        np.testing.assert_array_equal(again.alpha, decoded.alpha)


def test_output_formats_by_input(photo, rgba):
    cases = {
        "GIF": (make(photo, rgba, "GIF")[0], "image/png"),
        "BMP": (save(photo, "BMP"), "image/bmp"),
        "TIFF": (save(photo, "TIFF"), "image/tiff"),
        "WEBP": (save(photo, "WEBP", quality=80), "image/webp"),
        "JPEG": (save(photo, "JPEG"), "image/jpeg"),
    }
    for fmt, (data, mime) in cases.items():
        decoded = decode_image(data)
        assert decoded.format == fmt
        assert encode_image(decoded.pixels, decoded)[1] == mime
    decoded = decode_image(save(photo, "JPEG"))
    for fmt, mime in (("png", "image/png"), ("webp", "image/webp"), ("jpg", "image/jpeg")):
        out, got = encode_image(decoded.pixels, decoded, format=fmt)
        assert got == mime and decode_image(out).pixels.shape == decoded.pixels.shape


def test_sixteen_bit_png_is_read_by_an_independent_decoder(photo, rgba):
    """The hand-written 16-bit PNG (Pillow writes none in colour) reads back in OpenCV."""
    for kind in ("RGB48", "RGBA64", "I;16"):
        data, expected, alpha = make(photo, rgba, kind)
        decoded = decode_image(data)
        out, _ = encode_image(decoded.pixels, decoded)
        back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
        assert back.dtype == np.uint16
        if kind == "I;16":
            np.testing.assert_array_equal(back, expected[..., 0])
        else:
            np.testing.assert_array_equal(back[..., 2::-1], expected)
            if alpha is not None:
                np.testing.assert_array_equal(back[..., 3], alpha)
        # To 8-bit formats, 16-bit samples round to the nearest 8-bit value.
        jpeg_free, _ = encode_image(decoded.pixels, decoded, format="webp", quality=100)
        assert decode_image(jpeg_free).pixels.dtype == np.uint8


def test_jpeg_output_of_transparent_image_is_on_white(rgba):
    decoded = decode_image(save(rgba, "PNG"))
    out, mime = encode_image(decoded.pixels, decoded, format="jpeg", quality=95)
    assert mime == "image/jpeg"
    back = decode_image(out)
    transparent = decoded.alpha == 0
    assert back.alpha is None and transparent.any()
    assert back.pixels[transparent].mean() > 250


def test_lossless_webp_stays_lossless(photo):
    decoded = decode_image(save(photo, "WEBP", lossless=True))
    assert decoded.lossless
    perturbed = decoded.pixels.copy()
    perturbed[::7, ::5] ^= 1
    out, _ = encode_image(perturbed, decoded)
    np.testing.assert_array_equal(decode_image(out).pixels, perturbed)
    assert not decode_image(save(photo, "WEBP", quality=80)).lossless


# -- orientation and metadata ---------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = save(photo.crop((0, 0, 200, 120)), "PNG", exif=exif)
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded.pixels, np.asarray(reference.convert("RGB")))
    out, _ = encode_image(decoded.pixels, decoded)
    again = Image.open(io.BytesIO(out))
    assert 0x0112 not in again.getexif()  # baked in, and not applied twice
    np.testing.assert_array_equal(np.asarray(again.convert("RGB")), decoded.pixels)


def exif_with_gps() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0110] = "PhoneModel"  # Model
    exif[0x0132] = "2024:05:01 12:00:00"  # DateTime
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 29.0)
    gps[3] = "E"
    gps[4] = (2.0, 17.0, 40.0)
    return exif


@pytest.mark.parametrize("source", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("out_format", ["same", "png", "jpeg", "webp"])
def test_exif_and_gps_dropped_icc_kept(photo, source, out_format):
    icc = srgb_profile()
    data = save(photo, source, exif=exif_with_gps(), icc_profile=icc)
    original = Image.open(io.BytesIO(data))
    assert original.getexif().get_ifd(0x8825)[1] == "N"  # the input does carry GPS

    decoded = decode_image(data)
    assert decoded.icc_profile == icc
    out, _ = encode_image(decoded.pixels, decoded, format=out_format)
    written = Image.open(io.BytesIO(out))
    assert len(written.getexif()) == 0
    assert "exif" not in written.info
    assert b"Exif\x00\x00" not in out and b"PhoneMaker" not in out and b"eXIf" not in out
    assert written.info.get("icc_profile") == icc


def test_icc_kept_in_sixteen_bit_png(photo, rgba):
    data, _, _ = make(photo, rgba, "RGB48")
    decoded = decode_image(data)
    decoded.icc_profile = srgb_profile()
    out, _ = encode_image(decoded.pixels, decoded)
    assert Image.open(io.BytesIO(out)).info.get("icc_profile") == decoded.icc_profile


def test_cmyk_with_a_profile_that_does_not_fit_falls_back(photo):
    """A CMYK JPEG carrying an RGB profile still decodes (Pillow's plain conversion), and
    the profile is not copied onto the RGB output."""
    data = save(photo.convert("CMYK"), "JPEG", quality=95, icc_profile=srgb_profile())
    decoded = decode_image(data)
    assert decoded.mode == "CMYK" and decoded.icc_profile is None
    assert np.abs(decoded.pixels.astype(int) - np.asarray(photo)).mean() < 3


# -- JPEG quality -------------------------------------------------------------------------


@pytest.mark.parametrize("quality", [50, 75, 85, 90, 95])
@pytest.mark.parametrize("subsampling", [0, 2])
def test_jpeg_quality_estimate(photo, quality, subsampling):
    decoded = decode_image(save(photo, "JPEG", quality=quality, subsampling=subsampling))
    assert abs(decoded.quality - quality) <= 2
    assert decoded.subsampling == subsampling
    out, _ = encode_image(decoded.pixels, decoded)
    again = decode_image(out)
    expected = min(max(quality, 70), 95)  # the output quality is clamped to 70..95
    assert abs(again.quality - expected) <= 2
    assert again.subsampling == subsampling


def test_jpeg_quality_estimate_of_non_libjpeg_tables():
    """Tables that are no libjpeg scaling map to the quality of similar coarseness."""
    from cloak_core.imageio import ijg_quantization

    luma, chroma = ijg_quantization(80)
    finer = {0: list(np.maximum(luma * 0.9, 1)), 1: list(np.maximum(chroma * 0.9, 1))}
    assert 80 < estimate_jpeg_quality(finer) <= 84
    assert estimate_jpeg_quality({}) is None


def test_explicit_quality(photo):
    decoded = decode_image(save(photo, "JPEG", quality=95))
    out, _ = encode_image(decoded.pixels, decoded, quality=60)
    assert abs(decode_image(out).quality - 60) <= 2
    with pytest.raises(UsageError):
        encode_image(decoded.pixels, decoded, quality=0)


# -- bad input ------------------------------------------------------------------------------


def assert_actionable(exc: pytest.ExceptionInfo) -> None:
    message = str(exc.value)
    assert any(a in message for a in ACTIONS), message


def test_truncated_files(photo, rgba):
    for data in (save(photo, "JPEG", quality=90), save(rgba, "PNG"), save(photo, "WEBP")):
        for cut in (len(data) // 2, len(data) - 400):
            with pytest.raises(ImageError) as exc:
                decode_image(data[:cut])
            assert not isinstance(exc.value, (UnsupportedImageError, ImageTooLargeError))
            assert "truncated or corrupt" in str(exc.value)
            assert_actionable(exc)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"", "empty"),
        (b"Hello, this is a plain text file and no photo.\n" * 3, "text"),
        (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "binary"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
    ],
)
def test_not_images(data, named):
    if named == "HEIC" and importlib.util.find_spec("pillow_heif") is not None:
        pytest.skip("pillow-heif is installed: this HEIC header is then a (broken) image")
    with pytest.raises(UnsupportedImageError) as exc:
        decode_image(data)
    assert named in str(exc.value)
    assert_actionable(exc)


def test_other_image_formats_are_named(photo):
    with pytest.raises(UnsupportedImageError, match="PPM"):
        decode_image(save(photo, "PPM"))


@pytest.mark.parametrize("fmt", ["PCX", "ICO", "TGA", "PPM", "SGI", "QOI"])
def test_formats_outside_the_readable_set_are_refused_from_the_header(photo, fmt):
    data = save(photo.resize((64, 48)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow reads it; FaceCloak does not
    for check in (probe_image, decode_image):
        with pytest.raises(UnsupportedImageError, match=fmt) as exc:
            check(data)
        assert_actionable(exc)


def several_frames(photo: Image.Image, fmt: str, **options) -> bytes:
    """``photo`` and its mirror image as two frames (pages) of one ``fmt`` file."""
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    if fmt == "GIF":
        frames = [f.quantize(128) for f in frames]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], **options)


@pytest.mark.parametrize(
    ("fmt", "named"),
    [
        ("GIF", "animated GIF"),
        ("PNG", "animated PNG"),
        ("WEBP", "animated WebP"),
        ("TIFF", "multi-page TIFF"),
        ("AVIF", "animated AVIF"),
    ],
)
def test_images_of_several_frames_are_refused_not_cut_to_the_first(photo, fmt, named):
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow cannot write {fmt}")
    data = several_frames(photo, fmt)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    for check in (probe_image, decode_image):
        with pytest.raises(UnsupportedImageError, match=named) as exc:
            check(data)
        assert "still images only" in str(exc.value)
        assert_actionable(exc)
    # One frame of the same format is a still image.
    header = probe_image(save(photo if fmt != "GIF" else photo.quantize(128), fmt))
    assert (header.format, header.width, header.height) == (fmt, photo.width, photo.height)


def test_a_phones_multi_picture_jpeg_is_read_as_its_main_photo(photo):
    preview = photo.resize((photo.width // 4, photo.height // 4))
    data = save(photo, "MPO", save_all=True, append_images=[preview], quality=95)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert probe_image(data).format == "MPO"
    decoded = decode_image(data)
    assert decoded.pixels.shape == (photo.height, photo.width, 3)
    assert np.abs(decoded.pixels.astype(int) - np.asarray(photo)).mean() < 3
    out, mime = encode_image(decoded.pixels, decoded)
    assert mime == "image/jpeg" and Image.open(io.BytesIO(out)).format == "JPEG"


def test_decompression_bombs_refused_from_the_header():
    process = psutil.Process()
    before = process.memory_info().rss
    start = time.perf_counter()
    for width, height in ((100_000, 100_000), (8000, 8000), (50_000, 1001)):
        with pytest.raises(ImageTooLargeError) as exc:
            decode_image(png_claiming(width, height))
        assert_actionable(exc)
    assert time.perf_counter() - start < 1.0
    assert process.memory_info().rss - before < 50 * 2**20
    with pytest.raises(ImageTooLargeError):
        decode_image(png_claiming(100, 100), max_pixels=9999)


def test_pixel_limit_is_the_callers(photo):
    data = save(photo, "PNG")
    assert decode_image(data, max_pixels=320 * 240).pixels.shape == (240, 320, 3)
    with pytest.raises(ImageTooLargeError, match="76,800"):
        decode_image(data, max_pixels=320 * 240 - 1)


def test_encode_rejects_bad_arguments(photo, rgba):
    decoded = decode_image(save(rgba, "PNG"))
    with pytest.raises(UsageError):
        encode_image(decoded.pixels[..., :2], decoded)
    with pytest.raises(UsageError):
        encode_image(decoded.pixels.astype(np.float32), decoded)
    with pytest.raises(UsageError, match="size"):
        encode_image(decoded.pixels[1:], decoded)
    with pytest.raises(UsageError, match="format"):
        encode_image(decoded.pixels, decoded, format="gif")
