"""Bad input and limits: each answered with its documented JSON error, and the next image served."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from daemon_helpers import ReencodingProtector, auth, jpeg_bytes, pair, serve, with_changes
from fuzz.hostile import png_header_only
from PIL import Image


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_claiming(width: int, height: int) -> bytes:
    """A decompression bomb: a valid PNG header announcing ``width`` x ``height`` RGB pixels,
    followed by a few kilobytes of compressed zeros (1 MB of scanlines) and the end chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1_000_000, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def image_bytes(fmt: str, frames: int = 1) -> bytes:
    """A small real image in Pillow's ``fmt``, of ``frames`` frames (pages)."""
    first = Image.open(io.BytesIO(jpeg_bytes(64, 48)))
    images = [first.rotate(90 * i) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format=fmt, save_all=frames > 1, append_images=images[1:])
    return buf.getvalue()


# Images Pillow reads but FaceCloak does not: other formats, and several frames (all but
# the first would be lost).
UNREAD_IMAGES = {
    "PCX": image_bytes("PCX"),
    "ICO": image_bytes("ICO"),
    "TGA": image_bytes("TGA"),
    "animated GIF": image_bytes("GIF", frames=2),
    "animated PNG": image_bytes("PNG", frames=3),
    "animated WebP": image_bytes("WEBP", frames=2),
    "multi-page TIFF": image_bytes("TIFF", frames=2),
}

BAD_INPUTS = {
    # name: (body, content type, status, error code)
    "empty body": (b"", "image/jpeg", 400, "bad_image"),
    "truncated JPEG": (jpeg_bytes(256, 192)[:700], "image/jpeg", 400, "bad_image"),
    "random bytes": (bytes(range(256)) * 64, "image/png", 415, "unsupported_image"),
    "PNG claiming 100000x100000": (
        png_header_claiming(100_000, 100_000),
        "image/png",
        413,
        "too_large",
    ),
    "text as an image": (b"hello, I am not a photo\n" * 20, "image/jpeg", 415, "unsupported_image"),
    "PCX image": (UNREAD_IMAGES["PCX"], "image/x-pcx", 415, "unsupported_image"),
    "animated GIF": (UNREAD_IMAGES["animated GIF"], "image/gif", 415, "unsupported_image"),
}


@pytest.mark.parametrize("route", ["/v1/protect", "/v1/jobs"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
async def test_bad_input_is_refused_and_the_daemon_goes_on(config, name, route):
    body, content_type, status, code = BAD_INPUTS[name]
    good = jpeg_bytes(80, 60, seed=3)
    async with serve(config) as client:
        token = await pair(client, config)
        headers = {**auth(token), "Content-Type": content_type}
        resp = await client.post(route, data=body, headers=headers)
        if route == "/v1/jobs" and resp.status == 202:
            # Damage past the header shows when the worker decodes: the job fails.
            job_id = (await resp.json())["id"]
            job = await _wait_finished(client, token, job_id)
            assert job["state"] == "failed"
            assert job["error"]["error"] == code
            resp = await client.get(f"/v1/jobs/{job_id}/result", headers=auth(token))
        assert resp.status == status, await resp.text()
        error = await resp.json()
        assert error["error"] == code and error["message"]
        ok = await client.post("/v1/protect", data=good, headers=auth(token))
        assert ok.status == 200
        assert Image.open(io.BytesIO(await ok.read())).size == (80, 60)


@pytest.mark.parametrize("name", list(UNREAD_IMAGES))
async def test_images_not_read_are_refused_at_submission(config, name):
    async with serve(config) as client:
        token = await pair(client, config)
        for route in ["/v1/jobs", "/v1/protect"]:
            resp = await client.post(route, data=UNREAD_IMAGES[name], headers=auth(token))
            assert resp.status == 415, (route, await resp.text())  # not 202, not later
            error = await resp.json()
            assert error["error"] == "unsupported_image"
            assert "export" in error["message"]
        for still in ["GIF", "PNG", "WEBP", "TIFF"]:  # one frame of the same formats is fine
            ok = await client.post("/v1/protect", data=image_bytes(still), headers=auth(token))
            assert ok.status == 200, still


async def _wait_finished(client, token, job_id):
    import asyncio

    for _ in range(500):
        job = await (await client.get(f"/v1/jobs/{job_id}", headers=auth(token))).json()
        if job["state"] in ("done", "failed"):
            return job
        await asyncio.sleep(0.01)
    raise AssertionError("job did not finish")


async def test_body_over_the_byte_limit_is_413(config):
    async with serve(config) as client:
        token = await pair(client, config)
        big = jpeg_bytes(64, 64) + b"\0" * (config.max_bytes + 1)
        resp = await client.post("/v1/protect", data=big, headers=auth(token))
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
        ok = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert ok.status == 200


async def test_body_over_the_limit_without_content_length_is_413(config):
    small = with_changes(config, max_bytes=64 * 1024)

    async def chunks():
        for _ in range(40):
            yield b"\0" * 4096

    async with serve(small) as client:
        token = await pair(client, small)
        resp = await client.post("/v1/protect", data=chunks(), headers=auth(token))
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"


async def test_pixel_limit_follows_the_configuration(config):
    tight = with_changes(config, max_pixels=100 * 100)
    async with serve(tight) as client:
        token = await pair(client, tight)
        over = await client.post("/v1/protect", data=jpeg_bytes(101, 100), headers=auth(token))
        assert over.status == 413
        at = await client.post("/v1/protect", data=jpeg_bytes(100, 100), headers=auth(token))
        assert at.status == 200


async def test_decoded_bytes_over_the_limit_are_413_before_any_decoding(config):
    protector = ReencodingProtector()
    async with serve(config, protector) as client:
        token = await pair(client, config)
        # 7000 x 7000 16-bit RGBA: under the pixel limit, 392 MB decoded; 74 bytes sent.
        for route in ("/v1/protect", "/v1/jobs"):
            resp = await client.post(route, data=png_header_only(7000, 7000), headers=auth(token))
            assert resp.status == 413
            error = await resp.json()
            assert error["error"] == "too_large"
            assert "392 MB, over the limit of 200 MB" in error["message"]
        assert protector.batches == []  # refused from the header, never queued
        ok = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert ok.status == 200


async def test_decoded_bytes_limit_follows_the_configuration(config):
    tight = with_changes(config, max_decoded_bytes=64 * 48 * 3)
    async with serve(tight) as client:
        token = await pair(client, tight)
        at = await client.post("/v1/protect", data=jpeg_bytes(64, 48), headers=auth(token))
        assert at.status == 200
        over = await client.post("/v1/protect", data=jpeg_bytes(65, 48), headers=auth(token))
        assert over.status == 413


async def test_bad_query_parameters_are_400(config):
    async with serve(config) as client:
        token = await pair(client, config)
        for query in ["preset=nope", "site=https://x.com/path", "site=", "colour=red"]:
            resp = await client.post(f"/v1/protect?{query}", data=jpeg_bytes(), headers=auth(token))
            assert resp.status == 400, query
            assert (await resp.json())["error"] == "bad_request"
        ok = await client.post(
            "/v1/protect?site=mastodon.social&preset=fast", data=jpeg_bytes(), headers=auth(token)
        )
        assert ok.status == 200


async def test_unknown_route_and_method_are_json_errors(config):
    async with serve(config) as client:
        token = await pair(client, config)
        missing = await client.get("/v1/nothing", headers=auth(token))
        assert missing.status == 404
        assert (await missing.json())["error"] == "not_found"
        wrong = await client.delete("/v1/settings", headers=auth(token))
        assert wrong.status == 405
        assert (await wrong.json())["error"] == "method_not_allowed"
