"""Memory attention: a temporal block that attends over a bounded bank of past frames'
features (the memory attention of SAM2 / MedSAM2), a drop-in for the UNet's ConvLSTM/ConvGRU.

Shape legend: ``n`` batch, ``t`` frames of this call, ``m`` frames in the bank (``<= bank``),
``c`` channels, ``*s`` spatial axes of the level, ``q`` = ``prod(s)`` query tokens per frame,
``p`` memory tokens per frame (``prod(s // pool)``), ``e`` heads, ``d`` = ``c / e`` channels
per head.

Frame by frame, with ``x_j`` (``(n, c, *s)``) the features of frame ``j``, ``u_j =
LayerNorm(x_j)`` per voxel, ``pool(.)`` the average over ``pool`` windows (the memory tokens)
and ``B`` the bank (the memory keys and values of the last ``bank`` frames)::

    Q = rope(u_j Wq)     own keys/values:  rope(pool(u_j) Wk) + E_k[0],  pool(u_j) Wv + E_v[0]
                         bank frame i:     K_i + E_k[j - i],             V_i + E_v[j - i]
    h_j = x_j + softmax(Q K^T / sqrt(d)) V Wo            (over the own and the bank's tokens)
    y_j = h_j + W2 gelu(W1 LayerNorm(h_j))
    K_j, V_j = rope(pool(LayerNorm'(y_j)) Wk'), pool(LayerNorm'(y_j)) Wv'  -> pushed into B

As in SAM2's memory encoder, the bank holds what each frame concluded (its output), not its
raw features, so what the block inferred (e.g. which object is which) can be carried on
beyond ``bank`` frames, frame to frame, while the attention itself looks back at most
``bank`` frames. ``rope`` rotates pairs of channels by angles proportional to the token's
coordinate along each spatial axis (axial rotary encoding, in the level's voxels; a pooled
token sits at its window's centre), so that ``Q K^T`` depends on the relative position of
query and memory token: the block is translation equivariant and takes any spatial size.
``E_k``, ``E_v`` (``bank + 1`` learnt vectors) encode the relative time ``j - i``. The block
is causal; its state is the bank (at most ``bank`` frames of ``p`` tokens however long the
sequence), and running a sequence in chunks with the state carried computes the one-pass
output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clstm4d._common import check_int, per_axis

__all__ = ["HEAD_CHANNELS", "MemoryAttention"]

#: channels per attention head (fewer heads when a level is narrower or not a multiple)
HEAD_CHANNELS = 32
#: wavelengths of the rotary encoding run from 2*pi up to 2*pi*ROPE_BASE voxels
ROPE_BASE = 100.0
_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _heads(channels: int) -> int:
    heads = max(1, channels // HEAD_CHANNELS)
    while channels % heads:
        heads -= 1
    return heads


class MemoryAttention(nn.Module):
    r"""Causal attention of every frame over its own features and a bank of the last ``bank``
    frames' outputs.

    See the module docstring for the equations.

    Args:
        spatial_dims: 1, 2 or 3.
        channels: ``c`` (input and output).
        bank: how many past frames the memory holds (>= 1). Default 8.
        pool: memory tokens are averaged over windows of this size (per axis or one int;
            must divide the spatial sizes). Default 1.

    Shape:
        ``(n, t, c, *s)`` -> ``(n, t, c, *s)``; the state is ``(keys, values)``, each
        ``(n, m, p, c)`` with ``m <= bank``.

    Examples:
        >>> block = MemoryAttention(2, channels=8, bank=3)
        >>> x = torch.randn(1, 5, 8, 6, 6)
        >>> y, (k, v) = block(x)
        >>> tuple(y.shape), tuple(k.shape)    # the bank holds the last 3 frames
        ((1, 5, 8, 6, 6), (1, 3, 36, 8))
        >>> a, state = block(x[:, :2])
        >>> b, _ = block(x[:, 2:], state)
        >>> torch.allclose(torch.cat([a, b], 1), y, atol=1e-5)
        True
    """

    def __init__(self, spatial_dims: int, channels: int, bank: int = 8,
                 pool: int | Sequence[int] = 1) -> None:
        super().__init__()
        owner = type(self).__name__
        self.spatial_dims = spatial_dims
        self.channels = check_int("channels", channels, 1, owner)
        self.bank = check_int("bank", bank, 1, owner)
        self.pool = per_axis("pool", pool, spatial_dims, owner)
        self.heads = _heads(channels)
        d = channels // self.heads
        # per axis: an even number of each head's channels rotate; the rest are not encoded
        self.rotary = 2 * (d // (2 * spatial_dims))
        self.norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(channels, 2 * channels, bias=False)
        self.memory_norm = nn.LayerNorm(channels)
        self.memory = nn.Linear(channels, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        self.time_k = nn.Parameter(torch.zeros(self.bank + 1, channels))
        self.time_v = nn.Parameter(torch.zeros(self.bank + 1, channels))
        self.mlp = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 2 * channels),
                                 nn.GELU(), nn.Linear(2 * channels, channels))
        nn.init.normal_(self.time_k, std=0.02)
        nn.init.normal_(self.time_v, std=0.02)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, channels={self.channels}, bank={self.bank}, "
                f"pool={self.pool}, heads={self.heads}")

    def _rope(self, x: Tensor, size: Sequence[int], step: Sequence[int]) -> Tensor:
        """Rotate ``x`` ``(..., tokens, e, d)`` by the tokens' coordinates on a grid of ``size``
        whose tokens are ``step`` voxels apart (centred in their windows)."""
        r = self.rotary
        if r == 0:
            return x
        exact = torch.float64 if x.dtype == torch.float64 else torch.float32  # the angles'
        freqs = ROPE_BASE ** (-torch.arange(0, r, 2, device=x.device, dtype=exact) / r)
        coords = torch.meshgrid(*[(torch.arange(n, device=x.device, dtype=exact) + 0.5)
                                  * k - 0.5 for n, k in zip(size, step, strict=True)],
                                indexing="ij")
        angles = torch.cat([c.reshape(-1, 1) * freqs for c in coords], 1)  # (tokens, D*r/2)
        cos, sin = (f(angles).to(x.dtype)[:, None] for f in (torch.cos, torch.sin))  # (tok,1,.)
        rot = self.spatial_dims * r
        a, b = x[..., :rot:2], x[..., 1:rot:2]  # the pairs that rotate
        turned = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
        return torch.cat([turned, x[..., rot:]], -1)

    def _keys(self, u: Tensor, size: Sequence[int], proj: nn.Linear) -> tuple[Tensor, Tensor]:
        """Keys (rotated) and values ``(n, t, p, c)`` of normalised frames ``u``
        ``(n, t, q, c)``, averaged over ``pool`` windows first."""
        n, t, q, c = u.shape
        if math.prod(self.pool) > 1:
            grid = u.transpose(2, 3).reshape(n * t, c, *size)  # (n*t, c, *s)
            grid = _POOLS[self.spatial_dims](grid, self.pool, self.pool)  # (n*t, c, *p)
            pooled = list(grid.shape[2:])
            u = grid.flatten(2).transpose(1, 2).unflatten(0, (n, t))  # (n, t, p, c)
        else:
            pooled = list(size)
        k, v = proj(u).chunk(2, -1)  # (n, t, p, c) each
        k = self._rope(k.unflatten(-1, (self.heads, -1)), pooled, self.pool).flatten(-2)
        return k, v

    def _check_state(self, state: Any, like: Tensor) -> tuple[Tensor, Tensor]:
        """The bank from ``state`` (an empty one when None), in ``like``'s dtype."""
        n, _, p, c = like.shape
        if state is None:
            empty = like.new_zeros(n, 0, p, c)
            return empty, empty
        ok = (isinstance(state, tuple) and len(state) == 2
              and all(isinstance(s, Tensor) and s.dim() == 4 for s in state)
              and state[0].shape == state[1].shape and state[0].shape[0] == n
              and state[0].shape[2:] == (p, c) and state[0].shape[1] <= self.bank)
        if not ok:
            got = ([tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__ for s in state]
                   if isinstance(state, (tuple, list)) else type(state).__name__)
            raise ValueError(
                f"{type(self).__name__}: state must be the (keys, values) bank a previous call "
                f"returned for the same batch and spatial size: two tensors of shape ({n}, "
                f"<= {self.bank}, {p}, {c}), got {got}")
        return state[0].to(like.dtype), state[1].to(like.dtype)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend from every frame of ``x`` over its own features and the bank, frame by frame,
        pushing each frame's output into the bank.

        Args:
            x: ``(n, t, c, *s)``.
            state: the ``(keys, values)`` bank a previous call returned (None: no past).

        Returns:
            ``(y, state)``: ``y`` ``(n, t, c, *s)`` and the bank after the last frame.
        """
        size = list(x.shape[3:])
        if any(s % k for s, k in zip(size, self.pool, strict=True)):
            raise ValueError(f"{type(self).__name__}: spatial size {tuple(size)} is not a "
                             f"multiple of pool={self.pool}")
        tokens = x.flatten(3).transpose(2, 3)  # (n, t, q, c)
        u = self.norm(tokens)
        queries = self._rope(self.q(u).unflatten(-1, (self.heads, -1)), size, (1,) * len(size))
        own_k, own_v = self._keys(u, size, self.kv)  # (n, t, p, c): each frame's own
        bank_k, bank_v = self._check_state(state, own_k)  # (n, m, p, c)
        time_k, time_v = self.time_k.to(own_k.dtype), self.time_v.to(own_v.dtype)
        outs = []
        for j in range(x.shape[1]):
            ago = torch.arange(bank_k.shape[1], -1, -1, device=x.device)  # m .. 1, 0 (own)
            keys, values = (torch.cat([b, o[:, j:j + 1]], 1) + e[ago][:, None]  # (n, m+1, p, c)
                            for b, o, e in ((bank_k, own_k, time_k), (bank_v, own_v, time_v)))
            keys, values = (z.flatten(1, 2).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                            for z in (keys, values))  # (n, e, (m+1)*p, d)
            a = F.scaled_dot_product_attention(queries[:, j].transpose(1, 2).to(values.dtype),
                                               keys.to(values.dtype), values)  # (n, e, q, d)
            h = tokens[:, j] + self.out(a.transpose(1, 2).flatten(-2)).to(tokens.dtype)
            y = h + self.mlp(h).to(h.dtype)  # (n, q, c)
            outs.append(y)
            # the bank keeps what this frame concluded (its output), the last `bank` frames
            mem_k, mem_v = self._keys(self.memory_norm(y)[:, None], size, self.memory)
            bank_k = torch.cat([bank_k, mem_k.to(bank_k.dtype)], 1)[:, -self.bank:]
            bank_v = torch.cat([bank_v, mem_v.to(bank_v.dtype)], 1)[:, -self.bank:]
        y = torch.stack(outs, 1).transpose(2, 3).unflatten(3, size)  # (n, t, c, *s)
        return y, (bank_k.clone(), bank_v.clone())  # copies: exactly `bank` frames' storage
