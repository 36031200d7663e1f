"""``clstm4d plan``: fingerprint the data (or take a shape), plan for a memory budget, time a
short calibration of the real training step, and write the plan as a config ``train`` uses.
"""

from __future__ import annotations

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
from clstm4d.engine.run.config import create
from clstm4d.engine.run.runtime import amp_dtype, available_memory, resolve_device
from clstm4d.engine.training.losses import SequenceLoss
from clstm4d.engine.training.optim import param_groups
from clstm4d.engine.training.step import training_step
from clstm4d.errors import ConfigError, UserError

__all__ = ["calibrate_step_seconds", "capacity_lines", "parse_shape", "run_plan"]


def calibrate_step_seconds(model_config: dict[str, Any], roi: Sequence[int], window: int,
                           batch: int, precision: str, recompute: bool, device: Any, *,
                           max_macs: float | None = None, repeats: int = 2) -> float:
    """Predicted seconds of one training step: time a few steps of the same model on
    ``device`` with batch 1 and a short window (2 frames) at the plan's patch (or, when that
    exceeds ``max_macs`` multiply-accumulates, 2e10 on CPU and 2e12 on CUDA, at a patch shrunk
    to no less than half of every axis), then scale by the ratio of convolution MACs
    (:func:`step_macs`: linear in batch and frames)."""
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if max_macs is None:
        max_macs = 2e12 if device.type == "cuda" else 2e10
    full = step_macs(model_config, roi, window, batch, recompute)
    model = meta_model(model_config, recompute)
    unet = getattr(model, "unet", model)
    d = unet.spatial_dims
    mult = [math.prod(s[a] for s in unet.strides) for a in range(d)]
    frames = window if hasattr(model, "frames") else min(window, 2)  # tac: its fixed window
    small = list(roi)
    macs = step_macs(model_config, small, frames, 1, recompute)
    if macs > max_macs:
        scale = max(0.5, (max_macs / macs) ** (1 / d))
        small = [max(m, int(r * scale) // m * m) for r, m in zip(roi, mult, strict=True)]
        macs = step_macs(model_config, small, frames, 1, recompute)
    cfg = dict(model_config)
    torch.manual_seed(0)
    net = create(cfg.pop("name"), **{**cfg, "recompute": recompute}).to(device)
    optimizer = torch.optim.AdamW(param_groups(net, 1e-4), lr=1e-4)
    loss_fn = SequenceLoss()
    dtype = amp_dtype(device, {"fp32": "none"}.get(precision, precision))
    k = net.config["out_channels"]
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        x = torch.randn(1, frames, net.config["in_channels"], *small, device=device)
        y = torch.randint(0, k, (1, frames, *small), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        training_step(net, optimizer, loss_fn, x, y, device=device, amp_dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * full / macs


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
             say: Any = None) -> tuple[Plan, list[Path]]:
    """What ``clstm4d plan`` does: fingerprint the datalist (or take ``shape``), plan for the
    memory budget (default: what the training device has free), time a short calibration,
    and write the plan YAML (plus ``fingerprint.json`` beside it).

    Returns:
        ``(plan, files written)``.
    """
    import yaml

    say = say or (lambda message: None)
    if (datalist is None) == (shape is None):
        raise UserError("give --datalist (plan from the data) or --shape T,D,H,W "
                        "(plan for a sequence size without data), not both or neither")
    if memory is not None and not measure_time and device != "auto":
        dev = torch.device(device)  # planning for a device this machine need not have
    else:
        dev = resolve_device(device)
    budget = available_memory(dev) if memory is None else parse_memory(memory)
    if memory is None:
        say(f"budget: {human_bytes(budget)} free on {dev} (set --memory to plan for another)")
    fp = None
    if datalist is not None:
        def progress(i, n, name):
            say(f"fingerprint: {i}/{n} {name}")

        fp = fingerprint(datalist, progress=progress)
        plan = plan_from_fingerprint(fp, budget, model=model, device=dev.type,
                                     precision=precision, min_window=min_window,
                                     max_batch=max_batch)
    else:
        frames, spatial = parse_shape(shape)
        plan = make_plan(budget, model=model, median_shape=spatial, median_frames=frames,
                         device=dev.type, precision=precision, min_window=min_window,
                         max_batch=max_batch)
    if measure_time:
        say("timing a short calibration step ...")
        plan.step_seconds = calibrate_step_seconds(
            plan.model_config(), plan.roi, plan.window, plan.batch, plan.precision,
            plan.recompute, dev)
    written: list[Path] = []
    if out is not None:
        out = Path(out)
        header = ["clstm4d plan: train with `clstm4d train --config " + out.name + "`", ""]
        header += plan.table().splitlines()
        text = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header)
        text += yaml.safe_dump(plan.config(None if fp is None else fp.datalist),
                               sort_keys=False, default_flow_style=None)
        atomic_write_text(out, text)
        written.append(out)
        if fp is not None:
            fp_path = out.parent / "fingerprint.json"
            atomic_write_text(fp_path, json.dumps({**fp.to_dict(), "plan": plan.to_dict()},
                                                  indent=1))
            written.append(fp_path)
    return plan, written


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
