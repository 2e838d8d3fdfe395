"""Serving the app: ``aiohttp.web.run_app``'s loop (signals, graceful shutdown) on a
:class:`backend.connections.GuardedSite`, with the descriptor limit raised first.

:func:`connection_middleware` (the app's outermost) tells the guard when a request starts
and ends, so that only idle connections are closed to make room or past the header
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from backend.config import DaemonConfig
from backend.connections import GuardedSite, connection_cap, raise_descriptor_limit
from backend.keys import CONNECTIONS_KEY

log = logging.getLogger(__name__)


@web.middleware
async def connection_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection guard that the request's connection is busy until it is answered."""
    guard = request.app[CONNECTIONS_KEY]
    guard.request_started(request.transport)
    try:
        return await handler(request)
    finally:
        guard.request_finished(request.transport)


def run(
    app: web.Application,
    config: DaemonConfig,
    *,
    runner_options: dict[str, Any],
    on_listening: Callable[[str], None],
    shutdown_timeout: float,
) -> None:
    """Serve ``app`` on ``config.host:config.port`` until SIGINT or SIGTERM, then shut down
    gracefully (as ``aiohttp.web.run_app`` does). Raises ``OSError`` if it cannot listen."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, config, runner_options, on_listening, shutdown_timeout))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def _serve(
    app: web.Application,
    config: DaemonConfig,
    runner_options: dict[str, Any],
    on_listening: Callable[[str], None],
    shutdown_timeout: float,
) -> None:
    descriptors = raise_descriptor_limit()
    guard = app[CONNECTIONS_KEY]
    guard.limit = connection_cap(config, descriptors)
    runner = web.AppRunner(
        app,
        handle_signals=True,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=config.header_timeout,
        **runner_options,
    )
    await runner.setup()
    try:
        site = GuardedSite(runner, config.host, config.port, guard)
        await site.start()
        on_listening(site.name)
        log.info(
            "at most %d connections (descriptor limit %d), %g s for a request's headers",
            guard.limit,
            descriptors,
            config.header_timeout,
        )
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
