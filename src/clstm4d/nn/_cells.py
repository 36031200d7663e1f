"""The LSTM and the GRU as cell specs: the only place where the two differ.

A spec holds the gate count, the state arity, how the biases enter the two convolutions, the
update from the gate pre-activations and its hand-written backward. The update is written
once: the reference path (:func:`clstm4d.nn._recurrence.reference_direction`, the cells)
runs it out of place under autograd; the fused driver (:class:`ConvRecurrence`) runs it
in place on its gate buffer, without autograd, and differentiates it with :meth:`backward`.

Gate pre-activations: ``gx`` ``(n, g*h, *s)`` from the input convolution (with its bias),
``gh`` from the hidden convolution (``(n, g*h, *s)`` or a broadcastable ``(1, g*h, 1, ...)``
bias alone), None when the hidden contribution is exactly zero (zero state, no bias).
``peep``: three ``(1, h, 1, ..., 1)`` peephole weights or None. In place, ``gx`` is
overwritten with the activated gates (what the backward reads).

Shape legend: ``n`` batch, ``h`` hidden channels, ``g`` gates, ``*s`` spatial axes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["GRU", "LSTM", "CellSpec"]


def _sigmoid(v: Tensor, inplace: bool) -> Tensor:
    return v.sigmoid_() if inplace else torch.sigmoid(v)


def _tanh(v: Tensor, inplace: bool) -> Tensor:
    return v.tanh_() if inplace else torch.tanh(v)


def _addcmul(v: Tensor, a: Tensor, b: Tensor, inplace: bool) -> Tensor:
    """v + a * b."""
    return v.addcmul_(a, b) if inplace else torch.addcmul(v, a, b)


def _add(v: Tensor, w: Tensor | None, inplace: bool) -> Tensor:
    if w is None:
        return v
    return v.add_(w) if inplace else v + w


def _sigmoid_grad_(v: Tensor, s: Tensor) -> Tensor:
    """v <- v * s * (1 - s) in place (s a sigmoid output)."""
    return v.mul_(s).addcmul_(v, s, value=-1)


class CellSpec(ABC):
    """What distinguishes a recurrent cell; subclasses are stateless singletons."""

    name: str
    num_gates: int
    num_state: int  # 2: (h, c); 1: (h,)
    # the per-frame tensor the backward needs besides the activated gates is recomputed from
    # the gates (True) or saved by the forward (False)
    aux_from_gates: bool
    update_reads_h: bool  # the update reads h itself (not only through the hidden conv)
    shared_gate_grad: bool  # both convolutions feed the same pre-activations

    @abstractmethod
    def input_bias(self, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
        """The bias of the input convolution."""

    @abstractmethod
    def hidden_bias(self, b_hh: Tensor | None) -> Tensor | None:
        """The bias of the hidden convolution."""

    @abstractmethod
    def update(self, gx: Tensor, gh: Tensor | None, state: tuple[Tensor, ...], peep,
               inplace: bool) -> tuple[tuple[Tensor, ...], Tensor | None]:
        """One step: returns the new state (h first) and the frame's extra tensor."""

    @abstractmethod
    def aux(self, state: tuple[Tensor, ...], extra: Tensor | None) -> Tensor | None:
        """The per-frame tensor the backward reads, from the (masked) state and the extra."""

    @abstractmethod
    def backward(self, acts: Tensor, aux_prev: Tensor | None, aux: Tensor, h_prev: Tensor,
                 dh: Tensor, dstate: tuple[Tensor | None, ...], peep, dgx: Tensor,
                 dgh: Tensor, dpeep) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
        """Gate gradients of one step into ``dgx`` (input conv; may be ``acts`` itself) and
        ``dgh`` (hidden conv; may be ``dgx``); returns the direct gradient for h_prev (not
        through the hidden convolution, None if there is none) and the gradient of the rest
        of the previous state."""


class _LSTM(CellSpec):
    """Gates i, f, g, o; ``c' = f c + i g``, ``h' = o tanh(c')``; optional peepholes."""

    name = "lstm"
    num_gates = 4
    num_state = 2
    aux_from_gates = True  # the cell state c_t = f c_{t-1} + i g
    update_reads_h = False
    shared_gate_grad = True

    def input_bias(self, b_ih, b_hh):
        return None if b_ih is None else b_ih + b_hh  # both biases folded into one

    def hidden_bias(self, b_hh):
        return None

    def update(self, gx, gh, state, peep, inplace):
        c = state[1]
        i, f, g, o = _add(gx, gh, inplace).chunk(4, dim=1)
        if peep is not None:
            i = _addcmul(i, peep[0], c, inplace)
            f = _addcmul(f, peep[1], c, inplace)
        i, f, g = _sigmoid(i, inplace), _sigmoid(f, inplace), _tanh(g, inplace)
        c_new = (f * c).addcmul_(i, g)  # in place on a temporary: fine under autograd too
        if peep is not None:
            o = _addcmul(o, peep[2], c_new, inplace)
        o = _sigmoid(o, inplace)
        # in place: one temporary less (autograd needs tanh's output unchanged)
        h = torch.tanh(c_new).mul_(o) if inplace else o * torch.tanh(c_new)
        return (h, c_new), None

    def aux(self, state, extra):
        return state[1]

    def cell_state(self, acts: Tensor, c_prev: Tensor) -> Tensor:
        """c_t from the activated gates and c_{t-1} (recomputed in backward)."""
        i, f, g, _ = acts.chunk(4, dim=1)
        return torch.addcmul(f * c_prev, i, g)

    def backward(self, acts, aux_prev, aux, h_prev, dh, dstate, peep, dgx, dgh, dpeep):
        # few temporaries: this runs once per frame on full-size maps; each gate's slot of
        # dgx is written once that gate's activation is no longer read
        c_prev, c_new, dc_state = aux_prev, aux, dstate[0]
        i, f, g, o = acts.chunk(4, dim=1)
        slot_i, slot_f, slot_g, slot_o = dgx.chunk(4, dim=1)
        dims = [0, *range(2, acts.dim())]
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
        return None, (dc_prev,)


class _GRU(CellSpec):
    """Gates r, z, n; ``n = tanh(x_n + r (W_hn h + b_hn))``, ``h' = (1 - z) n + z h``."""

    name = "gru"
    num_gates = 3
    num_state = 1
    aux_from_gates = False  # W_hn h + b_hn of every frame, saved by the forward
    update_reads_h = True
    shared_gate_grad = False

    def input_bias(self, b_ih, b_hh):
        return b_ih

    def hidden_bias(self, b_hh):
        return b_hh

    def update(self, gx, gh, state, peep, inplace):
        h = state[0]
        xr, xz, xn = gx.chunk(3, dim=1)
        hr, hz, hn = (None, None, None) if gh is None else gh.chunk(3, dim=1)
        r = _sigmoid(_add(xr, hr, inplace), inplace)
        z = _sigmoid(_add(xz, hz, inplace), inplace)
        n = _tanh(xn if hn is None else _addcmul(xn, r, hn, inplace), inplace)
        return (torch.addcmul(n, z, h - n),), hn

    def aux(self, state, extra):
        return extra

    def backward(self, acts, aux_prev, aux, h_prev, dh, dstate, peep, dgx, dgh, dpeep):
        r, z, n = acts.chunk(3, dim=1)
        hn = aux
        h = dh.shape[1]
        d_n = (dh * (1 - z)).mul_(1 - n * n)
        d_z = (dh * (h_prev - n)).mul_(z * (1 - z))
        d_r = (d_n * hn).mul_(r * (1 - r))
        direct = dh * z
        torch.mul(d_n, r, out=dgh[:, 2 * h:])
        for slot, grad in zip(dgx.chunk(3, dim=1), (d_r, d_z, d_n), strict=True):
            slot.copy_(grad)
        dgh[:, : 2 * h].copy_(dgx[:, : 2 * h])
        return direct, ()


LSTM = _LSTM()
GRU = _GRU()
