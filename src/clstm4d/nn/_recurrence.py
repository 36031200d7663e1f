"""One direction of one ConvLSTM/ConvGRU layer: the fused driver and the reference path.

Both take the same arguments (:class:`Spec`, then ``x, mask, h0, c0, w_ih, b_x, w_hh,
b_hh, peep``) and return ``(out, h_n)`` or ``(out, h_n, c_n)``:

- :func:`reference_direction`: autograd through the cell spec's update, frame by frame
  (``backend="reference"``; torch.compile; second-order gradients of the fused path);
- :class:`ConvRecurrence`: one autograd node with a hand-written backward through time
  (``backend="fused"``), made of named steps: :meth:`_Direction.run_segment` (the forward
  and the recompute of a segment), :meth:`_Direction.segment_activations` (kept or
  recomputed), :meth:`_Direction.backward_segment` (per-step gate gradients) and
  :meth:`_Direction.accumulate` (input, weight and bias gradients batched over a segment).

The fused path in short:

- forward: the input convolution runs once over all frames of a segment (batch and time
  folded); per step only the hidden convolution runs, and the gate activations are written
  in place into the buffer that held the input convolution's output;
- saved for backward: the activated gates ``(n, t, g*h, *s)``, the GRU's ``W_hn h + b_hn``
  per frame, the output, the layer input and the states at segment starts - nothing else;
  the backward writes the gate gradients over the saved gates unless the graph is retained
  and recomputes the LSTM's cell states from them;
- ``recompute``: the forward keeps only the output and the state at segment starts; the
  backward recomputes each segment (input convolution included) with the same runner.

Precision: the convolutions run in ``Spec.dtype`` (the autocast dtype, bfloat16 or float16;
float32 accumulation, the bias added inside, the result rounded once) and everything else in
the parameters' dtype (float32): the input and hidden gates are summed in float32, and the
gate non-linearities, the cell state and the carried hidden state stay float32 (the state
accumulates over frames; its rounding would compound and make streamed chunks differ from one
pass), and so do the gate gradients, the bias gradients and the weight-gradient sums over
segments. The output comes back in the convolution dtype; ``h_n`` and ``c_n`` in float32.
The low-precision copies of the weights are made where a convolution needs them and dropped
right after (they are never saved for backward: at a 512-channel bottleneck they would hold
113 MB until backward).

Shape legend: ``n`` batch, ``t`` time, ``k`` frames of a segment, ``c`` input channels,
``h`` hidden channels, ``g`` gates, ``*s`` spatial axes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from clstm4d.nn import _kernels as kernels
from clstm4d.nn._cells import CellSpec

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Spec(NamedTuple):
    """Static description of one direction of one layer."""

    cell: CellSpec
    pad: tuple[int, ...]  # F.pad order (last axis first), "same" padding
    dilation: tuple[int, ...]
    reverse: bool
    segment: int  # frames per segment (backward, recomputation, inference)
    recompute: bool
    grad: bool  # autograd will need a backward (grad mode on and an input requires grad)
    dtype: torch.dtype | None = None  # convolution dtype if not the parameters' (autocast)


def conv_dtype(device_type: str, param_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the convolutions run in when it is not ``param_dtype``: the autocast dtype
    for float32 parameters under autocast (autocast leaves float64 alone), else None."""
    dtype = kernels.autocast_dtype(device_type)
    if dtype is None or param_dtype != torch.float32 or dtype == param_dtype:
        return None
    return dtype


def _bcast(v: Tensor, dims: int) -> Tensor:
    """(h,) -> (1, h, 1, ..., 1) to broadcast over a ``dims``-dimensional (n, h, *s)."""
    return v.view(1, -1, *([1] * (dims - 2)))


def split_peephole(peep: Tensor | None, dims: int) -> list[Tensor] | None:
    """(3h,) -> [w_ci, w_cf, w_co], each (1, h, 1, ..., 1)."""
    return None if peep is None else [_bcast(p, dims) for p in peep.chunk(3)]


def _segments(t: int, size: int, reverse: bool) -> list[range]:
    """Frame ranges in processing order, each listing its frames in processing order.

    ``t // size`` segments (at least one) of near-equal length >= ``size`` (when t allows):
    a short last segment would run its batched convolutions at a small batch.
    """
    count = max(1, t // size)
    bounds = [round(i * t / count) for i in range(count + 1)]
    segs = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if reverse:
        segs = [range(r.stop - 1, r.start - 1, -1) for r in reversed(segs)]
    return segs


def _lo_hi(seg: range) -> tuple[int, int]:
    return min(seg[0], seg[-1]), max(seg[0], seg[-1]) + 1


# ----------------------------------------------------------------------------------------------
# reference path: autograd through the cell spec


def gate_conv(x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, ...],
              dilation: tuple[int, ...], dtype: torch.dtype | None) -> Tensor:
    """Autograd 'same' convolution ``(b, c, *s) -> (b, o, *s)`` in ``dtype`` (None: the
    weight's), returned in the weight's dtype."""
    param_dtype = weight.dtype
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    sym = all(a == b for a, b in zip(pad[::2], pad[1::2], strict=True))
    padding = tuple(pad[::2][::-1]) if sym else 0
    if not sym:
        x = F.pad(x, pad)
    y = _CONV[weight.dim() - 2](x, weight, bias, padding=padding, dilation=dilation)
    return y.to(param_dtype)


def reference_step(spec: Spec, gx: Tensor, state: tuple[Tensor, ...], w_hh: Tensor,
                   b_hh: Tensor | None, peep) -> tuple[Tensor, ...]:
    """One step from the input gates ``gx`` ``(n, g*h, *s)``; returns the new state."""
    gh = gate_conv(state[0], w_hh, b_hh, spec.pad, spec.dilation, spec.dtype)
    return spec.cell.update(gx, gh, state, peep, inplace=False)[0]


def _masked_step(spec, gx, m, state, w_hh, b_hh, peep):
    new = reference_step(spec, gx, state, w_hh, b_hh, peep)
    if m is None:
        return new[0], new
    # frames past a sequence's length keep the state and output zeros
    m = m.view(-1, *([1] * (new[0].dim() - 1)))
    new = tuple(torch.where(m, a, b) for a, b in zip(new, state, strict=True))
    return new[0] * m, new


def _checkpointed_step(spec, x_t, m, w_ih, b_x, w_hh, b_hh, peep, *state):
    gx = gate_conv(x_t, w_ih, b_x, spec.pad, spec.dilation, spec.dtype)
    return _masked_step(spec, gx, m, state, w_hh, b_hh, peep)


def reference_direction(spec: Spec, x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep):
    """The computation of :class:`ConvRecurrence` from autograd ops, frame by frame."""
    n, t = x.shape[:2]
    zero = x.new_zeros((n, w_hh.shape[1], *x.shape[3:]), dtype=w_hh.dtype)
    state = (zero if h0 is None else h0, zero if c0 is None else c0)[: spec.cell.num_state]
    peep_b = split_peephole(peep, x.dim() - 1)
    if spec.recompute and spec.grad:
        gates_x = None
    else:
        # hoisted input convolution over all frames: (n*t, c, *s) -> (n, t, g*h, *s)
        gates_x = gate_conv(x.flatten(0, 1), w_ih, b_x, spec.pad, spec.dilation,
                            spec.dtype).unflatten(0, (-1, t))  # -1: batch symbolic in ONNX
    outputs: list[Tensor | None] = [None] * t
    for ti in (range(t - 1, -1, -1) if spec.reverse else range(t)):
        m = None if mask is None else mask[:, ti]
        if gates_x is None:
            out, state = _checkpoint(_checkpointed_step, spec, x[:, ti], m, w_ih, b_x, w_hh,
                                     b_hh, peep_b, *state, use_reentrant=False)
        else:
            out, state = _masked_step(spec, gates_x[:, ti], m, state, w_hh, b_hh, peep_b)
        outputs[ti] = out
    out = torch.stack(outputs, dim=1)
    return (out if spec.dtype is None else out.to(spec.dtype), *state)


# ----------------------------------------------------------------------------------------------
# fused path


class _Direction:
    """The tensors of one direction and the steps of the fused forward and backward."""

    def __init__(self, spec: Spec, x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep) -> None:
        self.spec, self.cell = spec, spec.cell
        self.x, self.mask, self.h0, self.c0 = x, mask, h0, c0
        self.w_ih, self.b_x, self.w_hh, self.b_hh, self.peep_flat = w_ih, b_x, w_hh, b_hh, peep
        self.n, self.t = x.shape[:2]
        self.hid, self.g = w_hh.shape[1], w_hh.shape[0]
        self.frame_shape = (self.n, self.hid, *x.shape[3:])  # (n, h, *s)
        self.state_dtype = w_hh.dtype  # the parameters': float32 (or float64)
        self.dtype = spec.dtype or w_hh.dtype  # the convolutions'
        self.peep = split_peephole(peep, x.dim() - 1)
        self.segments = _segments(self.t, spec.segment, spec.reverse)
        self.order = [ti for seg in self.segments for ti in seg]
        self.position = {ti: pos for pos, ti in enumerate(self.order)}  # frame -> step

    # -- helpers ------------------------------------------------------------------------------
    def new(self, k: int | None = None, channels: int | None = None, dtype=None) -> Tensor:
        """An empty ``(n, [k,] channels or h, *s)`` buffer in ``dtype`` (the state's)."""
        shape = list(self.frame_shape)
        if channels is not None:
            shape[1] = channels
        if k is not None:
            shape.insert(1, k)
        return self.x.new_empty(shape, dtype=dtype or self.state_dtype)

    def initial_state(self) -> tuple[Tensor, ...]:
        zero = self.x.new_zeros(self.frame_shape, dtype=self.state_dtype)
        h = zero if self.h0 is None else self.h0
        c = zero if self.c0 is None else self.c0
        return (h, c)[: self.cell.num_state]

    def mask_at(self, ti: int, dtype=None) -> Tensor:
        m = self.mask[:, ti].view(self.n, *([1] * (len(self.frame_shape) - 1)))
        return m if dtype is None else m.to(dtype)

    def weight(self, w: Tensor) -> Tensor:
        """``w`` in the convolution dtype (a transient copy under mixed precision)."""
        return w.to(self.dtype)

    def conv(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """'same' convolution in the convolution dtype (``w`` already in it; the result too:
        the caller converts it, where it is added into a float32 buffer)."""
        spec = self.spec
        bias = None if bias is None else bias.to(self.dtype)
        return kernels.conv(x.to(self.dtype), w, bias, spec.pad, spec.dilation)

    def zero_state_gates(self) -> Tensor | None:
        """The hidden gates of a zero hidden state: the hidden bias (broadcast) or None."""
        b = self.b_hh
        return None if b is None else _bcast(b.to(self.dtype), len(self.frame_shape))

    # -- forward and recompute ------------------------------------------------------------
    def run_segment(self, si: int, state: tuple[Tensor, ...], out: Tensor,
                    aux: Tensor | None, write: bool = True) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run the frames of segment ``si`` from ``state``.

        Returns the activated gates ``(n, k, g*h, *s)`` (state dtype) and the state after
        the segment. Writes each frame's output into ``out`` ``(n, t, h, *s)`` if ``write``
        (else it is a recompute, and the output exists) and the cell's per-frame tensor for
        the backward into ``aux`` ``(n, k, h, *s)`` unless None.
        """
        seg = self.segments[si]
        lo, hi = _lo_hi(seg)
        # input convolution of the segment's frames: (n*k, c, *s) -> (n, k, g*h, *s)
        gates = self.conv(self.x[:, lo:hi].flatten(0, 1), self.weight(self.w_ih), self.b_x)
        gates = gates.to(self.state_dtype).unflatten(0, (self.n, hi - lo))
        w_hh = self.weight(self.w_hh)
        h_conv = None  # the hidden state in the convolution dtype, when already at hand
        for ti in seg:
            j = ti - lo
            if ti == self.order[0] and self.h0 is None:
                gh = self.zero_state_gates()  # the first frame's hidden conv of zeros
            else:
                h_conv = state[0].to(self.dtype) if h_conv is None else h_conv
                gh = self.conv(h_conv, w_hh, self.b_hh)
            new, extra = self.cell.update(gates[:, j], gh, state, self.peep, inplace=True)
            h_conv = None
            if self.mask is None:
                if write:
                    out[:, ti].copy_(new[0])
                h_conv = out[:, ti]  # == h in the convolution dtype: no second cast
            else:
                m = self.mask_at(ti)
                if write:
                    torch.mul(new[0], m, out=out[:, ti])
                new = tuple(torch.where(m, a, b) for a, b in zip(new, state, strict=True))
            if aux is not None:
                value = self.cell.aux(new, extra)
                if value is None:
                    aux[:, j].zero_()
                else:
                    aux[:, j].copy_(value)
            state = new
        return gates, state

    def start_to_save(self, state: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """The state at a segment's start as saved for backward: h only where the output
        does not give it back (lengths; a low-precision output read by the update)."""
        spec = self.spec
        need_h = spec.recompute and (self.mask is not None or (
            self.dtype != self.state_dtype and self.cell.update_reads_h))
        return (state[0] if need_h else None, *state[1:])

    def forward(self):
        """Returns out, the final state and what the backward needs."""
        spec = self.spec
        keep = spec.grad and not spec.recompute  # keep the gates for backward
        out = self.new(self.t, dtype=self.dtype)
        aux_all = self.new(self.t) if keep and not self.cell.aux_from_gates else None
        state = self.initial_state()
        kept, starts = [], []
        for si, seg in enumerate(self.segments):
            lo, hi = _lo_hi(seg)
            if spec.grad:
                starts.append(self.start_to_save(state))
            gates, state = self.run_segment(
                si, state, out, None if aux_all is None else aux_all[:, lo:hi])
            if keep:
                kept.append(gates)
        return out, tuple(s.clone() for s in state), kept, aux_all, starts

    # -- backward ---------------------------------------------------------------------------
    def segment_start(self, si: int, starts, out: Tensor) -> tuple[Tensor, ...]:
        h, *rest = starts[si]
        if h is None:  # the output of the segment before (no lengths), or h_0
            h = self.initial_state()[0] if si == 0 else out[:, self.segments[si - 1][-1]]
        return (h, *rest)

    def segment_activations(self, si: int, kept, aux_all, starts, out):
        """The activated gates ``(n, k, g*h, *s)`` and the cell's per-frame tensor
        ``(n, k, h, *s)`` of segment ``si``: kept by the forward, or recomputed."""
        seg = self.segments[si]
        lo, hi = _lo_hi(seg)
        if not kept:  # recompute: run the segment again
            aux = self.new(hi - lo)
            gates, _ = self.run_segment(si, self.segment_start(si, starts, out), out, aux,
                                        write=False)
            return gates, aux
        gates = kept[si]
        if not self.cell.aux_from_gates:
            return gates, aux_all[:, lo:hi]
        aux = self.new(hi - lo)
        prev = starts[si][1]
        for ti in seg:
            value = self.cell.cell_state(gates[:, ti - lo], prev)
            if self.mask is not None:
                value = torch.where(self.mask_at(ti), value, prev)
            aux[:, ti - lo] = value
            prev = aux[:, ti - lo]
        return gates, aux

    def previous_hidden(self, si: int, out: Tensor) -> Tensor:
        """The hidden state before every frame of segment ``si``: ``(n, k, h, *s)``."""
        seg = self.segments[si]
        lo, hi = _lo_hi(seg)
        h_prev = self.new(hi - lo, dtype=out.dtype)
        h_init = self.initial_state()[0]
        for ti in seg:
            pos = self.position[ti]
            if pos == 0:
                h_prev[:, ti - lo].copy_(h_init)
            else:
                pi = self.order[pos - 1]
                if self.mask is not None and self.h0 is not None:
                    h_prev[:, ti - lo].copy_(torch.where(self.mask_at(pi), out[:, pi], self.h0))
                else:
                    h_prev[:, ti - lo].copy_(out[:, pi])
        return h_prev

    def backward_segment(self, si, gates, aux, h_prev, starts, dout, dh, dstate, bufs,
                         w_adj, need_dh0, dpeep):
        """Per-step gate gradients of segment ``si`` (last frame first) into ``bufs``;
        returns the gradients of the hidden state and the rest of the state before it."""
        seg = self.segments[si]
        lo, hi = _lo_hi(seg)
        dgx, dgh, dgx_c, dgh_c = bufs
        sd = self.state_dtype
        w_hh = None if w_adj is not None else self.weight(self.w_hh)
        for ti in reversed(seg):
            j = ti - lo
            pos = self.position[ti]
            d_new = dh
            if dout is not None:
                d_out = dout[:, ti].to(sd)
                d_new = d_out if d_new is None else d_new + d_out
            if d_new is None:
                d_new = self.x.new_zeros(self.frame_shape, dtype=sd)
            carry_h, carry, dstate_in = None, (None,) * len(dstate), dstate
            if self.mask is not None:
                m = self.mask_at(ti, sd)
                carry_h = None if dh is None else dh * (1 - m)
                d_new = d_new * m
                carry = tuple(None if d is None else d * (1 - m) for d in dstate)
                dstate_in = tuple(None if d is None else d * m for d in dstate)
            if pos == 0:
                aux_prev = _cell_state(self.initial_state())
            else:
                pi = self.order[pos - 1]
                aux_prev = aux[:, pi - lo] if lo <= pi < hi else _cell_state(starts[si])
            direct, dstate = self.cell.backward(gates[:, j], aux_prev, aux[:, j], h_prev[:, j],
                                                d_new, dstate_in, self.peep, dgx[:, j],
                                                dgh[:, j], dpeep)
            if dgh_c is not dgh:  # the convolution dtype's copy of the gate gradients
                dgh_c[:, j].copy_(dgh[:, j])
            if dgx_c is not dgx and dgx_c is not dgh_c:
                dgx_c[:, j].copy_(dgx[:, j])
            if pos > 0 or need_dh0:
                spec = self.spec
                if w_adj is not None:
                    dh = kernels.conv(dgh_c[:, j], w_adj, None, _swap(spec.pad), spec.dilation)
                else:
                    dh = kernels.conv_input_grad(dgh_c[:, j], h_prev[:, j], w_hh, spec.pad,
                                                 spec.dilation)
                dh = dh.to(sd)
                if direct is not None:
                    dh.add_(direct)
            else:
                dh = None
            if carry_h is not None:
                dh = carry_h if dh is None else dh + carry_h
            dstate = tuple(d if c is None else d + c for d, c in zip(dstate, carry, strict=True))
        return dh, dstate

    def gradient_buffers(self, gates: Tensor, overwrite: bool):
        """Gate gradient buffers of a segment ``(n, k, g*h, *s)``: for the input and the
        hidden convolution, in the state dtype and in the convolution dtype (the same
        tensors when the dtypes agree; for the LSTM the two convolutions share one)."""
        k = gates.shape[1]
        dgx = gates if overwrite else self.new(k, self.g)
        dgh = dgx if self.cell.shared_gate_grad else self.new(k, self.g)
        if self.dtype == self.state_dtype:
            return dgx, dgh, dgx, dgh
        dgx_c = self.new(k, self.g, self.dtype)
        dgh_c = dgx_c if dgh is dgx else self.new(k, self.g, self.dtype)
        return dgx, dgh, dgx_c, dgh_c

    def accumulate(self, si, bufs, h_prev, dx, acc, want):
        """Input, weight and bias gradients of both convolutions, batched over the frames
        of segment ``si``; weight and bias gradients summed into ``acc`` in place."""
        spec = self.spec
        seg = self.segments[si]
        lo, hi = _lo_hi(seg)
        k = hi - lo
        dgx, dgh, dgx_c, dgh_c = bufs
        x_seg = self.x[:, lo:hi].flatten(0, 1)
        # the input gradient first, while the weight gradients of this segment do not exist
        # yet (oneDNN holds a reordered copy of the weights during each call)
        if dx is not None:
            dx[:, lo:hi] = kernels.conv_input_grad(
                dgx_c.flatten(0, 1), x_seg, self.weight(self.w_ih), spec.pad,
                spec.dilation).unflatten(0, (self.n, k))
        dims = [0, *range(2, dgx.dim() - 1)]  # sum over (n*k, *s) for the biases
        if want[2]:
            dgh_w, h_prev_w = dgh_c, h_prev
            first = self.order[0]
            if self.h0 is None and lo <= first < hi and self.n == 1 and k > 2:
                # the first frame's previous state is zero: no weight gradient (a view at
                # batch 1, a copy otherwise: only then; and never down to a batch of 1,
                # which PyTorch sends to a slow kernel with a large im2col buffer)
                part = slice(1, None) if first == lo else slice(None, -1)
                dgh_w, h_prev_w = dgh_c[:, part], h_prev[:, part]
            acc[2] = kernels.conv_weight_grad(dgh_w.flatten(0, 1), h_prev_w.flatten(0, 1),
                                              self.w_hh, spec.pad, spec.dilation, acc[2])
            del dgh_w, h_prev_w
        if want[3]:
            db = dgh.flatten(0, 1).sum(dims)
            acc[3] = db if acc[3] is None else acc[3].add_(db)
        del h_prev
        if want[0]:
            acc[0] = kernels.conv_weight_grad(dgx_c.flatten(0, 1), x_seg, self.w_ih, spec.pad,
                                              spec.dilation, acc[0])
        if want[1]:
            db = dgx.flatten(0, 1).sum(dims)
            acc[1] = db if acc[1] is None else acc[1].add_(db)

    def adjoint_weight(self) -> Tensor | None:
        """The gradient to the previous hidden state, per step, is a forward convolution
        with the flipped, transposed weights (oneDNN even at batch 1) when that copy is
        small next to one frame's gates; None: PyTorch's backward-data convolution."""
        w = self.w_hh
        if w.numel() > self.n * self.g * math.prod(self.frame_shape[2:]):
            return None
        return self.weight(w).transpose(0, 1).flip(list(range(2, w.dim())))

    def backward(self, kept, aux_all, starts, out, dout, dh_n, dstate_n, need):
        """Gradients of every input, in the order of :meth:`ConvRecurrence.forward`."""
        # gate gradients are written over the gates when nothing reads them after this
        # backward (the graph is not retained, or they were recomputed)
        overwrite = not kept or not kernels.graph_is_retained()
        dx = self.x.new_empty(self.x.shape) if need[1] else None
        dpeep = (None if self.peep is None else
                 [self.x.new_zeros(self.hid, dtype=self.state_dtype) for _ in range(3)])
        # weight/bias gradients: [dw_ih, db_x, dw_hh, db_hh], summed over segments in place
        # (no zero-filled accumulators: the weights can be far larger than the activations)
        want = [need[5], self.b_x is not None and need[6], need[7],
                self.b_hh is not None and need[8]]
        acc: list[Tensor | None] = [None] * 4
        need_dh0 = self.h0 is not None and need[3]
        w_adj = self.adjoint_weight()
        dh, dstate = dh_n, dstate_n
        for si in range(len(self.segments) - 1, -1, -1):
            gates, aux = self.segment_activations(si, kept, aux_all, starts, out)
            h_prev = self.previous_hidden(si, out)
            bufs = self.gradient_buffers(gates, overwrite)
            dh, dstate = self.backward_segment(si, gates, aux, h_prev, starts, dout, dh, dstate,
                                               bufs, w_adj, need_dh0, dpeep)
            del gates, aux
            self.accumulate(si, bufs, h_prev, dx, acc, want)
            del h_prev, bufs
        dh0 = dh if need_dh0 else None
        dc0 = dstate[0] if (self.cell.num_state > 1 and self.c0 is not None and need[4]) else None
        dpeep_t = torch.cat(dpeep) if (dpeep is not None and need[9]) else None
        return None, dx, None, dh0, dc0, acc[0], acc[1], acc[2], acc[3], dpeep_t


def _cell_state(state: tuple[Tensor | None, ...]) -> Tensor | None:
    """The LSTM's c of a state tuple (h, c); None for the GRU's (h,)."""
    return state[1] if len(state) > 1 else None


def _swap(pad: tuple[int, ...]) -> tuple[int, ...]:
    """Padding of the adjoint convolution (flipped kernel): left and right swap."""
    return tuple(p for pair in zip(pad[1::2], pad[::2], strict=True) for p in pair)


class ConvRecurrence(torch.autograd.Function):
    """One direction of one ConvLSTM/ConvGRU layer with a hand-written backward through time.

    Inputs: ``x`` ``(n, t, c, *s)`` in the convolution dtype; ``mask`` ``(n, t)`` bool or
    None (valid frames); ``h0``/``c0`` ``(n, h, *s)`` or None (zeros); ``w_ih``, ``b_x``
    (the input-conv bias, :meth:`CellSpec.input_bias`), ``w_hh``, ``b_hh`` (the
    hidden-conv bias), ``peep`` ``(3h,)`` or None. Outputs: ``out`` ``(n, t, h, *s)`` in
    the convolution dtype, ``h_n`` and, for the LSTM, ``c_n`` ``(n, h, *s)`` in the
    parameters' dtype.

    Second-order gradients (``create_graph=True``): the backward then differentiates
    :func:`reference_direction` under autograd instead (same numbers, differentiable).
    """

    @staticmethod
    def forward(ctx, spec: Spec, x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep):
        ctx.set_materialize_grads(False)
        with kernels.autocast_disabled(x.device.type):
            run = _Direction(spec, x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep)
            out, state, kept, aux_all, starts = run.forward()
        if spec.grad:
            ctx.spec, ctx.num_kept = spec, len(kept)
            # everything goes through save_for_backward, so that autograd frees it as soon as
            # this node's backward has run (unless the graph is retained); the weights are
            # saved as the parameters, never as their low-precision copies
            ctx.save_for_backward(x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep, out, aux_all,
                                  *kept, *(v for s in starts for v in s))
        return (out, *state)

    @staticmethod
    def backward(ctx, dout, dh_n, *dstate_n):
        spec = ctx.spec
        x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep, out, aux_all, *extra = (
            ctx.saved_tensors)
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            return _differentiable_backward(ctx, spec, (x, mask, h0, c0, w_ih, b_x, w_hh, b_hh,
                                                        peep), (dout, dh_n, *dstate_n))
        kept = extra[: ctx.num_kept]
        flat, arity = extra[ctx.num_kept:], spec.cell.num_state
        starts = [tuple(flat[i:i + arity]) for i in range(0, len(flat), arity)]
        with kernels.autocast_disabled(x.device.type):
            run = _Direction(spec, x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep)
            return run.backward(kept, aux_all, starts, out, dout, dh_n, tuple(dstate_n),
                                ctx.needs_input_grad)


def _differentiable_backward(ctx, spec: Spec, inputs, grads):
    """Gradients of :func:`reference_direction` at the saved inputs, with a graph."""
    need = ctx.needs_input_grad[1:]
    wrt = [v for v, n in zip(inputs, need, strict=True) if n]
    with torch.enable_grad(), kernels.autocast_disabled(inputs[0].device.type):
        outputs = reference_direction(spec._replace(grad=True, recompute=False), *inputs)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None]
        found = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    found = iter(found)
    result = [next(found) if n else None for n in need]
    return (None, *result)
