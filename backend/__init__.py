"""FaceCloak's local daemon: an aiohttp API in front of one protection worker.

Where things are:

- :mod:`backend.app`: ``create_app(config, protector_factory)``, the routes table, resources
  (the worker, the expiry sweep) in ``cleanup_ctx``. Add a route here.
- :mod:`backend.handlers`: one small handler per route (parse, call, answer).
- :mod:`backend.middleware`: errors to JSON; the gate (Host, Origin, token, CORS).
- :mod:`backend.errors`: every error's HTTP status, in one place.
- :mod:`backend.jobs`: the bounded queue and the worker thread that owns the device.
- :mod:`backend.protection`: what the daemon needs of ``cloak_core.pipeline.Protector``
  (its one entry point into the library) and the header check made before queueing.
- :mod:`backend.pairing`, :mod:`backend.settings`, :mod:`backend.storage`: pairing codes,
  tokens and settings in owner-only files of the config folder.
- :mod:`backend.config`: ``DaemonConfig``, the frozen configuration.
- :mod:`backend.logs`: the access log and the redaction of aiohttp's own log records.

The HTTP API is described in ``backend/README.md``. Nothing here imports torch.
"""
