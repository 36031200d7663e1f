"""The `clstm4d` command end to end on tiny synthetic data, through `main([...])`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from clstm4d.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from references import dice_reference  # noqa: E402

SUBCOMMANDS = ["demo", "train", "predict", "evaluate", "synth", "plan", "bench"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic dataset and a model trained for a few steps on it."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["synth", "--out", str(root / "data"), "--cases", "3", "--frames", "6",
                 "--size", "24", "--test", "1", "--validation", "0.34"]) == 0
    dl = root / "data" / "datalist.json"
    assert main(["train", "--datalist", str(dl), "--out", str(root / "run"), "--steps", "3",
                 "--batch-size", "2", "--set", "data.window=4", "--set", "train.progress=false",
                 "--set", "model.channels=[4, 8]", "--set", "train.val_every=3"]) == 0
    entry = json.loads(dl.read_text())["test"][0]
    return {"root": root, "datalist": dl, "ckpt": root / "run",
            "image": root / "data" / entry["image"], "label": root / "data" / entry["label"]}


def test_train_writes_checkpoint_config_and_metrics(run):
    from clstm4d.engine.run.checkpoint import Checkpoint

    ck = Checkpoint.open(run["ckpt"])
    assert {p.name for p in ck.path.iterdir()} >= {"model.safetensors", "config.json", "state.json"}
    cfg = ck.config
    assert cfg["model"]["spatial_dims"] == 2 and cfg["model"]["out_channels"] == 3
    assert cfg["model_config"]["channels"] == [4, 8]
    rows = [json.loads(x) for x in (run["ckpt"] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3
    # validation scored the validation case as `predict` segments it
    from clstm4d.data import load_case, load_datalist
    from clstm4d.engine.inference.predictor import Predictor

    case = load_case(load_datalist(run["datalist"]).validation[0])
    pred = Predictor.from_checkpoint(run["ckpt"]).predict_array(case.image, case.geometry)
    assert rows[-1]["val_dice"] == pytest.approx(dice_reference(pred, case.label, 3), abs=1e-6)
    assert len(rows[-1]["val_dice_per_frame"]) == 6


def test_predict_chunks_and_windows_equal_one_pass_and_keep_geometry(run, tmp_path):
    import nibabel as nib

    outs = {}
    for name, extra in {"one": ["--chunk", "6"], "chunks": ["--chunk", "4"],
                        "windows": ["--chunk", "2", "--roi", "16", "--overlap", "0.5"]}.items():
        out = tmp_path / f"{name}.nii.gz"
        assert main(["predict", "--checkpoint", str(run["ckpt"]), "--input", str(run["image"]),
                     "--output", str(out), *extra]) == 0
        outs[name] = nib.load(str(out))
    src = nib.load(str(run["image"]))
    one = np.asarray(outs["one"].dataobj)
    assert one.shape[:2] == src.shape[:2] and one.shape[-1] == 6  # 6 frames > window 4
    np.testing.assert_allclose(outs["one"].affine, src.affine)
    # carrying the recurrent state across chunks of frames gives the one-pass result
    np.testing.assert_array_equal(np.asarray(outs["chunks"].dataobj), one)
    # sliding windows (Gaussian blending) change little on a model this small
    agree = (np.asarray(outs["windows"].dataobj) == one).mean()
    assert agree > 0.9


def test_evaluate_writes_csv_and_plots(run, tmp_path, capsys):
    pred = tmp_path / "pred.nii.gz"
    assert main(["predict", "--checkpoint", str(run["ckpt"]), "--input", str(run["image"]),
                 "--output", str(pred)]) == 0
    assert main(["evaluate", "--pred", str(pred), "--label", str(run["label"]),
                 "--out", str(tmp_path / "ev"), "--degraded", "2"]) == 0
    text = (tmp_path / "ev" / "frames.csv").read_text().splitlines()
    assert len(text) == 7 and "dice_class1" in text[0] and "hd95_class2" in text[0]
    assert (tmp_path / "ev" / "dice_per_frame.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    from clstm4d.data import read_label

    p, y = read_label(pred)[0], read_label(run["label"])[0]
    assert summary["dice"] == pytest.approx(dice_reference(p, y, 3), abs=1e-6)
    # the label against itself is perfect
    assert main(["evaluate", "--pred", str(run["label"]), "--label", str(run["label"])]) == 0
    assert "Dice 1.0000" in capsys.readouterr().out


def test_predict_writes_every_frame_and_evaluate_frames_scores_some(run, tmp_path, capsys):
    import nibabel as nib

    pred = tmp_path / "pred.nii.gz"
    assert main(["predict", "--checkpoint", str(run["ckpt"]), "--input", str(run["image"]),
                 "--output", str(pred)]) == 0
    assert np.asarray(nib.load(str(pred)).dataobj).shape[-1] == 6
    assert main(["evaluate", "--pred", str(pred), "--label", str(run["label"]),
                 "--frames", "0,4", "--out", str(tmp_path / "ev"), "--no-hd95"]) == 0
    assert "frames 2  " in capsys.readouterr().out
    rows = (tmp_path / "ev" / "frames.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["0", "4"]


def test_resume_equals_uninterrupted_run(run, tmp_path):
    """Real model, augmentation and dropout: the loss curve after --resume is the same."""
    common = ["--datalist", str(run["datalist"]), "--set", "data.window=4",
              "--set", "model.channels=[4, 8]", "--set", "model.extra={dropout: 0.2}",
              "--set", "train.progress=false", "--set", "train.log_every=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *common, "--out", str(full), "--steps", "4"]) == 0
    assert main(["train", *common, "--out", str(part), "--steps", "4",
                 "--checkpoint-every", "2"]) == 0
    # forget everything after step 2, then continue from the latest checkpoint
    import shutil

    shutil.rmtree(part / "checkpoints" / "step_000004")
    (part / "checkpoints" / "latest.json").write_text('{"checkpoint": "step_000002"}')
    assert main(["train", *common, "--out", str(part), "--steps", "4", "--resume"]) == 0

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads,
                (out / "metrics.jsonl").read_text().splitlines())]

    assert [s for s, _ in losses(part)] == [1, 2, 3, 4]
    assert losses(part) == losses(full)


def _one_error_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_user_errors_are_one_line(run, tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(run["ckpt"]), "--input", str(tmp_path / "no.nii.gz"),
               "--output", str(tmp_path / "o.nii.gz")])
    assert "not found" in _one_error_line(capsys, rc)

    rc = main(["train", "--datalist", str(run["datalist"]), "--set", "train.stpes=1"])
    assert "unknown key 'train.stpes'" in _one_error_line(capsys, rc)

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  nmae: tiny\n")
    rc = main(["train", "--config", str(cfg), "--datalist", str(run["datalist"])])
    assert "unknown key 'model.nmae'" in _one_error_line(capsys, rc)

    # an image with 2 channels per frame for a model trained on 1
    from clstm4d.data import Geometry, write_image

    img = np.random.default_rng(0).random((5, 2, 24, 24), dtype=np.float32)
    two = write_image(img, Geometry.default("nifti", (24, 24), 5, channels=2),
                      tmp_path / "two.nii.gz")[0]
    rc = main(["predict", "--checkpoint", str(run["ckpt"]), "--input", str(two),
               "--output", str(tmp_path / "o.nii.gz")])
    assert "2 channel(s) per frame but the model expects 1" in _one_error_line(capsys, rc)

    # resuming a run with a checkpoint written for another model
    rc = main(["train", "--datalist", str(run["datalist"]), "--out", str(tmp_path / "x"),
               "--steps", "4", "--set", "model.channels=[4, 8, 16]", "--set",
               "train.progress=false", "--resume", str(run["ckpt"])])
    assert "written for another model" in _one_error_line(capsys, rc)

    rc = main(["predict", "--checkpoint", str(run["datalist"]), "--input", str(run["image"]),
               "--output", str(tmp_path / "o.nii.gz")])
    assert "not a checkpoint" in _one_error_line(capsys, rc)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_explains_every_option(command, capsys):
    import argparse

    from clstm4d.cli import _build_parser

    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: clstm4d " + command)
    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    assert parser.description
    for action in parser._actions:
        assert action.help and len(action.help) > 10, (command, action.dest)


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--steps", "2", "--cases", "2", "--test", "1",
               "--frames", "6", "--size", "24", "--no-progress", "--labelled-frames", "2",
               "--set", "train.unlabelled_weight=0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "degraded" in text and "per-frame" in text
    assert "both models trained with --set train.unlabelled_weight=0.5" in text
    assert "trained with 2 of 6 frames labelled per training sequence (frames [0, 3])" in text
    assert " HD95 mm " in text  # issue 17: distances carry their unit
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["labelled_frames"] == [0, 3]
    entries = json.loads((out / "data" / "datalist.json").read_text())
    assert all(e["labelled_frames"] == [0, 3] for e in entries["training"])
    assert all("labelled_frames" not in e for e in entries["test"])
    # evaluation scores every frame of the held-out sequence against the exact truth
    assert len((out / "frames_temporal.csv").read_text().splitlines()) == 1 + 6
    assert set(report["models"]) == {"temporal (ConvLSTM)", "per-frame"}
    for name, m in report["models"].items():
        slug = "temporal" if name.startswith("temporal") else "per_frame"
        rows = (out / f"frames_{slug}.csv").read_text().splitlines()
        column = rows[0].split(",").index("dice")
        assert "volume_chamber [mm^3]" in rows[0] and "hd95_blob [mm]" in rows[0], rows[0]
        frames = [float(r.split(",")[column]) for r in rows[1:]]
        assert m["dice"] == pytest.approx(np.mean(frames)) and m["train_steps"] == 2
        assert Path(m["checkpoint"], "model.safetensors").is_file()
        saved = json.loads(Path(m["checkpoint"], "config.json").read_text())
        assert saved["train"]["unlabelled_weight"] == 0.5
    # the per-degradation table: every family of the test frames, and the clean frames
    kinds = set(json.loads((out / "data" / "datalist.json").read_text())["test"][0]["degradation"])
    assert kinds and set(report["margin_by_degradation"]) == kinds | {"clean"}
    assert "degradation" in text and all(k in text for k in kinds)
    for name in ("dice_per_frame.png", "montage.png", "sequence.gif"):
        assert (out / name).stat().st_size > 1000
    from PIL import Image

    assert Image.open(out / "sequence.gif").n_frames == 6
    assert main(["demo", "--out", str(tmp_path / "bad"), "--frames", "6", "--size", "24",
                 "--cases", "1", "--test", "1", "--labelled-frames", "7"]) == 2
    assert "--labelled-frames must be 1-6" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "bad2"), "--set",
                 "train.unlabelled_threshold=2"]) == 2
    assert "'train.unlabelled_threshold' must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "bad2" / "data").exists()


def test_python_dash_m_runs_the_same_command():
    import os
    import subprocess
    import sys

    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "clstm4d", "evaluate", "--pred", "missing.nii.gz",
                          "--label", "missing.nii.gz"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == "clstm4d evaluate: error: file not found: missing.nii.gz"


@pytest.mark.parametrize("bug", [ValueError("a bug: shapes (3,) and (4,)"),
                                 RuntimeError("a bug in a kernel"), KeyError("missing")])
def test_a_bug_keeps_its_traceback(run, tmp_path, monkeypatch, bug):
    """Only user errors (UserError: ConfigError, DataError, CheckpointError, ...) and OSError
    become one line; any other exception is a bug and leaves main() with its traceback."""
    from clstm4d.engine.inference import predictor

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(predictor, "predict_sequence", broken)
    with pytest.raises(type(bug)):
        main(["predict", "--checkpoint", str(run["ckpt"]), "--input", str(run["image"]),
              "--output", str(tmp_path / "o.nii.gz")])
    assert not (tmp_path / "o.nii.gz").exists()


def test_data_errors_are_user_errors(tmp_path, capsys):
    from clstm4d.errors import DataError, UserError

    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc = main(["train", "--datalist", str(bad), "--out", str(tmp_path / "r")])
    assert "not valid JSON" in _one_error_line(capsys, rc)
    assert not (tmp_path / "r").exists()
