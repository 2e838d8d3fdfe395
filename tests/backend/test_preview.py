"""The preview of the last photo's faces (``GET /v1/jobs/{id}/preview``) and per-photo presets.

The preview holds crops of the original photo, so these check who may read it (the job's
owner, from the extension's origin: no other token, no page, no token-less client), that
only the last photo's is kept, and that ``/v1/protect`` is never measured for one. The
protector here re-encodes (see daemon_helpers) and, asked for ``measure="models"``, adds
one face's crops cut by cloak_core's own preview code; the real measurement is checked
against a real daemon in test_daemon_process.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass

from daemon_helpers import (
    EXTENSION,
    ReencodedImage,
    ReencodingProtector,
    auth,
    jpeg_bytes,
    pair,
    serve,
)
from PIL import Image

from backend.keys import WORKER_KEY
from cloak_core.imageio import decode_image
from cloak_core.pipeline import FacePreview, _jpeg_crop, _preview_box

OTHER_EXTENSION = "chrome-extension://" + "p" * 32


@dataclass(frozen=True)
class PreviewedImage(ReencodedImage):
    previews: tuple[FacePreview, ...] = ()


class PreviewingProtector(ReencodingProtector):
    """Re-encodes; with ``measure="models"`` also reports a face in the image's middle."""

    def protect_many(self, items, *, measure=False, **kwargs):
        results = super().protect_many(items, measure=measure, **kwargs)
        if measure != "models":
            return results
        out = []
        for data, result in zip(items, results, strict=True):
            pixels = decode_image(data).pixels
            h, w = pixels.shape[:2]
            box = _preview_box((w / 4, h / 4, 3 * w / 4, 3 * h / 4), (h, w))
            face = FacePreview(
                before=_jpeg_crop(pixels, box),
                after=_jpeg_crop(decode_image(result.data).pixels, box),
                same_person={"a": False, "b": True, "c": False},
                similarity={"a": 0.1, "b": 0.5, "c": 0.2},
            )
            out.append(PreviewedImage(**vars(result), previews=(face,)))
        return out


async def _finished(client, token, job_id):
    for _ in range(500):
        job = await (await client.get(f"/v1/jobs/{job_id}", headers=auth(token))).json()
        if job["state"] in ("done", "failed"):
            return job
        await asyncio.sleep(0.01)
    raise AssertionError("the job did not finish")


async def _job(client, token, image, query="preset=fast"):
    resp = await client.post(f"/v1/jobs?{query}", data=image, headers=auth(token))
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["id"]
    return job_id, await _finished(client, token, job_id)


async def test_preview_is_for_the_jobs_owner_from_the_extension_only(config):
    protector = PreviewingProtector()
    async with serve(config, protector) as client:
        mine = await pair(client, config)
        other = await pair(client, config)  # the same extension, paired again
        cli = await pair(client, config, origin=None)
        job_id, job = await _job(client, mine, jpeg_bytes(200, 160, seed=3))
        assert job["state"] == "done" and job["preset"] == "fast"
        assert protector.measures == ["models"]
        path = f"/v1/jobs/{job_id}/preview"
        resp = await client.get(path, headers=auth(mine))
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Access-Control-Allow-Origin"] == EXTENSION
        preview = await resp.json()
        assert preview["id"] == job_id and preview["preset"] == "fast"
        [face] = preview["faces"]
        assert (face["models"], face["matched"]) == (3, 1)
        for key in ("before", "after"):
            prefix, _, data = face[key].partition(",")
            assert prefix == "data:image/jpeg;base64"
            image = Image.open(io.BytesIO(base64.b64decode(data)))
            assert image.format == "JPEG" and max(image.size) <= 96
        # Nobody else: no token, another token, a command-line token, a page's origin,
        # another extension's origin (each with the owner's token where it has one).
        refused = [
            ({}, 401),
            (auth(other), 404),
            (auth(cli, origin=None), 404),
            (auth(mine, origin="https://attacker.example"), 403),
            (auth(mine, origin="null"), 403),
            (auth(mine, origin=OTHER_EXTENSION), 403),
            (auth(mine, origin=None), 403),
        ]
        for headers, status in refused:
            resp = await client.get(path, headers=headers)
            assert resp.status == status, headers
            assert "Access-Control-Allow-Origin" not in resp.headers or status == 404
            assert "base64" not in await resp.text()
        # A preflight from a page is refused too.
        pre = await client.options(
            path,
            headers={"Origin": "https://attacker.example", "Access-Control-Request-Method": "GET"},
        )
        assert pre.status == 403


async def test_only_the_last_photos_preview_is_kept(config):
    async with serve(config, PreviewingProtector()) as client:
        token = await pair(client, config)
        first, _ = await _job(client, token, jpeg_bytes(120, 90, seed=1))
        second, _ = await _job(client, token, jpeg_bytes(120, 90, seed=2))
        old = await client.get(f"/v1/jobs/{first}/preview", headers=auth(token))
        assert old.status == 404
        assert "only the last photo" in (await old.json())["message"]
        assert (await client.get(f"/v1/jobs/{second}/preview", headers=auth(token))).status == 200
        # The crops are gone from every job's result (only the latest payload holds them).
        worker = client.server.app[WORKER_KEY]
        for job_id in (first, second):
            job = worker.get(job_id, owner=worker._jobs[job_id].owner)
            assert job.result.previews == ()
        assert worker._jobs[first].preview is None


async def test_protect_route_is_not_measured_and_has_no_preview(config):
    protector = PreviewingProtector()
    async with serve(config, protector) as client:
        token = await pair(client, config)
        resp = await client.post("/v1/protect?preset=fast", data=jpeg_bytes(), headers=auth(token))
        assert resp.status == 200
        assert protector.measures == [False]


async def test_a_job_with_an_unknown_preset_is_refused_clearly(config):
    protector = PreviewingProtector()
    async with serve(config, protector) as client:
        token = await pair(client, config)
        for preset in ["nope", "FAST", "fast ", "../fast"]:
            resp = await client.post(
                f"/v1/jobs?preset={preset}", data=jpeg_bytes(), headers=auth(token)
            )
            assert resp.status == 400, preset
            body = await resp.json()
            assert body["error"] == "bad_request"
            assert "unknown preset" in body["message"] and "fast" in body["message"]
        assert protector.batches == []  # nothing was queued
        # A known preset other than the daemon's own is used for that job.
        _, job = await _job(client, token, jpeg_bytes(), query="preset=strong&site=example.org")
        assert job["state"] == "done" and job["preset"] == "strong"
        assert protector.configs[-1].name == "strong"
        health = await (await client.get("/v1/health")).json()
        assert "strong" in health["presets"] and "fast" in health["presets"]
