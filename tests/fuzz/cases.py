"""A seeded generator of malformed and hostile images.

Seeds are real photos (``shared/data/photos``, as they are) and small re-encodings of a few
of them in every format and mode FaceCloak reads. Each case is a seed put through one
mutation, picked at random with fixed weights: blind ones (truncation, bit flips, byte
overwrites, inserted, deleted or repeated ranges, splices of two files) and ones that know
the format (a JPEG's frame size, segment lengths, repeated scans; a PNG's header, chunk
lengths, CRCs, compression bombs; GIF, BMP, TIFF and WebP header fields), plus the crafted
files of :mod:`.hostile` with random parameters. The same ``(seed, index)`` always gives
the same bytes.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import hostile

Mutation = Callable[[random.Random, bytes, "Seeds"], bytes]

# A little over the daemon's 40 MB body limit, so that a few cases test it too.
MAX_CASE_BYTES = 42 * 2**20

_INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
_HUGE = (0, 1, 0x7FFF, 0x8000, 0xFFFF, 65_500, 100_000, 0x7FFFFFFF, 0xFFFFFFFF)


@dataclass(frozen=True)
class Case:
    """One generated file: its number, the mutation and seed it came from, its bytes."""

    index: int
    mutation: str
    seed: str
    data: bytes


class Seeds:
    """The seed files, by name, in a fixed order."""

    def __init__(self, photos_dir: Path | None, *, photos: bool = True) -> None:
        self.files: dict[str, bytes] = {}
        sources = sorted(photos_dir.iterdir()) if photos_dir is not None else []
        if photos:
            for path in sources:
                self.files[path.name] = path.read_bytes()
        small = [p for p in sources if p.name in ("obama_small.jpg", "lin-manuel-miranda.png")]
        for path in small or [None]:
            self.files.update(_variants(path))

    def names(self) -> list[str]:
        return list(self.files)


def _variants(path: Path | None) -> dict[str, bytes]:
    """Small re-encodings of one photo (or of generated colours) in every readable format."""
    if path is not None:
        im = Image.open(path)
        im.thumbnail((160, 160))
        stem = path.stem
    else:
        rng = np.random.default_rng(0)
        im = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
        stem = "noise"
    rgb, rgba = im.convert("RGB"), im.convert("RGBA")

    def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **kwargs)
        return buf.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    wide = np.asarray(rgba).astype(np.uint16) * 257
    out = {
        "jpeg": save(rgb, "JPEG", quality=90),
        "jpeg-progressive": save(rgb, "JPEG", quality=85, progressive=True),
        "jpeg-444-exif": save(rgb, "JPEG", subsampling=0, exif=exif.tobytes()),
        "jpeg-grey": save(rgb.convert("L"), "JPEG"),
        "jpeg-cmyk": save(rgb.convert("CMYK"), "JPEG"),
        "png": save(rgb, "PNG"),
        "png-rgba": save(rgba, "PNG"),
        "png-palette": save(rgba.convert("P"), "PNG", transparency=0),
        "png-grey": save(rgb.convert("L"), "PNG"),
        "png-16bit-rgba": _png16(wide),
        "webp": save(rgb, "WEBP", quality=80),
        "webp-lossless": save(rgba, "WEBP", lossless=True),
        "gif": save(rgb.convert("P"), "GIF"),
        "bmp": save(rgb, "BMP"),
        "bmp-palette": save(rgb.convert("P"), "BMP"),
        "tiff": save(rgb, "TIFF"),
        "tiff-deflate": save(rgba, "TIFF", compression="tiff_deflate"),
        "tiff-lzw": save(rgb, "TIFF", compression="tiff_lzw"),
        "avif": save(rgb, "AVIF", quality=60),
    }
    return {f"{stem}.{name}": data for name, data in out.items()}


def _png16(pixels: np.ndarray) -> bytes:
    ihdr = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, 6, 0, 0, 0)
    rows = pixels.astype(">u2").reshape(pixels.shape[0], -1).view(np.uint8)
    raw = np.concatenate([np.zeros((rows.shape[0], 1), np.uint8), rows], axis=1).tobytes()
    return (
        b"\x89PNG\r\n\x1a\n"
        + hostile.png_chunk(b"IHDR", ihdr)
        + hostile.png_chunk(b"IDAT", zlib.compress(raw))
        + hostile.png_chunk(b"IEND", b"")
    )


@functools.lru_cache(maxsize=16)
def _deflated_zeros(size: int) -> bytes:
    return zlib.compress(b"\0" * size, 9)


# -- blind mutations ---------------------------------------------------------------------


def truncate(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    if rng.random() < 0.5:
        return data[: rng.randrange(len(data))]
    return data[: max(0, len(data) - rng.randint(1, 64))]


def bit_flips(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    out = bytearray(data)
    # Headers matter most: half the flips land in the first 512 bytes.
    for _ in range(rng.randint(1, 32)):
        at = rng.randrange(min(len(out), 512)) if rng.random() < 0.5 else rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        at = rng.randrange(min(len(out), 256)) if rng.random() < 0.5 else rng.randrange(len(out))
        out[at] = rng.choice(_INTERESTING) if rng.random() < 0.7 else rng.randrange(256)
    return bytes(out)


def insert(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    at = rng.randrange(len(data) + 1)
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 256)))
    return data[:at] + junk + data[at:]


def delete(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    start = rng.randrange(len(data))
    return data[:start] + data[start + rng.randint(1, 4096) :]


def repeat(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    start = rng.randrange(len(data))
    piece = data[start : start + rng.randint(1, 256)]
    return data[:start] + piece * rng.randint(2, 2000) + data[start:]


def splice(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    other = seeds.files[rng.choice(seeds.names())]
    return data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]


# -- mutations that know the format ------------------------------------------------------


def jpeg_fields(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    if data[:2] != b"\xff\xd8":
        return bit_flips(rng, data, seeds)
    segments = hostile.jpeg_segments_lenient(data)
    choice = rng.randrange(6)
    out = []
    scans = [s for m, s in segments if m == 0xDA]
    for marker, seg in segments:
        if choice == 0 and 0xC0 <= marker <= 0xC2 and len(seg) >= 9:  # frame size
            h, w = rng.choice(_HUGE) & 0xFFFF, rng.choice(_HUGE) & 0xFFFF
            seg = seg[:5] + struct.pack(">HH", h, w) + seg[9:]
        elif choice == 1 and len(seg) >= 4 and marker not in (0xD8, 0xD9) and rng.random() < 0.3:
            seg = seg[:2] + struct.pack(">H", rng.choice((0, 1, 2, 3, 0xFFFF))) + seg[4:]
        elif choice == 2 and marker == 0xDA and rng.random() < 0.5:  # scan header fields
            body = bytearray(seg)
            for _ in range(3):
                at = rng.randrange(4, min(len(body), 14))
                body[at] = rng.choice(_INTERESTING) if rng.random() < 0.5 else rng.randrange(256)
            seg = bytes(body)
        elif choice == 3 and marker in (0xC4, 0xDB):  # Huffman and quantization tables
            body = bytearray(seg)
            for _ in range(rng.randint(1, 8)):
                body[rng.randrange(4, len(body))] = rng.randrange(256) if len(body) > 4 else 0
            seg = bytes(body)
        out.append(seg)
        if choice == 4 and marker == 0xDA and scans:  # repeated scans
            out.append(rng.choice(scans)[: rng.choice((14, 16, 64, 10**9))] * rng.randint(1, 400))
        if choice == 5 and marker == 0xD8:  # many segments
            kind = rng.choice((0xFE, 0xE1, 0xE2, 0xED, 0xDD))
            out.append(bytes([0xFF, kind, 0, 4, 0, 0]) * rng.randint(1, 3000))
    return b"".join(out)


def png_fields(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return bit_flips(rng, data, seeds)
    chunks = []
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    choice = rng.randrange(6)
    out = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        if kind == b"IHDR" and len(body) == 13 and choice in (0, 1):
            w, h, depth, colour, comp, filt, lace = struct.unpack(">IIBBBBB", body)
            if choice == 0:
                w, h = rng.choice(_HUGE), rng.choice(_HUGE)
            else:
                depth = rng.choice((1, 2, 4, 8, 16, 0, 3, 32))
                colour = rng.choice((0, 2, 3, 4, 6, 5))
                comp, filt, lace = rng.choice((0, 1)), rng.choice((0, 5)), rng.choice((0, 1, 2))
            body = struct.pack(">IIBBBBB", w, h, depth, colour, comp, filt, lace)
        if choice == 2 and rng.random() < 0.3:  # a wrong length, or a wrong CRC
            bad = struct.pack(">I", rng.choice(_HUGE)) + kind + body + b"\0\0\0\0"
            out.append(bad)
            continue
        out.append(hostile.png_chunk(kind, body))
        if kind == b"IHDR" and choice == 3:  # text and ICC bombs, many chunks
            bomb = zlib.compress(b"x" * rng.choice((10**6, 10**7)), 9)
            extra = rng.choice(
                (
                    hostile.png_chunk(b"zTXt", b"k\x00\x00" + bomb),
                    hostile.png_chunk(b"iCCP", b"icc\x00\x00" + bomb),
                    hostile.png_chunk(b"tEXt", b"k\x00v") * rng.randint(1, 3000),
                )
            )
            out.append(extra)
        if kind == b"IHDR" and choice == 4:  # an image data bomb within the pixel limit
            w, h = rng.choice(((7000, 7000), (10_000, 5_000), (50_000, 1000), (3000, 3000)))
            depth, colour = rng.choice(((8, 0), (8, 2), (16, 6), (1, 0), (8, 3)))
            ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
            out[-1] = hostile.png_chunk(b"IHDR", ihdr)
            row = (w * {0: 1, 2: 3, 3: 1, 6: 4}[colour] * depth + 7) // 8 + 1
            out.append(hostile.png_chunk(b"IDAT", _deflated_zeros(min(row * h, 64 * 2**20))))
            out.append(hostile.png_chunk(b"IEND", b""))
            return b"".join(out)
        if kind == b"IDAT" and choice == 5:  # the image data in tiny chunks
            out[-1] = b"".join(
                hostile.png_chunk(b"IDAT", body[i : i + 1]) for i in range(0, len(body), 1)
            )
    return b"".join(out)


def other_fields(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    """GIF, BMP, TIFF and WebP header fields set to extreme values."""
    out = bytearray(data)

    def put(fmt: str, at: int, value: int) -> None:
        size = struct.calcsize(fmt)
        if at + size <= len(out):
            mask = (1 << (8 * size)) - 1
            out[at : at + size] = struct.pack(fmt, value & mask if fmt[-1].isupper() else value)

    if data[:3] == b"GIF":
        for at in rng.sample((6, 8, 10, 11, 13 + 3 * 256 + 5), k=2):
            put("<H", at, rng.choice(_HUGE))
        if rng.random() < 0.3:  # LZW minimum code size
            at = data.find(b"\x2c")
            put("B", at + 10 if at > 0 else 0, rng.choice((0, 1, 11, 12, 255)))
    elif data[:2] == b"BM":
        field = rng.choice((("<i", 18), ("<i", 22), ("<H", 28), ("<I", 30), ("<I", 10), ("<I", 14)))
        put(field[0], field[1], rng.choice((-(2**31), -1, 0, 1, 0xFFFF, 2**31 - 1, 40, 4, 8, 32)))
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack(order + "I", data[4:8])[0]
        if rng.random() < 0.2:
            put(order + "I", 4, rng.choice((0, 4, 8, len(data), 0xFFFFFFFF)))  # IFD offset
        elif ifd + 2 <= len(data):
            count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
            for _ in range(rng.randint(1, 4)):
                entry = ifd + 2 + 12 * rng.randrange(max(count, 1))
                part = rng.choice((("H", 2), ("I", 4), ("I", 8)))
                put(order + part[0], entry + part[1], rng.choice(_HUGE))
            if rng.random() < 0.3:  # the next IFD points back to this one: a loop
                put(order + "I", ifd + 2 + 12 * count, ifd)
    elif data[:4] == b"RIFF":
        at = rng.choice((4, 16, 26, 28, 24, 27))
        put("<I" if at in (4, 16) else "<H", at, rng.choice(_HUGE))
    else:
        return overwrite(rng, data, seeds)
    return bytes(out)


def crafted(rng: random.Random, data: bytes, seeds: Seeds) -> bytes:
    """One of :mod:`.hostile`'s files with random parameters (the seed is not used)."""
    kind = rng.randrange(5)
    if kind == 0:
        size = rng.choice(((7000, 7000), (3000, 2000), (64, 64), (20_000, 2_000)))
        return hostile.many_scans_jpeg(*size, rng.choice((5, 50, 95, 200, 1000, 5000)))
    if kind == 1:
        return hostile.jpeg_with_segments(rng.choice((10, 900, 1200, 50_000)))
    if kind == 2:
        kind_ = rng.choice((b"tEXt", b"abCd", b"zTXt", b"sPLT"))
        return hostile.png_with_chunks(rng.choice((10, 900, 1200, 50_000)), kind=kind_)
    if kind == 3:
        return hostile.tiff_with_strips(rng.choice((1, 5, 64)), rng.choice((10, 5000, 70_000)))
    w, h = rng.choice(((7000, 7000), (5000, 5000), (10_000, 5_000), (100_000, 100_000)))
    depth, colour = rng.choice(((16, 6), (16, 2), (16, 0), (8, 6), (8, 2), (16, 4)))
    return hostile.png_header_only(w, h, bit_depth=depth, colour_type=colour)


MUTATIONS: dict[str, tuple[float, Mutation]] = {
    # name: (weight, mutation)
    "truncate": (1.5, truncate),
    "bit flips": (2.0, bit_flips),
    "overwrite": (1.5, overwrite),
    "insert": (0.5, insert),
    "delete": (0.5, delete),
    "repeat": (0.5, repeat),
    "splice": (0.5, splice),
    "jpeg fields": (1.5, jpeg_fields),
    "png fields": (1.0, png_fields),
    "gif/bmp/tiff/webp fields": (1.0, other_fields),
    "crafted": (0.5, crafted),
}

_FORMAT_AWARE = {"jpeg fields": (b"\xff\xd8",), "png fields": (b"\x89PNG",)}


def generate(seeds: Seeds, count: int, *, seed: int = 0, start: int = 0) -> Iterator[Case]:
    """Cases ``start`` .. ``start + count - 1`` of the sequence that ``seed`` fixes."""
    names = seeds.names()
    kinds = list(MUTATIONS)
    weights = [MUTATIONS[k][0] for k in kinds]
    for index in range(start, start + count):
        rng = random.Random(f"{seed}:{index}")
        kind = rng.choices(kinds, weights)[0]
        prefixes = _FORMAT_AWARE.get(kind)
        pool = [n for n in names if not prefixes or seeds.files[n].startswith(prefixes)]
        name = rng.choice(pool)
        data = MUTATIONS[kind][1](rng, seeds.files[name], seeds)
        yield Case(index=index, mutation=kind, seed=name, data=data[:MAX_CASE_BYTES])
