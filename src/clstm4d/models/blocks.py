"""Per-frame building blocks shared by the UNets: layers chosen by ``spatial_dims`` from one table.

Shape legend: ``n`` batch, ``t`` time (frames), ``c`` channels, ``*s`` spatial axes (``(w,)``,
``(h, w)`` or ``(d, h, w)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from clstm4d._common import per_axis

__all__ = [
    "ACTS", "CHUNK_ELEMENTS", "NORMS", "ConvUnit", "DecoderStage", "EncoderStage", "crop_to",
    "layer", "pad_to_multiple", "run_stage",
]

# One table: the class for each kind of layer and each spatial_dims.
_LAYERS: dict[str, dict[int, type[nn.Module]]] = {
    "conv": {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d},
    "convtranspose": {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d},
    "maxpool": {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d},
    "batch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}

#: Normalisations accepted by ``norm=``. ``"instance"`` normalises every channel of every frame
#: of every sample on its own (no cross-frame statistics; affine; built as ``GroupNorm(c, c)``,
#: the same function as ``InstanceNorm{1,2,3}d(c, affine=True)``, faster on CPU and without
#: copies for channels-last tensors); ``"batch"`` pools statistics over batch *and* frames
#: in training mode, so a model with it is causal and frame-independent only in eval mode.
NORMS = ("instance", "batch", "group", "none")

#: Activations accepted by ``act=`` (``"leakyrelu"`` has slope 0.1, as MONAI's BasicUNet).
ACTS: dict[str, Callable[[], nn.Module]] = {
    "leakyrelu": lambda: nn.LeakyReLU(0.1, inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
    "gelu": nn.GELU,
    "silu": lambda: nn.SiLU(inplace=True),
}


def _axes(value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """One int for every axis, or one per axis, as a tuple."""
    return per_axis("size", value, spatial_dims)


def layer(kind: str, spatial_dims: int, *args, **kwargs) -> nn.Module:
    """Build the layer ``kind`` (``"conv"``, ``"convtranspose"``, ``"maxpool"``, ``"batch"``) for
    ``spatial_dims`` 1, 2 or 3.

    Examples:
        >>> layer("conv", 3, 4, 8, kernel_size=3, padding=1)
        Conv3d(4, 8, kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=(1, 1, 1))
    """
    return _LAYERS[kind][spatial_dims](*args, **kwargs)


def _norm(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    if norm == "instance":
        return nn.GroupNorm(channels, channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return layer(norm, spatial_dims, channels, affine=True)


class ConvUnit(nn.Module):
    """Convolution ("same": odd ``kernel_size``, default 3 on every axis) -> normalisation ->
    activation -> optional dropout.

    The convolution has no bias when a normalisation follows it (the norm's shift replaces it).

    Shape:
        ``(n, c_in, *s)`` -> ``(n, c_out, *s)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str,
                 act: str, dropout: float = 0.0,
                 kernel_size: int | Sequence[int] = 3) -> None:
        super().__init__()
        kernel = _axes(kernel_size, spatial_dims)
        self.conv = layer("conv", spatial_dims, in_channels, out_channels, kernel_size=kernel,
                          padding=tuple(k // 2 for k in kernel), bias=norm == "none")
        self.norm = _norm(norm, spatial_dims, out_channels)
        self.act = ACTS[act]()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.norm(self.conv(x))))


#: A recomputed stage whose output has more elements than this recomputes in pieces along the
#: folded ``n*t`` axis, so that backward holds one piece's activations at a time.
CHUNK_ELEMENTS = 2**21


def run_stage(fn: Callable[..., Tensor], args: Sequence[Tensor], out_elements: int,
              recompute: bool, chunkable: bool) -> Tensor:
    """``fn(*args)``; with ``recompute`` (and grad on) its activations are recomputed during
    backward instead of kept.

    ``chunkable`` says ``fn`` treats the items of the folded ``n*t`` axis independently and
    deterministically (no batch statistics, no dropout): then a stage with more than
    :data:`CHUNK_ELEMENTS` output elements runs as one checkpoint per piece of that axis, which
    gives the same values and gradients with a smaller transient peak in backward.
    """
    if not (recompute and torch.is_grad_enabled()):
        return fn(*args)
    chunks = min(args[0].shape[0], out_elements // CHUNK_ELEMENTS) if chunkable else 1
    if chunks <= 1:
        return _checkpoint(fn, *args, use_reentrant=False)
    pieces = zip(*(a.tensor_split(chunks) for a in args), strict=True)
    return torch.cat([_checkpoint(fn, *p, use_reentrant=False) for p in pieces])


class EncoderStage(nn.Module):
    """Optional max-pool by ``stride`` (per axis), then two :class:`ConvUnit`.

    With ``recompute=True`` the whole stage is recomputed during backward (see
    :func:`run_stage`), so only its input stays alive between forward and backward.

    Args:
        stride: pooling window and stride per axis (an int for all); ``None`` or all ones: no
            pooling.
        kernel_size: of both convolutions (odd, per axis or one int).

    Shape:
        ``(n, c_in, *s)`` -> ``(n, c_out, *s // stride)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str,
                 act: str, dropout: float, stride: int | Sequence[int] | None = None,
                 kernel_size: int | Sequence[int] = 3) -> None:
        super().__init__()
        stride = _axes(1 if stride is None else stride, spatial_dims)
        self.scale = math.prod(stride)
        self.out_channels = out_channels
        self.pool = (layer("maxpool", spatial_dims, stride) if self.scale > 1
                     else nn.Identity())
        self.unit1 = ConvUnit(spatial_dims, in_channels, out_channels, norm, act, dropout,
                              kernel_size)
        self.unit2 = ConvUnit(spatial_dims, out_channels, out_channels, norm, act, dropout,
                              kernel_size)

    def _stage(self, x: Tensor) -> Tensor:
        return self.unit2(self.unit1(self.pool(x)))

    def forward(self, x: Tensor, recompute: bool = False, chunkable: bool = False) -> Tensor:
        out_elements = x.numel() // x.shape[1] * self.out_channels // self.scale
        return run_stage(self._stage, (x,), out_elements, recompute, chunkable)


class DecoderStage(nn.Module):
    """Transposed convolution (kernel = stride = ``stride``, per axis) of the deeper map,
    concatenation with the skip, then two :class:`ConvUnit`; recomputed as a whole like
    :class:`EncoderStage`.

    The upsampled map always lines up with the skip (the network pads its input to a multiple
    of the total stride per axis), so no crop or pad is needed here.

    Shape:
        deep ``(n, c_deep, *s // stride)``, skip ``(n, c_out, *s)`` -> ``(n, c_out, *s)``.
    """

    def __init__(self, spatial_dims: int, deep_channels: int, out_channels: int, norm: str,
                 act: str, dropout: float, stride: int | Sequence[int] = 2,
                 kernel_size: int | Sequence[int] = 3) -> None:
        super().__init__()
        stride = _axes(stride, spatial_dims)
        self.up = layer("convtranspose", spatial_dims, deep_channels, out_channels,
                        kernel_size=stride, stride=stride)
        self.unit1 = ConvUnit(spatial_dims, 2 * out_channels, out_channels, norm, act, dropout,
                              kernel_size)
        self.unit2 = ConvUnit(spatial_dims, out_channels, out_channels, norm, act, dropout,
                              kernel_size)

    def _stage(self, deep: Tensor, skip: Tensor, head: nn.Module | None = None) -> Tensor:
        # (n, c_out, *s): the concatenation stays inside the recomputed function
        x = self.unit2(self.unit1(torch.cat([self.up(deep), skip], dim=1)))
        return x if head is None else head(x)

    def forward(self, deep: Tensor, skip: Tensor, recompute: bool = False,
                chunkable: bool = False, head: nn.Module | None = None) -> Tensor:
        """``head`` (optional) is applied to the output inside the same recomputed function, so the
        stage's full-width output need not be kept for it."""
        fn = self._stage if head is None else (lambda d, s: self._stage(d, s, head))
        return run_stage(fn, (deep, skip), skip.numel(), recompute, chunkable)


def pad_to_multiple(x: Tensor, multiple: int | Sequence[int],
                    spatial_dims: int) -> tuple[Tensor, list[int]]:
    """Zero-pad the last ``spatial_dims`` axes of ``x`` at their end up to a multiple (one for
    all axes, or one per axis).

    Returns the padded tensor and the original spatial sizes (for :func:`crop_to`).

    Examples:
        >>> y, size = pad_to_multiple(torch.ones(1, 2, 5, 8), 4, spatial_dims=2)
        >>> tuple(y.shape), size
        ((1, 2, 8, 8), [5, 8])
        >>> tuple(pad_to_multiple(torch.ones(1, 2, 5, 7), (1, 4), spatial_dims=2)[0].shape)
        (1, 2, 5, 8)
    """
    size = list(x.shape[-spatial_dims:])
    multiples = _axes(multiple, spatial_dims)
    pads: list[int] = []
    for s, m in zip(reversed(size), reversed(multiples), strict=True):  # F.pad: last axis first
        pads += [0, -s % m]
    if any(pads):
        x = F.pad(x, pads)
    return x, size


def crop_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Crop the trailing spatial axes of ``x`` back to ``size`` (undoes :func:`pad_to_multiple`)."""
    if list(x.shape[-len(size):]) == list(size):
        return x
    index = (Ellipsis, *(slice(0, s) for s in size))
    return x[index]
