"""``facecloak frontier`` end to end on a tiny slice of data/faces."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from cloak_core.cli import main
from cloak_core.errors import UsageError
from cloak_core.evaluation.frontier import FrontierSettings, point_value

pytestmark = pytest.mark.slow


def test_point_values_scale_the_presets_own_setting() -> None:
    assert point_value("balanced", "steps", 0.5) == 18
    assert point_value("fast", "steps", 0.01) == 1
    assert point_value("strong", "lpips_budget", 2.0) == pytest.approx(0.07)
    with pytest.raises(UsageError, match="no lpips_budget"):
        FrontierSettings(dataset=".", out=".", presets=("paper",), sweep="lpips_budget")
    with pytest.raises(UsageError, match="sweep"):
        FrontierSettings(dataset=".", out=".", sweep="noise")
    # A preset without the swept setting stands as it is, at x1 only.
    assert point_value("balanced", "perceptual", 1.0) is None
    assert point_value("natural", "perceptual", 0.5) == pytest.approx(0.5)
    FrontierSettings(
        dataset=".",
        out=".",
        presets=("natural", "balanced"),
        sweep="perceptual",
        only=(("balanced", (1.0,)),),
    )


def test_combined_curves_tell_runs_apart() -> None:
    from cloak_core.evaluation.frontier import curve_style

    assert curve_style("balanced", 0, ["balanced", "strong"], []) == ("o-", "#1f77b4", 1.0)
    # Before and after, several presets: the colour says the preset, the line the run.
    presets = ["old: balanced", "old: strong", "new: balanced", "new: strong"]
    styles = [curve_style(p, k, presets, ["old", "new"]) for k, p in enumerate(presets)]
    assert [s[0] for s in styles] == ["s--", "s--", "o-", "o-"]
    assert styles[0][1] == styles[2][1] != styles[1][1] == styles[3][1]
    # One preset in every run (a technique turned off per run): a colour per run.
    runs = ["today", "no-diversity", "alone"]
    presets = [f"{r}: balanced" for r in runs]
    styles = [curve_style(p, k, presets, runs) for k, p in enumerate(presets)]
    assert {s[0] for s in styles} == {"o-"} and len({s[1] for s in styles}) == 3
    # One preset per run, not all the same (candidate settings of `balanced` beside the
    # old `fast`): still a colour per run.
    runs = ["balanced", "old-fast", "12x0.0105", "16x0.0105"]
    presets = ["balanced: balanced", "old-fast: fast", "12x0.0105: balanced", "16x0.0105: balanced"]
    styles = [curve_style(p, k, presets, runs) for k, p in enumerate(presets)]
    assert {s[0] for s in styles} == {"o-"} and len({s[1] for s in styles}) == 4


def test_photo_grid_shows_the_faces_most_visible_under_any_point() -> None:
    import numpy as np

    from cloak_core.evaluation.frontier import photo_grid

    def point(seen: list[float]) -> dict:
        faces = [
            {"path": f"/p/{k}.jpg", "size": 100 + k, "protected": True, "visibility": None}
            for k in range(len(seen))
        ]
        for face, v in zip(faces, seen, strict=True):
            face["visibility"] = {"dlib,sface": {"scielab_mean": v}}
        # A missed face is in the report's list but has no crop.
        faces.insert(1, {"path": "/p/x.jpg", "size": 50, "protected": False, "visibility": None})
        return {"photos": {"per_face": faces}}

    crops = [np.full((4, 4, 3), k, np.uint8) for k in range(3)]
    views = [(name, [(c, c + 10 * (n + 1)) for c in crops]) for n, name in enumerate("ab")]
    rows = photo_grid([point([0.5, 1.0, 0.2]), point([2.0, 0.1, 0.3])], views, 2)
    # Face 0 is the most visible under the second point, face 1 under the first.
    assert [r.label for r in rows] == [
        "0.jpg, a 100-pixel face: S-CIELAB 0.50 / 2.00",
        "1.jpg, a 101-pixel face: S-CIELAB 1.00 / 0.10",
    ]
    assert list(rows[1].changed) == ["a", "b"] and rows[1].changed["b"][0, 0, 0] == 21
    assert rows[1].original[0, 0, 0] == 1
    assert photo_grid([point([1.0])], [("a", [])], 8) == []


def test_eval_set_evaluates_one_frontier_point(store, tmp_path) -> None:
    from cloak_core.cli import build_parser
    from cloak_core.commands.eval import settings_from_args
    from cloak_core.evaluation.runner import Evaluation

    parser = build_parser()
    args = parser.parse_args(
        [
            "eval",
            "--dataset",
            ".",
            "--preset",
            "natural",
            "--set",
            "perceptual=0.7",
            "--set",
            "diversity=0",
            "--set",
            "centroid=true",
            "--set",
            "momentum=None",
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    settings = settings_from_args(args)
    assert settings.overrides == (
        ("perceptual", 0.7),
        ("diversity", 0.0),
        ("centroid", True),
        ("momentum", None),
    )
    config = Evaluation(settings, store).config
    assert (config.name, config.perceptual, config.diversity) == ("natural", 0.7, 0.0)
    assert (config.centroid, config.momentum) == (True, None)
    for text in ("perceptual", "perceptual=high", "=1"):
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "--dataset", ".", "--set", text])
    bad = parser.parse_args(["eval", "--dataset", ".", "--set", "noise_level=1"])
    with pytest.raises(UsageError, match="not an attack setting"):
        Evaluation(settings_from_args(bad), store)


def test_frontier_on_a_tiny_set(faces_dir, store, tmp_path, monkeypatch, capsys) -> None:
    from cloak_core.evaluation import frontier as module

    # Two protected identities, one protected face and one probe each; two evaluators.
    monkeypatch.setattr(module, "QUICK_IDENTITIES", 2)
    monkeypatch.setattr(module, "QUICK_GALLERY", 1)
    monkeypatch.setattr(module, "QUICK_PROBES", 1)
    out = tmp_path / "frontier"
    args = ["frontier", "--dataset", str(faces_dir), "--presets", "fast@0.1/0.25,paper@0.02"]
    args += ["--sweep", "steps", "--factors", "0.5,1"]
    args += ["--eval-models", "dlib,mobilefacenet", "--device", "cpu"]
    args += ["--conditions", "png", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    frontier = json.loads((out / "frontier.json").read_text())
    assert (out / "frontier.md").read_text() == printed
    for name in ("frontier.png", "frontier-ssimulacra2.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300

    points = frontier["points"]
    assert [(p["preset"], p["value"]) for p in points] == [
        ("fast", 1.0),
        ("fast", 3.0),
        ("paper", 1.0),
    ]
    assert frontier["evaluators"] == ["dlib", "mobilefacenet"]
    for p in points:
        assert set(p["evaluators"]) == {"dlib", "mobilefacenet"}
        # Leave-one-out over every registry model present.
        assert p["evaluators"]["dlib"]["ensemble"] == [
            "sface",
            "facenet",
            "mobilefacenet128",
            "mobilefacenet",
        ]
        for e in p["evaluators"].values():
            assert e["rank1"]["png"] in (0.0, 0.5, 1.0)
            # Both protected faces against their own originals, by the evaluator's rule.
            own = e["own_original"]["png"]
            assert own["faces"] == 2 and own["matched"] in (0.0, 0.5, 1.0)
            assert -1.0 < own["cosine"] < 0.9999
            assert e["visibility"]["de2000_mean"]["mean"] > 0
            assert e["visibility"]["scielab_mean"]["mean"] > 0
        # The table's column: the worst evaluator's share matched, the mean cosine.
        owns = [e["own_original"]["png"] for e in p["evaluators"].values()]
        cell = f"{100 * max(o['matched'] for o in owns):.1f}% "
        cell += f"({sum(o['cosine'] for o in owns) / len(owns):.2f})"
        assert f"| {cell} |" in printed, cell
    # Three steps change the faces more than one step.
    assert points[1]["visibility"]["de2000_mean"] > points[0]["visibility"]["de2000_mean"]
    assert points[1]["visibility"]["psnr"] < points[0]["visibility"]["psnr"]
    assert points[1]["visibility"]["ssimulacra2"] < points[0]["visibility"]["ssimulacra2"] < 100
    assert "| S-CIELAB | SSIMULACRA2 | CIEDE2000 |" in printed
    assert "| paper | 1 |" in printed
    # The calibration: measured on the same faces, JPEG q75 shows more than q90, and the
    # re-encoded galleries are still identified (clean rank-1).
    cal = frontier["calibration"]
    assert (
        0 < cal["jpeg90"]["visibility"]["de2000_mean"] < cal["jpeg75"]["visibility"]["de2000_mean"]
    )
    assert cal["jpeg75"]["rank1"] == {"dlib": 1.0, "mobilefacenet": 1.0}
    # JPEG's fine grain: S-CIELAB, the eye's view, well under plain CIEDE2000; the plot's
    # visibility axis is S-CIELAB.
    for name in ("jpeg90", "jpeg75"):
        v = cal[name]["visibility"]
        assert 0 < v["scielab_mean"] < 0.6 * v["de2000_mean"]
    assert (
        100
        > cal["jpeg90"]["visibility"]["ssimulacra2"]
        > cal["jpeg75"]["visibility"]["ssimulacra2"]
    )
    assert module.visibility_axis(frontier) == ("scielab_mean", "face S-CIELAB mean")
    assert "| fast | 3 |" in printed and "| jpeg75 |" in printed

    # A rerun takes every attacked image from the cache and reports the same figures.
    assert main(args) == 0
    again = json.loads((out / "frontier.json").read_text())
    assert [p["evaluators"] for p in again["points"]] == [p["evaluators"] for p in points]
    capsys.readouterr()

    # Runs combine into one table and plot (before and after a change), each preset named
    # by its run; runs scored by other evaluators do not combine.
    both = tmp_path / "both"
    run = f"before={out / 'frontier.json'},after={out / 'frontier.json'}"
    assert main(["frontier", "--combine", run, "--out", str(both)]) == 0
    table = capsys.readouterr().out
    combined = json.loads((both / "frontier.json").read_text())
    assert [p["preset"] for p in combined["points"]] == [
        f"{run}: {name}" for run in ("before", "after") for name in ("fast", "fast", "paper")
    ]
    assert combined["settings"]["combined"] == ["before", "after"]
    assert "| before: fast | 3 |" in table and "| after: paper | 1 |" in table
    for name in ("frontier.png", "frontier-ssimulacra2.png"):
        with Image.open(both / name) as im:
            assert im.format == "PNG" and im.width > 300
    # A run from before S-CIELAB was measured still combines: its cells say "-" and the
    # plot falls back to CIEDE2000 for every run.
    old = json.loads((out / "frontier.json").read_text())
    rows = [p["visibility"] for p in old["points"]]
    rows += [c["visibility"] for c in old["calibration"].values()]
    rows += [e["visibility"] for p in old["points"] for e in p["evaluators"].values()]
    for v in rows:
        del v["scielab_mean"], v["scielab_p95"], v["ssimulacra2"]
    for p in old["points"]:  # nor did it keep the faces' matches to their own originals
        for e in p["evaluators"].values():
            del e["own_original"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    run = f"old={tmp_path / 'old.json'},new={out / 'frontier.json'}"
    assert main(["frontier", "--combine", run, "--out", str(both)]) == 0
    table = capsys.readouterr().out
    assert "| old: fast | 3 |" in table and "| - | " in table
    mixed = json.loads((both / "frontier.json").read_text())
    assert module.visibility_axis(mixed) == ("de2000_mean", "face CIEDE2000 mean")
    with Image.open(both / "frontier.png") as im:
        assert im.format == "PNG"
    # Nor is it plotted against SSIMULACRA2, and the earlier combination's plot is gone.
    assert not (both / "frontier-ssimulacra2.png").exists()
    other = dict(frontier, evaluators=["dlib"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    run = f"a={out / 'frontier.json'},b={tmp_path / 'other.json'}"
    assert main(["frontier", "--combine", run, "--out", str(both)]) == 2
    assert "evaluators dlib differ" in capsys.readouterr().err
    assert main(["frontier", "--out", str(both)]) == 2
    assert "--dataset" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({"points": []}))
    run = f"a={tmp_path / 'report.json'}"
    assert main(["frontier", "--combine", run, "--out", str(both)]) == 2
    assert "is not a frontier.json" in capsys.readouterr().err


def test_frontier_scores_detected_faces_against_one_fixed_ensemble(
    faces_dir, photos_dir, store, tmp_path, monkeypatch, capsys
) -> None:
    from cloak_core.evaluation import frontier as module
    from cloak_core.evaluation import runner

    monkeypatch.setattr(module, "QUICK_IDENTITIES", 2)
    # Every evaluation the frontier runs, with the settings it was given.
    seen = []

    class Recorded(runner.Evaluation):
        def __init__(self, settings, *args, detector_config=None, **kwargs):
            seen.append((settings, detector_config))
            super().__init__(settings, *args, detector_config=detector_config, **kwargs)

    monkeypatch.setattr(runner, "Evaluation", Recorded)
    out = tmp_path / "fixed"
    args = ["frontier", "--dataset", str(faces_dir), "--presets", "fast@0.1"]
    args += ["--sweep", "steps", "--eval-models", "dlib,mobilefacenet", "--device", "cpu"]
    args += ["--conditions", "png", "--out", str(out), "--landmarks", "detector"]
    args += ["--attack-models", "dlib", "--gallery-per-identity", "1", "--probes-per-identity", "1"]
    args += ["--batch-size", "2", "--face-threshold", "0.6", "--set", "flips=false"]
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos_dir / "obama-240p.jpg", folder)
    args += ["--photos", str(folder)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # The point and the calibration both ran as the flags say; the point with the preset
    # changed by --set and then swept.
    assert len(seen) == 2
    for settings, detector in seen:
        assert settings.landmarks == "detector" and settings.attack_models == ("dlib",)
        assert (settings.gallery_per_identity, settings.probes_per_identity) == (1, 1)
        assert settings.batch_size == 2 and detector.face_threshold == 0.6
        assert settings.photos == folder
    assert seen[0][0].overrides == (("flips", False), ("steps", 1.0))
    assert "- set on every point: `flips=False`" in printed
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["settings"]["landmarks"] == "detector"
    assert frontier["settings"]["attack_models"] == ["dlib"]
    (point,) = frontier["points"]
    assert point["scored"] == {"identities": 2, "protected_gallery_images": 2, "probes": 2}
    assert point["evaluators"]["dlib"]["ensemble"] == ["dlib"]
    assert point["evaluators"]["dlib"]["white_box"] is True
    assert point["evaluators"]["mobilefacenet"]["white_box"] is False
    # Every identity's faces, distractors' too, go through the detector: all found.
    recall = point["detector_recall"]
    assert recall["gallery_images"] == 24 and recall["found"] == recall["images"] == 48
    assert "one attack ensemble, dlib (white-box, left out of worst: dlib)" in printed
    assert "detector recall 48/48 images, gallery 24/24" in printed
    # The whole photo's face is scored on the point, by every evaluator; the worst photo
    # column counts the black-box one alone.
    assert point["photos"]["faces"] == 1 and point["photos"]["missed"] == []
    own = {n: e["photos"]["png"] for n, e in point["evaluators"].items()}
    assert {o["faces"] for o in own.values()} == {1}
    worst = own["mobilefacenet"]
    seen_as = point["photos"]["visibility"]
    column = f"{seen_as['scielab_mean']:.2f} ({seen_as['scielab_p95']:.1f})"
    assert f"| {worst['matched']:.1%} ({worst['cosine']:.2f}) | {column} |" in printed
    assert f"whole photos `{folder}`: 1 photos, 1 faces (0 missed" in printed
    # The face is seen changed, and the plot gets a row of photo faces matched against it.
    assert 0 < seen_as["scielab_mean"] and seen_as["psnr"] < 60
    assert module._plotted(point, "worst", "photos", "png", "scielab_mean") == (
        worst["matched"],
        seen_as["scielab_mean"],
    )
    assert module._plotted(point, "mobilefacenet", "rank1", "png", "scielab_mean") == (
        point["evaluators"]["mobilefacenet"]["rank1"]["png"],
        point["evaluators"]["mobilefacenet"]["visibility"]["scielab_mean"]["mean"],
    )
    with Image.open(out / "frontier.png") as plotted:
        assert plotted.height > 2 * 2.9 * 110  # two rows: the dataset's and the photos'
    # The photo face under the point, beside its original, at display scale (1.3 times the
    # 60-pixel face: a row some 80 pixels high, three crops across).
    with Image.open(out / "frontier-photos-grid.png") as grid:
        assert 75 < grid.height - 18 - 14 - 8 < 85 and grid.width > 3 * 75

    # The worst column and panel count only the evaluators the attack did not use.
    rigged = json.loads((out / "frontier.json").read_text())
    rigged["points"][0]["evaluators"]["dlib"]["rank1"]["png"] = 1.0
    rigged["points"][0]["evaluators"]["mobilefacenet"]["rank1"]["png"] = 0.5
    (tmp_path / "rigged.json").write_text(json.dumps(rigged))
    both = tmp_path / "both"
    assert main(["frontier", "--combine", f"r={tmp_path / 'rigged.json'}", "--out", str(both)]) == 0
    table = capsys.readouterr().out
    assert "| r: fast | 1 | 100.0% | 50.0% | 50.0% |" in table
    # A combined table names each run's own --set, not the first run's for all.
    assert "- combined runs: r (`flips=False`)" in table and "set on every point" not in table
    # --set cannot also name the swept setting.
    assert main([*args, "--set", "steps=3"]) == 2
    assert "swept setting" in capsys.readouterr().err
    # Runs whose faces or attack ensembles differ do not combine.
    for key, value in (("landmarks", "template"), ("attack_models", None)):
        other = json.loads((out / "frontier.json").read_text())
        other["settings"][key] = value
        (tmp_path / "other.json").write_text(json.dumps(other))
        run = f"a={out / 'frontier.json'},b={tmp_path / 'other.json'}"
        assert main(["frontier", "--combine", run, "--out", str(both)]) == 2
        assert f"{key} " in capsys.readouterr().err
