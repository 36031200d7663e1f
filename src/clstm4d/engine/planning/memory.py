"""The cost model of one training step: its peak memory (:func:`estimate_memory`) and its
convolution work (:func:`step_macs`, what step time scales with).

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
  A recomputed level (``train.recompute``) keeps only its stages' outputs and
  recomputes the rest, one piece of the folded batch at a time, during backward. Under
  bf16/fp16 autocast the stages are stored in 2 bytes (autocast's op lists differ: CPU runs
  ``max_pool3d`` in float32, CUDA ``group_norm``, and both are modelled) and the per-frame
  convolution weights get low-precision copies;
- **the peak** above those, the largest of: the end of the forward (the loss's temporaries,
  the last step's gradients still alive); the start of the backward (those gradients freed;
  the first activation gradients and the largest operation's workspace, or the recomputed
  piece of a recomputed stage with the gradient of its level's map); the recurrence's
  backward through time (what the encoder side still holds, the gradients computed so far and
  its batched weight-gradient temporaries); the optimizer step's temporaries.

The structural counts match what autograd saves (the tests compare them with saved-tensor
hooks); the workspace constants (:data:`CONSTANTS`) are calibrated from measured peaks
(``benchmarks/bench_plan.py --calibrate``, documented in docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clstm4d._common import per_axis
from clstm4d.engine.run.config import ModelConfig, ModelSpec
from clstm4d.errors import ConfigError
from clstm4d.models import TimeAsChannelsUNet, create_model
from clstm4d.models.blocks import CHUNK_ELEMENTS
from clstm4d.models.unet import CHANNELS_LAST_MIN_WIDTH
from clstm4d.nn.convrnn import RECOMPUTE_FRAMES

from .topology import level_shapes

__all__ = ["CONSTANTS", "GiB", "MemoryEstimate", "MiB", "PRECISIONS", "estimate_memory",
           "memory_breakdown", "meta_model", "parse_memory", "step_macs"]

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
        recompute: a recomputed stage's piece while it is differentiated, as a
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
#: what memory attention keeps per element of its level's map: (maps in the activation
#: dtype, maps in float32): fitted to autograd's saved tensors (tests/test_engine_plan.py)
#: in float32 and bf16 (its layer norms' statistics and time-encoded keys aside)
ATTENTION_PER_ELEMENT = (11.9, 1.35)


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

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ConfigError(f"memory must look like 24GB, 1.5GB or 800MB, got {text!r}")
        value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "K": 2**10, "M": MiB, "G": GiB, "T": 2**40}[unit[0]]
    if value <= 0:
        raise ConfigError(f"memory must be positive, got {text!r}")
    return int(value * scale)


def meta_model(model_config: Any, recompute: bool | None):
    """The model ``model_config`` describes, built on the meta device (no memory, no data;
    cached, as the planner asks for the same model many times)."""
    if isinstance(model_config, ModelConfig):
        cfg = {"name": model_config.name, **model_config.kwargs()}
    elif isinstance(model_config, ModelSpec):
        cfg = model_config.to_dict()
    else:
        cfg = dict(model_config)
    if "name" not in cfg:
        raise ConfigError("model_config needs the model's 'name' (a preset of create_model)")
    cfg = {ModelSpec.RENAMED.get(k, k): v for k, v in cfg.items()}
    if recompute is not None:
        cfg["recompute"] = bool(recompute)
    return _build_meta(json.dumps(cfg, sort_keys=True, default=list))


@functools.lru_cache(maxsize=256)
def _build_meta(key: str):
    import torch

    cfg = json.loads(key)
    with torch.device("meta"):
        return create_model(cfg.pop("name"), **cfg)


class _Step:
    """The sizes of one training step that the memory model counts from: the model (on the
    meta device), the per-level maps of the folded batch and the bytes per element."""

    def __init__(self, model, roi: tuple[int, ...], window: int, batch: int, precision: str,
                 device: str):
        self.tac = isinstance(model, TimeAsChannelsUNet)
        self.unet = unet = model.unet if self.tac else model
        self.model, self.device, self.const = model, device, CONSTANTS[device]
        cfg = unet.config
        self.folded = batch if self.tac else batch * window  # items of the per-frame network
        self.batch, self.window = batch, window
        self.sizes = [math.prod(s) for s in level_shapes(roi, unet.strides)]
        self.elems = [self.folded * c * s
                      for c, s in zip(unet.channels, self.sizes, strict=True)]  # E_l
        self.low = low = precision != "fp32"
        self.a = 2 if low else 4  # bytes of a convolution's input/output under this precision
        norm = cfg["norm"]
        # group_norm is on CUDA autocast's float32 list (not on CPU's): normalised maps fp32
        norm32 = low and device == "cuda" and norm in ("instance", "group")
        self.an = an = 4 if norm32 else self.a  # bytes of a normalised/activated map
        per_unit = (0 if norm == "none" else an) + an  # norm input + activation output
        if cfg["dropout"] > 0:  # the mask (float on CPU, bool on CUDA) + the dropped output
            per_unit += (an if device == "cpu" else 1) + an
        cast = 2 if norm32 else 0  # the low-precision copy a conv makes of an fp32 input
        self.unit_pair = 2 * per_unit + cast  # two units; the second one's input is cast
        self.chunkable = norm != "batch" and cfg["dropout"] == 0

    def stages(self, lv: int) -> tuple[float, float, int]:
        """Saved bytes of level ``lv``'s encoder and decoder stages, and (recomputed levels)
        the largest recomputed piece with the gradient of the level's map."""
        unet, a, e, folded = self.unet, self.a, self.elems[lv], self.folded
        channels, sizes = unet.channels, self.sizes
        inputs = folded * sizes[lv] * (unet.in_channels if lv == 0 else channels[lv - 1])
        if lv == 0:
            enc = self.unit_pair * e + inputs * a
        else:  # int64 pooling indices + the pooled map (+ the float32 copy of the map
            #     max_pool3d makes under CPU autocast, which lists it as a float32 op)
            enc = self.unit_pair * e + inputs * (8 + a)
            if self.low and self.device == "cpu" and unet.spatial_dims == 3:
                enc += 4 * folded * sizes[lv - 1] * channels[lv - 1]
        dec = (2 * a + self.unit_pair) * e if lv < len(channels) - 1 else 0  # concat + units
        if lv not in unet.recompute_levels:
            return enc, dec, 0
        # only the stages' outputs stay; backward recomputes one piece
        out = folded * sizes[0] * unet.out_channels * a if lv == 0 else self.an * e
        kept = self.an * e + (out if dec else 0)
        pieces = max(1, min(folded, e // CHUNK_ELEMENTS)) if self.chunkable else 1
        share = -(-folded // pieces) / folded  # the largest piece of the n*t axis
        # the piece's activations, and the gradient of the level's whole map
        piece = max(int(stage * share) + a * e for stage in (enc, dec))
        return kept, 0, piece

    def recurrence(self, lv: int) -> tuple[float, int, float]:
        """Saved bytes of the recurrence at level ``lv`` (0 where there is none), its
        weights, and its backward-through-time workspace."""
        unet, a, e = self.unet, self.a, self.elems[lv]
        if str(lv) not in unet.recurrence:
            return 0, 0, 0.0
        directions = 2 if unet.bidirectional else 1
        if unet.config["cell"] == "attention":
            rnn = self.attention(lv)
        elif lv in unet.recompute_levels:  # the output, and the float32 state every few frames
            rnn = directions * (a + 4 / RECOMPUTE_FRAMES) * e
        else:  # the activated gates (float32: the gate update runs in float32), the output
            #     and the cell state / GRU candidate part (activation dtype)
            rnn = directions * (4 * _GATES[unet.config["cell"]] + 2 * a) * e
        if unet.bidirectional:
            rnn += 2 * a * e  # the two directions concatenated for the 1x1 merge
        if unet.config.get("fusion") == "gated":  # the gate's input [x, y], its sigmoid, mix
            rnn += 4 * a * e
        if unet.channels[0] >= CHANNELS_LAST_MIN_WIDTH:
            rnn += a * e  # its output copied back to the stages' channels-last layout
        weights = sum(q.numel() for q in unet.recurrence[str(lv)].parameters())
        # backward through time: float32 gradients of the whole sequence's maps and batched
        # weight-gradient temporaries
        workspace = self.const.recurrence * 4 * e + self.const.recurrence_weights * 4 * weights
        return rnn, weights, workspace

    def attention(self, lv: int) -> float:
        """Saved bytes of the memory attention at level ``lv``: per element of the level's map
        its normalised input, projections, rotated queries, attention output, residual and
        MLP (:data:`ATTENTION_PER_ELEMENT`); per frame the keys and values of the frames it
        attends over (with their time encoding); the pooled memory above the bottleneck.
        A recomputed level keeps its input only (the stage output, counted there)."""
        unet, a, e = self.unet, self.a, self.elems[lv]
        if lv in unet.recompute_levels:
            return 0.0
        low, fp32 = ATTENTION_PER_ELEMENT
        pooled = self.sizes[-1]  # memory tokens per frame: the bottleneck's grid
        bank = unet.config["bank"]
        attended = sum(min(j + 1, bank + 1) for j in range(self.window))  # frames, all queries
        keys = 2 * a * self.batch * unet.channels[lv] * pooled * attended
        pool = 2 * a * self.folded * unet.channels[lv] * pooled if lv < len(self.sizes) - 1 \
            else 0
        return (low * a + fp32 * 4) * e + keys + pool

    def levels(self, gradients: int) -> tuple[list[int], int, int]:
        """Saved bytes per level, the largest recomputed piece, and the peak during the
        recurrence's backward (what is still saved then and the gradients so far)."""
        per_level, recompute, recurrent = [], 0, -gradients
        encoder_side = encoder_params = 0
        for lv in range(len(self.elems)):
            enc, dec, piece = self.stages(lv)
            rnn, weights, workspace = self.recurrence(lv)
            recompute = max(recompute, piece)
            encoder_side += enc + rnn
            encoder_params += sum(q.numel() for q in self.unet.encoder[lv].parameters())
            if rnn:
                # its backward runs once every decoder stage's has: what is still saved then
                # is the encoder side up to its level, and the gradients of everything else
                # (the last step's gradients were freed before the backward)
                encoder_params += weights
                recurrent = max(recurrent,
                                int(encoder_side + workspace - 4 * encoder_params))
            per_level.append(int(enc + dec + rnn))
        return per_level, recompute, recurrent


def memory_breakdown(model_config: Any, roi: int | Sequence[int], window: int, batch: int,
                     precision: str = "fp32", recompute: bool | None = None, *,
                     device: str = "cuda") -> MemoryEstimate:
    """The components of one training step's peak memory (see :func:`estimate_memory`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = "cuda" if str(device).startswith("cuda") else "cpu"
    for name, v in (("window", window), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    model = meta_model(model_config, recompute)
    if model.frames is not None and window != model.frames:
        raise ValueError(f"the time-as-channels model is built for windows of "
                         f"{model.frames} frames, got window={window}")
    step = _Step(model, per_axis("roi", roi, getattr(model, "unet", model).spatial_dims),
                 window, batch, precision, device)
    const, unet, a = step.const, step.unet, step.a
    n_params = sum(p.numel() for p in model.parameters())
    gradients = 4 * n_params
    per_level, piece, recurrent = step.levels(gradients)
    activations = sum(per_level) + LOSS_BYTES_PER_LOGIT * step.folded * step.sizes[0] \
        * unet.out_channels
    if step.low:  # autocast's low-precision copies of the per-frame convolution weights,
        #           kept for backward (the recurrence casts its weights itself, keeps none)
        activations += 2 * sum(p.numel() for name, p in model.named_parameters()
                               if p.dim() > 2 and ".recurrence." not in f".{name}")
    # the peaks above the persistent state: the end of the forward (the loss's temporaries,
    # the last step's gradients still alive), the start of the backward (those gradients
    # freed; the first activation gradients and the largest operation's workspace, or the
    # recomputed piece of a recomputed stage: level 0's decoder comes first and is the
    # largest), the recurrence's backward, the optimizer step
    workspace = int(max(const.transient * a * max(step.elems), const.recompute * piece))
    largest = max((p.numel() for p in model.parameters()), default=0)
    opt_ws = int(const.optimizer * 4 * (largest if device == "cpu" else n_params))
    phases = {"forward": activations + const.forward * a * max(step.elems),
              "backward": activations - gradients + workspace, "recurrence": recurrent,
              "optimizer": opt_ws}
    phase = max(phases, key=phases.get)
    per_frame = unet.in_channels // (window if step.tac else 1)
    in_frames = step.folded if not step.tac else batch * window
    batch_bytes = in_frames * math.prod(per_axis("roi", roi, unet.spatial_dims)) \
        * (4 * per_frame + 8)
    # parameters, AdamW's moments and the gradients (kept from one step to the next until
    # the forward is done: fit sets them to None just before backward)
    total = 4 * 4 * n_params + max(0, phases[phase]) + batch_bytes + const.fixed
    return MemoryEstimate(
        total=int(total), parameters=4 * n_params, optimizer_state=8 * n_params,
        gradients=gradients, activations=int(activations), workspace=workspace,
        optimizer_workspace=opt_ws, batch=int(batch_bytes), fixed=const.fixed,
        per_level=per_level, phase=phase)


def estimate_memory(model_config: Any, roi: int | Sequence[int], window: int, batch: int,
                    precision: str = "fp32", recompute: bool | None = None, *,
                    device: str = "cuda") -> int:
    """Predicted peak memory (bytes) of one training step with AdamW.

    Args:
        model_config: what ``create_model`` builds: a dict with ``name`` and keyword arguments
            (``model.config``), a :class:`~clstm4d.engine.run.config.ModelSpec` or a
            :class:`~clstm4d.engine.run.config.ModelConfig` (its sizes filled in).
        roi: the patch, one int per spatial axis (or one for all).
        window: frames per sample ``t``; batch: samples per step ``n``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).
        recompute: recompute activations in backward (``None``: as ``model_config`` says).
        device: ``"cuda"`` (default) or ``"cpu"``: which calibration and autocast rules.

    Returns:
        Bytes: persistent state (parameters, AdamW moments) plus the larger of the
        activation peak (saved activations and workspace) and the optimizer phase (gradients
        and temporaries), plus the batch.

    Examples:
        >>> gb = estimate_memory({"name": "reference"}, roi=64, window=5, batch=1) / 2**30
        >>> 5 < gb < 30
        True
        >>> ckpt = estimate_memory({"name": "reference"}, 64, 5, 1, recompute=True)
        >>> ckpt < gb * 2**30 / 2
        True
    """
    return memory_breakdown(model_config, roi, window, batch, precision, recompute,
                            device=device).total


def step_macs(model_config: Any, roi: Sequence[int], window: int, batch: int,
              recompute: bool | None = None) -> float:
    """Multiply-accumulates of the convolutions of one training step (forward, backward as
    twice the forward, plus the forward of the recomputed levels again): what step time
    scales with."""
    model = meta_model(model_config, recompute)
    tac = isinstance(model, TimeAsChannelsUNet)
    unet = model.unet if tac else model
    folded = batch if tac else batch * window
    sizes = [math.prod(s) for s in level_shapes(per_axis("roi", list(roi), unet.spatial_dims),
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
        if level in unet.recompute_levels:
            recomputed += macs
    if unet.config["cell"] == "attention":
        for level in map(int, unet.recurrence):
            macs = _attention_macs(unet, level, sizes, batch, window)
            forward += macs
            recomputed += macs if level in unet.recompute_levels else 0
    return 3 * forward + recomputed


def _attention_macs(unet, level: int, sizes: Sequence[int], batch: int, window: int) -> float:
    """Multiply-accumulates of one forward of the memory attention at ``level``: per query
    token its projections, output and MLP (6 c^2); per memory token its keys and values, own
    and for the bank (4 c^2); and the attention itself (2 c per query and key token: the
    frame's own tokens and the bank's, at most ``bank`` frames)."""
    c, q, p = unet.channels[level], sizes[level], sizes[-1]
    attended = sum(min(j + 1, unet.config["bank"] + 1) for j in range(window))
    return batch * (window * (6 * c * c * q + 4 * c * c * p) + 2 * c * q * p * attended)
