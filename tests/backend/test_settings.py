"""Settings through the API: defaults, validation, atomic owner-only persistence."""

from __future__ import annotations

import json

import pytest
from daemon_helpers import EXTENSION, auth, pair, serve

from backend.handlers import SETTINGS_BODY_LIMIT
from backend.settings import DEFAULT_SITES, MAX_SITES, SettingsStore


async def test_defaults_list_the_major_social_sites(config):
    async with serve(config) as client:
        token = await pair(client, config)
        resp = await client.get("/v1/settings", headers=auth(token, EXTENSION))
        assert resp.status == 200
        settings = await resp.json()
        assert settings["enabled"] is True
        assert settings["preset"] == "fast"  # the daemon's --preset until the user picks one
        assert settings["privacy"] == "local-only"
        assert set(settings["sites"]) == set(DEFAULT_SITES)
        assert {"facebook.com", "instagram.com", "x.com", "bsky.app"} <= set(settings["sites"])
        assert all(settings["sites"].values())
    assert not (config.config_dir / "settings.json").exists()  # nothing written until a change


async def test_changes_persist_across_restarts_in_an_owner_only_file(config):
    async with serve(config) as client:
        token = await pair(client, config)
        change = {
            "enabled": False,
            "preset": "strong",
            "sites": {"Mastodon.Social.": True, "x.com": False, "reddit.com": None},
        }
        resp = await client.put("/v1/settings", json=change, headers=auth(token))
        assert resp.status == 200
        saved = await resp.json()
        assert saved["enabled"] is False and saved["preset"] == "strong"
        assert saved["sites"]["mastodon.social"] is True and saved["sites"]["x.com"] is False
        assert saved["sites"]["reddit.com"] is True  # null puts a default site back to on
        path = config.config_dir / "settings.json"
        assert path.stat().st_mode & 0o777 == 0o600
        assert config.config_dir.stat().st_mode & 0o777 == 0o700
        assert json.loads(path.read_text()) == saved
        assert not [p for p in config.config_dir.iterdir() if p.name.endswith(".tmp")]
        # Remove a user-added site.
        resp = await client.put(
            "/v1/settings", json={"sites": {"mastodon.social": None}}, headers=auth(token)
        )
        assert "mastodon.social" not in (await resp.json())["sites"]
    async with serve(config) as client:  # a new daemon reads the file
        token = await pair(client, config)
        again = await (await client.get("/v1/settings", headers=auth(token))).json()
        assert again["enabled"] is False and again["preset"] == "strong"
        assert again["sites"]["x.com"] is False and "mastodon.social" not in again["sites"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"colour": "red"}',
        b'{"enabled": "yes"}',
        b'{"enabled": 1}',
        b'{"preset": "ultra"}',
        b'{"privacy": "cloud"}',
        b'{"sites": ["x.com"]}',
        b'{"sites": {"x.com": "on"}}',
        b'{"sites": {"https://x.com/": true}}',
        b'{"sites": {"127.0.0.1": true}}',
        b'{"sites": {"localhost": true}}',
        b'{"sites": {"a..b": true}}',
        b'{"sites": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # nested past Python's recursion limit
        b'{"enabled": ' + b"1" * 5000 + b"}",  # past Python's limit on an integer's digits
        b'{"enabled": true',
        b'\xff{"enabled": true}',
    ],
)
async def test_invalid_changes_are_400_and_change_nothing(config, body):
    async with serve(config) as client:
        token = await pair(client, config)
        before = await (await client.get("/v1/settings", headers=auth(token))).json()
        resp = await client.put("/v1/settings", data=body, headers=auth(token))
        assert resp.status == 400
        error = await resp.json()
        assert error["error"] == "bad_request" and error["message"]
        after = await (await client.get("/v1/settings", headers=auth(token))).json()
        assert after == before
    assert not (config.config_dir / "settings.json").exists()


def test_a_damaged_settings_file_falls_back_to_defaults(tmp_path):
    (tmp_path / "settings.json").write_text('{"enabled": "maybe"}')
    settings = SettingsStore(tmp_path, default_preset="balanced").load()
    assert settings.enabled is True and set(settings.sites) == set(DEFAULT_SITES)


async def test_a_settings_body_over_its_limit_is_413(config):
    async with serve(config) as client:
        token = await pair(client, config)
        padded = b'{"enabled": false' + b" " * SETTINGS_BODY_LIMIT + b"}"
        resp = await client.put("/v1/settings", data=padded, headers=auth(token))
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
        # The largest settings a user can have fit: 500 sites with long names.
        sites = {f"{'s' * 50}-{i}.{'example' * 5}.org": True for i in range(MAX_SITES - 9)}
        resp = await client.put("/v1/settings", json={"sites": sites}, headers=auth(token))
        assert resp.status == 200, await resp.text()
