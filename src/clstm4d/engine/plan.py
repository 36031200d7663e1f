"""Plan before training: a dataset fingerprint, the target spacing, per-axis strides and kernels,
a memory model of one training step, and a planner that says what fits.

Shape legend: ``n`` batch, ``t`` frames (the temporal window), ``c`` channels, ``k`` classes,
``*s`` spatial axes (the arrays' axis order everywhere: spacing, roi, strides and kernels).

The memory model (:func:`estimate_memory`) counts, for one training step of the UNets in
:mod:`clstm4d.models`, what PyTorch keeps alive at the peak:

- **persistent**: parameters, AdamW's two moment buffers and the gradients (float32: 16 bytes
  per parameter; the loop keeps a step's gradients until the next forward is done);
- **activations** saved for backward, level by level: every per-frame stage (``n * t`` frames
  folded into the batch) keeps, per element of its output, the normalisation's input and the
  activation's output (8 bytes in float32), plus the pooled input and its int64 pooling indices
  (encoder) or the concatenated input (decoder); the recurrence keeps its activated gates
  (float32), its output and its cell state; the loss keeps a few logit-sized float32 tensors.
  A checkpointed level (``activation_checkpointing``) keeps only its stages' outputs and
  recomputes the rest, one piece of the folded batch at a time, during backward. Under
  bf16/fp16 autocast the stages are stored in 2 bytes (autocast's op lists differ: CPU runs
  ``max_pool3d`` in float32, CUDA ``group_norm``, and both are modelled) and the per-frame
  convolution weights get low-precision copies;
- **the peak** above those, the largest of: the end of the forward (the loss's temporaries,
  the last step's gradients still alive); the start of the backward (those gradients freed;
  the first activation gradients and the largest operation's workspace, or the recomputed
  piece of a checkpointed stage with the gradient of its level's map); the recurrence's
  backward through time (what the encoder side still holds, the gradients computed so far and
  its batched weight-gradient temporaries); the optimizer step's temporaries.

The structural counts match what autograd saves (the tests compare them with saved-tensor
hooks); the workspace constants (:data:`CONSTANTS`) are calibrated from measured peaks
(``benchmarks/bench_plan.py --calibrate``, documented in docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MemoryEstimate",
    "estimate_memory",
    "memory_breakdown",
    "parse_memory",
    "training_step",
]

MiB = 2**20
GiB = 2**30

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class MemoryConstants:
    """The calibrated part of the memory model (see the module docstring).

    Attributes:
        forward: temporaries at the end of the forward (the loss's), in units of the
            largest level's per-stage map (``n * t * c_l * prod(s_l)`` elements in the
            activation dtype).
        transient: the first activation gradients and the largest operation's workspace at
            the start of the backward, in the same units.
        recompute: a checkpointed stage's recomputed piece while it is differentiated, as a
            multiple of the piece's activations plus the gradient of the level's whole map.
        recurrence: the recurrence's backward through time, in units of its level's map
            (plus ``recurrence_weights`` float32 copies of its weights: the batched
            weight-gradient temporaries); the largest recurrent level counts.
        optimizer: temporaries of the optimizer step, in units of the largest parameter tensor
            (AdamW's per-tensor path on CPU) or of all parameters (its multi-tensor path on CUDA).
        fixed: bytes the first steps allocate for good regardless of size (library caches).
    """

    forward: float
    transient: float
    recompute: float
    recurrence: float
    recurrence_weights: float
    optimizer: float
    fixed: int


#: ``forward``, ``transient``, ``recompute`` and ``recurrence_weights``: least squares of the
#: log ratio over the configurations of ``benchmarks/bench_plan.py --calibrate`` (CPU, torch
#: 2.13; the table in docs/benchmarks.md). ``recurrence`` (two whole-sequence gradient maps)
#: and ``optimizer`` (AdamW's per-tensor path on CPU: up to two temporaries of the largest
#: tensor; its
#: multi-tensor path on CUDA: one float32 copy of all parameters) come from what the code
#: allocates: no measured configuration is bound by them. The CUDA entry reuses the CPU
#: activation constants (the same tensors are saved; the autocast rules differ and are
#: modelled); it has not been measured on a GPU.
CONSTANTS = {
    "cpu": MemoryConstants(forward=0.14, transient=2.28, recompute=1.13, recurrence=2.0,
                           recurrence_weights=2.43, optimizer=2.0, fixed=0),
    "cuda": MemoryConstants(forward=0.14, transient=2.28, recompute=1.13, recurrence=2.0,
                            recurrence_weights=2.43, optimizer=1.0, fixed=0),
}

#: Bytes the loss (Dice + cross-entropy on float32 logits) keeps per logit element: the
#: float32 logits, their softmax and log-softmax, and the one-hot labels.
LOSS_BYTES_PER_LOGIT = 16
_GATES = {"lstm": 4, "gru": 3}


@dataclass
class MemoryEstimate:
    """One training step's peak memory, by component (bytes).

    Attributes:
        total: the predicted peak: ``persistent + max(activation phase, optimizer phase)``
            plus the batch.
        parameters, optimizer_state, gradients: float32 parameters, AdamW's two moments and
            the gradients (persistent: fit keeps a step's gradients until the next forward
            is done).
        activations: saved for backward (all levels, the loss, low-precision weight copies).
        per_level: the saved activations of each level (stages and recurrence).
        workspace: what is alive next to them at the activation peak.
        optimizer_workspace: the optimizer phase's temporaries.
        batch: the input and label tensors of the step.
        phase: where the peak falls: ``"forward"`` (its end), ``"backward"`` (its start),
            ``"recurrence"`` (its backward) or ``"optimizer"``.
    """

    total: int
    parameters: int
    optimizer_state: int
    activations: int
    workspace: int
    gradients: int
    optimizer_workspace: int
    batch: int
    fixed: int
    per_level: list[int] = field(default_factory=list)
    phase: str = "activations"

    @property
    def persistent(self) -> int:
        """What lives across steps: parameters, optimizer state and gradients."""
        return self.parameters + self.optimizer_state + self.gradients

    @property
    def step(self) -> int:
        """The peak above what lives across steps."""
        return self.total - self.persistent

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["persistent"], out["step"] = self.persistent, self.step
        return out


def parse_memory(text: str | int | float) -> int:
    """Bytes from ``"24GB"``, ``"1.5GB"``, ``"800MB"``, ``"40GiB"`` or a number of bytes.

    ``GB``/``GiB`` both mean 2**30 bytes and ``MB``/``MiB`` 2**20, as GPU memory is quoted
    (a "40 GB" GPU has 40 GiB).

    Examples:
        >>> parse_memory("24GB") == 24 * 2**30, parse_memory("800MB") == 800 * 2**20
        (True, True)
        >>> parse_memory("1.5 gib") == int(1.5 * 2**30)
        True
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        unit = "B"
    else:
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ValueError(f"memory must look like 24GB, 1.5GB or 800MB, got {text!r}")
        value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 2**10, "M": MiB, "G": GiB, "T": 2**40}[unit[0]]
    if value <= 0:
        raise ValueError(f"memory must be positive, got {text!r}")
    return int(value * scale)


# ---------------------------------------------------------------------------------- memory


def _meta_model(model_config: Any, checkpointing: bool | None):
    """The model ``model_config`` describes, built on the meta device (no memory, no data;
    cached, as the planner asks for the same model many times)."""
    import json

    from .config import ModelConfig

    if isinstance(model_config, ModelConfig):
        cfg = {"name": model_config.name, **model_config.kwargs()}
    else:
        cfg = dict(model_config)
    if "name" not in cfg:
        raise ValueError("model_config needs the model's 'name' (a preset of create_model)")
    if checkpointing is not None:
        cfg["checkpoint"] = bool(checkpointing)
    return _build_meta(json.dumps(cfg, sort_keys=True, default=list))


@functools.lru_cache(maxsize=256)
def _build_meta(key: str):
    import json

    import torch

    from clstm4d.models import create_model

    cfg = json.loads(key)
    with torch.device("meta"):
        return create_model(cfg.pop("name"), **cfg)


def _per_axis(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    values = [value] if isinstance(value, int) else list(value)
    if len(values) == 1:
        values = values * spatial_dims
    if len(values) != spatial_dims or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be one positive int or {spatial_dims} (one per spatial "
                         f"axis), got {value!r}")
    return tuple(values)


def level_shapes(roi: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The spatial shape at every level for a patch ``roi``: padded up to the per-axis product
    of the strides, then divided by each level's strides.

    Examples:
        >>> level_shapes((40, 40, 10), [(2, 2, 1), (2, 2, 2)])
        [(40, 40, 10), (20, 20, 10), (10, 10, 5)]
    """
    total = [math.prod(s[a] for s in strides) for a in range(len(roi))]
    shape = tuple(-(-r // m) * m for r, m in zip(roi, total, strict=True))
    out = [shape]
    for s in strides:
        shape = tuple(n // k for n, k in zip(shape, s, strict=True))
        out.append(shape)
    return out


def memory_breakdown(model_config: Any, roi: int | Sequence[int], window: int, batch: int,
                     precision: str = "fp32", checkpointing: bool | None = None, *,
                     device: str = "cuda") -> MemoryEstimate:
    """The components of one training step's peak memory (see :func:`estimate_memory`)."""
    from clstm4d.models import TimeAsChannelsUNet
    from clstm4d.models.blocks import CHUNK_ELEMENTS
    from clstm4d.models.unet import CHANNELS_LAST_MIN_WIDTH

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    const = CONSTANTS[device]
    for name, v in (("window", window), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    model = _meta_model(model_config, checkpointing)
    tac = isinstance(model, TimeAsChannelsUNet)
    unet = model.unet if tac else model
    cfg = unet.config
    d = unet.spatial_dims
    roi = _per_axis(roi, d, "roi")
    if tac and window != model.frames:
        raise ValueError(f"the time-as-channels model is built for windows of "
                         f"{model.frames} frames, got window={window}")
    folded = batch if tac else batch * window  # items of the per-frame network
    shapes = level_shapes(roi, unet.strides)
    sizes = [math.prod(s) for s in shapes]
    channels = unet.channels
    elems = [folded * c * s for c, s in zip(channels, sizes, strict=True)]  # E_l

    low = precision != "fp32"
    a = 2 if low else 4  # bytes of a convolution's input/output under this precision
    norm = cfg["norm"]
    # group_norm is on CUDA autocast's float32 list (not on CPU's): normalised maps stay fp32
    norm32 = low and device == "cuda" and norm in ("instance", "group")
    an = 4 if norm32 else a  # bytes of a normalised/activated map
    per_unit = (0 if norm == "none" else an) + an  # norm input + activation output
    if cfg["dropout"] > 0:  # the mask (float on CPU, bool on CUDA) + the dropped output
        per_unit += (an if device == "cpu" else 1) + an
    cast = 2 if norm32 else 0  # the low-precision copy a convolution makes of an fp32 input
    unit_pair = 2 * per_unit + cast  # two units; the second one's input is cast
    ckpt = unet.checkpoint_levels
    chunkable = norm != "batch" and cfg["dropout"] == 0

    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    gradients = 4 * n_params
    per_level = []
    recompute = encoder_side = encoder_params = 0
    recurrent = -gradients
    for lv, e in enumerate(elems):
        inputs = folded * sizes[lv] * (unet.in_channels if lv == 0 else channels[lv - 1])
        if lv == 0:
            enc = unit_pair * e + inputs * a
        else:  # int64 pooling indices + the pooled map (+ the float32 copy of the map
            #     max_pool3d makes under CPU autocast, which lists it as a float32 op)
            enc = unit_pair * e + inputs * (8 + a)
            if low and device == "cpu" and d == 3:
                enc += 4 * folded * sizes[lv - 1] * channels[lv - 1]
        dec = (2 * a + unit_pair) * e if lv < len(channels) - 1 else 0  # concat + units
        if lv in ckpt:  # only the stages' outputs stay; backward recomputes one piece
            out = folded * sizes[0] * unet.out_channels * a if lv == 0 else an * e
            kept = an * e + (out if dec else 0)
            pieces = max(1, min(folded, e // CHUNK_ELEMENTS)) if chunkable else 1
            share = -(-folded // pieces) / folded  # the largest piece of the n*t axis
            for stage in (enc, dec):
                # the piece's activations, and the gradient of the level's whole map
                recompute = max(recompute, int(stage * share) + a * e)
            enc, dec = kept, 0
        rnn = 0
        if str(lv) in unet.recurrence:
            directions = 2 if unet.bidirectional else 1
            if lv in ckpt:  # the output, and the float32 state every few frames
                from clstm4d.nn.convrnn import CHECKPOINT_FRAMES

                per_dir = a + 4 / CHECKPOINT_FRAMES
            else:  # the activated gates (float32: the gate update runs in float32), the
                #     output and the cell state / GRU candidate part (activation dtype)
                per_dir = 4 * _GATES[cfg["cell"]] + 2 * a
            rnn = directions * per_dir * e
            if unet.bidirectional:
                rnn += 2 * a * e  # the two directions concatenated for the 1x1 merge
            if cfg.get("fusion") == "gated":  # the gate's input [x, y], its sigmoid, the mix
                rnn += 4 * a * e
            if channels[0] >= CHANNELS_LAST_MIN_WIDTH:
                rnn += a * e  # its output copied back to the stages' channels-last layout
            weights = sum(q.numel() for q in unet.recurrence[str(lv)].parameters())
            # backward through time: float32 gradients of the whole sequence's maps and
            # batched weight-gradient temporaries
            recurrent_ws = (const.recurrence * 4 * e
                            + const.recurrence_weights * 4 * weights)
        encoder_side += enc + rnn
        encoder_params += sum(q.numel() for q in unet.encoder[lv].parameters())
        if rnn:
            # its backward runs once every decoder stage's has: what is still saved then is
            # the encoder side up to its level, and the gradients of everything else (the
            # last step's gradients were freed before the backward)
            encoder_params += weights
            recurrent = max(recurrent, int(encoder_side + recurrent_ws - 4 * encoder_params))
        per_level.append(int(enc + dec + rnn))
    logits = folded * sizes[0] * unet.out_channels
    activations = sum(per_level) + LOSS_BYTES_PER_LOGIT * logits

    if low:  # autocast's low-precision copies of the per-frame convolution weights, kept for
        #      backward (the recurrence casts its weights itself and keeps no copy)
        conv_weights = sum(p.numel() for name, p in model.named_parameters()
                           if p.dim() > 2 and ".recurrence." not in f".{name}")
        activations += 2 * conv_weights
    # the peaks above the persistent state: the end of the forward (the loss's temporaries,
    # the last step's gradients still alive), the start of the backward (those gradients
    # freed; the first activation gradients and the largest operation's workspace, or the
    # recomputed piece of a checkpointed stage: level 0's decoder comes first and is the
    # largest), the recurrence's backward, the optimizer step
    workspace = int(max(const.transient * a * max(elems), const.recompute * recompute))
    phases = {"forward": activations + const.forward * a * max(elems),
              "backward": activations - gradients + workspace, "recurrence": recurrent}
    largest = max((p.numel() for p in params), default=0)
    opt_ws = int(const.optimizer * 4 * (largest if device == "cpu" else n_params))
    in_frames = folded if not tac else batch * window
    batch_bytes = in_frames * math.prod(roi) * (4 * (unet.in_channels // (window if tac else 1))
                                               + 8)
    phases["optimizer"] = opt_ws
    phase = max(phases, key=phases.get)
    # parameters, AdamW's moments and the gradients (kept from one step to the next until
    # the forward is done: fit sets them to None just before backward)
    persistent = 4 * 4 * n_params
    total = persistent + max(0, phases[phase]) + batch_bytes + const.fixed
    return MemoryEstimate(
        total=int(total), parameters=4 * n_params, optimizer_state=8 * n_params,
        gradients=gradients, activations=int(activations), workspace=workspace,
        optimizer_workspace=opt_ws, batch=int(batch_bytes), fixed=const.fixed,
        per_level=per_level, phase=phase)


def estimate_memory(model_config: Any, roi: int | Sequence[int], window: int, batch: int,
                    precision: str = "fp32", checkpointing: bool | None = None, *,
                    device: str = "cuda") -> int:
    """Predicted peak memory (bytes) of one training step with AdamW.

    Args:
        model_config: what ``create_model`` builds: a dict with ``name`` and keyword arguments
            (``model.config``, a checkpoint's ``model_config``) or a
            :class:`~clstm4d.engine.config.ModelConfig` (its sizes filled in).
        roi: the patch, one int per spatial axis (or one for all).
        window: frames per sample ``t``; batch: samples per step ``n``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).
        checkpointing: activation checkpointing (``None``: as ``model_config`` says).
        device: ``"cuda"`` (default) or ``"cpu"``: which calibration and autocast rules.

    Returns:
        Bytes: persistent state (parameters, AdamW moments) plus the larger of the
        activation peak (saved activations and workspace) and the optimizer phase (gradients
        and temporaries), plus the batch.

    Examples:
        >>> gb = estimate_memory({"name": "reference"}, roi=64, window=5, batch=1) / 2**30
        >>> 5 < gb < 30
        True
        >>> ckpt = estimate_memory({"name": "reference"}, 64, 5, 1, checkpointing=True)
        >>> ckpt < gb * 2**30 / 2
        True
    """
    return memory_breakdown(model_config, roi, window, batch, precision, checkpointing,
                            device=device).total


def training_step(model, optimizer, loss_fn, image, label, *, device, amp_dtype=None,
                  grad_clip: float | None = 1.0) -> float:
    """One optimizer step as :func:`~clstm4d.engine.train.fit` takes it (forward under
    autocast, Dice + cross-entropy, gradients from ``None``, gradient clipping, AdamW): what
    the memory model describes and the planner times. Returns the loss.

    Shape:
        image ``(n, t, c, *s)``, label ``(n, t, *s)``.
    """
    import torch

    from .runtime import autocast

    model.train()
    with autocast(device, amp_dtype):
        logits = model(image)  # (n, t, k, *s)
    loss = loss_fn(logits, label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------- dataset

#: Percentile of the spacings used for a strongly anisotropic axis (nnU-Net's choice).
ANISOTROPIC_PERCENTILE = 10
#: An axis is strongly anisotropic when its median spacing exceeds this times the finest.
ANISOTROPY_RATIO = 3.0
#: An axis is pooled only while its spacing is within this factor of the finest ...
POOL_SPACING_RATIO = 2.0
#: ... and while pooling leaves at least this many voxels.
MIN_POOLED_VOXELS = 4


def fingerprint(datalist: str | os.PathLike, *, progress: Any = None) -> dict[str, Any]:
    """Read every training case once, one at a time (never all in memory), and record per
    case: spacing, spatial shape, frames, channels, intensity statistics and class voxel
    counts (labelled frames only, when the data says which are labelled).

    Returns:
        A JSON-serialisable dict: ``cases`` (one entry per case), ``spatial_dims``,
        ``channels``, ``labels`` and ``notes`` (e.g. formats without a stated spacing).

    Raises:
        UserError: no training cases, or cases that disagree in channel count or spatial dims
            (naming the cases).
    """
    from clstm4d.data import load_case

    from .builders import training_datalist
    from .errors import UserError

    path = Path(datalist)
    dl = training_datalist(path)
    cases, notes = [], []
    first = None
    for i, entry in enumerate(dl.training):
        case = load_case(entry)
        image, label, g = case.image, case.label, case.geometry
        if first is None:
            first = (case.name, image.shape[1], image.ndim - 2)
        elif image.ndim - 2 != first[2]:
            raise UserError(f"case '{case.name}' has {image.ndim - 2} spatial dims, case "
                            f"'{first[0]}' has {first[2]}: all training cases must agree")
        elif image.shape[1] != first[1]:
            raise UserError(f"case '{case.name}' has {image.shape[1]} channels per frame, case "
                            f"'{first[0]}' has {first[1]}: all training cases must agree")
        stated = g.space_unit is not None or g.format in ("nifti", "nifti-series")
        if not stated:
            notes.append(f"case '{case.name}' ({g.format}): the file states no voxel size; "
                         f"{list(g.spacing)} (1 per voxel) is used")
        entry_out = {
            "name": case.name, "spacing": [round(v, 6) for v in g.spacing],
            "spacing_stated": bool(stated), "shape": list(g.spatial_shape),
            "frames": int(image.shape[0]), "channels": int(image.shape[1]),
            "format": g.format, "intensity": _intensity(image, label),
        }
        if label is not None:
            frames = getattr(case, "labelled", None)
            lab = label if frames is None else label[np.asarray(frames, bool)]
            values, counts = np.unique(lab, return_counts=True)
            entry_out["class_voxels"] = {str(int(v)): int(n) for v, n in zip(values, counts,
                                                                             strict=True)}
            entry_out["labelled_frames"] = int(lab.shape[0])
        cases.append(entry_out)
        del case, image, label
        if progress is not None:
            progress(i + 1, len(dl.training), entry_out["name"])
    return {"datalist": str(path.resolve()), "spatial_dims": first[2], "channels": first[1],
            "labels": {str(k): v for k, v in sorted((dl.labels or {}).items())},
            "num_classes": int(dl.num_classes),
            "cases": cases, "notes": notes}


def _intensity(image: np.ndarray, label: np.ndarray | None) -> dict[str, Any]:
    """Per channel: mean, std and 0.5/50/99.5 percentiles of all voxels and of the
    foreground (label > 0) voxels."""
    out = []
    for c in range(image.shape[1]):
        values = image[:, c]
        stats = {"all": _stats(values)}
        if label is not None and (label > 0).any():
            stats["foreground"] = _stats(values[label > 0])
        out.append(stats)
    return {"channels": out}


def _stats(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, np.float64).ravel()
    p = np.percentile(v, [0.5, 50, 99.5])
    return {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(p[0]),
            "p50": float(p[1]), "p99_5": float(p[2])}


@dataclass
class TargetSpacing:
    """The voxel size the model will work at, per axis, and how each axis' value was chosen."""

    spacing: tuple[float, ...]
    rule: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(f"axis {a}: {s:g} ({r})"
                         for a, (s, r) in enumerate(zip(self.spacing, self.rule, strict=True)))


def target_spacing(spacings: Sequence[Sequence[float]]) -> TargetSpacing:
    """The median spacing of every axis; an axis whose median is more than
    :data:`ANISOTROPY_RATIO` times the finest uses the :data:`ANISOTROPIC_PERCENTILE`-th
    percentile instead (never below the finest axis), so that thick-slice cases are not
    interpolated up to the coarsest scanner's slices.

    Examples:
        >>> t = target_spacing([(1, 1, 5), (1.2, 1.2, 8), (0.8, 0.8, 5), (1, 1, 2.5)])
        >>> t.spacing
        (1.0, 1.0, 3.25)
        >>> t.rule
        ('median', 'median', '10th percentile: median 5 > 3 x finest 1')
    """
    arr = np.asarray(spacings, np.float64)
    median = np.median(arr, axis=0)
    finest = float(median.min())
    spacing, rule = [], []
    for a, m in enumerate(median):
        if m > ANISOTROPY_RATIO * finest:
            value = max(finest, float(np.percentile(arr[:, a], ANISOTROPIC_PERCENTILE)))
            spacing.append(round(value, 6))
            rule.append(f"{ANISOTROPIC_PERCENTILE}th percentile: median {m:g} > "
                        f"{ANISOTROPY_RATIO:g} x finest {finest:g}")
        else:
            spacing.append(round(float(m), 6))
            rule.append("median")
    return TargetSpacing(tuple(spacing), tuple(rule))


def derive_strides_kernels(spacing: Sequence[float], roi: Sequence[int], levels: int
                           ) -> tuple[list[list[int]], list[list[int]]]:
    """Pooling strides (``levels - 1``) and kernels (``levels``) per axis for a patch ``roi``
    at voxel size ``spacing`` (arrays' axis order):

    - an axis is pooled (stride 2) only while its spacing at that level is within
      :data:`POOL_SPACING_RATIO` of the finest axis' and pooling leaves at least
      :data:`MIN_POOLED_VOXELS` voxels; after a pooling its spacing doubles;
    - the kernel of an axis is 1 while it stays coarse (spacing more than
      :data:`POOL_SPACING_RATIO` times the finest), else 3.

    Examples:
        >>> s, k = derive_strides_kernels((1.0, 1.0, 5.0), (64, 64, 16), levels=4)
        >>> s
        [[2, 2, 1], [2, 2, 1], [2, 2, 2]]
        >>> k
        [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    """
    spacing = [float(v) for v in spacing]
    size = [int(r) for r in roi]
    strides, kernels = [], []
    for level in range(levels):
        finest = min(spacing)
        kernels.append([3 if h <= POOL_SPACING_RATIO * finest else 1 for h in spacing])
        if level == levels - 1:
            break
        stride = [2 if h <= POOL_SPACING_RATIO * finest and n // 2 >= MIN_POOLED_VOXELS
                  else 1 for h, n in zip(spacing, size, strict=True)]
        strides.append(stride)
        spacing = [h * s for h, s in zip(spacing, stride, strict=True)]
        size = [n // s for n, s in zip(size, stride, strict=True)]
    return strides, kernels


def check_strides_for_roi(strides: Sequence[Sequence[int]] | None, roi: Sequence[int],
                          key: str = "model.strides") -> None:
    """Refuse a pooling of an axis that is already down to :data:`MIN_POOLED_VOXELS` voxels
    or fewer at that level of the patch ``roi`` (a plan edited into something that cannot
    train), naming the key, the level and the axis."""
    from .errors import ConfigError

    if not strides:
        return
    size = [int(r) for r in roi]
    for level, stride in enumerate(strides):
        stride = [stride] * len(size) if isinstance(stride, int) else list(stride)
        if len(stride) != len(size):
            raise ConfigError(f"{key}[{level}] has {len(stride)} axes, the patch "
                              f"{list(roi)} has {len(size)}")
        for a, (n, s) in enumerate(zip(size, stride, strict=True)):
            if s > 1 and n <= MIN_POOLED_VOXELS:
                raise ConfigError(
                    f"{key}[{level}] pools axis {a} by {s}, but the patch {list(roi)} is "
                    f"down to {n} voxels on that axis at level {level} (the minimum is "
                    f"{MIN_POOLED_VOXELS}): set that stride to 1, use a larger data.roi, or "
                    f"run clstm4d plan again")
        size = [n // s for n, s in zip(size, stride, strict=True)]


# ---------------------------------------------------------------------------------- the plan

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


def step_macs(model_config: Any, roi: Sequence[int], window: int, batch: int,
              checkpointing: bool | None = None) -> float:
    """Multiply-accumulates of the convolutions of one training step (forward, backward as
    twice the forward, plus the forward of the checkpointed levels again): what step time
    scales with."""
    import re

    from clstm4d.models import TimeAsChannelsUNet

    model = _meta_model(model_config, checkpointing)
    tac = isinstance(model, TimeAsChannelsUNet)
    unet = model.unet if tac else model
    folded = batch if tac else batch * window
    sizes = [math.prod(s) for s in level_shapes(_per_axis(list(roi), unet.spatial_dims, "roi"),
                                               unet.strides)]
    forward = recomputed = 0.0
    for name, p in unet.named_parameters():
        m = re.match(r"(encoder|decoder|recurrence)\.(\d+)\.|head\.", name)
        if p.dim() <= 2 or m is None:
            continue
        level = 0 if m.group(1) is None else int(m.group(2))
        upsampling = m.group(1) == "decoder" and ".up." in name  # its input is one level down
        macs = p.numel() * sizes[level + 1 if upsampling else level] * folded
        forward += macs
        if level in unet.checkpoint_levels:
            recomputed += macs
    return 3 * forward + recomputed


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
    checkpointing: bool
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

    @property
    def share(self) -> float:
        return self.predicted / self.budget

    def model_config(self) -> dict[str, Any]:
        """``create_model`` keyword arguments (with ``name``) of the planned model."""
        return {"name": self.model, "spatial_dims": self.spatial_dims,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "strides": self.strides, "kernel_sizes": self.kernel_sizes,
                "checkpoint": self.checkpointing}

    def config(self, datalist: str | None = None) -> dict[str, Any]:
        """The configuration ``clstm4d train --config`` uses as is."""
        amp = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        return {
            "model": {"name": self.model, "strides": self.strides,
                      "kernel_sizes": self.kernel_sizes},
            "data": {"datalist": datalist, "spacing": self.spacing, "roi": list(self.roi),
                     "window": self.window, "batch_size": self.batch},
            "train": {"amp": amp, "activation_checkpointing": self.checkpointing},
            "predict": {"roi": list(self.roi)},  # windows of the training patch
        }

    def rows(self) -> list[tuple[str, str]]:
        gib = 2**30
        time = ("not measured" if self.step_seconds is None
                else f"{self.step_seconds:.2f} s (measured calibration, scaled by conv MACs)")
        out = [("model", self.model),
               ("target spacing", "off (each case on its own grid)" if self.spacing is None
                else f"{_fmt(self.spacing)}  [{self.spacing_rule}]"),
               ("median shape / frames", f"{_fmt(self.median_shape)} / {self.median_frames}"),
               ("roi (patch)", _fmt(self.roi)),
               ("window (frames)", str(self.window)),
               ("batch", str(self.batch)),
               ("strides", str(self.strides)),
               ("kernel sizes", str(self.kernel_sizes)),
               ("activation checkpointing", "on" if self.checkpointing else "off"),
               ("precision", self.precision),
               ("predicted peak", f"{self.predicted / gib:.2f} GiB"),
               ("budget", f"{self.budget / gib:.2f} GiB ({self.device}); "
                          f"{100 * self.share:.0f}% used, margin {100 * MARGIN:.0f}%"),
               ("predicted step time", time)]
        return out

    def table(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "share": round(self.share, 4)}


def _fmt(values: Sequence[Any]) -> str:
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _resolved_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    return precision


def make_plan(budget: int, *, model: str = "tiny", median_shape: Sequence[int],
              median_frames: int, spacing: Sequence[float] | None = None,
              spacing_rule: str = "", in_channels: int = 1, out_channels: int = 2,
              device: str = "cuda", precision: str = "auto", min_window: int = MIN_WINDOW,
              max_batch: int = MAX_BATCH, checkpointing: bool | None = None) -> Plan:
    """Choose roi, window, batch, strides, kernels, checkpointing and precision so that the
    predicted peak of a training step stays within ``budget * (1 - MARGIN)``.

    Order: the largest roi first (up to ``median_shape``, shrinking the physically longest
    axis), with ``min(min_window, median_frames)`` frames and batch 1; then the window up to
    ``median_frames``; then the batch up to ``max_batch``. Strides and kernels follow the roi
    and ``spacing`` (:func:`derive_strides_kernels`). Checkpointing is used only when it buys a
    larger roi or window, not for a larger batch (``checkpointing`` forces it on or off).

    Raises:
        UserError: when even the smallest sensible plan does not fit (saying what it needs).
    """
    from clstm4d.models import TimeAsChannelsUNet

    from .errors import UserError

    device = "cuda" if str(device).startswith("cuda") else "cpu"
    precision = _resolved_precision(precision, device)
    d = len(median_shape)
    spacing_used = [1.0] * d if spacing is None else [float(v) for v in spacing]
    base = _meta_model({"name": model, "spatial_dims": d, "in_channels": in_channels,
                        "out_channels": out_channels}, None)
    tac = isinstance(base, TimeAsChannelsUNet)
    levels = len((base.unet if tac else base).channels)
    limit = budget * (1 - MARGIN)
    frames_cap = max(1, int(median_frames))
    w0 = base.frames if tac else max(1, min(min_window, frames_cap))

    def layout(roi):
        strides, kernels = derive_strides_kernels(spacing_used, roi, levels)
        return strides, kernels

    def cost(roi, window, batch, ckpt):
        strides, kernels = layout(roi)
        mc = {"name": model, "spatial_dims": d, "in_channels": in_channels,
              "out_channels": out_channels, "strides": strides, "kernel_sizes": kernels}
        return estimate_memory(mc, roi, window, batch, precision, ckpt, device=device)

    def multiples(roi):
        strides, _ = layout(roi)
        return [math.prod(s[a] for s in strides) for a in range(d)]

    def round_up(roi):
        m = multiples(roi)
        return [-(-r // k) * k for r, k in zip(roi, m, strict=True)]

    floor = [min(int(n), MIN_ROI) for n in median_shape]

    def search(ckpt):
        roi = round_up([int(n) for n in median_shape])
        while cost(roi, w0, 1, ckpt) > limit:
            m = multiples(roi)
            # shrink the physically longest axis that can still shrink
            axes = [a for a in range(d) if roi[a] > floor[a]]
            if not axes:
                return None
            a = max(axes, key=lambda i: roi[i] * spacing_used[i])
            step = max(m[a], int(0.1 * roi[a]) // m[a] * m[a])
            roi[a] = max(floor[a], roi[a] - step)
            roi = round_up(roi) if roi[a] >= m[a] else roi
        window = w0
        if not tac:
            while window < frames_cap and cost(roi, window + 1, 1, ckpt) <= limit:
                window += 1
        batch = 1
        while batch < max_batch and cost(roi, window, batch + 1, ckpt) <= limit:
            batch += 1
        return roi, window, batch

    options = [False, True] if checkpointing is None else [bool(checkpointing)]
    found = {ckpt: search(ckpt) for ckpt in options}
    found = {k: v for k, v in found.items() if v is not None}
    if not found:
        roi = floor
        need = cost(roi, 1 if not tac else w0, 1, True if checkpointing is None
                    else bool(checkpointing))
        raise UserError(
            f"--memory {budget / 2**30:.2f} GiB is too small: the smallest plan for model "
            f"'{model}' (roi {_fmt(roi)}, window {1 if not tac else w0}, batch 1, "
            f"checkpointing, {precision}) needs about {need / (1 - MARGIN) / 2**30:.2f} GiB "
            f"with the {100 * MARGIN:.0f}% margin")

    def key(ckpt):  # checkpointing (slower) only for a larger roi or window
        roi, window, batch = found[ckpt]
        return (math.prod(roi), window, not ckpt, batch)

    ckpt = max(found, key=key)
    roi, window, batch = found[ckpt]
    strides, kernels = layout(roi)
    notes = []
    if tuple(roi) != tuple(round_up(list(median_shape))):
        notes.append(f"the median case ({_fmt(median_shape)}) does not fit whole: patches of "
                     f"{_fmt(roi)} are cut from it")
    return Plan(model=model, spatial_dims=d, in_channels=in_channels,
                out_channels=out_channels, roi=list(roi), window=window, batch=batch,
                strides=strides, kernel_sizes=kernels, checkpointing=ckpt,
                precision=precision, device=device, budget=int(budget),
                predicted=cost(roi, window, batch, ckpt),
                spacing=None if spacing is None else list(spacing_used),
                spacing_rule=spacing_rule, median_shape=[int(n) for n in median_shape],
                median_frames=int(median_frames), notes=notes)


def plan_from_fingerprint(fp: dict[str, Any], budget: int, *, model: str = "tiny",
                          device: str = "cuda", precision: str = "auto",
                          min_window: int = MIN_WINDOW, max_batch: int = MAX_BATCH) -> Plan:
    """:func:`make_plan` for a dataset: the target spacing from the cases' spacings, the
    median shape after resampling to it, the median frame count, channels and classes."""
    from clstm4d.data import target_shape

    spacings = [c["spacing"] for c in fp["cases"]]
    target = target_spacing(spacings)
    shapes = [target_shape(c["shape"], c["spacing"], target.spacing) for c in fp["cases"]]
    median = [int(np.median([s[a] for s in shapes])) for a in range(len(shapes[0]))]
    frames = int(np.median([c["frames"] for c in fp["cases"]]))
    classes = fp.get("num_classes") or 1 + max(
        (int(k) for c in fp["cases"] for k in c.get("class_voxels", {})), default=1)
    plan = make_plan(budget, model=model, median_shape=median, median_frames=frames,
                     spacing=target.spacing, spacing_rule=target.describe(),
                     in_channels=int(fp["channels"]), out_channels=max(2, classes),
                     device=device, precision=precision, min_window=min_window,
                     max_batch=max_batch)
    plan.notes.extend(fp.get("notes", []))
    return plan


def calibrate_step_seconds(model_config: dict[str, Any], roi: Sequence[int], window: int,
                           batch: int, precision: str, checkpointing: bool, device: Any, *,
                           max_macs: float | None = None, repeats: int = 2) -> float:
    """Predicted seconds of one training step: time a few steps of the same model on
    ``device`` with batch 1 and a short window (2 frames) at the plan's patch (or, when that
    exceeds ``max_macs`` multiply-accumulates, 2e10 on CPU and 2e12 on CUDA, at a patch shrunk
    to no less than half of every axis), then scale by the ratio of convolution MACs
    (:func:`step_macs`: linear in batch and frames)."""
    import time

    import torch

    from .builders import create
    from .metrics import SequenceLoss
    from .runtime import amp_dtype, resolve_device
    from .train import param_groups

    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    if max_macs is None:
        max_macs = 2e12 if device.type == "cuda" else 2e10
    full = step_macs(model_config, roi, window, batch, checkpointing)
    model = _meta_model(model_config, checkpointing)
    unet = getattr(model, "unet", model)
    d = unet.spatial_dims
    mult = [math.prod(s[a] for s in unet.strides) for a in range(d)]
    frames = window if hasattr(model, "frames") else min(window, 2)  # tac: its fixed window
    small = list(roi)
    macs = step_macs(model_config, small, frames, 1, checkpointing)
    if macs > max_macs:
        scale = max(0.5, (max_macs / macs) ** (1 / d))
        small = [max(m, int(r * scale) // m * m) for r, m in zip(roi, mult, strict=True)]
        macs = step_macs(model_config, small, frames, 1, checkpointing)
    cfg = dict(model_config)
    torch.manual_seed(0)
    net = create(cfg.pop("name"), **{**cfg, "checkpoint": checkpointing}).to(device)
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


# ---------------------------------------------------------------------------------- the guard


def available_memory(device: Any) -> int:
    """Bytes the training device can still give: free CUDA memory, or the operating system's
    available memory (``MemAvailable``) for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def precision_of(amp_dtype: Any) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for an autocast dtype (``None`` = off)."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def check_training_memory(cfg: Any, run: Any, cases: Sequence[Any], device: Any, *,
                          force: bool = False, budget: int | None = None) -> MemoryEstimate:
    """The train-time guard: the memory model's estimate of one step of this run against
    what ``device`` has free. Stops with one line (what was asked, the estimate, the budget
    and what to change) unless ``force``.

    Args:
        cfg: the :class:`~clstm4d.engine.config.Config` of the run.
        run: its resolved :class:`~clstm4d.engine.config.SavedRun` (the model's full config).
        cases: the training cases (their shapes stand in when ``data.roi`` is ``None``).
        device: the training device; budget: bytes (default: :func:`available_memory`).

    Returns:
        The :class:`MemoryEstimate` (its ``total`` is logged next to the measured peak).

    Raises:
        UserError: the estimate exceeds the budget and ``force`` is false.
        ConfigError: ``model.strides`` pools an axis the patch has already reduced to
            :data:`MIN_POOLED_VOXELS` voxels.
    """
    import torch

    from .errors import UserError
    from .runtime import amp_dtype

    device = torch.device(device)
    d = int(run.model_config["spatial_dims"])
    shapes = [c.image.shape[2:] for c in cases]
    if cfg.data.roi is None:
        roi = [max(int(s[a]) for s in shapes) for a in range(d)]
    else:
        roi = list(_per_axis(cfg.data.roi, d, "data.roi"))
    window = cfg.data.window or max(c.image.shape[0] for c in cases)
    if cfg.model.strides is not None:
        check_strides_for_roi(run.model_config.get("strides"), roi)
    precision = precision_of(amp_dtype(device, cfg.train.amp))
    est = memory_breakdown(run.model_config, roi, int(window), int(cfg.data.batch_size),
                           precision, None, device=device.type)
    budget = available_memory(device) if budget is None else int(budget)
    if est.total > budget and not force:
        gib = 2**30
        raise UserError(
            f"this run would not fit: one training step of model '{run.model_config['name']}' "
            f"with roi {_fmt(roi)}, window {window}, batch {cfg.data.batch_size}, {precision}, "
            f"activation checkpointing {'on' if run.model_config.get('checkpoint') else 'off'} "
            f"needs about {est.total / gib:.2f} GiB, and {device} has {budget / gib:.2f} GiB "
            f"free; run `clstm4d plan --datalist {cfg.data.datalist} --memory "
            f"{budget / gib:.0f}GB` or lower data.roi, data.window or data.batch_size (or "
            f"set train.activation_checkpointing), or pass --force to start anyway")
    return est


def first_step_memory(measured_bytes: int, predicted_bytes: int) -> dict[str, float]:
    """The metrics of the first step's memory: ``peak_mb`` (measured) next to
    ``predicted_peak_mb`` (the estimate), in MiB."""
    return {"peak_mb": round(measured_bytes / MiB, 1),
            "predicted_peak_mb": round(predicted_bytes / MiB, 1)}


# ---------------------------------------------------------------------------------- command


def parse_shape(text: str) -> tuple[int, list[int]]:
    """``"T,D,H,W"`` (or ``"T,H,W"``) -> ``(frames, spatial shape)``, arrays' axis order."""
    try:
        values = [int(v) for v in str(text).replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) not in (2, 3, 4) or min(values, default=0) < 1:
        raise ValueError(f"--shape must be T,D,H,W (or T,H,W): frames then the spatial size "
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
    import json

    import yaml

    from .checkpoint import atomic_write_text
    from .errors import UserError
    from .runtime import resolve_device

    say = say or (lambda message: None)
    if (datalist is None) == (shape is None):
        raise UserError("give --datalist (plan from the data) or --shape T,D,H,W "
                        "(plan for a sequence size without data), not both or neither")
    if memory is not None and not measure_time and device != "auto":
        import torch  # planning for a device this machine need not have

        dev = torch.device(device)
    else:
        dev = resolve_device(device)
    budget = available_memory(dev) if memory is None else parse_memory(memory)
    if memory is None:
        say(f"budget: {budget / GiB:.2f} GiB free on {dev} (set --memory to plan for another)")
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
            plan.checkpointing, dev)
    written: list[Path] = []
    if out is not None:
        out = Path(out)
        header = ["clstm4d plan: train with `clstm4d train --config " + out.name + "`", ""]
        header += plan.table().splitlines()
        text = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header)
        text += yaml.safe_dump(plan.config(None if fp is None else fp["datalist"]),
                               sort_keys=False, default_flow_style=None)
        atomic_write_text(out, text)
        written.append(out)
        if fp is not None:
            fp_path = out.parent / "fingerprint.json"
            atomic_write_text(fp_path, json.dumps({**fp, "plan": plan.to_dict()}, indent=1))
            written.append(fp_path)
    return plan, written


def capacity(budget: int, model: str, frames: int, spatial: Sequence[int], *,
             device: str = "cuda", precision: str = "auto",
             windows: Sequence[int] = (1, 2, 5, 8, 16, 32)) -> list[dict[str, Any]]:
    """For each window (up to ``frames``) and checkpointing off/on: the largest patch (the
    planner's roi search, batch 1) that fits ``budget``; ``None`` where none does."""
    from .errors import UserError

    rows = []
    for ckpt in (False, True):
        for w in [w for w in windows if w <= frames]:
            try:
                p = make_plan(budget, model=model, median_shape=spatial, median_frames=w,
                              device=device, precision=precision, min_window=w, max_batch=1,
                              checkpointing=ckpt)
                rows.append({"checkpointing": ckpt, "window": w, "roi": p.roi,
                             "predicted_gib": round(p.predicted / GiB, 2)})
            except UserError:
                rows.append({"checkpointing": ckpt, "window": w, "roi": None,
                             "predicted_gib": None})
    return rows
