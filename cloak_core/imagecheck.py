"""Bounds on a decoder's work, checked on the encoded bytes before Pillow parses them.

The pixel limit bounds the size of a decoded image, not the work spent getting there.
Some files cost far more than their pixels, in code that cannot be interrupted:

- a progressive JPEG's every scan is a pass over all of the image's blocks, and a scan
  can be a dozen bytes: 1,000 scans of a 49-megapixel image take about 10 s to decode
  from a 15 KB file (libjpeg-turbo, one core). Encoders write about 10 (libjpeg's
  progressive script: 10 for colour, 6 for greyscale; mozjpeg about the same);
- Pillow reads a JPEG's segments before its first scan, and a PNG's chunks, one by one in
  Python, and a TIFF's strips or tiles into a list: a 4 MB JPEG of a million empty
  comments takes 2 s to open, a 32 MB TIFF of 4 million one-row strips 9 s, before any
  pixel is decoded, and a PNG's image data in 1-byte chunks about 3 s per million. Bytes
  that belong to no segment before a JPEG's first scan it skips one at a time: 0.3 s for
  the 700 KB of a photo whose first segment's length was damaged.

:func:`check_structure` walks the file's markers, chunks or directory with no decoding
and refuses such a file (:class:`~cloak_core.errors.ImageTooLargeError`) at a cost
bounded by the limits below, not by the file. The limits are far above what cameras,
phones, editors and encoders write.
"""

from __future__ import annotations

import re
import struct

from cloak_core.errors import ImageError, ImageTooLargeError

# Scans of a JPEG (SOS segments): encoders write 1 (sequential) to about 10 (progressive).
MAX_JPEG_SCANS = 100
# Segments of a JPEG with a length (APPn, COM, DQT, DHT, SOF, SOS, ...): photos have 10-40.
MAX_JPEG_SEGMENTS = 1000
# Bytes that are not segments before a JPEG's first scan: none in a sound file (Pillow steps
# over them one at a time, in Python).
MAX_JPEG_GARBAGE = 64 * 1024
# Chunks of a PNG before its image data (IHDR, PLTE, text, ICC, EXIF, ...): usually < 20.
MAX_PNG_CHUNKS_BEFORE_DATA = 1000
# Chunks of a PNG in all: libpng writes image data in chunks of 8 KB (5,000 for 40 MB).
MAX_PNG_CHUNKS = 100_000
# Strips or tiles of a TIFF: a 50-megapixel photo in one-row strips has about 6,000.
MAX_TIFF_BLOCKS = 65_536
# Tags in a TIFF's first directory: photos have 10 to 50 (Pillow reads each in Python).
MAX_TIFF_TAGS = 1000

# A JPEG marker inside entropy-coded data: 0xFF followed by anything but a stuffed zero,
# a restart marker (0xD0-0xD7) or another 0xFF (fill).
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_STANDALONE = frozenset({0x01, 0xD8})  # TEM, SOI: no length


def check_structure(data: bytes) -> None:
    """Refuse ``data`` if walking its structure shows more decoder work than the limits
    allow (JPEG scans or segments, PNG chunks before the image data, TIFF strips/tiles).

    Damaged beyond what a decoder should walk through (a JPEG with more than
    :data:`MAX_JPEG_GARBAGE` bytes outside its segments before the image data, a TIFF
    directory of more than :data:`MAX_TIFF_TAGS` tags):
    :class:`~cloak_core.errors.ImageError`. Other formats, and damaged files whose structure
    cannot be walked, pass: the decoder reports what is wrong with them. Cost: at most a
    few thousand steps in Python, plus one pass of a compiled regex over a JPEG.
    """
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg(data)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        _check_tiff(data)


def jpeg_scans(data: bytes, *, stop_after: int = MAX_JPEG_SCANS) -> int:
    """The number of scans of the first JPEG image in ``data`` (up to its EOI), counting
    no further than ``stop_after + 1``."""
    return _walk_jpeg(data, stop_after, MAX_JPEG_SEGMENTS)[0]


def _walk_jpeg(data: bytes, max_scans: int, max_segments: int) -> tuple[int, int, int]:
    """``(scans, segments, garbage)`` of the first image, each counted up to one past its
    limit; ``garbage``: bytes outside any segment before the first scan.

    Every step of the loop is a segment (counted, so the loop is bounded) found by a
    compiled regex's search, which crosses entropy-coded data, fill bytes and garbage.
    """
    scans = segments = garbage = 0
    pos, end = 2, len(data)
    while pos + 1 < end:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            break
        at = found.start()
        if scans == 0:
            garbage += at - pos
            if garbage > MAX_JPEG_GARBAGE:
                break
        marker = data[at + 1]
        if marker == 0xD9:  # EOI: the rest (an MPO's other pictures) is not decoded
            break
        segments += 1
        if marker in _STANDALONE:
            pos = at + 2
        elif at + 4 > end:
            break
        else:
            scans += marker == 0xDA
            pos = at + 2 + max((data[at + 2] << 8) | data[at + 3], 2)
        if scans > max_scans or segments > max_segments:
            break
    return scans, segments, garbage


def _check_jpeg(data: bytes) -> None:
    scans, segments, garbage = _walk_jpeg(data, MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS)
    if garbage > MAX_JPEG_GARBAGE:
        raise ImageError(
            f"this JPEG is damaged: more than {MAX_JPEG_GARBAGE // 1024} KB of it before the "
            f"image data belong to no segment; download or export it again"
        )
    if scans > MAX_JPEG_SCANS:
        raise ImageTooLargeError(
            f"this JPEG has more than {MAX_JPEG_SCANS} scans (photos have 1 to about 10); "
            f"each scan is a pass over the whole image, so it would take too long to decode: "
            f"export it again as a plain JPEG or PNG"
        )
    if segments > MAX_JPEG_SEGMENTS:
        raise ImageTooLargeError(
            f"this JPEG has more than {MAX_JPEG_SEGMENTS} segments (metadata blocks, "
            f"tables, scans; photos have a few dozen), too many to read: export it again"
        )


def _check_png(data: bytes) -> None:
    pos, end, chunks, before_data = 8, len(data), 0, True
    while pos + 8 <= end:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IEND":
            return
        if kind == b"IDAT":
            before_data = False
        chunks += 1
        if before_data and chunks > MAX_PNG_CHUNKS_BEFORE_DATA:
            raise ImageTooLargeError(
                f"this PNG has more than {MAX_PNG_CHUNKS_BEFORE_DATA} chunks before its "
                f"image data (images have a few), too many to read: export it again"
            )
        if chunks > MAX_PNG_CHUNKS:
            raise ImageTooLargeError(
                f"this PNG has more than {MAX_PNG_CHUNKS:,} chunks (images have a few "
                f"thousand at most), too many to read: export it again"
            )
        pos += 12 + length


def _check_tiff(data: bytes) -> None:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:
            (ifd,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, ifd)
            entry, first, size, fmt = 20, ifd + 8, 20, order + "HHQ"
        else:
            (ifd,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, ifd)
            entry, first, size, fmt = 12, ifd + 2, 12, order + "HHI"
    except struct.error:
        return  # the decoder says what is wrong
    if count > MAX_TIFF_TAGS:
        raise ImageError(
            f"this TIFF is damaged: its first directory claims {count:,} tags (photos have a "
            f"few dozen); download or export it again"
        )
    for k in range(count):
        at = first + k * entry
        if at + size > len(data):
            return
        tag, _, values = struct.unpack_from(fmt, data, at)
        if tag in (273, 324) and values > MAX_TIFF_BLOCKS:  # StripOffsets, TileOffsets
            what = "strips" if tag == 273 else "tiles"
            raise ImageTooLargeError(
                f"this TIFF is cut into {values:,} {what}, over the limit of "
                f"{MAX_TIFF_BLOCKS:,} (photos have a few thousand at most), too many to "
                f"read: export it again"
            )
