"""The time model of training: seconds per step and per validation pass, from a short
calibration of the real step on the training device (``clstm4d plan`` measures it:
:func:`~clstm4d.engine.apps.plan.calibrate_step_time`).

A step costs ``fixed + macs / rate + data * voxels``: a fixed part (the optimizer's update and
the step's bookkeeping, whatever the patch), the convolutions' multiply-accumulates
(:func:`~clstm4d.engine.planning.memory.step_macs`) at the measured rate, and the data
pipeline (patch sampling, augmentation, frame degradation) per sampled voxel of every frame.
Validation is the forward alone (a third of a step's MACs per voxel) over every sliding window
and chunk of the validation cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clstm4d._common import per_axis

from .memory import meta_model, step_macs
from .process import CaseSize

__all__ = ["StepTime", "epoch_seconds"]


@dataclass(frozen=True)
class StepTime:
    """A calibrated time model (see the module docstring).

    Attributes:
        rate: multiply-accumulates per second of a training step's convolutions.
        fixed: seconds of a step that do not depend on its size.
        data: seconds of the data pipeline per sampled voxel (all frames of a batch).
    """

    rate: float
    fixed: float
    data: float

    def step(self, model_config: Any, roi: Sequence[int], window: int, batch: int,
             recompute: bool | None) -> float:
        """Predicted seconds of one training step."""
        macs = step_macs(model_config, roi, window, batch, recompute)
        return self.fixed + macs / self.rate + self.data * batch * window * math.prod(roi)

    def validation(self, model_config: Any, cases: Sequence[CaseSize],
                   predict: dict[str, Any]) -> float:
        """Predicted seconds of one validation pass over ``cases`` (sliding windows of
        ``predict["roi"]`` with ``predict["overlap"]``, chunks of ``predict["chunk"]``)."""
        model = meta_model(model_config, None)
        d = getattr(model, "unet", model).spatial_dims
        total = 0.0
        for case in cases:
            roi = predict.get("roi")
            win = list(case.shape) if roi is None else [
                min(r, n) for r, n in zip(per_axis("roi", roi, d), case.shape, strict=True)]
            overlap = float(predict.get("overlap", 0.25))
            windows = math.prod(
                1 if w >= n else math.ceil((n - w) / max(1, int(w * (1 - overlap)))) + 1
                for w, n in zip(win, case.shape, strict=True))
            frames = case.frames if model.frames is None else \
                math.ceil(case.frames / model.frames) * model.frames
            forward = step_macs(model_config, win, frames if model.frames is None else
                                model.frames, 1, False) / 3
            chunks = 1 if model.frames is None else frames // model.frames
            total += windows * chunks * forward / self.rate
        return total


def epoch_seconds(seconds_per_step: float, roi: Sequence[int], window: int, batch: int) -> float:
    """Seconds per sampled voxel-frame: the time an epoch of data takes, up to its size."""
    return seconds_per_step / (batch * window * math.prod(roi))
