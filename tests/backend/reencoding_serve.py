"""``facecloak serve`` in a real process, with the re-encoding test double as its protector.

Run as ``python tests/backend/reencoding_serve.py --port N --config-dir DIR ...`` (the
flags of ``facecloak serve``). Everything but the protector is the production path: the
command's flags, its logging set-up, ``backend.server.run`` (descriptor limit, connection
cap, header deadline), aiohttp's HTTP parser and server.
Tests of behaviour that depends on sockets and on the process's log (malformed requests,
pairing floods) use it, so that they need neither models nor minutes of start-up.
"""

from __future__ import annotations

import sys

from daemon_helpers import ReencodingProtector

from backend.commands import serve
from cloak_core.cli import build_parser


def main(argv: list[str]) -> int:
    """Parse ``argv`` as ``facecloak serve``'s flags and serve with ReencodingProtector."""
    args = build_parser().parse_args(["serve", *argv])
    return serve.run(args, protector_factory=lambda _config: ReencodingProtector())


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
