"""What reaches the daemon's log: no token, code, job id or site, whatever logs it.

The malformed-request path of a real process is tested in test_process_security.py;
these are the pieces on their own.
"""

from __future__ import annotations

import io
import json
import logging

from backend.logs import ServerLog, redact_aiohttp_records
from backend.settings import SettingsStore

TOKEN = "Kq3xZ0secret-token-value-that-must-not-leak"


def _capture(logger: logging.Logger) -> tuple[io.StringIO, logging.Handler]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(redact_aiohttp_records)
    logger.addHandler(handler)
    return out, handler


def test_aiohttp_records_keep_only_their_fixed_text():
    logger = logging.getLogger("aiohttp.web")
    out, handler = _capture(logger)
    try:
        try:
            raise ValueError(f"Authorization: Bearer {TOKEN}")
        except ValueError:
            logger.exception("Error handling request %s", f"/v1/jobs/{TOKEN}")
        logger.warning("Can not load cookies: Illegal cookie name %r", TOKEN)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert TOKEN not in text
    assert "Traceback" not in text
    assert "Error handling request - (ValueError)" in text
    assert "Illegal cookie name -" in text


def test_the_request_handlers_logger_drops_exception_messages(caplog):
    log = ServerLog()
    with caplog.at_level(logging.DEBUG, logger="facecloak.server"):
        try:
            raise RuntimeError(f"b'Authorization: Bearer {TOKEN}\\x01'")
        except RuntimeError as exc:
            log.exception("Error handling request from %s", "127.0.0.1", exc_info=exc)
            log.debug("Error handling request from %s", "127.0.0.1", exc_info=exc)
    assert TOKEN not in caplog.text
    assert all(r.exc_info is None for r in caplog.records)
    assert [r.getMessage() for r in caplog.records] == [
        "Error handling request from - (RuntimeError)"
    ] * 2


def test_invalid_settings_file_is_ignored_without_quoting_it(tmp_path, caplog):
    (tmp_path / "settings.json").write_text(json.dumps({"sites": {"secret site!": True}}))
    with caplog.at_level(logging.WARNING):
        settings = SettingsStore(tmp_path, default_preset="fast").load()
    assert "secret site!" not in settings.sites
    assert "settings.json" in caplog.text
    assert "secret" not in caplog.text
