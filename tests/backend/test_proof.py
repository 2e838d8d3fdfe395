"""The daemon proves who it is (POST /v1/proof) before the extension sends it anything secret;
the extension names its origin in X-FaceCloak-Origin on requests without Origin."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets

from daemon_helpers import EXTENSION, auth, pair, serve

from backend.pairing import PairingCodes, TokenStore
from backend.proof import derive_proof_key, key_id, proof_for


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def ask_proof(client, key: bytes, challenge: bytes, origin: str | None = EXTENSION):
    headers = {"Origin": origin} if origin else {}
    body = {"key_id": key_id(key), "challenge": b64url(challenge)}
    return await client.post("/v1/proof", json=body, headers=headers)


def test_key_derivation_is_hmac_of_the_token():
    """The extension derives the same key with WebCrypto: HMAC-SHA256(token, label)."""
    token = "abc"
    expected = hmac.new(b"abc", b"facecloak proof key v1", hashlib.sha256).digest()
    assert derive_proof_key(token) == expected
    named = hmac.new(expected, b"facecloak proof key id v1", hashlib.sha256).hexdigest()
    assert key_id(expected) == named[:32]


async def test_the_daemon_proves_it_holds_the_paired_key(config):
    async with serve(config) as client:
        resp = await client.post(
            "/v1/pair",
            json={"code": _code(config), "origin": EXTENSION},
            headers={"Origin": EXTENSION},
        )
        paired = await resp.json()
        key = derive_proof_key(paired["token"])
        assert paired["key_id"] == key_id(key)

        challenge = secrets.token_bytes(32)
        resp = await ask_proof(client, key, challenge)
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
        answer = await resp.json()
        nonce = unb64url(answer["nonce"])
        assert len(nonce) == 32
        expected = proof_for(key, challenge, nonce, client.server.port)
        assert hmac.compare_digest(unb64url(answer["proof"]), expected)
        # Bound to the port it listens on: an answer relayed from another port does not fit.
        assert unb64url(answer["proof"]) != proof_for(key, challenge, nonce, client.server.port + 1)
        # A fresh nonce every time.
        again = await (await ask_proof(client, key, challenge)).json()
        assert again["nonce"] != answer["nonce"]


async def test_unknown_keys_and_bad_challenges_are_refused(config):
    async with serve(config) as client:
        token = await pair(client, config)
        key = derive_proof_key(token)
        resp = await ask_proof(client, secrets.token_bytes(32), secrets.token_bytes(32))
        assert resp.status == 401
        assert (await resp.json())["error"] == "unauthorized"
        for challenge in ["", "short", b64url(b"x" * 31), b64url(b"x" * 33), "!" * 43, 5]:
            body = {"key_id": key_id(key), "challenge": challenge}
            resp = await client.post("/v1/proof", json=body, headers={"Origin": EXTENSION})
            assert resp.status == 400, challenge
        resp = await client.post(
            "/v1/proof", json={"key_id": key_id(key), "challenge": b64url(b"x" * 32), "x": 1}
        )
        assert resp.status == 400
        resp = await client.post("/v1/proof", data=json.dumps({"pad": "x" * 2000}))
        assert resp.status == 413
        # A web page may not ask (its origin is not paired), and revoked keys are gone.
        resp = await ask_proof(client, key, b"x" * 32, origin="https://evil.example")
        assert resp.status == 403
        TokenStore(config.config_dir).revoke_all()
        assert (await ask_proof(client, key, b"x" * 32, origin=None)).status == 401


async def test_tokens_from_before_proofs_have_no_key(config):
    """A token paired by an older daemon still authenticates but cannot be proven: the
    extension then asks the user to pair again."""
    async with serve(config) as client:
        token = await pair(client, config)
        path = config.config_dir / "tokens.json"
        records = json.loads(path.read_text())
        for record in records["tokens"]:
            del record["proof_key"]
        path.write_text(json.dumps(records))
        resp = await ask_proof(client, derive_proof_key(token), b"x" * 32)
        assert resp.status == 401
        assert (await client.get("/v1/settings", headers=auth(token))).status == 200


async def test_the_extension_may_name_its_origin_in_a_header(config):
    """Chromium sends no Origin on an extension's GETs; X-FaceCloak-Origin stands in."""
    async with serve(config) as client:
        token = await pair(client, config)
        claim = {"Authorization": f"Bearer {token}", "X-FaceCloak-Origin": EXTENSION}
        assert (await client.get("/v1/settings", headers=claim)).status == 200
        other = {**claim, "X-FaceCloak-Origin": "chrome-extension://" + "p" * 32}
        assert (await client.get("/v1/settings", headers=other)).status == 403
        # With both, they must agree.
        both = {**claim, "Origin": EXTENSION}
        assert (await client.get("/v1/settings", headers=both)).status == 200
        cli = await pair(client, config, origin=None)
        mixed = {"Authorization": f"Bearer {cli}", "X-FaceCloak-Origin": EXTENSION}
        assert (await client.get("/v1/settings", headers=mixed)).status == 403
        preflight = await client.options(
            "/v1/settings",
            headers={"Origin": EXTENSION, "Access-Control-Request-Method": "GET"},
        )
        assert "X-FaceCloak-Origin" in preflight.headers["Access-Control-Allow-Headers"]


def _code(config) -> str:
    return PairingCodes(config.config_dir).issue()
