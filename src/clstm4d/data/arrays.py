"""NumPy arrays as inputs: ``.npy`` / ``.npz`` files with their axis order and spacing.

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes (kept in the file's
order). The axis order is a string of the letters ``T`` (time), ``C`` (channels) and ``Z``,
``Y``, ``X`` (space), one per array axis, e.g. ``"TZYX"`` or ``"TYXC"``; ``T`` or ``C`` may be
left out (one frame, one channel). It and the voxel spacing come from the reader's options or
from a small sidecar JSON beside the file (``scan.npy`` -> ``scan.json``)::

    {"axes": "TZYX", "spacing": [2.0, 0.8, 0.8], "time_interval": 0.04, "array": "image"}

(``array``: which array of an ``.npz``; default ``image``, or its only one). Options given to
the reader win over the sidecar. Without either, an array of ``spatial_dims + 2`` axes is taken
as ``(t, c, *s)`` and one of ``spatial_dims + 1`` as ``(t, *s)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from clstm4d._common import atomic_file

from ._common import DataError, Geometry, full_suffix

__all__ = ["NUMPY_SUFFIXES", "array_geometry", "read_array", "write_array", "sidecar_path"]

NUMPY_SUFFIXES = (".npy", ".npz")
_SPATIAL = "ZYX"


def sidecar_path(path: str | os.PathLike) -> Path:
    """``scan.npy`` -> ``scan.json``."""
    path = Path(path)
    return path.with_name(path.name[: -len(full_suffix(path))] + ".json")


def read_array(path: str | os.PathLike, spatial_dims: int | None = None, *,
               axes: str | None = None, spacing=None, time_interval: float | None = None
               ) -> tuple[np.ndarray, Geometry]:
    """Read ``path`` (``.npy`` or ``.npz``) as ``(t, c, *s)`` float32 and a ``"numpy"``
    :class:`Geometry` (axis-aligned, ``spacing`` per spatial axis, origin 0).

    Examples:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path((tmp := tempfile.TemporaryDirectory()).name) / "cine.npy"
        >>> np.save(f, np.zeros((5, 32, 24), np.float32))
        >>> image, g = read_array(f, axes="TYX", spacing=(0.8, 0.7), time_interval=0.04)
        >>> image.shape, g.spacing, g.time_interval
        ((5, 1, 32, 24), (0.8, 0.7), 0.04)
        >>> tmp.cleanup()
    """
    path = Path(path)
    options = _sidecar(path)
    axes = axes if axes is not None else options.get("axes")
    spacing = spacing if spacing is not None else options.get("spacing")
    if time_interval is None:
        time_interval = options.get("time_interval")
    data = _load(path, options.get("array"))
    axes = _check_axes(axes, data, spatial_dims, path)
    for letter in "TC":
        if letter not in axes:
            data, axes = data[None], letter + axes
    order = [axes.index("T"), axes.index("C")] + [i for i, a in enumerate(axes) if a in _SPATIAL]
    data = np.transpose(data, order)  # (t, c, *s)
    geometry = array_geometry(data.shape, spacing, time_interval, source=path)
    geometry.header["numpy_axes"] = "T" + "".join(axes[i] for i in order[2:])
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise DataError(f"expected a real-valued numeric array, got dtype {data.dtype}", path)
    return np.ascontiguousarray(data), geometry


def array_geometry(shape, spacing=None, time_interval: float | None = None,
                   source: str | os.PathLike | None = None) -> Geometry:
    """The ``"numpy"`` geometry of an image ``(t, c, *s)`` of ``shape``: axis-aligned, origin 0,
    ``spacing`` one number per spatial axis (or one for all; ``None``: 1, no unit).

    Examples:
        >>> array_geometry((4, 1, 16, 12), spacing=0.5).spacing
        (0.5, 0.5)
    """
    spacing = _check_spacing(spacing, len(shape) - 2, source or "array")
    geometry = Geometry.default("nifti", shape[2:], shape[0], shape[1], spacing=spacing,
                                time_interval=time_interval,
                                space_unit="mm" if spacing is not None else None)
    geometry.format, geometry.space = "numpy", ""
    geometry.sources = (str(source),) if source is not None else ()
    return geometry


def _sidecar(path: Path) -> dict:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        options = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the sidecar of {path.name} ({type(e).__name__}: {e})",
                        side) from e
    unknown = sorted(set(options) - {"axes", "spacing", "time_interval", "array"}) if isinstance(
        options, dict) else None
    if unknown is None or unknown:
        raise DataError(f"sidecar must be a JSON object with keys axes, spacing, time_interval, "
                        f"array; got {unknown if unknown else type(options).__name__}", side)
    return options


def _load(path: Path, key: str | None) -> np.ndarray:
    if not path.exists():
        raise DataError("file not found", path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read NumPy file ({type(e).__name__}: {e})", path) from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded
    with loaded:
        names = list(loaded.files)
        key = key or ("image" if "image" in names else names[0] if len(names) == 1 else None)
        if key not in names:
            raise DataError(f".npz holds arrays {names}: name the image's as \"array\" in the "
                            f"sidecar {sidecar_path(path).name} (or store it as 'image')", path)
        return loaded[key]


def _check_axes(axes, data, spatial_dims, path) -> str:
    if axes is None:
        if spatial_dims is not None and data.ndim == spatial_dims + 2:
            return "TC" + _SPATIAL[-spatial_dims:]
        if spatial_dims is not None and data.ndim == spatial_dims + 1:
            return "T" + _SPATIAL[-spatial_dims:]
        raise DataError(f"array of shape {data.shape}: give its axis order (e.g. axes 'TZYX' "
                        f"or 'TCYX': --axes, or \"axes\" in {sidecar_path(path).name})", path)
    axes = str(axes).upper()
    bad = set(axes) - set("TC" + _SPATIAL)
    if bad or len(set(axes)) != len(axes) or len(axes) != data.ndim or not set(axes) & set(
            _SPATIAL):
        raise DataError(f"axes {axes!r} do not fit an array of shape {data.shape}: one letter of "
                        "T, C, Z, Y, X per axis, each once, at least one of Z, Y, X", path)
    d = sum(a in _SPATIAL for a in axes)
    if spatial_dims is not None and d > spatial_dims:
        raise DataError(f"axes {axes!r} have {d} spatial axes, expected {spatial_dims}", path)
    return axes


def _check_spacing(spacing, d, path):
    if spacing is None:
        return None
    values = [spacing] if isinstance(spacing, (int, float)) else list(spacing)
    if len(values) == 1:
        values = values * d
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        values = []
    if len(values) != d or not all(np.isfinite(v) and v > 0 for v in values):
        raise DataError(f"spacing {spacing!r}: expected {d} positive numbers (one per spatial "
                        "axis, in the array's order) or one for all", path)
    return values


def write_array(array: np.ndarray, path: str | os.PathLike, label: bool) -> None:
    """``(t, c, *s)`` -> ``path``: ``.npy`` (labels ``(t, *s)``, images ``(t, c, *s)``), or
    ``.npz`` holding it as ``labels`` / ``image``; written atomically."""
    data = array[:, 0] if label else array
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            if full_suffix(path) == ".npz":
                np.savez_compressed(f, **{"labels" if label else "image": data})
            else:
                np.save(f, data)
