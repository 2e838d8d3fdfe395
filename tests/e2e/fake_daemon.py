"""A program that answers on the daemon's port like ``facecloak serve``, but protects nothing.

It hands every photo back unchanged, saying it found a face in it. Without the paired
daemon's proof key it is an impostor (its proofs are random bytes); given the key, it plays
a daemon whose protection silently did nothing. It records every request it gets.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import dataclass

from aiohttp import web

from backend.proof import b64url, parse_challenge, proof_for


@dataclass(frozen=True)
class Seen:
    """One request: method, path, whether it carried a bearer token, its body's size."""

    method: str
    path: str
    token: bool
    body_bytes: int


class FakeDaemon:
    """Listens on 127.0.0.1:``port`` in its own thread until :meth:`stop`."""

    def __init__(self, port: int, proof_key: bytes | None = None) -> None:
        self.port = port
        self.proof_key = proof_key
        self.seen: list[Seen] = []
        self._photos: dict[str, tuple[bytes, str]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        token = request.headers.get("Authorization", "").startswith("Bearer ")
        self.seen.append(Seen(request.method, request.path, token, len(body)))
        return body

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        path = request.path
        if path == "/v1/health":
            queue = {"waiting": 0, "running": 0, "limit": 8}
            return web.json_response(
                {"status": "ready", "version": "9.9", "device": "cpu", "models": [], "queue": queue}
            )
        if path == "/v1/proof":
            challenge = parse_challenge((await request.json()).get("challenge"))
            nonce = secrets.token_bytes(32)
            if self.proof_key is not None and challenge is not None:
                proof = proof_for(self.proof_key, challenge, nonce, self.port)
            else:
                proof = secrets.token_bytes(32)  # it cannot know the key
            return web.json_response({"nonce": b64url(nonce), "proof": b64url(proof)})
        if path == "/v1/settings":
            sites = {}
            return web.json_response(
                {"enabled": True, "preset": "fast", "privacy": "local-only", "sites": sites}
            )
        if path == "/v1/jobs" and request.method == "POST":
            job = secrets.token_hex(8)
            self._photos[job] = (body, request.content_type)
            return web.json_response({"id": job}, status=202)
        parts = path.split("/")  # /v1/jobs/{id}[/result]
        if len(parts) >= 4 and parts[3] in self._photos:
            data, mime = self._photos[parts[3]]
            if len(parts) == 5:
                headers = {"X-FaceCloak-Faces": "1", "X-FaceCloak-Seconds": "0.1"}
                return web.Response(body=data, content_type=mime, headers=headers)
            return web.json_response(
                {"id": parts[3], "state": "done", "progress": 1, "faces": 1, "error": None}
            )
        return web.json_response({"error": "not_found", "message": "no such route"}, status=404)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> FakeDaemon:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
