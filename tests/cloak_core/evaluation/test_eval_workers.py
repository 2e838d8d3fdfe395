"""The eval's worker processes end with the run that started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# A run with one worker busy on a minute-long task, as ``attack_in_workers`` starts them
# (spawned, the same initializer hook); it prints the worker's process id.
_RUN = textwrap.dedent(
    """
    import multiprocessing, os, time
    from concurrent.futures import ProcessPoolExecutor
    from cloak_core.evaluation.workers import exit_with_parent

    if __name__ == "__main__":
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            1, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            print(pool.submit(os.getpid).result(), flush=True)
            pool.submit(time.sleep, 60)
            time.sleep(60)
    """
)


# A run killed while its one worker is still starting (its initializer two seconds from
# calling ``exit_with_parent``, as a worker importing torch is): the worker writes its
# process id to the file named by the first argument before that wait.
_RUN_STARTING = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from cloak_core.evaluation.workers import exit_with_parent

    def start(path, parent):
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
        time.sleep(2.0)
        exit_with_parent(parent)

    if __name__ == "__main__":
        context = multiprocessing.get_context("spawn")
        args = (sys.argv[1], os.getpid())
        with ProcessPoolExecutor(1, mp_context=context, initializer=start, initargs=args) as pool:
            pool.submit(time.sleep, 60)
            time.sleep(60)
    """
)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie nobody has reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _kill_run_and_expect_worker_gone(run: subprocess.Popen, find_worker) -> None:
    """SIGKILL ``run`` (nothing of it runs after) once ``find_worker()`` has given its
    worker's process id and the worker is where the test wants it; the worker must be
    gone within 10 s. Whatever happens, neither process is left running."""
    worker = None
    try:
        worker = find_worker()
        assert _running(worker)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(worker), "the worker outlived its run"
    finally:
        run.kill()
        run.wait()
        if worker is not None and _running(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_killed_run_takes_its_busy_workers_with_it(tmp_path):
    """The run is killed while its worker is a minute into its task; the worker is gone
    within a few seconds, not a minute."""
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    run = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)

    def busy_worker() -> int:
        worker = int(run.stdout.readline())
        time.sleep(1.0)  # the worker is now inside its minute-long task
        return worker

    _kill_run_and_expect_worker_gone(run, busy_worker)


def test_a_run_killed_while_its_worker_starts_takes_it_too(tmp_path):
    """The run is killed before its worker's initializer has looked at its parent: by
    then the worker has been handed to another parent, and it must still see that its
    run is gone (it is told the run's process id rather than reading its own parent)."""
    script, pid_file = tmp_path / "run.py", tmp_path / "worker.pid"
    script.write_text(_RUN_STARTING)
    run = subprocess.Popen([sys.executable, str(script), str(pid_file)])

    def starting_worker() -> int:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return int(pid_file.read_text())  # the worker is inside its two-second start

    _kill_run_and_expect_worker_gone(run, starting_worker)
