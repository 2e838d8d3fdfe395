"""``facecloak pair``: print a one-time code that pairs the browser extension with the daemon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from backend.config import default_config_dir
from backend.pairing import CODE_TTL, PairingCodes, TokenStore


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pair`` and its flags."""
    p = subparsers.add_parser(
        "pair",
        help="print a pairing code for the browser extension",
        description="Print a one-time code, valid for 5 minutes, to type into the FaceCloak "
        "extension. The running daemon accepts it once and gives the extension a token.",
    )
    p.add_argument("--json", action="store_true", help='print {"code": ...} as JSON')
    p.add_argument(
        "--revoke-all",
        action="store_true",
        help="revoke every token issued so far and every code not yet used "
        "(the extension must pair again)",
    )
    p.add_argument(
        "--config-dir",
        type=Path,
        default=None,
        help="the daemon's config folder (default: $FACECLOAK_CONFIG_DIR or ~/.config/facecloak)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Issue a code, or revoke every token and pending code; returns the exit status."""
    folder = args.config_dir or default_config_dir()
    if args.revoke_all:
        # Codes first: a code redeemed meanwhile gives a token that the second step revokes.
        codes = PairingCodes(folder).revoke_all()
        count = TokenStore(folder).revoke_all()
        if args.json:
            print(json.dumps({"revoked": count, "codes_dropped": codes}))
        else:
            print(f"revoked {count} token(s); dropped {codes} pairing code(s) not yet used")
        return 0
    code = PairingCodes(folder).issue()
    if args.json:
        print(json.dumps({"code": code, "expires_in": int(CODE_TTL)}))
    else:
        print(f"Pairing code: {code[:4]}-{code[4:]}")
        print(f"Type it into the FaceCloak extension within {int(CODE_TTL // 60)} minutes.")
    return 0
