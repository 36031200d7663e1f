"""Files a user gets are what they say, or the command refuses (issue 17): output extensions
and conversions, multi-file outputs written whole, temporaries of killed runs cleaned up,
guards before heavy work (memory, empty inputs), no leakage between datalist sections, and
a full disk or a read-only folder on every command.

Each regression test names the defect it covers; each failed on the code before its fix.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from clstm4d import _common
from clstm4d.cli import main
from clstm4d.data import Geometry, read_image, read_label, write_image, write_label
from clstm4d.engine.run.checkpoint import save_checkpoint
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
from clstm4d.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from test_guards import _refused as _one_line  # noqa: E402  (exit 2, one line, the words)


def _checkpoint(folder: Path, **data) -> Path:
    """An untrained 2D model saved as a checkpoint (prediction needs no training)."""
    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3,
                         channels=(2, 4)).eval()
    run = SavedRun(Config.from_dict({"data": data}), ModelSpec.of(model),
                   {0: "background", 1: "a", 2: "b"})
    return save_checkpoint(folder, model, step=1, config=run.to_dict())


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck"))


@pytest.fixture
def scan(tmp_path):
    image = np.random.default_rng(0).random((4, 1, 16, 12), dtype=np.float32)
    g = Geometry.default("nifti", (16, 12), 4, spacing=(1.0, 2.0), origin=(5.0, -3.0),
                         time_interval=0.5)
    return write_image(image, g, tmp_path / "in" / "scan.nii.gz")[0]


def _predict(ck, inputs, output, *extra):
    inputs = inputs if isinstance(inputs, list) else [inputs]
    return main(["predict", "--checkpoint", str(ck), "--input", *map(str, inputs),
                 "--output", str(output), "--no-progress", *extra])


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*")) if folder.exists() else []


# ------------------------------------------------------------------------ output extensions

def test_an_output_without_extension_is_the_inputs_format_under_the_printed_name(
        ck, scan, tmp_path, capsys):
    """Regression (issue 17): `--output out/seg` exited 0 with a 0-byte `out/seg` and the
    result in a hidden `.tmp-...-seg.nii` that was never renamed."""
    assert _predict(ck, scan, tmp_path / "out" / "seg") == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "out" / "seg.nii.gz") in printed, printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.nii.gz"]
    assert _predict(ck, scan, tmp_path / "ref.nii.gz") == 0
    got, g = read_label(tmp_path / "out" / "seg.nii.gz", spatial_dims=2)
    ref, _ = read_label(tmp_path / "ref.nii.gz", spatial_dims=2)
    np.testing.assert_array_equal(got, ref)
    assert g.spacing == (1.0, 2.0) and g.origin == (5.0, -3.0)


def test_nifti_to_tiff_and_back_by_the_output_extension(ck, scan, tmp_path, capsys):
    """Regression (issue 17): `--output seg.tif` for a NIfTI input was a traceback."""
    from clstm4d.data.output import write_result

    assert _predict(ck, scan, tmp_path / "ref.nii.gz") == 0
    assert _predict(ck, scan, tmp_path / "seg.tif") == 0
    ref, _ = read_label(tmp_path / "ref.nii.gz", spatial_dims=2)
    tif, g = read_label(tmp_path / "seg.tif")
    # TIFF holds (y, x) with x along NIfTI's i axis: the spatial axes reversed
    np.testing.assert_array_equal(tif, ref.transpose(0, 2, 1))
    assert g.format == "tiff" and g.spacing == (2.0, 1.0) and g.time_interval == 0.5
    # and back: a TIFF input written as NIfTI
    image, _ = read_image(scan, spatial_dims=2)
    tif_scan = write_result(image[:, 0].round().astype(np.uint8), Geometry.default(
        "nifti", (16, 12), 4, spacing=(1.0, 2.0), time_interval=0.5), tmp_path / "s.tif")[0]
    assert read_image(tif_scan)[1].format == "tiff"
    assert _predict(ck, tmp_path / "seg.tif", tmp_path / "back.nii.gz") == 0
    back, gb = read_label(tmp_path / "back.nii.gz", spatial_dims=2)
    assert back.shape == ref.shape and gb.spacing == (1.0, 2.0) and gb.time_interval == 0.5
    assert gb.origin == (0.0, 0.0)  # TIFF holds no origin: documented as lost
    capsys.readouterr()


def test_a_3d_conversion_round_trip_keeps_voxels_spacing_and_interval(tmp_path):
    from clstm4d.data.output import write_result

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (3, 5, 6, 7))
    g = Geometry.default("nifti", (5, 6, 7), 3, spacing=(0.5, 1.0, 2.5), time_interval=0.04)
    (tif,) = write_result(labels, g, tmp_path / "a.tiff")
    got, gt = read_label(tif)
    np.testing.assert_array_equal(got, labels.transpose(0, 3, 2, 1))  # (z, y, x) = (k, j, i)
    assert gt.spacing == (2.5, 1.0, 0.5) and gt.time_interval == pytest.approx(0.04)
    (nii,) = write_result(got, gt, tmp_path / "b.nii")
    back, gn = read_label(nii)
    np.testing.assert_array_equal(back, labels)
    np.testing.assert_allclose(gn.affine, np.diag([0.5, 1.0, 2.5, 1.0]))
    # an NRRD series (LPS world) as one NIfTI (RAS): every voxel at the same point in space
    gs = Geometry.default("nrrd-series", (5, 6, 7), 3, spacing=(0.5, 1.0, 2.5),
                          origin=(10.0, 20.0, 5.0))
    frames = write_label(labels, gs, tmp_path / "series")
    got, gn = read_label(write_result(read_label(frames)[0], read_label(frames)[1],
                                      tmp_path / "c.nii.gz")[0])
    np.testing.assert_array_equal(got, labels)
    np.testing.assert_allclose(gn.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) @ gs.affine)


def test_an_extension_of_no_supported_format_is_refused_in_one_line(ck, scan, tmp_path,
                                                                   capsys):
    for name, words in (("seg.png", ["'.png'", ".nii.gz"]),
                        ("seg.nrrd", ["one NRRD file holds one frame"]),
                        ("seg.v2", ["'.v2'"])):
        rc = _predict(ck, scan, tmp_path / "out" / name)
        _one_line(capsys, rc, name, *words)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ whole or nothing

_KILL_AT_THIRD_FRAME = textwrap.dedent("""
    import os, signal, sys
    import clstm4d.data.io as io
    real, calls = io._write_nifti, [0]
    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    io._write_nifti = dying
    from clstm4d.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_killed_series_leaves_every_frame_or_none_and_the_next_run_cleans_up(ck, tmp_path,
                                                                               capsys):
    """Regression (issue 17): SIGKILL during `predict` of a frame-per-file series left some
    frame files under the final name, and temporary files that no run ever removed."""
    image = np.random.default_rng(0).random((6, 1, 16, 12), dtype=np.float32)
    series = write_image(image, Geometry.default("nifti-series", (16, 12), 6),
                         tmp_path / "series")
    out = tmp_path / "segs"
    argv = ["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "series"),
            "--output", str(out), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_THIRD_FRAME, *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() or not list(out.iterdir())  # no partial set under the name
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".segs.")]  # its temporary
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in series]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # cleaned up
    capsys.readouterr()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_a_killed_write_are_removed_by_the_next(tmp_path):
    """Regression (issue 17): temporary files of a killed run were never removed."""
    dead = _dead_pid()
    stale_file = tmp_path / f".tmp-{dead}-abcd1234-seg.nii.gz"
    stale_file.write_bytes(b"")
    stale_dir = tmp_path / f".set.{dead}.abcd1234.tmp"
    (stale_dir / "frame_000.nii.gz").parent.mkdir()
    live = tmp_path / f".tmp-{os.getpid()}-abcd1234-seg.nii.gz"  # a live process's: kept
    live.write_bytes(b"")
    other = tmp_path / ".tmp-other-name.txt"  # not a temporary of ours: kept
    other.write_bytes(b"")
    _common.atomic_write_text(tmp_path / "seg.nii.gz", "x")
    with _common.atomic_dir(tmp_path / "set") as tmp:
        (tmp / "a").write_text("a")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists()
    # killed between atomic_dir's two renames: the old folder is put back, then removed
    old = tmp_path / f".run.{dead}.abcd1234.old"
    (old / "run").mkdir(parents=True)
    (old / "run" / "kept.txt").write_text("earlier")
    assert _common.remove_stale_temporaries(tmp_path / "run") == [old]
    assert (tmp_path / "run" / "kept.txt").read_text() == "earlier" and not old.exists()
    # a run folder: every stale checkpoint temporary, whatever its step, when the run opens
    from clstm4d.engine.run.folders import RunFolder

    ckdir = tmp_path / "run" / "checkpoints"
    for name in (f".step_000006.{dead}.abcd1234.tmp", f".tmp-{dead}-abcd1234-latest.json"):
        (ckdir / name).mkdir(parents=True) if name.endswith(".tmp") else (ckdir / name).touch()
    folder = RunFolder(tmp_path / "run", overwrite=True)
    folder.check()
    folder.open()
    folder.close()
    assert not list(ckdir.iterdir())


def _labels(tmp_path):
    lab = np.zeros((3, 8, 8), np.int64)
    lab[:, 2:5, 2:5] = 1
    g = Geometry.default("nifti", (8, 8), 3)
    return (write_label(lab, g, tmp_path / "pred.nii.gz")[0],
            write_label(lab, g, tmp_path / "ref.nii.gz")[0])


def _full_disk_at(monkeypatch, module, name):
    """``module.name`` (a function writing to its first path argument) raises ENOSPC."""
    def full(*args, **kwargs):
        target = next(a for a in args if isinstance(a, (str, os.PathLike)))
        raise OSError(errno.ENOSPC, "No space left on device", str(target))
    monkeypatch.setattr(module, name, full)


def test_evaluate_out_on_a_full_disk_is_one_line_and_the_rerun_writes_it_whole(
        tmp_path, capsys, monkeypatch):
    """Regression (issue 17): `evaluate` on a full disk left a partial folder (and no
    manifest) that the rerun then refused as "files evaluate did not write"."""
    import clstm4d.engine.evaluation.evaluate as ev
    import clstm4d.engine.run.folders as folders

    pred, ref = _labels(tmp_path)
    out = tmp_path / "eval"
    argv = ["evaluate", "--pred", str(pred), "--label", str(ref), "--out", str(out)]
    _full_disk_at(monkeypatch, ev, "plot_dice_per_frame")  # after frames.csv, summary.json
    _full_disk_at(monkeypatch, folders, "atomic_write_text")  # and the manifest
    rc = main(argv)
    _one_line(capsys, rc, "No space left on device", str(out / "dice_per_frame.png"))
    assert not out.exists() and not _hidden(tmp_path)
    monkeypatch.undo()
    assert main(argv) == 0
    assert {"frames.csv", "summary.json", "dice_per_frame.png"} <= {
        p.name for p in out.iterdir()}
    capsys.readouterr()


# ------------------------------------------------------------------------ guards

def test_zero_frames_are_refused_at_the_reader_and_train_leaves_no_folder(ck, tmp_path,
                                                                         capsys):
    """Regression (issue 17): a 0-frame NIfTI was a traceback in `predict`; `train` exited 2
    but left its run folder."""
    import nibabel as nib

    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1, 0), np.float32), np.eye(4)), str(empty))
    rc = _predict(ck, empty, tmp_path / "out" / "seg.nii.gz")
    _one_line(capsys, rc, str(empty), "no frames")
    assert not (tmp_path / "out").exists()
    flat = tmp_path / "flat.nii.gz"  # and an empty spatial axis
    nib.save(nib.Nifti1Image(np.zeros((16, 0, 1, 3), np.float32), np.eye(4)), str(flat))
    from clstm4d.errors import DataError

    with pytest.raises(DataError, match="empty spatial axis"):
        read_label(flat)
    assert main(["synth", "--out", str(tmp_path / "data"), "--cases", "2", "--frames", "3",
                 "--size", "16", "--validation", "0"]) == 0
    shutil.copy(empty, tmp_path / "data" / "imagesTr" / "case_001.nii.gz")
    rc = main(["train", "--datalist", str(tmp_path / "data" / "datalist.json"), "--out",
               str(tmp_path / "runs" / "a"), "--steps", "1"])
    _one_line(capsys, rc, "case_001.nii.gz", "no frames")
    assert not (tmp_path / "runs").exists()


def test_an_input_far_coarser_than_the_model_is_refused_before_resampling(tmp_path, capsys,
                                                                          monkeypatch):
    """Regression (issue 17): an 88 KB input at a much coarser spacing than the model's was
    resampled to 11 GB and the kernel killed the machine. Here the machine has 2 MiB."""
    ck = _checkpoint(tmp_path / "ck", spacing=[0.25, 0.25])
    image = np.random.default_rng(0).random((4, 1, 16, 12), dtype=np.float32)
    scan = write_image(image, Geometry.default("nifti", (16, 12), 4, spacing=(8.0, 8.0)),
                       tmp_path / "scan.nii.gz")[0]
    from clstm4d.data import make_synthetic_case, resample_case
    from clstm4d.errors import DataError

    case = make_synthetic_case(0, frames=4, size=16, name="p01")
    monkeypatch.setattr(_common, "available_host_memory", lambda: 2 * 2**20, raising=False)
    rc = _predict(ck, scan, tmp_path / "out" / "seg.nii.gz")
    _one_line(capsys, rc, str(scan), "spacing 0.25x0.25", "input's is 8x8", "512x384",
              "available")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="case 'p01'.*spacing 0.05x0.05"):  # train's data.spacing
        resample_case(case, 0.05)
    monkeypatch.undo()
    assert _predict(ck, scan, tmp_path / "out" / "seg.nii.gz") == 0  # fits the real machine
    capsys.readouterr()


def test_readers_refuse_a_file_larger_than_memory_before_reading_it(tmp_path, monkeypatch):
    from clstm4d.errors import DataError

    image = np.ones((3, 1, 8, 8, 4), np.float32)
    files = [write_image(image, Geometry.default(fmt, (8, 8, 4), 3), tmp_path / name)[0]
             for fmt, name in (("nifti", "a.nii.gz"), ("tiff", "a.tif"),
                               ("nrrd-series", "series"))]
    monkeypatch.setattr(_common, "available_host_memory", lambda: 1024)
    for f in files:
        with pytest.raises(DataError, match=r"reading its \(.*\) voxels needs about .* and this "
                                            r"machine has 1 KiB available"):
            read_image(f)


def test_a_frame_too_small_for_the_model_is_one_line(ck, tmp_path, capsys):
    """Regression (found by tests/test_fuzz_outputs.py): a 1x1 frame reached the instance
    normalisation of the coarsest level with one voxel: a ValueError traceback."""
    tiny = write_image(np.ones((1, 1, 1, 1), np.float32), Geometry.default("nifti", (1, 1), 1),
                       tmp_path / "tiny.nii.gz")[0]
    rc = _predict(ck, tiny, tmp_path / "seg.nii.gz")
    _one_line(capsys, rc, str(tiny), "too small for this model")
    assert not (tmp_path / "seg.nii.gz").exists()


def test_synth_of_absurd_sizes_is_refused_before_anything_is_written(tmp_path, capsys):
    for extra in (["--size", "100000", "--dims", "3"], ["--frames", "10000000000"]):
        rc = main(["synth", "--out", str(tmp_path / "a" / "b"), *extra])
        _one_line(capsys, rc, "lower --size or --frames", "available")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------ leakage

def test_the_same_image_in_training_and_validation_is_refused(tmp_path, capsys):
    """Regression (issue 17): the same image file as a training case and as the validation
    case (under other names) was accepted, so validation scored training data."""
    assert main(["synth", "--out", str(tmp_path / "data"), "--cases", "3", "--frames", "3",
                 "--size", "16", "--validation", "0.34"]) == 0
    data = tmp_path / "data"
    doc = json.loads((data / "datalist.json").read_text())
    first = doc["training"][0]
    shutil.copy(data / first["image"], data / "copy of case.nii.gz")
    ways = {"identical content": "copy of case.nii.gz",  # another name, the same bytes
            "both use": "imagesTr/../" + first["image"]}  # the same file, spelled otherwise
    for how, path in ways.items():
        doc["validation"][0]["image"] = path
        (data / "leaky.json").write_text(json.dumps(doc))
        rc = main(["train", "--datalist", str(data / "leaky.json"), "--out",
                   str(tmp_path / "run"), "--steps", "1", "--set", "model.channels=[2, 4]",
                   "--set", "data.window=2", "--set", "train.progress=false"])
        _one_line(capsys, rc, f"training case '{first['name']}'",
                  f"validation case '{doc['validation'][0]['name']}'", how)
        assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ full disk, read-only

def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` read-only: chmod, or (as root, whom chmod does not stop) the temporary
    files and folders the atomic writers make there refused as a read-only folder would."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return

    def refuse(real):
        def wrapper(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)
        return wrapper

    monkeypatch.setattr(_common.tempfile, "mkstemp", refuse(_common.tempfile.mkstemp))
    monkeypatch.setattr(_common.tempfile, "mkdtemp", refuse(_common.tempfile.mkdtemp))


def test_full_disk_or_read_only_folder_is_one_line_naming_the_file(
        ck, scan, tmp_path, capsys, monkeypatch):
    """Regression (issue 17): errors of a full disk named the temporary file, not the one
    the user asked for."""
    import nibabel as nib

    out = tmp_path / "out" / "seg.nii.gz"
    real_save = nib.save

    def half_then_full(img, filename):  # half the file written, then the disk is full
        real_save(img, filename)
        Path(filename).write_bytes(Path(filename).read_bytes()[:50])
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(nib, "save", half_then_full)
    _one_line(capsys, _predict(ck, scan, out), f"No space left on device: {out}")
    rc = main(["synth", "--out", str(tmp_path / "synth"), "--cases", "2", "--size", "16"])
    _one_line(capsys, rc, "No space left on device: " + str(tmp_path / "synth" / "imagesTr"))
    monkeypatch.undo()
    assert not out.exists() and not _hidden(tmp_path / "out")
    assert not list((tmp_path / "synth").rglob("*.nii.gz"))
    assert main(["synth", "--out", str(tmp_path / "data"), "--cases", "2", "--frames", "3",
                 "--size", "16", "--validation", "0"]) == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    try:
        rc = _predict(ck, scan, locked / "seg.nii.gz")
        _one_line(capsys, rc, "Permission denied", str(locked / "seg.nii.gz"))
        rc = main(["synth", "--out", str(locked / "synth"), "--cases", "2", "--size", "16"])
        _one_line(capsys, rc, "Permission denied", str(locked / "synth"))
        rc = main(["evaluate", "--pred", str(_labels(tmp_path)[0]), "--label",
                   str(_labels(tmp_path)[1]), "--out", str(locked / "eval")])
        _one_line(capsys, rc, "Permission denied", str(locked / "eval"))
        assert not (locked / "eval").exists() and not _hidden(locked)
        rc = main(["train", "--datalist", str(tmp_path / "data" / "datalist.json"), "--out",
                   str(locked / "run"), "--steps", "1", "--set", "model.channels=[2, 4]",
                   "--set", "data.window=2", "--set", "train.progress=false"])
        _one_line(capsys, rc, "Permission denied", str(locked / "run"))
    finally:
        locked.chmod(0o755)


def test_a_damaged_or_unreadable_input_is_one_line(ck, scan, tmp_path, capsys):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(scan.read_bytes()[:200])
    text = tmp_path / "notes.tif"
    text.write_text("not a TIFF")
    bads = [cut, text]
    if os.geteuid() != 0:  # root reads any file: unreadable only for others
        locked = tmp_path / "locked.nii.gz"
        shutil.copy(scan, locked)
        locked.chmod(0)
        bads.append(locked)
    for bad in bads:
        _one_line(capsys, _predict(ck, bad, tmp_path / "o.nii.gz"), str(bad))
    assert not (tmp_path / "o.nii.gz").exists()
