"""User settings: global switch, preset, privacy mode, and protection on/off per site.

Stored as ``settings.json`` in the config folder (owner-only, written atomically). The
extension reads them with ``GET /v1/settings`` and changes them with ``PUT /v1/settings``,
whose body holds any subset of the keys; ``sites`` is merged entry by entry, ``null``
removing a site the user added (or putting a default site back to on).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backend.config import PRIVACY_MODES
from backend.errors import BadRequestError
from backend.storage import locked, read_json, write_json_atomic
from cloak_core.presets import PRESETS

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"

# Major social sites, protected unless the user turns them off.
DEFAULT_SITES = (
    "facebook.com",
    "instagram.com",
    "x.com",
    "twitter.com",
    "linkedin.com",
    "reddit.com",
    "bsky.app",
    "tiktok.com",
    "pinterest.com",
)
MAX_SITES = 500

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_site(value: object) -> str:
    """A site's host name in canonical form (lower case, IDNA, no trailing dot).

    Raises :class:`BadRequestError` for anything that is not a bare host name with a dot
    (URLs, paths, ports and IP literals are refused).
    """
    if not isinstance(value, str):
        raise BadRequestError("a site must be a host name string, like mastodon.social")
    host = value.strip().lower().rstrip(".")
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise BadRequestError(f"{value!r} is not a host name") from None
    labels = host.split(".")
    if (
        len(host) > 253
        or len(labels) < 2
        or not all(_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise BadRequestError(f"{value!r} is not a host name like mastodon.social")
    return host


@dataclass(frozen=True)
class Settings:
    """The user's choices. ``sites`` maps a host name to whether its uploads are protected."""

    enabled: bool = True
    preset: str = "balanced"
    privacy: str = "local-only"
    sites: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(DEFAULT_SITES, True))

    def to_json(self) -> dict[str, Any]:
        """The JSON object the API answers and the file holds."""
        return {
            "enabled": self.enabled,
            "preset": self.preset,
            "privacy": self.privacy,
            "sites": dict(sorted(self.sites.items())),
        }

    def updated(self, patch: object) -> Settings:
        """A copy with ``patch`` (a ``PUT`` body) applied; :class:`BadRequestError` if invalid."""
        if not isinstance(patch, dict):
            raise BadRequestError("settings must be a JSON object")
        unknown = set(patch) - {"enabled", "preset", "privacy", "sites"}
        if unknown:
            raise BadRequestError(f"unknown settings key(s): {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        if "enabled" in patch:
            if not isinstance(patch["enabled"], bool):
                raise BadRequestError("'enabled' must be true or false")
            changes["enabled"] = patch["enabled"]
        if "preset" in patch:
            if patch["preset"] not in PRESETS:
                raise BadRequestError(f"'preset' must be one of {', '.join(PRESETS)}")
            changes["preset"] = patch["preset"]
        if "privacy" in patch:
            if patch["privacy"] not in PRIVACY_MODES:
                raise BadRequestError(f"'privacy' must be one of {', '.join(PRIVACY_MODES)}")
            changes["privacy"] = patch["privacy"]
        if "sites" in patch:
            changes["sites"] = _merge_sites(self.sites, patch["sites"])
        return replace(self, **changes)


def _merge_sites(current: dict[str, bool], patch: object) -> dict[str, bool]:
    if not isinstance(patch, dict):
        raise BadRequestError("'sites' must be an object mapping host names to true/false/null")
    sites = dict(current)
    for raw, on in patch.items():
        host = normalize_site(raw)
        if on is None:
            sites.pop(host, None)
            if host in DEFAULT_SITES:
                sites[host] = True
        elif isinstance(on, bool):
            sites[host] = on
        else:
            raise BadRequestError(f"site {host!r} must be true, false or null")
    if len(sites) > MAX_SITES:
        raise BadRequestError(f"at most {MAX_SITES} sites")
    return sites


class SettingsStore:
    """``settings.json`` in ``folder``; missing file means defaults with ``default_preset``."""

    def __init__(self, folder: Path, *, default_preset: str) -> None:
        self.folder = folder
        self.path = folder / SETTINGS_FILE
        self.defaults = Settings(preset=default_preset)

    def load(self) -> Settings:
        """The saved settings; defaults if there is no file or it cannot be understood."""
        raw = read_json(self.path, None)
        if raw is None:
            return self.defaults
        try:
            # Saved sites replace the defaults (the user may have removed none, some or all).
            base = self.defaults
            if isinstance(raw, dict) and "sites" in raw:
                base = replace(base, sites={})
            return base.updated(raw)
        except BadRequestError:
            # Not the reason: it could quote a site, and no site may reach the log.
            log.warning("ignoring %s: it holds invalid settings; fix or delete it", SETTINGS_FILE)
            return self.defaults

    def update(self, patch: object) -> Settings:
        """Validate ``patch``, apply it to the saved settings and save them atomically."""
        self.defaults.updated(patch)  # validate before taking the lock
        with locked(self.folder):
            settings = self.load().updated(patch)
            write_json_atomic(self.path, settings.to_json())
        return settings
