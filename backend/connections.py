"""Connections: a cap on how many are open, a deadline for request headers, and as many
file descriptors as the system allows.

aiohttp's server takes every connection it is offered, and gives one that never completes
a request's headers no deadline but its keep-alive timeout (75 s by default; none at all
in older versions): about 1,000 connections that send nothing, or half a request, use up
a common limit of 1024 descriptors, and the daemon can accept no other until they close.
So:

- at start-up the soft ``RLIMIT_NOFILE`` is raised to the hard limit
  (:func:`raise_descriptor_limit`);
- at most ``max_connections`` connections are open, and never more than the descriptors
  allow less :data:`RESERVED_DESCRIPTORS` for the process's own files. A connection past
  the cap closes the connection idle the longest (one waiting for a request's headers: an
  idle keep-alive, a client sending half a request); when every open connection has a
  request in progress, the new one is answered 503 ``busy`` and closed. Requests in
  progress are bounded elsewhere (the queue, the body deadline, the pairing throttle);
- a connection that has not sent a request's headers ``header_timeout`` seconds after
  opening, or after its last answer, is closed (slowloris).

:class:`GuardedSite` is the listening socket with the guard in front of aiohttp's protocol;
:func:`backend.server.run` serves with it, and :func:`backend.server.connection_middleware`
tells the guard when a request starts and ends.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass, field

from aiohttp import web

from backend.config import DaemonConfig

log = logging.getLogger(__name__)

# Descriptors kept for the process's own use: model and config files, the worker's
# threads' pipes, the listening socket, the log.
RESERVED_DESCRIPTORS = 128

# What a connection past the cap is told, when no idle one can make room for it.
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_BUSY_BODY = (
    b'{"error": "busy", "message": "the daemon has too many connections open; '
    b'try again in a moment"}'
)


def raise_descriptor_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the soft limit now in force.

    Where the hard limit is unlimited (some systems), asks for 65,536 instead.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65_536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, wanted, exc)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else wanted


def connection_cap(config: DaemonConfig, descriptors: int) -> int:
    """The most connections open at once: ``max_connections``, or fewer if ``descriptors``
    (the soft limit) would not leave :data:`RESERVED_DESCRIPTORS` for the rest."""
    return max(1, min(config.max_connections, descriptors - RESERVED_DESCRIPTORS))


@dataclass(eq=False)
class _Connection:
    transport: asyncio.BaseTransport
    requests: int = 0  # in progress
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class ConnectionGuard:
    """The open connections, oldest idle first; enforces the cap and the header deadline.

    ``limit`` may be set after construction (:func:`run` sets it once the descriptor limit
    is known). Connections it never saw opening (an in-process test server) are ignored.
    """

    def __init__(self, limit: int, header_timeout: float) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # connections answered 503 busy
        self.expired = 0  # connections closed past the header deadline
        # Insertion order is the order in which connections last became idle.
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self._last_warning = 0.0

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, transport: asyncio.BaseTransport) -> bool:
        """A connection was accepted; ``False`` if it must be turned away (all are busy)."""
        if len(self._open) >= self.limit:
            idle = next((c for c in self._open.values() if c.requests == 0), None)
            if idle is None:
                self.refused += 1
                self._warn("all %d connections have a request in progress", self.limit)
                return False
            self.evicted += 1
            self._warn("%d connections open: closing idle ones to make room", self.limit)
            self._close(idle)
        conn = _Connection(transport)
        self._open[transport] = conn
        self._arm(conn)
        return True

    def closed(self, transport: asyncio.BaseTransport) -> None:
        """A connection was closed, by either side."""
        conn = self._open.pop(transport, None)
        if conn is not None and conn.timer is not None:
            conn.timer.cancel()

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's headers have arrived on ``transport``: it is no longer idle."""
        conn = self._open.get(transport) if transport is not None else None
        if conn is None:
            return
        conn.requests += 1
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        """A request on ``transport`` was answered; idle again once none is in progress."""
        conn = self._open.get(transport) if transport is not None else None
        if conn is None:
            return
        conn.requests = max(0, conn.requests - 1)
        if conn.requests == 0:
            del self._open[transport]  # to the end: the most recently idle
            self._open[transport] = conn
            self._arm(conn)

    def _arm(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        conn.timer = loop.call_later(self.header_timeout, self._expire, conn)

    def _expire(self, conn: _Connection) -> None:
        conn.timer = None
        if conn.requests == 0 and conn.transport in self._open:
            self.expired += 1
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self.closed(conn.transport)
        conn.transport.close()  # what was already written is still sent

    def _warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 10.0:  # a flood must not flood the log
            self._last_warning = now
            log.warning(message, *args)


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's accounting."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if not self._guard.opened(transport):
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
            transport.close()
            return
        self._admitted = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.closed(self._transport)
        if self._admitted:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard`."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner)
        self._host, self._port, self._guard = host, port, guard
        self._bound: tuple[str, int] | None = None

    @property
    def name(self) -> str:
        host, port = self._bound or (self._host, self._port)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        guard = self._guard
        self._server = await loop.create_server(
            lambda: _GuardedProtocol(guard, server()),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._bound = self._server.sockets[0].getsockname()[:2]
