"""``facecloak serve``: run the local daemon that the browser extension talks to."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from backend import server
from backend.app import create_app, runner_options
from backend.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    PRIVACY_MODES,
    DaemonConfig,
    default_config_dir,
)
from backend.logs import configure_logging
from backend.protection import ProtectorFactory, load_protector
from cloak_core.errors import FaceCloakError
from cloak_core.presets import DEFAULT_PRESET, PRESETS

log = logging.getLogger("facecloak.serve")

# Extra seconds aiohttp waits for answers to be written after the worker's deadline.
_ANSWER_GRACE = 5.0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` and its flags."""
    defaults = DaemonConfig(config_dir=Path("."))
    p = subparsers.add_parser(
        "serve",
        help="run the local daemon the browser extension talks to",
        description="Run the local HTTP daemon (loopback only) that protects photos for the "
        "browser extension. Pair the extension with `facecloak pair`.",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="loopback address to listen on")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    p.add_argument("--privacy", choices=PRIVACY_MODES, default="local-only")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=DEFAULT_PRESET,
        help="preset when neither the request nor the settings name one",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--face-threshold",
        type=float,
        default=defaults.face_threshold,
        metavar="S",
        help="protect every region the recall detector scores at least S, 0..1 "
        "(default %(default)s; lower finds more faces, with more false alarms)",
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=defaults.verify,
        help="load the recognisers the attack ensemble leaves out, so each preview says "
        "whether models the perturbation was not made with still match its faces "
        "(default on; --no-verify saves their memory and the preview's time)",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        default=None,
        help="settings, tokens and pairing codes (default: $FACECLOAK_CONFIG_DIR "
        "or ~/.config/facecloak)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=defaults.queue_size,
        help="images that may wait for the worker (default %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="waiting images protected together (default %(default)s)",
    )
    p.add_argument(
        "--collection-wait",
        type=float,
        default=defaults.collection_wait,
        metavar="SECONDS",
        help="how long the first photo of one upload of several waits for the others, so "
        "they are protected together (default %(default)s)",
    )
    p.add_argument(
        "--job-timeout",
        type=float,
        default=defaults.job_timeout,
        help="seconds one image may run (default %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="connections open at once; past it, idle ones are closed (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        help="seconds a connection has to send a request's headers (default %(default)s)",
    )
    p.add_argument(
        "--shutdown-deadline",
        type=float,
        default=defaults.shutdown_deadline,
        help="seconds the running image may take to finish on SIGTERM (default %(default)s)",
    )
    return p


def build_config(args: argparse.Namespace) -> DaemonConfig:
    """The daemon's configuration from parsed flags (UsageError for bad values)."""
    return DaemonConfig(
        config_dir=args.config_dir or default_config_dir(),
        host=args.host,
        port=args.port,
        privacy=args.privacy,
        preset=args.preset,
        device=args.device,
        face_threshold=args.face_threshold,
        queue_size=args.queue_size,
        batch_size=args.batch_size,
        collection_wait=args.collection_wait,
        job_timeout=args.job_timeout,
        shutdown_deadline=args.shutdown_deadline,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        verify=args.verify,
    )


def run(args: argparse.Namespace, protector_factory: ProtectorFactory = load_protector) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; returns the exit status."""
    config = build_config(args)
    configure_logging()
    app = create_app(config, protector_factory)
    try:
        server.run(
            app,
            config,
            runner_options=runner_options(),
            on_listening=lambda url: log.info("listening on %s (privacy %s)", url, config.privacy),
            shutdown_timeout=config.shutdown_deadline + _ANSWER_GRACE,
        )
    except OSError as exc:
        raise FaceCloakError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror}"
        ) from None
    log.info("stopped")
    return 0
