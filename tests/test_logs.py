"""Logs that work where jobs run (issue 17): no progress-bar redraws in a redirected log but a
line now and then (loss, step time, ETA; the "stopped by" line last after SIGTERM:
test_faults_train.py::test_sigterm_from_outside_to_the_cli_exits_75_and_resume_continues), metrics
rows that are complete and whose time counts across a resume, --threads / --no-progress on
train, predict and demo with a warning for more threads than free cores, and predict's
progress per sequence on a terminal."""

from __future__ import annotations

import csv
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clstm4d.cli import main
from clstm4d.engine.run import progress as progress_module
from clstm4d.engine.run.folders import RunFolder
from clstm4d.engine.run.progress import Progress
from clstm4d.engine.training.loop import fit

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from engine_toys import ToySequences, ToyTemporalNet  # noqa: E402
from fault_toys import toy_config  # noqa: E402


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_a_few_lines_in_a_log():
    clock = iter(float(i) for i in range(1000)).__next__  # one second per call
    log = io.StringIO()
    with Progress(200, desc="train", stream=log, every_seconds=60, clock=clock) as p:
        for _ in range(200):
            p.update(loss="0.1")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [ln.split(",")[0] for ln in lines] == [
        "train: step 1/200 (0%)", "train: step 61/200 (30%)", "train: step 121/200 (60%)",
        "train: step 181/200 (90%)", "train: step 200/200 (100%)"]
    assert "loss 0.1, 1.00 s/step, ETA 3m19s" in lines[0] and "done in 3m20s" in lines[-1]
    # a slow run (a busy machine: 10 s a step) still logs about a dozen lines, not one a minute
    slow, clock = io.StringIO(), iter(10.0 * i for i in range(1000)).__next__
    with Progress(400, desc="train", stream=slow, every_seconds=60, clock=clock) as p:
        for _ in range(400):
            p.update()
    assert len(slow.getvalue().splitlines()) == 11  # step 1, every 40 steps, step 400
    tty = Terminal()
    with Progress(3, desc="train", stream=tty) as p:
        for _ in range(3):
            p.update()
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()  # tqdm redraws in place
    quiet = io.StringIO()
    with Progress(3, desc="train", stream=quiet, enabled=False) as p:
        p.update(3)
    assert quiet.getvalue() == ""


def test_training_into_a_redirected_log_writes_lines_not_redraws(tmp_path, capsys):
    """Regression: the progress bar redrew into redirected logs (the demo's held about 1,400
    redraws)."""
    cfg = toy_config(tmp_path / "run", 12, progress=True, log_every=4)
    fit(ToyTemporalNet(), ToySequences(), cfg, batch_size=2)
    err = capsys.readouterr().err
    assert "\r" not in err, err[:300]
    lines = [ln for ln in err.splitlines() if ln.startswith("train: step")]
    assert 2 <= len(lines) <= 3 and lines[-1].startswith("train: step 12/12 (100%), loss ")
    assert "s/step" in lines[0] and "ETA" in lines[0]


def _csv_rows(out):
    with open(Path(out) / "metrics.csv") as f:
        return list(csv.DictReader(f))


class SlowSequences(ToySequences):
    def __getitem__(self, i):
        time.sleep(0.1)
        return super().__getitem__(i)


def test_metrics_rows_are_complete_and_their_time_counts_across_a_resume(tmp_path):
    """Regression: metrics.csv had value-less rows (a validation or first-step memory row
    held only the step) and its `seconds` restarted at 0 after a resume."""
    out = tmp_path / "run"
    torch.manual_seed(0)
    cfg = toy_config(out, 4, log_every=4, val_every=3)
    fit(ToyTemporalNet(), SlowSequences(), cfg, batch_size=2, predicted_peak=10**6,
        validate=lambda model: {"val_dice": 0.5})
    first = _csv_rows(out)
    assert [r["step"] for r in first] == ["1", "3", "4"]  # memory, validation, log + val
    torch.manual_seed(0)
    fit(ToyTemporalNet(), ToySequences(), toy_config(out, 8, log_every=4, val_every=3),
        batch_size=2, folder=RunFolder(out, resume=out), validate=lambda m: {"val_dice": 0.5})
    rows = _csv_rows(out)
    assert [r["step"] for r in rows] == ["1", "3", "4", "6", "8"]
    for r in rows:
        assert all(r[k] != "" for k in ("loss", "lr", "seconds", "skipped_steps")), r
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[3] > seconds[2] >= 0.8  # 8 slow items


def test_threads_and_no_progress_on_train_predict_and_demo(tmp_path, capsys, monkeypatch,
                                                          caplog):
    """Regression: `train` had no --threads or --no-progress, and all cores on a busy machine
    ran many times slower with no hint."""
    import json

    assert main(["train", "--threads", "1", "--no-progress", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)["train"]
    assert printed["threads"] == 1 and printed["progress"] is False
    assert main(["train", "--threads", "0", "--print-config"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    for command in (["predict", "--checkpoint", "x", "--input", "y", "--output", "z"],
                    ["demo", "--out", str(tmp_path / "d")]):
        assert main([*command, "--threads", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "--threads must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
    # more threads than free cores: one warning per process, naming what to pass
    monkeypatch.setattr(progress_module, "_warned", False)
    monkeypatch.setattr(progress_module, "free_cores", lambda: (2, 1.4))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="clstm4d.engine.run.progress"):
            assert progress_module.check_threads(2) == 2
            progress_module.check_threads(2)
            assert progress_module.check_threads(1) == 1
    finally:
        torch.set_num_threads(before)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "2 CPU threads, but only 1 of 2 cores are free" in warnings[0]
    assert "--threads 1" in warnings[0]


def test_predict_shows_progress_per_sequence_on_a_terminal(monkeypatch):
    """Regression: `predict` showed nothing during a long sequence."""
    from clstm4d.engine.inference.predictor import Predictor
    from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
    from clstm4d.models import create_model

    model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=2, channels=(2, 4))
    run = SavedRun(Config.from_dict({"predict": {"chunk": 2}}), ModelSpec.of(model), {})
    image = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    Predictor(model, run, device="cpu").predict_array(image, name="scan.nii.gz",
                                                      progress=True)
    shown = tty.getvalue()
    assert "predict scan.nii.gz" in shown and "5/5" in shown and "frame" in shown
    tty.seek(0)
    tty.truncate()
    Predictor(model, run, device="cpu").predict_array(image, progress=False)
    assert tty.getvalue() == ""
    log = io.StringIO()  # a redirected log: nothing (an error after it stays one line)
    monkeypatch.setattr(sys, "stderr", log)
    Predictor(model, run, device="cpu").predict_array(image, progress=True)
    assert log.getvalue() == ""


@pytest.mark.slow
def test_a_small_demo_redirected_to_a_file_leaves_a_short_log(tmp_path):
    """The demo's whole output, redirected as `make demo > log 2>&1` does: no redraws, fewer
    than 60 lines (the full demo: see docs/reliability.md)."""
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src")}
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "clstm4d", "demo", "--out",
                              str(tmp_path / "demo"), "--steps", "20", "--cases", "2", "--test",
                              "1", "--frames", "6", "--size", "24", "--batch-size", "1",
                              "--window", "4"], env=env, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert rc == 0, text
    assert "\r" not in text and len(text.splitlines()) < 60, text
