"""The train-time memory guard: the process model's estimate of this run (runtime, data,
training step, validation) against its budget, checked before the first step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from clstm4d._common import human_bytes, per_axis
from clstm4d.engine.planning.memory import MiB, parse_memory
from clstm4d.engine.planning.planner import fmt_shape
from clstm4d.engine.planning.process import (
    CaseSize,
    DataSizes,
    ProcessConstants,
    ProcessEstimate,
    estimate_process,
)
from clstm4d.engine.planning.topology import check_strides_for_roi
from clstm4d.engine.run.runtime import amp_dtype, available_memory, precision_of, process_memory
from clstm4d.errors import UserError

__all__ = ["check_training_memory", "data_sizes", "first_step_memory"]


def data_sizes(cases: Sequence[Any], validation: Sequence[Any] = (),
               spacing: Any = None) -> DataSizes:
    """The :class:`DataSizes` of loaded cases (training cases at the model's spacing,
    validation cases as read; ``spacing``: the model's voxel size, None: their own grid)."""
    from clstm4d.data import target_shape

    def size(c, read: bool) -> CaseSize:
        t, ch, *s = c.image.shape
        shape = tuple(s)
        if read and spacing is not None and c.geometry is not None:
            shape = target_shape(s, c.geometry.spacing, spacing)
        return CaseSize(int(t), int(ch), shape, tuple(s) if read else None)

    return DataSizes([size(c, False) for c in cases], [size(c, True) for c in validation])


def check_training_memory(cfg: Any, run: Any, cases: Sequence[Any], device: Any, *,
                          force: bool = False, budget: int | None = None,
                          validation: Sequence[Any] = ()) -> ProcessEstimate:
    """The train-time guard: the process model's estimate of this run against its budget:
    ``train.memory`` (the budget it was planned for) or, when less or unset, what ``device``
    can give this process (its free memory plus what the process holds already). Stops with
    one line (what was asked, the estimate by component, the budget and what to change)
    unless ``force``.

    Args:
        cfg: the :class:`~clstm4d.engine.run.config.Config` of the run.
        run: its resolved :class:`~clstm4d.engine.run.config.SavedRun` (the model's full config).
        cases: the training cases (their shapes stand in when ``data.roi`` is ``None``).
        device: the training device; budget: bytes (default: see above).
        validation: the validation cases (as read).

    Returns:
        The :class:`ProcessEstimate` (its ``total`` is logged next to the measured peak).

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
    predict = {"roi": cfg.predict.roi, "chunk": cfg.predict.chunk}
    constants = None if cfg.train.memory_model is None else \
        ProcessConstants.from_config(cfg.train.memory_model, device.type)
    est = estimate_process(spec, roi, int(window), int(cfg.data.batch_size), precision, None,
                           device=device.type, predict=predict, constants=constants,
                           data=data_sizes(cases, validation, cfg.data.spacing))
    planned = None if cfg.train.memory is None else parse_memory(cfg.train.memory)
    if budget is None:
        budget = available_memory(device) + process_memory(device, peak=False)
        if planned is not None:
            budget = min(budget, planned)
    if est.total > budget and not force:
        what = "its budget (train.memory)" if planned == budget else f"{device}"
        raise UserError(
            f"this run would not fit: model '{spec.name}' with roi {fmt_shape(roi)}, window "
            f"{window}, batch {cfg.data.batch_size}, {precision}, recompute "
            f"{'on' if spec.options.get('recompute') else 'off'} needs about "
            f"{human_bytes(est.total)} ({est.describe()}), and {what} has "
            f"{human_bytes(budget)}; run `clstm4d plan --datalist {cfg.data.datalist} --memory "
            f"{human_bytes(budget, sep='')}` or lower data.roi, data.window or data.batch_size "
            f"(or set train.recompute), or pass --force to start anyway")
    return est


def first_step_memory(measured_bytes: int, predicted_bytes: int) -> dict[str, float]:
    """The metrics of the process's memory: ``peak_mb`` (measured:
    :func:`~clstm4d.engine.run.runtime.process_memory`) next to ``predicted_peak_mb`` (the
    process model's estimate), in MiB."""
    return {"peak_mb": round(measured_bytes / MiB, 1),
            "predicted_peak_mb": round(predicted_bytes / MiB, 1)}
