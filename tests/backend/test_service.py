"""``facecloak service``: the per-platform file it writes, checked with the platform's own
tools where this machine has them, in a temporary HOME (never the real user's config)."""

from __future__ import annotations

import json
import plistlib
import shutil
import subprocess
import sys

import pytest

from cloak_core.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("APPDATA", str(tmp_path / "appdata"))
    monkeypatch.setenv("FACECLOAK_CONFIG_DIR", str(tmp_path / "my config"))
    return tmp_path


def _service(capsys, *args):
    status = main(["service", *args, "--no-start", "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_linux_unit_is_written_verified_and_removed(home, capsys):
    status, result = _service(capsys, "install", "--platform", "linux", "--port", "8799")
    assert status == 0 and result["installed"]
    unit = home / "xdg" / "systemd" / "user" / "facecloak.service"
    assert result["file"] == str(unit)
    text = unit.read_text()
    assert f"ExecStart={sys.executable} -m cloak_core.cli serve --port 8799\n" in text
    assert f'Environment="FACECLOAK_CONFIG_DIR={home}/my config"\n' in text  # quoted: a space
    assert "WantedBy=default.target" in text
    if shutil.which("systemd-analyze"):
        ok = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
        )
        assert ok.returncode == 0, ok.stderr
        broken = home / "broken.service"  # the check can fail: a relative ExecStart
        broken.write_text(text.replace(f"ExecStart={sys.executable}", "ExecStart=python"))
        bad = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True)
        assert bad.returncode != 0
    assert _service(capsys, "status", "--platform", "linux")[1]["installed"]
    status, result = _service(capsys, "uninstall", "--platform", "linux")
    assert status == 0 and not result["installed"] and not unit.exists()


def test_macos_launch_agent(home, capsys):
    status, result = _service(capsys, "install", "--platform", "macos")
    path = home / "Library" / "LaunchAgents" / "org.facecloak.daemon.plist"
    assert status == 0 and result["file"] == str(path)
    agent = plistlib.loads(path.read_bytes())
    assert agent["Label"] == "org.facecloak.daemon"
    assert agent["ProgramArguments"] == [
        sys.executable,
        "-m",
        "cloak_core.cli",
        "serve",
        "--port",
        "8765",
    ]
    assert agent["RunAtLoad"] is True
    assert agent["EnvironmentVariables"]["FACECLOAK_CONFIG_DIR"] == str(home / "my config")
    if shutil.which("plutil"):
        subprocess.run(["plutil", "-lint", str(path)], check=True)
    _service(capsys, "uninstall", "--platform", "macos")
    assert not path.exists()


def test_windows_startup_script(home, capsys):
    status, result = _service(capsys, "install", "--platform", "windows", "--port", "9001")
    startup = home / "appdata" / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup"
    script = startup / "facecloak.cmd"
    assert status == 0 and result["file"] == str(script)
    text = script.read_bytes().decode()
    assert text.startswith("@echo off\r\n")
    assert f'"{sys.executable}" "-m" "cloak_core.cli" "serve" "--port" "9001"' in text
    assert f'set "FACECLOAK_CONFIG_DIR={home}/my config"' in text
    _service(capsys, "uninstall", "--platform", "windows")
    assert not script.exists()


def test_bad_port_is_a_usage_error(home, capsys):
    assert main(["service", "install", "--platform", "linux", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
