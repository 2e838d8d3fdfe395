"""The queue and the worker: job life cycle, progress, batching, limits, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import io
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from daemon_helpers import ReencodingProtector, auth, jpeg_bytes, pair, serve, with_changes
from fuzz.hostile import png_header_only
from PIL import Image

from backend.app import create_app
from backend.jobs import STOP_GRACE
from backend.keys import WORKER_KEY
from cloak_core.errors import ModelStoreError
from cloak_core.presets import PRESETS


async def _job(client, token, job_id):
    resp = await client.get(f"/v1/jobs/{job_id}", headers=auth(token))
    assert resp.status == 200
    return await resp.json()


async def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_job_flow_with_real_progress(config):
    protector = ReencodingProtector(steps=10, step_seconds=0.05)
    image = jpeg_bytes(120, 90, seed=1)
    async with serve(config, protector) as client:
        token = await pair(client, config)
        resp = await client.post("/v1/jobs?preset=fast", data=image, headers=auth(token))
        assert resp.status == 202
        job_id = (await resp.json())["id"]
        assert resp.headers["Location"] == f"/v1/jobs/{job_id}"
        seen = []

        async def done():
            job = await _job(client, token, job_id)
            seen.append((job["state"], job["progress"]))
            return job if job["state"] == "done" else None

        job = await _until(done)
        assert job == {
            "id": job_id,
            "state": "done",
            "preset": "fast",
            "progress": 1.0,
            "faces": 0,
            "error": None,
        }
        running = [p for state, p in seen if state == "running"]
        assert any(0 < p < 1 for p in running), seen  # progress moved while it ran
        assert running == sorted(running)  # and never went back
        result = await client.get(f"/v1/jobs/{job_id}/result", headers=auth(token))
        assert result.status == 200
        assert result.headers["Content-Type"] == "image/jpeg"
        assert result.headers["X-FaceCloak-Faces"] == "0"
        assert float(result.headers["X-FaceCloak-Seconds"]) >= 0
        assert Image.open(io.BytesIO(await result.read())).size == (120, 90)
        assert protector.configs[-1] == PRESETS["fast"]


async def test_result_before_done_is_409_and_unknown_job_is_404(config):
    protector = ReencodingProtector(steps=20, step_seconds=0.02)
    async with serve(config, protector) as client:
        token = await pair(client, config)
        job_id = (
            await (await client.post("/v1/jobs", data=jpeg_bytes(), headers=auth(token))).json()
        )["id"]
        early = await client.get(f"/v1/jobs/{job_id}/result", headers=auth(token))
        assert early.status == 409
        assert (await early.json())["error"] == "not_ready"
        for path in ["/v1/jobs/unknown", "/v1/jobs/unknown/result"]:
            resp = await client.get(path, headers=auth(token))
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"


async def test_finished_results_expire(config):
    short = with_changes(config, result_ttl=0.3)
    async with serve(short) as client:
        token = await pair(client, short)
        job_id = (
            await (await client.post("/v1/jobs", data=jpeg_bytes(), headers=auth(token))).json()
        )["id"]
        await _until(lambda: _state_is(client, token, job_id, "done"))
        assert (await client.get(f"/v1/jobs/{job_id}/result", headers=auth(token))).status == 200
        await asyncio.sleep(0.4)
        assert (await client.get(f"/v1/jobs/{job_id}", headers=auth(token))).status == 404
        assert (await client.get(f"/v1/jobs/{job_id}/result", headers=auth(token))).status == 404


async def _state_is(client, token, job_id, state):
    return (await _job(client, token, job_id))["state"] == state


async def test_full_queue_answers_429_and_recovers(config):
    small = with_changes(config, queue_size=2, batch_size=1)
    protector = ReencodingProtector(steps=10, step_seconds=0.03)
    async with serve(small, protector) as client:
        token = await pair(client, small)
        ids = []
        for _ in range(3):  # one runs, two wait
            resp = await client.post("/v1/jobs", data=jpeg_bytes(), headers=auth(token))
            assert resp.status == 202
            ids.append((await resp.json())["id"])
            if len(ids) == 1:
                await _until(lambda: _state_is(client, token, ids[0], "running"))
        full = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert full.status == 429
        assert (await full.json())["error"] == "queue_full"
        health = await (await client.get("/v1/health")).json()
        assert health["queue"] == {"waiting": 2, "running": 1, "limit": 2}
        for job_id in ids:
            await _until(lambda job_id=job_id: _state_is(client, token, job_id, "done"))
        ok = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert ok.status == 200


async def test_waiting_jobs_of_one_preset_are_batched(config):
    protector = ReencodingProtector(steps=10, step_seconds=0.03)
    async with serve(with_changes(config, batch_size=4), protector) as client:
        token = await pair(client, config)
        first = await client.post("/v1/jobs?preset=fast", data=jpeg_bytes(), headers=auth(token))
        first_id = (await first.json())["id"]
        await _until(lambda: _state_is(client, token, first_id, "running"))
        presets = ["fast", "balanced", "fast", "fast", "fast", "fast"]
        ids = []
        for preset in presets:
            resp = await client.post(
                f"/v1/jobs?preset={preset}", data=jpeg_bytes(), headers=auth(token)
            )
            ids.append((await resp.json())["id"])
        for job_id in ids:
            await _until(lambda job_id=job_id: _state_is(client, token, job_id, "done"))
        # 1 alone, then four "fast" together, then the "balanced" one, then the last "fast".
        assert protector.batches == [1, 4, 1, 1]
        assert [c.name for c in protector.configs] == ["fast", "fast", "balanced", "fast"]
        assert len(protector.thread_names) == 1  # one worker thread owns the device


async def _send(client, token, query=""):
    resp = await client.post(f"/v1/jobs{query}", data=jpeg_bytes(), headers=auth(token))
    assert resp.status == 202, await resp.text()
    return (await resp.json())["id"]


async def test_an_uploads_photos_wait_for_each_other_and_go_in_one_batch(config):
    protector = ReencodingProtector(steps=10, step_seconds=0.03)
    async with serve(with_changes(config, batch_size=4, collection_wait=30.0), protector) as client:
        token = await pair(client, config)
        upload = "?collection=upload-0001&collection_size=3"
        first = await _send(client, token, upload)
        alone = await _send(client, token)
        # The photo sent alone runs; the upload's first photo waits for the other two.
        await _until(lambda: _state_is(client, token, alone, "done"))
        assert (await _job(client, token, first))["state"] == "queued"
        rest = [await _send(client, token, upload) for _ in range(2)]
        for job_id in [first, *rest]:
            await _until(lambda job_id=job_id: _state_is(client, token, job_id, "done"))
        assert protector.batches == [1, 3]
        assert protector.collections[0] is None
        labels = protector.collections[1]
        assert len(set(labels)) == 1 and labels[0][1] == "upload-0001"


async def test_a_collection_larger_than_a_batch_is_split_and_one_never_completed_runs(config):
    protector = ReencodingProtector(steps=20, step_seconds=0.05)  # a second a batch
    async with serve(with_changes(config, batch_size=2, collection_wait=1.0), protector) as client:
        token, other = await pair(client, config), await pair(client, config)
        busy = await _send(client, token)
        await _until(lambda: _state_is(client, token, busy, "running"))
        big = [await _send(client, token, "?collection=big-upload&collection_size=3")]
        alone = await _send(client, token)
        big += [await _send(client, token, "?collection=big-upload&collection_size=3")]
        big += [await _send(client, token, "?collection=big-upload&collection_size=3")]
        for job_id in [*big, alone]:
            await _until(lambda job_id=job_id: _state_is(client, token, job_id, "done"))
        # After the busy one: two of the upload together, then its third with the photo
        # sent alone, not held back for the rest of a collection that has run.
        assert protector.batches == [1, 2, 2]
        label = protector.collections[1][0]
        assert protector.collections[1] == [label] * 2
        assert set(protector.collections[2]) == {label, None}
        # Another token's jobs never join a collection, whatever its label; an upload
        # that never completes runs after collection_wait.
        mine = await _send(client, token, "?collection=same-label&collection_size=2")
        theirs = await _send(client, other, "?collection=same-label&collection_size=2")
        await asyncio.sleep(0.5)  # the worker is idle, and both wait
        assert (await _job(client, token, mine))["state"] == "queued"
        assert (await _job(client, other, theirs))["state"] == "queued"
        await _until(lambda: _state_is(client, token, mine, "done"))
        await _until(lambda: _state_is(client, other, theirs, "done"))
        assert protector.batches[3:] == [1, 1]
        assert protector.collections[3] != protector.collections[4]


async def test_what_is_left_of_a_split_collection_runs_once_each(config):
    """The remainder of a split upload goes in the next batch together, each photo once."""
    protector = ReencodingProtector(steps=20, step_seconds=0.05)
    async with serve(with_changes(config, batch_size=3, collection_wait=2.0), protector) as client:
        token = await pair(client, config)
        busy = await _send(client, token)
        await _until(lambda: _state_is(client, token, busy, "running"))
        query = "?collection=seven-photos&collection_size=7"
        upload = [await _send(client, token, query) for _ in range(7)]
        for job_id in upload:
            await _until(lambda job_id=job_id: _state_is(client, token, job_id, "done"))
        assert protector.batches == [1, 3, 3, 1]
        assert len({label for labels in protector.collections[1:] for label in labels}) == 1
        # Each part is handed the photos still waiting, embedded once, before the first
        # part runs, and the earlier parts' photos; once the upload is done the worker
        # keeps nothing of it (``collection_wait`` after its last part).
        label = protector.collections[1][0]
        assert protector.waiting[1:] == [{label: 4}, {label: 1}, None]
        assert len(protector.embedded) == 4
        # The faces found while they waited are handed over, not looked for again.
        size = len(jpeg_bytes())
        assert protector.faces[1] is None
        assert protector.faces[2:] == [[[f"face of {size} bytes"]] * 3, [[f"face of {size} bytes"]]]
        assert protector.carried[1:] == [{}, {label: 3}, {label: 6}]
        worker = client.server.app[WORKER_KEY]

        async def forgotten():
            return not worker._carried and not worker._waiting

        await _until(forgotten)


async def test_an_upload_larger_than_the_queue_runs_at_once_and_stays_one(config):
    """A full queue turns the rest of an upload away, so what came runs without waiting
    ``collection_wait``; a photo sent again once there is room (the extension retries a
    429), before or after the first part is done, joins the upload's identity and runs
    without waiting for the others."""
    protector = ReencodingProtector(steps=10, step_seconds=0.05)
    small = with_changes(config, queue_size=2, batch_size=2, collection_wait=30.0)
    async with serve(small, protector) as client:
        token = await pair(client, small)
        busy = await _send(client, token)
        await _until(lambda: _state_is(client, token, busy, "running"))
        query = "?collection=four-photos&collection_size=4"
        first = [await _send(client, token, query) for _ in range(2)]
        turned_away = await client.post(f"/v1/jobs{query}", data=jpeg_bytes(), headers=auth(token))
        assert turned_away.status == 429
        for job_id in first:  # long before collection_wait
            await _until(lambda job_id=job_id: _state_is(client, token, job_id, "done"), 5.0)
        again = await _send(client, token, query)  # after the first part is done
        await _until(lambda: _state_is(client, token, again, "done"), 5.0)
        label = protector.collections[1][0]
        assert protector.batches == [1, 2, 1]
        assert protector.carried[1:] == [{}, {label: 2}]
        # The last, sent while the worker is busy with another photo, runs next, pushed
        # from the three before it.
        busy = await _send(client, token)
        await _until(lambda: _state_is(client, token, busy, "running"))
        last = await _send(client, token, query)
        await _until(lambda: _state_is(client, token, last, "done"), 5.0)
        assert protector.batches == [1, 2, 1, 1, 1]
        assert protector.collections[4] == [label]
        assert protector.carried[4] == {label: 3}
        worker = client.server.app[WORKER_KEY]
        assert label in worker._carried  # remembered for collection_wait


async def test_a_waiting_photo_that_fails_to_embed_fails_no_other(config):
    """The first part of a split upload runs without a waiting photo the protector could
    not embed; that photo is still protected in its own batch."""
    protector = ReencodingProtector()
    protector.embed_error = RuntimeError("a bug in embedding")
    async with serve(with_changes(config, batch_size=2, collection_wait=5.0), protector) as client:
        token = await pair(client, config)
        query = "?collection=three-photos&collection_size=3"
        upload = [await _send(client, token, query) for _ in range(3)]
        for job_id in upload:
            await _until(lambda job_id=job_id: _state_is(client, token, job_id, "done"))
        label = protector.collections[0][0]
        assert protector.batches == [2, 1]
        assert protector.waiting == [{label: 0}, None] and protector.embedded == []


@pytest.mark.parametrize(
    "query",
    [
        "?collection=short&collection_size=2",
        "?collection=upload%2F001&collection_size=2",
        "?collection=upload-0001&collection_size=1",
        "?collection=upload-0001&collection_size=65",
        "?collection=upload-0001&collection_size=%C2%B2",
        "?collection=upload-0001",
        "?collection_size=2",
    ],
)
async def test_malformed_collections_are_refused(config, query):
    protector = ReencodingProtector()
    async with serve(config, protector) as client:
        token = await pair(client, config)
        resp = await client.post(f"/v1/jobs{query}", data=jpeg_bytes(), headers=auth(token))
        assert resp.status == 400, await resp.text()
        assert "collection" in (await resp.json())["message"]
        # The synchronous route protects one photo: it has no collections.
        query = "?collection=upload-0001&collection_size=2"
        resp = await client.post(f"/v1/protect{query}", data=jpeg_bytes(), headers=auth(token))
        assert resp.status == 400
        assert protector.batches == []


async def test_client_disconnect_cancels_its_job(config):
    protector = ReencodingProtector(steps=200, step_seconds=0.02)  # 4 s if not cancelled
    async with serve(config, protector) as client:
        token = await pair(client, config)
        url = client.make_url("/v1/protect")
        async with aiohttp.ClientSession() as other:
            request = asyncio.ensure_future(other.post(url, data=jpeg_bytes(), headers=auth(token)))

            async def running():
                return (await (await client.get("/v1/health")).json())["queue"]["running"] == 1

            await _until(running)
            request.cancel()  # the client goes away mid-job
        started = time.monotonic()

        async def idle():
            return (await (await client.get("/v1/health")).json())["queue"]["running"] == 0

        await _until(idle, timeout=3.0)
        assert time.monotonic() - started < 1.0
        assert protector.batches == [1]
        protector.steps = 1  # the daemon goes on serving
        ok = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert ok.status == 200


async def test_a_queued_job_whose_client_left_never_runs(config):
    protector = ReencodingProtector(steps=30, step_seconds=0.02)
    async with serve(with_changes(config, batch_size=1), protector) as client:
        token = await pair(client, config)
        blocker = (
            await (await client.post("/v1/jobs", data=jpeg_bytes(), headers=auth(token))).json()
        )["id"]
        await _until(lambda: _state_is(client, token, blocker, "running"))
        async with aiohttp.ClientSession() as other:
            request = asyncio.ensure_future(
                other.post(client.make_url("/v1/protect"), data=jpeg_bytes(), headers=auth(token))
            )

            async def waiting():
                return (await (await client.get("/v1/health")).json())["queue"]["waiting"] == 1

            await _until(waiting)
            request.cancel()

        async def empty():
            return (await (await client.get("/v1/health")).json())["queue"]["waiting"] == 0

        await _until(empty)
        await _until(lambda: _state_is(client, token, blocker, "done"))
        await asyncio.sleep(0.1)
        assert protector.batches == [1]


async def test_job_over_the_time_limit_fails_with_timeout(config):
    protector = ReencodingProtector(steps=100, step_seconds=0.02)
    async with serve(with_changes(config, job_timeout=0.2), protector) as client:
        token = await pair(client, config)
        started = time.monotonic()
        resp = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert resp.status == 504
        assert (await resp.json())["error"] == "timeout"
        assert time.monotonic() - started < 1.5
        job_id = (
            await (await client.post("/v1/jobs", data=jpeg_bytes(), headers=auth(token))).json()
        )["id"]
        job = await _until(lambda: _finished(client, token, job_id))
        assert job["state"] == "failed" and job["error"]["error"] == "timeout"


async def _finished(client, token, job_id):
    job = await _job(client, token, job_id)
    return job if job["state"] in ("done", "failed") else None


class _Stubborn(ReencodingProtector):
    """A stage that does not look at ``cancel`` for ``seconds`` (its first call only)."""

    def __init__(self, seconds: float):
        super().__init__(steps=1)
        self.seconds = seconds

    def protect_many(self, items, **kwargs):
        if not self.batches:
            time.sleep(self.seconds)
        return super().protect_many(items, **kwargs)


async def test_a_job_is_answered_at_its_deadline_even_if_a_stage_does_not_stop(config):
    protector = _Stubborn(seconds=3.0)
    async with serve(with_changes(config, job_timeout=0.2, batch_size=1), protector) as client:
        token = await pair(client, config)
        started = time.monotonic()
        resp = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        answered = time.monotonic() - started
        assert resp.status == 504 and (await resp.json())["error"] == "timeout"
        assert answered < 0.2 + STOP_GRACE + 0.5  # not the 3 s the stage took
        # The worker takes the next job once the stage has come back, not before.
        ok = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert ok.status == 200
        assert 2.5 < time.monotonic() - started < 5.0
        assert protector.batches == [1, 1]


def _png_claiming_bytes(decoded_mb: int) -> bytes:
    """A header-only 16-bit RGB PNG whose decoded image takes ``decoded_mb`` MB (6 bytes a
    pixel); its decoding fails later (no data), which does not matter to the batching."""
    return png_header_only(1000, decoded_mb * 1_000_000 // 6000, colour_type=2)


async def test_waiting_jobs_are_batched_within_the_decoded_bytes_limit(config):
    limits = with_changes(
        config, batch_size=4, max_decoded_bytes=100_000_000, max_batch_decoded_bytes=100_000_000
    )
    protector = ReencodingProtector(steps=10, step_seconds=0.03)
    async with serve(limits, protector) as client:
        token = await pair(client, config)
        first = await client.post("/v1/jobs", data=jpeg_bytes(), headers=auth(token))
        first_id = (await first.json())["id"]
        await _until(lambda: _state_is(client, token, first_id, "running"))
        ids = []
        for mb in (60, 60, 30):
            resp = await client.post("/v1/jobs", data=_png_claiming_bytes(mb), headers=auth(token))
            assert resp.status == 202, await resp.text()
            ids.append((await resp.json())["id"])
        for job_id in ids:
            await _until(lambda job_id=job_id: _finished(client, token, job_id))
        # 60 + 60 MB would pass 100 MB: the first 60 goes with the 30, the other alone.
        assert protector.batches == [1, 2, 1]


class _Crashing(ReencodingProtector):
    """Raises an unexpected error (a bug) quoting the image, on its first call only."""

    def protect_many(self, items, **kwargs):
        if not self.batches:
            self.batches.append(len(items))
            raise RuntimeError(f"bad bytes {items[0][-40:].hex()}")
        return super().protect_many(items, **kwargs)


async def test_unexpected_errors_do_not_stop_the_worker_or_leak(config, caplog):
    secret = jpeg_bytes()[-40:].hex()
    async with serve(config, _Crashing()) as client:
        token = await pair(client, config)
        resp = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert resp.status == 500
        body = await resp.json()
        assert body["error"] == "internal" and secret not in body["message"]
        ok = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert ok.status == 200
    assert caplog.text.count("unexpected RuntimeError") == 1
    assert secret not in caplog.text


async def test_models_that_fail_to_load_make_the_daemon_unavailable(config):
    def factory(_config):
        raise ModelStoreError("sface_int8bq.onnx is missing; run `facecloak models fetch`")

    async with serve(config, factory=factory) as client:
        health = await (await client.get("/v1/health")).json()
        assert health["status"] == "failed"
        token = await pair(client, config)
        resp = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert resp.status == 503
        assert "facecloak models fetch" in (await resp.json())["message"]


async def test_health_says_starting_while_models_load(config):
    loaded = asyncio.Event()
    loop = asyncio.get_running_loop()
    protector = ReencodingProtector()

    def slow_factory(_config):
        time.sleep(0.5)
        loop.call_soon_threadsafe(loaded.set)
        return protector

    server = TestServer(create_app(config, slow_factory))
    async with TestClient(server) as client:
        assert (await (await client.get("/v1/health")).json())["status"] == "starting"
        token = await pair(client, config)
        # A job sent while starting waits for the models, then runs.
        resp = await client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
        assert resp.status == 200
        assert loaded.is_set()
        health = await (await client.get("/v1/health")).json()
        assert health["status"] == "ready"
        assert health["models"] == ["reencode-only"] and health["device"] == "cpu"
    assert protector.closed


async def test_shutdown_finishes_the_running_job_and_refuses_queued_ones(config):
    protector = ReencodingProtector(steps=20, step_seconds=0.03)
    async with serve(with_changes(config, batch_size=1), protector) as client:
        token = await pair(client, config)
        requests = []
        for _ in range(3):
            requests.append(
                asyncio.ensure_future(
                    client.post("/v1/protect", data=jpeg_bytes(), headers=auth(token))
                )
            )

            async def queued():
                q = (await (await client.get("/v1/health")).json())["queue"]
                return q["waiting"] + q["running"] == len(requests)

            await _until(queued)
        await client.server.close()  # what SIGTERM does: stop, shut down, clean up
        responses = await asyncio.gather(*requests)
        statuses = [r.status for r in responses]
        assert statuses == [200, 503, 503]
        assert (await responses[1].json())["error"] == "shutting_down"
        assert protector.closed
