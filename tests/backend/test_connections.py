"""Connections: idle and half-open ones cannot use up the daemon's descriptors (a cap that
closes the idle longest first, a deadline for request headers, the descriptor limit raised
at start-up), and a body must arrive in time. Against a real ``facecloak serve`` process
(the re-encoding test double) where sockets and limits matter, in-process otherwise."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import psutil
import pytest
from daemon_helpers import auth, jpeg_bytes, pair, serve, start_daemon, with_changes

from backend.connections import ConnectionGuard

CAP = 32
HEADER_TIMEOUT = 3.0
IDLE = 150  # connections that send nothing
HALF_OPEN = 150  # connections that send part of a request's headers, then nothing


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_peer(conn: socket.socket, timeout: float) -> bool:
    """Whether the daemon closes ``conn`` within ``timeout`` seconds (EOF or reset)."""
    conn.settimeout(timeout)
    try:
        while conn.recv(4096):  # a 503 answer may come first, then the end
            pass
        return True
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def test_idle_and_half_open_connections_neither_lock_out_a_client_nor_stay(tmp_path):
    # Started with a soft limit of 256 descriptors: without the daemon raising it, 300
    # connections would leave it unable to accept any other until they close.
    daemon = start_daemon(
        tmp_path,
        "--max-connections",
        str(CAP),
        "--header-timeout",
        str(HEADER_TIMEOUT),
        reencoding=True,
        ready_timeout=120,
        descriptors=256,
    )
    sockets: list[socket.socket] = []
    try:
        process = psutil.Process(daemon.proc.pid)
        soft, hard = process.rlimit(psutil.RLIMIT_NOFILE)
        assert soft == hard > 256
        assert f"at most {CAP} connections" in daemon.log()
        token = daemon.pair()
        baseline = process.num_fds()

        partial = f"POST /v1/protect HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nX-Slow: ".encode()
        started = time.monotonic()
        for i in range(IDLE + HALF_OPEN):
            conn = connect(daemon.port)
            if i % 2:
                conn.sendall(partial)
            sockets.append(conn)
        trickle = connect(daemon.port)  # slowloris: a byte of headers every 0.25 s
        trickle.sendall(partial)
        last_opened = time.monotonic()

        # A good client is served while they are all open.
        request = urllib.request.Request(
            daemon.url("/v1/protect"), data=jpeg_bytes(), headers=auth(token)
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(daemon.url("/v1/health"), timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ready"
        # The last ones opened still had time to send headers: the cap made room.
        assert time.monotonic() - last_opened < HEADER_TIMEOUT
        assert process.num_fds() <= baseline + CAP + 8

        for _ in range(int(4 * HEADER_TIMEOUT)):
            try:
                trickle.sendall(b"x")
            except ConnectionError:
                break
            time.sleep(0.25)
        # Every one is closed: the oldest to make room, the rest at the header deadline.
        still_open = [c for c in sockets + [trickle] if not closed_by_peer(c, 2 * HEADER_TIMEOUT)]
        assert still_open == []
        assert time.monotonic() - started < 4 * HEADER_TIMEOUT + 5
        assert process.num_fds() <= baseline + 2
        log = daemon.log()
        assert "closing idle ones to make room" in log
    finally:
        for conn in sockets:
            conn.close()
        assert daemon.stop() == 0


# -- the guard on its own ------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.written = b""

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        self.written += data


async def test_the_guard_closes_the_connection_idle_the_longest_never_a_busy_one():
    guard = ConnectionGuard(limit=3, header_timeout=60)
    a, b, c, d, e = (FakeTransport() for _ in range(5))
    for t in (a, b, c):
        assert guard.opened(t)
    guard.request_started(a)  # a is busy; b is now the oldest idle
    assert guard.opened(d)
    assert b.closed and not a.closed
    guard.request_started(c)
    guard.request_finished(a)  # a idle again, the most recently: d goes before it
    assert guard.opened(e)
    assert d.closed and not a.closed
    guard.request_started(a)
    guard.request_started(e)  # a, c, e all busy: a new one is turned away
    assert not guard.opened(FakeTransport())
    assert (guard.evicted, guard.refused, len(guard)) == (2, 1, 3)


async def test_the_guard_closes_connections_that_send_no_headers_in_time():
    guard = ConnectionGuard(limit=10, header_timeout=0.2)
    idle, busy, answered = FakeTransport(), FakeTransport(), FakeTransport()
    for t in (idle, busy, answered):
        guard.opened(t)
    guard.request_started(busy)
    guard.request_started(answered)
    await asyncio.sleep(0.1)
    guard.request_finished(answered)  # its deadline starts again now
    await asyncio.sleep(0.15)
    assert idle.closed and not busy.closed and not answered.closed
    await asyncio.sleep(0.1)
    assert answered.closed and not busy.closed  # a request in progress has no deadline
    assert guard.expired == 2


# -- bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/pair", "/v1/protect"])
async def test_a_body_that_does_not_arrive_in_time_is_408(config, route):
    quick = with_changes(config, body_timeout=0.5)
    async with serve(quick) as client:
        token = await pair(client, quick, origin=None)  # a command-line client
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        head = [
            f"POST {route} HTTP/1.1",
            f"Host: 127.0.0.1:{client.port}",
            f"Authorization: Bearer {token}",
            "Content-Length: 1000",
        ]
        if route == "/v1/pair":
            head[2] = "Content-Type: application/json"
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"co')
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(4096), timeout=15)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b'"request_timeout"' in answer
        assert 0.5 <= time.monotonic() - started < 12  # the pairing throttle may add its wait
        writer.close()
