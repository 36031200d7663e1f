"""Shared pieces of the data layer: the geometry of an image and file suffixes.

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d._common import same_affine
from clstm4d.errors import DataError

__all__ = ["DataError", "Geometry", "full_suffix"]


@dataclass
class Geometry:
    """Everything needed to write a result back over the source it was read from.

    The returned arrays have layout ``(t, c, *s)``; the spatial axes keep the file's voxel order
    (NIfTI and NRRD: ``(x, y, z)`` as stored, i.e. ``i, j, k``; TIFF: ``(z, y, x)``; DICOM:
    ``(column, row, slice)``; NumPy: the array's own order).

    Args:
        format: ``"nifti"`` (one 4D file), ``"nifti-series"`` / ``"nrrd-series"`` (one 3D file
            per frame), ``"tiff"`` (an ImageJ hyperstack), ``"dicom"`` (a DICOM cine:
            :mod:`clstm4d.data.dicom`) or ``"numpy"`` (``.npy``/``.npz``:
            :mod:`clstm4d.data.arrays`).
        spatial_shape: spatial size of the returned arrays.
        frames: number of frames ``t``.
        channels: number of image channels ``c``.
        affine: ``(4, 4)`` map from voxel indices of the returned spatial axes (padded with
            zeros to 3) to world coordinates in ``space``.
        space: world frame: ``"RAS"`` for NIfTI, the NRRD ``space`` field, ``"LPS"`` for DICOM
            (``""`` for a cine without patient coordinates), ``""`` for TIFF and NumPy.
        space_unit: e.g. ``"mm"`` or ``"micron"``; ``None`` when the file has none.
        time_interval: seconds (or ``time_unit``) between frames; ``None`` when unknown.
        time_unit: ``"s"``, ``"ms"``, ``"us"`` or ``None``.
        sources: the file(s) read, one per frame for series.
        header: format-specific values that the writer needs (library header objects,
            TIFF axes, squeezed axes, segment metadata).

    Examples:
        >>> g = Geometry.default("nifti", (4, 5), frames=3, spacing=(2.0, 2.0), time_interval=0.5)
        >>> g.spacing, g.origin, g.spatial_dims
        ((2.0, 2.0), (0.0, 0.0), 2)
    """

    format: str
    spatial_shape: tuple[int, ...]
    frames: int
    channels: int = 1
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    space: str = ""
    space_unit: str | None = None
    time_interval: float | None = None
    time_unit: str | None = None
    sources: tuple[str, ...] = ()
    header: dict[str, Any] = field(default_factory=dict)

    FORMATS = ("nifti", "nifti-series", "nrrd-series", "tiff", "dicom", "numpy")

    def __post_init__(self):
        if self.format not in self.FORMATS:
            raise ValueError(f"Geometry: format must be one of {self.FORMATS}, got {self.format!r}")
        self.spatial_shape = tuple(int(n) for n in self.spatial_shape)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"Geometry: affine must be (4, 4), got {self.affine.shape}")

    @property
    def spatial_dims(self) -> int:
        return len(self.spatial_shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size along each returned spatial axis (column norms of the affine)."""
        cols = self.affine[:3, : self.spatial_dims]
        return tuple(float(v) for v in np.linalg.norm(cols, axis=0))

    @property
    def origin(self) -> tuple[float, ...]:
        """World position of voxel 0 (first ``spatial_dims`` coordinates)."""
        return tuple(float(v) for v in self.affine[: self.spatial_dims, 3])

    def same_grid(self, other: Geometry) -> bool:
        """Whether ``other`` has the same spatial shape and voxel-to-world affine (within
        :data:`clstm4d._common.GRID_ATOL`): the one test of "same grid" everywhere. Affines in
        RAS (NIfTI) and LPS (DICOM, NRRD) are compared in one frame."""
        if tuple(self.spatial_shape) != tuple(other.spatial_shape):
            return False
        if {self._frame, other._frame} == {"RAS", "LPS"}:
            return same_affine(self.ras_affine(), other.ras_affine())
        return same_affine(self.affine, other.affine)

    @property
    def _frame(self) -> str:
        space = self.space.upper()
        return {"RAS": "RAS", "LPS": "LPS", "LEFT-POSTERIOR-SUPERIOR": "LPS"}.get(space, space)

    def ras_affine(self) -> np.ndarray:
        """The affine in RAS world coordinates (LPS ones turned: x and y negated)."""
        if self._frame == "LPS":
            return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine
        return self.affine

    @property
    def direction(self) -> np.ndarray:
        """``(3, s)`` unit vectors of the spatial axes in world coordinates."""
        cols = self.affine[:3, : self.spatial_dims]
        return cols / np.maximum(np.linalg.norm(cols, axis=0), 1e-12)

    @classmethod
    def default(cls, format: str, spatial_shape, frames: int, channels: int = 1,
                spacing=None, origin=None, time_interval: float | None = None,
                space_unit: str | None = "mm", time_unit: str | None = "s") -> Geometry:
        """A geometry for arrays made from scratch (e.g. synthetic data): axis-aligned grid."""
        d = len(spatial_shape)
        if not 1 <= d <= 3:
            raise ValueError(f"Geometry.default: spatial_shape must have 1-3 axes, "
                             f"got {spatial_shape}")
        spacing = (1.0,) * d if spacing is None else tuple(float(v) for v in spacing)
        origin = (0.0,) * d if origin is None else tuple(float(v) for v in origin)
        if len(spacing) != d or len(origin) != d:
            raise ValueError(f"Geometry.default: spacing {spacing} and origin {origin} must have "
                             f"{d} values like spatial_shape {tuple(spatial_shape)}")
        affine = np.eye(4)
        for i in range(d):
            affine[i, i] = spacing[i]
            affine[i, 3] = origin[i]
        space = {"nifti": "RAS", "nifti-series": "RAS", "nrrd-series": "left-posterior-superior"}
        return cls(format=format, spatial_shape=tuple(spatial_shape), frames=frames,
                   channels=channels, affine=affine, space=space.get(format, ""),
                   space_unit=space_unit, time_interval=time_interval,
                   time_unit=time_unit if time_interval is not None else None)


def full_suffix(path: str | os.PathLike) -> str:
    """``.nii.gz``, ``.seg.nrrd``, ``.nrrd``, ``.tif`` ... (lower case)."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".seg.nrrd", ".ome.tiff", ".ome.tif"):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix
