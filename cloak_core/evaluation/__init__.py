"""``facecloak eval``: how well protection works, measured as in the LowKey paper.

- :mod:`~cloak_core.evaluation.protocol`: gallery/probe splits, cosine ranking, rank-k
  accuracy, the per-identity (default) or joint protected gallery;
- :mod:`~cloak_core.evaluation.evaluators`: the registry's models and the two independent
  pipelines (dlib-bin's, OpenCV's YuNet + SFace) that share no code with the attack;
- :mod:`~cloak_core.evaluation.conditions`: PNG, JPEG and downscaling, as uploads undergo;
- :mod:`cloak_core.visibility` (outside this package: protect uses it too): the
  visibility panel of each protected face (CIEDE2000, PSNR, SSIM, DISTS, LPIPS) and grids;
- :mod:`~cloak_core.evaluation.ensembles`: which ensemble attacks for which evaluator
  (leave-one-out, or one fixed ensemble), grouped into attack runs;
- :mod:`~cloak_core.evaluation.cache`: attacked batches kept in ``out/attack-cache``, named
  by everything their pixels depend on, so a stopped run goes on where it was;
- :mod:`~cloak_core.evaluation.workers`: the ``jobs`` CPU processes that fill that cache;
- :mod:`~cloak_core.evaluation.versions`: the software versions a report records;
- :mod:`~cloak_core.evaluation.runner`: the run itself (settings, batching, identification);
- :mod:`~cloak_core.evaluation.report`: report.json, report.md, accuracy.png, grid.png;
- :mod:`~cloak_core.evaluation.frontier`: ``facecloak frontier``, protection against
  visibility over a sweep of one strength setting per preset.

Choices made here, beyond the paper's protocol: the first ``--identities N`` identities
(in name order) are protected and scored, the others stay clean as distractors; a probe
is searched in a gallery where only its own identity is protected (one user protecting
their photos among people who do not; ``--joint`` protects all at once); rank-k counts a
probe as found when one of its k nearest gallery images has its identity.
"""
