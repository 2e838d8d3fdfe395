"""Hostile and malformed images: crafted files (:mod:`.hostile`), a seeded generator of
mutated photos (:mod:`.cases`), running them through the decoder and a real daemon
(:mod:`.harness`), the full run (``python -m tests.fuzz.run --count 10000``) and a fixed
slice in the normal suite (``test_fuzz_slice.py``)."""
