"""``facecloak pair`` and ``facecloak serve`` as a user runs them (the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.pairing import PairingCodes, TokenStore

ROOT = Path(__file__).resolve().parents[2]


def facecloak(*args: str, config_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FACECLOAK_CONFIG_DIR": str(config_dir)}
    return subprocess.run(
        [sys.executable, "-m", "cloak_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_pair_prints_a_code_the_daemon_accepts_once(tmp_path):
    out = facecloak("pair", "--json", config_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    code = json.loads(out.stdout)["code"]
    assert len(code) == 8 and code.isalnum() and code.isupper()
    assert not set(code) & set("01IOL")
    assert code not in (tmp_path / "pairing.json").read_text()  # only its digest is kept
    assert (tmp_path / "pairing.json").stat().st_mode & 0o777 == 0o600
    codes = PairingCodes(tmp_path)
    assert codes.redeem(f"{code[:4]}-{code[4:]}".lower())
    assert not codes.redeem(code)


def test_pair_human_output_and_revoke_all(tmp_path):
    out = facecloak("pair", config_dir=tmp_path)
    assert out.returncode == 0 and "Pairing code:" in out.stdout
    tokens = TokenStore(tmp_path)
    token = tokens.issue("chrome-extension://" + "a" * 32)
    assert tokens.lookup(token) is not None
    pending = PairingCodes(tmp_path).issue()  # printed before, typed in after: refused
    out = facecloak("pair", "--revoke-all", "--json", config_dir=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout) == {"revoked": 1, "codes_dropped": 2}
    assert tokens.lookup(token) is None
    assert tokens.origins() == frozenset()
    assert not PairingCodes(tmp_path).redeem(pending)
    out = facecloak("pair", "--revoke-all", config_dir=tmp_path)
    assert out.returncode == 0 and "revoked 0 token(s); dropped 0" in out.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])
def test_serve_refuses_a_non_loopback_address(tmp_path, host):
    out = facecloak("serve", "--host", host, "--port", "0", config_dir=tmp_path)
    assert out.returncode == 2
    assert "loopback" in out.stderr and host in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def _serve_config(tmp_path, *flags: str):
    """The daemon's configuration that `facecloak serve FLAGS` would run with."""
    import argparse

    from backend.commands.serve import add_parser, build_config

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return build_config(parser.parse_args(["serve", *flags, "--config-dir", str(tmp_path)]))


def test_serve_face_threshold_reaches_the_detector(tmp_path):
    from cloak_core.detect import DetectorConfig

    assert _serve_config(tmp_path, "--face-threshold", "0.6").face_threshold == 0.6
    assert _serve_config(tmp_path).face_threshold == DetectorConfig().face_threshold
    out = facecloak("serve", "--face-threshold", "1.5", "--port", "0", config_dir=tmp_path)
    assert out.returncode == 2 and "face_threshold" in out.stderr


def test_serve_collection_wait_reaches_the_worker(tmp_path):
    from backend.config import DaemonConfig

    assert _serve_config(tmp_path, "--collection-wait", "12.5").collection_wait == 12.5
    default = DaemonConfig(config_dir=tmp_path).collection_wait
    assert _serve_config(tmp_path).collection_wait == default
    out = facecloak("serve", "--collection-wait", "0", "--port", "0", config_dir=tmp_path)
    assert out.returncode == 2 and "collection_wait" in out.stderr


def test_serve_no_verify_loads_only_the_ensemble(tmp_path, store):
    from backend.protection import load_protector
    from cloak_core.models import default_ensemble, unseen

    ensemble = default_ensemble(store)
    others = unseen(store, ensemble)
    assert others, "the store holds no recogniser outside the ensemble to leave unloaded"
    on, off = _serve_config(tmp_path), _serve_config(tmp_path, "--no-verify")
    assert on.verify and not off.verify
    assert load_protector(on).verify_names == others
    protector = load_protector(off)
    assert protector.verify_names == [] and protector.model_names == ensemble
    assert not set(protector._models) & set(others)
