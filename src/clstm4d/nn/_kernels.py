"""The only module of clstm4d that touches private or version-dependent torch APIs.

Each private use is gated on the torch version it was checked with (:data:`PRIVATE_API_FROM`)
and on the attribute existing, and has a fallback built from public API that computes the
same numbers (tests run both: :func:`public_api_only`):

- :func:`conv`: float32 CPU convolutions go straight to oneDNN
  (``aten.mkldnn_convolution``): PyTorch's dispatch sends small batch-1 float32 convolutions
  to a native kernel that is several times slower. Fallback: ``F.conv{1,2,3}d``.
- :func:`conv_input_grad`, :func:`conv_weight_grad`: ``aten.convolution_backward``, one
  gradient at a time. Fallback: ``torch.nn.grad.conv{1,2,3}d_input`` / ``_weight``.
- :func:`graph_is_retained`: whether the running backward keeps the graph
  (``retain_graph=True``), so that saved buffers may not be overwritten. Fallback: True
  (never overwrite: same numbers, more memory).
- :func:`autocast_dtype`, :func:`is_compiling`: the public APIs changed signature across
  versions (torch 2.4 added the device argument of ``torch.is_autocast_enabled``).

Shape legend: ``b`` batch (frames folded in), ``c`` input channels, ``o`` output channels,
``*s`` spatial axes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PRIVATE_API_FROM",
    "autocast_disabled",
    "autocast_dtype",
    "conv",
    "conv_input_grad",
    "conv_weight_grad",
    "graph_is_retained",
    "is_compiling",
    "public_api_only",
]

#: the oldest torch whose private APIs used here were checked (README: "Supported torch")
PRIVATE_API_FROM = (2, 4)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_GRAD_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}
_GRAD_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}

_NEW_ENOUGH = torch.__version__ >= PRIVATE_API_FROM
_HAS = {
    "mkldnn_convolution": _NEW_ENOUGH and hasattr(torch.ops.aten, "mkldnn_convolution"),
    "convolution_backward": _NEW_ENOUGH and hasattr(torch.ops.aten, "convolution_backward"),
    "keep_graph": _NEW_ENOUGH and hasattr(torch._C._autograd,
                                          "_get_current_graph_task_keep_graph"),
}
_private = True  # switched off by public_api_only()


@contextlib.contextmanager
def public_api_only() -> Iterator[None]:
    """Use only the public-API fallbacks inside the block (for tests: same numbers)."""
    global _private
    before, _private = _private, False
    try:
        yield
    finally:
        _private = before


def _use(name: str) -> bool:
    return _private and _HAS[name]


# ----------------------------------------------------------------------------------------------
# autocast, compile, autograd state


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype active for ``device_type`` ("cpu", "cuda", ...), None when off."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


def autocast_disabled(device_type: str):
    """A context in which autocast is off for ``device_type`` (explicit casts only)."""
    return torch.autocast(device_type, enabled=False)


def graph_is_retained() -> bool:
    """Inside a backward: whether the graph is kept for another backward (retain_graph)."""
    if _use("keep_graph"):
        return torch._C._autograd._get_current_graph_task_keep_graph()
    return True


# ----------------------------------------------------------------------------------------------
# convolutions without autograd ('same' padding in F.pad order: last axis first)


def _symmetric(pad: tuple[int, ...]) -> bool:
    return all(a == b for a, b in zip(pad[::2], pad[1::2], strict=True))


def _prepare(x: Tensor, pad: tuple[int, ...]) -> tuple[Tensor, list[int]]:
    """Pad asymmetric 'same' padding explicitly; return the input and the conv padding."""
    sd = x.dim() - 2
    if _symmetric(pad):
        return x.contiguous(), list(pad[::2][::-1])
    return F.pad(x, pad).contiguous(), [0] * sd


def _onednn(x: Tensor) -> bool:
    return (_use("mkldnn_convolution") and x.device.type == "cpu" and x.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, ...],
         dilation: tuple[int, ...]) -> Tensor:
    """'same' convolution ``(b, c, *s) -> (b, o, *s)``; inputs of one dtype."""
    sd = weight.dim() - 2
    xp, padding = _prepare(x, pad)
    if _onednn(xp):
        return torch.ops.aten.mkldnn_convolution(
            xp, weight.contiguous(), bias, padding, [1] * sd, list(dilation), 1)
    return _CONV[sd](xp, weight, bias, padding=padding, dilation=dilation)


def conv_input_grad(dy: Tensor, x: Tensor, weight: Tensor, pad: tuple[int, ...],
                    dilation: tuple[int, ...]) -> Tensor:
    """Gradient of :func:`conv` with respect to ``x`` (only its shape is read) for ``dy``."""
    sd = weight.dim() - 2
    xp, padding = _prepare(x, pad)
    if _use("convolution_backward"):
        dx = torch.ops.aten.convolution_backward(
            dy.contiguous(), xp, weight, None, [1] * sd, padding, list(dilation), False,
            [0] * sd, 1, [True, False, False])[0]
    else:
        dx = _GRAD_INPUT[sd](xp.shape, weight, dy, padding=padding, dilation=dilation)
    if xp.shape != x.shape:
        # drop the gradient of the explicit padding: slice every spatial axis back
        index = [slice(None), slice(None)]
        for axis in range(sd):
            left, right = pad[2 * (sd - 1 - axis)], pad[2 * (sd - 1 - axis) + 1]
            index.append(slice(left, dx.shape[2 + axis] - right))
        dx = dx[tuple(index)]
    return dx


def _weight_grad(dy: Tensor, xp: Tensor, shape: tuple[int, ...], padding: list[int],
                 dilation: tuple[int, ...]) -> Tensor:
    sd = len(shape) - 2
    if _use("convolution_backward"):
        # the weight's values are not read: an expanded scalar gives its shape and dtype
        dummy = dy.new_empty(1).expand(shape)
        return torch.ops.aten.convolution_backward(
            dy, xp, dummy, None, [1] * sd, padding, list(dilation), False, [0] * sd, 1,
            [False, True, False])[1]
    return _GRAD_WEIGHT[sd](xp, shape, dy, padding=padding, dilation=dilation)


def conv_weight_grad(dy: Tensor, x: Tensor, weight: Tensor, pad: tuple[int, ...],
                     dilation: tuple[int, ...], acc: Tensor | None) -> Tensor:
    """Weight gradient of :func:`conv` (``dy``, ``x`` of one dtype), added to ``acc`` in
    place, or returned in ``weight``'s dtype when ``acc`` is None.

    When the weights are large next to the activations (a UNet bottleneck), the gradient is
    computed in blocks of output channels: oneDNN computes each block in its own layout and
    then reorders it, so one call over all channels would hold the weight gradient twice.
    """
    xp, padding = _prepare(x, pad)
    g = weight.shape[0]
    blocks = max(1, min(4, weight.numel() // max(1, dy.numel())))
    bounds = [round(i * g / blocks) for i in range(blocks + 1)]
    fresh = acc is None
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        dw = _weight_grad(dy[:, a:b].contiguous(), xp, (b - a, *weight.shape[1:]), padding,
                          dilation)
        if fresh and blocks == 1:
            return dw.to(weight.dtype)
        if acc is None:
            acc = torch.empty_like(weight)
        if fresh:
            acc[a:b] = dw
        else:
            acc[a:b] += dw
        del dw
    return acc
