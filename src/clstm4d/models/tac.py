"""Time-as-channels baseline: the frames of a fixed window stacked as the channels of one UNet.

Shape legend: ``n`` batch, ``t`` time (frames), ``c`` channels, ``k`` classes, ``*s`` spatial
axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from clstm4d.models.unet import (
    TimeResolvedUNet,
    _positive_int,
    check_sequence_input,
    check_strides_kernels,
    check_unet_args,
)

__all__ = ["TimeAsChannelsUNet"]


class TimeAsChannelsUNet(nn.Module):
    r"""A spatial UNet that sees a window of ``frames`` frames as ``frames * C_in`` channels and
    predicts ``frames * C_out`` channels, the logits of every frame (as longitudinal nnU-Net
    variants do). Every output frame sees every input frame of the window; there is no state.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: channels per frame.
        out_channels: classes per frame.
        frames: the window length ``T`` the model is built for (inputs must have it).
        channels, norm, act, dropout, recompute, strides, kernel_sizes: as
            :class:`TimeResolvedUNet`.

    Shape:
        ``(N, T, C_in, *S)`` with ``T == frames`` -> logits ``(N, T, C_out, *S)``.

    Attributes:
        streamable: always False (the window is fixed and non-causal).

    Examples:
        >>> import torch
        >>> net = TimeAsChannelsUNet(2, in_channels=1, out_channels=2, frames=4, channels=(4, 8))
        >>> tuple(net(torch.randn(1, 4, 1, 9, 9)).shape)
        (1, 4, 2, 9, 9)
    """

    streamable = False

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        frames: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        norm: str = "instance",
        act: str = "leakyrelu",
        dropout: float = 0.0,
        recompute: bool = False,
        strides: Sequence[int | Sequence[int]] | None = None,
        kernel_sizes: Sequence[int | Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        channels = check_unet_args(owner, spatial_dims, in_channels, out_channels, channels,
                                   norm, act, dropout)
        _positive_int(owner, "frames", frames)
        strides, kernels = check_strides_kernels(owner, spatial_dims, len(channels), strides,
                                                 kernel_sizes)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.frames = frames
        self.config: dict[str, Any] = {
            "name": "tac", "spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": out_channels, "frames": frames, "channels": list(channels),
            "norm": norm, "act": act, "dropout": float(dropout), "recompute": bool(recompute),
            "strides": [list(s) for s in strides], "kernel_sizes": [list(k) for k in kernels],
        }
        # one "frame" of frames * c channels through the per-frame network
        self.unet = TimeResolvedUNet(spatial_dims, frames * in_channels, frames * out_channels,
                                     channels, temporal="none", norm=norm, act=act,
                                     dropout=dropout, recompute=recompute,
                                     strides=strides, kernel_sizes=kernels)

    def forward(self, x: Tensor, state: Any = None, return_state: bool = False) -> Tensor:
        """Shape: ``(N, T, C_in, *S)`` with ``T == frames`` -> logits ``(N, T, C_out, *S)``."""
        owner = type(self).__name__
        check_sequence_input(owner, x, self.spatial_dims, self.in_channels)
        if state is not None or return_state:
            raise ValueError(f"{owner}: state/return_state need a streamable model; the "
                             "time-as-channels baseline has no state")
        if x.shape[1] != self.frames:
            raise ValueError(
                f"{owner}: built for windows of frames={self.frames}, got T={x.shape[1]} "
                f"(input shape {tuple(x.shape)}); cut or pad the sequence into windows"
            )
        t = x.shape[1]
        y = self.unet(x.flatten(1, 2).unsqueeze(1))  # (n, 1, t*c, *s) -> (n, 1, t*k, *s)
        return y.squeeze(1).unflatten(1, (t, self.out_channels))  # (n, t, k, *s)
