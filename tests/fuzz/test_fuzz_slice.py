"""A small, fixed slice of the fuzz run (``python -m tests.fuzz.run`` runs the full one).

400 seeded cases from the small re-encodings of two photos (every readable format and mode)
through the decoder, and 120 of them through a real daemon: no crash, no hang, only the
documented errors and statuses, and the daemon still serves a good photo afterwards.
"""

from __future__ import annotations

import pytest

from .cases import Seeds, generate
from .harness import DOCUMENTED, Daemon, run_daemon, run_decoder

DECODER_CASES = 400
DAEMON_CASES = 120
JOB_TIMEOUT = 10.0
SEED = 20260101


@pytest.fixture(scope="module")
def seeds(photos_dir) -> Seeds:
    return Seeds(photos_dir, photos=False)


def test_the_decoder_survives_a_slice_of_hostile_images(seeds):
    tally = run_decoder(generate(seeds, DECODER_CASES, seed=SEED), JOB_TIMEOUT)
    print(f"\n{tally.cases} cases: {dict(tally.outcomes)}; slowest {tally.slowest}")
    assert tally.failures == []
    assert set(tally.outcomes) <= {
        "decoded",
        "ImageError",
        "UnsupportedImageError",
        "ImageTooLargeError",
    }
    assert tally.outcomes["decoded"] > 50 and tally.outcomes["ImageError"] > 50
    assert tally.slowest["probe"][0] < 1.0  # the daemon probes on its event loop


def test_the_daemon_survives_a_slice_of_hostile_images(seeds, tmp_path):
    daemon = Daemon(tmp_path, JOB_TIMEOUT)
    try:
        tally = run_daemon(generate(seeds, DAEMON_CASES, seed=SEED), daemon)
        print(f"\n{tally.cases} cases: {dict(tally.outcomes)}; slowest {tally.slowest}")
        assert tally.failures == []
        assert {int(o.split()[0]) for o in tally.outcomes} <= set(DOCUMENTED)
        status, seconds = daemon.good_request()
        assert status == 200 and seconds < 2.0
        assert "unexpected " not in daemon.process.log()
    finally:
        assert daemon.stop() == 0
