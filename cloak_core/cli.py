"""The ``facecloak`` command line: the composition root of the project.

Each command is a module with ``add_parser(subparsers)`` and ``run(args) -> int``; the
library's commands live in :mod:`cloak_core.commands`, the daemon's in
:mod:`backend.commands`. Errors are mapped to exit statuses here, in one place:
2 for bad usage, 1 for a failed image or any other reported failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cloak_core import __version__
from cloak_core.errors import FaceCloakError, UsageError

COMMAND_MODULES = (
    "cloak_core.commands.protect",
    "cloak_core.commands.eval",
    "cloak_core.commands.frontier",
    "cloak_core.commands.bench",
    "backend.commands.serve",
    "backend.commands.pair",
    "backend.commands.service",
    "cloak_core.commands.models",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep one line on stderr
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command's sub-parser registered."""
    parser = _Parser(prog="facecloak", description="Protect the faces in your photos.")
    parser.add_argument("--version", action="version", version=f"facecloak {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        sp = module.add_parser(sub)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"facecloak: error: {exc}", file=sys.stderr)
        return 2
    except FaceCloakError as exc:
        print(f"facecloak: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("facecloak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
