"""``clstm4d plan``: fingerprint the data (or take a shape), plan for a memory budget, time a
short calibration of the real training step, and write the plan as a config ``train`` uses.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clstm4d._common import atomic_write_text, human_bytes
from clstm4d.data import target_shape
from clstm4d.engine.inference.predictor import Predictor
from clstm4d.engine.planning.fingerprint import fingerprint
from clstm4d.engine.planning.memory import meta_model, parse_memory, step_macs
from clstm4d.engine.planning.planner import (
    MAX_BATCH,
    MIN_WINDOW,
    Plan,
    capacity,
    make_plan,
    plan_from_fingerprint,
)
from clstm4d.engine.planning.process import (
    CaseSize,
    DataSizes,
    ProcessConstants,
    estimate_process,
    measured_constants,
)
from clstm4d.engine.planning.timing import StepTime
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun, create
from clstm4d.engine.run.runtime import (
    ReserveMeter,
    amp_dtype,
    available_memory,
    resolve_device,
    return_freed_memory,
)
from clstm4d.engine.training.losses import SequenceLoss
from clstm4d.engine.training.optim import param_groups
from clstm4d.engine.training.step import training_step
from clstm4d.errors import ConfigError, UserError

__all__ = ["calibrate_memory", "calibrate_step_time", "capacity_lines", "parse_shape",
           "run_plan"]


def calibrate_step_time(model_config: dict[str, Any], roi: Sequence[int], window: int,
                        precision: str, recompute: bool, device: Any, *,
                        dataset: Any = None, max_macs: float | None = None,
                        repeats: int = 2) -> StepTime:
    """A :class:`~clstm4d.engine.planning.timing.StepTime` from a short calibration of the real
    training step on ``device``: a few steps of the planned model at batch 1 with the plan's
    window and patch (fewer frames, then a smaller patch, when that exceeds ``max_macs``
    multiply-accumulates: 2e10 on CPU, 2e12 on CUDA), the optimizer's update alone (the fixed
    part) and, with ``dataset`` (a :class:`~clstm4d.data.PatchDataset` at the plan's patch
    and window), a few of its samples (the data pipeline)."""
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if max_macs is None:
        max_macs = 2e12 if device.type == "cuda" else 2e10
    model = meta_model(model_config, recompute)
    unet = getattr(model, "unet", model)
    frames, small = (model.frames or window), list(roi)
    while model.frames is None and frames > 1 and \
            step_macs(model_config, small, frames, 1, recompute) > max_macs:
        frames = max(1, frames // 2)
    macs = step_macs(model_config, small, frames, 1, recompute)
    if macs > max_macs:
        mult = [math.prod(s[a] for s in unet.strides) for a in range(unet.spatial_dims)]
        scale = max(0.5, (max_macs / macs) ** (1 / unet.spatial_dims))
        small = [max(m, int(r * scale) // m * m) for r, m in zip(roi, mult, strict=True)]
        macs = step_macs(model_config, small, frames, 1, recompute)
    if device.type == "cpu":
        return_freed_memory()  # allocate as train does (every large tensor mapped afresh)
    net, optimizer, step = _training_step(model_config, recompute, precision, frames, small,
                                          device)

    def update():
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()

    seconds = _timed(step, device, repeats)
    fixed = _timed(update, device, repeats)
    data = 0.0
    if dataset is not None:
        voxels = window * math.prod(roi)
        items = itertools.count()
        data = _timed(lambda: dataset[next(items) % len(dataset)], device, repeats + 1) / voxels
    return StepTime(rate=macs / max(seconds - fixed, 1e-9), fixed=fixed, data=data)


def calibrate_memory(plan: Plan, device: torch.device, case: CaseSize | None,
                     meter: Any = None) -> ProcessConstants | None:
    """On CUDA, the process model's constants measured on ``device`` for ``plan`` (None on
    CPU, where the fitted :data:`~clstm4d.engine.planning.process.PROCESS_CONSTANTS` hold):
    two training steps of the planned model at batch 1, then one validation pass as ``train``
    runs it (the :class:`~clstm4d.engine.inference.predictor.Predictor` with the plan's
    predict settings) on a random sequence the size of ``case`` (the largest validation case
    at the plan's spacing; None: no validation), the cache released before and after as in
    ``train``. The peak reserve of each phase and the device's context (``meter``: a
    :class:`~clstm4d.engine.run.runtime.ReserveMeter` by default) give
    :func:`~clstm4d.engine.planning.process.measured_constants`."""
    if meter is None:
        if device.type != "cuda":
            return None
        meter = ReserveMeter(device)
    spec = {k: v for k, v in plan.model_config().items() if k != "recompute"}
    estimate = estimate_process(spec, plan.roi, plan.window, 1, plan.precision, plan.recompute,
                                device="cuda", predict={"roi": plan.roi},
                                data=DataSizes([], [] if case is None else [case]))
    net, _, step = _training_step(spec, plan.recompute, plan.precision, plan.window, plan.roi,
                                  device)
    meter.start()
    for _ in range(2):
        step()
    del step  # and the batch it holds
    step_peak = meter.peak()
    validation_peak = None
    if case is not None:
        meter.start()
        run = SavedRun(Config.from_dict({"predict": {"roi": list(plan.roi)}}), ModelSpec.of(net))
        image = np.random.default_rng(0).random((case.frames, case.channels, *case.shape),
                                                dtype=np.float32)
        Predictor(net, run, device=device, amp="none").predict_array(image, name="calibration")
        validation_peak = meter.peak()
    return measured_constants(estimate, step_peak, validation_peak, meter.context())


def _training_step(model_config: dict[str, Any], recompute: bool, precision: str, frames: int,
                   roi: Sequence[int], device: torch.device):
    """The model of ``model_config`` on ``device`` (seeded), its AdamW, and a function that
    takes one training step of it on a random batch of 1 x ``frames`` x ``roi``."""
    cfg = dict(model_config)
    torch.manual_seed(0)
    net = create(cfg.pop("name"), **{**cfg, "recompute": recompute}).to(device)
    optimizer = torch.optim.AdamW(param_groups(net, 1e-4), lr=1e-4)
    dtype = amp_dtype(device, {"fp32": "none"}.get(precision, precision))
    x = torch.randn(1, frames, net.config["in_channels"], *roi, device=device)
    y = torch.randint(0, net.config["out_channels"], (1, frames, *roi), device=device)

    def step():
        training_step(net, optimizer, SequenceLoss(), x, y, device=device, amp_dtype=dtype)

    return net, optimizer, step


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call (two on CUDA,
    whose first calls also load kernels and choose convolution algorithms)."""
    times = []
    warm = 2 if device.type == "cuda" else 1
    for i in range(repeats + warm):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def parse_shape(text: str) -> tuple[int, list[int]]:
    """``"T,D,H,W"`` (or ``"T,H,W"``) -> ``(frames, spatial shape)``, arrays' axis order."""
    try:
        values = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) not in (2, 3, 4) or min(values, default=0) < 1:
        raise ConfigError(f"--shape must be T,D,H,W (or T,H,W): frames then the spatial size "
                         f"per axis, e.g. 20,128,128,96; got {text!r}")
    return values[0], values[1:]


def run_plan(*, memory: str | int | None = None, datalist: str | None = None,
             shape: str | None = None, model: str = "tiny", out: str | os.PathLike | None = None,
             device: str = "auto", precision: str = "auto", min_window: int = MIN_WINDOW,
             max_batch: int = MAX_BATCH, measure_time: bool = True,
             time_per_step: float | None = None, recompute: bool | None = None,
             say: Any = None) -> tuple[Plan, list[Path]]:
    """What ``clstm4d plan`` does: fingerprint the datalist (or take ``shape``), plan for the
    memory budget (default: what the training device has free), calibrate the time of the
    real step and data pipeline and plan again with it (the batch that trains an epoch
    fastest, within ``time_per_step`` seconds), and write the plan YAML (plus
    ``fingerprint.json`` beside it).

    Returns:
        ``(plan, files written)``.
    """
    say = say or (lambda message: None)
    if (datalist is None) == (shape is None):
        raise UserError("give --datalist (plan from the data) or --shape T,D,H,W "
                        "(plan for a sequence size without data), not both or neither")
    if time_per_step is not None and (not measure_time or time_per_step <= 0):
        raise UserError(f"--time-per-step must be a positive number of seconds and needs the "
                        f"time calibration (not --no-time), got {time_per_step!r}")
    if memory is not None and not measure_time and device != "auto":
        dev = torch.device(device)  # planning for a device this machine need not have
    else:
        dev = resolve_device(device)
    budget = available_memory(dev) if memory is None else parse_memory(memory)
    if memory is None:
        say(f"budget: {human_bytes(budget)} free on {dev} (set --memory to plan for another)")
    fp = None
    if datalist is not None:
        fp = fingerprint(datalist, progress=lambda i, n, name: say(f"fingerprint: {i}/{n} {name}"))
    options = {"model": model, "device": dev.type, "precision": precision,
               "min_window": min_window, "max_batch": max_batch, "recompute": recompute}
    plan = _plan(fp, shape, budget, options)
    if measure_time:
        say("timing a short calibration of the training step and its data ...")
        timer = calibrate_step_time(plan.model_config(), plan.roi, plan.window, plan.precision,
                                    plan.recompute, dev, dataset=_calibration_data(fp, plan))
        constants = calibrate_memory(plan, dev, _validation_case(fp, shape, plan))
        if constants is not None:
            say(f"memory measured on {dev}: context {human_bytes(constants.runtime)}, "
                f"reserve x{constants.scale:.2f} (step) and x{constants.validation_scale:.2f} "
                f"(validation) of what the model counts")
        plan = _plan(fp, shape, budget, {**options, "timer": timer, "constants": constants,
                                         "time_per_step": time_per_step})
    return plan, _write_plan(plan, fp, out)


def _plan(fp, shape: str | None, budget: int, options: dict[str, Any]) -> Plan:
    """The plan for a fingerprint, or for a ``--shape`` (one training and one validation
    sequence of that size)."""
    if fp is not None:
        return plan_from_fingerprint(fp, budget, **options)
    frames, spatial = parse_shape(shape)
    case = CaseSize(frames, 1, tuple(spatial), tuple(spatial))
    plan = make_plan(budget, median_shape=spatial, median_frames=frames,
                     data=DataSizes([case], [case]), **options)
    plan.notes.append("the process is planned as holding one training and one validation "
                      "sequence of this size")
    return plan


def _validation_case(fp, shape: str | None, plan: Plan) -> CaseSize | None:
    """The largest validation sequence at the plan's spacing (``--shape``: that size)."""
    if fp is None:
        frames, spatial = parse_shape(shape)
        return CaseSize(frames, 1, tuple(spatial))
    cases = [CaseSize(c.frames, c.channels, tuple(target_shape(c.shape, c.spacing, plan.spacing)
                                                 if plan.spacing else c.shape))
             for c in fp.validation]
    return max(cases, key=lambda c: c.frames * c.channels * c.voxels, default=None)


def _calibration_data(fp, plan: Plan):
    """Patches of the plan's size from the first training case, sampled as ``train`` samples
    them (augmentation, and frame degradation for models with memory); None without data."""
    if fp is None:
        return None
    from clstm4d.data import PatchDataset, load_case, load_datalist, resample_case
    from clstm4d.engine.run.config import ModelSpec
    from clstm4d.engine.training.build import resolve_degrade

    case = load_case(load_datalist(fp.datalist, require="training").training[0])
    if plan.spacing is not None:
        case = resample_case(case, plan.spacing)
    spec = ModelSpec.of(meta_model(plan.model_config(), plan.recompute))
    return PatchDataset([case], window=plan.window, roi=plan.roi, foreground_prob=0.5,
                        augment=True, degrade=resolve_degrade("auto", spec),
                        samples_per_case=64)


def _write_plan(plan: Plan, fp, out: str | os.PathLike | None) -> list[Path]:
    """The plan YAML (its table as a comment) and ``fingerprint.json`` beside it."""
    import yaml

    if out is None:
        return []
    out = Path(out)
    header = ["clstm4d plan: train with `clstm4d train --config " + out.name + "`", ""]
    header += plan.table().splitlines()
    text = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header)
    text += yaml.safe_dump(plan.config(None if fp is None else fp.datalist),
                           sort_keys=False, default_flow_style=None)
    atomic_write_text(out, text)
    written = [out]
    if fp is not None:
        fp_path = out.parent / "fingerprint.json"
        atomic_write_text(fp_path, json.dumps({**fp.to_dict(), "plan": plan.to_dict()},
                                              indent=1))
        written.append(fp_path)
    return written


def capacity_lines(plan: Plan, model: str, shape: str) -> list[str]:
    """The ``--shape`` table: the largest patch per window that fits the plan's budget."""
    frames = parse_shape(shape)[0]
    lines = [f"largest patch per window (batch 1, {plan.precision}, "
             f"{human_bytes(plan.budget)} with the margin left free):"]
    for row in capacity(plan.budget, model, frames, plan.median_shape, device=plan.device,
                        precision=plan.precision):
        roi = " x ".join(map(str, row["roi"])) if row["roi"] else "does not fit"
        extra = f" ({human_bytes(row['predicted_bytes'])})" if row["roi"] else ""
        lines.append(f"  window {row['window']:>3}, recompute "
                     f"{'on ' if row['recompute'] else 'off'}: {roi}{extra}")
    return lines
