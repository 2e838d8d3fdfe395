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
        with ProcessPoolExecutor(1, mp_context=context, initializer=exit_with_parent) as pool:
            print(pool.submit(os.getpid).result(), flush=True)
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


def test_a_killed_run_takes_its_busy_workers_with_it(tmp_path):
    """The run is killed outright (SIGKILL: nothing of it runs after) while its worker is
    a minute into its task; the worker is gone within a few seconds, not a minute."""
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    run = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(run.stdout.readline())
        time.sleep(1.0)  # the worker is now inside its minute-long task
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
