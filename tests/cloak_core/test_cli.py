"""``facecloak protect`` and ``facecloak bench`` as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cloak_core.cli import main


def test_bad_usage_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["protect"])
    assert exc.value.code == 2
    assert main(["protect", "a.jpg", "b.jpg", "-o", "out.jpg"]) == 2
    err = capsys.readouterr().err
    assert "-o/--output takes one input" in err
    with pytest.raises(SystemExit) as exc:
        main(["protect", "a.jpg", "--preset", "nope"])
    assert exc.value.code == 2


def test_protect_json_and_failures(tmp_path, photos_dir, capsys):
    good = tmp_path / "obama small.jpg"
    shutil.copy(photos_dir / "obama_small.jpg", good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good.read_bytes()[:2000])
    text = tmp_path / "notes.png"
    text.write_text("hello, not an image")
    out_dir = tmp_path / "out"
    code = main(
        [
            "protect",
            str(broken),
            str(good),
            str(text),
            str(tmp_path / "missing.jpg"),
            "--out-dir",
            str(out_dir),
            "--preset",
            "fast",
            "--steps",
            "2",
            "--json",
            "--calibrate",
            "--grid",
            str(tmp_path / "grid.png"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # some images failed, the good one was still processed
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 1
    record = lines[0]
    assert record["input"] == str(good) and record["faces"] == 1
    assert record["output"] == str(out_dir / "obama small.cloaked.jpg")
    assert {"seconds", "lpips"} <= set(record)
    for model in ("dlib", "sface"):
        (face,) = record["models"][model]
        assert {"similarity_before", "similarity_after", "same_person_after"} <= set(face)
    # The visibility panel of the one face, on its region of the written output.
    (seen,) = record["visibility"]
    assert {"de2000_mean", "de2000_p95", "psnr", "ssim", "dists"} <= set(seen)
    assert 0 < seen["de2000_mean"] < seen["de2000_p95"] and 20 < seen["psnr"] < 60
    assert 0 < seen["dists"] < 0.5 and 0.5 < seen["ssim"] < 1
    # For scale, the same face only re-encoded: measured, so q75 shows more than q90.
    (q90,), (q75,) = record["calibration"]["jpeg90"], record["calibration"]["jpeg75"]
    assert 0 < q90["de2000_mean"] < q75["de2000_mean"] and q90["psnr"] > q75["psnr"]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width > 3 * seen["size"][1]
    with Image.open(record["output"]) as im, Image.open(good) as src:
        assert im.size == src.size and im.format == "JPEG"
    errors = captured.err.strip().splitlines()
    assert errors.pop() == f"wrote {tmp_path / 'grid.png'}"
    assert len(errors) == 3
    assert all(line.startswith("facecloak: ") for line in errors)
    assert str(broken) in errors[0] and str(text) in errors[1] and "missing.jpg" in errors[2]


def test_format_and_output_path(tmp_path, photos_dir):
    target = tmp_path / "x.png"
    code = main(
        [
            "protect",
            str(photos_dir / "obama_small.jpg"),
            "-o",
            str(target),
            "--format",
            "png",
            "--preset",
            "fast",
            "--steps",
            "1",
        ]
    )
    assert code == 0
    with Image.open(target) as im:
        assert im.format == "PNG"


def test_protect_set_changes_the_presets_attack(tmp_path, photos_dir, capsys):
    """``--set`` reaches the attack: with no step and no start noise the protected photo
    is the original, pixel for pixel (the preset alone changes the face); a name that is
    no setting is refused before anything loads."""
    source = photos_dir / "obama_small.jpg"
    target = tmp_path / "same.png"
    sets = ["--set", "step_size=0", "--set", "noise=0"]
    args = ["protect", str(source), "-o", str(target), "--format", "png", "--preset", "fast"]
    assert main([*args, "--steps", "2", *sets]) == 0
    with Image.open(target) as out, Image.open(source) as src:
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(src.convert("RGB")))
    capsys.readouterr()
    assert main([*args, "--set", "step=0.1"]) == 2
    assert "'step' is not an attack setting" in capsys.readouterr().err


def test_console_script_runs_bench_json(tmp_path, photos_dir):
    """The installed entry point, as a user calls it: one JSON row per case."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloak_core.cli",
            "bench",
            "--preset",
            "fast",
            "--steps",
            "1",
            "--sizes",
            "0.2",
            "--faces",
            "1",
            "--set",
            "seed=3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["faces_found"] == 1 and row["megapixels"] == pytest.approx(0.2, abs=0.02)
    assert row["peak_memory_mb"] > 0 and row["seconds"] > 0
    assert row["settings"] == {"seed": 3}  # what --set changed, as the attack took it
    (seen,) = row["visibility"]
    assert seen["de2000_mean"] > 0 and seen["psnr"] > 20 and row["visibility_seconds"] > 0
    assert {"detect", "dlib forward", "dlib backward", "sface forward", "lpips forward"} <= set(
        row["stages"]
    )


def test_protect_json_names_each_faces_held_out_model():
    from dataclasses import replace
    from pathlib import Path

    from cloak_core.commands.protect import json_line
    from cloak_core.pipeline import ModelReport, ProtectResult

    def report(after: float) -> ModelReport:
        return ModelReport(0.99, after, after, after > 0.5)

    result = ProtectResult(
        data=b"",
        mime="image/jpeg",
        format="JPEG",
        faces=2,
        seconds=1.0,
        width=10,
        height=10,
        models={"a": [report(0.2), report(0.7)], "b": [report(0.1), report(0.3)]},
        held_out=("b", "a"),
    )
    record = json.loads(json_line(Path("in.jpg"), Path("out.jpg"), result))
    assert [h["model"] for h in record["held_out"]] == ["b", "a"]
    assert [h["similarity_after"] for h in record["held_out"]] == [0.1, 0.7]
    assert [h["same_person_after"] for h in record["held_out"]] == [False, True]
    plain = replace(result, held_out=(None, None))
    assert "held_out" not in json.loads(json_line(Path("in.jpg"), Path("out.jpg"), plain))


def test_protect_verify_reports_how_an_unseen_recogniser_sees_each_face(
    tmp_path, photos_dir, capsys
):
    """`--verify` adds, per recogniser kept out of the attack, how it sees the protected
    face: the same cosine the evaluation's own alignment of that model gives on the very
    files (original, output), not a view of the original or of the attack's regions."""
    import numpy as np

    from cloak_core.detect import FaceDetector
    from cloak_core.evaluation.evaluators import RegistryEvaluator
    from cloak_core.models import load_model
    from cloak_core.store import ModelStore

    source = tmp_path / "obama.jpg"
    shutil.copy(photos_dir / "obama_small.jpg", source)
    out_dir = tmp_path / "out"
    args = ["protect", str(source), "--out-dir", str(out_dir), "--preset", "fast"]
    code = main([*args, "--steps", "3", "--json", "--verify", "mobilefacenet128"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    record = json.loads(captured.out)
    assert set(record["models"]) == {"dlib", "sface"}  # the ensemble, as before
    (seen,) = record["unseen"]["mobilefacenet128"]
    assert seen["similarity_before"] > 0.99  # the original re-encoded: the same face
    assert seen["similarity_after"] < seen["similarity_before"] - 0.01

    store = ModelStore.from_env()
    model = RegistryEvaluator(load_model("mobilefacenet128", store))
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in (source, record["output"])]
    with FaceDetector(store) as detector:
        face = detector.detect(pixels[0])[0]
    a, b = model.embed(pixels, [face, face])
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert seen["similarity_after"] == pytest.approx(cosine, abs=0.005)

    assert main([*args, "--json", "--verify", "dlib"]) == 2  # in the ensemble: no check
    assert "dlib is in the attack ensemble" in capsys.readouterr().err
    assert main([*args, "--json", "--verify", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main([*args, "--verify", "mobilefacenet128"]) == 2  # without --json
    assert "give --json too" in capsys.readouterr().err


def test_protect_together_in_batches_pushes_every_batch_from_the_whole_set(
    tmp_path, photos_dir, capsys, monkeypatch
):
    """`--together --batch-size 2` on three photos of one person attacks them two, then
    one, at a time, and writes each batch before the next is decoded; every face is still
    pushed from the shared identity of all three, exactly as in one batch. The faces the
    first pass found are not looked for again, unless the file changed since."""
    import torch

    from cloak_core import pipeline
    from cloak_core.detect import FaceDetector
    from cloak_core.pipeline import Protector

    calls, targets, handed, detected = [], [], [], []
    real_many, real_lowkey, real_detect = (
        Protector.protect_many,
        pipeline.lowkey,
        FaceDetector.detect,
    )
    out_dir = tmp_path / "out"

    def spy(self, items, **kwargs):
        # What is already written when this batch starts.
        written = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
        carried = kwargs.get("carried")  # its faces, counted before the call adds its own
        faces = None if carried is None else len(carried["together"]["dlib"])
        calls.append((len(items), kwargs.get("together"), written, faces))
        handed.append(kwargs.get("faces"))
        return real_many(self, items, **kwargs)

    def count(self, pixels, **kwargs):
        detected.append(pixels.shape)
        return real_detect(self, pixels, **kwargs)

    def record(batch, models, *args, **kwargs):
        t = kwargs["targets"]
        targets.append(torch.cat([t[n].float().cpu() for n in sorted(models)], 1))
        return real_lowkey(batch, models, *args, **kwargs)

    monkeypatch.setattr(Protector, "protect_many", spy)
    monkeypatch.setattr(pipeline, "lowkey", record)
    monkeypatch.setattr(FaceDetector, "detect", count)
    inputs = [str(photos_dir / f"obama{k}.jpg") for k in (1, 2, 3)]
    args = ["protect", *inputs, "--together", "--steps", "1", "--format", "png"]
    assert main([*args, "--out-dir", str(tmp_path / "whole")]) == 0
    whole, calls[:], targets[:], handed[:], detected[:] = list(targets), [], [], [], []
    assert main([*args, "--out-dir", str(out_dir), "--batch-size", "2"]) == 0
    capsys.readouterr()
    # Each photo detected once, in the first pass, and its faces handed to its batch.
    assert len(detected) == 3
    assert [[len(f) for f in h] for h in handed] == [[1, 1], [1]]

    assert [c[:3] for c in calls] == [
        (2, False, []),
        (1, False, ["obama1.cloaked.png", "obama2.cloaked.png"]),
    ]
    # Each batch carries the other batch's faces: one face each in obama3 and obama1-2.
    assert [c[3] for c in calls] == [1, 2]
    assert sorted(p.name for p in out_dir.iterdir()) == [f"obama{k}.cloaked.png" for k in (1, 2, 3)]
    # The same three targets (per face, every model's embedding to push from) as in one
    # batch, up to float rounding.
    split = torch.cat(targets)
    whole = torch.cat(whole)
    assert split.shape == whole.shape == (3, 128 + 128)
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(split), order(whole), atol=1e-4, rtol=0)
    # A file changed after the first pass read it is looked at again when its batch comes.
    changed = tmp_path / "obama3.jpg"
    shutil.copy(inputs[2], changed)

    def rewrite(self, items, **kwargs):
        if len(items) == 2:  # the first batch: obama3 changes before its own is read
            Image.open(inputs[2]).save(changed, quality=70)
        return spy(self, items, **kwargs)

    monkeypatch.setattr(Protector, "protect_many", rewrite)
    handed[:], detected[:] = [], []
    moved = [*inputs[:2], str(changed)]
    out = str(tmp_path / "changed")
    assert (
        main(
            ["protect", *moved, "--together", "--steps", "1", "--batch-size", "2", "--out-dir", out]
        )
        == 0
    )
    capsys.readouterr()
    assert len(detected) == 4 and handed[1] is None
    # A batch size means nothing for photos protected one by one.
    assert main(["protect", inputs[0], "--batch-size", "2"]) == 2
    assert "--together" in capsys.readouterr().err


def test_protect_together_batches_one_persons_photos(tmp_path, photos_dir, capsys, monkeypatch):
    """`--together` protects every readable input in one batch marked as one person's
    collection (the shared-identity push is tested in test_attack); a file that cannot be
    read or decoded fails alone, and each good one is written and reported."""
    from cloak_core.pipeline import Protector

    calls = []
    real = Protector.protect_many

    def spy(self, items, **kwargs):
        calls.append((len(items), kwargs.get("together")))
        return real(self, items, **kwargs)

    monkeypatch.setattr(Protector, "protect_many", spy)
    inputs = [photos_dir / "obama1.jpg", tmp_path / "missing.jpg", photos_dir / "obama2.jpg"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photos_dir / "obama1.jpg").read_bytes()[:2000])
    inputs.append(broken)
    out_dir = tmp_path / "out"
    code = main(
        [
            "protect",
            *map(str, inputs),
            "--together",
            "--out-dir",
            str(out_dir),
            "--steps",
            "2",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert calls == [(3, True)]  # the missing file is never handed to the attack
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["input"] for r in records] == [str(inputs[0]), str(inputs[2])]
    assert all(r["faces"] >= 1 for r in records)
    assert sorted(p.name for p in out_dir.iterdir()) == ["obama1.cloaked.jpg", "obama2.cloaked.jpg"]
    errors = captured.err.strip().splitlines()
    assert any("missing.jpg: cannot read" in e for e in errors)
    assert any("broken.jpg" in e for e in errors)
