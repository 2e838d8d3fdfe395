"""The app factory: ``create_app(config)`` wires state, middlewares, routes and resources.

To add a route: write its handler in :mod:`backend.handlers` and add it in
:func:`create_app`; the gate in :mod:`backend.middleware` applies to it (name it in
``PUBLIC_ROUTES`` only if it must work without a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from backend import handlers
from backend.config import DaemonConfig
from backend.connections import ConnectionGuard
from backend.jobs import Worker
from backend.keys import (
    CODES_KEY,
    CONFIG_KEY,
    CONNECTIONS_KEY,
    PAIRING_THROTTLE_KEY,
    SETTINGS_KEY,
    TOKENS_KEY,
    WORKER_KEY,
)
from backend.logs import ACCESS_LOGGER, AccessLogger, ServerLog
from backend.middleware import add_cors_headers, error_middleware, security_middleware
from backend.pairing import PairingCodes, PairingThrottle, TokenStore
from backend.protection import ProtectorFactory, load_protector
from backend.server import connection_middleware
from backend.settings import SettingsStore
from backend.storage import ensure_private_dir


def create_app(
    config: DaemonConfig, protector_factory: ProtectorFactory = load_protector
) -> web.Application:
    """The daemon as an aiohttp application.

    ``protector_factory(config)`` builds the protector in the worker thread at start-up;
    production uses :func:`backend.protection.load_protector` (cloak_core's Protector).
    """
    ensure_private_dir(config.config_dir)
    app = web.Application(
        middlewares=[connection_middleware, error_middleware, security_middleware],
        client_max_size=config.max_bytes,
    )
    app[CONFIG_KEY] = config
    app[WORKER_KEY] = Worker(config, protector_factory)
    app[TOKENS_KEY] = TokenStore(config.config_dir)
    app[CODES_KEY] = PairingCodes(config.config_dir)
    app[PAIRING_THROTTLE_KEY] = PairingThrottle(free=config.pairing_failures_per_minute)
    app[SETTINGS_KEY] = SettingsStore(config.config_dir, default_preset=config.preset)
    app[CONNECTIONS_KEY] = ConnectionGuard(config.max_connections, config.header_timeout)

    app.cleanup_ctx.append(_worker_ctx)
    app.cleanup_ctx.append(_expiry_ctx)
    app.on_shutdown.append(_stop_taking_work)
    app.on_response_prepare.append(add_cors_headers)

    routes = {
        # name: (path, {method: handler}); every resource also answers CORS preflights.
        "health": ("/v1/health", {"GET": handlers.health}),
        "pair": ("/v1/pair", {"POST": handlers.pair}),
        "proof": ("/v1/proof", {"POST": handlers.proof}),
        "protect": ("/v1/protect", {"POST": handlers.protect}),
        "jobs": ("/v1/jobs", {"POST": handlers.create_job}),
        "job": ("/v1/jobs/{id}", {"GET": handlers.job_status}),
        "job_result": ("/v1/jobs/{id}/result", {"GET": handlers.job_result}),
        "job_preview": ("/v1/jobs/{id}/preview", {"GET": handlers.job_preview}),
        "settings": ("/v1/settings", {"GET": handlers.get_settings, "PUT": handlers.put_settings}),
    }
    for name, (path, methods) in routes.items():
        resource = app.router.add_resource(path, name=name)
        for method, handler in methods.items():
            resource.add_route(method, handler)
        resource.add_route("OPTIONS", handlers.preflight)
    return app


def runner_options() -> dict[str, Any]:
    """Keyword arguments for ``web.run_app`` / ``AppRunner`` / ``TestServer``.

    ``handler_cancellation``: a client that disconnects cancels its handler, which
    cancels its job. The access log writes one line per request without query strings,
    job ids, tokens or image content; ``logger`` replaces aiohttp's server log, which
    would quote a malformed request's raw headers (see :mod:`backend.logs`).
    """
    return {
        "handler_cancellation": True,
        "access_log_class": AccessLogger,
        "access_log": logging.getLogger(ACCESS_LOGGER),
        "logger": ServerLog(),
    }


async def _worker_ctx(app: web.Application) -> AsyncIterator[None]:
    worker = app[WORKER_KEY]
    await worker.start()
    yield
    await worker.close()


async def _expiry_ctx(app: web.Application) -> AsyncIterator[None]:
    worker = app[WORKER_KEY]
    interval = min(30.0, app[CONFIG_KEY].result_ttl / 2)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(interval)
            worker.expire()

    task = asyncio.create_task(sweep(), name="facecloak-expiry")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _stop_taking_work(app: web.Application) -> None:
    await app[WORKER_KEY].shutdown()
