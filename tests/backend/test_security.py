"""The gate: Host, Origin, bearer token, pairing codes, revocation, CORS and preflights."""

from __future__ import annotations

import asyncio
import time

import pytest
from daemon_helpers import EXTENSION, auth, jpeg_bytes, pair, serve, with_changes

from backend.errors import RateLimitedError
from backend.handlers import PAIR_BODY_LIMIT
from backend.pairing import PairingCodes, PairingThrottle, TokenStore

OTHER_EXTENSION = "chrome-extension://" + "p" * 32


async def test_health_needs_no_token_but_other_routes_do(config):
    async with serve(config) as client:
        health = await client.get("/v1/health")
        assert health.status == 200
        body = await health.json()
        assert body["status"] == "ready"
        assert set(body) >= {"status", "version", "device", "models", "queue"}
        for method, path in [
            ("GET", "/v1/settings"),
            ("POST", "/v1/protect"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/jobs/abc"),
            ("GET", "/v1/jobs/abc/result"),
        ]:
            resp = await client.request(method, path, data=jpeg_bytes())
            assert resp.status == 401, (method, path)
            assert (await resp.json())["error"] == "unauthorized"


async def test_wrong_and_malformed_tokens_are_refused(config):
    async with serve(config) as client:
        token = await pair(client, config)
        for header in [f"Bearer {token}x", "Bearer ", f"Basic {token}", token]:
            resp = await client.get("/v1/settings", headers={"Authorization": header})
            assert resp.status == 401, header
        ok = await client.get("/v1/settings", headers=auth(token))
        assert ok.status == 200


async def test_foreign_host_is_refused_on_every_route(config):
    async with serve(config) as client:
        token = await pair(client, config)
        port = client.server.port
        for host in [f"evil.example:{port}", "127.0.0.1:1", f"localhost.evil.example:{port}", ""]:
            for path in ["/v1/health", "/v1/settings"]:
                resp = await client.get(path, headers={**auth(token), "Host": host})
                assert resp.status == 403, (host, path)
                assert (await resp.json())["error"] == "forbidden"
        for host in [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"]:
            resp = await client.get("/v1/settings", headers={**auth(token), "Host": host})
            assert resp.status == 200, host


async def test_foreign_origin_is_refused_and_gets_no_cors(config):
    async with serve(config) as client:
        token = await pair(client, config)
        for origin in ["https://evil.example", "null", OTHER_EXTENSION]:
            resp = await client.get("/v1/settings", headers=auth(token, origin))
            assert resp.status == 403, origin
            assert "Access-Control-Allow-Origin" not in resp.headers
            health = await client.get("/v1/health", headers={"Origin": origin})
            assert health.status == 403
        # The paired origin gets CORS, also on errors (so the extension can read them).
        ok = await client.get("/v1/settings", headers=auth(token, EXTENSION))
        assert ok.status == 200
        assert ok.headers["Access-Control-Allow-Origin"] == EXTENSION
        bad = await client.get("/v1/jobs/nope", headers=auth(token, EXTENSION))
        assert bad.status == 404
        assert bad.headers["Access-Control-Allow-Origin"] == EXTENSION
        # A token is bound to the origin it was issued to.
        other = await pair(client, config, origin=OTHER_EXTENSION)
        crossed = await client.get("/v1/settings", headers=auth(other, EXTENSION))
        assert crossed.status == 403


async def test_preflight_answers_paired_origins_with_private_network_access(config):
    async with serve(config) as client:
        await pair(client, config)
        asked = {
            "Origin": EXTENSION,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
            "Access-Control-Request-Private-Network": "true",
        }
        resp = await client.options("/v1/protect", headers=asked)
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == EXTENSION
        assert resp.headers["Access-Control-Allow-Private-Network"] == "true"
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        foreign = await client.options(
            "/v1/protect", headers={**asked, "Origin": "https://evil.example"}
        )
        assert foreign.status == 403
        assert "Access-Control-Allow-Origin" not in foreign.headers
        assert "Access-Control-Allow-Private-Network" not in foreign.headers


async def test_unpaired_extension_may_pair_but_web_pages_may_not(config):
    async with serve(config) as client:
        code = PairingCodes(config.config_dir).issue()
        preflight = await client.options(
            "/v1/pair",
            headers={"Origin": EXTENSION, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status == 204
        page = await client.post(
            "/v1/pair",
            json={"code": code, "origin": EXTENSION},
            headers={"Origin": "https://evil.example"},
        )
        assert page.status == 403
        lying = await client.post(
            "/v1/pair",
            json={"code": code, "origin": OTHER_EXTENSION},
            headers={"Origin": EXTENSION},
        )
        assert lying.status == 403
        resp = await client.post("/v1/pair", json={"code": code}, headers={"Origin": EXTENSION})
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == EXTENSION
        token = (await resp.json())["token"]
        assert len(token) >= 40
        # The token file holds its digest and origin, never the token itself.
        text = (config.config_dir / "tokens.json").read_text()
        assert token not in text and EXTENSION in text
        assert code not in (config.config_dir / "pairing.json").read_text()


async def test_pairing_code_works_once(config):
    async with serve(config) as client:
        code = PairingCodes(config.config_dir).issue()
        first = await client.post("/v1/pair", json={"code": code.lower()})  # typed loosely
        assert first.status == 200
        again = await client.post("/v1/pair", json={"code": code})
        assert again.status == 401
        assert (await again.json())["error"] == "unauthorized"


async def test_expired_code_is_refused(config):
    codes = PairingCodes(config.config_dir)
    code = codes.issue(ttl=0.05)
    await asyncio.sleep(0.1)
    async with serve(config) as client:
        resp = await client.post("/v1/pair", json={"code": code})
        assert resp.status == 401


async def test_wrong_codes_slow_down_but_the_right_code_is_accepted_at_once(config):
    async with serve(config) as client:
        good = PairingCodes(config.config_dir).issue()
        for i in range(config.pairing_failures_per_minute):  # a user's typos: answered at once
            resp = await client.post("/v1/pair", json={"code": f"WRONG{i:03d}"})
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        started = time.monotonic()
        resp = await client.post("/v1/pair", json={"code": "WRONG999"})
        assert resp.status == 401
        assert time.monotonic() - started >= 0.45  # past them, each failure waits
        started = time.monotonic()
        resp = await client.post("/v1/pair", json={"code": good})
        assert resp.status == 200
        assert time.monotonic() - started < 0.4  # the right code does not


def test_throttle_answers_failures_one_at_a_time_ever_more_slowly():
    now = [0.0]
    throttle = PairingThrottle(
        free=2, window=60, base=0.5, cap=2.0, max_wait=5, clock=lambda: now[0]
    )
    assert [throttle.failed() for _ in range(2)] == [0.0, 0.0]
    # Failures arriving together: each answer waits for the previous one, plus its delay.
    assert [throttle.failed() for _ in range(3)] == [0.5, 1.5, 3.5]
    with pytest.raises(RateLimitedError):
        throttle.failed()  # its answer would wait 5.5 s: 429 at once
    now[0] = 3.5
    assert throttle.failed() == 2.0  # the delay stops growing at ``cap``
    now[0] = 200.0  # a quiet minute later, failures are free again
    assert [throttle.failed() for _ in range(2)] == [0.0, 0.0]
    assert throttle.failed() == 0.5


async def test_bad_pairing_bodies(config):
    malformed = [
        b"not json",
        b"[1]",
        b'{"code": 5}',
        b'{"code": "A", "extra": 1}',
        b'{"code": "A"',
        b"[" * 4000 + b"]" * 4,  # nested past Python's recursion limit
        b"\xff\xfe{}",
    ]
    async with serve(with_changes(config, pairing_failures_per_minute=100)) as client:
        for body in malformed:
            resp = await client.post("/v1/pair", data=body)
            assert resp.status == 400, body
            error = await resp.json()
            assert error["error"] == "bad_request" and error["message"], body
        resp = await client.post("/v1/pair", json={"code": "X", "origin": "https://a.example"})
        assert resp.status == 400


async def test_pairing_body_over_its_small_limit_is_413(config):
    async with serve(config) as client:
        code = PairingCodes(config.config_dir).issue()
        padded = b'{"code": "' + code.encode() + b'"' + b" " * PAIR_BODY_LIMIT + b"}"
        resp = await client.post("/v1/pair", data=padded)
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"

        async def chunks():  # no Content-Length: refused once past the limit
            yield padded

        resp = await client.post("/v1/pair", data=chunks())
        assert resp.status == 413
        ok = await client.post("/v1/pair", json={"code": code})
        assert ok.status == 200


async def test_malformed_pairing_attempts_count_as_failures(config):
    async with serve(config) as client:
        for _ in range(config.pairing_failures_per_minute):
            assert (await client.post("/v1/pair", data=b"{")).status == 400
        started = time.monotonic()
        resp = await client.post("/v1/pair", data=b"[" * 3000)
        assert resp.status == 400
        assert time.monotonic() - started >= 0.45


async def test_an_extensions_token_is_refused_without_its_origin(config):
    async with serve(config) as client:
        token = await pair(client, config)  # issued to EXTENSION
        assert (await client.get("/v1/settings", headers=auth(token, EXTENSION))).status == 200
        bare = await client.get("/v1/settings", headers=auth(token, origin=None))
        assert bare.status == 403
        assert (await bare.json())["error"] == "forbidden"
        # A token paired without an origin (curl, scripts) works only without one.
        cli = await pair(client, config, origin=None)
        assert (await client.get("/v1/settings", headers=auth(cli, origin=None))).status == 200
        assert (await client.get("/v1/settings", headers=auth(cli, EXTENSION))).status == 403


async def test_jobs_belong_to_the_token_that_created_them(config):
    async with serve(config) as client:
        mine = await pair(client, config)
        other = await pair(client, config)  # the same extension, paired again
        cli = await pair(client, config, origin=None)
        resp = await client.post("/v1/jobs", data=jpeg_bytes(), headers=auth(mine))
        assert resp.status == 202
        job_id = (await resp.json())["id"]
        for _ in range(500):
            status = await client.get(f"/v1/jobs/{job_id}", headers=auth(mine))
            assert status.status == 200
            if (await status.json())["state"] == "done":
                break
            await asyncio.sleep(0.01)
        for stranger in [auth(other), auth(cli, origin=None)]:
            for path in [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result"]:
                resp = await client.get(path, headers=stranger)
                assert resp.status == 404, path
                assert (await resp.json())["error"] == "not_found"
        result = await client.get(f"/v1/jobs/{job_id}/result", headers=auth(mine))
        assert result.status == 200


async def test_revoke_all_drops_codes_not_yet_used(config):
    async with serve(config) as client:
        codes = PairingCodes(config.config_dir)
        pending = codes.issue()
        assert codes.revoke_all() == 1  # as `facecloak pair --revoke-all`
        resp = await client.post("/v1/pair", json={"code": pending})
        assert resp.status == 401
        assert (await pair(client, config)) is not None  # a code issued later works


async def test_revoke_all_takes_effect_on_the_running_daemon(config):
    async with serve(config) as client:
        token = await pair(client, config)
        assert (await client.get("/v1/settings", headers=auth(token, EXTENSION))).status == 200
        assert TokenStore(config.config_dir).revoke_all() == 1  # as `facecloak pair --revoke-all`
        resp = await client.get("/v1/settings", headers=auth(token, origin=None))
        assert resp.status == 401
        # The origin lost its CORS rights with its token.
        resp = await client.get("/v1/settings", headers=auth(token, EXTENSION))
        assert resp.status == 403
        fresh = await pair(client, config)
        assert (await client.get("/v1/settings", headers=auth(fresh))).status == 200


async def test_secret_files_are_owner_only(config):
    async with serve(config) as client:
        await pair(client, config)
    assert config.config_dir.stat().st_mode & 0o777 == 0o700
    for name in ["tokens.json", "pairing.json"]:
        assert (config.config_dir / name).stat().st_mode & 0o777 == 0o600
