"""Route handlers: each parses the request, calls one thing, and answers.

Errors are raised, never answered here: :mod:`backend.middleware` turns them into JSON
with the status :mod:`backend.errors` gives them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web

from backend.errors import (
    BadRequestError,
    DaemonError,
    ForbiddenError,
    NotFoundError,
    NotReadyError,
    RequestTimeoutError,
    TooLargeError,
    UnauthorizedError,
)
from backend.jobs import Job
from backend.keys import (
    CODES_KEY,
    CONFIG_KEY,
    PAIRING_THROTTLE_KEY,
    SETTINGS_KEY,
    TOKEN_KEY,
    TOKENS_KEY,
    WORKER_KEY,
)
from backend.middleware import ORIGIN_CLAIM_HEADER, listening_port
from backend.pairing import EXTENSION_ORIGIN
from backend.proof import b64url, derive_proof_key, key_id, new_nonce, parse_challenge, proof_for
from backend.protection import inspect_image
from backend.settings import normalize_site
from cloak_core import __version__
from cloak_core.presets import PRESETS

# Bodies of the JSON routes. A pairing body is a code and an origin (under 100 bytes);
# a settings body is at most 500 sites, about 30 bytes each in practice (64 KiB holds
# 500 names of 100 characters).
PAIR_BODY_LIMIT = 4 * 1024
SETTINGS_BODY_LIMIT = 64 * 1024
PROOF_BODY_LIMIT = 1024
# A collection's label (the client's own random name for one upload) and its largest size.
COLLECTION_LABEL = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_COLLECTION = 64


async def health(request: web.Request) -> web.Response:
    """``GET /v1/health``: status (starting/ready/failed/stopping), device, models, presets,
    queue."""
    worker = request.app[WORKER_KEY]
    protector = worker.protector
    body: dict[str, Any] = {
        "status": worker.status,
        "version": __version__,
        "device": str(protector.device) if protector else request.app[CONFIG_KEY].device,
        "models": list(protector.model_names) if protector else [],
        "presets": list(PRESETS),
        "queue": worker.queue_info(),
    }
    return web.json_response(body)


async def pair(request: web.Request) -> web.Response:
    """``POST /v1/pair {"code", "origin"}``: a valid code, once, for ``{"token"}``.

    ``origin`` is the extension's origin (``chrome-extension://ID``), which then gets CORS;
    it defaults to the request's ``Origin`` and must match it when both are given. A
    correct code is accepted at once; failed attempts (wrong codes, malformed bodies) are
    answered ever more slowly, one at a time (see :class:`backend.pairing.PairingThrottle`).
    """
    try:
        body = await _json_object(request, limit=PAIR_BODY_LIMIT, allowed={"code", "origin"})
        code, origin = body.get("code"), body.get("origin", request.headers.get("Origin"))
        if not isinstance(code, str):
            raise BadRequestError("'code' must be the code that `facecloak pair` printed")
        if origin is not None and (
            not isinstance(origin, str) or not EXTENSION_ORIGIN.match(origin)
        ):
            raise BadRequestError("'origin' must be an extension origin, chrome-extension://<id>")
        if request.headers.get("Origin", origin) != origin:
            raise ForbiddenError("'origin' differs from the request's Origin")
        if not request.app[CODES_KEY].redeem(code):
            raise UnauthorizedError("the pairing code is wrong, expired or already used")
    except DaemonError:  # every failed attempt counts, malformed ones included
        # A client that hangs up meanwhile does not give its place in the line back.
        await asyncio.sleep(request.app[PAIRING_THROTTLE_KEY].failed())
        raise
    token = request.app[TOKENS_KEY].issue(origin)
    return web.json_response({"token": token, "key_id": key_id(derive_proof_key(token))})


async def proof(request: web.Request) -> web.Response:
    """``POST /v1/proof {"key_id", "challenge"}``: ``{"nonce", "proof"}``, no token needed.

    Proves that this daemon holds the proof key the extension paired with (see
    :mod:`backend.proof`); 401 for a key this daemon does not hold.
    """
    body = await _json_object(request, limit=PROOF_BODY_LIMIT, allowed={"key_id", "challenge"})
    challenge = parse_challenge(body.get("challenge"))
    if challenge is None or not isinstance(body.get("key_id"), str):
        raise BadRequestError("'challenge' must be 32 bytes in base64url, 'key_id' a string")
    key = request.app[TOKENS_KEY].proof_key(body["key_id"])
    if key is None:
        raise UnauthorizedError("this daemon holds no such key; pair with `facecloak pair`")
    nonce = new_nonce()
    mac = proof_for(key, challenge, nonce, listening_port(request))
    answer = {"nonce": b64url(nonce), "proof": b64url(mac)}
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def protect(request: web.Request) -> web.Response:
    """``POST /v1/protect?site=HOST&preset=P``: image bytes in, protected bytes out.

    Answers with the same format and MIME type, and ``X-FaceCloak-Faces`` and
    ``X-FaceCloak-Seconds`` headers. If the client disconnects, the job is cancelled.
    """
    data, preset, decoded_bytes = await _image_request(request)
    worker = request.app[WORKER_KEY]
    job = worker.submit(data, preset, register=False, decoded_bytes=decoded_bytes)
    del data
    try:
        await job.wait()
    except asyncio.CancelledError:  # the client went away (handler cancellation)
        worker.abandon(job)
        raise
    return _result_response(job)


async def create_job(request: web.Request) -> web.Response:
    """``POST /v1/jobs?site=HOST&preset=P[&collection=ID&collection_size=N]``: queue the
    image, answer 202 ``{"id"}`` at once.

    The job belongs to the token that created it; other tokens get 404 for it. The jobs
    of one upload of several photos name the same ``collection`` (8-64 letters, digits,
    ``-`` or ``_``, chosen by the client) and how many photos it holds: they are protected
    in one batch, as one person's photos (see ``backend.jobs``). A collection is the
    token's own: another token's jobs never join it.
    """
    collection, size = _collection(request)  # refused before a body is read in vain
    data, preset, decoded_bytes = await _image_request(
        request, extra=("collection", "collection_size")
    )
    owner = request[TOKEN_KEY].digest
    job = request.app[WORKER_KEY].submit(
        data,
        preset,
        register=True,
        owner=owner,
        decoded_bytes=decoded_bytes,
        collection=None if collection is None else (owner, collection),
        collection_size=size,
    )
    return web.json_response({"id": job.id}, status=202, headers={"Location": f"/v1/jobs/{job.id}"})


async def job_status(request: web.Request) -> web.Response:
    """``GET /v1/jobs/{id}``: ``{"id", "state", "progress", "faces", "error"}``."""
    job = request.app[WORKER_KEY].get(request.match_info["id"], owner=request[TOKEN_KEY].digest)
    return web.json_response(job.to_json())


async def job_result(request: web.Request) -> web.Response:
    """``GET /v1/jobs/{id}/result``: the protected bytes once done (409 before; its error)."""
    job = request.app[WORKER_KEY].get(request.match_info["id"], owner=request[TOKEN_KEY].digest)
    if not job.finished:
        raise NotReadyError(f"the job is {job.state.value}; ask again when it is done")
    return _result_response(job)


async def job_preview(request: web.Request) -> web.Response:
    """``GET /v1/jobs/{id}/preview``: the faces of the last protected photo, before and after.

    ``{"id", "preset", "faces": [{"before", "after", "models", "matched", ...}]}`` (see
    :func:`backend.jobs.preview_payload`). The crops show the original photo's faces, so
    like every job route it needs the token of the job's owner and the extension's origin;
    only the latest ``/v1/jobs`` job has one (404 for an older job's, 409 before it is done).
    """
    job = request.app[WORKER_KEY].get(request.match_info["id"], owner=request[TOKEN_KEY].digest)
    if not job.finished:
        raise NotReadyError(f"the job is {job.state.value}; ask again when it is done")
    if job.error is not None:
        raise job.error
    if job.preview is None:
        raise NotFoundError("no preview for this job: only the last photo's is kept")
    return web.json_response(job.preview, headers={"Cache-Control": "no-store"})


async def get_settings(request: web.Request) -> web.Response:
    """``GET /v1/settings``: ``{"enabled", "preset", "privacy", "sites": {host: bool}}``."""
    return web.json_response(request.app[SETTINGS_KEY].load().to_json())


async def put_settings(request: web.Request) -> web.Response:
    """``PUT /v1/settings``: any subset of the settings' keys; answers the saved settings."""
    body = await _json_object(request, limit=SETTINGS_BODY_LIMIT)
    return web.json_response(request.app[SETTINGS_KEY].update(body).to_json())


async def preflight(request: web.Request) -> web.Response:
    """``OPTIONS``: a CORS preflight (the gate has already checked Host and Origin).

    Answers Private Network Access (``Access-Control-Allow-Private-Network``) when asked.
    """
    if "Origin" not in request.headers:
        raise BadRequestError("a preflight request needs an Origin")
    methods = sorted({route.method for route in request.match_info.route.resource})
    headers = {
        "Access-Control-Allow-Methods": ", ".join(methods),
        "Access-Control-Allow-Headers": f"Authorization, Content-Type, {ORIGIN_CLAIM_HEADER}",
        "Access-Control-Max-Age": "600",
    }
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return web.Response(status=204, headers=headers)


# -- parsing and answering ------------------------------------------------------------


def _collection(request: web.Request) -> tuple[str | None, int]:
    """``collection`` and ``collection_size`` from the query: both or neither."""
    label, size = request.query.get("collection"), request.query.get("collection_size")
    if label is None and size is None:
        return None, 0
    if label is None or not COLLECTION_LABEL.fullmatch(label):
        raise BadRequestError("collection must be 8 to 64 letters, digits, '-' or '_'")
    whole = size is not None and size.isascii() and size.isdigit()
    if not whole or not 2 <= int(size) <= MAX_COLLECTION:
        raise BadRequestError(f"collection_size must be a whole number from 2 to {MAX_COLLECTION}")
    return label, int(size)


async def _image_request(
    request: web.Request, extra: tuple[str, ...] = ()
) -> tuple[bytes, str, int]:
    """The body's image bytes (checked up to the header), the preset to use, and the bytes
    its decoded image will take. ``extra``: query parameters the caller reads itself."""
    unknown = set(request.query) - {"site", "preset", *extra}
    if unknown:
        raise BadRequestError(f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    if "site" in request.query:
        normalize_site(request.query["site"])  # validated only; never logged or stored
    preset = request.query.get("preset") or request.app[SETTINGS_KEY].load().preset
    if preset not in PRESETS:
        raise BadRequestError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    request.app[WORKER_KEY].check_accepting()  # refuse before reading a body in vain
    config = request.app[CONFIG_KEY]
    if request.content_length is not None and request.content_length > config.max_bytes:
        raise TooLargeError(f"the body is over the limit of {config.max_bytes // 2**20} MB")
    # client_max_size enforces the limit without Content-Length
    data = await _within_body_timeout(request, request.read())
    header = inspect_image(
        data, max_pixels=config.max_pixels, max_decoded_bytes=config.max_decoded_bytes
    )
    return data, preset, header.decoded_bytes


T = TypeVar("T")


async def _within_body_timeout(request: web.Request, reading: Awaitable[T]) -> T:
    """``reading``, or :class:`RequestTimeoutError` (408) if the body takes longer than
    ``body_timeout`` to arrive: a client that sends its body a byte at a time would
    otherwise hold its connection (and a place under the connection cap) for ever."""
    timeout = request.app[CONFIG_KEY].body_timeout
    try:
        return await asyncio.wait_for(reading, timeout)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(
            f"the request's body did not arrive within {timeout:g} s"
        ) from None


def _result_response(job: Job) -> web.Response:
    if job.error is not None:
        raise job.error
    result = job.result
    return web.Response(
        body=result.data,
        content_type=result.mime,
        headers={
            "X-FaceCloak-Faces": str(result.faces),
            "X-FaceCloak-Seconds": f"{result.seconds:.3f}",
            "Cache-Control": "no-store",
        },
    )


async def _json_object(
    request: web.Request, *, limit: int, allowed: set[str] | None = None
) -> dict[str, Any]:
    """The body as a JSON object of at most ``limit`` bytes (413 past it, 400 if malformed)."""
    data = await _read_small_body(request, limit)
    try:
        body = json.loads(data or b"null")
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, a 5000-digit number, deep nesting
        raise BadRequestError("the body is not valid JSON (or is nested too deeply)") from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    if allowed is not None and set(body) - allowed:
        raise BadRequestError(f"unknown key(s): {', '.join(sorted(set(body) - allowed))}")
    return body


async def _read_small_body(request: web.Request, limit: int) -> bytes:
    """The body if it is at most ``limit`` bytes; :class:`TooLargeError` as soon as it is not.

    A ``Content-Length`` over the limit is refused before any of the body is read, a body
    without one once ``limit + 1`` bytes have come (aiohttp then discards the rest).
    """
    too_large = TooLargeError(f"the body is over this route's limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large

    async def read() -> bytes:
        data = bytearray()
        while chunk := await request.content.read(limit + 1 - len(data)):
            data += chunk
            if len(data) > limit:
                raise too_large
        return bytes(data)

    return await _within_body_timeout(request, read())
