"""``facecloak eval``: how well protection works, measured as in the LowKey paper.

- :mod:`~cloak_core.evaluation.protocol`: gallery/probe splits, cosine ranking, rank-k
  accuracy, the per-identity (default) or joint protected gallery;
- :mod:`~cloak_core.evaluation.evaluators`: the registry's models and the two independent
  pipelines (dlib-bin's, OpenCV's YuNet + SFace) that share no code with the attack;
- :mod:`~cloak_core.evaluation.conditions`: PNG, JPEG and downscaling, as uploads undergo;
- :mod:`~cloak_core.evaluation.quality`: PSNR, SSIM, LPIPS of protected images;
- :mod:`~cloak_core.evaluation.runner`: the run itself (leave-one-out ensembles, batching);
- :mod:`~cloak_core.evaluation.report`: report.json, report.md, accuracy.png, grid.png.

Choices made here, beyond the paper's protocol: the first ``--identities N`` identities
(in name order) are protected and scored, the others stay clean as distractors; a probe
is searched in a gallery where only its own identity is protected (one user protecting
their photos among people who do not; ``--joint`` protects all at once); rank-k counts a
probe as found when one of its k nearest gallery images has its identity.
"""
