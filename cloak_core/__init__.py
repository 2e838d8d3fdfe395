"""FaceCloak's library: detection, alignment, models, the LowKey attack, evaluation, image I/O.

Knows nothing of HTTP or browsers. The daemon (``backend``) calls one entry point,
:class:`cloak_core.pipeline.Protector`.
"""

__version__ = "0.1.0"
