"""Hostile and malformed images: crafted files (:mod:`.hostile`), a seeded generator of
mutated photos (:mod:`.cases`), and the runner (``python -m tests.fuzz.run``)."""
