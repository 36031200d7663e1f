"""Evaluation that cannot lie (issue 17): the class set is declared (datalist, checkpoint,
--num-classes) or read off the files, a class outside it is refused, classes absent from both
files are left out of the means (and the output says so), prediction and label must share the
grid (or the prediction is resampled onto the label's on request), and every number carries
its unit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clstm4d.cli import main
from clstm4d.data import Geometry, save_datalist, write_image, write_label
from clstm4d.engine.evaluation.evaluate import evaluate_files

pytest.importorskip("nibabel")


def one_error_line(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _label(t=4, size=12):
    label = np.zeros((t, size, size), np.int64)
    for f in range(t):
        label[f, 2:6 + f % 2, 2:7] = 1
    label[:, 8:11, 7:11] = 2
    return label


def _prediction(label):
    pred = label.copy()
    pred[:, 2, 2:7] = 0           # class 1 loses a row
    pred[1:3, 8:11, 5:7] = 2      # class 2 grows in frames 1-2
    return pred


def _dice_reference(pred, label, classes):
    """Mean over frames of the mean over the classes present in either map (numpy)."""
    per_frame = []
    for p, y in zip(pred, label, strict=True):
        scores = [2 * ((p == k) & (y == k)).sum() / ((p == k).sum() + (y == k).sum())
                  for k in classes if (p == k).any() or (y == k).any()]
        per_frame.append(np.mean(scores))
    return float(np.mean(per_frame))


@pytest.fixture
def files(tmp_path):
    label = _label()
    geom = Geometry.default("nifti", (12, 12), 4, spacing=(0.5, 2.0))
    pred = _prediction(label)
    stray = pred.copy()
    stray[0, 0, 0] = 9
    write_label(label, geom, tmp_path / "label.nii.gz")
    write_label(pred, geom, tmp_path / "pred.nii.gz")
    write_label(stray, geom, tmp_path / "stray.nii.gz")
    return {"label": label, "pred": pred, "stray": stray, "geom": geom, "root": tmp_path}


def test_a_stray_voxel_of_an_undeclared_class_cannot_raise_the_mean_dice(files):
    """Regression: one voxel of class 9 made classes 3-8 (absent from both files) count as
    Dice 1.0 and raised the mean Dice from 0.21 to 0.81."""
    root = files["root"]
    clean = evaluate_files(root / "pred.nii.gz", root / "label.nii.gz", hd95=False)
    assert clean.dice == pytest.approx(_dice_reference(files["pred"], files["label"], [1, 2]))
    stray = evaluate_files(root / "stray.nii.gz", root / "label.nii.gz", hd95=False)
    # class 9 is a false positive (Dice 0 in frame 0); classes 3-8 are left out
    assert stray.dice == pytest.approx(
        _dice_reference(files["stray"], files["label"], range(1, 10)))
    assert stray.dice < clean.dice
    assert stray.per_class["class9"]["dice"] == 0.0
    assert np.isnan(stray.per_class["class5"]["dice"])
    assert stray.summary()["absent_classes"]["class5"] == [0, 1, 2, 3]
    assert any("class 'class5' is in neither" in n for n in stray.notes())


def test_a_class_outside_the_declared_set_is_refused_in_one_line(files, capsys):
    """Regression: `--num-classes 3` with a class-9 voxel in the prediction ended in a
    traceback (one_hot out of range)."""
    root = files["root"]
    rc = main(["evaluate", "--pred", str(root / "stray.nii.gz"), "--label",
               str(root / "label.nii.gz"), "--num-classes", "3", "--no-hd95"])
    err = one_error_line(capsys, rc)
    assert f"{root / 'stray.nii.gz'}: the prediction holds class 9 (1 voxel), outside the 3 " \
           "classes 0-2 of --num-classes 3" in err
    rc = main(["evaluate", "--pred", str(root / "pred.nii.gz"), "--label",
               str(root / "label.nii.gz"), "--num-classes", "2"])
    assert "pred.nii.gz: the prediction holds class 2 (60 voxels)" in one_error_line(capsys, rc)
    write_label(np.where(files["pred"] == 2, 0, files["pred"]), files["geom"],
                root / "pred01.nii.gz")
    rc = main(["evaluate", "--pred", str(root / "pred01.nii.gz"), "--label",
               str(root / "label.nii.gz"), "--num-classes", "2"])
    assert "label.nii.gz: the reference holds class 2" in one_error_line(capsys, rc)


def test_class_names_come_from_the_datalist_or_the_checkpoint(files, tmp_path, capsys):
    """Regression: the tables named the classes `class1`, `class2` even when the datalist (or
    the checkpoint) names them; a class the datalist does not declare is refused."""
    root = files["root"]
    write_image(files["label"][:, None].astype(np.float32), files["geom"], root / "img.nii.gz")
    dl = save_datalist(root / "list.json", spatial_dims=2,
                       labels={0: "background", 1: "lv", 2: "myo"},
                       validation=[{"name": "p1", "image": root / "img.nii.gz",
                                    "label": root / "label.nii.gz"}])
    out = tmp_path / "ev"
    assert main(["evaluate", "--pred", str(root / "pred.nii.gz"), "--datalist", str(dl),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per class Dice: lv " in text and "myo " in text and "class1" not in text
    header = (out / "frames.csv").read_text().splitlines()[0]
    assert "dice_lv" in header and "dice_myo" in header and "class1" not in header
    rc = main(["evaluate", "--pred", str(root / "stray.nii.gz"), "--datalist", str(dl)])
    assert f"outside the 3 classes 0-2 of datalist {dl}" in one_error_line(capsys, rc)
    # a checkpoint's labels name the classes of a plain --label evaluation
    import torch

    from clstm4d.engine.run.checkpoint import save_checkpoint
    from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
    from clstm4d.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8))
    run = SavedRun(Config(), ModelSpec.of(model), {0: "background", 1: "cell", 2: "nucleus"})
    ck = save_checkpoint(tmp_path / "ck", model, step=1, config=run.to_dict())
    res = evaluate_files(root / "pred.nii.gz", root / "label.nii.gz", checkpoint=ck, hd95=False)
    assert list(res.class_names.values()) == ["cell", "nucleus"]
    rc = main(["evaluate", "--pred", str(root / "stray.nii.gz"), "--label",
               str(root / "label.nii.gz"), "--checkpoint", str(ck)])
    assert "outside the 3 classes 0-2 of checkpoint" in one_error_line(capsys, rc)


def test_a_class_absent_from_both_files_is_left_out_and_the_output_says_so(files, capsys):
    """Regression: a declared class absent from prediction and label counted as Dice 1.0."""
    root = files["root"]
    only1 = np.where(files["label"] == 2, 0, files["label"])
    pred1 = np.where(files["pred"] == 2, 0, files["pred"])
    write_label(only1, files["geom"], root / "only1.nii.gz")
    write_label(pred1, files["geom"], root / "pred1.nii.gz")
    res = evaluate_files(root / "pred1.nii.gz", root / "only1.nii.gz", num_classes=3)
    assert res.dice == pytest.approx(_dice_reference(pred1, only1, [1]))
    assert res.dice < 0.99
    assert res.dice == pytest.approx(res.per_class["class1"]["dice"])
    assert res.absent == {"class1": [], "class2": [0, 1, 2, 3]}
    assert main(["evaluate", "--pred", str(root / "pred1.nii.gz"), "--label",
                 str(root / "only1.nii.gz"), "--num-classes", "3", "--no-hd95"]) == 0
    assert "note: class 'class2' is in neither the prediction nor the label: left out of " \
           "the Dice means" in capsys.readouterr().out


@pytest.mark.parametrize("change, differs", [
    ("spacing", "spacing"), ("origin", "origin"), ("flip", "axis directions"),
    ("shape", "shape")])
def test_a_prediction_on_another_grid_is_refused_or_resampled_on_request(files, capsys,
                                                                        change, differs):
    """Regression: a prediction on another grid (other spacing, shifted origin, flipped axis)
    was scored voxel by voxel without a word, HD95 at the label's spacing."""
    root, label, geom = files["root"], files["label"], files["geom"]
    affine = geom.affine.copy()
    if change == "spacing":  # the same objects at twice the in-plane resolution along x
        pred = np.repeat(label, 2, axis=1)
        affine[0, 0] = 0.25
        affine[0, 3] -= 0.125
    elif change == "origin":  # shifted 2 voxels along y: the same world positions
        pred = np.zeros_like(label)
        pred[:, :, :-2] = label[:, :, 2:]
        affine[1, 3] += 2 * 2.0
    elif change == "flip":  # stored with the x axis reversed
        pred = label[:, ::-1].copy()
        affine[0, 0] = -0.5
        affine[0, 3] = 11 * 0.5
    else:  # a 2-voxel border cropped away: the same world positions
        pred = label[:, 2:, :].copy()
        affine[0, 3] += 2 * 0.5
    other = Geometry("nifti", pred.shape[1:], pred.shape[0], affine=affine, space_unit="mm")
    write_label(pred, other, root / "other.nii.gz")
    args = ["evaluate", "--pred", str(root / "other.nii.gz"), "--label",
            str(root / "label.nii.gz"), "--no-hd95"]
    err = one_error_line(capsys, main(args))
    assert str(root / "other.nii.gz") in err and str(root / "label.nii.gz") in err
    assert "not on the same voxel grid (their " in err and differs in err
    assert "--resample-to-label" in err
    assert main([*args, "--resample-to-label", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    # in world coordinates the prediction is the label (the crop loses only background)
    assert "Dice 1.0000" in out, out


def test_hd95_and_volumes_carry_their_units_and_no_hd95_means_no_hd95(files, tmp_path, capsys):
    """Regression: HD95 and volumes had no units anywhere; `--no-hd95` printed "HD95 nan"
    and wrote empty HD95 columns."""
    root = files["root"]
    base = ["evaluate", "--pred", str(root / "pred.nii.gz"), "--label", str(root / "label.nii.gz")]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert " mm  volume change error" in capsys.readouterr().out
    header = (tmp_path / "a" / "frames.csv").read_text().splitlines()[0].split(",")
    assert "hd95_class1 [mm]" in header and "volume_class2 [mm^3]" in header
    assert "label_volume_class1 [mm^3]" in header
    rows = (tmp_path / "a" / "frames.csv").read_text().splitlines()
    vol = float(rows[1].split(",")[header.index("volume_class1 [mm^3]")])
    assert vol == pytest.approx((files["pred"][0] == 1).sum() * 0.5 * 2.0)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["units"] == {"hd95": "mm", "volume": "mm^3"}
    assert main([*base, "--no-hd95", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "HD95" not in out and "nan" not in out.lower()
    assert "hd95" not in (tmp_path / "b" / "frames.csv").read_text()
    assert "hd95" not in (tmp_path / "b" / "summary.json").read_text()
