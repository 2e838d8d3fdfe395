"""Pairing: one-time codes shown by ``facecloak pair``, exchanged once for a bearer token.

``facecloak pair`` and the daemon are separate processes, so both talk through two
owner-only files in the config folder, which hold digests of the secrets, never the secrets:

- ``pairing.json``: pending codes (digest and expiry time); a code is removed when used.
- ``tokens.json``: issued tokens (digest, the extension origin it was issued to, time) and
  each token's proof key (:mod:`backend.proof`), with which the daemon proves who it is.

The daemon re-reads ``tokens.json`` whenever the file changes, so ``facecloak pair
--revoke-all`` takes effect on the running daemon at its next request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend.errors import RateLimitedError
from backend.proof import derive_proof_key, key_id
from backend.storage import file_signature, locked, read_json, write_json_atomic

log = logging.getLogger(__name__)

PAIRING_FILE = "pairing.json"
TOKENS_FILE = "tokens.json"

# No 0/O, 1/I/L: a code is read off a terminal and typed into the extension.
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
CODE_LENGTH = 8
CODE_TTL = 300.0

# A Chromium extension's origin: its ID is 32 letters a..p.
EXTENSION_ORIGIN = re.compile(r"^chrome-extension://[a-p]{32}$")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def normalize_code(code: str) -> str:
    """A typed code in canonical form: upper case, without spaces or dashes."""
    return re.sub(r"[\s-]", "", code).upper()


class PairingCodes:
    """Pending one-time codes in ``pairing.json`` (digests and expiry times only)."""

    def __init__(self, folder: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.path = folder / PAIRING_FILE
        self.clock = clock

    def issue(self, ttl: float = CODE_TTL) -> str:
        """Create a code valid for ``ttl`` seconds, record its digest, return the code."""
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        now = self.clock()
        with locked(self.folder):
            pending = self._pending(now)
            pending.append({"sha256": _digest(code), "expires": now + ttl})
            write_json_atomic(self.path, {"codes": pending})
        return code

    def revoke_all(self) -> int:
        """Forget every pending code; returns how many there were."""
        with locked(self.folder):
            count = len(self._pending(self.clock()))
            write_json_atomic(self.path, {"codes": []})
        return count

    def redeem(self, code: str) -> bool:
        """True, once, for a pending unexpired code (which is then removed); False otherwise."""
        wanted = _digest(normalize_code(code))
        now = self.clock()
        with locked(self.folder):
            pending = self._pending(now)
            match = next(
                (c for c in pending if hmac.compare_digest(c["sha256"], wanted)),
                None,
            )
            if match is not None:
                pending.remove(match)
                write_json_atomic(self.path, {"codes": pending})
        return match is not None

    def _pending(self, now: float) -> list[dict]:
        codes = read_json(self.path, {}).get("codes", [])
        return [c for c in codes if float(c.get("expires", 0)) > now]


@dataclass(frozen=True)
class TokenRecord:
    """What is known of an issued token: its digest (SHA-256, hex), which identifies it
    without being it, its origin (``None`` for a command-line client), and its proof key
    (``None`` for a token issued before proofs existed)."""

    digest: str
    origin: str | None
    created: float
    proof_key: bytes | None = None


class TokenStore:
    """Issued tokens as digests in ``tokens.json``, re-read whenever the file changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / TOKENS_FILE
        self._signature: tuple[int, int, int] | None = None
        self._records: dict[str, TokenRecord] = {}

    def issue(self, origin: str | None) -> str:
        """A new random token for ``origin``; its digest and its proof key are stored."""
        token = secrets.token_urlsafe(32)
        record = {
            "sha256": _digest(token),
            "origin": origin,
            "created": time.time(),
            "proof_key": derive_proof_key(token).hex(),
        }
        with locked(self.folder):
            tokens = read_json(self.path, {}).get("tokens", [])
            tokens.append(record)
            write_json_atomic(self.path, {"tokens": tokens})
        return token

    def revoke_all(self) -> int:
        """Forget every token; returns how many there were."""
        with locked(self.folder):
            count = len(read_json(self.path, {}).get("tokens", []))
            write_json_atomic(self.path, {"tokens": []})
        return count

    def lookup(self, token: str) -> TokenRecord | None:
        """The record of a valid ``token``, or ``None``."""
        return self._current().get(_digest(token))

    def proof_key(self, wanted_id: str) -> bytes | None:
        """The proof key whose :func:`backend.proof.key_id` is ``wanted_id``, or ``None``."""
        for record in self._current().values():
            if record.proof_key is not None and hmac.compare_digest(
                key_id(record.proof_key), wanted_id
            ):
                return record.proof_key
        return None

    def origins(self) -> frozenset[str]:
        """Extension origins that hold a valid token (the CORS-allowed origins)."""
        return frozenset(r.origin for r in self._current().values() if r.origin)

    def _current(self) -> dict[str, TokenRecord]:
        signature = file_signature(self.path)
        if signature != self._signature:
            tokens = read_json(self.path, {}).get("tokens", [])
            self._records = {
                t["sha256"]: TokenRecord(
                    digest=t["sha256"],
                    origin=t.get("origin"),
                    created=t.get("created", 0.0),
                    proof_key=bytes.fromhex(t["proof_key"]) if t.get("proof_key") else None,
                )
                for t in tokens
            }
            self._signature = signature
        return self._records


class PairingThrottle:
    """Slows failed pairing attempts down without ever refusing the right code.

    Pairing needs no token and every local program may try it, so the code is what guards
    the token: 8 characters of 31, 31**8 = 8.5e11 codes, each valid 5 minutes. Refusing
    every attempt after a few failures (a lockout) would let anyone keep the user from
    pairing, so this slows only failures down, and a correct code is accepted as soon as
    it arrives (backend/README.md gives the numbers).

    Every failed attempt counts. The first ``free`` failures within ``window`` seconds are
    answered at once. Past them, failures are answered one at a time: each answer waits
    until ``delay`` after the previous one, the delay doubling with each further failure
    from ``base`` up to ``cap`` seconds. A failure whose answer would wait more than
    ``max_wait`` seconds is answered at once with :class:`RateLimitedError` (429) instead,
    so that a flood holds few connections open. Times are in seconds.
    """

    def __init__(
        self,
        free: int = 5,
        window: float = 60.0,
        *,
        base: float = 0.5,
        cap: float = 4.0,
        max_wait: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.window = window
        self.base = base
        self.cap = cap
        self.max_wait = max_wait
        self.clock = clock
        # Failures past ``free + steps`` all wait ``cap``: older ones need not be kept.
        steps = max(1, math.ceil(math.log2(max(cap / base, 1.0))) + 1)
        self._failures: deque[float] = deque(maxlen=free + steps)
        self._last_answer = -math.inf

    def failed(self) -> float:
        """Count one failed attempt; return how many seconds its answer must wait.

        Raises :class:`RateLimitedError` when that wait would be over ``max_wait``.
        """
        now = self.clock()
        while self._failures and self._failures[0] <= now - self.window:
            self._failures.popleft()
        self._failures.append(now)
        past_free = len(self._failures) - self.free
        if past_free <= 0:
            return 0.0
        if past_free == 1:
            log.warning("more than %d failed pairing attempts within a minute", self.free)
        answer_at = max(now, self._last_answer) + min(self.cap, self.base * 2 ** (past_free - 1))
        if answer_at - now > self.max_wait:
            raise RateLimitedError(
                "too many wrong pairing codes; check the code `facecloak pair` printed "
                "and try again in a minute"
            )
        self._last_answer = answer_at
        return answer_at - now
