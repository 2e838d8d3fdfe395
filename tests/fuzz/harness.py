"""Running cases through the decoder and through a real daemon, and counting what came out.

An outcome is what a user would see: for the decoder, ``decoded`` or the documented error's
class (``ImageError``, ``UnsupportedImageError``, ``ImageTooLargeError``), ``timeout`` when
the case was stopped at the time limit by its ``cancel`` event (the daemon answers 504);
anything else is a crash (``crash:<type>``), and a case that had not come back
:data:`HANG_GRACE` seconds past the limit is a hang. For the daemon, the HTTP status and
error code; a 5xx other than 504, no answer, or an answer later than the limit plus
:data:`HANG_GRACE` is a failure.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cloak_core.errors import CancelledError, FaceCloakError
from cloak_core.imageio import decode_image, probe_image

from .cases import Case

# Seconds past the time limit after which a case that has not come back is a hang.
HANG_GRACE = 5.0

# What the daemon may answer an image upload with (backend/README.md).
DOCUMENTED = {
    200: {None},
    400: {"bad_image"},
    413: {"too_large"},
    415: {"unsupported_image"},
    504: {"timeout"},
}

_BACKEND_TESTS = Path(__file__).resolve().parents[1] / "backend"


def decode_case(data: bytes, limit: float) -> dict:
    """Probe then decode ``data`` as the daemon does, stopped at ``limit`` seconds."""
    record: dict = {}
    started = time.perf_counter()
    try:
        probe_image(data)
        record["probe"] = "ok"
    except FaceCloakError as exc:
        record["probe"] = type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - a crash is what we are looking for
        record["probe"] = f"crash:{type(exc).__name__}"
    record["probe_s"] = time.perf_counter() - started
    cancel = threading.Event()
    timer = threading.Timer(limit, cancel.set)
    timer.start()
    started = time.perf_counter()
    try:
        decode_image(data, cancel=cancel)
        outcome = "decoded"
    except CancelledError:
        outcome = "timeout"
    except FaceCloakError as exc:
        outcome = type(exc).__name__
    except Exception as exc:  # noqa: BLE001
        outcome = f"crash:{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        timer.cancel()
    record["decode_s"] = time.perf_counter() - started
    if record["decode_s"] > limit + HANG_GRACE:
        outcome = "hang"
    record["outcome"] = outcome
    return record


@dataclass
class Tally:
    """Counts of outcomes, and the slowest case of each kind of time."""

    cases: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    by_mutation: dict = field(default_factory=dict)
    slowest: dict = field(default_factory=dict)  # name -> (seconds, case index)
    failures: list = field(default_factory=list)  # (case index, what)

    def add(self, case: Case, outcome: str, times: dict[str, float], failed: bool) -> None:
        self.cases += 1
        self.outcomes[outcome] += 1
        self.by_mutation.setdefault(case.mutation, collections.Counter())[outcome] += 1
        for name, seconds in times.items():
            if seconds > self.slowest.get(name, (-1.0, None))[0]:
                self.slowest[name] = (seconds, case.index)
        if failed:
            self.failures.append((case.index, outcome))

    def to_json(self) -> dict:
        return {
            "cases": self.cases,
            "outcomes": dict(self.outcomes.most_common()),
            "by_mutation": {k: dict(v.most_common()) for k, v in sorted(self.by_mutation.items())},
            "slowest": {
                name: {"seconds": round(seconds, 3), "case": index}
                for name, (seconds, index) in self.slowest.items()
            },
            "failures": self.failures,
        }


def decoder_failed(outcome: str) -> bool:
    return outcome.startswith("crash") or outcome == "hang"


def run_decoder(cases: Iterable[Case], limit: float) -> Tally:
    """Every case through :func:`decode_case`, in this process."""
    tally = Tally()
    for case in cases:
        record = decode_case(case.data, limit)
        times = {"probe": record["probe_s"], "decode": record["decode_s"]}
        failed = decoder_failed(record["outcome"]) or record["probe"].startswith("crash")
        tally.add(case, record["outcome"], times, failed)
    return tally


class Daemon:
    """A real ``facecloak serve`` with the re-encoding test double (the production serve
    path: flags, HTTP server, header check, queue, worker, cloak_core's decode and encode)."""

    def __init__(self, workdir: Path, job_timeout: float) -> None:
        if str(_BACKEND_TESTS) not in sys.path:
            sys.path.insert(0, str(_BACKEND_TESTS))
        import daemon_helpers

        self.helpers = daemon_helpers
        self.job_timeout = job_timeout
        self.process = daemon_helpers.start_daemon(
            workdir, "--job-timeout", str(job_timeout), reencoding=True, ready_timeout=120
        )
        self.token = self.process.pair()
        self.restarts = 0

    def post(self, data: bytes) -> tuple[int | str, str | None, float]:
        """``POST /v1/protect``: status (or the client's error), error code, seconds."""
        request = urllib.request.Request(
            self.process.url("/v1/protect"), data=data, headers=self.helpers.auth(self.token)
        )
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=self.job_timeout + 60) as resp:
                resp.read()
                return resp.status, None, time.perf_counter() - started
        except urllib.error.HTTPError as exc:
            try:
                code = json.loads(exc.read()).get("error")
            except ValueError:
                code = "(not JSON)"
            return exc.code, code, time.perf_counter() - started
        except OSError as exc:
            return f"no answer: {type(exc).__name__}", None, time.perf_counter() - started

    def good_request(self) -> tuple[int | str, float]:
        status, _, seconds = self.post(self.helpers.jpeg_bytes(320, 240))
        return status, seconds

    def stop(self) -> int:
        return self.process.stop()


def run_daemon(cases: Iterable[Case], daemon: Daemon) -> Tally:
    """Every case through ``POST /v1/protect``, one at a time."""
    tally = Tally()
    late = daemon.job_timeout + HANG_GRACE
    for case in cases:
        status, code, seconds = daemon.post(case.data)
        outcome = f"{status} {code}" if code else str(status)
        failed = (
            not isinstance(status, int)
            or code not in DOCUMENTED.get(status, set())
            or seconds > late
        )
        if seconds > late:
            outcome += " (late)"
        tally.add(case, outcome, {"request": seconds}, failed)
        if daemon.process.proc.poll() is not None:
            tally.failures.append((case.index, f"daemon exited {daemon.process.proc.returncode}"))
            break
    return tally
