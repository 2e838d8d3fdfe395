"""Decoding and encoding photos with Pillow: bytes in, RGB pixels out, and back.

Decoding applies the EXIF orientation to the pixels, sets any alpha channel aside
untouched, converts every mode to RGB (palette, greyscale, CMYK through its ICC
profile, 1-bit) and keeps 16-bit images in 16 bits (greyscale, and 48/64-bit RGB(A)
PNGs, which Pillow alone would reduce to 8 bits). Sizes are checked from the header
before any pixel is decoded, so a decompression bomb costs nothing: the pixel count, and
the decoded bytes (pixels x channels x bytes per sample, so that a 16-bit RGBA image counts
for what it takes in memory); and so is the decoder's work where it does not follow from the
size (JPEG scans, segments, PNG chunks, TIFF strips: :mod:`cloak_core.imagecheck`).
Decoding and encoding take a ``cancel`` event, checked between blocks of input read or
output written, so that a deadline stops them part way.

Only still images in :data:`READABLE_FORMATS` are read; anything else (PCX, ICO, TGA, ...)
and images of several frames (animated GIF, PNG, WebP or AVIF, multi-page TIFF), whose
frames but the first would be lost, are refused with :class:`UnsupportedImageError`, from
the header alone (:func:`probe_image`). A phone's multi-picture JPEG (MPO) is read as the
photo it shows: its extra pictures (previews, depth maps) are dropped, since they would
carry the face unprotected.

Encoding writes, by default, the input's format: JPEG at a quality close to the input's
(estimated from its quantization tables), PNG losslessly (16-bit kept), WebP lossy or
lossless like the input, BMP and TIFF losslessly. GIF is written as PNG: a 256-colour
palette would erase much of the perturbation. HEIF and AVIF are written as JPEG (PNG when
they have alpha). Greyscale
inputs stay greyscale. Metadata: the orientation is baked into the pixels, all EXIF
(GPS, camera, dates, thumbnails) and text chunks are dropped, the ICC profile is kept.
"""

from __future__ import annotations

import io
import math
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from cloak_core.errors import (
    CancelledError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    UsageError,
)
from cloak_core.imagecheck import check_structure

# Formats decoded; MPO is how Pillow names many phones' multi-picture JPEGs.
READABLE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "HEIF")

# How a refused image of several frames is named, by format.
_SEVERAL_FRAMES = {
    "GIF": "an animated GIF",
    "PNG": "an animated PNG",
    "WEBP": "an animated WebP",
    "AVIF": "an animated AVIF",
    "HEIF": "a HEIF file of several images",
    "TIFF": "a multi-page TIFF",
}
OUTPUT_FORMATS = ("same", "png", "jpeg", "jpg", "webp")

MIME = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}

DEFAULT_MAX_PIXELS = 50_000_000
# Decoded bytes allowed per pixel of the pixel limit when no byte limit is given: 8-bit RGBA
# (or CMYK) at the pixel limit passes, a 16-bit RGBA image up to half of it.
DEFAULT_BYTES_PER_PIXEL = 4

# What Pillow's plugins raise while reading a damaged file: mostly OSError and SyntaxError;
# ValueError, EOFError, struct.error and zlib.error from header parsing; RuntimeError from
# the AVIF and WebP libraries' bindings; TypeError, KeyError and IndexError from the TIFF
# plugin's tags (the last four found by the fuzzer, tests/fuzz). Only calls into Pillow's
# reading are guarded with them, never FaceCloak's own code.
_READ_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    RuntimeError,
    TypeError,
    KeyError,
    IndexError,
)

# Encoded bytes fed to a decoder, or written by an encoder, between two looks at ``cancel``.
_BLOCK = 4 * 1024

DEFAULT_JPEG_QUALITY = 92
JPEG_QUALITY_RANGE = (70, 95)  # an estimated input quality is clamped to this for output
DEFAULT_WEBP_QUALITY = 90

_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N")

# The IJG (libjpeg) base quantization tables, natural (row-major) order, as Pillow
# reports ``Image.quantization``.
_IJG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
     14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
     18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip
_IJG_CHROMA = np.full(64, 99.0)
_IJG_CHROMA[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 24, 25]] = [
    17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 47, 66,
]  # fmt: skip

# EXIF orientation -> the numpy operation that shows the photo upright.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


@dataclass
class DecodedImage:
    """A decoded photo.

    ``pixels``: ``(H, W, 3)`` RGB, uint8 (0..255) or uint16 (0..65535) for 16-bit inputs,
    upright (EXIF orientation applied). ``alpha``: ``(H, W)`` of the same dtype, or
    ``None``. ``format``: Pillow's name of the input format ("JPEG", "PNG", "WEBP", ...).
    ``icc_profile``: the embedded ICC profile (``None`` for CMYK inputs, whose pixels are
    converted to sRGB). ``quality``: the JPEG quality (1..100) estimated from the
    quantization tables, else ``None``. ``mode``: the input's Pillow mode (``"RGB;16"`` and
    ``"RGBA;16"`` for 48/64-bit PNGs). ``subsampling``: JPEG chroma subsampling
    (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0) or ``None``. ``lossless``: a lossless WebP.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    format: str
    icc_profile: bytes | None
    quality: int | None
    mode: str
    subsampling: int | None = None
    lossless: bool = False

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def grey(self) -> bool:
        """Whether the input was greyscale (it is written back as greyscale)."""
        return self.mode in _GREY_MODES


# -- decoding -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageHeader:
    """What a readable image's header says: Pillow's format name, its size in pixels, and
    ``decoded_bytes``, the bytes its decoded pixels take (see :func:`decoded_bytes`)."""

    format: str
    width: int
    height: int
    decoded_bytes: int


def probe_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int | None = None
) -> ImageHeader:
    """Check ``data`` from its header alone, decoding no pixels: a still image, in a
    format FaceCloak reads, of at most ``max_pixels`` pixels and ``max_decoded_bytes``
    decoded bytes (default: 4 bytes per pixel of ``max_pixels``), whose decoding work is
    within :mod:`cloak_core.imagecheck`'s limits.

    Cheap enough to run before queueing work (the daemon does, for every upload); damage
    past the header (a truncated JPEG) shows only when :func:`decode_image` decodes. Raises
    as :func:`decode_image` does.
    """
    data = bytes(data)
    if not data:
        raise UnsupportedImageError(
            "the input is empty (0 bytes); choose a photo file (JPEG, PNG, WebP, ...)"
        )
    _register_heif()
    with _open(data, max_pixels, max_decoded_bytes) as im:
        return ImageHeader(
            format=im.format or "unknown",
            width=im.width,
            height=im.height,
            decoded_bytes=decoded_bytes(im),
        )


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = None,
    cancel: threading.Event | None = None,
) -> DecodedImage:
    """Decode ``data`` (a still JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF; HEIC with pillow-heif
    installed) into upright RGB pixels.

    Raises :class:`UnsupportedImageError` for bytes that are no image FaceCloak reads or an
    image of several frames (animations, multi-page TIFF),
    :class:`ImageTooLargeError` when width x height exceeds ``max_pixels`` or the decoded
    pixels would take more than ``max_decoded_bytes`` (default: 4 bytes per pixel of
    ``max_pixels``), both checked from the header before decoding, or when the file would
    cost the decoder more work than :mod:`cloak_core.imagecheck` allows,
    :class:`ImageError` for truncated or corrupt files, and
    :class:`~cloak_core.errors.CancelledError` once ``cancel`` is set (it is checked at every
    block of input the decoder reads; a JPEG or PNG stops within a few milliseconds, formats
    decoded in one call, WebP, AVIF, compressed TIFF, only after it).
    """
    data = bytes(data)
    if not data:
        raise UnsupportedImageError(
            "the input is empty (0 bytes); choose a photo file (JPEG, PNG, WebP, ...)"
        )
    _register_heif()
    im = _open(data, max_pixels, max_decoded_bytes, cancel)
    fmt = im.format or "unknown"
    mode = im.mode
    info = dict(im.info)
    quality = _estimate_jpeg_quality(im) if fmt in ("JPEG", "MPO") else None
    subsampling = _jpeg_subsampling(im) if fmt in ("JPEG", "MPO") else None
    wide = _is_wide_png(im)  # before anything loads the pixels (PNG's getexif does)
    try:
        if wide:
            pixels, alpha, orientation = _load_wide_png(data, im, cancel)
            mode = "RGBA;16" if alpha is not None else "RGB;16"
        else:
            im.decodermaxblock = _BLOCK
            im.load()
            orientation = _orientation(im)
    except (MemoryError, Image.DecompressionBombError) as exc:
        raise ImageTooLargeError(
            f"this {fmt} image is too large to decode ({exc}); resize it and try again"
        ) from exc
    except _READ_ERRORS as exc:
        raise ImageError(
            f"could not decode this {fmt} image: it is truncated or corrupt ({exc}); "
            f"download or export it again"
        ) from exc
    if not wide:
        try:  # Pillow's conversions of what was decoded (palettes, CMYK, ...)
            pixels, alpha, info = _to_rgb(im, info)
        except (OSError, ValueError) as exc:
            raise ImageError(
                f"could not convert this {fmt} image to RGB: it is corrupt ({exc}); export it again"
            ) from exc
        info = {**info, **im.info}
    if orientation in _ORIENT:
        pixels = np.ascontiguousarray(_ORIENT[orientation](pixels))
        if alpha is not None:
            alpha = np.ascontiguousarray(_ORIENT[orientation](alpha))
    icc = info.get("icc_profile") or None
    if mode == "CMYK":
        icc = None
    return DecodedImage(
        pixels=pixels,
        alpha=alpha,
        format=fmt,
        icc_profile=icc,
        quality=quality,
        mode=mode,
        subsampling=subsampling,
        lossless=fmt == "WEBP" and _webp_lossless(data),
    )


def _register_heif() -> None:
    """Let Pillow open HEIC/HEIF when the optional pillow-heif is installed."""
    try:
        import pillow_heif
    except ImportError:
        return
    pillow_heif.register_heif_opener()


class _Source(io.BytesIO):
    """The encoded bytes as Pillow reads them; every read first looks at ``cancel``."""

    def __init__(self, data: bytes, cancel: threading.Event | None) -> None:
        super().__init__(data)
        self._cancel = cancel

    def read(self, size: int | None = -1) -> bytes:
        _check_cancel(self._cancel, "decoding")
        return super().read(size)


class _Sink(io.BytesIO):
    """Where Pillow writes an encoded image; every write first looks at ``cancel``."""

    def __init__(self, cancel: threading.Event | None) -> None:
        super().__init__()
        self._cancel = cancel

    def write(self, data: bytes) -> int:  # type: ignore[override]
        _check_cancel(self._cancel, "encoding")
        return super().write(data)


def _check_cancel(cancel: threading.Event | None, what: str) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError(f"{what} was stopped (cancelled or past its time limit)")


def decoded_bytes(im: Image.Image) -> int:
    """The bytes an opened (not loaded) image's decoded pixels take, from its header:
    width x height x channels x bytes per sample.

    Channels: the file's, but at least 3 (greyscale and palettes are decoded to RGB) plus
    one for alpha (a palette's transparency included). Bytes per sample: 2 for 16-bit
    greyscale and 48/64-bit PNG, 4 for 32-bit samples, else 1.
    """
    mode = im.mode
    try:
        bands = Image.getmodebands(mode)
    except KeyError:  # a mode Pillow knows no bands for: count the most an image has
        bands = 4
    alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and ("transparency" in im.info)
    )
    if mode.startswith("I;16"):
        sample = 2
    elif mode in ("I", "F"):
        sample = 4
    elif _is_wide_png(im):
        sample = 2
    else:
        sample = 1
    return im.width * im.height * max(bands, 3 + int(alpha)) * sample


def _open(
    data: bytes,
    max_pixels: int,
    max_decoded_bytes: int | None = None,
    cancel: threading.Event | None = None,
) -> Image.Image:
    """Open (header only) with the readable formats' plugins; check the decoder's work
    from the file's structure, the pixel count, the decoded bytes, and that the image is
    a still one."""
    if max_decoded_bytes is None:
        max_decoded_bytes = max_pixels * DEFAULT_BYTES_PER_PIXEL
    limit = "error" if max_pixels <= (Image.MAX_IMAGE_PIXELS or math.inf) else "ignore"
    check_structure(data)
    with warnings.catch_warnings():
        warnings.simplefilter(limit, Image.DecompressionBombWarning)
        try:
            Image.init()
            formats = [f for f in READABLE_FORMATS if f in Image.OPEN]
            im = Image.open(_Source(data, cancel), formats=formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(
                f"the image is too large ({exc}); the limit is {max_pixels:,} pixels: "
                f"resize it and try again"
            ) from exc
        except UnidentifiedImageError:
            raise UnsupportedImageError(_describe_unsupported(data)) from None
        except _READ_ERRORS as exc:
            raise ImageError(
                f"could not read the image: the file is truncated or corrupt ({exc}); "
                f"download or export it again"
            ) from exc
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLargeError(
            f"the image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
            f"resize it and try again"
        )
    if w <= 0 or h <= 0:
        raise ImageError(f"the image has no pixels ({w}x{h}); export it again")
    if im.mode == "F":
        raise UnsupportedImageError(
            "floating-point images are not supported; export it as an 8- or 16-bit image"
        )
    size = decoded_bytes(im)
    if size > max_decoded_bytes:
        raise ImageTooLargeError(
            f"the image is {w}x{h} with {size // (w * h)} bytes per pixel once decoded: "
            f"{size / 1e6:,.0f} MB, over the limit of {max_decoded_bytes / 1e6:,.0f} MB; "
            f"resize it, or save it with 8 bits per channel, and try again"
        )
    _refuse_several_frames(im)
    return im


def _refuse_several_frames(im: Image.Image) -> None:
    """Refuse an image of several frames: all but the first would be silently lost.

    MPO is let through: its extra pictures are a phone's previews and depth maps of the one
    photo, rightly dropped (they would carry the face unprotected).
    """
    if im.format == "MPO":
        return
    try:
        several = bool(getattr(im, "is_animated", False))  # reads frame headers, no pixels
    except _READ_ERRORS as exc:
        raise ImageError(
            f"could not read the image: the file is truncated or corrupt ({exc}); "
            f"download or export it again"
        ) from exc
    if several:
        try:
            frames = getattr(im, "n_frames", None)
        except _READ_ERRORS:  # a later frame is damaged: the count is not needed
            frames = None
        count = f" ({frames} frames)" if isinstance(frames, int) and im.format != "GIF" else ""
        what = _SEVERAL_FRAMES.get(im.format or "", f"a {im.format} image of several frames")
        raise UnsupportedImageError(
            f"the input is {what}{count}; FaceCloak protects still images only and would "
            f"keep only the first frame: export the frame you want as a PNG or JPEG"
        )


def _describe_unsupported(data: bytes) -> str:
    """A message naming what ``data`` seems to be, and what to do."""
    head = data[:512]
    lower = head.lstrip().lower()
    what = None
    advice = "choose a photo file (JPEG, PNG, WebP, GIF, BMP, TIFF)"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        what = "a HEIC/HEIF photo"
        advice = "install pillow-heif ('pip install pillow-heif') or export it as JPEG"
    elif head.startswith(b"%PDF"):
        what = "a PDF document"
    elif head.startswith(b"PK\x03\x04"):
        what = "a ZIP archive (or an office document)"
    elif b"<svg" in lower:
        what = "an SVG drawing"
        advice = "export it as PNG"
    elif lower.startswith((b"<!doctype html", b"<html")):
        what = "an HTML page (the download may have failed)"
    if what is None:
        try:  # from the first 64 KB: some plugins read far in Python (an XPM's palette)
            with Image.open(io.BytesIO(data[:65536])) as other:
                what = f"a {other.format} image, which FaceCloak does not read"
                advice = "export it as JPEG or PNG"
        except Exception:  # noqa: BLE001 - any failure just means "unknown"
            pass
    if what is None:
        try:
            text = head.decode("utf-8")
            if text and sum(c.isprintable() or c.isspace() for c in text) > 0.95 * len(text):
                what = f"text ({text[:40].strip()!r}...)"
        except UnicodeDecodeError:
            pass
    if what is None:
        what = f"unknown binary data (starting {head[:8].hex(' ')})"
    return f"the input is not an image but {what}; {advice}"


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not lose the photo
        return 1


def _to_rgb(im: Image.Image, info: dict) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """``(pixels (H, W, 3), alpha (H, W) | None, info)`` for a loaded Pillow image."""
    mode = im.mode
    if mode == "CMYK":
        return _cmyk_to_rgb(im, info.get("icc_profile")), None, info
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im)
        grey = np.clip(grey, 0, 65535).astype(np.uint16)
        return np.repeat(grey[..., None], 3, axis=2), None, info
    if mode == "F":
        raise UnsupportedImageError(
            "floating-point images are not supported; export it as an 8- or 16-bit image"
        )
    if mode in ("P", "PA"):
        if im.palette is None:
            raise ImageError("the image's palette is missing: it is corrupt; export it again")
        has_alpha = mode == "PA" or "transparency" in im.info or im.palette.mode == "RGBA"
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("La", "RGBa"):
        im = im.convert("RGBA")
    elif mode in ("LAB", "HSV", "YCbCr"):
        im = im.convert("RGB")
    elif mode == "RGBX":
        im = im.convert("RGB")
    arr = np.asarray(im)
    if im.mode == "L":
        return np.repeat(arr[..., None], 3, axis=2), None, info
    if im.mode == "LA":
        return np.repeat(arr[..., :1], 3, axis=2), arr[..., 1].copy(), info
    if im.mode == "RGBA":
        return np.ascontiguousarray(arr[..., :3]), arr[..., 3].copy(), info
    if im.mode == "RGB":
        return np.ascontiguousarray(arr), None, info
    raise UnsupportedImageError(
        f"images in Pillow mode {mode!r} are not supported; export it as RGB JPEG or PNG"
    )


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> np.ndarray:
    """CMYK to sRGB through the embedded profile when there is one, else Pillow's formula."""
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            rgb = ImageCms.profileToProfile(
                im, src, dst, outputMode="RGB", renderingIntent=ImageCms.Intent.PERCEPTUAL
            )
            if rgb is not None:
                return np.asarray(rgb)
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile: fall back to the plain conversion
    return np.asarray(im.convert("RGB"))


def _is_wide_png(im: Image.Image) -> bool:
    """A 16-bit-per-channel RGB or RGBA PNG (which Pillow's modes cannot hold)."""
    if im.format != "PNG" or im.mode not in ("RGB", "RGBA") or len(im.tile) != 1:
        return False
    return _tile_rawmode(im.tile[0]) in ("RGB;16B", "RGBA;16B")


def _tile_rawmode(tile: object) -> str | None:
    args = tile.args if hasattr(tile, "args") else tile[3]
    return args if isinstance(args, str) else (args[0] if args else None)


def _load_wide_png(
    data: bytes, im: Image.Image, cancel: threading.Event | None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Decode a 48/64-bit PNG in full precision: Pillow's zip decoder unfilters the rows
    (with the right 6 or 8 bytes per pixel) and its 16-bit unpackers keep one byte of
    each sample: ``;16B`` the high byte, ``;16L`` read on big-endian data the low one.
    Returns ``(pixels, alpha or None, EXIF orientation)``.

    The two halves are merged in place, one decoded at a time, so that the peak is about
    twice the 16-bit result rather than four times.
    """
    wide: np.ndarray | None = None
    for order in ("B", "L"):
        one = Image.open(_Source(data, cancel), formats=("PNG",))
        tile = one.tile[0]
        raw = f"{one.mode};16{order}"
        args = raw if isinstance(tile.args, str) else (raw, *tuple(tile.args)[1:])
        one.tile = [tile._replace(args=args)]
        one.decodermaxblock = _BLOCK
        one.load()
        half = np.asarray(one)
        if wide is None:
            wide = half.astype(np.uint16)
            wide <<= 8
        else:
            wide |= half
        orientation = _orientation(one)
        del half
        one.close()
    assert wide is not None
    alpha = wide[..., 3].copy() if im.mode == "RGBA" else None
    return np.ascontiguousarray(wide[..., :3]), alpha, orientation


def _jpeg_subsampling(im: Image.Image) -> int | None:
    try:
        from PIL import JpegImagePlugin

        value = JpegImagePlugin.get_sampling(im)
    except Exception:  # noqa: BLE001
        return None
    return value if value in (0, 1, 2) else None


def _webp_lossless(data: bytes) -> bool:
    """Whether a WebP file holds a lossless (VP8L) bitstream."""
    if data[12:16] == b"VP8L":
        return True
    return data[12:16] == b"VP8X" and b"VP8L" in data[:4096] and b"VP8 " not in data[:4096]


def ijg_quantization(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """The libjpeg luminance and chrominance tables ``(64,)`` for ``quality`` 1..100."""
    q = min(max(int(quality), 1), 100)
    scale = 5000 / q if q < 50 else 200 - 2 * q
    tables = []
    for base in (_IJG_LUMA, _IJG_CHROMA):
        tables.append(np.clip(np.floor((base * scale + 50) / 100), 1, 255))
    return tables[0], tables[1]


def estimate_jpeg_quality(quantization: dict[int, list[int]]) -> int | None:
    """The libjpeg quality 1..100 whose tables best match ``quantization`` (Pillow's
    ``Image.quantization``: table id -> 64 values in natural order), in log ratio so that
    non-libjpeg tables (cameras, Photoshop) map to the quality of similar coarseness."""
    if not quantization or 0 not in quantization:
        return None
    # A 0 in a table (invalid, but damaged files have them) counts as 1, which has a log.
    luma = np.maximum(np.asarray(quantization[0], dtype=np.float64), 1)
    chroma = None
    if 1 in quantization:
        chroma = np.maximum(np.asarray(quantization[1], dtype=np.float64), 1)
    if luma.size != 64 or (chroma is not None and chroma.size != 64):
        return None
    best, best_err = None, math.inf
    for q in range(1, 101):
        ref_luma, ref_chroma = ijg_quantization(q)
        err = np.abs(np.log(luma) - np.log(ref_luma)).mean()
        if chroma is not None:
            err = (err + np.abs(np.log(chroma) - np.log(ref_chroma)).mean()) / 2
        if err < best_err - 1e-12:
            best, best_err = q, err
    return best


def _estimate_jpeg_quality(im: Image.Image) -> int | None:
    table = getattr(im, "quantization", None)
    try:
        return estimate_jpeg_quality(table) if table else None
    except (ValueError, TypeError):
        return None


# -- encoding -------------------------------------------------------------------------


def output_format(source: DecodedImage, format: str = "same") -> str:
    """The Pillow format name an :func:`encode_image` call writes."""
    f = format.lower()
    if f not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {format!r}; choose one of same, png, jpeg, webp")
    if f != "same":
        return {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}[f]
    src = source.format
    if src in ("JPEG", "MPO"):
        return "JPEG"
    if src in ("PNG", "WEBP", "BMP", "TIFF"):
        return src
    if src == "DIB":
        return "BMP"
    if src == "GIF" or source.alpha is not None:
        return "PNG"
    return "JPEG"  # HEIF, AVIF: lossy photos


def encode_image(
    pixels: np.ndarray,
    source: DecodedImage,
    *,
    format: str = "same",
    quality: int | None = None,
    cancel: threading.Event | None = None,
) -> tuple[bytes, str]:
    """Encode ``pixels`` ``(H, W, 3)`` RGB (uint8, or uint16 for 16-bit sources) with
    ``source``'s alpha and ICC profile; returns ``(bytes, MIME type)``.

    ``format``: ``"same"`` (see :func:`output_format`), ``"png"``, ``"jpeg"``, ``"webp"``.
    ``quality`` (1..100) for JPEG and lossy WebP; by default the source's estimated JPEG
    quality clamped to :data:`JPEG_QUALITY_RANGE`, else 92 (JPEG) or 90 (WebP). JPEG has
    no alpha: a transparent source is composited onto white. No EXIF is ever written.
    Raises :class:`~cloak_core.errors.CancelledError` once ``cancel`` is set (checked at
    every block of output: PNG stops part way, an optimised JPEG after its first pass).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype not in (np.uint8, np.uint16):
        raise UsageError(
            f"encode_image takes (H, W, 3) uint8 or uint16 RGB, got {pixels.shape} {pixels.dtype}"
        )
    alpha = source.alpha
    if alpha is not None and alpha.shape != pixels.shape[:2]:
        raise UsageError(
            f"the pixels are {pixels.shape[1]}x{pixels.shape[0]} but the source's alpha is "
            f"{alpha.shape[1]}x{alpha.shape[0]}; keep the image size unchanged"
        )
    if quality is not None and not 1 <= int(quality) <= 100:
        raise UsageError(f"quality must be 1..100, got {quality}")
    fmt = output_format(source, format)
    if fmt == "PNG" and pixels.dtype == np.uint16:
        return _png16(pixels, _match_depth(alpha, np.uint16), source, cancel), MIME["PNG"]
    rgb8 = _to_8bit(pixels)
    alpha8 = _to_8bit(alpha) if alpha is not None else None
    grey = source.grey
    if grey:
        img = Image.fromarray(_luma(rgb8), "L")
    else:
        img = Image.fromarray(rgb8, "RGB")
    if fmt == "JPEG" and alpha8 is not None:
        img = _on_white(img, alpha8)
    elif alpha8 is not None:
        img.putalpha(Image.fromarray(alpha8, "L"))
    if fmt == "WEBP" and img.mode in ("L", "LA"):
        img = img.convert("RGBA" if img.mode == "LA" else "RGB")
    if fmt == "TIFF" and pixels.dtype == np.uint16 and grey and alpha is None:
        img = Image.fromarray(_luma(pixels).astype(np.uint16))
    kwargs: dict = {}
    if source.icc_profile:
        kwargs["icc_profile"] = source.icc_profile
    if fmt == "JPEG":
        q = quality or _source_quality(source)
        kwargs.update(quality=int(q), optimize=True)
        if source.subsampling is not None and img.mode != "L":
            kwargs["subsampling"] = source.subsampling
    elif fmt == "WEBP":
        lossless = quality is None and source.format == "WEBP" and source.lossless
        if lossless:
            kwargs.update(lossless=True, quality=100, exact=True)
        else:
            kwargs.update(quality=int(quality or DEFAULT_WEBP_QUALITY))
    elif fmt == "PNG":
        kwargs.update(optimize=False, compress_level=6)
    elif fmt == "TIFF":
        kwargs.update(compression="tiff_deflate")
    buf = _Sink(cancel)
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue(), MIME[fmt]


def _source_quality(source: DecodedImage) -> int:
    if source.quality is None:
        return DEFAULT_JPEG_QUALITY
    lo, hi = JPEG_QUALITY_RANGE
    return min(max(source.quality, lo), hi)


def _to_8bit(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _match_depth(alpha: np.ndarray | None, dtype: type) -> np.ndarray | None:
    if alpha is None or alpha.dtype == dtype:
        return alpha
    return alpha.astype(np.uint16) * 257


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of ``(H, W, 3)`` (Pillow's "L" conversion), same dtype."""
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(np.rint(y), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)


def _on_white(img: Image.Image, alpha: np.ndarray) -> Image.Image:
    """Composite onto white, for formats without alpha."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    out = np.rint(arr * a + 255.0 * (1.0 - a)).astype(np.uint8)
    return Image.fromarray(out[..., 0] if out.shape[2] == 1 else out, img.mode)


def _png16(
    pixels: np.ndarray,
    alpha: np.ndarray | None,
    source: DecodedImage,
    cancel: threading.Event | None = None,
) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA) with the source's ICC profile.

    Pillow writes no 16-bit colour PNG, so rows are written here: filter "Up" (the
    difference with the row above, bytewise), deflate, the chunks with their CRCs.
    ``cancel`` is checked between blocks of rows.
    """
    colour = _luma(pixels)[..., None] if source.grey else pixels
    colour_type = 0 if source.grey else 2
    c = colour.shape[2] + (alpha is not None)
    if alpha is not None:
        colour_type += 4
    h, w = pixels.shape[:2]
    # Rows of big-endian samples, filled in place (no (H, W, C) temporaries).
    rows = np.empty((h, w * c * 2), np.uint8)
    samples = rows.view(">u2").reshape(h, w, c)
    samples[..., : colour.shape[2]] = colour
    if alpha is not None:
        samples[..., -1] = alpha
    del samples

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(body, zlib.crc32(kind)) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    out = [
        b"\x89PNG\r\n\x1a\n",
        chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)),
    ]
    if source.icc_profile:
        out.append(chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(source.icc_profile)))
    deflate = zlib.compressobj(6)
    step = max(1, _BLOCK * 64 // rows.shape[1])  # rows per block: about 256 KB
    parts = []
    for y in range(0, h, step):
        _check_cancel(cancel, "encoding")
        block = rows[y : y + step]
        filtered = np.empty((len(block), 1 + rows.shape[1]), np.uint8)
        filtered[:, 0] = 2  # filter type 2, "Up": the bytewise difference with the row above
        prev = rows[y - 1 : y + len(block) - 1] if y else np.concatenate([rows[:1] * 0, block[:-1]])
        np.subtract(block, prev, out=filtered[:, 1:])  # uint8 wraps modulo 256, as PNG's does
        parts.append(deflate.compress(filtered))
    parts.append(deflate.flush())
    out.append(chunk(b"IDAT", b"".join(parts)))
    out.append(chunk(b"IEND", b""))
    return b"".join(out)
