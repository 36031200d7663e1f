"""Evaluation on some frames only (--frames, a datalist entry's annotated frames) and with
an "ignore" class, through evaluate_sequence and the `clstm4d evaluate` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clstm4d.cli import main
from clstm4d.data import Geometry, save_datalist, write_label
from clstm4d.engine.evaluation.evaluate import evaluate_sequence
from clstm4d.errors import UserError

nib = pytest.importorskip("nibabel")


def _label(t=5):
    label = np.zeros((t, 10, 10), np.int64)
    for f in range(t):
        label[f, 2 : 5 + f % 3, 3:7] = 1
    label[:, 7:9, 1:4] = 2
    return label


def test_only_the_listed_frames_are_scored():
    label = _label()
    pred = label.copy()
    pred[[1, 4]] = 0  # wrong on frames 1 and 4 only
    r = evaluate_sequence(pred, label, 3, frames=[3, 0, 2], degraded=[2])
    assert [row["frame"] for row in r.rows] == [3, 0, 2] == r.frames
    assert r.dice == 1.0 and r.summary()["frames"] == 3
    assert r.dice_degraded == 1.0 and r.temporal["volume_change_error"] == 0
    assert evaluate_sequence(pred, label, 3).dice == pytest.approx(0.6)
    with pytest.raises(UserError, match=r"expected frame indices 0-4 \(the sequence has 5 "
                                        r"frames\), got \[5\]"):
        evaluate_sequence(pred, label, 3, frames=[0, 5])
    with pytest.raises(UserError, match="expected distinct frame indices"):
        evaluate_sequence(pred, label, 3, frames=[1, 1])


def test_ignore_voxels_are_left_out_of_every_measure():
    label = _label()
    label[:, 0, :] = 3  # an unannotated strip
    pred = np.where(label == 3, 1, label)
    s = evaluate_sequence(pred, label, 3, ignore_index=3, hd95=True).summary()
    assert s["dice"] == 1.0 and s["hd95"] == 0.0 and s["volume_change_error"] == 0.0


def _files(tmp_path, t=5):
    label = _label(t)
    geom = Geometry.default("nifti", (10, 10), t)
    pred = label.copy()
    pred[[1, 2]] = 0
    write_label(label, geom, tmp_path / "label.nii.gz")
    write_label(pred, geom, tmp_path / "pred.nii.gz")
    return tmp_path / "pred.nii.gz", tmp_path / "label.nii.gz"


def test_cli_frames_option(tmp_path, capsys):
    pred, label = _files(tmp_path)
    assert main(["evaluate", "--pred", str(pred), "--label", str(label), "--frames", "0,3",
                 "--out", str(tmp_path / "ev"), "--no-hd95"]) == 0
    out = capsys.readouterr().out
    assert "frames 2  Dice 1.0000" in out and "per frame Dice: 0:1.000 3:1.000" in out
    rows = (tmp_path / "ev" / "frames.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("0,") and rows[2].startswith("3,")
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["scored_frames"] == [0, 3]
    assert main(["evaluate", "--pred", str(pred), "--label", str(label)]) == 0
    assert "frames 5  Dice 0.6000" in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(pred), "--label", str(label), "--frames",
                 "0,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clstm4d evaluate: error: --frames must be comma-separated frame numbers, "
                   "got '0,x'"]


def test_cli_takes_annotated_frames_classes_and_ignore_from_a_datalist(tmp_path, capsys):
    from clstm4d.data import write_image

    geom = Geometry.default("nifti", (10, 10), 5)
    ref = _label()
    ref[:, 0, :] = 3
    write_label(ref, geom, tmp_path / "ref.nii.gz")
    write_label(np.where(ref == 3, 1, ref) * (np.arange(5) != 1)[:, None, None], geom,
                tmp_path / "pred2.nii.gz")
    write_image(ref[:, None].astype(np.float32), geom, tmp_path / "img.nii.gz")
    dl = save_datalist(tmp_path / "list.json", spatial_dims=2,
                       labels={0: "background", 1: "lv", 2: "rv", 3: "ignore"},
                       validation=[{"name": "p1", "image": tmp_path / "img.nii.gz",
                                    "label": tmp_path / "ref.nii.gz",
                                    "labelled_frames": [0, 3, 4], "degraded": [3]},
                                   {"name": "p2", "image": tmp_path / "img.nii.gz",
                                    "label": tmp_path / "ref.nii.gz"}])
    args = ["evaluate", "--pred", str(tmp_path / "pred2.nii.gz"), "--datalist", str(dl)]
    assert main([*args, "--case", "p1", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    # frame 1 is wrong but not annotated; ignore voxels are predicted as lv but not scored
    assert "case p1  frames 3  Dice 1.0000" in out and "Dice degraded 1.0000" in out
    header = (tmp_path / "ev" / "frames.csv").read_text().splitlines()[0]
    assert "dice_lv" in header and "dice_rv" in header and "ignore" not in header
    assert main([*args, "--case", "p2"]) == 0  # fully annotated: frame 1 counts
    assert "frames 5  Dice 0.8000" in capsys.readouterr().out
    assert main([*args, "--case", "p1", "--frames", "0,1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clstm4d evaluate: error: --frames [1]: not annotated in case 'p1' "
                   "(annotated frames: [0, 3, 4])"]
    assert main(args) == 2
    assert "has 2 labelled cases: name one with --case (p1, p2)" in capsys.readouterr().err
    assert main([*args, "--case", "p9"]) == 2
    assert "no case 'p9' in datalist" in capsys.readouterr().err
