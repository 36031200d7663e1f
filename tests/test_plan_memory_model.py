"""The process model's constants measured on the device (CUDA plans): what the plan measures
reproduces the measured peaks, travels in the plan's YAML, and ``train``'s guard predicts
with it. The measurement itself needs a GPU (tests/test_cuda.py, benchmarks/gpu_check.py)."""

from __future__ import annotations

import math

import pytest
import torch

from clstm4d.engine.planning.memory import MiB
from clstm4d.engine.planning.planner import make_plan
from clstm4d.engine.planning.process import (
    PROCESS_CONSTANTS,
    CaseSize,
    DataSizes,
    ProcessConstants,
    estimate_process,
    measured_constants,
)
from clstm4d.engine.run.config import Config
from clstm4d.errors import ConfigError

CONFIG = {"name": "tiny", "spatial_dims": 3, "in_channels": 1, "out_channels": 2}
CASE = CaseSize(6, 1, (48, 48, 24))


def _estimate(constants=None, batch=1, case=CASE):
    return estimate_process(CONFIG, [32, 32, 16], 4, batch, "bf16", False, device="cuda",
                            data=DataSizes([], [case]), predict={"roi": [32, 32, 16]},
                            constants=constants)


@pytest.mark.parametrize("step_factor,val_factor", [(1.37, 1.8), (2.2, 1.1), (0.9, 0.95)])
def test_measured_constants_reproduce_the_peaks_they_were_measured_from(step_factor,
                                                                        val_factor):
    model = _estimate()
    step_peak = int(step_factor * model.step.total)
    val_peak = model.step.persistent + int(val_factor * model.validation)
    context = 612 * MiB
    c = measured_constants(model, step_peak, val_peak, context)
    again = _estimate(c)
    assert again.total == pytest.approx(context + max(step_peak, val_peak), abs=2)
    assert again.phase == ("step" if step_peak >= val_peak else "validation")
    # another batch: the step's factor applies to what the model counts for it
    b2 = _estimate(c, batch=2)
    assert b2.total >= again.total
    assert max(b2.total - context, 0) == pytest.approx(
        max(step_factor * _estimate(batch=2).step.total, val_peak), rel=1e-3)


def test_without_a_validation_measurement_the_steps_factor_applies():
    model = _estimate()
    c = measured_constants(model, int(1.5 * model.step.total), None, 500 * MiB)
    assert c.validation_scale == pytest.approx(1.5, rel=1e-6)


def test_the_plan_writes_the_constants_and_train_reads_them_back():
    c = ProcessConstants(runtime=612 * MiB, inference=PROCESS_CONSTANTS["cuda"].inference,
                         scale=1.37, validation_scale=1.8)
    data = DataSizes([CASE], [CASE])
    plan = make_plan(8 * 2**30, median_shape=[48, 48, 24], median_frames=6, device="cuda",
                     precision="bf16", data=data, constants=c, recompute=False)
    default = make_plan(8 * 2**30, median_shape=[48, 48, 24], median_frames=6, device="cuda",
                        precision="bf16", data=data, recompute=False)
    cfg = Config.from_dict(plan.config("datalist.json"))
    back = ProcessConstants.from_config(cfg.train.memory_model, "cuda:0")
    assert back == ProcessConstants(runtime=612 * MiB, inference=c.inference, scale=1.37,
                                    validation_scale=1.8)
    again = estimate_process({**plan.model_config(), "recompute": None}, plan.roi,
                             plan.window, plan.batch, plan.precision, plan.recompute,
                             device="cuda", data=data, predict={"roi": plan.roi},
                             constants=back)
    assert again.total == pytest.approx(plan.predicted, rel=1e-4)
    # the plan with the measured constants is not the default's plan under another name
    assert plan.predicted != default.predicted
    assert "memory_model" not in default.config()["train"]
    # measured on a GPU, not applied to a CPU run
    assert ProcessConstants.from_config(cfg.train.memory_model, "cpu") is None


@pytest.mark.parametrize("key,value", [("runtime_mb", -1), ("step_scale", "big"),
                                       ("validation_scale", None), ("step_scale", math.inf),
                                       ("runtime_mb", True)])
def test_a_malformed_memory_model_names_its_key(key, value):
    raw = {"device": "cuda", "runtime_mb": 600.0, "step_scale": 1.2, "validation_scale": 1.4}
    raw[key] = value
    with pytest.raises(ConfigError, match=rf"'train.memory_model.{key}' must be a positive "
                                          rf"number \(as `clstm4d plan` writes it\), got"):
        ProcessConstants.from_config(raw, "cuda")


class _FakeMeter:
    """Stands in for the CUDA reserve on CPU: records the phases and returns set peaks."""

    def __init__(self, peaks, context):
        self.peaks, self.ctx, self.calls = list(peaks), context, []

    def start(self):
        self.calls.append("start")

    def peak(self):
        self.calls.append("peak")
        return self.peaks.pop(0)

    def context(self):
        self.calls.append("context")
        return self.ctx


def test_the_plan_measures_the_step_then_validation_and_plans_with_what_it_measured():
    """The calibration on CPU with a stand-in meter: the real step and the real Predictor run
    (so the path the GPU takes stays working in CI), the phases are measured in order, and
    the constants are those of the measured numbers."""
    from clstm4d.engine.apps.plan import calibrate_memory

    case = CaseSize(4, 1, (32, 32, 16))
    plan = make_plan(2 * 2**30, median_shape=[32, 32, 16], median_frames=4, device="cuda",
                     precision="bf16", data=DataSizes([case], [case]), recompute=False)
    model = estimate_process({k: v for k, v in plan.model_config().items()
                              if k != "recompute"}, plan.roi, plan.window, 1, plan.precision,
                             plan.recompute, device="cuda", predict={"roi": plan.roi},
                             data=DataSizes([], [case]))
    step_peak = int(1.3 * model.step.total)
    val_peak = model.step.persistent + int(1.6 * model.validation)
    meter = _FakeMeter([step_peak, val_peak], 700 * MiB)
    c = calibrate_memory(plan, torch.device("cpu"), case, meter=meter)
    assert meter.calls == ["start", "peak", "start", "peak", "context"]
    assert c == measured_constants(model, step_peak, val_peak, 700 * MiB)
    assert c.scale == pytest.approx(1.3, rel=1e-6)
    assert c.validation_scale == pytest.approx(1.6, rel=1e-6)
    assert calibrate_memory(plan, torch.device("cpu"), case) is None  # CPU: the fitted model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_plan_measures_the_train_process_it_plans(tmp_path):
    """On a GPU: `plan` (memory measured on the device) then `train --config plan.yaml` in a
    fresh process; the logged peak is within 0.85-1.15 of the prediction and under budget."""
    import json
    import subprocess
    import sys

    from clstm4d.data import write_synthetic_dataset
    from clstm4d.engine.apps.plan import run_plan

    data = write_synthetic_dataset(tmp_path / "data", cases=4, frames=5, size=48,
                                   spatial_dims=3, validation=0.25)
    plan, _ = run_plan(memory="3GB", datalist=str(data), device="cuda",
                       out=tmp_path / "plan.yaml")
    assert plan.memory_model is not None and plan.memory_model["device"] == "cuda"
    subprocess.run([sys.executable, "-m", "clstm4d", "train", "--config",
                    str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "run"), "--steps",
                    "3", "--set", "train.progress=false"], check=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "peak_mb" in r][-1]
    assert 0.85 <= last["predicted_peak_mb"] / last["peak_mb"] <= 1.15, last
    assert last["peak_mb"] * MiB <= plan.budget
