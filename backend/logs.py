"""What the daemon writes to its log, and how aiohttp is kept from writing more.

The log may hold one line per request (method, route template, status, faces, seconds)
and the daemon's own events, never a token, a pairing code, a job id, a site, a query
string or image content. Two paths of aiohttp's server would write request data:

- A malformed request (a bad header, a bad request line) is logged by aiohttp's
  request handler as "Error handling request" with the parser's exception, whose message
  quotes the raw bytes of the offending line, an ``Authorization`` header included.
  :class:`ServerLog` is the logger the request handler is given instead of
  ``aiohttp.server``: it keeps the event and the exception's type, drops the exception's
  message, its traceback and every argument.
- aiohttp's default access log writes the request line (path and query). The daemon
  uses :class:`AccessLogger` instead, which also copes with malformed requests, which
  never reach a route.

:func:`redact_aiohttp_records` adds the same rule to the process's log handlers, for
records that other aiohttp loggers might emit; ``facecloak serve`` installs it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# Set on each request that reached the app (by backend.middleware.error_middleware): the
# route's template, such as /v1/jobs/{id}, which is all the access log says of the path.
ROUTE_KEY = web.RequestKey("route", str)

SERVER_LOGGER = "facecloak.server"
ACCESS_LOGGER = "facecloak.access"

_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[a-zA-Z%]")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, route template, status, faces, seconds.

    A request that aiohttp could not parse never reaches a route; it is logged as
    ``- (malformed request) 400``. A method outside the standard ones is logged as ``-``
    (a method is any token a client chooses).
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.get(ROUTE_KEY, "(malformed request)")
        method = request.method if request.method in _METHODS else "-"
        faces = response.headers.get("X-FaceCloak-Faces", "-")
        self.logger.info("%s %s %d faces=%s %.3fs", method, route, response.status, faces, time)


class ServerLog(logging.LoggerAdapter):
    """The logger given to aiohttp's request handler: events without request data.

    aiohttp logs a malformed request with the parser's exception, whose message quotes the
    raw request (headers, bearer token and all). This keeps the event's fixed text and the
    exception's type name; the message, the traceback and the arguments are dropped.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger(SERVER_LOGGER), {})

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, "%s", msg, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        exc = kwargs.pop("exc_info", None)
        kwargs.pop("stack_info", None)
        text = _fixed_text(msg)
        kind = _exception_type(exc)
        return (f"{text} ({kind})" if kind else text), kwargs


def redact_aiohttp_records(record: logging.LogRecord) -> bool:
    """A handler filter: records of ``aiohttp.*`` loggers keep only their fixed text.

    Drops the arguments, the traceback and the exception's message (its type is kept), so
    no request data that aiohttp might log reaches the output. Always keeps the record.
    """
    if record.name == "aiohttp" or record.name.startswith("aiohttp."):
        kind = _exception_type(record.exc_info)
        text = _fixed_text(record.msg)
        record.msg = f"{text} ({kind})" if kind else text
        record.args = None
        record.exc_info = record.exc_text = record.stack_info = None
    return True


def configure_logging() -> None:
    """The daemon's log: INFO and up on stderr, aiohttp's records redacted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        if redact_aiohttp_records not in handler.filters:
            handler.addFilter(redact_aiohttp_records)


def _fixed_text(msg: object) -> str:
    # aiohttp's templates are fixed strings ("Error handling request from %s"); the
    # placeholders stay unfilled. Anything else (an object) is not ours to print.
    text = msg if isinstance(msg, str) else type(msg).__name__
    return _PLACEHOLDER.sub("-", text)


def _exception_type(exc_info: object) -> str | None:
    if isinstance(exc_info, BaseException):
        return type(exc_info).__name__
    if isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        return exc_info[0].__name__
    if exc_info:  # True: the exception being handled
        current = sys.exc_info()[0]
        return current.__name__ if current is not None else None
    return None
