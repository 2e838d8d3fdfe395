"""Fixtures shared by every test: the shared data folder, the model store, real photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _shared_dir() -> Path | None:
    value = os.environ.get("FACECLOAK_SHARED")
    if value and Path(value).is_dir():
        return Path(value).resolve()
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``shared/`` folder given by ``FACECLOAK_SHARED``."""
    path = _shared_dir()
    if path is None:
        pytest.skip("FACECLOAK_SHARED is not set to the shared/ folder (photos, faces, models)")
    return path


@pytest.fixture(scope="session")
def photos_dir(shared_dir: Path) -> Path:
    """``shared/data/photos``: real photos with one and several faces."""
    return shared_dir / "data" / "photos"


@pytest.fixture(scope="session")
def faces_dir(shared_dir: Path) -> Path:
    """``shared/data/faces``: identity folders of 112x112 ArcFace-aligned faces."""
    return shared_dir / "data" / "faces"


@pytest.fixture(scope="session")
def store():
    """The model store as the environment configures it (FACECLOAK_MODEL_PATH, cache)."""
    from cloak_core.store import ModelStore

    return ModelStore.from_env()
