"""face.evoLVe backbones: checkpoint layout, strict loading via the store, forward, gradients."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cloak_core.errors import ModelStoreError
from cloak_core.models import evolve
from cloak_core.models.base import ARCFACE_TEMPLATE_112, load
from cloak_core.store import WEIGHTS, ModelStore, UrlSource, WeightFile

# ---------------------------------------------------------------- the published layout
# The state-dict keys and shapes that face.evoLVe's model_irse.py / model_resnet.py give
# for 112x112 inputs, spelled out from their module names, independently of evolve.py.


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def _ir_layout(units: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    keys = {"input_layer.0.weight": (64, 3, 3, 3), **_bn("input_layer.1", 64)}
    keys["input_layer.2.weight"] = (64,)
    j, c_in = 0, 64
    for depth, n in zip((64, 128, 256, 512), units, strict=True):
        for u in range(n):
            cin = c_in if u == 0 else depth
            p = f"body.{j}"
            if cin != depth:
                keys[f"{p}.shortcut_layer.0.weight"] = (depth, cin, 1, 1)
                keys.update(_bn(f"{p}.shortcut_layer.1", depth))
            keys.update(_bn(f"{p}.res_layer.0", cin))
            keys[f"{p}.res_layer.1.weight"] = (depth, cin, 3, 3)
            keys[f"{p}.res_layer.2.weight"] = (depth,)
            keys[f"{p}.res_layer.3.weight"] = (depth, depth, 3, 3)
            keys.update(_bn(f"{p}.res_layer.4", depth))
            j += 1
        c_in = depth
    keys.update(_bn("output_layer.0", 512))
    keys["output_layer.3.weight"] = (512, 512 * 7 * 7)
    keys["output_layer.3.bias"] = (512,)
    keys.update(_bn("output_layer.4", 512))
    return keys


def _resnet_layout(units: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), units, strict=True), start=1):
        for u in range(n):
            p = f"layer{s}.{u}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            keys.update(_bn(f"{p}.bn1", planes))
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(f"{p}.bn2", planes))
            keys[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            keys.update(_bn(f"{p}.bn3", planes * 4))
            if u == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update(_bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    keys.update(_bn("bn_o1", 2048))
    keys["fc.weight"] = (512, 2048 * 4 * 4)
    keys["fc.bias"] = (512,)
    keys.update(_bn("bn_o2", 512))
    return keys


ARCHS = {
    "ir_50": (evolve.ir_50, _ir_layout((3, 4, 14, 3))),
    "ir_152": (evolve.ir_152, _ir_layout((3, 8, 36, 3))),
    "resnet_152": (evolve.resnet_152, _resnet_layout((3, 8, 36, 3))),
}

# Trainable parameters. IR-50: "about 43.6M" is the usual figure for a 112x112 IR-50 with
# its 25088 -> 512 embedding layer. ResNet-152: torchvision's documented 60,192,808 less
# its 2048 -> 1000 classifier, plus face.evoLVe's head (BN 2048, 32768 -> 512, BN1d 512).
IR_50_PARAMS = 43_574_976
IR_152_PARAMS = 70_737_600
RESNET_152_PARAMS = 60_192_808 - (2048 * 1000 + 1000) + 2 * 2048 + (32768 * 512 + 512) + 2 * 512


@pytest.fixture(scope="module")
def models() -> dict[str, evolve.EvolveModel]:
    torch.set_num_threads(2)
    return {name: factory().freeze() for name, (factory, _) in ARCHS.items()}


def _random_state(model: evolve.EvolveModel, seed: int) -> dict[str, torch.Tensor]:
    """The backbone's state dict with every float tensor random (variances positive)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.backbone.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + seed)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.05
    return state


@pytest.fixture(scope="module")
def http_root(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """A folder served over http on 127.0.0.1, and its base URL."""
    root = tmp_path_factory.mktemp("served")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_state_dict_has_the_published_keys_and_shapes(models, arch: str):
    expected = ARCHS[arch][1]
    got = {k: tuple(v.shape) for k, v in models[arch].backbone.state_dict().items()}
    assert set(got) == set(expected), set(got) ^ set(expected)
    assert got == expected


def test_parameter_counts(models):
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert counts == {
        "ir_50": IR_50_PARAMS,
        "ir_152": IR_152_PARAMS,
        "resnet_152": RESNET_152_PARAMS,
    }
    assert abs(counts["ir_50"] - 43.6e6) < 0.1e6
    assert RESNET_152_PARAMS == 74_926_656


def test_specs_describe_the_lowkey_ensemble():
    by_name = {s.name: s for s in evolve.SPECS}
    assert sorted(by_name) == [
        "ir152_arcface",
        "ir152_cosface",
        "resnet152_arcface",
        "resnet152_cosface",
    ]
    for spec in evolve.SPECS:
        assert spec.family == "evolve" and not spec.default
        assert spec.input_size == (112, 112) and spec.embedding_dim == 512
        assert spec.template == ARCFACE_TEMPLATE_112
        assert spec.verification.metric == "cosine" and 0.2 <= spec.verification.threshold <= 0.4
        (file,) = spec.weights
        # Each names a file the store fetches from the LowKey release.
        assert file in WEIGHTS
        assert any(
            isinstance(s, UrlSource) and s.url.endswith("/" + file) for s in WEIGHTS[file].sources
        )


# One spec per architecture: the ArcFace and CosFace files share their layout.
@pytest.mark.parametrize("spec_name", ["ir152_arcface", "resnet152_cosface"])
def test_checkpoint_served_over_http_loads_strictly(models, http_root, tmp_path, spec_name: str):
    spec = next(s for s in evolve.SPECS if s.name == spec_name)
    arch = "ir_152" if spec_name.startswith("ir152") else "resnet_152"
    source_model = models[arch]
    state = _random_state(source_model, seed=len(spec_name))
    root, base_url = http_root
    (file,) = spec.weights
    torch.save(state, root / file)

    table = {
        file: WeightFile(
            name=file,
            sha256=None,  # as for the published files: the first download's digest is recorded
            sources=(UrlSource(base_url + file),),
            description="random weights under face.evoLVe's keys",
            license="test",
        )
    }
    store = ModelStore(cache_dir=tmp_path / "cache", local_dirs=(), weights=table)
    model = load(spec, store)
    assert store.find_local(file) == tmp_path / "cache" / file

    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert model.spec is spec and not model.training

    faces = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    faces.requires_grad_(True)
    embedding = model(faces)
    assert embedding.shape == (1, 512)
    # The model normalises (x - 0.5) / 0.5 itself: the backbone sees -1..1.
    with torch.no_grad():
        assert torch.allclose(embedding, model.backbone(faces * 2 - 1), atol=1e-5)
    embedding.pow(2).sum().backward()
    assert faces.grad is not None and torch.isfinite(faces.grad).all()
    assert faces.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_forward_shape_and_input_gradient(models, arch: str):
    model = models[arch]
    faces = torch.rand(2 if arch == "ir_50" else 1, 3, 112, 112, requires_grad=True)
    out = model(faces)
    assert out.shape == (faces.shape[0], 512)
    out.sum().backward()
    assert faces.grad is not None and faces.grad.abs().sum() > 0


def _save_variant(models, tmp_path: Path, edit) -> Path:
    state = _random_state(models["ir_50"], seed=7)
    edit(state)
    path = tmp_path / "Backbone_IR_50.pth"
    torch.save(state, path)
    return path


def test_missing_key_fails_with_a_clear_error(models, tmp_path):
    path = _save_variant(models, tmp_path, lambda s: s.pop("body.5.res_layer.3.weight"))
    with pytest.raises(ModelStoreError, match=r"missing 1 \(body\.5\.res_layer\.3\.weight\)") as e:
        evolve.ir_50(path)
    assert str(path) in str(e.value) and "IRBackbone" in str(e.value)


def test_extra_key_fails_with_a_clear_error(models, tmp_path):
    path = _save_variant(
        models, tmp_path, lambda s: s.update({"output_layer.5.weight": torch.zeros(512)})
    )
    with pytest.raises(ModelStoreError, match=r"unexpected 1 \(output_layer\.5\.weight\)"):
        evolve.ir_50(path)


def test_wrong_architecture_fails_with_a_clear_error(models, tmp_path):
    path = _save_variant(models, tmp_path, lambda s: None)  # an IR-50 file for an IR-152
    with pytest.raises(ModelStoreError, match=r"IRBackbone architecture: missing \d+ \(body\."):
        evolve.ir_152(path)
    not_a_state_dict = tmp_path / "junk.pth"
    not_a_state_dict.write_bytes(b"not a torch file")
    with pytest.raises(ModelStoreError, match="not a readable torch state dict"):
        evolve.resnet_152(not_a_state_dict)
