"""Bounds on the work of reading a photo: refused from the structure or the header before any
pixel is decoded (JPEG scans and segments, PNG chunks, TIFF strips, decoded bytes), and
every stage stopped part way by its ``cancel`` event (decoding, detection, encoding)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from fuzz.hostile import (
    jpeg_with_segments,
    many_scans_jpeg,
    png_header_only,
    png_with_chunks,
    progressive_jpeg,
    tiff_with_strips,
)
from PIL import Image, ImageFile

from cloak_core.errors import CancelledError, ImageError, ImageTooLargeError, UnsupportedImageError
from cloak_core.imagecheck import MAX_JPEG_SCANS, jpeg_scans
from cloak_core.imageio import decode_image, encode_image, probe_image


class CancelAfter(threading.Event):
    """An event that reads as set from its ``n + 1``-th look on: stops a stage part way,
    deterministically, and counts how often the stage looked."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if Pillow decodes any pixel."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def refused_quickly(data: bytes, words: str) -> None:
    for check in (probe_image, decode_image):
        started = time.perf_counter()
        with pytest.raises(ImageTooLargeError) as exc:
            check(data)
        assert time.perf_counter() - started < 0.5, check.__name__
        assert words in str(exc.value)
        assert "export it again" in str(exc.value)


# -- the structure -----------------------------------------------------------------------


def test_a_progressive_jpeg_of_many_scans_is_refused_before_decoding(no_decoding):
    # 15 KB: 1,000 scans of 49 megapixels, about 10 s of libjpeg-turbo on one core.
    refused_quickly(many_scans_jpeg(7000, 7000, 1000), "more than 100 scans")


def test_photos_scans_are_counted_as_libjpeg_writes_them(photos_dir):
    assert jpeg_scans(progressive_jpeg(640, 480)) == 10  # libjpeg's progressive script
    assert jpeg_scans((photos_dir / "obama.jpg").read_bytes()) == 1  # a camera's sequential
    at_limit = many_scans_jpeg(320, 240, MAX_JPEG_SCANS - 10)
    assert jpeg_scans(at_limit) == MAX_JPEG_SCANS
    assert decode_image(at_limit).pixels.shape == (240, 320, 3)  # a valid file, decoded


def test_files_of_too_many_segments_chunks_or_strips_are_refused_before_parsing(no_decoding):
    # Before the limits, Pillow spent seconds walking these in Python before decoding.
    refused_quickly(jpeg_with_segments(100_000), "more than 1000 segments")
    refused_quickly(jpeg_with_segments(100_000, marker=0xE1), "more than 1000 segments")
    refused_quickly(png_with_chunks(100_000), "more than 1000 chunks")
    refused_quickly(png_with_chunks(150_000, kind=b"IDAT"), "more than 100,000 chunks")
    refused_quickly(tiff_with_strips(5, 100_000), "100,000 strips")


def test_files_under_the_structure_limits_are_read():
    assert decode_image(jpeg_with_segments(900)).pixels.shape == (32, 32, 3)
    assert decode_image(png_with_chunks(900)).pixels.shape == (32, 32, 3)
    assert decode_image(tiff_with_strips(8, 2000)).pixels.shape == (2000, 8, 3)


# -- decoded bytes ---------------------------------------------------------------------


def test_decoded_bytes_are_limited_from_the_header(no_decoding):
    # 7000 x 7000 16-bit RGBA: 49 megapixels, under the pixel limit, but 392 MB decoded
    # (and about 3 GB at the decoder's peak); the file is 74 bytes.
    data = png_header_only(7000, 7000)
    for check in (probe_image, decode_image):
        with pytest.raises(ImageTooLargeError) as exc:
            check(data)
        message = str(exc.value)
        assert "8 bytes per pixel" in message and "392 MB" in message, message
        assert "over the limit of 200 MB" in message and "8 bits per channel" in message


def test_decoded_bytes_count_channels_and_sample_size():
    mp50 = (10_000, 5_000)
    # 8 bits at the pixel limit: RGB, RGBA (at the byte limit), greyscale (decoded to RGB).
    assert probe_image(png_header_only(*mp50, bit_depth=8, colour_type=2)).decoded_bytes == 150e6
    assert probe_image(png_header_only(*mp50, bit_depth=8, colour_type=6)).decoded_bytes == 200e6
    assert probe_image(png_header_only(*mp50, bit_depth=8, colour_type=0)).decoded_bytes == 150e6
    # 16 bits: 8 bytes per RGBA pixel, 6 per RGB or grey one.
    assert probe_image(png_header_only(5000, 5000)).decoded_bytes == 200e6
    assert probe_image(png_header_only(4000, 3000, colour_type=2)).decoded_bytes == 72e6
    with pytest.raises(ImageTooLargeError):
        probe_image(png_header_only(6000, 6000, colour_type=2))  # 216 MB
    assert probe_image(png_header_only(6000, 6000, colour_type=2), max_pixels=10**8)
    with pytest.raises(ImageTooLargeError):
        probe_image(png_header_only(100, 100), max_decoded_bytes=79_999)


def test_under_the_byte_limit_a_header_only_file_is_decoded_and_found_truncated():
    # The refusal above is the header check's: the same kind of file, smaller, gets as
    # far as decoding, which finds the data missing.
    with pytest.raises(ImageError) as exc:
        decode_image(png_header_only(2000, 1500))
    assert not isinstance(exc.value, ImageTooLargeError)


# -- cancel ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return progressive_jpeg(4000, 3000, seed=1)


def test_decoding_looks_at_cancel_between_blocks_of_input(large_jpeg):
    full = CancelAfter(10**9)
    decode_image(large_jpeg, cancel=full)
    assert full.looks > 10  # a look per 4 KB block read
    for n in (0, 5):
        stop = CancelAfter(n)
        with pytest.raises(CancelledError):
            decode_image(large_jpeg, cancel=stop)
        assert stop.looks == n + 1  # stopped at the first look after the cancel


def test_sixteen_bit_png_decoding_and_encoding_stop_when_cancelled():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (600, 800, 3), dtype=np.uint16)
    data = _png16(pixels)
    source = decode_image(data)
    assert source.pixels.dtype == np.uint16
    np.testing.assert_array_equal(source.pixels, pixels)
    for stage in ("decode", "encode"):
        stop = CancelAfter(3)
        with pytest.raises(CancelledError):
            if stage == "decode":
                decode_image(data, cancel=stop)
            else:
                encode_image(pixels, source, cancel=stop)
        assert stop.looks == 4


def _png16(pixels: np.ndarray) -> bytes:
    from cloak_core.imageio import DecodedImage

    source = DecodedImage(
        pixels=pixels, alpha=None, format="PNG", icc_profile=None, quality=None, mode="RGB;16"
    )
    return encode_image(pixels, source)[0]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoding_looks_at_cancel_between_blocks_of_output(large_jpeg, fmt):
    source = decode_image(large_jpeg)
    stop = CancelAfter(0)
    with pytest.raises(CancelledError):
        encode_image(source.pixels, source, format=fmt, cancel=stop)
    assert encode_image(source.pixels[:64, :64], source, format=fmt, cancel=threading.Event())


def test_a_cancel_stops_a_long_decode_within_a_fraction_of_a_second(large_jpeg):
    started = time.perf_counter()
    decode_image(large_jpeg)
    whole = time.perf_counter() - started
    cancel = threading.Event()
    timer = threading.Timer(whole / 5, cancel.set)
    timer.start()
    started = time.perf_counter()
    with pytest.raises(CancelledError):
        decode_image(large_jpeg, cancel=cancel)
    stopped = time.perf_counter() - started
    timer.join()
    print(f"\nwhole decode {whole:.2f} s; cancelled at {whole / 5:.2f} s, stopped {stopped:.2f} s")
    assert stopped < whole / 5 + 0.25


def test_detection_stops_when_cancelled(store):
    from cloak_core.detect import FaceDetector

    image = np.asarray(Image.open(io.BytesIO(progressive_jpeg(3000, 2000))).convert("RGB"))
    with FaceDetector(store) as detector:
        stop = threading.Event()
        stop.set()
        started = time.perf_counter()
        with pytest.raises(CancelledError):
            detector.detect(image, cancel=stop)
        assert time.perf_counter() - started < 0.5
        assert detector.detect(image[:200, :200], cancel=threading.Event()) == []


# -- damaged files the fuzzer found (tests/fuzz) -------------------------------------------


def _save(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def test_damaged_files_found_by_the_fuzzer_are_image_errors():
    photo = Image.new("RGB", (64, 48), (10, 200, 30))
    avif = bytearray(_save(photo, "AVIF"))
    avif[81] = 0  # the primary item's id: the AVIF library raised RuntimeError
    png = _save(photo.convert("P"), "PNG")
    at = png.index(b"PLTE") - 4
    no_palette = png[:at] + png[at + 12 + int.from_bytes(png[at : at + 4], "big") :]
    jpeg = _save(photo, "JPEG")
    garbage = jpeg[:2] + b"\x00" * 200_000 + jpeg[2:]  # Pillow stepped over it byte by byte
    tiff = bytearray(_save(photo, "TIFF"))
    ifd = int.from_bytes(tiff[4:8], "little")
    tiff[ifd : ifd + 2] = (40_000).to_bytes(2, "little")  # tags Pillow would read one by one
    cases = {
        "AVIF without its image item": bytes(avif),
        "palette PNG without its palette": no_palette,  # was AttributeError
        "JPEG with 200 KB of garbage": garbage,
        "TIFF claiming 40,000 tags": bytes(tiff),
    }
    for name, data in cases.items():
        started = time.perf_counter()
        with pytest.raises(ImageError):
            decode_image(data)
        assert time.perf_counter() - started < 0.2, name


def test_a_format_not_read_is_named_without_reading_all_of_it():
    # An XPM of 300,000 palette entries (5 MB): Pillow reads the palette line by line in
    # Python (about 1 s), and the daemon names what it refuses on its event loop.
    entries = b"\n".join(b'"%03x c #000000",' % (i % 4096) for i in range(300_000))
    data = b'/* XPM */\nstatic char *x[] = {\n"1 1 300000 3",\n' + entries + b'\n"000"};\n'
    started = time.perf_counter()
    with pytest.raises(UnsupportedImageError):
        probe_image(data)
    assert time.perf_counter() - started < 0.2
