"""Crafted hostile images, built from real encoders' output and edited by hand.

Each function returns the bytes of one file; the files are valid enough that Pillow opens
them, and each costs a decoder more than its pixels say (or claims more memory than it
holds). Shared by the tests and the fuzzer.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """``(marker, bytes)`` for each segment of a JPEG written by Pillow; a scan's segment
    holds its header and its entropy-coded data."""
    out = [(0xD8, data[:2])]
    i = 2
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            out.append((marker, data[i : i + 2]))
            break
        end = i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, data[i:end]))
        i = end
    return out


def jpeg_segments_lenient(data: bytes) -> list[tuple[int, bytes]]:
    """``(marker, bytes)`` for each segment of any JPEG, damaged or not: markers without a
    length on their own, a scan with its entropy-coded data (restart markers included);
    whatever follows the walk's end is one last piece (marker -1)."""
    out: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while pos + 1 < end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD8, 0xD9, 0x01) or 0xD0 <= marker <= 0xD7:
            out.append((marker, data[pos : pos + 2]))
            pos += 2
            continue
        if marker == 0xFF:
            out.append((marker, data[pos : pos + 1]))
            pos += 1
            continue
        if pos + 4 > end:
            break
        stop = min(end, pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0])
        if marker == 0xDA:
            while stop + 1 < end and not (
                data[stop] == 0xFF and data[stop + 1] not in (0x00, 0xFF, *range(0xD0, 0xD8))
            ):
                stop += 1
            stop = min(stop, end) if stop + 1 < end else end
        out.append((marker, data[pos:stop]))
        pos = max(stop, pos + 2)
    if pos < end:
        out.append((-1, data[pos:]))
    return out


def progressive_jpeg(width: int, height: int, *, seed: int = 0, subsampling: int = 2) -> bytes:
    """A real progressive JPEG of smooth random colours (libjpeg's 10 scans)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85, progressive=True, subsampling=subsampling)
    return buf.getvalue()


def many_scans_jpeg(width: int, height: int, scans: int, *, seed: int = 0) -> bytes:
    """A progressive JPEG of ``width`` x ``height`` (4:4:4) with ``scans`` extra scans.

    A 64x64 progressive JPEG written by Pillow, its frame header edited to claim the size
    asked, then its first scan (DC of the three components) repeated without data: each
    repeat is a 14-byte segment that makes libjpeg pass over every block of the image
    again. 1,000 scans at 7000 x 7000 take about 10 s to decode.
    """
    small = progressive_jpeg(64, 64, seed=seed, subsampling=0)
    parts, first_scan = [], None
    for marker, segment in jpeg_segments(small):
        if marker == 0xC2:  # SOF2: precision, height, width, ...
            segment = segment[:5] + struct.pack(">HH", height, width) + segment[9:]
        if marker == 0xDA and first_scan is None:
            first_scan = segment[: 2 + struct.unpack(">H", segment[2:4])[0]]
        if marker != 0xD9:
            parts.append(segment)
    assert first_scan is not None
    return b"".join(parts) + first_scan * scans + b"\xff\xd9"


def jpeg_with_segments(count: int, *, marker: int = 0xFE) -> bytes:
    """A small real JPEG with ``count`` empty segments (comments by default) after SOI."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 80, 40)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + bytes([0xFF, marker, 0, 2]) * count + data[2:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    crc = zlib.crc32(body, zlib.crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_header_only(width: int, height: int, *, bit_depth: int = 16, colour_type: int = 6) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (16-bit RGBA by default) followed by
    a few bytes of image data: small to send, huge if decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def png_with_chunks(count: int, *, kind: bytes = b"tEXt") -> bytes:
    """A small real PNG with ``count`` tiny ancillary chunks before its image data."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 80, 120)).save(buf, "PNG")
    data = buf.getvalue()
    ihdr_end = 8 + 25
    body = b"k\x00v" if kind == b"tEXt" else b""
    return data[:ihdr_end] + png_chunk(kind, body) * count + data[ihdr_end:]


def tiff_with_strips(width: int, strips: int) -> bytes:
    """An uncompressed greyscale TIFF of ``width`` x ``strips`` cut in one-row strips, all
    pointing at the same bytes: a list of ``strips`` offsets Pillow turns into tiles."""
    entries = 9
    data_at = 8 + 2 + 12 * entries + 4
    offsets = struct.pack(f"<{strips}I", *([data_at] * strips))
    counts = struct.pack(f"<{strips}I", *([width] * strips))
    offsets_at = data_at + 16
    tags = [
        (256, 4, 1, width),  # ImageWidth
        (257, 4, 1, strips),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # Photometric: black is zero
        (273, 4, strips, offsets_at),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, 1),  # RowsPerStrip
        (279, 4, strips, offsets_at + len(offsets)),  # StripByteCounts
    ]
    ifd = struct.pack("<H", entries) + b"".join(struct.pack("<HHII", *t) for t in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 4 + b"\x80" * 16 + offsets + counts
