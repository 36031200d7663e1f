"""Read and write image/label sequences with their geometry.

Formats: one 4D NIfTI file (``x, y, z, t[, c]``); a series of one 3D file per frame (NIfTI or
NRRD, labels as 3D Slicer ``.seg.nrrd``); an ImageJ TIFF hyperstack (``TZCYX``); DICOM cine
(read only: :mod:`.dicom`; labels over it are written as NIfTI, or as a DICOM Segmentation by
:mod:`.dicom_seg`); NumPy ``.npy``/``.npz`` (:mod:`.arrays`). Images come
back as ``(t, c, *s)`` float32, labels as ``(t, *s)`` int64, with a :class:`Geometry` that the
writers use to put results back in the same format, grid and units. Writers are atomic.

Shape legend: ``t`` frames, ``c`` channels, ``s`` / ``*s`` spatial axes in the file's voxel order.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d._common import atomic_file, check_host_memory, check_spatial_dims

from . import arrays, dicom
from ._common import DataError, Geometry, full_suffix

__all__ = ["read_image", "read_label", "write_image", "write_label", "detect_format",
           "output_path", "output_files"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".seg.nrrd", ".nhdr")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
FRAME_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES  # formats stored one file per frame
_TIME_UNITS = {"sec": "s", "msec": "ms", "usec": "us"}
_NIFTI_TIME_UNITS = {v: k for k, v in _TIME_UNITS.items()}


def detect_format(path_or_paths: PathLike | Sequence[PathLike]) -> str:
    """Name the format of a file or a per-frame list of files.

    Returns:
        ``"nifti"``, ``"tiff"``, ``"nifti-series"``, ``"nrrd-series"`` (a single NRRD file is
        a series of one frame), ``"dicom"`` (a DICOM file or a list of them; also a file
        without a suffix that starts like one) or ``"numpy"``.

    Examples:
        >>> detect_format("a.nii.gz"), detect_format(["f0.nrrd", "f1.nrrd"])
        ('nifti', 'nrrd-series')
        >>> detect_format("cine.dcm"), detect_format("cine.npz")
        ('dicom', 'numpy')
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        suffix = full_suffix(path_or_paths)
        if suffix in NIFTI_SUFFIXES:
            return "nifti"
        if suffix in TIFF_SUFFIXES:
            return "tiff"
        if suffix in NRRD_SUFFIXES:
            return "nrrd-series"
        if suffix in arrays.NUMPY_SUFFIXES:
            return "numpy"
        if suffix in dicom.DICOM_SUFFIXES or dicom.is_dicom(path_or_paths):
            return "dicom"
        raise DataError(f"unknown file type {suffix!r}; expected one of "
                        f"{NIFTI_SUFFIXES + NRRD_SUFFIXES + TIFF_SUFFIXES} or "
                        f"{dicom.DICOM_SUFFIXES + arrays.NUMPY_SUFFIXES}", path_or_paths)
    paths = list(path_or_paths)
    if not paths:
        raise DataError("empty list of frame files")
    kinds = {detect_format(p) for p in paths}
    if kinds == {"dicom"}:
        return "dicom"
    if len(kinds) > 1:
        raise DataError(f"a frame series mixes formats {sorted(kinds)}", paths[0])
    kind = kinds.pop()
    if kind in ("tiff", "numpy"):
        raise DataError(f"{'TIFF' if kind == 'tiff' else 'NumPy'} is read as one "
                        f"{'hyperstack ' if kind == 'tiff' else ''}file, not a list of frames",
                        paths[0])
    return "nifti-series" if kind == "nifti" else kind


def natural_key(path: PathLike) -> list:
    """Sort key that puts ``t2`` before ``t10``."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", str(path))]


def frame_files(folder: PathLike, label: bool = False) -> list[Path]:
    """The per-frame NIfTI/NRRD files of a folder, in natural order (``t2`` before ``t10``).

    Hidden files are skipped. Where images and 3D Slicer ``.seg.nrrd`` labels lie side by
    side, images (``label=False``) are the other files and labels the ``.seg.nrrd`` ones.
    """
    folder = Path(folder)
    frames = sorted((p for p in folder.iterdir() if full_suffix(p) in FRAME_SUFFIXES
                     and not p.name.startswith(".")), key=natural_key)
    segs = [p for p in frames if p.name.lower().endswith(".seg.nrrd")]
    if not label:
        frames = [p for p in frames if p not in segs]
    elif segs:
        frames = segs
    if not frames:
        raise DataError("folder has no NIfTI/NRRD frame files", folder)
    return frames


def read_image(path_or_paths: PathLike | Sequence[PathLike],
               spatial_dims: int | None = None, **array_options: Any
               ) -> tuple[np.ndarray, Geometry]:
    """Read an image sequence.

    Args:
        path_or_paths: one 4D NIfTI / TIFF file, or per-frame 3D files (NIfTI or NRRD): a
            list of them, or their folder (see :func:`frame_files`); a DICOM cine (one
            multi-frame file, or the files of one series: a list or their folder; see
            :mod:`clstm4d.data.dicom`); a NumPy ``.npy`` / ``.npz`` (:mod:`clstm4d.data.arrays`).
        spatial_dims: 2 or 3 to force the number of spatial axes: trailing size-1 axes are
            dropped (a 2D+t NIfTI is stored as ``x, y, 1, t``) or added; ``None`` keeps the file's.
        array_options: for NumPy files only: ``axes`` (e.g. ``"TZYX"``), ``spacing``,
            ``time_interval`` (see :func:`clstm4d.data.arrays.read_array`).

    Returns:
        ``(image, geometry)`` with image ``(t, c, *s)`` float32.

    Examples:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path((tmpdir := tempfile.TemporaryDirectory()).name) / "img.nii.gz"
        >>> g = Geometry.default("nifti", (6, 5), frames=3, spacing=(1.5, 1.5), time_interval=0.1)
        >>> _ = write_image(np.ones((3, 1, 6, 5), np.float32), g, out)
        >>> image, geom = read_image(out, spatial_dims=2)
        >>> image.shape, geom.spacing, geom.time_interval
        ((3, 1, 6, 5), (1.5, 1.5), 0.1)
        >>> tmpdir.cleanup()
    """
    array, geometry = _read(path_or_paths, spatial_dims, label=False, **array_options)
    return array, geometry


def read_label(path_or_paths: PathLike | Sequence[PathLike],
               spatial_dims: int | None = None, **array_options: Any
               ) -> tuple[np.ndarray, Geometry]:
    """Read a label sequence: like :func:`read_image` but returns ``(t, *s)`` int64.

    Values must be finite integers; 3D Slicer ``.seg.nrrd`` files are read as label maps
    (overlapping-segment files with several layers are merged when no voxel belongs to two
    segments, otherwise a :class:`DataError` says so).
    """
    array, geometry = _read(path_or_paths, spatial_dims, label=True, **array_options)
    if array.shape[1] != 1:
        raise DataError(f"a label map has one channel, this file has {array.shape[1]}",
                        geometry.sources[0])
    return array[:, 0], geometry


def write_image(array: np.ndarray, geometry: Geometry, out: PathLike | Sequence[PathLike]
                ) -> list[Path]:
    """Write ``(t, c, *s)`` values (float32) in ``geometry``'s format, grid and units.

    Args:
        array: ``(t, c, *s)``; ``t`` and ``*s`` must match the geometry.
        geometry: from :func:`read_image` (or :meth:`Geometry.default`).
        out: the file for single-file formats; for series a folder (one file per frame, named
            after the source frames, or ``frame_000...``) or a list of ``t`` paths. A folder
            (existing, or a path ending in ``/``) given for a single-file format receives a file
            named after the source.

    Returns:
        The written paths. Each file is written atomically.
    """
    array = np.asarray(array)
    if array.ndim != geometry.spatial_dims + 2:
        raise ValueError(f"write_image: array must be (t, c, *s) with {geometry.spatial_dims} "
                         f"spatial axes, got shape {array.shape}")
    return _write(array.astype(np.float32, copy=False), geometry, out, label=False)


def write_label(array: np.ndarray, geometry: Geometry, out: PathLike | Sequence[PathLike]
                ) -> list[Path]:
    """Write a ``(t, *s)`` label map in ``geometry``'s format (see :func:`write_image`).

    Stored as the smallest unsigned integer type that holds the values (uint8/uint16).
    Series of NRRD frames are written as ``.seg.nrrd`` files.
    """
    array = np.asarray(array)
    if array.ndim != geometry.spatial_dims + 1:
        raise ValueError(f"write_label: array must be (t, *s) with {geometry.spatial_dims} "
                         f"spatial axes, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"write_label: labels must be in [0, 65535], got range "
                         f"[{array.min()}, {array.max()}]")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError("write_label: labels must be integers, got fractional values")
    dtype = np.uint8 if (array.size == 0 or array.max() < 256) else np.uint16
    return _write(array.astype(dtype)[:, None], geometry, out, label=True)


def output_path(geometry: Geometry, folder: PathLike, name: str) -> Path:
    """Where to write the result of case ``name`` into ``folder``, in the source's format.

    Single-file formats: ``folder/<name><source suffix>`` (``.nii.gz``, ``.nii``, ``.tif``);
    series: the folder ``folder/<name>`` (the writer names the frames after the source's).
    Pass the result as ``out`` to :func:`write_label` / :func:`write_image`.

    Examples:
        >>> g = Geometry.default("nifti", (4, 4), 2)
        >>> output_path(g, "preds", "p01").as_posix()
        'preds/p01.nii.gz'
        >>> g.sources = ("scan/p01.tif",); g.format = "tiff"
        >>> output_path(g, "preds", "p01").as_posix()
        'preds/p01.tif'
    """
    folder = Path(folder)
    if geometry.format.endswith("-series"):
        return folder / name
    if geometry.format == "dicom":  # labels over DICOM images: NIfTI (or a DICOM-SEG, apart)
        return folder / (name + ".nii.gz")
    default = {"nifti": ".nii.gz", "tiff": ".tif", "numpy": ".npy"}[geometry.format]
    suffix = full_suffix(geometry.sources[0]) if geometry.sources else default
    return folder / (name + (suffix or default))


def output_files(geometry: Geometry, out: PathLike | Sequence[PathLike],
                 label: bool = False) -> list[Path]:
    """The files :func:`write_label` (``label=True``) or :func:`write_image` would write for
    ``out``, without writing anything (to check them before a long computation).

    Examples:
        >>> g = Geometry.default("nrrd-series", (4, 4), 2)
        >>> [p.as_posix() for p in output_files(g, "pred", label=True)]
        ['pred/frame_000.seg.nrrd', 'pred/frame_001.seg.nrrd']
    """
    return _outputs(geometry, out, geometry.frames, label)


# --------------------------------------------------------------------------------- dispatch

def _read(path_or_paths, spatial_dims, label, **array_options):
    check_spatial_dims(spatial_dims, allow_none=True)
    one = isinstance(path_or_paths, (str, os.PathLike))
    if one and Path(path_or_paths).is_dir():
        fmt = "dicom" if _is_dicom_folder(Path(path_or_paths)) else None
        if fmt is None:
            path_or_paths = frame_files(path_or_paths, label)
    else:
        fmt = None
    fmt = fmt or detect_format(path_or_paths)
    if array_options and fmt != "numpy":
        raise DataError(f"{sorted(array_options)} apply to NumPy (.npy/.npz) inputs only; this "
                        f"input is {fmt} and carries its own geometry",
                        path_or_paths if one else list(path_or_paths)[0])
    if fmt == "dicom":
        array, geometry = dicom.read_dicom(path_or_paths, label)
    elif fmt == "numpy":
        array, geometry = arrays.read_array(Path(path_or_paths), spatial_dims, **array_options)
    elif fmt == "nifti":
        array, geometry = _read_nifti(Path(path_or_paths), label)
    elif fmt == "tiff":
        array, geometry = _read_tiff(Path(path_or_paths), label)
    else:
        paths = ([path_or_paths] if isinstance(path_or_paths, (str, os.PathLike))
                 else list(path_or_paths))
        array, geometry = _read_series([Path(p) for p in paths], fmt, label)
    _check_not_empty(array, geometry)
    array, geometry = _fit_spatial_dims(array, geometry, spatial_dims)
    if label:
        array = _as_labels(array, geometry.sources[0])
    else:
        bad = ~np.isfinite(array)
        if bad.any():
            t = int(np.argwhere(bad.reshape(bad.shape[0], -1).any(1))[0, 0])
            raise DataError(f"image has {int(bad.sum())} NaN/inf values (first in frame {t})",
                            _frame_source(geometry, t))
    return array, geometry


def _check_not_empty(array, geometry):
    """Refuse a sequence without frames, channels or voxels along some axis."""
    if array.size:
        return
    t, c, *spatial = array.shape
    what = ("no frames (0 along time)" if t == 0 else "no channels" if c == 0 else
            f"an empty spatial axis (spatial shape {tuple(spatial)})")
    raise DataError(f"the image holds {what}; expected at least one frame of at least one "
                    "voxel", geometry.sources[0] if geometry.sources else None)


def _check_fits(shape, bytes_per_voxel, path):
    """Refuse, before reading, a file whose data would not fit in the machine's memory."""
    shape = tuple(int(n) for n in shape)
    voxels = float(np.prod(shape, dtype=np.float64))
    check_host_memory(voxels * bytes_per_voxel, f"{path}: reading its {shape} voxels",
                      error=DataError)


def _is_dicom_folder(folder: Path) -> bool:
    """A folder of DICOM files (and no NIfTI/NRRD frames)."""
    if any(full_suffix(p) in FRAME_SUFFIXES for p in folder.iterdir()):
        return False
    return dicom.is_dicom(folder)


def _frame_source(geometry, t):
    return geometry.sources[t] if len(geometry.sources) > t else geometry.sources[0]


def _as_labels(array, path):
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64, copy=False)
    if not np.isfinite(array).all():
        raise DataError("label has NaN/inf values", path)
    rounded = np.round(array)
    if not np.array_equal(rounded, array):
        raise DataError("label has non-integer values (is this an image, not a label map?)", path)
    return rounded.astype(np.int64)


def _fit_spatial_dims(array, geometry, spatial_dims):
    """Drop or add trailing size-1 spatial axes so that there are ``spatial_dims`` of them."""
    have = array.ndim - 2
    if spatial_dims is None or spatial_dims == have:
        return array, geometry
    if spatial_dims < have:
        extra = array.shape[2 + spatial_dims:]
        if any(n != 1 for n in extra):
            raise DataError(f"expected {spatial_dims} spatial axes, the file has spatial shape "
                            f"{array.shape[2:]} (only size-1 trailing axes can be dropped)",
                            geometry.sources[0])
        array = array.reshape(array.shape[: 2 + spatial_dims])
    else:
        array = array.reshape(array.shape + (1,) * (spatial_dims - have))
    geometry.header.setdefault("file_spatial_dims", have)
    geometry.spatial_shape = array.shape[2:]
    return array, geometry


def _file_shape_array(array, geometry):
    """Undo :func:`_fit_spatial_dims`: (t, c, *s) with the file's number of spatial axes."""
    have = geometry.header.get("file_spatial_dims", array.ndim - 2)
    now = array.ndim - 2
    if have > now:
        return array.reshape(array.shape + (1,) * (have - now))
    if have < now:
        return array.reshape(array.shape[: 2 + have])
    return array


def _outputs(geometry, out, frames, label):
    """Paths to write: one for single-file formats, ``frames`` for series."""
    series = geometry.format.endswith("-series")
    if not isinstance(out, (str, os.PathLike)):
        paths = [Path(p) for p in out]
        if len(paths) != (frames if series else 1):
            raise ValueError(f"out: expected {frames if series else 1} paths for format "
                             f"{geometry.format!r}, got {len(paths)}")
        return paths
    is_dir = str(out).endswith(("/", os.sep))
    out = Path(out)
    if not series:
        if is_dir or out.is_dir():
            src = Path(geometry.sources[0]).name if geometry.sources else "output"
            if geometry.format in ("dicom", "numpy"):
                return [output_path(geometry, out, Path(src).stem)]
            return [out / _renamed(src, geometry.format, label)]
        _check_suffix(geometry, out)
        return [out]
    names = [Path(s).name for s in geometry.sources]
    if len(names) != frames or len(set(names)) != frames:
        ext = ".nii.gz" if geometry.format == "nifti-series" else ".nrrd"
        names = [f"frame_{i:03d}{ext}" for i in range(frames)]
    return [out / _renamed(n, geometry.format, label) for n in names]


def _renamed(name, fmt, label):
    if fmt == "nrrd-series" and label and not name.lower().endswith(".seg.nrrd"):
        return re.sub(r"\.(nrrd|nhdr)$", "", name, flags=re.I) + ".seg.nrrd"
    if fmt == "nrrd-series" and name.lower().endswith(".nhdr"):
        return name[:-5] + ".nrrd"
    return name


def _write(array, geometry, out, label):
    t = array.shape[0]
    if t != geometry.frames or tuple(array.shape[2:]) != geometry.spatial_shape:
        raise ValueError(f"array (t={t}, spatial {tuple(array.shape[2:])}) does not match the "
                         f"geometry (t={geometry.frames}, spatial {geometry.spatial_shape})")
    array = _file_shape_array(array, geometry)
    paths = _outputs(geometry, out, t, label)
    if geometry.format in ("dicom", "numpy"):
        _write_other(array, geometry, paths[0], label)
    elif geometry.format == "nifti":
        _write_nifti(array, geometry, paths[0], label)
    elif geometry.format == "tiff":
        _write_tiff(array, geometry, paths[0], label)
    elif geometry.format == "nifti-series":
        for i, p in enumerate(paths):
            _write_nifti(array[i : i + 1], geometry, p, label, frame=True)
    else:
        for i, p in enumerate(paths):
            _write_nrrd(array[i], geometry, p, label)
    return paths


def _check_suffix(geometry, path):
    """Outputs over DICOM images are NIfTI; over NumPy arrays ``.npy`` / ``.npz``."""
    suffix = full_suffix(path)
    if geometry.format == "numpy" and suffix not in arrays.NUMPY_SUFFIXES:
        raise DataError(f"the result for a NumPy input is written as .npy or .npz, not "
                        f"{suffix or 'a name without a suffix'}", path)
    if geometry.format == "dicom" and suffix not in NIFTI_SUFFIXES:
        raise DataError(f"over DICOM images, results are written as NIfTI (.nii.gz) or, for "
                        f"labels, as a DICOM Segmentation (.dcm: predict --output seg.dcm); "
                        f"not {suffix or 'a name without a suffix'}", path)


def _write_other(array, geometry, path, label):
    """DICOM geometry: NIfTI over the same voxels; NumPy: ``.npy`` / ``.npz``."""
    _check_suffix(geometry, path)
    if geometry.format == "numpy":
        arrays.write_array(array, path, label)
    else:
        _write_nifti(array, dicom.nifti_geometry(geometry), path, label)


# --------------------------------------------------------------------------------- NIfTI

def _load_nifti(path):
    import nibabel as nib

    if not path.exists():
        raise DataError("file not found", path)
    try:
        img = nib.load(str(path))
        img.header.get_data_shape()
    except Exception as e:  # nibabel raises several types for broken headers
        raise DataError(f"cannot read NIfTI header ({type(e).__name__}: {e})", path) from e
    return img


def _read_nifti(path, label, frame=False):
    img = _load_nifti(path)
    shape = img.shape
    if len(shape) > 5 or len(shape) < 2:
        raise DataError(f"expected a 2D-5D NIfTI (x, y[, z[, t[, c]]]), got shape {shape}", path)
    _check_fits(shape, img.get_data_dtype().itemsize + 8 if label else 4, path)
    try:
        data = np.asanyarray(img.dataobj) if label else img.get_fdata(dtype=np.float32)
    except Exception as e:
        raise DataError(f"cannot read NIfTI data ({type(e).__name__}: {e})", path) from e
    data = data.reshape(shape + (1,) * (5 - len(shape)))  # (x, y, z, t, c)
    data = np.moveaxis(data, (3, 4), (0, 1))  # (t, c, x, y, z)
    file_dims = min(len(shape), 3)
    data = data.reshape(data.shape[:2] + shape[:file_dims])
    hdr = img.header
    zooms = hdr.get_zooms()
    space_unit, time_unit = hdr.get_xyzt_units()
    # header floats are float32: str() gives the shortest decimal (0.1, not 0.10000000149)
    time_interval = float(str(zooms[3])) if len(shape) >= 4 and zooms[3] > 0 else None
    affine = np.asarray(img.affine, dtype=np.float64)  # (4, 4) even for a 2D file
    geometry = Geometry(
        format="nifti-series" if frame else "nifti", spatial_shape=data.shape[2:],
        frames=data.shape[0], channels=data.shape[1], affine=affine, space="RAS",
        space_unit=None if space_unit == "unknown" else space_unit,
        time_interval=time_interval,
        time_unit=_TIME_UNITS.get(time_unit) if time_interval is not None else None,
        sources=(str(path),), header={"nifti_header": hdr.copy()},
    )
    return data, geometry


def _write_nifti(array, geometry, path, label, frame=False):
    import nibabel as nib

    # array (t, c, *s_file) -> (x, y, z, t, c) with trailing size-1 axes dropped
    d = array.ndim - 2
    data = np.moveaxis(array, (0, 1), (-2, -1))  # (*s, t, c)
    if frame:
        data = data[..., 0, :]  # one frame: (*s, c)
        data = data[..., 0] if data.shape[-1] == 1 else data.reshape(
            data.shape[:-1] + (1,) * (3 - d) + (1, data.shape[-1]))
    else:
        data = data.reshape(data.shape[:d] + (1,) * (3 - d) + data.shape[d:])  # (x, y, z, t, c)
        if data.shape[-1] == 1:
            data = data[..., 0]
    if full_suffix(path) not in NIFTI_SUFFIXES:  # nibabel would add ".nii" to the name
        raise ValueError(f"a NIfTI file name ends with .nii or .nii.gz, got {path}")
    src = geometry.header.get("nifti_header")
    klass = nib.Nifti1Image
    if src is not None and isinstance(src, nib.Nifti2Header):
        klass = nib.Nifti2Image
    hdr = src.copy() if src is not None else None
    img = klass(np.ascontiguousarray(data), geometry.affine, header=hdr)
    h = img.header
    h.set_data_dtype(data.dtype)
    if src is None:
        zooms = list(geometry.spacing) + [1.0] * (3 - geometry.spatial_dims)
        if data.ndim >= 4:
            zooms.append(geometry.time_interval or 1.0)
        if data.ndim == 5:
            zooms.append(1.0)
        h.set_zooms(zooms[: data.ndim])
    elif data.ndim >= 4 and geometry.time_interval:
        zooms = list(h.get_zooms())
        zooms[3] = geometry.time_interval
        h.set_zooms(zooms)
    h.set_xyzt_units(geometry.space_unit or "unknown",
                     _NIFTI_TIME_UNITS.get(geometry.time_unit, "unknown"))
    if label:
        h.set_slope_inter(1.0, 0.0)
    else:
        h.set_slope_inter(np.nan, np.nan)
    if src is not None:  # keep which of qform/sform the source declared (codes included)
        qcode, scode = int(src["qform_code"]), int(src["sform_code"])
        if not qcode and not scode:
            scode = 2  # the source had neither: declare the affine so that it survives
        img.set_qform(src.get_qform() if qcode else None, code=qcode)
        img.set_sform(geometry.affine if scode else None, code=scode)
        if qcode and not scode:
            img.set_qform(geometry.affine, code=qcode)
    with atomic_file(path) as tmp:
        nib.save(img, str(tmp))


# --------------------------------------------------------------------------------- series

def _read_series(paths, fmt, label):
    frames, geometries = [], []
    for p in paths:
        if fmt == "nifti-series":
            data, g = _read_nifti(p, label, frame=True)
            if data.shape[0] != 1:
                raise DataError(f"a frame of a series must be one volume, this file has "
                                f"{data.shape[0]} frames (shape {tuple(g.spatial_shape)} x "
                                f"{data.shape[0]})", p)
        else:
            data, g = _read_nrrd(p, label)
        frames.append(data)
        geometries.append(g)
    first = geometries[0]
    for p, data, g in zip(paths, frames, geometries, strict=True):
        if data.shape[1:] != frames[0].shape[1:]:
            raise DataError(f"frame shape (c, *s) {data.shape[1:]} differs from the first "
                            f"frame's {frames[0].shape[1:]} ({paths[0].name})", p)
        if not g.same_grid(first):
            raise DataError(f"frame geometry (affine {np.round(g.affine[:3], 4).tolist()}) differs "
                            f"from the first frame's ({paths[0].name}: "
                            f"{np.round(first.affine[:3], 4).tolist()})", p)
    array = np.concatenate(frames, axis=0)
    first.frames = array.shape[0]
    first.sources = tuple(str(p) for p in paths)
    return array, first


# --------------------------------------------------------------------------------- NRRD

_SPATIAL_KINDS = {"domain", "space"}


def _read_nrrd(path, label):
    import nrrd

    if not path.exists():
        raise DataError("file not found", path)
    try:
        sizes = nrrd.read_header(str(path)).get("sizes")
    except Exception:  # the read below names what is wrong
        sizes = None
    if sizes is not None:  # the file's own type (up to 8 bytes) and the converted copy
        _check_fits(sizes, 16 if label else 12, path)
    try:
        data, header = nrrd.read(str(path))
    except Exception as e:
        raise DataError(f"cannot read NRRD ({type(e).__name__}: {e})", path) from e
    kinds = header.get("kinds") or ["domain"] * data.ndim
    dirs = header.get("space directions")
    spatial = []
    for i in range(data.ndim):
        kind = str(kinds[i]).lower()
        has_dir = dirs is not None and not np.isnan(np.asarray(dirs[i], dtype=float)).any()
        spatial.append(has_dir if dirs is not None else kind in _SPATIAL_KINDS)
    nonspatial = [i for i, s in enumerate(spatial) if not s]
    if len(nonspatial) > 1:
        raise DataError(f"NRRD with {len(nonspatial)} non-spatial axes (kinds {kinds}) is not "
                        "supported; expected one 3D volume per frame", path)
    extra = {}
    if nonspatial:
        ax = nonspatial[0]
        quantity = str(header.get(f"axis {ax} quantity", "")).lower()
        if str(kinds[ax]).lower() == "time" or quantity == "time" or \
                path.name.lower().endswith(".seq.nrrd"):
            raise DataError("a 4D NRRD with a time axis (a 3D Slicer sequence) is not read as "
                            "one file; save one 3D .nrrd per frame and list them", path)
        data = np.moveaxis(data, ax, 0)
        is_segmentation = path.name.lower().endswith(".seg.nrrd") or any(
            k.startswith("Segment") for k in header)
        if label and not is_segmentation:
            raise DataError(f"a label frame must be one 3D volume; this NRRD has a non-spatial "
                            f"axis {ax} (kind {kinds[ax]!r}, size {data.shape[0]}) and no 3D "
                            "Slicer segment fields", path)
        if label:
            data = _merge_segment_layers(data, header, path)[None, None]
            extra["merged_layers"] = True
        else:  # a vector/list axis of an image: channels
            data = data[None]
    else:
        data = data[None, None]
    # data: (1, c, *s)
    d = data.ndim - 2
    affine = _nrrd_affine(header, dirs, spatial, d)
    units = header.get("space units")
    keep = {k: v for k, v in header.items() if k.startswith("Segment")
            or k.startswith("Segmentation_")}
    geometry = Geometry(
        format="nrrd-series", spatial_shape=data.shape[2:], frames=1, channels=data.shape[1],
        affine=affine, space=str(header.get("space", "")),
        space_unit=str(units[0]) if units else None, sources=(str(path),),
        header={"nrrd_space_dimension": int(header.get("space dimension", d) or d),
                "segment_fields": keep, **extra},
    )
    return data, geometry


def _nrrd_affine(header, dirs, spatial: list[bool], d: int) -> np.ndarray:
    """The ``(4, 4)`` voxel-to-world map of a NRRD's ``d`` spatial axes: ``space directions``
    (or ``spacings``) and ``space origin``."""
    affine = np.eye(4)
    if dirs is not None:
        dirs_sp = np.asarray([dirs[i] for i in range(len(spatial)) if spatial[i]], dtype=float)
        affine[: dirs_sp.shape[1], :d] = dirs_sp.T
    else:
        spacings = header.get("spacings")
        for i in range(d):
            affine[i, i] = float(spacings[i]) if spacings is not None else 1.0
    origin = header.get("space origin")
    if origin is not None:
        origin = np.asarray(origin, dtype=float)
        affine[: len(origin), 3] = origin
    return affine


def _merge_segment_layers(layers, header, path):
    """3D Slicer overlapping-segment layout ``(layer, *s)`` -> one label map ``(*s)``."""
    if layers.shape[0] == 1:
        return layers[0]
    occupied = (layers != 0).sum(0)
    both = int((occupied > 1).sum())
    if both:
        raise DataError(f"segments overlap at {both} voxels (3D Slicer's overlapping-segments "
                        f"layout, {layers.shape[0]} layers); clstm4d needs one label per voxel: "
                        "export the segmentation as a labelmap or remove the overlap", path)
    layer_of = {}
    for key, value in header.items():
        m = re.fullmatch(r"Segment(\d+)_(Layer|LabelValue)", key)
        if m:
            layer_of.setdefault(int(m.group(1)), {})[m.group(2)] = int(value)
    out = np.zeros(layers.shape[1:], dtype=layers.dtype)
    pairs = [(v.get("Layer", 0), v.get("LabelValue", 1)) for _, v in sorted(layer_of.items())]
    values = [v for _, v in pairs]
    if pairs and len(set(values)) != len(values):
        # the same label value is reused in several layers: number segments 1..n in order
        for index, (layer, value) in enumerate(pairs, start=1):
            out[layers[layer] == value] = index
        logger.warning("%s: label values repeat across layers; segments renumbered 1..%d",
                       path, len(pairs))
        return out
    for layer in layers:
        out[layer != 0] = layer[layer != 0]
    return out


def _write_nrrd(frame, geometry, path, label):
    """frame ``(c, *s)``."""
    import nrrd

    d = frame.ndim - 1
    data = frame[0] if frame.shape[0] == 1 else np.moveaxis(frame, 0, -1)  # channels last
    space_dim = max(geometry.header.get("nrrd_space_dimension", 3), d)
    header: dict[str, Any] = {
        "type": str(data.dtype), "dimension": data.ndim,
        "space directions": _nrrd_directions(geometry, d, space_dim, data.ndim),
        "space origin": geometry.affine[:space_dim, 3].copy(),
        "kinds": ["domain"] * d + (["vector"] if data.ndim > d else []),
        "encoding": "gzip",
    }
    if geometry.space:
        header["space"] = geometry.space
    else:
        header["space dimension"] = space_dim
    if geometry.space_unit:
        header["space units"] = [geometry.space_unit] * space_dim
    if label and not geometry.header.get("merged_layers"):
        header.update(geometry.header.get("segment_fields", {}))
    with atomic_file(path) as tmp:
        nrrd.write(str(tmp), np.ascontiguousarray(data), header, index_order="F")


def _nrrd_directions(geometry, d, space_dim, ndim):
    dirs = np.full((ndim, space_dim), np.nan)
    dirs[:d] = geometry.affine[:space_dim, :d].T
    return dirs


# --------------------------------------------------------------------------------- TIFF

def _read_tiff(path, label):
    import tifffile

    if not path.exists():
        raise DataError("file not found", path)
    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            axes = series.axes.upper()
            _check_fits(series.shape, series.dtype.itemsize + (8 if label else 4), path)
            data = series.asarray()
            ij = tf.imagej_metadata or {}
            page = tf.pages[0]
            xres = page.tags.get("XResolution")
            yres = page.tags.get("YResolution")
            resolution = [_ratio(r.value) if r is not None else None for r in (yres, xres)]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read TIFF ({type(e).__name__}: {e})", path) from e
    # axes other than T Z C Y X: samples -> channels, one generic stack axis -> time
    axes = axes.replace("S", "C") if "C" not in axes else axes
    generic = [a for a in axes if a not in "TZCYX"]
    if generic and "T" not in axes and len(generic) == 1:
        axes = axes.replace(generic[0], "T")
        generic = []
    if generic or len(set(axes)) != len(axes) or not {"Y", "X"} <= set(axes):
        raise DataError(f"TIFF axes {series.axes!r}: expected a subset of 'TZCYX' with Y and X",
                        path)
    for a in "TZC":
        if a not in axes:
            data = data[None]
            axes = a + axes
    data = np.transpose(data, [axes.index(a) for a in "TCZYX"])  # (t, c, z, y, x)
    has_z = "Z" in series.axes.upper()
    if not has_z:
        data = data[:, :, 0]
    zsp = float(ij.get("spacing", 1.0) or 1.0)
    ysp, xsp = [(1.0 / r if r else 1.0) for r in resolution]
    affine = np.eye(4)
    for i, s in enumerate(([zsp] if has_z else []) + [ysp, xsp]):
        affine[i, i] = s
    unit = ij.get("unit")
    finterval = ij.get("finterval")
    geometry = Geometry(
        format="tiff", spatial_shape=data.shape[2:], frames=data.shape[0],
        channels=data.shape[1], affine=affine, space="",
        space_unit=None if unit in (None, "", "pixel") else str(unit),
        time_interval=float(finterval) if finterval else None,
        time_unit=str(ij.get("tunit", "s")) if finterval else None, sources=(str(path),),
        header={"tiff_axes": series.axes, "imagej": bool(ij)},
    )
    return data, geometry


def _ratio(value):
    if isinstance(value, tuple) and len(value) == 2:
        return value[0] / value[1] if value[1] else None
    return float(value) if value else None


def _write_tiff(array, geometry, path, label):
    import tifffile

    # array (t, c, *s) with s = (z, y, x) or (y, x)
    d = array.ndim - 2
    if d == 3:
        data = np.moveaxis(array, 1, 2)  # (t, z, c, y, x)
        axes = "TZCYX"
    elif d == 2:
        data = array
        axes = "TCYX"
    else:
        raise ValueError(f"TIFF needs 2 or 3 spatial axes, got {d}")
    if not label and data.dtype != np.float32:
        data = data.astype(np.float32)
    spacing = geometry.spacing
    metadata: dict[str, Any] = {"axes": axes}
    if d == 3:
        metadata["spacing"] = spacing[0]
    if geometry.space_unit:
        metadata["unit"] = geometry.space_unit
    if geometry.time_interval:
        metadata["finterval"] = geometry.time_interval
    with atomic_file(path) as tmp:
        tifffile.imwrite(str(tmp), np.ascontiguousarray(data), imagej=True,
                         resolution=(1.0 / spacing[-1], 1.0 / spacing[-2]), metadata=metadata)
