"""Resampling sequences to a target voxel spacing and back, frame by frame.

Shape legend: ``t`` frames, ``c`` channels, ``k`` classes, ``*s`` spatial axes (the arrays'
axis order, which is the file's voxel order: see :class:`~clstm4d.data.Geometry`).

The resampled grid covers the same extent as the original: an axis of ``n`` voxels of size
``h`` becomes ``m = round(n * h / target)`` voxels of size ``n * h / m`` (within half a voxel
of the target), and voxel ``j`` of the new grid sits at index ``(j + 0.5) * n / m - 0.5`` of
the old one. That is the geometry of :func:`torch.nn.functional.interpolate` with
``align_corners=False``, which does the interpolation here (never across frames: time is only
ever a batch axis), so that resampling to the target shape and back to the original shape
returns to exactly the original grid. Images are interpolated linearly (bilinear, trilinear),
labels class by class (linear interpolation of each class's indicator, then the most likely
class: smoother than nearest neighbour and never inventing a class between two others).

Examples:
    >>> import numpy as np
    >>> from clstm4d.data import Geometry
    >>> g = Geometry.default("nifti", (8, 8, 3), frames=2, spacing=(1.0, 1.0, 4.0))
    >>> target_shape(g.spatial_shape, g.spacing, [1.0])
    (8, 8, 12)
    >>> image = np.random.default_rng(0).random((2, 1, 8, 8, 3), np.float32)
    >>> up = resample_image(image, (8, 8, 12))
    >>> up.shape, resample_image(up, (8, 8, 3)).shape
    ((2, 1, 8, 8, 12), (2, 1, 8, 8, 3))
    >>> resampled_geometry(g, (8, 8, 12)).spacing
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from clstm4d._common import check_host_memory, human_bytes
from clstm4d.errors import ConfigError

from ._common import DataError, Geometry
from .datalist import CaseData

__all__ = ["check_resample_memory", "resample_case", "resample_image", "resample_label",
           "resampled_geometry", "target_shape", "target_spacing_for"]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def target_spacing_for(spacing: Sequence[float] | float, spatial_dims: int,
                       name: str = "data.spacing") -> tuple[float, ...]:
    """``spacing`` as one positive float per spatial axis (one value is used for every axis)."""
    values = [spacing] if np.ndim(spacing) == 0 else list(spacing)
    if len(values) == 1:
        values = values * spatial_dims
    if len(values) != spatial_dims or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
            for v in values):
        raise ConfigError(f"{name} must be one positive number or {spatial_dims} (one per "
                         f"spatial axis, in the arrays' axis order), got {spacing!r}")
    return tuple(float(v) for v in values)


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target: Sequence[float] | float) -> tuple[int, ...]:
    """The voxel shape of ``shape`` (voxel size ``spacing``) resampled to ``target``:
    ``round(n * h / target)`` per axis, at least 1."""
    target = target_spacing_for(target, len(shape))
    return tuple(max(1, int(round(n * h / g)))
                 for n, h, g in zip(shape, spacing, target, strict=True))


def _fmt(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def check_resample_memory(shape: Sequence[int], spacing: Sequence[float],
                          target: Sequence[float] | float, frames: int, bytes_per_voxel: float,
                          name: str) -> tuple[int, ...]:
    """The shape of ``shape`` resampled to ``target`` (:func:`target_shape`), after checking
    that ``frames`` frames of it at ``bytes_per_voxel`` fit in the memory the machine has.

    Raises:
        DataError: naming ``name``, its spacing, the target's, the shape it would become and
            the memory that needs, before anything is allocated.
    """
    new = target_shape(shape, spacing, target)
    target = target_spacing_for(target, len(shape))
    voxels = frames * float(np.prod(new, dtype=np.float64))
    check_host_memory(
        voxels * bytes_per_voxel,
        f"{name}: at the model's voxel spacing {_fmt(target)} (the input's is "
        f"{_fmt(spacing)}) its {frames} frame(s) of {_fmt(shape)} voxels become {_fmt(new)} "
        f"voxels each ({human_bytes(4 * voxels)} per channel as float32); resample or crop it "
        "nearer the model's spacing first. It", error=DataError)
    return new


def resampled_geometry(geometry: Geometry, shape: Sequence[int]) -> Geometry:
    """``geometry`` on the grid of ``shape`` voxels covering the same extent (see the module
    docstring): same directions and extent, voxel size ``old size * n / m`` per axis."""
    shape = tuple(int(m) for m in shape)
    old = geometry.spatial_shape
    if len(shape) != len(old):
        raise ValueError(f"resampled_geometry: shape {shape} has {len(shape)} axes, the "
                         f"geometry {len(old)}")
    index = np.eye(4)  # new voxel index -> old voxel index
    for a, (n, m) in enumerate(zip(old, shape, strict=True)):
        index[a, a] = n / m
        index[a, 3] = 0.5 * n / m - 0.5
    return dataclasses.replace(geometry, spatial_shape=shape, affine=geometry.affine @ index)


def _interpolate(x, shape: Sequence[int]):
    """``x (b, c, *s)`` float tensor -> ``(b, c, *shape)``: linear, ``align_corners=False``."""
    import torch.nn.functional as F

    return F.interpolate(x, size=tuple(shape), mode=_MODES[len(shape)], align_corners=False)


def resample_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of every frame and channel of ``image (t, c, *s)`` onto ``shape``.

    Returns ``(t, c, *shape)`` float32; the same array when the shape is already ``shape``.
    """
    import torch

    shape = tuple(int(m) for m in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    out = np.empty(image.shape[:2] + shape, np.float32)
    for i, frame in enumerate(image):  # one frame at a time: never across time, small peak
        x = torch.from_numpy(np.ascontiguousarray(frame, np.float32)).unsqueeze(0)
        out[i] = _interpolate(x, shape)[0].numpy()
    return out


def resample_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Labels ``(t, *s)`` onto ``shape``, class by class: each class's indicator is
    interpolated linearly and every voxel takes the class with the largest value.

    Returns ``(t, *shape)`` with the dtype of ``label``.
    """
    import torch

    shape = tuple(int(m) for m in shape)
    if tuple(label.shape[1:]) == shape:
        return label
    out = np.empty((label.shape[0], *shape), label.dtype)
    classes = np.unique(label)
    for i, frame in enumerate(label):
        f = torch.from_numpy(np.ascontiguousarray(frame))
        best = torch.full(shape, -1.0)
        best_class = torch.zeros(shape, dtype=f.dtype)
        for k in classes:
            share = _interpolate((f == int(k)).float()[None, None], shape)[0, 0]
            better = share > best
            best = torch.where(better, share, best)
            best_class[better] = int(k)
        out[i] = best_class.numpy()
    return out


def resample_case(case: CaseData, spacing: Sequence[float] | float) -> CaseData:
    """``case`` resampled to voxel size ``spacing`` (image linear, label class by class), with
    its geometry updated; the same object when its grid is already at that spacing."""
    geometry = case.geometry
    if geometry is None:
        raise DataError("cannot resample: the case has no geometry (voxel spacing)",
                        case=case.name)
    per_voxel = 4 * case.image.shape[1] + (0 if case.label is None else 8 + 8)
    try:
        shape = check_resample_memory(geometry.spatial_shape, geometry.spacing, spacing,
                                      case.image.shape[0], per_voxel, "training case")
    except DataError as e:
        raise e.with_case(case.name) from None
    if shape == geometry.spatial_shape:
        return case
    label = None if case.label is None else resample_label(case.label, shape)
    return dataclasses.replace(case, image=resample_image(case.image, shape), label=label,
                               geometry=resampled_geometry(geometry, shape))
