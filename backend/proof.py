"""Proof of identity: the daemon shows the extension that it is the daemon it paired with.

Before the extension sends its token or a photo to ``127.0.0.1:PORT`` it must know that
the program listening there is this daemon and not another one that took the port while
the daemon was stopped. Both sides hold a proof key derived from the bearer token at
pairing (:func:`derive_proof_key`; the daemon keeps the key, never the token). The
extension sends a fresh random challenge and the key's id to ``POST /v1/proof``, which
needs no token; the daemon answers with a nonce of its own and an HMAC-SHA256 over both
and the port it listens on (:func:`proof_for`). The extension checks the HMAC and only
then sends anything secret.

An impostor cannot answer without the key: the key has the token's 256 bits, the
challenge is fresh each time, and a program that relays the question to the real daemon
on another port gets an answer bound to that port.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

PROOF_KEY_LABEL = b"facecloak proof key v1"
KEY_ID_LABEL = b"facecloak proof key id v1"
PROOF_LABEL = b"facecloak daemon proof v1"
CHALLENGE_BYTES = 32
NONCE_BYTES = 32


def derive_proof_key(token: str) -> bytes:
    """The 32-byte proof key of a bearer token: HMAC-SHA256(token, label).

    The extension derives the same key from the token with WebCrypto.
    """
    return hmac.new(token.encode("utf-8"), PROOF_KEY_LABEL, hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """A public name for ``key`` (32 hex digits) that says which key to prove with."""
    return hmac.new(key, KEY_ID_LABEL, hashlib.sha256).hexdigest()[:32]


def proof_for(key: bytes, challenge: bytes, nonce: bytes, port: int) -> bytes:
    """HMAC-SHA256 under ``key`` of label, challenge, nonce and the 2-byte port (big-endian)."""
    message = PROOF_LABEL + challenge + nonce + port.to_bytes(2, "big")
    return hmac.new(key, message, hashlib.sha256).digest()


def new_nonce() -> bytes:
    """The daemon's own random contribution to one proof."""
    return secrets.token_bytes(NONCE_BYTES)


def b64url(data: bytes) -> str:
    """Unpadded base64url, as the extension writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def parse_challenge(text: object) -> bytes | None:
    """The challenge's bytes from unpadded base64url, or ``None`` unless it is 32 bytes."""
    if not isinstance(text, str) or len(text) != 43:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError):
        return None
    return data if len(data) == CHALLENGE_BYTES else None
