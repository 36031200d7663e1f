"""N-dimensional convolutional LSTM and GRU: cells and multi-layer sequence layers.

One implementation serves 1D, 2D and 3D maps (``spatial_dims``); the LSTM and the GRU share
the sequence machinery (time loop, directions, state, lengths, dropout, recomputation) and
differ only in their cell spec (:mod:`clstm4d.nn._cells`: gates, state, update, backward).

Shape legend: ``n`` batch, ``t`` time (frames), ``c`` input channels, ``h`` hidden channels,
``g`` gates (4 for the LSTM, 3 for the GRU), ``*s`` spatial axes (``(w,)``, ``(h, w)`` or
``(d, h, w)``), ``D`` directions (2 when bidirectional), ``L`` layers.

Parameter layout (identical to :class:`torch.nn.LSTM` / :class:`torch.nn.GRU`, with kernel
axes appended): ``weight_ih_l{k}`` ``(g*h, c_k, *kernel)``, ``weight_hh_l{k}``
``(g*h, h, *kernel)``, ``bias_ih_l{k}`` and ``bias_hh_l{k}`` ``(g*h,)``; suffix ``_reverse``
for the backward direction; ``c_0 = in_channels``, ``c_k = D*h`` for ``k > 0``. Gate order
is i, f, g, o (LSTM) and r, z, n (GRU). The input-to-hidden convolution of a layer runs
batched over the frames (batch and time folded); only the hidden-to-hidden convolution runs
per step. ``backend="fused"`` runs a direction of a layer as one autograd node with a
hand-written backward through time, ``backend="reference"`` builds the same computation from
autograd ops frame by frame (:mod:`clstm4d.nn._recurrence`); ``"auto"`` (default) picks the
fused one wherever it is supported. Under autocast the convolutions run in the autocast dtype,
the gate update and the state in float32; the output comes back in the autocast dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clstm4d._common import check_int, check_spatial_dims, per_axis
from clstm4d.nn import _kernels as kernels
from clstm4d.nn._cells import GRU, LSTM, CellSpec
from clstm4d.nn._recurrence import (
    ConvRecurrence,
    Spec,
    conv_dtype,
    gate_conv,
    reference_direction,
    reference_step,
    split_peephole,
)

__all__ = ["BACKENDS", "ConvGRU", "ConvGRUCell", "ConvLSTM", "ConvLSTMCell"]

#: values of the sequence layers' ``backend`` argument
BACKENDS = ("auto", "fused", "reference")
#: frames the fused backend recomputes together in backward with ``recompute=True`` (it
#: keeps the state every this many frames; ``clstm4d.engine.planning.memory`` counts the same)
RECOMPUTE_FRAMES = 2
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# validation helpers


def _same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """Padding for F.pad (last axis first) that keeps the spatial size, odd or even kernels.

    The total padding ``dilation * (kernel - 1)`` is split with the extra voxel on the
    right/bottom/back side, as ``padding="same"`` in :mod:`torch.nn` does.
    """
    pads: list[int] = []
    for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


# ----------------------------------------------------------------------------------------------
# shared base


class _ConvRNNBase(nn.Module):
    """Owns validation, parameters, initialisation, convolutions and the cell step."""

    _CELL: CellSpec = LSTM  # set by subclasses: LSTM | GRU
    _is_cell = False

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int | Sequence[int],
        num_layers: int = 1,
        bias: bool = True,
        bidirectional: bool = False,
        dropout: float = 0.0,
        dilation: int | Sequence[int] = 1,
        forget_bias: float = 1.0,
        peephole: bool = False,
        recompute: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # an instance attribute: torch.compile (dynamo 2.4) cannot read it from the class
        self._cell = self._CELL
        kernel, dil = self._check_args(spatial_dims, in_channels, hidden_channels, kernel_size,
                                       num_layers, bias, bidirectional, dropout, dilation,
                                       forget_bias, peephole, recompute, backend)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.kernel_size = kernel
        self.num_layers = num_layers
        self.bias = bias
        self.bidirectional = bidirectional
        self.dropout = float(dropout)
        self.dilation = dil
        self.forget_bias = float(forget_bias)
        self.peephole = peephole
        self.recompute = recompute
        self.backend = backend
        self._pad = _same_padding(kernel, dil)

        self._register_parameters({"device": device, "dtype": dtype})
        self.reset_parameters()

    def _check_args(self, spatial_dims, in_channels, hidden_channels, kernel_size, num_layers,
                    bias, bidirectional, dropout, dilation, forget_bias, peephole, recompute,
                    backend) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Validate the constructor's arguments; returns the per-axis kernel and dilation."""
        owner = type(self).__name__
        check_spatial_dims(spatial_dims, owner)
        check_int("in_channels", in_channels, 1, owner)
        check_int("hidden_channels", hidden_channels, 1, owner)
        check_int("num_layers", num_layers, 1, owner)
        kernel = per_axis("kernel_size", kernel_size, spatial_dims, owner)
        dil = per_axis("dilation", dilation, spatial_dims, owner)
        for name, flag in (("bias", bias), ("bidirectional", bidirectional),
                           ("peephole", peephole), ("recompute", recompute)):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {flag!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
            0.0 <= dropout <= 1.0
        ):
            raise ValueError(f"{owner}: dropout must be a number in [0, 1], got {dropout!r}")
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float)) or (
            not math.isfinite(forget_bias)
        ):
            raise ValueError(f"{owner}: forget_bias must be a finite number, got {forget_bias!r}")
        if backend not in BACKENDS:
            raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
        if dropout > 0 and num_layers == 1 and not self._is_cell:
            warnings.warn(
                f"{owner}: dropout={dropout} acts between stacked layers (not after the last "
                f"one, as in nn.LSTM), so it has no effect with num_layers=1",
                stacklevel=4,
            )
        return kernel, dil

    def _register_parameters(self, factory: dict[str, Any]) -> None:
        """``weight_ih``, ``weight_hh`` (and ``bias_ih``, ``bias_hh``, ``weight_peephole``) of
        every layer and direction, named as ``nn.LSTM`` names them (``_l{k}[_reverse]``)."""
        g, h = self._cell.num_gates * self.hidden_channels, self.hidden_channels
        num_dirs = 2 if self.bidirectional else 1
        self._param_names: list[list[dict[str, str]]] = []
        for layer in range(self.num_layers):
            c_in = self.in_channels if layer == 0 else h * num_dirs
            per_dir = []
            for d in range(num_dirs):
                sfx = "" if self._is_cell else f"_l{layer}" + ("_reverse" if d else "")
                shapes = {"weight_ih": (g, c_in, *self.kernel_size),
                          "weight_hh": (g, h, *self.kernel_size)}
                if self.bias:
                    shapes.update(bias_ih=(g,), bias_hh=(g,))
                if self.peephole:
                    shapes["weight_peephole"] = (3 * h,)
                names = {}
                for key, shape in shapes.items():
                    self.register_parameter(key + sfx, nn.Parameter(torch.empty(shape, **factory)))
                    names[key] = key + sfx
                per_dir.append(names)
            self._param_names.append(per_dir)

    # -- parameters -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise every parameter (the only place initialisation happens).

        Convolution weights: uniform in ``(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in`` =
        input channels x kernel volume of that convolution (PyTorch's conv default). Biases:
        zero, except the forget-gate slice of ``bias_ih`` (LSTM) which is set to
        ``forget_bias`` (Keras' ``unit_forget_bias`` for ``forget_bias=1``). Peephole weights:
        zero (the layer starts as a plain ConvLSTM).
        """
        h = self.hidden_channels
        for per_dir in self._param_names:
            for names in per_dir:
                for key, name in names.items():
                    p = getattr(self, name)
                    with torch.no_grad():
                        if key.startswith("weight_i") or key == "weight_hh":
                            bound = 1.0 / math.sqrt(p[0].numel())
                            p.uniform_(-bound, bound)
                        else:
                            p.zero_()
                            if key == "bias_ih" and self._cell is LSTM:
                                p[h:2 * h].fill_(self.forget_bias)

    def _params(self, layer: int, direction: int) -> dict[str, Tensor]:
        return {k: getattr(self, n) for k, n in self._param_names[layer][direction].items()}

    def extra_repr(self) -> str:
        s = (f"spatial_dims={self.spatial_dims}, {self.in_channels}, {self.hidden_channels}, "
             f"kernel_size={self.kernel_size}")
        defaults = {"num_layers": 1, "bias": True, "bidirectional": False, "dropout": 0.0,
                    "dilation": (1,) * self.spatial_dims, "forget_bias": 1.0,
                    "peephole": False, "recompute": False, "backend": "auto"}
        for key, default in defaults.items():
            if hasattr(self, key) and getattr(self, key) != default:
                if key in ("forget_bias", "peephole") and self._cell is not LSTM:
                    continue
                if self._is_cell and key in ("num_layers", "bidirectional", "dropout",
                                             "recompute", "backend"):
                    continue
                s += f", {key}={getattr(self, key)!r}" if key == "backend" else (
                    f", {key}={getattr(self, key)}")
        return s

    def _direction_inputs(self, p: dict[str, Tensor]) -> tuple[Tensor | None, ...]:
        """``(w_ih, b_x, w_hh, b_hh, peep)``: the weights, the biases of the input and the
        hidden convolution (:meth:`CellSpec.input_bias`) and the peepholes."""
        b_ih, b_hh = p.get("bias_ih"), p.get("bias_hh")
        return (p["weight_ih"], self._cell.input_bias(b_ih, b_hh), p["weight_hh"],
                self._cell.hidden_bias(b_hh), p.get("weight_peephole"))

    def _spec(self, x: Tensor, reverse: bool = False, segment: int = 1,
              grad: bool = False) -> Spec:
        dtype = conv_dtype(x.device.type, self._param_dtype())
        return Spec(self._cell, self._pad, self.dilation, reverse, segment, self.recompute,
                    grad, dtype)

    def _param_dtype(self) -> torch.dtype:
        return getattr(self, self._param_names[0][0]["weight_hh"]).dtype

    def _num_state(self) -> int:
        return self._cell.num_state

    def _check_dtype(self, x: Tensor) -> None:
        """Without autocast, x must have the parameters' dtype (as in nn.LSTM)."""
        want = self._param_dtype()
        if x.dtype != want and kernels.autocast_dtype(x.device.type) is None:
            raise ValueError(f"{type(self).__name__}: expected x of dtype {want} (the "
                             f"parameters' dtype; or run under torch.autocast), got {x.dtype}")

    def _check_x(self, x, batch_dims: int, layout: str) -> None:
        owner = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{owner}: x must be a torch.Tensor, got {type(x).__name__}")
        want = batch_dims + 1 + self.spatial_dims
        if x.dim() != want:
            raise ValueError(
                f"{owner}: expected x of shape {layout} with {self.spatial_dims} spatial axes "
                f"({want} dims), got shape {tuple(x.shape)} ({x.dim()} dims)"
            )
        if x.shape[batch_dims] != self.in_channels:
            raise ValueError(
                f"{owner}: expected x with in_channels={self.in_channels} at dim {batch_dims} "
                f"of {layout}, got shape {tuple(x.shape)}"
            )


# ----------------------------------------------------------------------------------------------
# cells


class _ConvCellBase(_ConvRNNBase):
    _is_cell = True

    def _cell_forward(self, x: Tensor, state: tuple[Tensor, ...] | None) -> tuple[Tensor, ...]:
        self._check_x(x, 1, "(N, C_in, *S)")
        owner = type(self).__name__
        expected = (x.shape[0], self.hidden_channels, *x.shape[2:])
        if state is None:
            zero = x.new_zeros(expected)
            state = (zero,) * self._num_state()
        for name, s in zip(("h", "c"), state, strict=False):
            if not isinstance(s, Tensor) or tuple(s.shape) != expected:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(f"{owner}: expected state {name} of shape {expected}, got {got}")
        self._check_dtype(x)
        spec = self._spec(x)
        w_ih, b_x, w_hh, b_hh, peep = self._direction_inputs(self._params(0, 0))
        state = tuple(s.to(w_hh.dtype) for s in state)
        gx = gate_conv(x, w_ih, b_x, spec.pad, spec.dilation, spec.dtype)
        return reference_step(spec, gx, state, w_hh, b_hh, split_peephole(peep, x.dim()))




class ConvLSTMCell(_ConvCellBase):
    r"""One step of a convolutional LSTM over 1D, 2D or 3D maps.

    .. math::
        \begin{array}{ll}
        i = \sigma(W_{ii} * x + b_{ii} + W_{hi} * h + b_{hi} + w_{ci} \odot c) \\
        f = \sigma(W_{if} * x + b_{if} + W_{hf} * h + b_{hf} + w_{cf} \odot c) \\
        g = \tanh(W_{ig} * x + b_{ig} + W_{hg} * h + b_{hg}) \\
        c' = f \odot c + i \odot g \\
        o = \sigma(W_{io} * x + b_{io} + W_{ho} * h + b_{ho} + w_{co} \odot c') \\
        h' = o \odot \tanh(c')
        \end{array}

    where ``*`` is a "same"-padded convolution and the peephole terms ``w_c? \odot c``
    (per-channel weights broadcast over space, Shi et al. 2015 with channel-wise instead of
    voxel-wise weights) are present only with ``peephole=True``.

    Args:
        spatial_dims: number of spatial axes, 1, 2 or 3.
        in_channels: channels of the input ``x``.
        hidden_channels: channels ``H`` of the hidden state.
        kernel_size: int or per-axis tuple; odd and even sizes both keep the spatial size
            (even kernels pad one voxel more at the end of each axis).
        bias: add ``bias_ih`` and ``bias_hh``. Default: True.
        dilation: int or per-axis tuple, used by both convolutions. Default: 1.
        device, dtype: factory keywords for the parameters.
        forget_bias: initial value of the forget-gate slice of ``bias_ih`` (the other biases
            start at zero). Default: 1.0 (Keras' ``unit_forget_bias``).
        peephole: add the per-channel peephole weights ``weight_peephole`` ``(3*H,)``,
            ordered ``w_ci, w_cf, w_co``. Default: False.

    Shape:
        - x: ``(N, C_in, *S)``; state: ``(h, c)``, each ``(N, H, *S)``, zeros when omitted.
        - returns ``(h', c')``, each ``(N, H, *S)``.

    Attributes:
        weight_ih: ``(4*H, C_in, *kernel)``, gates i, f, g, o (as :class:`torch.nn.LSTMCell`).
        weight_hh: ``(4*H, H, *kernel)``.
        bias_ih, bias_hh: ``(4*H,)``.

    Examples:
        >>> cell = ConvLSTMCell(2, in_channels=3, hidden_channels=8, kernel_size=3)
        >>> h, c = cell(torch.randn(2, 3, 16, 16))
        >>> h, c = cell(torch.randn(2, 3, 16, 16), (h, c))
        >>> tuple(h.shape), tuple(c.shape)
        ((2, 8, 16, 16), (2, 8, 16, 16))
    """

    _CELL = LSTM

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int | Sequence[int],
        bias: bool = True,
        dilation: int | Sequence[int] = 1,
        forget_bias: float = 1.0,
        peephole: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, hidden_channels, kernel_size, bias=bias,
                         dilation=dilation, forget_bias=forget_bias, peephole=peephole,
                         device=device, dtype=dtype)

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Shape: x ``(N, C_in, *S)``, state ``(h, c)`` each ``(N, H, *S)`` -> ``(h', c')``."""
        if state is not None and (not isinstance(state, (tuple, list)) or len(state) != 2):
            raise ValueError(f"ConvLSTMCell: state must be a tuple (h, c), got {type(state)}")
        return self._cell_forward(x, state)


class ConvGRUCell(_ConvCellBase):
    r"""One step of a convolutional GRU over 1D, 2D or 3D maps.

    .. math::
        \begin{array}{ll}
        r = \sigma(W_{ir} * x + b_{ir} + W_{hr} * h + b_{hr}) \\
        z = \sigma(W_{iz} * x + b_{iz} + W_{hz} * h + b_{hz}) \\
        n = \tanh(W_{in} * x + b_{in} + r \odot (W_{hn} * h + b_{hn})) \\
        h' = (1 - z) \odot n + z \odot h
        \end{array}

    where ``*`` is a "same"-padded convolution (as :class:`torch.nn.GRUCell`, with
    convolutions instead of matrix products).

    Args:
        spatial_dims: number of spatial axes, 1, 2 or 3.
        in_channels: channels of the input ``x``.
        hidden_channels: channels ``H`` of the hidden state.
        kernel_size: int or per-axis tuple; odd and even sizes both keep the spatial size
            (even kernels pad one voxel more at the end of each axis).
        bias: add ``bias_ih`` and ``bias_hh``. Default: True.
        dilation: int or per-axis tuple, used by both convolutions. Default: 1.
        device, dtype: factory keywords for the parameters.

    Shape:
        - x: ``(N, C_in, *S)``; state ``h``: ``(N, H, *S)``, zeros when omitted.
        - returns ``h'``: ``(N, H, *S)``.

    Attributes:
        weight_ih: ``(3*H, C_in, *kernel)``, gates r, z, n (as :class:`torch.nn.GRUCell`).
        weight_hh: ``(3*H, H, *kernel)``.
        bias_ih, bias_hh: ``(3*H,)``.

    Examples:
        >>> cell = ConvGRUCell(3, in_channels=1, hidden_channels=4, kernel_size=(1, 3, 3))
        >>> h = cell(torch.randn(2, 1, 5, 8, 8))
        >>> tuple(cell(torch.randn(2, 1, 5, 8, 8), h).shape)
        (2, 4, 5, 8, 8)
    """

    _CELL = GRU

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int | Sequence[int],
        bias: bool = True,
        dilation: int | Sequence[int] = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(spatial_dims, in_channels, hidden_channels, kernel_size, bias=bias,
                         dilation=dilation, device=device, dtype=dtype)

    def forward(self, x: Tensor, state: Tensor | None = None) -> Tensor:
        """Shape: x ``(N, C_in, *S)``, state ``h`` ``(N, H, *S)`` -> ``h'`` ``(N, H, *S)``."""
        if state is not None and not isinstance(state, Tensor):
            raise TypeError(f"ConvGRUCell: state must be a Tensor h, got {type(state).__name__}")
        return self._cell_forward(x, None if state is None else (state,))[0]


# ----------------------------------------------------------------------------------------------
# sequence layers


class _ConvRNNLayerBase(_ConvRNNBase):
    """The shared sequence machinery: layers, directions, state, lengths, dropout, recompute."""

    def _check_state(self, state, x: Tensor) -> list[tuple[Tensor, ...]] | None:
        """Validate ``state`` and split it into one tuple per (layer, direction)."""
        if state is None:
            return None
        owner = type(self).__name__
        names = ("h_0", "c_0")[: self._num_state()]
        if self._cell is LSTM:
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise ValueError(f"{owner}: state must be a tuple (h_0, c_0), got "
                                 f"{type(state).__name__} of length "
                                 f"{len(state) if isinstance(state, (tuple, list)) else '-'}")
            tensors = tuple(state)
        else:
            if not isinstance(state, Tensor):
                raise TypeError(f"{owner}: state must be a Tensor h_0, got "
                                f"{type(state).__name__}")
            tensors = (state,)
        num_dirs = 2 if self.bidirectional else 1
        expected = (self.num_layers * num_dirs, x.shape[0], self.hidden_channels, *x.shape[3:])
        for name, s in zip(names, tensors, strict=True):
            if not isinstance(s, Tensor) or tuple(s.shape) != expected:
                got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                raise ValueError(
                    f"{owner}: expected state {name} of shape (num_layers*D, N, H, *S) = "
                    f"{expected}, got {got}"
                )
        dtype = self._param_dtype()  # the state is kept in the parameters' dtype
        return [tuple(s[i].to(dtype) for s in tensors) for i in range(expected[0])]

    def _check_lengths(self, lengths, n: int, t: int, device) -> Tensor | None:
        if lengths is None:
            return None
        owner = type(self).__name__
        lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"{owner}: lengths must hold integers, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (n,):
            raise ValueError(
                f"{owner}: expected lengths of shape (N,) = ({n},), got {tuple(lengths.shape)}"
            )
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > t:
            raise ValueError(
                f"{owner}: lengths must lie in [1, T] = [1, {t}], got values in [{lo}, {hi}]"
            )
        return lengths.to(device=device, dtype=torch.long)

    # Frames per segment of the fast path: the input convolution and the weight gradients
    # run batched over a segment, and the backward holds one segment's gate gradients: as
    # few frames as give a batch of 2, more while a segment's gates stay smaller than the
    # weights (then the weight gradients dominate memory, and bigger batches are faster).
    _min_batch = 2

    def _fused_unsupported(self, x: Tensor) -> str | None:
        """Why the fused backend cannot run this call (None: it can)."""
        if kernels.is_compiling():
            return "torch.compile (it cannot trace the hand-written backward)"
        if x.device.type not in _FUSED_DEVICES:
            return f"device type {x.device.type!r} (supported: {_FUSED_DEVICES})"
        if self._param_dtype() not in _FUSED_DTYPES:
            return (f"parameters of dtype {self._param_dtype()} (supported: float32, float64; "
                    "for bfloat16/float16 keep float32 parameters and use torch.autocast)")
        return None

    def _resolve_backend(self, x: Tensor) -> str:
        """"fused" or "reference" for this call (``backend="auto"`` prefers "fused")."""
        if self.backend == "reference":
            return "reference"
        reason = self._fused_unsupported(x)
        if reason is None:
            return "fused"
        if self.backend == "fused":
            raise RuntimeError(f"{type(self).__name__}: backend='fused' does not support "
                               f"{reason}; use backend='auto' or backend='reference'")
        return "reference"

    def _segment(self, x: Tensor, inputs, grad: bool) -> int:
        """Frames per segment of the fused backend."""
        n, t = x.shape[:2]
        if not grad:
            return t
        if self.recompute:
            return RECOMPUTE_FRAMES
        w_ih, _, w_hh = inputs[:3]
        frame = n * w_hh.shape[0] * math.prod(x.shape[3:])  # gates of one frame
        # at least 2 samples per batched call (PyTorch sends batch-1 convolutions to a slow
        # kernel on CPU)
        return min(t, max(math.ceil(self._min_batch / n), (w_ih.numel() + w_hh.numel()) // frame))

    def _run_direction(
        self,
        x: Tensor,
        p: dict[str, Tensor],
        state: tuple[Tensor, ...] | None,
        mask: Tensor | None,
        reverse: bool,
        backend: str,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One direction of one layer: x ``(n, t, c, *s)`` -> output ``(n, t, h, *s)``, state.

        ``state`` None means zeros (of the parameters' dtype, on x's device).
        """
        weights = self._direction_inputs(p)
        h0 = None if state is None else state[0]
        c0 = None if state is None or self._cell.num_state < 2 else state[1]
        inputs = (x, mask, h0, c0, *weights)
        grad = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in inputs)
        spec = self._spec(x, reverse, self._segment(x, weights, grad), grad)
        # the layer input in the convolution dtype (autograd casts its gradient back)
        inputs = (x.to(spec.dtype or self._param_dtype()), *inputs[1:])
        if backend == "fused":
            result = ConvRecurrence.apply(spec, *inputs)
        else:
            with kernels.autocast_disabled(x.device.type):  # explicit casts only
                result = reference_direction(spec, *inputs)
        return result[0], tuple(result[1:])

    def _sequence_forward(self, x: Tensor, state, lengths):
        self._check_x(x, 2, "(N, T, C_in, *S)")
        self._check_dtype(x)
        backend = self._resolve_backend(x)
        n, t = x.shape[:2]
        states = self._check_state(state, x)
        lengths = self._check_lengths(lengths, n, t, x.device)
        mask = None if lengths is None else (
            torch.arange(t, device=x.device)[None, :] < lengths[:, None])  # (n, t)
        num_dirs = 2 if self.bidirectional else 1
        finals: list[tuple[Tensor, ...]] = []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for d in range(num_dirs):
                s0 = None if states is None else states[layer * num_dirs + d]
                out, s_n = self._run_direction(layer_input, self._params(layer, d), s0, mask,
                                               d == 1, backend)
                outputs.append(out)
                finals.append(s_n)
            layer_input = outputs[0] if num_dirs == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        final = tuple(torch.stack([f[i] for f in finals]) for i in range(self._num_state()))
        return layer_input, final


class ConvLSTM(_ConvRNNLayerBase):
    r"""Multi-layer convolutional LSTM over 1D, 2D or 3D maps, laid out as ``nn.LSTM``.

    Each layer applies :class:`ConvLSTMCell`'s update (gates i, f, g, o; optional per-channel
    peepholes) at every frame. Inputs and outputs are batch-first: ``(N, T, C, *S)``.
    ``forward(x, state=None, lengths=None)``: ``state`` continues a sequence (pass the state
    returned by the previous call; unidirectional layers then give exactly the result of one
    run over the joined sequence). ``lengths`` ``(N,)`` marks padded batches with
    packed-sequence semantics: frames at or past ``lengths[i]`` change nothing and output
    zeros, the final state is taken at each sequence's last valid frame, and the reverse
    direction starts there. Zero initial states take dtype and device from ``x``.

    Args:
        spatial_dims: number of spatial axes, 1, 2 or 3.
        in_channels: channels of the input ``x``.
        hidden_channels: channels ``H`` of the hidden state.
        kernel_size: int or per-axis tuple; odd and even sizes both keep the spatial size
            (even kernels pad one voxel more at the end of each axis).
        num_layers: stacked layers. Default: 1.
        bias: add ``bias_ih`` and ``bias_hh``. Default: True.
        bidirectional: run a second, reversed direction per layer and concatenate the two
            outputs on the channel axis. Default: False.
        dropout: dropout on the output of every layer except the last (as nn.LSTM), in
            training mode only. Default: 0.0.
        dilation: int or per-axis tuple, used by both convolutions. Default: 1.
        recompute: keep only the outputs and the states every 2 frames; backward recomputes
            the activations (input convolution included) segment by segment. Same outputs
            and gradients, about half the memory, ~20% more time. Default: False.
        device, dtype: factory keywords for the parameters.
        backend: ``"fused"``: one autograd node per direction and layer with a hand-written
            backward through time (fast, little memory; CPU and CUDA, float32/float64
            parameters, autocast to bfloat16/float16; second-order gradients are computed
            by differentiating the reference steps); ``"reference"``: the same computation
            from autograd ops, frame by frame (any device and dtype, torch.compile);
            ``"auto"``: fused where supported, else reference. The attribute may be changed
            after construction. Default: ``"auto"``.
        forget_bias: initial value of the forget-gate slice of ``bias_ih`` (the other biases
            start at zero). Default: 1.0 (Keras' ``unit_forget_bias``).
        peephole: per-channel peephole weights ``weight_peephole_l{k}`` ``(3*H,)`` ordered
            ``w_ci, w_cf, w_co``: ``w_ci * c_{t-1}`` is added to the i pre-activation,
            ``w_cf * c_{t-1}`` to f and ``w_co * c_t`` to o. Default: False.

    Shape:
        - x: ``(N, T, C_in, *S)``; state ``(h_0, c_0)``, each ``(num_layers*D, N, H, *S)``;
          lengths ``(N,)`` integers in ``[1, T]``.
        - output: ``(N, T, D*H, *S)``, the last layer's h at every frame;
          ``(h_n, c_n)``, each ``(num_layers*D, N, H, *S)``.
        - dtypes: under autocast the output has the autocast dtype and ``(h_n, c_n)`` the
          parameters' dtype (the state is carried at full precision); otherwise all have
          the parameters' dtype, which x must have.

    Attributes:
        weight_ih_l{k}: ``(4*H, C_in_k, *kernel)``, gates i, f, g, o; ``C_in_0 = in_channels``,
            ``C_in_k = D*H``. Suffix ``_reverse`` for the reverse direction.
        weight_hh_l{k}: ``(4*H, H, *kernel)``.
        bias_ih_l{k}, bias_hh_l{k}: ``(4*H,)``.

    Porting weights: from Keras ``ConvLSTM{1,2,3}D`` (``kernel`` ``k + (C_in, 4H)``,
    ``recurrent_kernel`` ``k + (H, 4H)``, gates i, f, c, o, one ``bias``) use
    ``weight_ih = kernel.permute(-1, -2, *range(n))`` (same for ``weight_hh``), ``bias_ih =
    bias`` and ``bias_hh = 0``; Keras' "same" padding and gate order match. From the
    concatenated design (one conv over ``cat(x, h)`` to ``4H`` channels, gates i, f, o, g):
    split the weight on its input axis into ``[:, :C_in]`` -> ``weight_ih`` and
    ``[:, C_in:]`` -> ``weight_hh``, reorder the gate blocks on axis 0 from i, f, o, g to
    i, f, g, o, and put its bias in ``bias_ih`` (``bias_hh = 0``).

    Examples:
        >>> lstm = ConvLSTM(3, in_channels=2, hidden_channels=8, kernel_size=3, num_layers=2)
        >>> x = torch.randn(1, 4, 2, 6, 10, 10)           # (N, T, C, D, H, W)
        >>> out, (h_n, c_n) = lstm(x)
        >>> tuple(out.shape), tuple(h_n.shape)
        ((1, 4, 8, 6, 10, 10), (2, 1, 8, 6, 10, 10))
        >>> more, state = lstm(torch.randn(1, 3, 2, 6, 10, 10), (h_n, c_n))   # continue
    """

    _CELL = LSTM

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int | Sequence[int],
        num_layers: int = 1,
        bias: bool = True,
        bidirectional: bool = False,
        dropout: float = 0.0,
        dilation: int | Sequence[int] = 1,
        forget_bias: float = 1.0,
        peephole: bool = False,
        recompute: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__(spatial_dims, in_channels, hidden_channels, kernel_size, num_layers,
                         bias, bidirectional, dropout, dilation, forget_bias, peephole,
                         recompute, device, dtype, backend)

    def forward(
        self,
        x: Tensor,
        state: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Shape: x ``(N, T, C_in, *S)`` -> ``(output (N, T, D*H, *S), (h_n, c_n))``."""
        out, (h_n, c_n) = self._sequence_forward(x, state, lengths)
        return out, (h_n, c_n)


class ConvGRU(_ConvRNNLayerBase):
    r"""Multi-layer convolutional GRU over 1D, 2D or 3D maps, laid out as ``nn.GRU``.

    Each layer applies :class:`ConvGRUCell`'s update (gates r, z, n with
    ``n = tanh(W_in * x + b_in + r * (W_hn * h + b_hn))``) at every frame. Inputs and outputs
    are batch-first: ``(N, T, C, *S)``.
    ``forward(x, state=None, lengths=None)``: ``state`` continues a sequence (pass the state
    returned by the previous call; unidirectional layers then give exactly the result of one
    run over the joined sequence). ``lengths`` ``(N,)`` marks padded batches with
    packed-sequence semantics: frames at or past ``lengths[i]`` change nothing and output
    zeros, the final state is taken at each sequence's last valid frame, and the reverse
    direction starts there. Zero initial states take dtype and device from ``x``.

    Args:
        spatial_dims: number of spatial axes, 1, 2 or 3.
        in_channels: channels of the input ``x``.
        hidden_channels: channels ``H`` of the hidden state.
        kernel_size: int or per-axis tuple; odd and even sizes both keep the spatial size
            (even kernels pad one voxel more at the end of each axis).
        num_layers: stacked layers. Default: 1.
        bias: add ``bias_ih`` and ``bias_hh``. Default: True.
        bidirectional: run a second, reversed direction per layer and concatenate the two
            outputs on the channel axis. Default: False.
        dropout: dropout on the output of every layer except the last (as nn.LSTM), in
            training mode only. Default: 0.0.
        dilation: int or per-axis tuple, used by both convolutions. Default: 1.
        recompute: keep only the outputs and the states every 2 frames; backward recomputes
            the activations (input convolution included) segment by segment. Same outputs
            and gradients, about half the memory, ~20% more time. Default: False.
        device, dtype: factory keywords for the parameters.
        backend: ``"fused"``: one autograd node per direction and layer with a hand-written
            backward through time (fast, little memory; CPU and CUDA, float32/float64
            parameters, autocast to bfloat16/float16; second-order gradients are computed
            by differentiating the reference steps); ``"reference"``: the same computation
            from autograd ops, frame by frame (any device and dtype, torch.compile);
            ``"auto"``: fused where supported, else reference. The attribute may be changed
            after construction. Default: ``"auto"``.

    Shape:
        - x: ``(N, T, C_in, *S)``; state ``h_0`` ``(num_layers*D, N, H, *S)``;
          lengths ``(N,)`` integers in ``[1, T]``.
        - output: ``(N, T, D*H, *S)``; ``h_n``: ``(num_layers*D, N, H, *S)``.
        - dtypes: as :class:`ConvLSTM` (under autocast the output in the autocast dtype,
          ``h_n`` in the parameters' dtype).

    Attributes:
        weight_ih_l{k}: ``(3*H, C_in_k, *kernel)``, gates r, z, n; ``C_in_0 = in_channels``,
            ``C_in_k = D*H``. Suffix ``_reverse`` for the reverse direction.
        weight_hh_l{k}: ``(3*H, H, *kernel)``.
        bias_ih_l{k}, bias_hh_l{k}: ``(3*H,)``.

    Examples:
        >>> gru = ConvGRU(1, in_channels=3, hidden_channels=5, kernel_size=4, bidirectional=True)
        >>> out, h_n = gru(torch.randn(2, 7, 3, 33), lengths=[7, 4])
        >>> tuple(out.shape), tuple(h_n.shape)
        ((2, 7, 10, 33), (2, 2, 5, 33))
    """

    _CELL = GRU

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int | Sequence[int],
        num_layers: int = 1,
        bias: bool = True,
        bidirectional: bool = False,
        dropout: float = 0.0,
        dilation: int | Sequence[int] = 1,
        recompute: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__(spatial_dims, in_channels, hidden_channels, kernel_size, num_layers,
                         bias, bidirectional, dropout, dilation, recompute=recompute,
                         device=device, dtype=dtype, backend=backend)

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Shape: x ``(N, T, C_in, *S)`` -> ``(output (N, T, D*H, *S), h_n)``."""
        out, (h_n,) = self._sequence_forward(x, state, lengths)
        return out, h_n
