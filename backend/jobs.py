"""Jobs and the one worker that runs them.

One worker owns the device: a single thread (a one-thread executor) in which the
protector is built at start-up and every batch runs. In front of it, a bounded queue
(a full queue answers 429). When several jobs wait, the worker takes up to
``batch_size`` of them with the same preset, whose decoded images fit in
``max_batch_decoded_bytes`` together, and hands them to ``protector.protect_many`` in
one call.

The jobs of one upload of several photos form a collection (``POST /v1/jobs``'s
``collection``, scoped to the token that sent them): they wait in the queue until all
``collection_size`` of them have come (at most ``collection_wait`` seconds after the
first; meanwhile other jobs run), then go into one batch, before any job sent alone, and
the protector treats them as one person's photos (``collections``). A collection larger
than a batch is split between batches. Before its first part runs, the worker has the
protector embed the faces of the photos left waiting (decode, detect, one forward pass
per model: ``waiting``; the faces found are handed back when those photos run, so they
are not looked for twice), and it keeps what the protector saw of the parts already run
(``carried``), so every part, the first included, is pushed from the shared identity of
every photo of the upload. What was embedded of a photo is forgotten once it runs, and
what was carried of an upload ``collection_wait`` seconds after its last part ran, so that
a photo a full queue turned away (an upload larger than the queue), sent again, still joins its
siblings, and runs without waiting for the rest. A held upload runs at once when the
queue is full: the rest of it cannot come in until something runs.

A running batch stops early (``cancel`` is set) when every client that waits for it
has gone, when it runs past the per-job time limit, or when a shutdown's deadline
passes. Every stage of the protector looks at ``cancel`` (decoding between blocks of
input, detection between views, the attack between steps, encoding between blocks of
output), so a batch stops within a fraction of a second; should one not have stopped
:data:`STOP_GRACE` seconds after its deadline, its jobs are answered (504) all the same
and the worker takes the next batch once the thread comes back.
Progress comes from the protector's callback: steps done over steps planned.
Finished jobs are kept for ``result_ttl`` seconds, then forgotten.

Jobs of ``/v1/jobs`` (the extension's) are measured lightly (``measure="models"``): the
worker keeps, for the last such job only, a preview of its faces (small crops before and
after, and how many of the ensemble's models still match each), which only the job's
owner can read (``GET /v1/jobs/{id}/preview``). A newer job's preview replaces it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import dataclasses
import enum
import functools
import hmac
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from backend.config import DaemonConfig
from backend.errors import (
    DaemonError,
    InternalError,
    JobTimeoutError,
    NotFoundError,
    QueueFullError,
    ShuttingDownError,
    UnavailableError,
    error_body,
    log_unexpected,
)
from backend.protection import ProtectorFactory, ProtectorLike
from cloak_core.errors import CancelledError, FaceCloakError
from cloak_core.presets import get_preset

log = logging.getLogger(__name__)

# Seconds a batch past its deadline has to stop before its jobs are answered without it.
STOP_GRACE = 1.0


class JobState(str, enum.Enum):
    """Where a job is: waiting in the queue, running, or finished one way or the other."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class Job:
    """One image to protect. ``data`` (the input bytes) is dropped once the job has run."""

    id: str
    data: bytes | None
    preset: str
    owner: str | None = None  # the digest of the token that created it (``/v1/jobs``)
    decoded_bytes: int = 0  # what its decoded image will take, from the header
    state: JobState = JobState.QUEUED
    progress: float = 0.0  # 0..1, written by the worker thread
    result: Any = None  # the protector's result (``data``, ``mime``, ``faces``, ``seconds``)
    error: BaseException | None = None
    finished_at: float | None = None
    abandoned: bool = False  # its client went away
    wants_preview: bool = False  # measure its faces for a preview (``/v1/jobs`` jobs)
    collection: tuple[str, str] | None = None  # (owner, label): one upload's photos
    collection_size: int = 0  # how many photos that upload holds
    queued_at: float = field(default_factory=time.monotonic)
    preview: dict[str, Any] | None = None  # the preview, while this is the latest one
    _done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED)

    async def wait(self) -> None:
        """Return once the job is done or failed."""
        await self._done.wait()

    def to_json(self) -> dict[str, Any]:
        """``{"id", "state", "preset", "progress", "faces", "error"}`` as ``GET /v1/jobs/{id}``
        answers."""
        return {
            "id": self.id,
            "state": self.state.value,
            "preset": self.preset,
            "progress": round(self.progress, 4),
            "faces": self.result.faces if self.result is not None else None,
            "error": error_body(self.error) if self.error is not None else None,
        }

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.data = None
        self.result, self.error = result, error
        self.state = JobState.FAILED if error is not None else JobState.DONE
        if error is None:
            self.progress = 1.0
        self.finished_at = time.monotonic()
        self._done.set()


@dataclass(eq=False)
class _Batch:
    jobs: list[Job]
    cancel: threading.Event = field(default_factory=threading.Event)
    stop_reason: BaseException | None = None  # why cancel was set, for jobs still wanted

    def stop(self, reason: BaseException) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancel.set()


class Worker:
    """The bounded queue, the registry of ``/v1/jobs`` jobs, and the thread that runs them."""

    def __init__(self, config: DaemonConfig, protector_factory: ProtectorFactory) -> None:
        self.config = config
        self.protector_factory = protector_factory
        self.status = "starting"  # starting -> ready | failed; stopping at shutdown
        self.protector: ProtectorLike | None = None
        self.load_error: BaseException | None = None
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._batch: _Batch | None = None
        # Per split collection, its earlier parts' faces (the protector's ``carried``), and
        # per photo of one still waiting, the faces found in it and their embeddings (what
        # makes the protector's ``waiting``; the faces are not looked for again).
        self._carried: dict[tuple[str, str], dict[str, Any]] = {}
        self._waiting: dict[Job, tuple[Any, Any]] = {}
        # Until when a collection none of whose photos waits is still remembered: a photo
        # of it turned away by a full queue, sent again, joins its siblings' identity.
        self._carried_until: dict[tuple[str, str], float] = {}
        self._batch_done: asyncio.Event = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = None
        self._task: asyncio.Task | None = None

    # -- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker thread; models load in it while the daemon already answers."""
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facecloak-worker")
        self._task = asyncio.create_task(self._run(), name="facecloak-worker")

    async def shutdown(self) -> None:
        """Take no more jobs, answer queued ones with 503, let the running batch finish.

        The running batch gets ``shutdown_deadline`` seconds; past that it is cancelled.
        """
        self._closing = True
        self.status = "stopping"
        while self._queue:
            self._queue.popleft()._finish(error=ShuttingDownError("the daemon is shutting down"))
        batch = self._batch
        if batch is None:
            return
        try:
            await asyncio.wait_for(self._batch_done.wait(), self.config.shutdown_deadline)
        except asyncio.TimeoutError:
            batch.stop(ShuttingDownError("the daemon shut down before the image was done"))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._batch_done.wait(), self.config.shutdown_deadline)

    async def close(self) -> None:
        """Stop the worker task and release the protector (after :meth:`shutdown`)."""
        if not self._closing:
            await self.shutdown()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            if self.protector is not None:
                await loop.run_in_executor(self._executor, self.protector.close)
                self.protector = None
            self._executor.shutdown(wait=False)

    # -- the queue --------------------------------------------------------------------

    def submit(
        self,
        data: bytes,
        preset: str,
        *,
        register: bool,
        owner: str | None = None,
        decoded_bytes: int = 0,
        collection: tuple[str, str] | None = None,
        collection_size: int = 0,
    ) -> Job:
        """Queue ``data`` for protection with ``preset``; ``register`` makes it a ``/v1/jobs`` job,
        which only ``owner`` (a token's digest) may then :meth:`get`. ``decoded_bytes``
        (from the header) is what its decoded image will take, counted against the batch's
        limit. ``collection`` names the upload of ``collection_size`` photos it is part of.

        Raises as :meth:`check_accepting` does.
        """
        self.check_accepting()
        job = Job(
            id=secrets.token_urlsafe(16),
            data=data,
            preset=preset,
            owner=owner,
            decoded_bytes=decoded_bytes,
            collection=collection,
            collection_size=collection_size,
        )
        job.wants_preview = register
        if register:
            self.expire()
            self._jobs[job.id] = job
        self._queue.append(job)
        self._wakeup.set()
        return job

    def check_accepting(self) -> None:
        """Raise :class:`ShuttingDownError`, :class:`UnavailableError` (models failed to load)
        or :class:`QueueFullError` if a job sent now would be refused."""
        if self._closing:
            raise ShuttingDownError("the daemon is shutting down")
        if self.status == "failed":
            raise UnavailableError(_load_failure_message(self.load_error))
        if len(self._queue) >= self.config.queue_size:
            raise QueueFullError(
                f"{len(self._queue)} images are already waiting; try again in a moment"
            )

    def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """A registered job of ``owner``; :class:`NotFoundError` when unknown, expired or
        another token's (which is not told apart from unknown)."""
        self.expire()
        job = self._jobs.get(job_id)
        if job is None or not hmac.compare_digest(job.owner or "", owner or ""):
            raise NotFoundError("no such job (it may have expired)")
        return job

    def abandon(self, job: Job) -> None:
        """The client waiting for ``job`` went away: drop it, or stop its batch if no one waits."""
        job.abandoned = True
        if job.state is JobState.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(job)
            job._finish(error=CancelledError("the client disconnected"))
        elif self._batch is not None and job in self._batch.jobs:
            if all(j.abandoned for j in self._batch.jobs):
                self._batch.stop(CancelledError("the client disconnected"))

    def expire(self) -> None:
        """Forget finished jobs older than ``result_ttl``, and the oldest beyond ``max_results``."""
        now = time.monotonic()
        finished = [j for j in self._jobs.values() if j.finished]
        for job in finished:
            if now - job.finished_at >= self.config.result_ttl:
                del self._jobs[job.id]
        finished = [j for j in self._jobs.values() if j.finished]
        finished.sort(key=lambda j: j.finished_at)
        for job in finished[: max(0, len(finished) - self.config.max_results)]:
            del self._jobs[job.id]

    def queue_info(self) -> dict[str, int]:
        """``{"waiting", "running", "limit"}`` for ``/v1/health``."""
        running = len(self._batch.jobs) if self._batch is not None else 0
        return {"waiting": len(self._queue), "running": running, "limit": self.config.queue_size}

    def _keep_preview(self, job: Job, preview: dict[str, Any]) -> None:
        """Give ``job`` the preview of its faces and forget every older job's: the daemon
        holds the crops of one photo at most."""
        for other in self._jobs.values():
            other.preview = None
        job.preview = preview

    # -- the worker -------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.protector = await loop.run_in_executor(
                self._executor, self.protector_factory, self.config
            )
        except Exception as exc:
            self.load_error = exc
            self.status = "failed"
            log.error("the protection models failed to load: %s", _load_failure_message(exc))
            while self._queue:
                self._queue.popleft()._finish(error=UnavailableError(_load_failure_message(exc)))
            return
        if not self._closing:
            self.status = "ready"
        log.info("ready: device %s, models %s", self.protector.device, self.protector.model_names)
        while not self._closing:
            self._forget()
            batch = self._take_batch()
            if batch is None:  # nothing waits, or only collections not yet complete
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._hold_seconds())
                continue
            await self._run_batch(batch)

    def _take_batch(self) -> list[Job] | None:
        """The first waiting job that may run and up to ``batch_size - 1`` later ones with
        its preset (its collection's first, then jobs sent alone or left over from another
        split collection), each once, as long as their decoded images fit in
        ``max_batch_decoded_bytes`` together (the others wait for a later batch); None when
        no job may run yet."""
        now = time.monotonic()
        first = next((job for job in self._queue if self._may_run(job, now)), None)
        if first is None:
            return None
        batch = [first]
        room = self.config.max_batch_decoded_bytes - first.decoded_bytes
        siblings = [j for j in self._queue if first.collection and j.collection == first.collection]
        # Jobs sent alone, and what is left of other collections a batch has already split.
        alone = [
            j
            for j in self._queue
            if (j.collection is None or j.collection_size == 0) and j not in siblings
        ]
        for job in siblings + alone:
            if len(batch) >= self.config.batch_size:
                break
            if job is not first and job.preset == first.preset and job.decoded_bytes <= room:
                batch.append(job)
                room -= job.decoded_bytes
        for job in batch:
            self._queue.remove(job)
        for job in siblings:  # what did not fit runs next, without waiting for the rest
            job.collection_size = 0
        return batch

    def _may_run(self, job: Job, now: float) -> bool:
        """True unless ``job``'s collection is still coming in: fewer of its photos queued
        than it holds, its first came less than ``collection_wait`` ago, none of it has run
        yet, and the queue has room for the rest (a full queue turns them away until
        something runs, so waiting for them would only idle the worker)."""
        if job.collection is None or job.collection in self._carried:
            return True
        if len(self._queue) >= self.config.queue_size:
            return True
        queued = [j for j in self._queue if j.collection == job.collection]
        waited = now - min(j.queued_at for j in queued)
        return len(queued) >= job.collection_size or waited >= self.config.collection_wait

    def _hold_seconds(self) -> float | None:
        """Seconds until the first held collection may run anyway, or until a finished
        collection is forgotten; None when there is neither."""
        now = time.monotonic()
        deadlines = [job.queued_at + self.config.collection_wait for job in self._queue]
        deadlines += self._carried_until.values()
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now) + 0.01

    def _forget(self) -> None:
        """Forget what was carried for a collection none of whose photos waits, once
        ``collection_wait`` has passed since its last part ran, and what was embedded of a
        photo no longer waiting."""
        now = time.monotonic()
        waiting = {job.collection for job in self._queue}
        for label in [c for c in self._carried if c not in waiting]:
            if self._carried_until.get(label, 0.0) <= now:
                del self._carried[label]
                self._carried_until.pop(label, None)
        for job in [j for j in self._waiting if j not in self._queue]:
            del self._waiting[job]

    async def _run_batch(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        batch = _Batch(jobs)
        self._batch = batch
        self._batch_done.clear()
        for job in jobs:
            job.state = JobState.RUNNING

        def progress(fraction: float) -> None:  # called in the worker thread
            for job in jobs:
                job.progress = min(1.0, max(job.progress, float(fraction)))

        too_long = JobTimeoutError(f"the image took longer than {self.config.job_timeout:g} s")
        timer = loop.call_later(self.config.job_timeout, batch.stop, too_long)
        started = time.monotonic()
        # Only protectors that are asked for previews (or collections) need the keyword.
        extra: dict[str, Any] = {}
        if any(job.wants_preview for job in jobs):
            extra["measure"] = "models"
        if any(job.collection for job in jobs):
            extra["collections"] = [job.collection for job in jobs]
            extra["carried"] = self._carried
            later = {
                c: [j for j in self._queue if j.collection == c]
                for c in {job.collection for job in jobs}
            }
            later = {c: queued for c, queued in later.items() if queued}
            if later:
                extra["later"] = later
                extra["embedded"] = self._waiting
            if any(job in self._waiting for job in jobs):  # found while they waited
                extra["faces"] = [self._waiting.get(job, (None, None))[0] for job in jobs]
        call = functools.partial(
            _protect_batch,
            self.protector,
            [job.data for job in jobs],
            progress=progress,
            cancel=batch.cancel,
            config=get_preset(jobs[0].preset),
            max_pixels=self.config.max_pixels,
            max_decoded_bytes=self.config.max_decoded_bytes,
            **extra,
        )
        running = loop.run_in_executor(self._executor, call)
        late = False
        try:
            await asyncio.wait({running}, timeout=self.config.job_timeout + STOP_GRACE)
            if running.done():
                outcomes = list(running.result())
                if len(outcomes) != len(jobs):
                    raise RuntimeError(
                        f"protect_many answered {len(outcomes)} of {len(jobs)} items"
                    )
            else:  # a stage has not looked at ``cancel``: answer now, wait for it below
                late = True
                batch.stop(too_long)
                outcomes = [batch.stop_reason] * len(jobs)
        except Exception as exc:  # nothing a batch does may stop the worker
            outcomes = [exc] * len(jobs)
        finally:
            timer.cancel()
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if isinstance(outcome, CancelledError) and batch.stop_reason is not None:
                    outcome = batch.stop_reason
                job._finish(error=_reported(outcome))
            else:
                preview = preview_payload(job.id, job.preset, outcome)
                job._finish(result=_without_previews(outcome))
                if job.wants_preview:
                    self._keep_preview(job, preview)
        if late:
            log.warning(
                "a batch did not stop %g s after its deadline; its jobs were answered, the "
                "next batch waits for it",
                STOP_GRACE,
            )
            with contextlib.suppress(Exception):
                await running
        log.info(
            "batch of %d (%s%s) in %.2f s",
            len(jobs),
            jobs[0].preset,
            _collections_note(jobs),
            time.monotonic() - started,
        )
        # Remembered a while (the worker's loop forgets it, :meth:`_forget`).
        ran = time.monotonic()
        for label in {job.collection for job in jobs if job.collection in self._carried}:
            self._carried_until[label] = ran + self.config.collection_wait
        self._batch = None
        self._batch_done.set()


def preview_payload(job_id: str, preset: str, result: Any) -> dict[str, Any]:
    """``{"id", "preset", "faces": [...]}``: per face, ``before`` and ``after`` as JPEG data
    URLs, ``models`` (how many ensemble models measured it), ``matched`` (how many still
    say it is the same person after protection), and the models' ``same_person`` and
    ``similarity``; then the same for the recognisers outside the ensemble, the honest
    check (``unseen``, ``unseen_matched``, ``unseen_same_person``, ``unseen_similarity``).
    """
    faces = []
    for preview in getattr(result, "previews", ()):
        faces.append(
            {
                "before": _data_url(preview.before),
                "after": _data_url(preview.after),
                "models": len(preview.same_person),
                "matched": sum(preview.same_person.values()),
                "same_person": dict(preview.same_person),
                "similarity": dict(preview.similarity),
                "unseen": len(preview.unseen_same_person),
                "unseen_matched": sum(preview.unseen_same_person.values()),
                "unseen_same_person": dict(preview.unseen_same_person),
                "unseen_similarity": dict(preview.unseen_similarity),
            }
        )
    return {"id": job_id, "preset": preset, "faces": faces}


def _without_previews(result: Any) -> Any:
    """``result`` without its crops (kept only in the latest job's preview payload)."""
    if dataclasses.is_dataclass(result) and getattr(result, "previews", ()):
        return dataclasses.replace(result, previews=())
    return result


def _collections_note(jobs: list[Job]) -> str:
    """``", collections of 3+2"``: how many of ``jobs`` went in each collection, or ""."""
    sizes: dict[tuple[str, str], int] = {}
    for job in jobs:
        if job.collection is not None:
            sizes[job.collection] = sizes.get(job.collection, 0) + 1
    return ", collections of " + "+".join(map(str, sizes.values())) if sizes else ""


def _data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _protect_batch(
    protector: Any,
    items: list[bytes],
    *,
    later: dict[tuple[str, str], list[Job]] | None = None,
    embedded: dict[Job, Any] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """A batch's work in the worker thread: embed the photos of its uploads still waiting,
    ``protector.protect_many``, then give freed heap back to the OS.

    ``later``: per collection of the batch, its photos still queued for later batches;
    each is embedded first (``protector.embed_photos``; the faces found and their
    embeddings kept in ``embedded`` for the next batches, whose ``faces`` they become) and
    handed over as ``waiting``. A photo that fails to embed is left out (its own batch
    reports why); it fails no other photo.

    A batch allocates hundreds of MB of short-lived buffers (decoded photos, activations);
    glibc keeps them mapped unless asked, so a daemon that idles between uploads would
    otherwise sit at its peak memory for good.
    """
    try:
        if later:
            known = embedded if embedded is not None else {}
            _embed_waiting(
                protector, [job for queued in later.values() for job in queued], known, kwargs
            )
            kwargs["waiting"] = {
                c: [known[job][1] for job in queued if job in known] for c, queued in later.items()
            }
        return protector.protect_many(items, **kwargs)
    finally:
        _trim_heap()


def _embed_waiting(
    protector: Any, jobs: list[Job], known: dict[Job, Any], call: dict[str, Any]
) -> None:
    """Add to ``known`` the faces found in each of ``jobs`` not in it yet and their
    embeddings, with the batch's limits, preset and ``cancel`` (from ``call``)."""
    for job in jobs:
        data = job.data  # None once its client has gone
        if job in known or data is None:
            continue
        found: list[Any] = []
        try:
            embeddings = protector.embed_photos(
                [data],
                max_pixels=call["max_pixels"],
                max_decoded_bytes=call["max_decoded_bytes"],
                config=call["config"],
                cancel=call["cancel"],
                found=found,
            )
        except CancelledError:
            raise
        except Exception:  # that photo's own batch reports it; this one goes on
            log.warning("a waiting photo of an upload could not be embedded")
            continue
        known[job] = (found[0] if found else None, embeddings)


def _trim_heap() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _load_failure_message(exc: BaseException | None) -> str:
    if isinstance(exc, FaceCloakError):
        return f"the protection models could not be loaded: {exc}"
    return "the protection models could not be loaded; see the daemon's log"


def _reported(exc: BaseException) -> BaseException:
    """The error a failed job reports: expected ones as they are, a bug as InternalError.

    A bug is logged here with its stack but not its message, which could quote an image.
    """
    if isinstance(exc, (FaceCloakError, DaemonError)):
        log.info("job failed: %s", type(exc).__name__)
        return exc
    log_unexpected(exc)
    return InternalError()
