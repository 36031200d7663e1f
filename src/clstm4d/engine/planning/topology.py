"""The network's layout for a dataset: the target voxel spacing, per-axis pooling strides and
kernels (nnU-Net's rules), and the shape of a patch at every level.

Axes are in the arrays' axis order everywhere (spacing, roi, strides and kernels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clstm4d.errors import ConfigError

__all__ = ["ANISOTROPIC_PERCENTILE", "ANISOTROPY_RATIO", "MIN_POOLED_VOXELS",
           "POOL_SPACING_RATIO", "TargetSpacing", "check_strides_for_roi",
           "derive_strides_kernels", "level_shapes", "target_spacing"]

#: Percentile of the spacings used for a strongly anisotropic axis (nnU-Net's choice).
ANISOTROPIC_PERCENTILE = 10
#: An axis is strongly anisotropic when its median spacing exceeds this times the finest.
ANISOTROPY_RATIO = 3.0
#: An axis is pooled only while its spacing is within this factor of the finest ...
POOL_SPACING_RATIO = 2.0
#: ... and while pooling leaves at least this many voxels.
MIN_POOLED_VOXELS = 4


def level_shapes(roi: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The spatial shape at every level for a patch ``roi``: padded up to the per-axis product
    of the strides, then divided by each level's strides.

    Examples:
        >>> level_shapes((40, 40, 10), [(2, 2, 1), (2, 2, 2)])
        [(40, 40, 10), (20, 20, 10), (10, 10, 5)]
    """
    total = [math.prod(s[a] for s in strides) for a in range(len(roi))]
    shape = tuple(-(-r // m) * m for r, m in zip(roi, total, strict=True))
    out = [shape]
    for s in strides:
        shape = tuple(n // k for n, k in zip(shape, s, strict=True))
        out.append(shape)
    return out


@dataclass
class TargetSpacing:
    """The voxel size the model will work at, per axis, and how each axis' value was chosen."""

    spacing: tuple[float, ...]
    rule: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(f"axis {a}: {s:g} ({r})"
                         for a, (s, r) in enumerate(zip(self.spacing, self.rule, strict=True)))


def target_spacing(spacings: Sequence[Sequence[float]]) -> TargetSpacing:
    """The median spacing of every axis; an axis whose median is more than
    :data:`ANISOTROPY_RATIO` times the finest uses the :data:`ANISOTROPIC_PERCENTILE`-th
    percentile instead (never below the finest axis), so that thick-slice cases are not
    interpolated up to the coarsest scanner's slices.

    Examples:
        >>> t = target_spacing([(1, 1, 5), (1.2, 1.2, 8), (0.8, 0.8, 5), (1, 1, 2.5)])
        >>> t.spacing
        (1.0, 1.0, 3.25)
        >>> t.rule
        ('median', 'median', '10th percentile: median 5 > 3 x finest 1')
    """
    arr = np.asarray(spacings, np.float64)
    median = np.median(arr, axis=0)
    finest = float(median.min())
    spacing, rule = [], []
    for a, m in enumerate(median):
        if m > ANISOTROPY_RATIO * finest:
            value = max(finest, float(np.percentile(arr[:, a], ANISOTROPIC_PERCENTILE)))
            spacing.append(round(value, 6))
            rule.append(f"{ANISOTROPIC_PERCENTILE}th percentile: median {m:g} > "
                        f"{ANISOTROPY_RATIO:g} x finest {finest:g}")
        else:
            spacing.append(round(float(m), 6))
            rule.append("median")
    return TargetSpacing(tuple(spacing), tuple(rule))


def derive_strides_kernels(spacing: Sequence[float], roi: Sequence[int], levels: int
                           ) -> tuple[list[list[int]], list[list[int]]]:
    """Pooling strides (``levels - 1``) and kernels (``levels``) per axis for a patch ``roi``
    at voxel size ``spacing`` (arrays' axis order):

    - an axis is pooled (stride 2) only while its spacing at that level is within
      :data:`POOL_SPACING_RATIO` of the finest axis' and pooling leaves at least
      :data:`MIN_POOLED_VOXELS` voxels; after a pooling its spacing doubles;
    - the kernel of an axis is 1 while it stays coarse (spacing more than
      :data:`POOL_SPACING_RATIO` times the finest), else 3.

    Examples:
        >>> s, k = derive_strides_kernels((1.0, 1.0, 5.0), (64, 64, 16), levels=4)
        >>> s
        [[2, 2, 1], [2, 2, 1], [2, 2, 2]]
        >>> k
        [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    """
    spacing = [float(v) for v in spacing]
    size = [int(r) for r in roi]
    strides, kernels = [], []
    for level in range(levels):
        finest = min(spacing)
        kernels.append([3 if h <= POOL_SPACING_RATIO * finest else 1 for h in spacing])
        if level == levels - 1:
            break
        stride = [2 if h <= POOL_SPACING_RATIO * finest and n // 2 >= MIN_POOLED_VOXELS
                  else 1 for h, n in zip(spacing, size, strict=True)]
        strides.append(stride)
        spacing = [h * s for h, s in zip(spacing, stride, strict=True)]
        size = [n // s for n, s in zip(size, stride, strict=True)]
    return strides, kernels


def check_strides_for_roi(strides: Sequence[Sequence[int]] | None, roi: Sequence[int],
                          key: str = "model.strides") -> None:
    """Refuse a pooling of an axis that is already down to :data:`MIN_POOLED_VOXELS` voxels
    or fewer at that level of the patch ``roi`` (a plan edited into something that cannot
    train), naming the key, the level and the axis."""
    if not strides:
        return
    size = [int(r) for r in roi]
    for level, stride in enumerate(strides):
        stride = [stride] * len(size) if isinstance(stride, int) else list(stride)
        if len(stride) != len(size):
            raise ConfigError(f"{key}[{level}] has {len(stride)} axes, the patch "
                              f"{list(roi)} has {len(size)}")
        for a, (n, s) in enumerate(zip(size, stride, strict=True)):
            if s > 1 and n <= MIN_POOLED_VOXELS:
                raise ConfigError(
                    f"{key}[{level}] pools axis {a} by {s}, but the patch {list(roi)} is "
                    f"down to {n} voxels on that axis at level {level} (the minimum is "
                    f"{MIN_POOLED_VOXELS}): set that stride to 1, use a larger data.roi, or "
                    f"run clstm4d plan again")
        size = [n // s for n, s in zip(size, stride, strict=True)]
