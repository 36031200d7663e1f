"""Fast path of the ConvLSTM/ConvGRU sequence layers: a hand-written backward through time.

:class:`ConvRecurrence` runs one direction of one layer as a single autograd node:

- forward: the input-to-hidden convolution runs once over all frames of a segment (batch and
  time folded); per step only the hidden-to-hidden convolution runs, and the gate
  activations are written in place into the buffer that held the input convolution's output;
- saved for backward: the activated gates ``(n, t, g*h, *s)``, the cell states (LSTM) or the
  hidden part of the candidate gate (GRU), the output and the layer input - nothing else;
- backward: per step only the elementwise gate derivatives and one convolution (the gradient
  that flows to the previous hidden state, as a forward convolution with flipped weights);
  the weight, bias and input gradients of both convolutions are computed batched over the
  frames of a segment;
- ``checkpoint``: the forward keeps only the output and the state at segment boundaries;
  the backward recomputes each segment's gates (input convolution included) before
  differentiating it.

On CPU with float32 every convolution goes to oneDNN (``aten.mkldnn_convolution``):
PyTorch's own dispatch sends small batch-1 convolutions to a much slower native kernel.
The reference autograd path in :mod:`clstm4d.nn.convrnn` is used under autocast and
torch.compile; the tests compare the two.

Shape legend: ``n`` batch, ``t`` time, ``k`` frames of a segment, ``c`` input channels,
``h`` hidden channels, ``g`` gates, ``*s`` spatial axes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Spec(NamedTuple):
    """Static description of one direction of one layer."""

    mode: str  # "lstm" | "gru"
    spatial_dims: int
    pad: tuple[int, ...]  # F.pad order (last axis first), "same" padding
    dilation: tuple[int, ...]
    reverse: bool
    segment: int  # frames per segment (backward, checkpoint recompute, inference)
    checkpoint: bool
    grad: bool  # autograd will need a backward (grad mode on and an input requires grad)


# ----------------------------------------------------------------------------------------------
# convolutions


def _use_onednn(x: Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _symmetric(pad: tuple[int, ...]) -> bool:
    return all(a == b for a, b in zip(pad[::2], pad[1::2], strict=True))


def _swap(pad: tuple[int, ...]) -> tuple[int, ...]:
    """Padding of the adjoint convolution (flipped kernel): left and right swap."""
    return tuple(p for pair in zip(pad[1::2], pad[::2], strict=True) for p in pair)


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, ...],
         dilation: tuple[int, ...]) -> Tensor:
    """'same' convolution ``(b, c, *s) -> (b, o, *s)`` (no autograd needed)."""
    sd = weight.dim() - 2
    if _symmetric(pad):
        padding = list(pad[::2][::-1])
    else:
        x = F.pad(x, pad)
        padding = [0] * sd
    if _use_onednn(x):
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), weight.contiguous(), bias, padding, [1] * sd, list(dilation), 1)
    return _CONV[sd](x, weight, bias, padding=padding, dilation=dilation)


def _prepare(x: Tensor, pad: tuple[int, ...]) -> tuple[Tensor, list[int]]:
    """Pad asymmetric 'same' padding explicitly; return the input and the conv padding."""
    sd = x.dim() - 2
    if _symmetric(pad):
        return x.contiguous(), list(pad[::2][::-1])
    return F.pad(x, pad).contiguous(), [0] * sd


def conv_input_grad(dy: Tensor, x: Tensor, weight: Tensor, pad: tuple[int, ...],
                    dilation: tuple[int, ...]) -> Tensor:
    """Gradient of :func:`conv` with respect to its input ``x`` for the output gradient ``dy``."""
    sd = weight.dim() - 2
    xp, padding = _prepare(x, pad)
    dx, _, _ = torch.ops.aten.convolution_backward(
        dy.contiguous(), xp, weight, None, [1] * sd, padding, list(dilation), False, [0] * sd,
        1, [True, False, False])
    if xp.shape != x.shape:
        # drop the gradient of the explicit padding: slice every spatial axis back
        index = [slice(None), slice(None)]
        for axis in range(sd):
            left, right = pad[2 * (sd - 1 - axis)], pad[2 * (sd - 1 - axis) + 1]
            index.append(slice(left, dx.shape[2 + axis] - right))
        dx = dx[tuple(index)]
    return dx


def conv_weight_grad(dy: Tensor, x: Tensor, weight: Tensor, pad: tuple[int, ...],
                     dilation: tuple[int, ...], acc: Tensor | None) -> Tensor:
    """Weight gradient of :func:`conv`, added to ``acc`` in place (or returned when None).

    When the weights are large next to the activations (a UNet bottleneck), the gradient is
    computed in blocks of output channels: oneDNN computes each block in its own layout and
    then reorders it, so one call over all channels would hold the weight gradient twice.
    """
    sd = weight.dim() - 2
    xp, padding = _prepare(x, pad)
    g = weight.shape[0]
    blocks = max(1, min(4, weight.numel() // max(1, dy.numel())))
    bounds = [round(i * g / blocks) for i in range(blocks + 1)]
    fresh = acc is None
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        _, dw, _ = torch.ops.aten.convolution_backward(
            dy[:, a:b].contiguous(), xp, weight[a:b], None, [1] * sd, padding, list(dilation),
            False, [0] * sd, 1, [False, True, False])
        if fresh and blocks == 1:
            return dw
        if acc is None:
            acc = torch.empty_like(weight)
        if fresh:
            acc[a:b] = dw
        else:
            acc[a:b] += dw
        del dw
    return acc


# ----------------------------------------------------------------------------------------------
# cell steps (forward in place on the gate buffer, backward into a gradient buffer)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(h,) -> (1, h, 1, ..., 1) to broadcast over (n, h, *s)."""
    return v.view(1, -1, *([1] * (like.dim() - 2)))


def _lstm_forward_step(a: Tensor, h: Tensor | None, c: Tensor, w_hh: Tensor, peep,
                       spec: Spec, c_out: Tensor | None):
    """a: input gates ``(n, 4h, *s)``, overwritten with activated i, f, g, o."""
    if h is not None:
        a.add_(conv(h, w_hh, None, spec.pad, spec.dilation))
    i, f, g, o = a.chunk(4, dim=1)
    if peep is not None:
        i.addcmul_(peep[0], c)
        f.addcmul_(peep[1], c)
    i.sigmoid_()
    f.sigmoid_()
    g.tanh_()
    c_new = torch.mul(f, c, out=c_out) if c_out is not None else f * c
    c_new.addcmul_(i, g)
    if peep is not None:
        o.addcmul_(peep[2], c_new)
    o.sigmoid_()
    return o * torch.tanh(c_new), c_new


def _gru_forward_step(a: Tensor, h: Tensor, zero_h: bool, w_hh: Tensor, b_hh, spec: Spec,
                      hn_out: Tensor | None):
    """a: input gates ``(n, 3h, *s)``, overwritten with r, z, n; ``hn_out`` <- W_hn h + b_hn."""
    r, z, n = a.chunk(3, dim=1)
    if zero_h:
        if b_hh is None:
            hr = hz = hn = torch.zeros((), dtype=a.dtype, device=a.device)
        else:
            hr, hz, hn = (_bcast(b, a) for b in b_hh.chunk(3))
    else:
        hr, hz, hn = conv(h, w_hh, b_hh, spec.pad, spec.dilation).chunk(3, dim=1)
    r.add_(hr).sigmoid_()
    z.add_(hz).sigmoid_()
    if hn_out is not None:
        hn_out.copy_(hn.expand_as(hn_out))
    n.addcmul_(r, hn).tanh_()
    return torch.addcmul(n, z, h - n)


def _sigmoid_grad_(v: Tensor, s: Tensor) -> Tensor:
    """v <- v * s * (1 - s) in place (s a sigmoid output)."""
    return v.mul_(s).addcmul_(v, s, value=-1)


def _lstm_backward_step(a, c_prev, c_new, dh, dc_state, peep, dg, dpeep):
    """Gate gradients into ``dg`` ``(n, 4h, *s)``, which may be ``a`` itself (each gate's
    slot is written once that gate's activation is no longer read); returns the gradient
    for c_prev. Few temporaries: this runs once per frame on full-size maps."""
    i, f, g, o = a.chunk(4, dim=1)
    slot_i, slot_f, slot_g, slot_o = dg.chunk(4, dim=1)
    dims = [0, *range(2, a.dim())]
    t = torch.tanh(c_new)
    d_o = _sigmoid_grad_(dh * t, o)
    dc = dh * o
    dc.mul_(t.mul_(t).neg_().add_(1))  # * (1 - tanh(c)^2)
    del t
    if dc_state is not None:
        dc.add_(dc_state)
    if peep is not None:
        dc.addcmul_(d_o, peep[2])
        dpeep[2] += (d_o * c_new).sum(dims)
    slot_o.copy_(d_o)
    del d_o
    d_f = _sigmoid_grad_(dc * c_prev, f)
    dc_prev = dc * f
    if peep is not None:
        dc_prev.addcmul_(d_f, peep[1])
        dpeep[1] += (d_f * c_prev).sum(dims)
    slot_f.copy_(d_f)
    del d_f
    d_i = _sigmoid_grad_(dc * g, i)
    d_g = dc.mul_(i)
    d_g.addcmul_(d_g * g, g, value=-1)  # * (1 - g^2)
    if peep is not None:
        dc_prev.addcmul_(d_i, peep[0])
        dpeep[0] += (d_i * c_prev).sum(dims)
    slot_i.copy_(d_i)
    slot_g.copy_(d_g)
    return dc_prev


def _gru_backward_step(a, hn, h_prev, dh, dgx, dgh):
    """Gate gradients into ``dgx`` (input conv; may be ``a`` itself) and ``dgh`` (hidden
    conv); returns the direct gradient for h_prev (through z)."""
    r, z, n = a.chunk(3, dim=1)
    h = dh.shape[1]
    d_n = (dh * (1 - z)).mul_(1 - n * n)
    d_z = (dh * (h_prev - n)).mul_(z * (1 - z))
    d_r = (d_n * hn).mul_(r * (1 - r))
    direct = dh * z
    torch.mul(d_n, r, out=dgh[:, 2 * h:])
    for slot, grad in zip(dgx.chunk(3, dim=1), (d_r, d_z, d_n), strict=True):
        slot.copy_(grad)
    dgh[:, : 2 * h].copy_(dgx[:, : 2 * h])
    return direct


# ----------------------------------------------------------------------------------------------
# the sequence


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


class ConvRecurrence(torch.autograd.Function):
    """One direction of one ConvLSTM/ConvGRU layer with a hand-written backward through time.

    Inputs: ``x`` ``(n, t, c, *s)``; ``mask`` ``(n, t)`` bool or None (valid frames);
    ``h0``/``c0`` ``(n, h, *s)`` or None (zeros); ``w_ih``, ``b_x`` (input-conv bias: LSTM
    ``b_ih + b_hh``, GRU ``b_ih``), ``w_hh``, ``b_hh`` (GRU only), ``peep`` ``(3h,)`` or None.
    Outputs: ``out`` ``(n, t, h, *s)``, ``h_n`` and, for the LSTM, ``c_n`` ``(n, h, *s)``.
    """

    @staticmethod
    def forward(ctx, spec: Spec, x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep):
        ctx.set_materialize_grads(False)
        lstm = spec.mode == "lstm"
        n, t = x.shape[:2]
        hid = w_hh.shape[1]
        spatial = x.shape[3:]
        grad = spec.grad
        keep = grad and not spec.checkpoint  # keep the gates for backward
        save_cells = keep and not lstm  # GRU: W_hn h + b_hn of every frame
        out = x.new_empty((n, t, hid, *spatial))
        peep_b = None if peep is None else [_bcast(p, out[:, 0]) for p in peep.chunk(3)]
        zero = x.new_zeros((n, hid, *spatial))
        h = zero if h0 is None else h0
        c = (zero if c0 is None else c0) if lstm else None
        cells = x.new_empty((n, t, hid, *spatial)) if save_cells else None
        gates = []  # per segment: the activated gates (n, k, g*h, *s) (kept for backward)
        starts = []  # per segment: (h, c) at its start; h only where the output lacks it
        first = True
        for seg in _segments(t, spec.segment, spec.reverse):
            lo, hi = _lo_hi(seg)
            if grad:
                starts.append((h if spec.checkpoint and mask is not None else None, c))
            # input convolution of the segment's frames: (n*k, c, *s) -> (n, k, g*h, *s)
            seg_gates = conv(x[:, lo:hi].flatten(0, 1), w_ih, b_x, spec.pad,
                             spec.dilation).unflatten(0, (n, hi - lo))
            if keep:
                gates.append(seg_gates)
            for ti in seg:
                a = seg_gates[:, ti - lo]
                skip_h = first and h0 is None
                if lstm:
                    h_new, c_new = _lstm_forward_step(
                        a, None if skip_h else h, c, w_hh, peep_b, spec, None)
                else:
                    h_new = _gru_forward_step(a, h, skip_h, w_hh, b_hh, spec,
                                              cells[:, ti] if save_cells else None)
                first = False
                if mask is None:
                    out[:, ti].copy_(h_new)
                    h, c = h_new, c_new if lstm else None
                else:
                    m = mask[:, ti].view(n, *([1] * (h.dim() - 1)))
                    torch.mul(h_new, m, out=out[:, ti])
                    h = torch.where(m, h_new, h)
                    if lstm:
                        c = torch.where(m, c_new, c)
        h_n = h.clone()
        c_n = c.clone() if lstm else None
        if grad:
            ctx.spec = spec
            ctx.keep = keep
            # everything goes through save_for_backward, so that autograd frees it as soon as
            # this node's backward has run (unless the graph is retained)
            ctx.num_gates = len(gates)
            ctx.save_for_backward(x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep, out, cells,
                                  *gates, *(v for hc in starts for v in hc))
        return (out, h_n, c_n) if lstm else (out, h_n)

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n=None):
        spec = ctx.spec
        lstm = spec.mode == "lstm"
        x, mask, h0, c0, w_ih, b_x, w_hh, b_hh, peep, out, saved_cells, *extra = (
            ctx.saved_tensors)
        # retain_graph=True: a second backward will read the saved gates again
        keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph",
                             lambda: True)()
        saved_gates = extra[: ctx.num_gates]
        starts = list(zip(extra[ctx.num_gates::2], extra[ctx.num_gates + 1::2], strict=True))
        need = ctx.needs_input_grad
        n, t = x.shape[:2]
        hid = w_hh.shape[1]
        g = w_hh.shape[0]
        nd = out.dim() - 2  # dims of (n, h, *s)
        peep_b = None if peep is None else [_bcast(p, out[:, 0]) for p in peep.chunk(3)]
        dpeep = None if peep is None else [out.new_zeros(hid) for _ in range(3)]
        # gradient to the previous hidden state, per step: a forward convolution with the
        # flipped, transposed weights (oneDNN even at batch 1) when that copy of the weights
        # is small next to one frame's gates; else PyTorch's backward-data convolution
        pad_adj = _swap(spec.pad)
        w_adj = None
        if w_hh.numel() <= n * g * math.prod(out.shape[3:]):
            w_adj = w_hh.transpose(0, 1).flip(list(range(2, w_hh.dim())))
        zero = out.new_zeros(out[:, 0].shape)
        h_init = zero if h0 is None else h0
        c_init = (zero if c0 is None else c0) if lstm else None
        dx = x.new_empty(x.shape) if need[1] else None
        # weight/bias gradients: [dw_ih, db_x, dw_hh, db_hh], summed over segments in place
        # (no zero-filled accumulators: the weights can be far larger than the activations)
        want = [need[5], b_x is not None and need[6], need[7], b_hh is not None and need[8]]
        acc: list[Tensor | None] = [None] * 4
        dh = dh_n
        dc = dc_n
        order = [ti for seg in _segments(t, spec.segment, spec.reverse) for ti in seg]
        position = {ti: pos for pos, ti in enumerate(order)}  # frame -> processing step
        first_frame = order[0]
        segments = _segments(t, spec.segment, spec.reverse)
        for si in range(len(segments) - 1, -1, -1):
            seg = segments[si]
            lo, hi = _lo_hi(seg)
            k = hi - lo
            # -- gates (and cell states) of this segment: kept or recomputed
            if ctx.keep and not lstm:
                gates = saved_gates[si]
                cells = saved_cells[:, lo:hi]
            elif ctx.keep:  # LSTM: c_t from the kept gates, c_t = f * c_{t-1} + i * g
                gates = saved_gates[si]
                cells = out.new_empty((n, k, hid, *out.shape[3:]))
                c = starts[si][1]
                for ti in seg:
                    i, f, gg, _ = gates[:, ti - lo].chunk(4, dim=1)
                    c_new = torch.addcmul(f * c, i, gg)
                    if mask is not None:
                        c_new = torch.where(mask[:, ti].view(n, *([1] * nd)), c_new, c)
                    cells[:, ti - lo] = c_new
                    c = cells[:, ti - lo]
            else:
                h = starts[si][0]
                if h is None:  # the output of the segment before (no lengths), or h_0
                    h = h_init if si == 0 else out[:, segments[si - 1][-1]]
                c = starts[si][1]
                gates = conv(x[:, lo:hi].flatten(0, 1), w_ih, b_x, spec.pad,
                             spec.dilation).unflatten(0, (n, k))
                cells = out.new_empty((n, k, hid, *out.shape[3:]))
                for ti in seg:
                    a = gates[:, ti - lo]
                    skip_h = ti == first_frame and h0 is None
                    if lstm:
                        h_new, c_new = _lstm_forward_step(
                            a, None if skip_h else h, c, w_hh, peep_b, spec, None)
                    else:
                        h_new = _gru_forward_step(a, h, skip_h, w_hh, b_hh, spec,
                                                  cells[:, ti - lo])
                    if mask is None:
                        h = h_new
                        c = c_new if lstm else None
                    else:
                        m = mask[:, ti].view(n, *([1] * nd))
                        h = torch.where(m, h_new, h)
                        c = torch.where(m, c_new, c) if lstm else None
                    if lstm:
                        cells[:, ti - lo].copy_(c)
            # -- previous hidden state of every frame in the segment: (n, k, h, *s)
            h_prev = out.new_empty((n, k, hid, *out.shape[3:]))
            for ti in seg:
                pos = position[ti]
                if pos == 0:
                    h_prev[:, ti - lo].copy_(h_init)
                else:
                    pi = order[pos - 1]
                    if mask is not None and h0 is not None:
                        m = mask[:, pi].view(n, *([1] * nd))
                        h_prev[:, ti - lo].copy_(torch.where(m, out[:, pi], h0))
                    else:
                        h_prev[:, ti - lo].copy_(out[:, pi])
            # -- backward through the segment's steps
            # gate gradients: written over the gates themselves when nothing needs them after
            # this backward (the graph is not retained, or they were recomputed)
            if not ctx.keep or not keep_graph:
                dgx = gates
            else:
                dgx = out.new_empty((n, k, g, *out.shape[3:]))
            dgh = dgx if lstm else out.new_empty((n, k, g, *out.shape[3:]))
            for ti in reversed(seg):
                j = ti - lo
                pos = position[ti]
                d_new = dh
                if dout is not None:
                    d_new = dout[:, ti] if d_new is None else d_new + dout[:, ti]
                if d_new is None:
                    d_new = zero
                carry_h = carry_c = None
                dc_state = dc
                if mask is not None:
                    m = mask[:, ti].view(n, *([1] * nd)).to(out.dtype)
                    carry_h = None if dh is None else dh * (1 - m)
                    d_new = d_new * m
                    if lstm and dc is not None:
                        carry_c = dc * (1 - m)
                        dc_state = dc * m
                if lstm:
                    if pos == 0:
                        c_prev = c_init
                    else:
                        pi = order[pos - 1]
                        if lo <= pi < hi:
                            c_prev = cells[:, pi - lo]
                        else:  # the state at the segment's start
                            c_prev = starts[si][1]
                    c_new = cells[:, j]
                    dc = _lstm_backward_step(gates[:, j], c_prev, c_new, d_new, dc_state,
                                             peep_b, dgx[:, j], dpeep)
                    direct_h = None
                else:
                    direct_h = _gru_backward_step(gates[:, j], cells[:, j], h_prev[:, j], d_new,
                                                  dgx[:, j], dgh[:, j])
                if pos > 0 or (h0 is not None and need[3]):
                    dh = (conv(dgh[:, j], w_adj, None, pad_adj, spec.dilation)
                          if w_adj is not None else
                          conv_input_grad(dgh[:, j], h_prev[:, j], w_hh, spec.pad, spec.dilation))
                    if direct_h is not None:
                        dh.add_(direct_h)
                else:
                    dh = None
                if carry_h is not None:
                    dh = carry_h if dh is None else dh + carry_h
                if carry_c is not None:
                    dc = dc + carry_c
            # -- batched gradients of the two convolutions over the segment's frames; the input
            # gradient first, while the weight gradients do not exist yet (oneDNN holds a
            # reordered copy of the weights during each call)
            x_seg = x[:, lo:hi].flatten(0, 1)
            if dx is not None:
                dx[:, lo:hi] = conv_input_grad(dgx.flatten(0, 1), x_seg, w_ih, spec.pad,
                                               spec.dilation).unflatten(0, (n, k))
            dims = [0, *range(2, dgx.dim() - 1)]  # sum over (n*k, *s) for the biases
            if want[2]:
                dgh_w, h_prev_w = dgh, h_prev
                if h0 is None and lo <= first_frame < hi and n == 1 and k > 2:
                    # the first frame's previous state is zero: no weight gradient (a view
                    # at batch 1, a copy otherwise: only then; and never down to a batch of
                    # 1, which PyTorch sends to a slow kernel with a large im2col buffer)
                    part = slice(1, None) if first_frame == lo else slice(None, -1)
                    dgh_w, h_prev_w = dgh[:, part], h_prev[:, part]
                acc[2] = conv_weight_grad(dgh_w.flatten(0, 1), h_prev_w.flatten(0, 1), w_hh,
                                          spec.pad, spec.dilation, acc[2])
                del dgh_w, h_prev_w
            if want[3]:
                db = dgh.flatten(0, 1).sum(dims)
                acc[3] = db if acc[3] is None else acc[3].add_(db)
            del h_prev
            if want[0]:
                acc[0] = conv_weight_grad(dgx.flatten(0, 1), x_seg, w_ih, spec.pad,
                                          spec.dilation, acc[0])
            if want[1]:
                db = dgx.flatten(0, 1).sum(dims)
                acc[1] = db if acc[1] is None else acc[1].add_(db)
        dh0 = dh if (h0 is not None and need[3]) else None
        dc0 = dc if (lstm and c0 is not None and need[4]) else None
        dpeep_t = torch.cat(dpeep) if (dpeep is not None and need[9]) else None
        return None, dx, None, dh0, dc0, acc[0], acc[1], acc[2], acc[3], dpeep_t
