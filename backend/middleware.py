"""The two middlewares: errors to JSON, and the security gate (Host, Origin, token, CORS).

Order in the app: ``error_middleware`` outside, ``security_middleware`` inside, so a
refusal by the gate is answered as JSON like any other error. CORS headers are added
to every response (errors included) by :func:`add_cors_headers`, an
``on_response_prepare`` hook, for the origins the gate let through.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from backend.errors import (
    DaemonError,
    ForbiddenError,
    UnauthorizedError,
    describe,
    log_unexpected,
)
from backend.keys import CONFIG_KEY, TOKEN_KEY, TOKENS_KEY
from backend.logs import ROUTE_KEY
from backend.pairing import EXTENSION_ORIGIN
from cloak_core.errors import FaceCloakError

# Routes (by name) that need no token; and the one an unpaired extension may call.
PUBLIC_ROUTES = frozenset({"health", "pair", "proof"})
PAIRING_ROUTE = "pair"

# Chromium sends no Origin on an extension's GET requests to a host it has access to, so
# the extension also names its origin in this header (a web page cannot send it to the
# daemon: a custom header needs a CORS preflight, which foreign origins fail).
ORIGIN_CLAIM_HEADER = "X-FaceCloak-Origin"

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error as JSON ``{"error", "message"}`` with its status (see backend.errors).

    Also notes the route's template for the access log (never the path itself).
    """
    resource = request.match_info.route.resource
    request[ROUTE_KEY] = resource.canonical if resource is not None else "(no route)"
    try:
        return await handler(request)
    except web.HTTPException as exc:  # aiohttp's own: unknown route, method, body too large
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, exc.reason.lower().replace(" ", "_"))
        return _json_error(exc.status, code, exc.reason)
    except Exception as exc:
        if not isinstance(exc, (DaemonError, FaceCloakError)):
            log_unexpected(exc)
        return _json_error(*describe(exc))


def listening_port(request: web.Request) -> int:
    """The port the request came in on (0 in the config picks a free one)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return sockname[1] if sockname else request.app[CONFIG_KEY].port


def _allowed_hosts(request: web.Request) -> set[str]:
    config = request.app[CONFIG_KEY]
    port = listening_port(request)
    names = {"127.0.0.1", "localhost", "[::1]"}
    names.add(f"[{config.host}]" if ":" in config.host else config.host.lower())
    return {f"{name}:{port}" for name in names}


@web.middleware
async def security_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse foreign ``Host`` (403, DNS rebinding) and ``Origin`` (403), require the token (401).

    Requests without ``Origin`` (command line, curl) are allowed; with one, it must be an
    extension origin that holds a token, or any extension origin on the pairing route. A
    token works only with the origin it was issued to (``Origin``, else the extension's
    ``X-FaceCloak-Origin``; both must agree when both are sent): an extension's token only
    from that extension, a command-line token only without one. The token's record is kept
    in ``request[TOKEN_KEY]`` (jobs belong to the token that created them).
    """
    if request.headers.get("Host", "").lower() not in _allowed_hosts(request):
        raise ForbiddenError("the Host header is not this daemon's loopback address")

    origin = request.headers.get("Origin")
    if origin is not None and allowed_origin(request) is None:
        raise ForbiddenError("this origin is not paired with the daemon")

    # Preflights carry no credentials; the gate checks their Host and Origin only.
    tokens = request.app[TOKENS_KEY]
    if request.match_info.route.name not in PUBLIC_ROUTES and request.method != "OPTIONS":
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        record = tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if record is None:
            raise UnauthorizedError("missing or invalid token; pair with `facecloak pair`")
        claimed = request.headers.get(ORIGIN_CLAIM_HEADER, origin)
        if record.origin != claimed or (origin is not None and claimed != origin):
            raise ForbiddenError(
                "this token was issued to another origin (or to the extension, whose "
                "requests carry its Origin)"
            )
        request[TOKEN_KEY] = record
    return await handler(request)


def allowed_origin(request: web.Request) -> str | None:
    """The request's ``Origin`` if it may call (and get CORS), else ``None``.

    Allowed: extension origins holding a token; on the pairing route, any extension origin.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    if request.match_info.route.name == PAIRING_ROUTE and EXTENSION_ORIGIN.match(origin):
        return origin
    return origin if origin in request.app[TOKENS_KEY].origins() else None


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: CORS headers for an allowed origin, else none."""
    origin = allowed_origin(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "X-FaceCloak-Faces, X-FaceCloak-Seconds"
    response.headers["Vary"] = "Origin"
