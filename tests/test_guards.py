"""No command replaces an input, or a file it did not write, unless told (--overwrite).

Every test injects the fault through the command line (`main([...])`) and checks that it ends
in one line on stderr with exit code 2 and that the user's files are byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from clstm4d.cli import main
from clstm4d.data import Geometry, write_image, write_label
from clstm4d.engine.run.folders import LOCK, MANIFEST, OutputFolder, check_outputs
from clstm4d.errors import UserError


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) -> sha256 of its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _refused(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    assert main(["synth", "--out", str(root / "data"), "--cases", "2", "--frames", "4",
                 "--size", "16", "--validation", "0"]) == 0
    assert main(["train", "--datalist", str(root / "data" / "datalist.json"), "--out",
                 str(root / "run"), "--steps", "1", "--batch-size", "1", "--set",
                 "data.window=2", "--set", "train.progress=false", "--set",
                 "model.channels=[2, 4]"]) == 0
    return root / "run"


@pytest.fixture
def scans(tmp_path):
    """A user's folder: one 4D NIfTI scan and a per-frame NIfTI series of the same frames."""
    image = np.random.default_rng(0).random((4, 1, 16, 16), dtype=np.float32)
    user = tmp_path / "user"
    scan = write_image(image, Geometry.default("nifti", (16, 16), 4), user / "scan.nii.gz")[0]
    frames = write_image(image, Geometry.default("nifti-series", (16, 16), 4), user / "series")
    return {"user": user, "scan": scan, "series": user / "series", "frames": frames}


def _predict(ckpt, inputs, output, *extra):
    return main(["predict", "--checkpoint", str(ckpt), "--input", *map(str, inputs),
                 "--output", str(output), *extra])


def test_predict_refuses_an_output_that_is_the_input_however_spelled(ckpt, scans, capsys,
                                                                     monkeypatch):
    user, scan = scans["user"], scans["scan"]
    before = _digest(user)
    # the same path, with and without --overwrite
    for extra in ([], ["--overwrite"]):
        rc = _predict(ckpt, [scan], scan, *extra)
        _refused(capsys, rc, "is one of the input files", str(scan))
    # a relative path that walks around
    monkeypatch.chdir(user / "series")
    rc = _predict(ckpt, [scan], Path("..") / "series" / ".." / "scan.nii.gz", "--overwrite")
    _refused(capsys, rc, "is one of the input files")
    # a symlink to the scan, and a hard link to it
    (user / "link.nii.gz").symlink_to(scan)
    rc = _predict(ckpt, [scan], user / "link.nii.gz", "--overwrite")
    _refused(capsys, rc, "is one of the input files")
    os.link(scan, user / "hard.nii.gz")
    rc = _predict(ckpt, [scan], user / "hard.nii.gz", "--overwrite")
    _refused(capsys, rc, "is one of the input files")
    # the input given through a symlinked folder, output the real path
    (user.parent / "alias").symlink_to(user, target_is_directory=True)
    rc = _predict(ckpt, [user.parent / "alias" / "scan.nii.gz"], scan, "--overwrite")
    _refused(capsys, rc, "is one of the input files")
    # a folder as output: the file would be named after the input, i.e. be the input
    rc = _predict(ckpt, [scan], str(user) + os.sep, "--overwrite")
    _refused(capsys, rc, "is one of the input files")
    os.unlink(user / "hard.nii.gz")
    assert _digest(user) == before


def test_predict_refuses_a_series_folder_whose_frames_it_would_replace(ckpt, scans, capsys):
    series = scans["series"]
    before = _digest(scans["user"])
    for inputs in ([series], scans["frames"]):  # the folder, or its files
        rc = _predict(ckpt, inputs, series, "--overwrite")
        _refused(capsys, rc, "is one of the input files", "frame_000.nii.gz")
    assert _digest(scans["user"]) == before


def test_predict_refuses_existing_outputs_unless_overwrite(ckpt, scans, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"an earlier result")
    rc = _predict(ckpt, [scans["scan"]], out)
    _refused(capsys, rc, "already exists", "--overwrite")
    assert out.read_bytes() == b"an earlier result"
    assert _predict(ckpt, [scans["scan"]], out, "--overwrite") == 0
    assert out.read_bytes() != b"an earlier result" and out.stat().st_size > 100
    capsys.readouterr()  # its progress line
    # a series into a non-empty folder (other names: nothing of the input is at stake)
    folder = tmp_path / "segs"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    rc = _predict(ckpt, [scans["series"]], folder)
    _refused(capsys, rc, "is not empty", "--overwrite")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert _predict(ckpt, [scans["series"]], folder, "--overwrite") == 0
    assert len(list(folder.glob("frame_*.nii.gz"))) == 4
    assert (folder / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    # a new folder needs nothing
    assert _predict(ckpt, [scans["series"]], tmp_path / "new") == 0


def _label_pair(tmp_path):
    lab = np.zeros((3, 8, 8), np.int64)
    lab[:, 2:5, 2:5] = 1
    g = Geometry.default("nifti", (8, 8), 3)
    pred = write_label(lab, g, tmp_path / "pred.nii.gz")[0]
    ref = write_label(lab, g, tmp_path / "ref.nii.gz")[0]
    return pred, ref


def test_evaluate_out_refuses_a_folder_of_other_files(tmp_path, capsys):
    pred, ref = _label_pair(tmp_path)
    labels = tmp_path / "labels"  # the user's folder of label files
    labels.mkdir()
    write_label(np.ones((3, 8, 8), np.int64), Geometry.default("nifti", (8, 8), 3),
                labels / "p01.nii.gz")
    (labels / "summary.json").write_text('{"mine": true}')  # a name evaluate also writes
    before = _digest(labels)
    args = ["evaluate", "--pred", str(pred), "--label", str(ref), "--no-hd95", "--out"]
    rc = main([*args, str(labels)])
    _refused(capsys, rc, "did not write", "p01.nii.gz", "--overwrite")
    assert _digest(labels) == before and not (labels / MANIFEST).exists()
    # a symlink to that folder, or a path through one, is the same folder
    (tmp_path / "alias").symlink_to(labels, target_is_directory=True)
    rc = main([*args, str(tmp_path / "alias")])
    _refused(capsys, rc, "did not write")
    assert _digest(labels) == before
    # its own earlier output may be reused; another command's may not
    ev = tmp_path / "ev"
    assert main([*args, str(ev)]) == 0
    assert main([*args, str(ev)]) == 0
    assert json.loads((ev / MANIFEST).read_text())["command"] == "evaluate"
    rc = main(["synth", "--out", str(ev), "--cases", "1", "--frames", "2", "--size", "16"])
    _refused(capsys, rc, "holds the output of 'clstm4d evaluate'")
    # --overwrite writes into the user's folder, replacing only evaluate's own file names
    assert main([*args, str(labels), "--overwrite"]) == 0
    after = _digest(labels)
    assert after["p01.nii.gz"] == before["p01.nii.gz"] and "frames.csv" in after
    # the user's files stay unrecorded: the next run without --overwrite is refused again
    rc = main([*args, str(labels)])
    _refused(capsys, rc, "did not write")


def test_synth_out_refuses_a_dataset_folder_and_reuses_its_own(tmp_path, capsys):
    data = tmp_path / "dataset"
    (data / "imagesTr").mkdir(parents=True)
    (data / "imagesTr" / "case_000.nii.gz").write_bytes(b"a real scan")
    args = ["synth", "--cases", "1", "--frames", "2", "--size", "16", "--out"]
    rc = main([*args, str(data)])
    _refused(capsys, rc, "did not write", "imagesTr")
    assert (data / "imagesTr" / "case_000.nii.gz").read_bytes() == b"a real scan"
    mine = tmp_path / "synth"
    assert main([*args, str(mine)]) == 0
    first = _digest(mine)
    assert main([*args, str(mine)]) == 0  # deterministic: the same files again
    assert _digest(mine) == first
    (mine / "stray.txt").write_text("added by the user")
    rc = main([*args, str(mine)])
    _refused(capsys, rc, "stray.txt")
    # a file where the folder should be
    rc = main([*args, str(mine / "stray.txt")])
    _refused(capsys, rc, "is a file, not a folder")


def test_train_out_continues_only_with_resume_and_refuses_other_folders(ckpt, tmp_path,
                                                                        capsys):
    data = ckpt.parent / "data"
    common = ["train", "--datalist", str(data / "datalist.json"), "--steps", "1",
              "--batch-size", "1", "--set", "data.window=2", "--set", "train.progress=false",
              "--set", "model.channels=[2, 4]", "--out"]
    before = _digest(ckpt)
    rc = main([*common, str(ckpt)])
    _refused(capsys, rc, "already holds a training run", "--resume", "--overwrite")
    assert _digest(ckpt) == before
    # the dataset folder is not a run folder
    data_before = _digest(data)
    rc = main([*common, str(data)])
    _refused(capsys, rc, "holds the output of 'clstm4d synth'")
    assert _digest(data) == data_before
    # --overwrite starts again from step 0 and leaves no checkpoint of the old run behind
    run = tmp_path / "run"
    assert main([*common, str(run), "--set", "train.checkpoint_every=1", "--steps", "2"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        "step_000001", "step_000002"]
    assert main([*common, str(run), "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    assert not (run / LOCK).exists()
    # a bare --resume of a folder without checkpoints starts at step 0 (requeued jobs)
    fresh = tmp_path / "fresh"
    assert main([*common, str(fresh), "--resume"]) == 0
    assert (fresh / "checkpoints" / "step_000001").is_dir()


def test_demo_twice_into_the_same_folder_and_never_into_another(tmp_path, capsys):
    from clstm4d.engine.apps.demo import DemoOptions, run_demo

    out = tmp_path / "demo"
    opts = dict(out=str(out), dims=2, size=16, frames=4, cases=1, test=1, steps=1,
                batch_size=1, window=2, progress=False, threads=1,
                variants={"temporal (ConvLSTM)": {"temporal": "bottleneck"}})
    run_demo(DemoOptions(**opts))
    run_demo(DemoOptions(**opts))  # what `make demo` twice does
    assert json.loads((out / "report.json").read_text())["models"]
    user = tmp_path / "photos"
    user.mkdir()
    (user / "holiday.png").write_bytes(b"png")
    rc = main(["demo", "--out", str(user)])
    _refused(capsys, rc, "did not write", "holiday.png")
    assert sorted(p.name for p in user.iterdir()) == ["holiday.png"]


def test_check_outputs_and_output_folder_directly(tmp_path):
    a = tmp_path / "a.nii.gz"
    a.write_bytes(b"x")
    with pytest.raises(UserError, match="one of the input files"):
        check_outputs([tmp_path / "." / "a.nii.gz"], [a], overwrite=True)
    check_outputs([tmp_path / "b.nii.gz"], [a])  # new file: fine
    # a command that fails before writing anything leaves no folder behind
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "new", "synth"):
        raise RuntimeError("failed early")
    assert not (tmp_path / "new").exists()
    # one that fails after writing records what it wrote, so a rerun may reuse the folder
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "half", "synth") as f:
        (f.path / "datalist.json").write_text("{}")
        raise RuntimeError("failed late")
    OutputFolder(tmp_path / "half", "synth").check()
