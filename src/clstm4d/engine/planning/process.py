"""The memory model of the whole ``clstm4d train`` process, not of one step: what the
plan's table shows, what the planner fits to the budget and what the train-time guard checks.

Shape legend: ``t`` frames, ``c`` channels, ``k`` classes, ``*s`` spatial axes.

The process's peak is

    runtime + data + max(step, persistent + validation)

- **runtime**: what the process holds before its data: on CPU the resident memory of Python,
  torch, MONAI and clstm4d, their thread pools and the first convolution's kernels (measured,
  :data:`PROCESS_CONSTANTS`); on CUDA the context (driver, kernels) outside PyTorch's
  allocator;
- **data** (CPU only; on CUDA the data stay in host memory): the training cases as ``train``
  holds them (resampled to the plan's spacing: float32 image, int64 label, bool labelled
  frames) and the validation cases as read;
- **step**: one training step (:func:`~clstm4d.engine.planning.memory.memory_breakdown`: the
  parameters, AdamW's state, gradients, the saved activations and the workspace at its
  peak), the data pipeline's batch included;
- **validation**: while the parameters, AdamW's state and the last gradients stay alive, the
  :class:`~clstm4d.engine.inference.predictor.Predictor` on the largest validation case with
  the plan's predict settings (full precision): the case resampled and normalised, MONAI's
  sliding-window buffers for one chunk of frames, the forward of one window (no autograd:
  the skip connections and the largest few maps), and the probabilities resampled back.

On CPU ``train`` serves every allocation of 64 KiB or more with its own mapping
(:func:`~clstm4d.engine.run.runtime.return_freed_memory`), so that a freed tensor leaves the
resident set at once and the peak of the process is the peak of what is alive; the measured
number is the process's peak resident set (``VmHWM``). On CUDA the measured number is
``torch.cuda.max_memory_reserved`` plus the context. What the caching allocator reserves
beyond the live tensors depends on the shapes and could not be fitted from a few runs (five
H200 plans, docs/benchmarks.md), so a CUDA plan measures it: ``clstm4d plan`` runs the
planned step and one validation pass on the device
(:func:`~clstm4d.engine.apps.plan.calibrate_memory`), takes the factors of reserved over
modelled and the context (:func:`measured_constants`), plans with them and writes them into
the plan (``train.memory_model``) for ``train``'s guard; ``train`` releases the cache before
and after validation, as the measurement does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from clstm4d._common import per_axis
from clstm4d.errors import ConfigError

from .memory import MemoryEstimate, MiB, memory_breakdown, meta_model
from .topology import level_shapes

__all__ = ["PROCESS_CONSTANTS", "CaseSize", "DataSizes", "ProcessConstants", "ProcessEstimate",
           "estimate_process", "measured_constants"]


@dataclass(frozen=True)
class ProcessConstants:
    """The calibrated part of the process model.

    Attributes:
        runtime: bytes of the process before its data (see the module docstring).
        inference: the no-grad forward's workspace next to the skip connections, in units of
            the window's largest level map.
        scale: a factor on the step's peak (what the allocator keeps next to the live
            tensors).
        validation_scale: the same for validation. On CUDA the caching
            allocator reserves more than is alive, by a factor that depends on the shapes;
            ``clstm4d plan`` measures both factors on the device
            (:func:`~clstm4d.engine.apps.plan.calibrate_memory`) and writes them into the
            plan (``train.memory_model``), so that ``train`` predicts with them too.
    """

    runtime: int
    inference: float
    scale: float
    validation_scale: float

    def to_config(self, device: str) -> dict[str, Any]:
        """``train.memory_model`` as the plan writes it (MiB and plain factors)."""
        return {"device": device, "runtime_mb": round(self.runtime / MiB, 1),
                "step_scale": round(self.scale, 4),
                "validation_scale": round(self.validation_scale, 4)}

    @classmethod
    def from_config(cls, raw: dict[str, Any], device: str) -> ProcessConstants | None:
        """The constants of ``train.memory_model`` (:meth:`to_config`) when they were measured
        on a device of ``device``'s type, else None (the defaults apply).

        Raises:
            ConfigError: a key is missing or not a positive number."""
        kind = "cuda" if str(device).startswith("cuda") else "cpu"
        if str(raw.get("device", "")) != kind:
            return None
        values = {}
        for key in ("runtime_mb", "step_scale", "validation_scale"):
            v = raw.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or not math.isfinite(v):
                raise ConfigError(f"'train.memory_model.{key}' must be a positive number "
                                  f"(as `clstm4d plan` writes it), got {v!r}")
            values[key] = float(v)
        return cls(runtime=int(values["runtime_mb"] * MiB),
                   inference=PROCESS_CONSTANTS[kind].inference,
                   scale=values["step_scale"], validation_scale=values["validation_scale"])


#: CPU: the runtime as measured by two plans of 1 x 1 x 4 mm data (torch 2.13, MONAI 1.6);
#: ``benchmarks/bench_plan_cli.py`` refits both constants on a training split of its matrix
#: (452 MiB and 1.016 there; held-out ratios 0.99-1.01, docs/benchmarks.md). It depends on
#: the installed libraries. CUDA: the defaults when nothing was measured (``plan --no-time``,
#: a hand-written config): ``runtime`` a typical context; a plan made on the GPU measures both.
PROCESS_CONSTANTS = {
    "cpu": ProcessConstants(runtime=460 * MiB, inference=5.0, scale=1.0, validation_scale=1.0),
    "cuda": ProcessConstants(runtime=500 * MiB, inference=5.0, scale=1.0, validation_scale=1.0),
}


@dataclass(frozen=True)
class CaseSize:
    """One case as the process holds it: frames, channels, its shape at the model's spacing
    and (validation cases) the shape it was read at."""

    frames: int
    channels: int
    shape: tuple[int, ...]
    read_shape: tuple[int, ...] | None = None

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    def held_bytes(self, read: bool = False) -> int:
        """Image (float32), label (int64) and labelled flags as held in memory."""
        n = math.prod(self.read_shape if read and self.read_shape else self.shape)
        return self.frames * (n * (4 * self.channels + 8) + 1)


@dataclass
class DataSizes:
    """The cases a training process holds: the training cases at the model's spacing and
    the validation cases (read at their own grid, predicted at the model's)."""

    training: list[CaseSize]
    validation: list[CaseSize] = field(default_factory=list)

    @property
    def held(self) -> int:
        return sum(c.held_bytes() for c in self.training) + \
            sum(c.held_bytes(read=True) for c in self.validation)


@dataclass
class ProcessEstimate:
    """The predicted peak of a ``train`` process, by component (bytes); see the module
    docstring. ``phase``: ``"step"`` or ``"validation"``, whichever sets the peak."""

    total: int
    runtime: int
    data: int
    step: MemoryEstimate
    validation: int
    phase: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["step"] = self.step.total
        out["peak"] = self.total - self.runtime - self.data  # the step's or validation's
        return out

    def describe(self) -> str:
        """``"runtime 460 + data 12 + step 208 MiB"``: the components of the peak, in MiB."""
        parts = [("runtime", self.runtime), ("data", self.data),
                 (self.phase, self.total - self.runtime - self.data)]
        return " + ".join(f"{name} {b / MiB:.0f}" for name, b in parts if b) + " MiB"


def estimate_process(model_config: Any, roi: int | Sequence[int], window: int, batch: int,
                     precision: str = "fp32", recompute: bool | None = None, *,
                     device: str = "cuda", data: DataSizes | None = None,
                     predict: dict[str, Any] | None = None,
                     runtime: int | None = None,
                     constants: ProcessConstants | None = None) -> ProcessEstimate:
    """Predicted peak memory of a ``clstm4d train`` process (see the module docstring).

    Args:
        model_config, roi, window, batch, precision, recompute, device: as for
            :func:`~clstm4d.engine.planning.memory.estimate_memory`.
        data: the cases the process holds and validates on (None: none).
        predict: the validation's sliding-window settings (``roi``, ``chunk``;
            :class:`~clstm4d.engine.run.config.PredictConfig`'s keys); default: windows of
            ``roi``, chunks of 16 frames.
        runtime: bytes of the runtime (default: the constants').
        constants: the calibrated constants (default: :data:`PROCESS_CONSTANTS` of the
            device's type).
    """
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    const = constants or PROCESS_CONSTANTS[device]
    step = memory_breakdown(model_config, roi, window, batch, precision, recompute,
                            device=device)
    data = data or DataSizes([])
    predict = {"roi": roi, "chunk": 16, **(predict or {})}
    validation = max((_validation_bytes(model_config, case, predict, const.inference)
                      for case in data.validation), default=0)
    step_peak = const.scale * step.total
    val_peak = step.persistent + const.validation_scale * validation
    held = data.held if device == "cpu" else 0
    runtime = const.runtime if runtime is None else int(runtime)
    total = runtime + held + max(step_peak, val_peak)
    return ProcessEstimate(total=int(total), runtime=runtime, data=held, step=step,
                           validation=int(validation),
                           phase="step" if step_peak >= val_peak else "validation")


def _validation_bytes(model_config: Any, case: CaseSize, predict: dict[str, Any],
                      inference: float) -> int:
    """The Predictor's peak on one validation case (full precision, no autograd)."""
    model = meta_model(model_config, None)
    unet = getattr(model, "unet", model)
    d, k = unet.spatial_dims, unet.out_channels
    tc = case.frames if model.frames is None and not model.streamable else \
        min(case.frames, int(predict.get("chunk") or case.frames))
    if model.frames is not None:
        tc = model.frames
    roi = predict.get("roi")
    win = list(case.shape) if roi is None else \
        [min(r, n) for r, n in zip(per_axis("roi", roi, d), case.shape, strict=True)]
    folded = 1 if model.frames is not None else tc
    maps = [folded * c * math.prod(s)
            for c, s in zip(unet.channels, level_shapes(win, unet.strides), strict=True)]
    forward = 4 * (sum(maps) + inference * max(maps))
    window_io = 4 * tc * math.prod(win) * (case.channels + 3 * k)  # input, logits, softmax
    padded = math.prod(max(n, w) for n, w in zip(case.shape, win, strict=True))
    sliding = 4 * tc * padded * (3 * k + 1)  # MONAI's output and count maps, the division
    prepared = 2 * 4 * case.frames * case.channels * case.voxels  # resampled, normalised
    read = math.prod(case.read_shape or case.shape)
    back = 4 * tc * k * read if case.read_shape and tuple(case.read_shape) != case.shape else 0
    return int(forward + window_io + sliding + prepared + back + case.frames * read)


def measured_constants(estimate: ProcessEstimate, step_peak: int, validation_peak: int | None,
                       context: int) -> ProcessConstants:
    """The CUDA constants from a measurement of the estimated configuration: ``step_peak``
    the caching allocator's peak reserve over a few training steps, ``validation_peak`` its
    peak over one validation pass after them (the reserve released in between, as ``train``
    does; None: not measured, the step's factor applies) and ``context`` the device's memory
    beyond the reserve. The factors are measured over modelled, so that the model's
    arithmetic carries them to the other plans of the search."""
    scale = step_peak / max(1, estimate.step.total)
    if validation_peak is None or estimate.validation <= 0:
        val_scale = scale
    else:
        val_scale = max(1, validation_peak - estimate.step.persistent) / estimate.validation
    return ProcessConstants(runtime=int(context), inference=PROCESS_CONSTANTS["cuda"].inference,
                            scale=float(scale), validation_scale=float(val_scale))
