"""Load: 200 requests from 20 concurrent clients against a real ``facecloak serve`` process.

Small real photos, ``fast`` preset, the real Protector. Every request must be answered,
protected (200) or refused because the queue is full (429): none lost, no 5xx. The
daemon's memory must come back near its idle level (within 25 %, idle measured after a
warm-up batch, since the first batch allocates the attack's working memory). Prints
requests/s and p50/p95 latency.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
import psutil
import pytest
from daemon_helpers import auth, start_daemon

pytestmark = pytest.mark.slow

REQUESTS = 200
CLIENTS = 20
QUEUE_SIZE = 4
BATCH_SIZE = 4
PHOTOS = ("obama-240p.jpg", "obama_small.jpg")  # 427x240 and 320x240, one face each


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_200_requests_from_20_clients(tmp_path, photos_dir):
    daemon = start_daemon(
        tmp_path,
        "--preset",
        "fast",
        "--queue-size",
        str(QUEUE_SIZE),
        "--batch-size",
        str(BATCH_SIZE),
    )
    try:
        token = daemon.pair()
        photos = [(photos_dir / name).read_bytes() for name in PHOTOS]
        headers = auth(token)
        url = daemon.url("/v1/protect?preset=fast")
        rss = psutil.Process(daemon.proc.pid).memory_info

        async def protect(http: aiohttp.ClientSession, photo: bytes) -> tuple[int, float, str]:
            started = time.perf_counter()
            async with http.post(url, data=photo, headers=headers) as resp:
                await resp.read()
                faces = resp.headers.get("X-FaceCloak-Faces", "")
                return resp.status, time.perf_counter() - started, faces

        # Warm-up: one full batch, so that the idle level includes the attack's buffers.
        async with aiohttp.ClientSession() as http:
            warm = await asyncio.gather(
                *(protect(http, photos[i % len(photos)]) for i in range(BATCH_SIZE))
            )
        assert [s for s, _, _ in warm] == [200] * BATCH_SIZE
        await asyncio.sleep(2.0)
        idle = rss().rss

        pending = list(range(REQUESTS))
        results: list[tuple[int, float, str]] = []
        errors: list[BaseException] = []

        async def client() -> None:
            async with aiohttp.ClientSession() as http:
                while pending:
                    i = pending.pop()
                    try:
                        results.append(await protect(http, photos[i % len(photos)]))
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        errors.append(exc)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        wall = time.perf_counter() - started
        peak = rss().rss

        await asyncio.sleep(3.0)
        after = rss().rss
        health = daemon.health()

        statuses = [s for s, _, _ in results]
        latencies = [t for _, t, _ in results]
        protected = [t for s, t, _ in results if s == 200]
        refused = [t for s, t, _ in results if s == 429]
        print(
            f"\n{REQUESTS} requests, {CLIENTS} clients, queue {QUEUE_SIZE}, batch {BATCH_SIZE}: "
            f"{wall:.1f} s, {REQUESTS / wall:.2f} requests/s; "
            f"{len(protected)} protected, {len(refused)} refused (429), {len(errors)} lost\n"
            f"latency all: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
            f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms; "
            f"protected: p50 {percentile(protected, 0.5):.1f} s, "
            f"p95 {percentile(protected, 0.95):.1f} s; "
            f"429: p50 {statistics.median(refused) * 1000:.1f} ms\n"
            f"RSS idle {idle / 2**20:.0f} MiB, at the end of the load {peak / 2**20:.0f} MiB, "
            f"3 s later {after / 2**20:.0f} MiB"
        )
        assert errors == []
        assert len(results) == REQUESTS
        assert set(statuses) <= {200, 429}
        assert protected and refused
        assert all(faces == "1" for s, _, faces in results if s == 200)
        assert health["status"] == "ready"
        assert health["queue"]["waiting"] == 0 and health["queue"]["running"] == 0
        assert after <= idle * 1.25  # no growth with the number of requests served
    finally:
        assert daemon.stop() == 0
