"""Faults injected into training: preemption signals, non-finite steps, two runs in one folder.

Toy model and data (tests/engine_toys.py); faults come from tests/fault_toys.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clstm4d.engine.run.checkpoint import Checkpoint
from clstm4d.engine.run.folders import LOCK, RunFolder
from clstm4d.engine.training.loop import fit
from clstm4d.errors import NonFiniteError, Preempted, UserError

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from engine_toys import ToySequences, ToyTemporalNet  # noqa: E402
from fault_toys import Faulty, toy_config  # noqa: E402


def _rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(out):
    return [(r["step"], r["loss"]) for r in _rows(out)]


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_checkpoints_and_resume_is_bitwise(tmp_path, signum):
    torch.manual_seed(0)
    full = ToyTemporalNet(dropout=0.3)  # dropout: the RNG state must survive too
    fit(full, ToySequences(), toy_config(tmp_path / "full", 8), batch_size=2)

    torch.manual_seed(0)
    before = signal.getsignal(signum)
    # batch 2: calls 7 and 8 load the batch of step 4; the signal arrives during call 7
    faulty = Faulty(ToySequences(), signal_at={7: signum})
    with pytest.raises(Preempted) as info:
        fit(ToyTemporalNet(dropout=0.3), faulty, toy_config(tmp_path / "run", 8),
            batch_size=2, saved_config={"model": {"name": "toy"}})
    e = info.value
    assert e.step == 4 and e.signal == signal.Signals(signum).name
    assert "continue with --resume" in str(e)
    assert signal.getsignal(signum) == before  # handlers restored
    assert faulty.calls == 8  # the step was finished, no further batch was loaded
    assert Checkpoint.open(tmp_path / "run").path == e.checkpoint == \
        tmp_path / "run" / "checkpoints" / "step_000004"
    assert not (tmp_path / "run" / LOCK).exists()

    torch.manual_seed(123)  # a fresh process would start from anything
    resumed = ToyTemporalNet(dropout=0.3)
    res = fit(resumed, ToySequences(), toy_config(tmp_path / "run", 8), batch_size=2,
              folder=RunFolder(tmp_path / "run", resume=tmp_path / "run"))
    assert res.steps == 8
    assert _losses(tmp_path / "run") == _losses(tmp_path / "full")  # to the bit
    assert _same_weights(full, resumed)


def test_a_repeated_sigterm_still_checkpoints_a_second_sigint_stops_at_once(tmp_path):
    # torchrun forwards the cluster's SIGTERM to workers that got it already
    twice = Faulty(ToySequences(), signal_at={7: signal.SIGTERM, 8: signal.SIGTERM})
    with pytest.raises(Preempted) as info:
        fit(ToyTemporalNet(), twice, toy_config(tmp_path / "term", 8), batch_size=2)
    assert info.value.step == 4 and Checkpoint.open(tmp_path / "term").path.name == "step_000004"
    # Ctrl-C twice: out at once, without a new checkpoint, the folder unlocked
    impatient = Faulty(ToySequences(), signal_at={7: signal.SIGINT, 8: signal.SIGINT})
    with pytest.raises(KeyboardInterrupt):
        fit(ToyTemporalNet(), impatient, toy_config(tmp_path / "int", 8, checkpoint_every=2),
            batch_size=2)
    assert Checkpoint.open(tmp_path / "int").path.name == "step_000002"
    assert not (tmp_path / "int" / LOCK).exists()


def test_sigterm_from_outside_to_the_cli_exits_75_and_resume_continues(tmp_path):
    """A real `clstm4d train` process, preempted the way a cluster does it."""
    from clstm4d.cli import main

    root = tmp_path
    assert main(["synth", "--out", str(root / "data"), "--cases", "2", "--frames", "4",
                 "--size", "16", "--validation", "0"]) == 0
    # progress on, as a job runs it: the log is redirected, so lines and no redraws (issue 17)
    common = ["train", "--datalist", str(root / "data" / "datalist.json"), "--out",
              str(root / "run"), "--batch-size", "1", "--set", "data.window=2", "--set",
              "model.channels=[2, 4]", "--set", "train.log_every=1", "--set",
              "train.threads=1"]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clstm4d", *common, "--steps", "100000"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = root / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("clstm4d train: stopped by SIGTERM after step ") and "Traceback" \
        not in err, err
    # regression (issue 17): the last line was a progress redraw; now no redraws at all
    assert "\r" not in err and err.startswith("train: step 1/100000 (0%), loss "), err
    step = int(last.split("after step ")[1].split(";")[0])
    ck = Checkpoint.open(root / "run").path
    assert Checkpoint.open(ck).state["step"] == step and ck.name == f"step_{step:06d}"
    assert _rows(root / "run")[-1]["step"] == step
    assert not (root / "run" / LOCK).exists()
    # the same command with --resume continues from there
    assert main([*common, "--steps", str(step + 2), "--resume", "--no-progress"]) == 0
    assert [r["step"] for r in _rows(root / "run")] == list(range(1, step + 3))


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path):
    # calls 5, 6 = step 3: NaN image -> NaN loss; step 5 gets NaN gradients with a finite loss
    data = Faulty(ToySequences(), nan_calls={5})
    torch.manual_seed(0)
    model = ToyTemporalNet()
    bad_grad_step = 5

    def poison(grad):  # called in backward; data.calls is 10 during step 5
        return grad * float("nan") if data.calls == 2 * bad_grad_step else grad

    model.head.weight.register_hook(poison)
    res = fit(model, data, toy_config(tmp_path, 7, checkpoint_every=1, keep_checkpoints=10),
              batch_size=2, saved_config={"model": {"name": "toy"}})
    assert res.steps == 7
    rows = {r["step"]: r for r in _rows(tmp_path)}
    assert rows[3]["loss"] is None and rows[5]["loss"] is None  # no step had a NaN loss logged
    assert all(rows[s]["loss"] is not None for s in (1, 2, 4, 6, 7))
    assert [rows[s]["skipped_steps"] for s in range(1, 8)] == [0, 0, 1, 1, 2, 2, 2]
    # the optimizer stepped 5 times in 7 steps, and the weights stayed finite
    from safetensors.torch import load_file

    ck = Checkpoint.open(tmp_path).path
    opt = load_file(str(ck / "optimizer.safetensors"))
    assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {5.0}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # no checkpoint is written right after a skipped step
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        f"step_{s:06d}" for s in (1, 2, 4, 6, 7)]
    assert Checkpoint.open(ck).state["extra"]["nonfinite"] == {"total": 2, "consecutive": 0}


def test_too_many_nonfinite_steps_stop_and_keep_the_last_good_checkpoint(tmp_path):
    data = Faulty(ToySequences(), nan_from=5)  # every step from step 3 on is NaN
    torch.manual_seed(0)
    with pytest.raises(NonFiniteError) as info:
        fit(ToyTemporalNet(), data, toy_config(tmp_path, 50, checkpoint_every=1,
                                               max_nonfinite_steps=3),
            batch_size=2, saved_config={"model": {"name": "toy"}})
    msg = str(info.value)
    assert "after step 5" in msg and "3 consecutive steps, 3 to 5" in msg
    good = tmp_path / "checkpoints" / "step_000002"
    assert f"the last good checkpoint is {good}" in msg
    assert Checkpoint.open(tmp_path).path == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_000001", "step_000002"]
    other = ToyTemporalNet()
    Checkpoint.open(good).load_weights(other)
    assert all(torch.isfinite(p).all() for p in other.parameters())
    assert not (tmp_path / LOCK).exists()


def test_second_run_in_a_locked_folder_names_the_other_process(tmp_path, capsys):
    import socket

    fit(ToyTemporalNet(), ToySequences(), toy_config(tmp_path, 1), batch_size=2)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # another live process is training in the folder (it holds the lock)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "since": "2026-01-01 00:00:00"}))
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on "):
            fit(ToyTemporalNet(), ToySequences(), toy_config(tmp_path, 2), batch_size=2,
                folder=RunFolder(tmp_path, resume=tmp_path))
        with pytest.raises(UserError, match="in use"):  # what `train` checks before loading
            RunFolder(tmp_path, resume=tmp_path).check()
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # the same lock, now of a dead process: taken over
    fit(ToyTemporalNet(), ToySequences(), toy_config(tmp_path, 2), batch_size=2,
        folder=RunFolder(tmp_path, resume=tmp_path))
    assert Checkpoint.open(tmp_path).path.name == "step_000002"
    assert not (tmp_path / LOCK).exists()
