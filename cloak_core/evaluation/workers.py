"""The ``jobs`` worker processes that attack batches on a CPU and keep them in the cache.

One process attacks one batch at a time, taking batches from every ensemble, so a
multi-core CPU stays busy even where one ensemble's batches take longer than another's.
Each process gets an equal share of the cores, and loads each ensemble's models once, at
its first batch of that ensemble. The workers write their results to the attack cache
(:mod:`~cloak_core.evaluation.cache`), where the run then reads them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cloak_core.evaluation.cache import write_batch

if TYPE_CHECKING:
    from cloak_core.detect import Face
    from cloak_core.pipeline import Protector
    from cloak_core.presets import AttackConfig
    from cloak_core.store import ModelStore


@dataclass(frozen=True)
class AttackTask:
    """One batch for a worker process: what the attack needs and where its result goes.

    ``config``: the attack config, its ``models`` the ensemble. ``pixels``: RGB uint8
    ``(H, W, 3)`` images; ``faces``: the faces of each. ``path``: the cache entry.
    ``companions`` / ``companion_faces``: photos of the same people protected in other
    batches (a person split between batches), counted in this batch's shared identity.
    """

    config: AttackConfig
    pixels: list[np.ndarray]
    faces: list[list[Face]]
    seed: int
    path: Path
    companions: list[np.ndarray] = field(default_factory=list)
    companion_faces: list[list[Face]] = field(default_factory=list)


def protect_batch(
    protector: Protector,
    pixels: Sequence[np.ndarray],
    faces: Sequence[Sequence[Face]],
    seed: int,
    companions: Sequence[np.ndarray] = (),
    companion_faces: Sequence[Sequence[Face]] = (),
    progress: Callable[[float], None] | None = None,
) -> list[np.ndarray]:
    """One evaluation batch protected as one collection, as the daemon protects one
    upload: with ``companions``, the rest of a split upload, whose faces' clean embeddings
    are carried into the shared identity (``Protector.protect_pixels``'s ``carried``)."""
    if not companions:
        return protector.protect_pixels(pixels, faces, seed=seed, progress=progress, together=True)
    carried = {0: protector.embed_faces(companions, companion_faces)}
    return protector.protect_pixels(
        pixels, faces, seed=seed, progress=progress, collections=[0] * len(pixels), carried=carried
    )


class AttackWorker:
    """What one worker process keeps between batches: the model store, the device and
    one :class:`~cloak_core.pipeline.Protector` per ensemble (models load once)."""

    def __init__(self, store: ModelStore, device: str) -> None:
        self.store = store
        self.device = device
        self._protectors: dict[tuple[str, ...], Protector] = {}

    def attack(self, task: AttackTask) -> int:
        """Attack one batch and keep it in the cache; returns its number of images."""
        from cloak_core.pipeline import Protector

        ensemble = tuple(task.config.models)
        protector = self._protectors.get(ensemble)
        if protector is None:
            protector = Protector(
                task.config, store=self.store, device=self.device, models=ensemble
            )
            self._protectors[ensemble] = protector
        t = time.perf_counter()
        pixels = protect_batch(
            protector, task.pixels, task.faces, task.seed, task.companions, task.companion_faces
        )
        write_batch(task.path, pixels, time.perf_counter() - t)
        return len(pixels)


# This process's worker. A process pool runs module-level functions only, so the one
# object its tasks share lives here: set by _start in each worker process, never in the
# process that runs the evaluation.
_worker: AttackWorker | None = None


# How often a worker looks whether the run that started it is still there (seconds).
_PARENT_CHECK_SECONDS = 1.0


def exit_with_parent(parent: int) -> None:
    """In a worker process: end it, at once, when the process that started it is gone.

    A run stopped by a signal only to itself (``kill``, a ``timeout`` wrapper, a CI step
    cancelled) would otherwise leave its workers attacking the batches already queued to
    them, minutes of each core, for results nobody reads. A daemon thread watches the
    parent process id; once the worker has been handed to another parent it exits.

    ``parent``: the starting process's id, as that process read it (``os.getpid()`` there,
    passed in): a run killed while its workers are still importing has them reparented
    before this runs, so a worker that read its parent here would watch its new one and
    never exit."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start(store: ModelStore, device: str, threads: int, parent: int) -> None:
    import torch

    global _worker
    exit_with_parent(parent)
    torch.set_num_threads(threads)
    _worker = AttackWorker(store, device)


def _attack(task: AttackTask) -> int:
    if _worker is None:
        raise RuntimeError("_attack runs in a process that attack_in_workers started")
    return _worker.attack(task)


def cores() -> int:
    """The number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def attack_in_workers(
    tasks: Sequence[AttackTask],
    jobs: int,
    store: ModelStore,
    device: str,
    *,
    progress: bool = False,
) -> set[Path]:
    """Attack ``tasks`` in ``jobs`` processes (fewer if there are fewer tasks), each with
    an equal share of the cores, keeping every batch at its task's ``path``; returns those
    paths. ``progress``: show a tqdm bar (on stderr)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    done: set[Path] = set()
    if not tasks:
        return done
    jobs = min(jobs, len(tasks))
    threads = max(1, cores() // jobs)
    with (
        ProcessPoolExecutor(
            jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(store, device, threads, os.getpid()),
        ) as pool,
        tqdm(
            total=sum(len(t.pixels) for t in tasks),
            desc=f"attack ({jobs} processes)",
            disable=not progress,
            unit="img",
        ) as bar,
    ):
        futures = {pool.submit(_attack, task): task.path for task in tasks}
        for future in as_completed(futures):
            bar.update(future.result())
            done.add(futures[future])
    return done
