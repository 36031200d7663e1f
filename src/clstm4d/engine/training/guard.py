"""The train-time memory guard: the memory model's estimate of one step of a run against
what the device has free, checked before the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clstm4d._common import human_bytes, per_axis
from clstm4d.engine.planning.memory import MemoryEstimate, MiB, memory_breakdown
from clstm4d.engine.planning.planner import fmt_shape
from clstm4d.engine.planning.topology import check_strides_for_roi
from clstm4d.engine.run.runtime import amp_dtype, available_memory, precision_of
from clstm4d.errors import UserError

__all__ = ["check_training_memory", "first_step_memory"]


def check_training_memory(cfg: Any, run: Any, cases: Sequence[Any], device: Any, *,
                          force: bool = False, budget: int | None = None) -> MemoryEstimate:
    """The train-time guard: the memory model's estimate of one step of this run against
    what ``device`` has free. Stops with one line (what was asked, the estimate, the budget
    and what to change) unless ``force``.

    Args:
        cfg: the :class:`~clstm4d.engine.run.config.Config` of the run.
        run: its resolved :class:`~clstm4d.engine.run.config.SavedRun` (the model's full config).
        cases: the training cases (their shapes stand in when ``data.roi`` is ``None``).
        device: the training device; budget: bytes (default: :func:`available_memory`).

    Returns:
        The :class:`MemoryEstimate` (its ``total`` is logged next to the measured peak).

    Raises:
        UserError: the estimate exceeds the budget and ``force`` is false.
        ConfigError: ``model.strides`` pools an axis the patch has already reduced to
            :data:`MIN_POOLED_VOXELS` voxels.
    """
    device = torch.device(device)
    spec = run.model_spec
    d = spec.spatial_dims
    shapes = [c.image.shape[2:] for c in cases]
    if cfg.data.roi is None:
        roi = [max(int(s[a]) for s in shapes) for a in range(d)]
    else:
        roi = list(per_axis("data.roi", cfg.data.roi, d))
    window = cfg.data.window or max(c.image.shape[0] for c in cases)
    if cfg.train.tbptt is not None:  # activations of one chunk at a time
        window = min(int(window), cfg.train.tbptt)
    if cfg.model.strides is not None:
        check_strides_for_roi(spec.options.get("strides"), roi)
    precision = precision_of(amp_dtype(device, cfg.train.amp))
    est = memory_breakdown(spec, roi, int(window), int(cfg.data.batch_size),
                           precision, None, device=device.type)
    budget = available_memory(device) if budget is None else int(budget)
    if est.total > budget and not force:
        raise UserError(
            f"this run would not fit: one training step of model '{spec.name}' with roi "
            f"{fmt_shape(roi)}, window {window}, batch {cfg.data.batch_size}, {precision}, "
            f"recompute {'on' if spec.options.get('recompute') else 'off'} "
            f"needs about {human_bytes(est.total)}, and {device} has {human_bytes(budget)} "
            f"free; run `clstm4d plan --datalist {cfg.data.datalist} --memory "
            f"{human_bytes(budget, sep='')}` or lower data.roi, data.window or data.batch_size (or "
            f"set train.recompute), or pass --force to start anyway")
    return est


def first_step_memory(measured_bytes: int, predicted_bytes: int) -> dict[str, float]:
    """The metrics of the first step's memory: ``peak_mb`` (measured) next to
    ``predicted_peak_mb`` (the estimate), in MiB."""
    return {"peak_mb": round(measured_bytes / MiB, 1),
            "predicted_peak_mb": round(predicted_bytes / MiB, 1)}
