"""The planner: the largest patch, window and batch whose predicted peak fits a memory
budget, with the strides, kernels, recomputation and precision that go with them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clstm4d._common import human_bytes
from clstm4d.data import target_shape
from clstm4d.engine.run.config import TrainConfig
from clstm4d.errors import ConfigError, UserError
from clstm4d.models import TimeAsChannelsUNet

from .fingerprint import Fingerprint
from .memory import PRECISIONS, GiB, MiB, meta_model
from .process import CaseSize, DataSizes, ProcessConstants, ProcessEstimate, estimate_process
from .timing import StepTime
from .topology import (
    MIN_POOLED_VOXELS,
    POOL_SPACING_RATIO,
    derive_strides_kernels,
    target_spacing,
)

__all__ = ["MARGIN", "MAX_BATCH", "MIN_ROI", "MIN_WINDOW", "Plan", "capacity", "fmt_shape",
           "make_plan", "plan_from_fingerprint"]

#: The fraction of the budget the planner leaves free: the memory model's largest measured
#: under-prediction (9% on CPU, a narrow 2D model; docs/benchmarks.md), allocator
#: fragmentation, and what a GPU (not measured yet) adds.
MARGIN = 0.15
#: Frames per training window the planner starts from (before growing the window).
MIN_WINDOW = 4
#: Largest batch the planner proposes.
MAX_BATCH = 8
#: The smallest patch edge (voxels) the planner considers sensible.
MIN_ROI = 16


@dataclass
class Plan:
    """What the planner chose (see :func:`make_plan`); :meth:`config` is the YAML."""

    model: str
    spatial_dims: int
    in_channels: int
    out_channels: int
    roi: list[int]
    window: int
    batch: int
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    recompute: bool
    precision: str
    device: str
    budget: int
    predicted: int
    spacing: list[float] | None = None
    spacing_rule: str = ""
    median_shape: list[int] = field(default_factory=list)
    median_frames: int = 0
    step_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    validation_seconds: float | None = None
    run_seconds: float | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    memory_model: dict[str, Any] | None = None  # constants measured on the device

    @property
    def share(self) -> float:
        return self.predicted / self.budget

    def model_config(self) -> dict[str, Any]:
        """``create_model`` keyword arguments (with ``name``) of the planned model."""
        return {"name": self.model, "spatial_dims": self.spatial_dims,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "strides": self.strides, "kernel_sizes": self.kernel_sizes,
                "recompute": self.recompute}

    def config(self, datalist: str | None = None) -> dict[str, Any]:
        """The configuration ``clstm4d train --config`` uses as is."""
        amp = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        return {
            "model": {"name": self.model, "strides": self.strides,
                      "kernel_sizes": self.kernel_sizes},
            "data": {"datalist": datalist, "spacing": self.spacing, "roi": list(self.roi),
                     "window": self.window, "batch_size": self.batch},
            "train": {"amp": amp, "recompute": self.recompute,
                      "memory": f"{max(1, self.budget // MiB)}MB",
                      **({"memory_model": dict(self.memory_model)} if self.memory_model
                         else {})},
            "predict": {"roi": list(self.roi)},  # windows of the training patch
        }

    def rows(self) -> list[tuple[str, str]]:
        time = "not measured" if self.step_seconds is None else (
            f"{self.step_seconds:.2f} s per step (calibrated on the real step and data); "
            f"the run: {_fmt_seconds(self.run_seconds)} ({TrainConfig.steps} steps, the "
            f"default train.steps, and {self.validation_seconds:.1f} s of validation)")
        out = [("model", self.model),
               ("target spacing", "off (each case on its own grid)" if self.spacing is None
                else f"{fmt_shape(self.spacing)}  [{self.spacing_rule}]"),
               ("median shape / frames", f"{fmt_shape(self.median_shape)} / {self.median_frames}"),
               ("roi (patch)", fmt_shape(self.roi)),
               ("window (frames)", str(self.window)),
               ("batch", str(self.batch)),
               ("strides", str(self.strides)),
               ("kernel sizes", str(self.kernel_sizes)),
               ("recompute activations", "on" if self.recompute else "off"),
               ("precision", self.precision),
               ("predicted peak", f"{human_bytes(self.predicted)} (the train process: "
                                  f"{self._components()})"),
               ("budget", f"{human_bytes(self.budget)} ({self.device}); "
                          f"{100 * self.share:.0f}% used, margin {100 * MARGIN:.0f}%"),
               ("predicted step time", time)]
        return out

    def _components(self) -> str:
        m = self.memory
        if not m:
            return "?"
        parts = [("runtime", m["runtime"]), ("data", m["data"]), (m["phase"], m["peak"])]
        return ", ".join(f"{name} {human_bytes(b)}" for name, b in parts if b)

    def table(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "share": round(self.share, 4)}


def fmt_shape(values: Sequence[Any]) -> str:
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else (
        f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")


def _resolved_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    return precision


def make_plan(budget: int, *, model: str = "tiny", median_shape: Sequence[int],
              median_frames: int, spacing: Sequence[float] | None = None,
              spacing_rule: str = "", in_channels: int = 1, out_channels: int = 2,
              device: str = "cuda", precision: str = "auto", min_window: int = MIN_WINDOW,
              max_batch: int = MAX_BATCH, recompute: bool | None = None,
              data: DataSizes | None = None, runtime: int | None = None,
              timer: StepTime | None = None, time_per_step: float | None = None,
              constants: ProcessConstants | None = None) -> Plan:
    """Choose roi, window, batch, strides, kernels, recomputation and precision so that the
    predicted peak of the ``train`` process (:func:`~.process.estimate_process`: runtime,
    ``data``, the step, validation) stays within ``budget * (1 - MARGIN)``, and (with a
    calibrated ``timer``) a step within ``time_per_step`` seconds.

    Order: the largest roi first (up to ``median_shape``, never beyond it, shrinking the
    physically longest axis), with ``min(min_window, median_frames)`` frames and batch 1; then
    the window up to ``median_frames``; then the batch up to ``max_batch``: with a ``timer``
    only while a larger batch shortens the time per epoch of data by 10% or more (its fixed
    cost per step shared), without one while it fits. Strides and kernels follow the roi and
    ``spacing`` (:func:`derive_strides_kernels`). Recomputation is used only when it buys a
    larger roi or window, not for a larger batch (``recompute`` forces it on or off).

    Raises:
        UserError: when even the smallest sensible plan does not fit (saying what it needs).
    """
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    search = _Search(budget, model, median_shape, median_frames, spacing, in_channels,
                     out_channels, device, _resolved_precision(precision, device), min_window,
                     {"data": data, "runtime": runtime, "constants": constants})
    search.timer, search.time_limit = timer, time_per_step
    options = [False, True] if recompute is None else [bool(recompute)]
    found = {ckpt: search.run(ckpt, max_batch) for ckpt in options}
    found = {k: v for k, v in found.items() if v is not None}
    if not found:
        raise search.too_small(True if recompute is None else bool(recompute))

    def key(ckpt):  # recomputation (slower) only for a larger roi or window
        roi, window, batch = found[ckpt]
        return (math.prod(roi), window, not ckpt, batch)

    ckpt = max(found, key=key)
    roi, window, batch = found[ckpt]
    strides, kernels = search.layout(roi)
    notes = []
    if list(roi) != search.median_shape:
        notes.append(f"the median case ({fmt_shape(median_shape)}) does not fit whole: "
                     f"patches of {fmt_shape(roi)} are cut from it")
    return Plan(model=model, spatial_dims=search.d, in_channels=in_channels,
                out_channels=out_channels, roi=list(roi), window=window, batch=batch,
                strides=strides, kernel_sizes=kernels, recompute=ckpt,
                precision=search.precision, device=device, budget=int(budget),
                predicted=search.cost(roi, window, batch, ckpt),
                memory=search.estimate(roi, window, batch, ckpt).to_dict(),
                spacing=None if spacing is None else list(search.spacing),
                spacing_rule=spacing_rule, median_shape=[int(n) for n in median_shape],
                median_frames=int(median_frames), notes=notes,
                memory_model=None if constants is None else constants.to_config(device),
                **search.times(roi, window, batch, ckpt))


class _Search:
    """The planner's search for one model and dataset shape: the cost of a candidate (roi,
    window, batch, recomputation) and the roi -> window -> batch search under the budget."""

    def __init__(self, budget, model, median_shape, median_frames, spacing, in_channels,
                 out_channels, device, precision, min_window, process):
        self.process = process  # estimate_process's data and runtime
        self.timer: StepTime | None = None
        self.time_limit: float | None = None
        self.budget, self.model, self.device, self.precision = budget, model, device, precision
        self.median_shape = [int(n) for n in median_shape]
        self.d = d = len(median_shape)
        self.spacing = [1.0] * d if spacing is None else [float(v) for v in spacing]
        self.sizes = {"spatial_dims": d, "in_channels": in_channels,
                      "out_channels": out_channels}
        base = meta_model({"name": model, **self.sizes}, None)
        self.tac = isinstance(base, TimeAsChannelsUNet)
        self.levels = len((base.unet if self.tac else base).channels)
        self.limit = budget * (1 - MARGIN)
        self.frames_cap = max(1, int(median_frames))
        if self.tac and base.frames > self.frames_cap:
            raise UserError(f"model '{model}' takes windows of exactly {base.frames} frames, "
                            f"but the median sequence has {self.frames_cap}: choose a model "
                            f"without a fixed window (e.g. tiny)")
        self.w0 = base.frames if self.tac else max(1, min(min_window, self.frames_cap))
        self.floor = [min(n, MIN_ROI) for n in self.median_shape]

    def layout(self, roi):
        return derive_strides_kernels(self.spacing, roi, self.levels)

    def estimate(self, roi, window, batch, ckpt) -> ProcessEstimate:
        strides, kernels = self.layout(roi)
        mc = {"name": self.model, **self.sizes, "strides": strides, "kernel_sizes": kernels}
        return estimate_process(mc, roi, window, batch, self.precision, ckpt,
                                device=self.device, predict={"roi": roi}, **self.process)

    def cost(self, roi, window, batch, ckpt) -> int:
        return self.estimate(roi, window, batch, ckpt).total

    def seconds(self, roi, window, batch, ckpt) -> float:
        strides, kernels = self.layout(roi)
        mc = {"name": self.model, **self.sizes, "strides": strides, "kernel_sizes": kernels}
        return self.timer.step(mc, roi, window, batch, ckpt)

    def fits(self, roi, window, batch, ckpt) -> bool:
        """Within the memory budget (with the margin) and the time per step."""
        if self.cost(roi, window, batch, ckpt) > self.limit:
            return False
        return self.time_limit is None or self.timer is None or \
            self.seconds(roi, window, batch, ckpt) <= self.time_limit

    def faster(self, roi, window, batch, ckpt) -> bool:
        """Whether batch + 1 trains an epoch of data 10% faster than batch (always without
        a timer: then the largest batch that fits)."""
        if self.timer is None:
            return True
        now = self.seconds(roi, window, batch, ckpt) / batch
        return self.seconds(roi, window, batch + 1, ckpt) / (batch + 1) <= 0.9 * now

    def times(self, roi, window, batch, ckpt) -> dict[str, float | None]:
        """The plan's predicted seconds: a step, a validation pass, the whole run (the
        default train.steps and one validation at the end)."""
        if self.timer is None:
            return {}
        strides, kernels = self.layout(roi)
        mc = {"name": self.model, **self.sizes, "strides": strides, "kernel_sizes": kernels}
        step = self.timer.step(mc, roi, window, batch, ckpt)
        data = self.process["data"]
        val = 0.0 if data is None else self.timer.validation(mc, data.validation, {"roi": roi})
        return {"step_seconds": step, "validation_seconds": val,
                "run_seconds": TrainConfig.steps * step + val}

    def multiples(self, roi) -> list[int]:
        strides, _ = self.layout(roi)
        return [math.prod(s[a] for s in strides) for a in range(self.d)]

    def run(self, ckpt: bool, max_batch: int) -> tuple[list[int], int, int] | None:
        """The largest roi, then window, then batch that fit (None: not even the floor).

        The roi starts at the median image (never larger along any axis: the network pads
        a patch to its strides' multiple itself) and shrinks to multiples of the strides."""
        roi = list(self.median_shape)
        while not self.fits(roi, self.w0, 1, ckpt):
            m = self.multiples(roi)
            # shrink the physically longest axis that can still shrink
            axes = [a for a in range(self.d) if roi[a] > self.floor[a]]
            if not axes:
                return None
            a = max(axes, key=lambda i: roi[i] * self.spacing[i])
            smaller = roi[a] - max(m[a], int(0.1 * roi[a]) // m[a] * m[a])
            roi[a] = max(self.floor[a], smaller // m[a] * m[a] if smaller >= m[a] else smaller)
        window = self.w0
        if not self.tac:
            while window < self.frames_cap and self.fits(roi, window + 1, 1, ckpt):
                window += 1
        batch = 1
        while batch < max_batch and self.fits(roi, window, batch + 1, ckpt) and \
                self.faster(roi, window, batch, ckpt):
            batch += 1
        return roi, window, batch

    def too_small(self, ckpt: bool) -> UserError:
        window = self.w0  # the smallest candidate the search tries
        need = self.cost(self.floor, window, 1, ckpt)
        if need <= self.limit and self.time_limit is not None:
            return UserError(
                f"--time-per-step {self.time_limit:g} s is too short: the smallest plan for "
                f"model '{self.model}' (roi {fmt_shape(self.floor)}, window {window}, batch 1) "
                f"takes about {self.seconds(self.floor, window, 1, ckpt):.2f} s per step")
        need = need / (1 - MARGIN)
        return UserError(
            f"--memory {human_bytes(self.budget)} is too small: the smallest plan for model "
            f"'{self.model}' (roi {fmt_shape(self.floor)}, window {window}, batch 1, "
            f"recomputation, {self.precision}) needs about {human_bytes(need)} with the "
            f"{100 * MARGIN:.0f}% margin: give --memory "
            f"{human_bytes(need, round_up=True, sep='')} or more")


def plan_from_fingerprint(fp: Fingerprint, budget: int, *, model: str = "tiny",
                          device: str = "cuda", precision: str = "auto",
                          min_window: int = MIN_WINDOW, max_batch: int = MAX_BATCH,
                          timer: StepTime | None = None, time_per_step: float | None = None,
                          recompute: bool | None = None,
                          constants: ProcessConstants | None = None) -> Plan:
    """:func:`make_plan` for a dataset: the target spacing from the cases' spacings, the
    median shape after resampling to it, the median frame count, channels and classes."""
    spacings = [c.spacing for c in fp.cases]
    target = target_spacing(spacings)
    shapes = [target_shape(c.shape, c.spacing, target.spacing) for c in fp.cases]
    _check_cases_fit(fp, shapes, target.spacing, model)
    median = [int(np.median([s[a] for s in shapes])) for a in range(len(shapes[0]))]
    frames = int(np.median([c.frames for c in fp.cases]))
    classes = fp.num_classes or 1 + max(
        (int(k) for c in fp.cases for k in c.class_voxels), default=1)
    data = DataSizes(
        [CaseSize(c.frames, c.channels, tuple(s))
         for c, s in zip(fp.cases, shapes, strict=True)],
        [CaseSize(c.frames, c.channels, target_shape(c.shape, c.spacing, target.spacing),
                  tuple(c.shape)) for c in fp.validation])
    plan = make_plan(budget, model=model, median_shape=median, median_frames=frames,
                     spacing=target.spacing, spacing_rule=target.describe(),
                     in_channels=fp.channels, out_channels=max(2, classes),
                     device=device, precision=precision, min_window=min_window,
                     max_batch=max_batch, data=data, timer=timer,
                     time_per_step=time_per_step, recompute=recompute, constants=constants)
    plan.notes.extend(fp.notes)
    if not fp.validation:
        few = len(fp.cases) <= 2
        plan.notes.append(
            "no validation: the datalist lists no validation cases, so train reports no "
            "val_dice" + (f" (with {len(fp.cases)} training sequence"
                          f"{'s' if len(fp.cases) > 1 else ''} none can be held out; "
                          f"validating on a training case would only measure fit)" if few
                          else "; move a case to 'validation' to validate"))
    return plan


def _check_cases_fit(fp: Fingerprint, shapes: Sequence[Sequence[int]],
                     spacing: Sequence[float], model: str) -> None:
    """Refuse a dataset none of whose cases (resampled to ``spacing``) is large enough for
    every pooling of ``model`` along its finest axes, naming the smallest case and the size
    needed."""
    base = meta_model({"name": model, "spatial_dims": fp.spatial_dims}, None)
    levels = len(getattr(base, "unet", base).channels)
    need = MIN_POOLED_VOXELS * 2 ** (levels - 1)
    finest = min(spacing)
    axes = [a for a, h in enumerate(spacing) if h <= POOL_SPACING_RATIO * finest]
    if any(all(s[a] >= need for a in axes) for s in shapes):
        return
    i = min(range(len(shapes)), key=lambda j: math.prod(shapes[j]))
    raise UserError(
        f"no training case is large enough for model '{model}' ({levels - 1} poolings): it "
        f"needs at least {need} voxels along axes {axes} at spacing {fmt_shape(spacing)}; "
        f"the smallest case '{fp.cases[i].name}' is {fmt_shape(shapes[i])} after resampling "
        f"(largest: {fmt_shape(max(shapes, key=math.prod))})")


def capacity(budget: int, model: str, frames: int, spatial: Sequence[int], *,
             device: str = "cuda", precision: str = "auto",
             windows: Sequence[int] = (1, 2, 5, 8, 16, 32)) -> list[dict[str, Any]]:
    """For each window (up to ``frames``) and recomputation off/on: the largest patch (the
    planner's roi search, batch 1) that fits ``budget``; ``None`` where none does."""
    rows = []
    for ckpt in (False, True):
        for w in [w for w in windows if w <= frames]:
            try:
                p = make_plan(budget, model=model, median_shape=spatial, median_frames=w,
                              device=device, precision=precision, min_window=w, max_batch=1,
                              recompute=ckpt)
                rows.append({"recompute": ckpt, "window": w, "roi": p.roi,
                             "predicted_gib": round(p.predicted / GiB, 2),
                             "predicted_bytes": p.predicted})
            except UserError:
                rows.append({"recompute": ckpt, "window": w, "roi": None,
                             "predicted_gib": None, "predicted_bytes": None})
    return rows
