"""Faults in writing and reading checkpoints: a full disk or an I/O error part-way, a damaged
newest checkpoint, a checkpoint of a newer format. What must survive: the previous checkpoint,
`latest.json` pointing at it, and an exact resume from it."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from clstm4d import _common
from clstm4d.engine.run import checkpoint as ckmod
from clstm4d.engine.run.checkpoint import Checkpoint, verify_checkpoint
from clstm4d.engine.run.folders import LOCK, RunFolder
from clstm4d.engine.training.loop import fit
from clstm4d.errors import CheckpointError, CheckpointFormatError

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from engine_toys import ToySequences, ToyTemporalNet  # noqa: E402
from fault_toys import toy_config  # noqa: E402


def _losses(out):
    return [(r["step"], r["loss"]) for r in
            map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())]


def _train(out, steps=6, resume=None, **kw):
    torch.manual_seed(0)
    model = ToyTemporalNet(dropout=0.2)
    fit(model, ToySequences(), toy_config(out, steps, checkpoint_every=2, **kw), batch_size=2,
        saved_config={"model": {"name": "toy"}}, folder=RunFolder(out, resume=resume))
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its loss curve is what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    _train(out)
    return _losses(out)


def _fail_on_call(real, n, error, write=True):
    """Wrap ``real`` so that its ``n``-th call writes half of what it would and then raises
    (``write=False``: raises before writing anything)."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != n:
            return real(*args, **kwargs)
        if not write:
            raise error
        real(*args, **kwargs)
        target = next((a for a in args if isinstance(a, (str, os.PathLike))), None)
        if target is not None and Path(target).is_file():
            data = Path(target).read_bytes()  # leave it cut short, as a full disk would
            Path(target).write_bytes(data[: len(data) // 2])
        raise error

    return wrapper


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault", ["model.safetensors", "optimizer.safetensors", "fsync",
                                   "latest.json"])
def test_a_write_that_fails_part_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                   reference, fault):
    # each checkpoint writes model, optimizer, rng, config, state and checksums (6
    # _write_bytes calls), fsyncs its 6 files (the first after the manifest's), then writes
    # (and fsyncs) latest.json: fail in the second checkpoint (step 4)
    if fault == "model.safetensors":
        monkeypatch.setattr(ckmod, "_write_bytes", _fail_on_call(ckmod._write_bytes, 7, ENOSPC))
    elif fault == "optimizer.safetensors":
        monkeypatch.setattr(ckmod, "_write_bytes", _fail_on_call(ckmod._write_bytes, 8, ENOSPC))
    elif fault == "fsync":
        monkeypatch.setattr(_common.os, "fsync",
                            _fail_on_call(os.fsync, 10, OSError(errno.EIO, "I/O error")))
    else:  # the disk fills while the new latest.json is written: the old one stays
        monkeypatch.setattr(ckmod, "atomic_write_text",
                            _fail_on_call(ckmod.atomic_write_text, 2, ENOSPC, write=False))
    with pytest.raises(OSError):
        _train(tmp_path)
    monkeypatch.undo()
    ckdir = tmp_path / "checkpoints"
    assert json.loads((ckdir / "latest.json").read_text())["checkpoint"] == "step_000002"
    assert verify_checkpoint(ckdir / "step_000002")
    assert not [p.name for p in ckdir.iterdir() if p.name.startswith(".")]  # no temporaries
    assert not (tmp_path / LOCK).exists()
    if fault != "latest.json":  # the failed checkpoint never appeared under its name
        assert not (ckdir / "step_000004").exists()
    assert Checkpoint.open(tmp_path).path == ckdir / "step_000002"
    _train(tmp_path, resume=tmp_path)
    assert _losses(tmp_path) == reference  # resumed exactly from the previous checkpoint


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "model cut short": lambda ck: _truncate(ck / "model.safetensors"),
    "optimizer header garbage": lambda ck: (ck / "optimizer.safetensors").write_bytes(
        b"\xff" * 8 + (ck / "optimizer.safetensors").read_bytes()[8:]),
    "rng missing": lambda ck: (ck / "rng.safetensors").unlink(),
    "state.json cut short": lambda ck: _truncate(ck / "state.json", 0.3),
    "config.json empty": lambda ck: (ck / "config.json").write_text(""),
    "folder empty": lambda ck: [p.unlink() for p in ck.iterdir()],
    "latest.json cut short": lambda ck: _truncate(ck.parent / "latest.json", 0.5),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, caplog,
                                                                        reference, damage):
    _train(tmp_path, steps=4)  # checkpoints at steps 2 and 4
    ckdir = tmp_path / "checkpoints"
    DAMAGE[damage](ckdir / "step_000004")
    if damage == "latest.json cut short":  # the pointer is damaged, step 4 itself is fine
        with caplog.at_level(logging.WARNING, logger="clstm4d.engine.run.checkpoint"):
            assert Checkpoint.open(tmp_path).path == ckdir / "step_000004"
        assert "latest.json is unreadable" in caplog.text
        return
    with caplog.at_level(logging.WARNING, logger="clstm4d.engine.run.checkpoint"):
        assert Checkpoint.open(tmp_path).path == ckdir / "step_000002"
    assert "step_000004" in caplog.text and "newest valid checkpoint" in caplog.text
    with pytest.raises(CheckpointError):
        verify_checkpoint(ckdir / "step_000004")
    _train(tmp_path, resume=tmp_path)
    assert _losses(tmp_path) == reference
    assert verify_checkpoint(ckdir / "step_000004")  # written again, whole this time


def test_no_valid_checkpoint_is_one_line_at_the_cli(tmp_path, capsys):
    from clstm4d.cli import main

    assert main(["synth", "--out", str(tmp_path / "data"), "--cases", "2", "--frames", "4",
                 "--size", "16", "--validation", "0"]) == 0
    common = ["--datalist", str(tmp_path / "data" / "datalist.json"), "--out",
              str(tmp_path / "run"), "--batch-size", "1", "--set", "data.window=2", "--set",
              "train.progress=false", "--set", "model.channels=[2, 4]", "--set",
              "train.checkpoint_every=1", "--steps", "2"]
    assert main(["train", *common]) == 0
    for ck in (tmp_path / "run" / "checkpoints").glob("step_*"):
        _truncate(ck / "model.safetensors")
    capsys.readouterr()
    for argv in (["train", *common, "--resume"],
                 ["predict", "--checkpoint", str(tmp_path / "run"), "--input",
                  str(tmp_path / "data" / "imagesTr" / "case_000.nii.gz"), "--output",
                  str(tmp_path / "seg.nii.gz")]):
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "no valid checkpoint in" in err and "incomplete metadata" in err, err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    _train(tmp_path, steps=4)
    state = tmp_path / "checkpoints" / "step_000004" / "state.json"
    doc = json.loads(state.read_text())
    assert doc["format"] == ckmod.FORMAT_VERSION == 1
    state.write_text(json.dumps({**doc, "format": 2}))
    with pytest.raises(CheckpointFormatError, match="format version 2; .* reads versions up to "
                                                     "1: upgrade clstm4d"):
        Checkpoint.open(tmp_path)  # no silent fall back to the older step 2
    with pytest.raises(CheckpointFormatError):
        _train(tmp_path, resume=tmp_path)


def _flip_bit(path: Path, offset_from_end: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x04  # inside the tensor data, past the header
    path.write_bytes(bytes(data))


def test_a_bit_flip_in_the_weights_is_refused_and_the_run_falls_back(tmp_path, caplog):
    """Regression (issue 17): a bit flip in model.safetensors loaded silently."""
    _train(tmp_path, steps=4)
    ckdir = tmp_path / "checkpoints"
    _flip_bit(ckdir / "step_000004" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: its sha256 differs"):
        Checkpoint.open(ckdir / "step_000004")
    with caplog.at_level(logging.WARNING, logger="clstm4d.engine.run.checkpoint"):
        assert Checkpoint.open(tmp_path).path == ckdir / "step_000002"  # as --resume does
    assert "sha256 differs" in caplog.text and "newest valid checkpoint" in caplog.text
    # the structure is intact: only the checksum tells
    assert verify_checkpoint(ckdir / "step_000004", checksums=False)


def test_checksums_are_recorded_and_old_checkpoints_without_them_still_load(tmp_path):
    _train(tmp_path, steps=2)
    ck = tmp_path / "checkpoints" / "step_000002"
    sums = json.loads((ck / "checksums.json").read_text())["sha256"]
    import hashlib

    assert sorted(sums) == sorted(p.name for p in ck.iterdir() if p.name != "checksums.json")
    assert all(hashlib.sha256((ck / n).read_bytes()).hexdigest() == h for n, h in sums.items())
    (ck / "checksums.json").unlink()  # state.json promises checksums: a missing file is damage
    with pytest.raises(CheckpointError, match="checksums.json"):
        Checkpoint.open(ck)
    state = json.loads((ck / "state.json").read_text())
    del state["checksums"]  # now as written before checksums existed
    (ck / "state.json").write_text(json.dumps(state))
    assert Checkpoint.open(ck).step == 2


def _synth_and_train_args(tmp_path, steps=2):
    from clstm4d.cli import main

    assert main(["synth", "--out", str(tmp_path / "data"), "--cases", "2", "--frames", "4",
                 "--size", "16", "--validation", "0"]) == 0
    return ["train", "--datalist", str(tmp_path / "data" / "datalist.json"), "--out",
            str(tmp_path / "run"), "--batch-size", "1", "--set", "data.window=2", "--set",
            "train.progress=false", "--set", "model.channels=[2, 4]", "--set",
            "train.checkpoint_every=1", "--steps", str(steps)]


def test_a_full_disk_while_train_checkpoints_is_one_line(tmp_path, capsys, monkeypatch):
    """Regression (issue 17): a full disk while writing a checkpoint ended in a traceback
    (safetensors raises its own error for ENOSPC, not an OSError)."""
    import safetensors
    import safetensors.torch

    from clstm4d.cli import main

    argv = _synth_and_train_args(tmp_path)
    disk_full = {"on": False}

    def full(real, make_error):
        def wrapper(*args, **kwargs):
            if disk_full["on"]:
                raise make_error()
            return real(*args, **kwargs)
        return wrapper

    # the disk as a library writing the file itself sees it, and as Python's write does
    monkeypatch.setattr(safetensors.torch, "save_file", full(
        safetensors.torch.save_file, lambda: safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")))
    monkeypatch.setattr(ckmod, "_write_bytes", full(getattr(ckmod, "_write_bytes", None),
                        lambda: OSError(errno.ENOSPC, "No space left on device")),
                        raising=False)
    real_save = ckmod.save_checkpoint

    def fill_after_first(*args, **kwargs):  # the first checkpoint fits, the second does not
        path = real_save(*args, **kwargs)
        disk_full["on"] = True
        return path

    monkeypatch.setattr(ckmod, "save_checkpoint", fill_after_first)
    import clstm4d.engine.training.loop as loop

    monkeypatch.setattr(loop, "save_checkpoint", fill_after_first)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and "step_000002" in err, err
    ckdir = tmp_path / "run" / "checkpoints"
    assert json.loads((ckdir / "latest.json").read_text())["checkpoint"] == "step_000001"
    assert not [p.name for p in ckdir.iterdir() if p.name.startswith(".")]
