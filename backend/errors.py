"""The daemon's errors and the one place where every error becomes an HTTP status.

An error answer is always JSON ``{"error": code, "message": text}``. Library errors
(:mod:`cloak_core.errors`) and the daemon's own (below) are mapped by :func:`describe`.
"""

from __future__ import annotations

import logging
import traceback

from cloak_core.errors import (
    CancelledError,
    FaceCloakError,
    ImageError,
    ImageTooLargeError,
    ModelStoreError,
    SystemLibraryError,
    UnsupportedImageError,
    UsageError,
)

log = logging.getLogger("backend")


class DaemonError(Exception):
    """An error of the HTTP service itself; ``status`` and ``code`` say how it is answered."""

    status = 500
    code = "internal"


class InternalError(DaemonError):
    """A bug (an unexpected exception), already logged with its stack where it happened."""

    status = 500
    code = "internal"

    def __init__(self) -> None:
        super().__init__("internal error; see the daemon's log")


class BadRequestError(DaemonError):
    """A malformed request: bad JSON, unknown keys, wrong types, a bad query parameter."""

    status = 400
    code = "bad_request"


class UnauthorizedError(DaemonError):
    """No bearer token, or one that is not (or no longer) valid."""

    status = 401
    code = "unauthorized"


class ForbiddenError(DaemonError):
    """A ``Host`` that is not the daemon's loopback address, or a foreign ``Origin``."""

    status = 403
    code = "forbidden"


class NotFoundError(DaemonError):
    """An unknown (or expired) job, or an unknown route."""

    status = 404
    code = "not_found"


class NotReadyError(DaemonError):
    """A job's result was asked for before the job finished."""

    status = 409
    code = "not_ready"


class RequestTimeoutError(DaemonError):
    """The request's body did not arrive within the time allowed."""

    status = 408
    code = "request_timeout"


class TooLargeError(DaemonError):
    """The request body is over the byte limit."""

    status = 413
    code = "too_large"


class QueueFullError(DaemonError):
    """Every place in front of the worker is taken; try again later."""

    status = 429
    code = "queue_full"


class RateLimitedError(DaemonError):
    """Too many wrong pairing codes in the last minute."""

    status = 429
    code = "rate_limited"


class ShuttingDownError(DaemonError):
    """The daemon is stopping and takes no more work."""

    status = 503
    code = "shutting_down"


class UnavailableError(DaemonError):
    """The protection models could not be loaded, so no image can be protected."""

    status = 503
    code = "unavailable"


class JobTimeoutError(DaemonError):
    """A job ran past the per-job time limit and was stopped."""

    status = 504
    code = "timeout"


# Most specific first: UnsupportedImageError and ImageTooLargeError are ImageErrors.
_LIBRARY_STATUS: tuple[tuple[type[FaceCloakError], int, str], ...] = (
    (ImageTooLargeError, 413, "too_large"),
    (UnsupportedImageError, 415, "unsupported_image"),
    (ImageError, 400, "bad_image"),
    (UsageError, 400, "bad_request"),
    (CancelledError, 503, "cancelled"),
    (ModelStoreError, 503, "unavailable"),
    (SystemLibraryError, 503, "unavailable"),
    (FaceCloakError, 500, "failed"),
)


def describe(exc: BaseException) -> tuple[int, str, str]:
    """``(status, code, message)`` for any error; unknown exceptions are a 500 with no detail."""
    if isinstance(exc, DaemonError):
        return exc.status, exc.code, str(exc) or exc.code.replace("_", " ")
    for kind, status, code in _LIBRARY_STATUS:
        if isinstance(exc, kind):
            return status, code, str(exc)
    # Never echo an unexpected exception's text: it might hold anything.
    return 500, "internal", "internal error; see the daemon's log"


def log_unexpected(exc: BaseException) -> None:
    """Log a bug: the exception's type and stack, not its message (it could quote an image)."""
    stack = "".join(traceback.TracebackException.from_exception(exc).stack.format())
    log.error("unexpected %s:\n%s", type(exc).__name__, stack)


def error_body(exc: BaseException) -> dict[str, str]:
    """The JSON body ``{"error": code, "message": text}`` that answers ``exc``."""
    _, code, message = describe(exc)
    return {"error": code, "message": message}
