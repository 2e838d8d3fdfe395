"""The full fuzz run: ``python -m tests.fuzz.run --count 10000`` from the repository root.

Generates ``--count`` cases (:mod:`tests.fuzz.cases`, seeded by ``--seed``) and puts each
through the decoder (``cloak_core.imageio.probe_image`` and ``decode_image``, in a child
process that is restarted if it dies, so a crash of a native decoder is counted, not
fatal) and then through a real daemon (``POST /v1/protect`` on the test double's
``facecloak serve``, ``--job-timeout`` seconds per job). Prints the figures and writes them
to ``--report`` as JSON; exits 1 if any case crashed or hung, if the daemon answered
anything undocumented or died, or if it does not serve a good photo at the end.

Needs ``FACECLOAK_SHARED`` (or ``--photos``) for the seed photos. Takes about 20 minutes
for 10,000 cases on a busy 2-core machine; ``--skip-decoder`` / ``--skip-daemon`` run one
half.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cases import Case, Seeds, generate
from .harness import Daemon, Tally, decode_case, decoder_failed, run_daemon

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    photos = args.photos or _default_photos()
    if args.decoder_worker:
        return _decoder_worker(args, photos)
    report: dict = {"count": args.count, "seed": args.seed, "job_timeout": args.job_timeout}
    failed = False
    if not args.skip_decoder:
        started = time.monotonic()
        tally = _decoder_pass(args, photos)
        report["decoder"] = {**tally.to_json(), "wall_s": round(time.monotonic() - started, 1)}
        failed |= bool(tally.failures)
        _print("decoder", report["decoder"])
    if not args.skip_daemon:
        started = time.monotonic()
        report["daemon"] = _daemon_pass(args, photos)
        report["daemon"]["wall_s"] = round(time.monotonic() - started, 1)
        daemon = report["daemon"]
        failed |= bool(daemon["failures"]) or daemon["good_request_after"]["status"] != 200
        failed |= daemon["unexpected_in_log"] > 0 or daemon["exit_status"] != 0
        _print("daemon", daemon)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2))
    print("FAILED" if failed else "OK: no crash, no hang, only documented answers")
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__)
    p.add_argument("--count", type=int, default=10_000, help="cases (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the sequence (default %(default)s)")
    p.add_argument("--start", type=int, default=0, help="first case of the sequence")
    p.add_argument("--photos", type=Path, default=None, help="seed photos (data/photos)")
    p.add_argument(
        "--job-timeout", type=float, default=10.0, help="seconds per job (default %(default)s)"
    )
    p.add_argument("--skip-decoder", action="store_true")
    p.add_argument("--skip-daemon", action="store_true")
    p.add_argument("--report", type=Path, default=None, help="write the figures here (JSON)")
    p.add_argument("--decoder-worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _default_photos() -> Path:
    shared = os.environ.get("FACECLOAK_SHARED")
    if not shared:
        raise SystemExit("set FACECLOAK_SHARED to the shared/ folder, or pass --photos")
    return Path(shared) / "data" / "photos"


def _decoder_worker(args: argparse.Namespace, photos: Path) -> int:
    """In the child: one JSON line as each case starts, one with its record as it ends."""
    seeds = Seeds(photos)
    for case in generate(seeds, args.count, seed=args.seed, start=args.start):
        about = {"case": case.index, "mutation": case.mutation, "seed": case.seed}
        print(json.dumps({"start": about}), flush=True)
        record = decode_case(case.data, args.job_timeout)
        print(json.dumps({**about, **record}), flush=True)
    return 0


def _decoder_pass(args: argparse.Namespace, photos: Path) -> Tally:
    tally = Tally()
    next_case, end = args.start, args.start + args.count
    while next_case < end:
        command = [
            sys.executable, "-m", "tests.fuzz.run", "--decoder-worker",
            "--seed", str(args.seed), "--start", str(next_case), "--count", str(end - next_case),
            "--photos", str(photos), "--job-timeout", str(args.job_timeout),
        ]  # fmt: skip
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        started = None
        assert child.stdout is not None
        for line in child.stdout:
            message = json.loads(line)
            if "start" in message:
                started = message["start"]
                continue
            case = Case(message["case"], message["mutation"], message["seed"], b"")
            failed = decoder_failed(message["outcome"]) or message["probe"].startswith("crash")
            times = {"probe": message["probe_s"], "decode": message["decode_s"]}
            tally.add(case, message["outcome"], times, failed)
            next_case = case.index + 1
            if tally.cases % 1000 == 0:
                print(f"decoder: {tally.cases} cases", file=sys.stderr, flush=True)
        status = child.wait()
        if status != 0 and started is not None and started["case"] >= next_case:
            case = Case(started["case"], started["mutation"], started["seed"], b"")
            tally.add(case, f"crash:process died ({status})", {}, True)
            next_case = case.index + 1
        elif status != 0:
            raise SystemExit(f"the decoder's process failed ({status}) before any case")
    return tally


def _daemon_pass(args: argparse.Namespace, photos: Path) -> dict:
    seeds = Seeds(photos)
    with tempfile.TemporaryDirectory(prefix="facecloak-fuzz-") as workdir:
        daemon = Daemon(Path(workdir), args.job_timeout)
        try:
            cases: list[Case] = []
            tally = Tally()
            for case in generate(seeds, args.count, seed=args.seed, start=args.start):
                cases.append(case)
                if len(cases) == 500:
                    _merge(tally, run_daemon(cases, daemon))
                    cases = []
                    print(f"daemon: {tally.cases} cases", file=sys.stderr, flush=True)
            _merge(tally, run_daemon(cases, daemon))
            status, seconds = daemon.good_request()
            log = daemon.process.log()
        finally:
            exit_status = daemon.stop()
    return {
        **tally.to_json(),
        "good_request_after": {"status": status, "seconds": round(seconds, 3)},
        "unexpected_in_log": log.count("unexpected "),
        "exit_status": exit_status,
    }


def _merge(total: Tally, part: Tally) -> None:
    total.cases += part.cases
    total.outcomes.update(part.outcomes)
    for mutation, counts in part.by_mutation.items():
        total.by_mutation.setdefault(mutation, type(counts)()).update(counts)
    for name, (seconds, index) in part.slowest.items():
        if seconds > total.slowest.get(name, (-1.0, None))[0]:
            total.slowest[name] = (seconds, index)
    total.failures.extend(part.failures)


def _print(name: str, figures: dict) -> None:
    print(f"\n== {name}: {figures['cases']} cases in {figures.get('wall_s', '?')} s")
    for outcome, count in figures["outcomes"].items():
        print(f"  {count:6d}  {outcome}")
    for what, slowest in figures["slowest"].items():
        print(f"  slowest {what}: {slowest['seconds']:.3f} s (case {slowest['case']})")
    if "good_request_after" in figures:
        good = figures["good_request_after"]
        print(f"  a good photo afterwards: {good['status']} in {good['seconds']:.3f} s")
        print(f"  unexpected errors in the log: {figures['unexpected_in_log']}")
    print(f"  failures: {len(figures['failures'])} {figures['failures'][:20]}")


if __name__ == "__main__":
    raise SystemExit(main())
