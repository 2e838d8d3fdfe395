"""``facecloak service install|uninstall|status``: run the daemon with the user's session.

- Linux: a systemd user unit, ``$XDG_CONFIG_HOME/systemd/user/facecloak.service``, enabled
  and started with ``systemctl --user enable --now``.
- macOS: a LaunchAgent, ``~/Library/LaunchAgents/org.facecloak.daemon.plist``, loaded with
  ``launchctl load -w`` (runs at login, restarted if it exits).
- Windows: a script in the user's Startup folder
  (``%APPDATA%\\Microsoft\\Windows\\Start Menu\\Programs\\Startup\\facecloak.cmd``) that
  starts the daemon minimised at logon; no administrator rights needed.

Each file runs this Python (``sys.executable -m cloak_core.cli serve --port N``) with the
``FACECLOAK_*`` variables set when it was installed. ``--no-start`` only writes the file.
"""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from backend.config import DEFAULT_PORT
from cloak_core.errors import UsageError

UNIT = "facecloak.service"
LABEL = "org.facecloak.daemon"
PLATFORMS = ("linux", "macos", "windows")
PASSED_ON = ("FACECLOAK_CONFIG_DIR", "FACECLOAK_MODEL_PATH", "FACECLOAK_SHARED", "PYTHONPATH")


def current_platform() -> str:
    if sys.platform.startswith("darwin"):
        return "macos"
    if sys.platform.startswith("win"):
        return "windows"
    return "linux"


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def service_file(platform: str) -> Path:
    """Where the file for ``platform`` goes, from this process's environment."""
    if platform == "linux":
        base = os.environ.get("XDG_CONFIG_HOME") or str(_home() / ".config")
        return Path(base) / "systemd" / "user" / UNIT
    if platform == "macos":
        return _home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    appdata = os.environ.get("APPDATA") or str(_home() / "AppData" / "Roaming")
    startup = Path(appdata) / "Microsoft" / "Windows" / "Start Menu" / "Programs" / "Startup"
    return startup / "facecloak.cmd"


def serve_command(port: int) -> list[str]:
    return [sys.executable, "-m", "cloak_core.cli", "serve", "--port", str(port)]


def _environment() -> dict[str, str]:
    return {k: os.environ[k] for k in PASSED_ON if os.environ.get(k)}


def _systemd_quote(arg: str) -> str:
    escaped = arg.replace("%", "%%")
    if any(c in escaped for c in " \t\"\\'$;"):
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def systemd_unit(port: int) -> str:
    env = "".join(f"Environment={_systemd_quote(f'{k}={v}')}\n" for k, v in _environment().items())
    exec_start = " ".join(_systemd_quote(a) for a in serve_command(port))
    return (
        "[Unit]\n"
        "Description=FaceCloak daemon: protects the faces in photos before they are uploaded\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        f"{env}"
        "Restart=on-failure\n"
        "RestartSec=5\n\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def launch_agent(port: int) -> bytes:
    logs = _home() / "Library" / "Logs" / "facecloak.log"
    plist = {
        "Label": LABEL,
        "ProgramArguments": serve_command(port),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "StandardOutPath": str(logs),
        "StandardErrorPath": str(logs),
    }
    if _environment():
        plist["EnvironmentVariables"] = _environment()
    return plistlib.dumps(plist)


def startup_script(port: int) -> str:
    sets = "".join(f'set "{k}={v}"\r\n' for k, v in _environment().items())
    args = " ".join(f'"{a}"' for a in serve_command(port))
    return (
        "@echo off\r\n"
        "rem FaceCloak daemon, started at logon (facecloak service install)\r\n"
        f"{sets}"
        f'start "FaceCloak" /min {args}\r\n'
    )


def render(platform: str, port: int) -> bytes:
    if platform == "linux":
        return systemd_unit(port).encode()
    if platform == "macos":
        return launch_agent(port)
    return startup_script(port).encode()


@dataclass
class Step:
    command: list[str]
    ok: bool
    output: str


def _run(command: list[str]) -> Step:
    if shutil.which(command[0]) is None:
        return Step(command, False, f"{command[0]} is not available here")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    return Step(command, done.returncode == 0, (done.stdout + done.stderr).strip())


def _start_steps(platform: str, path: Path) -> list[list[str]]:
    if platform == "linux":
        return [
            ["systemctl", "--user", "daemon-reload"],
            ["systemctl", "--user", "enable", "--now", UNIT],
        ]
    if platform == "macos":
        return [["launchctl", "load", "-w", str(path)]]
    return []  # the Startup folder starts it at the next logon


def _stop_steps(platform: str, path: Path) -> list[list[str]]:
    if platform == "linux":
        return [
            ["systemctl", "--user", "disable", "--now", UNIT],
            ["systemctl", "--user", "daemon-reload"],
        ]
    if platform == "macos":
        return [["launchctl", "unload", "-w", str(path)]]
    return []


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "service",
        help="run the daemon with your session (install, uninstall, status)",
        description="Install the daemon as a per-user service that starts with your session: "
        "a systemd user unit on Linux, a LaunchAgent on macOS, a Startup-folder script on "
        "Windows. Nothing needs administrator rights.",
    )
    p.add_argument("action", choices=("install", "uninstall", "status"))
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the daemon's port (install)")
    p.add_argument("--platform", choices=PLATFORMS, default=None, help="default: this computer's")
    p.add_argument(
        "--no-start",
        action="store_true",
        help="only write (or remove) the file; do not start or stop anything",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    platform = args.platform or current_platform()
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, not {args.port}")
    path = service_file(platform)
    steps: list[Step] = []
    if args.action == "install":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(render(platform, args.port))
        if not args.no_start:
            steps = [_run(c) for c in _start_steps(platform, path)]
    elif args.action == "uninstall":
        if not args.no_start and path.exists():
            steps = [_run(c) for c in _stop_steps(platform, path)]
        path.unlink(missing_ok=True)
    installed = path.exists()
    result = {
        "platform": platform,
        "file": str(path),
        "installed": installed,
        "running": _answers(args.port),
        "port": args.port,
        "steps": [{"command": s.command, "ok": s.ok, "output": s.output} for s in steps],
    }
    if args.json:
        print(json.dumps(result))
        return 0 if all(s.ok for s in steps) else 1
    verb = {"install": "Wrote", "uninstall": "Removed", "status": "Service file"}[args.action]
    print(
        f"{verb} {path}"
        + ("" if args.action != "status" else f" ({'installed' if installed else 'not installed'})")
    )
    for s in steps:
        state = "ok" if s.ok else "failed"
        print(
            f"  {' '.join(s.command)}: {state}{(': ' + s.output) if s.output and not s.ok else ''}"
        )
    if args.action == "install" and (args.no_start or not all(s.ok for s in steps)):
        hint = {
            "linux": f"systemctl --user daemon-reload && systemctl --user enable --now {UNIT}",
            "macos": f"launchctl load -w {path}",
            "windows": "it starts at your next logon (or run the file now)",
        }[platform]
        print(f"  to start it: {hint}")
    print(
        f"The daemon {'answers' if result['running'] else 'does not answer'} on port {args.port}."
    )
    return 0 if all(s.ok for s in steps) else 1
