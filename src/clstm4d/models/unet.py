"""Time-resolved UNet: a per-frame UNet with convolutional recurrent memory across frames.

Shape legend: ``n`` batch, ``t`` time (frames), ``c`` channels, ``k`` classes (``out_channels``),
``*s`` spatial axes (``(w,)``, ``(h, w)`` or ``(d, h, w)``), ``L`` levels (``len(channels)``).

Layout: the encoder and decoder run on every frame with batch and time folded together
(``(n*t, c, *s)``); the recurrence unfolds time (``(n, t, c, *s)``) where it sits:

- ``temporal="bottleneck"``: one ConvLSTM/ConvGRU on the deepest features (the reference design);
- ``temporal="skips"``: one at the output of every encoder level; its output is both the skip
  connection and the input of the next level (recurrence along the whole encoder, as
  cell-tracking networks do);
- ``temporal="none"``: no recurrence: every frame is segmented on its own (the baseline).

``cell`` chooses the temporal block: a ConvLSTM (``"lstm"``), a ConvGRU (``"gru"``) or memory
attention over a bank of past frames (``"attention"``, :mod:`clstm4d.models.memattn`).

There are ``L - 1`` poolings and exactly ``L - 1`` upsampling stages, so every upsampled map
lines up with its skip; the input is zero-padded up to a multiple of the total stride of each
axis (the product of that axis' pooling strides; ``2**(L-1)`` by default) and the logits
cropped back, so any spatial size works. Pooling ``strides`` and convolution ``kernel_sizes``
can differ per level and per axis (the DynUNet convention), for anisotropic voxels: an axis
with coarse spacing keeps stride 1 and kernel 1 until the others have caught up.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from clstm4d._common import check_choice, check_int, check_spatial_dims
from clstm4d.models.blocks import (
    ACTS,
    NORMS,
    DecoderStage,
    EncoderStage,
    crop_to,
    layer,
    pad_to_multiple,
)
from clstm4d.models.memattn import MemoryAttention
from clstm4d.nn import ConvGRU, ConvLSTM

__all__ = ["TimeResolvedUNet"]

TEMPORAL = ("bottleneck", "skips", "none")
#: how a recurrence's output enters the network: it replaces the level's features, or a
#: learnt per-voxel gate mixes the two (``x + g (y - x)``, ``g = sigmoid(conv1x1([x, y]))``)
FUSIONS = ("replace", "gated")
#: ``recompute=True`` recomputes a level (its encoder stage, decoder stage and recurrence) when
#: its per-frame feature map holds at least this share of level 0's elements: in 3D with
#: doubling widths, levels 0 and 1 (~94% of the per-frame activations, ~80% of the conv FLOPs);
#: deeper levels are cheap to keep and costly to recompute.
RECOMPUTE_MIN_SHARE = 1 / 8
#: The per-frame stages run channels-last when the first width is at least this.
CHANNELS_LAST_MIN_WIDTH = 32
_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}
CELLS = {"lstm": ConvLSTM, "gru": ConvGRU}
#: ``cell=`` choices: the recurrent cells, and memory attention over a bank of past frames
TEMPORAL_CELLS = (*CELLS, "attention")
#: the bank of ``cell="attention"`` when ``bank`` is not given
DEFAULT_BANK = 8


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    # models report every bad argument as ValueError (create_model turns it into a ConfigError)
    try:
        return check_int(name, value, minimum, owner)
    except TypeError as e:
        raise ValueError(str(e)) from None


def check_unet_args(owner: str, spatial_dims: Any, in_channels: Any, out_channels: Any,
                    channels: Any, norm: Any, act: Any, dropout: Any) -> tuple[int, ...]:
    """Validate the arguments every UNet here shares; returns ``channels`` as a tuple."""
    check_spatial_dims(spatial_dims, owner)
    _positive_int(owner, "in_channels", in_channels)
    _positive_int(owner, "out_channels", out_channels)
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
        raise ValueError(
            f"{owner}: channels must be a non-empty sequence of ints (widths per level, "
            f"e.g. (16, 32, 64, 128)), got {channels!r}"
        )
    for c in channels:
        _positive_int(owner, "channels[i]", c)
    check_choice("norm", norm, NORMS, owner)
    check_choice("act", act, tuple(ACTS), owner)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not (
        0 <= dropout < 1
    ):
        raise ValueError(f"{owner}: dropout must be a float in [0, 1), got {dropout!r}")
    return tuple(int(c) for c in channels)


def _per_axis_levels(owner: str, name: str, value: Any, count: int, spatial_dims: int,
                     default: int, odd: bool) -> tuple[tuple[int, ...], ...]:
    """``count`` per-axis tuples of ints >= 1 from ``value``: None (``default`` everywhere), or
    a sequence of ``count`` entries, each an int (all axes) or ``spatial_dims`` ints."""
    if value is None:
        return ((default,) * spatial_dims,) * count
    example = ", ".join(["(" + ", ".join([str(default)] * spatial_dims) + ")"] * max(count, 1))
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count:
        raise ValueError(
            f"{owner}: {name} must be a sequence of {count} entries (one per "
            f"{'pooling' if name == 'strides' else 'level'}, each an int or {spatial_dims} ints "
            f"in the arrays' axis order, e.g. [{example}]), got {value!r}")
    out = []
    for i, entry in enumerate(value):
        axes = (entry,) * spatial_dims if isinstance(entry, numbers.Integral) else entry
        ok = (not isinstance(axes, (str, bytes)) and isinstance(axes, Sequence)
              and len(axes) == spatial_dims
              and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                      and (not odd or v % 2 == 1) for v in axes))
        if not ok:
            what = "odd ints >= 1" if odd else "ints >= 1"
            raise ValueError(f"{owner}: {name}[{i}] must be an int or {spatial_dims} {what} "
                             f"(one per spatial axis), got {entry!r}")
        out.append(tuple(int(v) for v in axes))
    return tuple(out)


def check_strides_kernels(owner: str, spatial_dims: int, levels: int, strides: Any,
                          kernel_sizes: Any) -> tuple[tuple[tuple[int, ...], ...],
                                                      tuple[tuple[int, ...], ...]]:
    """Validate per-level, per-axis pooling ``strides`` (``levels - 1`` entries) and conv
    ``kernel_sizes`` (``levels`` entries, odd); ``None`` = 2 and 3 on every axis.

    Examples:
        >>> check_strides_kernels("net", 3, 3, [(2, 2, 1), 2], [(3, 3, 1), 3, 3])
        (((2, 2, 1), (2, 2, 2)), ((3, 3, 1), (3, 3, 3), (3, 3, 3)))
    """
    return (_per_axis_levels(owner, "strides", strides, levels - 1, spatial_dims, 2, False),
            _per_axis_levels(owner, "kernel_sizes", kernel_sizes, levels, spatial_dims, 3, True))


def total_strides(strides: Sequence[Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """The product of the pooling strides of each axis: what the input is padded to a multiple
    of."""
    return tuple(math.prod(s[a] for s in strides) for a in range(spatial_dims))


def check_sequence_input(owner: str, x: Tensor, spatial_dims: int, in_channels: int) -> None:
    """Raise a ValueError naming the expected ``(n, t, c, *s)`` layout when ``x`` differs."""
    expected = 3 + spatial_dims
    layout = "(N, T, C, " + ", ".join("DHW"[3 - spatial_dims:]) + ")"
    if x.dim() != expected:
        hint = ""
        if x.dim() == expected - 1:
            hint = " (a single frame or a sequence without a batch axis? use x.unsqueeze(0) " \
                   "or x.unsqueeze(1) to add the missing axis)"
        raise ValueError(
            f"{owner}: expected input of {expected} dims {layout} for spatial_dims="
            f"{spatial_dims}, got {x.dim()} dims with shape {tuple(x.shape)}{hint}"
        )
    if x.shape[2] != in_channels:
        raise ValueError(
            f"{owner}: expected {in_channels} input channels at axis 2 of {layout}, got "
            f"{x.shape[2]} (input shape {tuple(x.shape)})"
        )
    if x.shape[1] < 1 or x.shape[0] < 1:
        raise ValueError(f"{owner}: expected at least one sample and one frame, got shape "
                         f"{tuple(x.shape)}")


def check_memory(owner: str, temporal: str, cell: Any, bidirectional: Any, bank: Any
                 ) -> int | None:
    """Validate ``cell`` and ``bank`` against the placement; returns the bank (None unless
    ``cell="attention"``). Messages name the option and what is allowed."""
    check_choice("cell", cell, TEMPORAL_CELLS, owner)
    if cell != "attention":
        if bank is not None:
            raise ValueError(f"{owner}: bank={bank!r} is an option of cell='attention' only "
                             f"(cell={cell!r} keeps its memory in its state); leave it out")
        return None
    if temporal == "none":
        raise ValueError(f"{owner}: cell='attention' needs a place: temporal='bottleneck' or "
                         "'skips' (temporal='none' has no temporal block)")
    if bidirectional:
        raise ValueError(f"{owner}: bidirectional=True is not available with cell='attention' "
                         "(memory attention is causal: it attends over past frames only); use "
                         "cell='lstm' or 'gru' for a bidirectional model")
    bank = DEFAULT_BANK if bank is None else bank
    return _positive_int(owner, "bank", bank)


class _Recurrence(nn.Module):
    """The temporal block of one level, keeping the width: a one-layer ConvLSTM/ConvGRU (a 1x1
    convolution folds the two directions back to ``channels`` when bidirectional) or
    :class:`~clstm4d.models.memattn.MemoryAttention` over a bank of past frames (``pool``: its
    memory tokens' window). Under autocast the convolutions run in the autocast dtype and the
    recurrent state in float32 (see :class:`clstm4d.ConvLSTM`).

    Shape:
        ``(n, t, c, *s)`` -> ``(n, t, c, *s)``.
    """

    def __init__(self, spatial_dims: int, channels: int, cell: str,
                 kernel_size: int | tuple[int, ...],
                 bidirectional: bool, recompute: bool, backend: str = "auto",
                 fusion: str = "replace", bank: int = 8, pool: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.cell = cell
        self.recompute = recompute and cell == "attention"  # the RNNs recompute themselves
        self.rnn = (MemoryAttention(spatial_dims, channels, bank, pool) if cell == "attention"
                    else CELLS[cell](spatial_dims, channels, channels, kernel_size,
                                     bidirectional=bidirectional, recompute=recompute,
                                     backend=backend))
        self.proj = (layer("conv", spatial_dims, 2 * channels, channels, kernel_size=1)
                     if bidirectional else None)
        self.gate = (layer("conv", spatial_dims, 2 * channels, channels, kernel_size=1)
                     if fusion == "gated" else None)

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        if self.recompute and torch.is_grad_enabled():
            y, state = _checkpoint(self.rnn, x, state, use_reentrant=False)
        else:
            y, state = self.rnn(x, state)  # (n, t, D*c, *s)
        if self.proj is not None:
            y = self.proj(y.flatten(0, 1)).unflatten(0, (-1, y.shape[1]))  # (n, t, c, *s)
        if self.gate is not None:  # per frame and voxel: how much of the memory to take
            y = y.to(x.dtype)
            g = torch.sigmoid(self.gate(torch.cat([x, y], 2).flatten(0, 1)))  # (n*t, c, *s)
            y = torch.lerp(x, y, g.unflatten(0, (-1, y.shape[1])).to(y.dtype))
        return y, state


class TimeResolvedUNet(nn.Module):
    r"""UNet for sequences of 1D/2D/3D maps with ConvLSTM/ConvGRU memory across frames.

    Every frame goes through the same encoder and decoder (batch and time folded); the
    recurrence carries information between frames at the bottleneck (``"bottleneck"``), at
    every encoder level (``"skips"``) or nowhere (``"none"``). Logits come out for every frame.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: channels per frame of the input.
        out_channels: classes ``k`` (softmax over them; class 0 = background).
        channels: widths per level; ``len(channels) - 1`` poolings. Default ``(16, 32, 64, 128)``.
        temporal: ``"bottleneck"``, ``"skips"`` or ``"none"``. Default ``"bottleneck"``.
        cell: ``"lstm"``, ``"gru"`` or ``"attention"``
            (:class:`~clstm4d.models.memattn.MemoryAttention`: every frame attends over its own
            and the last ``bank`` frames' features; not bidirectional; at a level above the
            bottleneck its memory tokens are pooled to the bottleneck's grid). Default
            ``"lstm"``.
        bank: frames of memory of ``cell="attention"`` (an int >= 1; default
            :data:`DEFAULT_BANK`); only with that cell.
        bidirectional: run the recurrence both ways (offline analysis; not streamable; a 1x1
            convolution merges the two directions). Default False.
        rnn_kernel_size: kernel of the recurrent convolutions on the axes where the level's
            convolution kernel is larger than 1 (1 where it is 1). Default 3.
        norm: ``"instance"`` (default, per frame), ``"batch"`` (statistics pooled over batch
            and frames in training mode), ``"group"`` (``gcd(8, c)`` groups) or ``"none"``.
        act: ``"leakyrelu"`` (default, slope 0.1), ``"relu"``, ``"gelu"`` or ``"silu"``.
        dropout: dropout probability after every convolution unit. Default 0.
        strides: pooling window/stride per axis before levels 1 .. L-1: ``L - 1`` entries,
            each an int or one int per spatial axis (arrays' axis order). Default 2 everywhere.
        kernel_sizes: convolution kernel per axis at levels 0 .. L-1 (odd): ``L`` entries,
            each an int or one per axis; the decoder stage of a level uses the same. Default 3.
        recompute: recompute activations during backward at the high-resolution levels,
            where nearly all activation memory sits (see :data:`RECOMPUTE_MIN_SHARE`): their
            encoder and decoder stages (the head inside the last one; large stages in pieces of
            the folded batch and time axis when ``norm`` is not ``"batch"`` and ``dropout`` is
            0) and their recurrence (``recompute=True`` of the core layers). Same gradients,
            less memory, more time. Default False.
        backend: the recurrence's ``backend`` (:class:`clstm4d.ConvLSTM`): ``"auto"``
            (default), ``"fused"`` or ``"reference"``.
        fusion: ``"replace"`` (default: the recurrence's output replaces the level's
            features) or ``"gated"`` (a 1x1 convolution of both gives a per-voxel gate ``g``
            and the level passes on ``x + g (y - x)``; see :data:`FUSIONS`).

    Shape:
        - x: ``(N, T, C_in, *S)``, any ``*S``, any ``T >= 1``.
        - output: logits ``(N, T, C_out, *S)``; with ``return_state=True`` also the state.

    Attributes:
        streamable: True when running a sequence in chunks of frames with the state carried
            (``state=``, ``return_state=True``) gives the one-pass output; False when
            bidirectional.
        config: the keyword arguments that rebuild the model through
            :func:`clstm4d.create_model` (``config["name"]`` is the preset).

    Examples:
        >>> import torch
        >>> net = TimeResolvedUNet(2, in_channels=1, out_channels=3, channels=(4, 8))
        >>> x = torch.randn(2, 5, 1, 13, 20)              # (N, T, C, H, W)
        >>> tuple(net(x).shape)
        (2, 5, 3, 13, 20)
        >>> a, state = net(x[:, :3], return_state=True)   # stream: first 3 frames ...
        >>> b, state = net(x[:, 3:], state=state, return_state=True)   # ... then the rest
        >>> torch.allclose(torch.cat([a, b], 1), net(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        temporal: str = "bottleneck",
        cell: str = "lstm",
        bidirectional: bool = False,
        rnn_kernel_size: int = 3,
        norm: str = "instance",
        act: str = "leakyrelu",
        dropout: float = 0.0,
        recompute: bool = False,
        strides: Sequence[int | Sequence[int]] | None = None,
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
        backend: str = "auto",
        fusion: str = "replace",
        bank: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        channels = check_unet_args(owner, spatial_dims, in_channels, out_channels, channels,
                                   norm, act, dropout)
        strides, kernels = check_strides_kernels(owner, spatial_dims, len(channels), strides,
                                                 kernel_sizes)
        check_choice("temporal", temporal, TEMPORAL, owner)
        bank = check_memory(owner, temporal, cell, bidirectional, bank)
        check_choice("fusion", fusion, FUSIONS, owner)
        _positive_int(owner, "rnn_kernel_size", rnn_kernel_size)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.strides = strides
        self.kernel_sizes = kernels
        self.temporal = temporal
        self.bidirectional = bool(bidirectional) and temporal != "none"
        self.recompute = bool(recompute)
        # per-item stages (no batch statistics, no dropout) may be recomputed in pieces
        self._chunkable = norm != "batch" and dropout == 0
        # wide per-frame convolutions run channels-last (oneDNN's native layout on CPU: -30%
        # time at 64 channels); narrow ones (8-16 channels) run faster in the default layout
        self._layout = (_CHANNELS_LAST.get(spatial_dims, torch.contiguous_format)
                        if channels[0] >= CHANNELS_LAST_MIN_WIDTH else torch.contiguous_format)
        share = [channels[lv] / channels[0] / math.prod(math.prod(s) for s in strides[:lv])
                 for lv in range(len(channels))]
        self._recompute_levels = frozenset(
            lv for lv in range(len(channels)) if recompute and share[lv] >= RECOMPUTE_MIN_SHARE)
        self.config: dict[str, Any] = {
            "name": "unet", "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": out_channels, "channels": list(channels), "temporal": temporal,
            "cell": cell, "bidirectional": bool(bidirectional),
            "rnn_kernel_size": rnn_kernel_size, "norm": norm, "act": act,
            "dropout": float(dropout), "recompute": bool(recompute),
            "strides": [list(s) for s in strides], "kernel_sizes": [list(k) for k in kernels],
            "backend": backend, "fusion": fusion, "bank": bank,
        }

        self._build(norm, act, dropout, cell, rnn_kernel_size, backend, fusion, bank)

    def _build(self, norm: str, act: str, dropout: float, cell: str, rnn_kernel_size: int,
               backend: str, fusion: str, bank: int | None) -> None:
        """The encoder and decoder stages, the head, and the recurrence at its levels."""
        d, channels, strides, kernels = (self.spatial_dims, self.channels, self.strides,
                                         self.kernel_sizes)
        widths = (self.in_channels, *channels)
        self.encoder = nn.ModuleList(
            EncoderStage(d, widths[i], widths[i + 1], norm, act, dropout,
                         stride=strides[i - 1] if i > 0 else None, kernel_size=kernels[i])
            for i in range(len(channels))
        )
        # decoder[j] brings level j + 1 up to level j; it runs deepest first
        self.decoder = nn.ModuleList(
            DecoderStage(d, channels[j + 1], channels[j], norm, act, dropout,
                         stride=strides[j], kernel_size=kernels[j])
            for j in range(len(channels) - 1)
        )
        self.head = layer("conv", d, channels[0], self.out_channels, kernel_size=1)
        levels = {"bottleneck": [len(channels) - 1], "skips": range(len(channels)),
                  "none": []}[self.temporal]
        # the recurrent kernel follows its level's: 1 on the axes the level's convolutions skip
        self.recurrence = nn.ModuleDict({
            str(level): _Recurrence(d, channels[level], cell,
                                    tuple(rnn_kernel_size if k > 1 else 1
                                          for k in kernels[level]),
                                    self.bidirectional, level in self._recompute_levels,
                                    backend, fusion, bank or DEFAULT_BANK,
                                    total_strides(strides[level:], d))
            for level in levels
        })

    #: any number of frames (see :class:`~clstm4d.models.protocol.SequenceModel`)
    frames = None

    @property
    def streamable(self) -> bool:
        """True when chunked inference with the state carried equals one pass."""
        return not self.bidirectional

    @property
    def recompute_levels(self) -> frozenset[int]:
        """The levels recomputed in backward with ``recompute=True`` (see
        :data:`RECOMPUTE_MIN_SHARE`); empty without it."""
        return self._recompute_levels

    def _check_state(self, state: Any) -> list[Any]:
        count = len(self.recurrence)
        if state is None:
            return [None] * count
        if not isinstance(state, tuple) or len(state) != count:
            raise ValueError(
                f"{type(self).__name__}: state must be the tuple of {count} entries that a "
                f"previous call with return_state=True returned, got "
                f"{type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else "")
            )
        return list(state)

    def forward(self, x: Tensor, state: Any = None, return_state: bool = False):
        """Segment every frame.

        Args:
            x: ``(N, T, C_in, *S)``.
            state: the state returned by a previous call with ``return_state=True``, to
                continue the same sequences (unidirectional models only).
            return_state: also return the state after the last frame.

        Shape:
            ``(N, T, C_in, *S)`` -> logits ``(N, T, C_out, *S)``.
        """
        check_sequence_input(type(self).__name__, x, self.spatial_dims, self.in_channels)
        if (state is not None or return_state) and not self.streamable:
            raise ValueError(
                f"{type(self).__name__}: state/return_state need a streamable model; this one "
                "is bidirectional (its output at a frame depends on later frames)"
            )
        states = self._check_state(state)
        new_states = []
        n, t = x.shape[:2]
        h = x.flatten(0, 1)  # (n*t, c, *s)
        h, size = pad_to_multiple(h, total_strides(self.strides, self.spatial_dims),
                                  self.spatial_dims)
        layout = self._layout
        h = h.contiguous(memory_format=layout)
        ckpt = self._recompute_levels
        skips: list[Tensor] = []
        for level, stage in enumerate(self.encoder):
            h = stage(h, level in ckpt, self._chunkable)  # (n*t, c_level, *s_level)
            if str(level) in self.recurrence:
                seq = h.unflatten(0, (-1, t)).contiguous()  # (n, t, c_level, *s_level)
                seq, st = self.recurrence[str(level)](seq, states[len(new_states)])
                new_states.append(st)
                h = seq.flatten(0, 1).contiguous(memory_format=layout)
            skips.append(h)
        h = skips.pop()
        if not self.decoder:
            h = self.head(h)
        for j in reversed(range(len(self.decoder))):  # the head runs inside the last stage
            h = self.decoder[j](h, skips.pop(), j in ckpt, self._chunkable,
                                head=self.head if j == 0 else None)
        logits = crop_to(h, size).unflatten(0, (-1, t)).contiguous()  # (n, t, k, *s)
        if return_state:
            return logits, tuple(new_states)
        return logits
