"""Against a real ``facecloak serve`` process, where behaviour depends on sockets and the log.

The process is the production command with the re-encoding test double as its protector
(reencoding_serve.py), so it starts in about a second and needs no models.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import socket
import time
import urllib.error
import urllib.request

import aiohttp
import psutil
import pytest
from daemon_helpers import EXTENSION, DaemonProcess, auth, jpeg_bytes, start_daemon

from backend.pairing import PairingCodes


@pytest.fixture
def daemon(tmp_path):
    process = start_daemon(tmp_path, "--preset", "fast", reencoding=True, ready_timeout=120)
    yield process
    assert process.stop() == 0


def raw_request(daemon: DaemonProcess, data: bytes) -> bytes:
    """Send ``data`` as it is on a fresh connection; the daemon's whole answer."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def submit_job(daemon: DaemonProcess, token: str, site: str) -> str:
    request = urllib.request.Request(
        daemon.url(f"/v1/jobs?site={site}"),
        data=jpeg_bytes(),
        headers={**auth(token), "Content-Type": "image/jpeg"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())["id"]


def test_malformed_requests_leave_no_secret_in_the_log(daemon):
    token = daemon.pair()
    site = "secret-site.example"
    job_id = submit_job(daemon, token, site)
    code = PairingCodes(daemon.config_dir).issue()  # pending: must not show either
    host = f"Host: 127.0.0.1:{daemon.port}"
    bearer = f"Authorization: Bearer {token}"
    target = f"/v1/jobs/{job_id}?site={site}&code={code}"

    def request(*lines: str) -> bytes:
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    malformed = {
        # The parser's error quotes the offending line: here, the token's own line.
        "control character in the token": request(f"GET {target} HTTP/1.1", host, bearer + "\x01"),
        "bad Content-Length": request(
            "PUT /v1/settings HTTP/1.1", host, bearer, f"Content-Length: {code}"
        ),
        "space in the target": request(f"GET {target} {code} HTTP/1.1", host, bearer),
        "header without a colon": request(f"GET {target} HTTP/1.1", host, bearer, code),
        "header too long": request(f"GET {target} HTTP/1.1", host, bearer + "x" * 9000),
    }
    for name, data in malformed.items():
        answer = raw_request(daemon, data)
        assert answer.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")), (name, answer[:200])
    assert daemon.health()["status"] == "ready"  # and the daemon goes on

    log = daemon.log()
    for secret in [token, token[:16], code, job_id, site]:
        assert secret not in log, secret
    assert "Traceback" not in log  # neither aiohttp's nor one from the access logger
    assert log.count("(malformed request) 400") == len(malformed)


def test_pairing_refuses_a_big_body_without_reading_it(daemon):
    """No token is needed to pair, so its body is capped small and refused unread."""
    host = f"Host: 127.0.0.1:{daemon.port}\r\n"
    announced = (
        f"POST /v1/pair HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
        f"Content-Length: {39 * 2**20}\r\n\r\n"
    )
    chunked = (
        f"POST /v1/pair HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
        f"{64 * 1024:x}\r\n"
    )
    for head in [announced, chunked]:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as conn:
            # Send the head and 64 KB of the body, then wait: the answer must not need the rest.
            conn.sendall(head.encode() + b'{"code": "' + b"A" * (64 * 1024 - 10))
            answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "too_large"

    # A whole 39 MB body costs the daemon neither time nor memory.
    process = psutil.Process(daemon.proc.pid)
    before = process.memory_info().rss
    big = b'{"code": "' + b"A" * (39 * 2**20) + b'"}'
    request = urllib.request.Request(daemon.url("/v1/pair"), data=big)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert daemon.health()["status"] == "ready"
    assert process.memory_info().rss - before < 16 * 2**20


async def test_a_flood_of_wrong_codes_does_not_lock_the_user_out(daemon):
    code = PairingCodes(daemon.config_dir).issue()  # as `facecloak pair` does
    url = daemon.url("/v1/pair")
    answers: collections.Counter[int] = collections.Counter()

    async def guess(http: aiohttp.ClientSession, worker: int) -> None:
        for i in itertools.count():
            resp = await http.post(url, json={"code": f"WRONG{worker:02d}{i}"})
            answers[resp.status] += 1

    async with aiohttp.ClientSession() as http:
        flood = [asyncio.create_task(guess(http, worker)) for worker in range(16)]
        try:
            await asyncio.sleep(2.0)
            started = time.monotonic()
            resp = await http.post(url, json={"code": code, "origin": EXTENSION})
            elapsed = time.monotonic() - started
            assert resp.status == 200, await resp.text()
            assert "token" in await resp.json()
        finally:
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
    print(f"\nright code answered in {elapsed:.2f} s during a flood: {dict(answers)}")
    assert elapsed < 2.0
    assert set(answers) <= {401, 429}
    # Wrong codes past the 5 free ones were answered one at a time, 0.5, 1, 2 s apart;
    # the others were refused at once (429) rather than held.
    assert answers[401] <= 5 + 4
    assert answers[429] > 0
