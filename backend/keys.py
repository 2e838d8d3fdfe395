"""Typed state: the keys under which :func:`backend.app.create_app` stores things in the app,
and the gate (:mod:`backend.middleware`) in each request."""

from __future__ import annotations

from aiohttp import web

from backend.config import DaemonConfig
from backend.connections import ConnectionGuard
from backend.jobs import Worker
from backend.pairing import PairingCodes, PairingThrottle, TokenRecord, TokenStore
from backend.settings import SettingsStore

CONFIG_KEY = web.AppKey("config", DaemonConfig)
WORKER_KEY = web.AppKey("worker", Worker)
TOKENS_KEY = web.AppKey("tokens", TokenStore)
CODES_KEY = web.AppKey("codes", PairingCodes)
PAIRING_THROTTLE_KEY = web.AppKey("pairing_throttle", PairingThrottle)
SETTINGS_KEY = web.AppKey("settings", SettingsStore)
CONNECTIONS_KEY = web.AppKey("connections", ConnectionGuard)

# The token a request was let in with (set by the gate on every route that needs one).
TOKEN_KEY = web.RequestKey("token", TokenRecord)
