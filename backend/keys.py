"""Typed application state: the keys under which :func:`backend.app.create_app` stores things."""

from __future__ import annotations

from aiohttp import web

from backend.config import DaemonConfig
from backend.jobs import Worker
from backend.pairing import PairingCodes, PairingThrottle, TokenStore
from backend.settings import SettingsStore

CONFIG_KEY = web.AppKey("config", DaemonConfig)
WORKER_KEY = web.AppKey("worker", Worker)
TOKENS_KEY = web.AppKey("tokens", TokenStore)
CODES_KEY = web.AppKey("codes", PairingCodes)
PAIRING_THROTTLE_KEY = web.AppKey("pairing_throttle", PairingThrottle)
SETTINGS_KEY = web.AppKey("settings", SettingsStore)
