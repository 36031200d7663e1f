"""Messages that help (issue 17): every mistake in an option ends in one line naming the
option, exit code 2, nothing written; memory sizes in units a person reads."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from clstm4d.cli import main
from clstm4d.data import Geometry, write_image, write_label
from clstm4d.engine.run.checkpoint import save_checkpoint
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
from clstm4d.models import create_model


def one_error_line(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 2D checkpoint and a 5-frame input for it."""
    root = tmp_path_factory.mktemp("msg")
    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8))
    run = SavedRun(Config(), ModelSpec.of(model), {0: "background", 1: "a", 2: "b"})
    ck = save_checkpoint(root / "ck", model, step=1, config=run.to_dict())
    image = np.random.default_rng(0).random((5, 1, 20, 18), dtype=np.float32)
    inp = write_image(image, Geometry.default("nifti", (20, 18), 5), root / "in.nii.gz")[0]
    labels = write_label((image[:, 0] > 0.5).astype(np.uint8),
                         Geometry.default("nifti", (20, 18), 5), root / "lab.nii.gz")[0]
    return {"ck": ck, "input": inp, "label": labels, "root": root}


@pytest.mark.parametrize("option, value, expected", [
    ("--sw-batch-size", "0", "--sw-batch-size must be >= 1, got 0"),   # was: range() arg 3
    ("--roi", "0", "--roi must be >= 1, got [0]"),                     # was: silently accepted
    ("--chunk", "-5", "--chunk must be >= 1, got -5"),                 # was: silently accepted
    ("--overlap", "1", "--overlap must be in [0, 1), got 1.0"),
    ("--time-margin", "-1", "--time-margin must be >= 0, got -1"),
    ("--roi", "16 16 16", "--roi must be an int or a sequence of 2 ints"),
])
def test_predict_options_out_of_range_name_the_option(saved, tmp_path, capsys, option, value,
                                                      expected):
    """Regression: `--sw-batch-size 0` ended in "range() arg 3 must not be zero" (with --roi)
    or was accepted, `--roi 0` named no option, `--chunk -5` and `--overlap 1` were accepted."""
    out = tmp_path / "o.nii.gz"
    rc = main(["predict", "--checkpoint", str(saved["ck"]), "--input", str(saved["input"]),
               "--output", str(out), "--roi", "16", option, *value.split()])
    err = one_error_line(capsys, rc)
    assert expected in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_train_options_name_the_option_and_config_keys_name_the_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 0\n")
    err = one_error_line(capsys, main(["train", "--config", str(cfg), "--print-config"]))
    assert "'train.steps' must be >= 1, got 0" in err
    err = one_error_line(capsys, main(["train", "--steps", "0", "--print-config"]))
    assert "--steps must be >= 1, got 0" in err


def test_plan_memory_too_small_speaks_in_units_that_show_the_minimum(tmp_path, capsys):
    """Regression: `plan --memory 1MB` said "0.00 GiB is too small ... needs about 0.00 GiB"."""
    out = ["--shape", "4,16,16", "--no-time", "--device", "cpu", "--out", str(tmp_path / "p.yaml")]
    err = one_error_line(capsys, main(["plan", "--memory", "1MB", *out]))
    assert "0.00 GiB" not in err and "--memory 1 MiB is too small" in err, err
    need = re.search(r"give --memory (\S+) or more", err).group(1)
    assert re.search(rf"needs about {re.escape(need[:-3])} MiB", err), err
    # the minimum it names is enough
    assert main(["plan", "--memory", need, *out]) == 0, capsys.readouterr().err
    assert (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("command, lower", [("evaluate", "--frames"), ("predict", "--chunk")])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(saved, tmp_path, capsys,
                                                                monkeypatch, command, lower):
    """Regression: an allocation that failed ended in a traceback and "MemoryError: " with an
    empty reason (a C extension's `PyErr_NoMemory`); now one line: what ran out, what to
    lower."""
    from clstm4d.engine.evaluation import evaluate as ev
    from clstm4d.engine.inference import predictor

    def fail(*args, **kwargs):
        raise MemoryError()

    def torch_fails(*args, **kwargs):  # what torch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 1200000000 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(ev, "evaluate_sequence", fail)
    monkeypatch.setattr(predictor, "predict_sequence", fail)
    if command == "evaluate":
        argv = ["evaluate", "--pred", str(saved["label"]), "--label", str(saved["label"])]
    else:
        argv = ["predict", "--checkpoint", str(saved["ck"]), "--input", str(saved["input"]),
                "--output", str(tmp_path / "o.nii.gz")]
    err = one_error_line(capsys, main(argv))
    assert "out of memory (an allocation failed); lower" in err and lower in err, err
    monkeypatch.setattr(ev, "evaluate_sequence", torch_fails)
    monkeypatch.setattr(predictor, "predict_sequence", torch_fails)
    err = one_error_line(capsys, main(argv))
    assert "out of memory (could not allocate 1.12 GiB); lower" in err and lower in err, err


def test_the_demo_reports_a_training_process_out_of_memory_as_one_line(monkeypatch):
    """The demo trains in a child process; a MemoryError there came back as "training failed
    in the child process: MemoryError: " (a traceback)."""
    from clstm4d.engine.apps import demo

    class Queue:
        def put(self, item):
            self.item = item

    def fail(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(demo, "train", fail)
    q = Queue()
    demo._train_child(Config().to_dict(), 1, q)
    assert q.item == ("memory", "while training")
