"""Fixtures of the daemon's tests (helpers live in daemon_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.config import DaemonConfig


@pytest.fixture
def config(tmp_path: Path) -> DaemonConfig:
    """A daemon configuration with a private temporary config folder."""
    return DaemonConfig(config_dir=tmp_path / "config", preset="fast")
