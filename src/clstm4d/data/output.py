"""Where and in which format a result goes: the output's extension chooses the format.

``predict --output`` (and any caller of :func:`write_result`) names a file or a folder:

- ``seg.nii.gz`` / ``seg.nii``: one 4D NIfTI file; ``seg.tif`` / ``seg.tiff``: one ImageJ
  TIFF hyperstack. Another format than the input's is converted (:func:`convert_geometry`,
  keeping the geometry the target format can hold).
- a name without extension: the input's format, under that name plus the input's extension
  (``out/seg`` for ``scan.nii.gz`` is ``out/seg.nii.gz``), or, for a per-frame series, the
  folder of its frames; an existing folder (or a name ending in ``/``) receives a file named
  after the input.
- ``seg.nrrd`` / ``seg.seg.nrrd``: one NRRD frame, for a one-frame NRRD input (NRRD results of
  longer sequences are a folder of frames).
- ``seg.dcm``: a DICOM Segmentation over a DICOM input (:mod:`.dicom_seg`); over DICOM images
  ``.nii.gz`` is their NIfTI label map. ``seg.npy`` / ``seg.npz``: for a NumPy input only.
- any other extension is refused in one line.

A per-frame series is written into a temporary folder and renamed into place as a whole
(:func:`clstm4d._common.atomic_dir`), so a killed run leaves the complete set or none of it.

Shape legend: ``t`` frames, ``*s`` spatial axes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from clstm4d._common import atomic_dir

from ._common import DataError, Geometry, full_suffix
from .dicom_seg import check_segmentation_output, write_segmentation
from .io import NRRD_SUFFIXES, output_files, write_label

__all__ = ["OUTPUT_SUFFIXES", "ResolvedOutput", "convert_geometry", "resolve_output",
           "write_result"]

#: output extension -> the single-file format written
OUTPUT_SUFFIXES = {".nii.gz": "nifti", ".nii": "nifti", ".tif": "tiff", ".tiff": "tiff",
                   ".npy": "numpy", ".npz": "numpy", ".dcm": "dicom-seg"}
#: what an output without extension gets, by the input's format
_OWN_SUFFIX = {"nifti": ".nii.gz", "tiff": ".tif", "numpy": ".npy", "dicom": ".nii.gz"}
_NIFTI_UNITS = {"mm": "mm", "micron": "micron", "um": "micron", "\u00b5m": "micron",
                "meter": "meter", "m": "meter"}


@dataclasses.dataclass
class ResolvedOutput:
    """A result's destination: write the labels permuted by ``axes`` (``None``: as they are)
    with ``geometry`` to ``path`` (a file, or the folder of a series); ``files`` are the files
    that gives; ``segmentation``: a DICOM Segmentation over the source images."""

    geometry: Geometry
    path: Path
    axes: tuple[int, ...] | None
    files: list[Path]
    segmentation: bool = False

    @property
    def series(self) -> bool:
        return self.geometry.format.endswith("-series")


def convert_geometry(geometry: Geometry, fmt: str) -> tuple[Geometry, tuple[int, ...] | None]:
    """``geometry`` as format ``fmt`` (``"nifti"`` or ``"tiff"``), and the permutation of the
    spatial axes that takes an array of ``geometry`` to one of the result (``None``: none).

    NIfTI and NRRD arrays are in voxel order ``(i, j, k)``, TIFF arrays ``(z, y, x)`` with
    ``x`` along ``i``: between them the spatial axes are reversed. What survives: the voxel
    size of every axis, the space unit, the frame interval; NRRD/NIfTI -> NIfTI also keeps the
    full affine (NRRD's LPS world turned into NIfTI's RAS). TIFF holds no origin and no
    direction: from TIFF, the NIfTI affine is the diagonal of the spacing; to TIFF, origin,
    direction (rotations, flips) and NIfTI's qform/sform are lost.

    Examples:
        >>> g = Geometry.default("nifti", (4, 5, 6), frames=2, spacing=(1.0, 2.0, 3.0))
        >>> tif, axes = convert_geometry(g, "tiff")
        >>> tif.spatial_shape, tif.spacing, axes
        ((6, 5, 4), (3.0, 2.0, 1.0), (2, 1, 0))
    """
    if fmt not in ("nifti", "tiff"):
        raise ValueError(f"convert_geometry: fmt must be 'nifti' or 'tiff', got {fmt!r}")
    d = geometry.spatial_dims
    if fmt == "tiff" and d == 1:
        raise DataError("a TIFF needs 2 or 3 spatial axes; this sequence has 1, so write it "
                        "as NIfTI (.nii.gz)")
    reverse = (geometry.format == "tiff") != (fmt == "tiff")
    axes = tuple(range(d))[::-1] if reverse else None
    spacing = geometry.spacing[::-1] if reverse else geometry.spacing
    if fmt == "nifti" and geometry.format != "tiff":
        affine = geometry.ras_affine().copy()  # NRRD's and DICOM's LPS turned into RAS
    else:
        affine = np.eye(4)
        affine[range(d), range(d)] = spacing
    unit = geometry.space_unit
    if fmt == "nifti":
        unit = _NIFTI_UNITS.get(str(unit).lower()) if unit else None
    time_unit = geometry.time_unit if geometry.time_unit in ("s", "ms", "us") else None
    shape = tuple(geometry.spatial_shape[a] for a in axes) if axes else geometry.spatial_shape
    converted = Geometry(
        format=fmt, spatial_shape=shape, frames=geometry.frames, channels=1, affine=affine,
        space="RAS" if fmt == "nifti" else "", space_unit=unit,
        time_interval=geometry.time_interval if time_unit else None,
        time_unit=time_unit, sources=(),
    )
    return converted, axes


def _target(geometry: Geometry, fmt: str, output, option: str
            ) -> tuple[Geometry, tuple[int, ...] | None]:
    """The geometry to write format ``fmt`` with, and the axes permutation (see
    :func:`convert_geometry`)."""
    if fmt == geometry.format or geometry.format in ("dicom", "numpy"):
        # the writer's own; over DICOM images NIfTI, over NumPy arrays .npy/.npz: the
        # writer's checks (``output_files``) refuse other extensions in one line
        return geometry, None
    if fmt == "numpy":
        raise _refuse(output, f"NumPy results (.npy, .npz) are for NumPy inputs, and this "
                      f"input is {geometry.format}", option)
    return convert_geometry(geometry, fmt)


def _refuse(output, why: str, option: str) -> DataError:
    known = ", ".join(OUTPUT_SUFFIXES)
    return DataError(f"{option} {output}: {why}; write one of {known}, or no extension for "
                     "the input's own format")


def resolve_output(geometry: Geometry, output: str | os.PathLike, *,
                   option: str = "--output") -> ResolvedOutput:
    """Where the label map of an image with ``geometry`` goes for ``output``, and in which
    format (see the module docstring); nothing is written.

    Raises:
        DataError: an extension of no supported format, or a conversion the target format
            cannot hold (a 1D sequence as TIFF, a sequence of several frames as one NRRD).
    """
    text = os.fspath(output)
    path = Path(text)
    folder = text.endswith(("/", os.sep)) or path.is_dir()
    suffix = "" if folder else full_suffix(path)
    series = geometry.format.endswith("-series")
    if folder or not suffix:
        if not folder and not series:  # the input's format under the name given
            src = full_suffix(geometry.sources[0]) if geometry.sources else ""
            own = src if OUTPUT_SUFFIXES.get(src) == geometry.format else ""
            path = path.with_name(path.name + (own or _OWN_SUFFIX[geometry.format]))
        target, axes = geometry, None
    elif OUTPUT_SUFFIXES.get(suffix) == "dicom-seg":
        check_segmentation_output(geometry, text)
        return ResolvedOutput(geometry, path, None, [path], segmentation=True)
    elif suffix in OUTPUT_SUFFIXES:
        target, axes = _target(geometry, OUTPUT_SUFFIXES[suffix], text, option)
    elif suffix in NRRD_SUFFIXES:
        if geometry.format != "nrrd-series" or geometry.frames != 1:
            raise _refuse(text, f"one NRRD file holds one frame (this is a {geometry.frames}-"
                          f"frame {geometry.format} sequence); NRRD results of NRRD series are "
                          "a folder of frames (a name without extension)", option)
        target, axes = geometry, None
        return ResolvedOutput(target, path, None, output_files(target, [path], label=True))
    else:
        raise _refuse(text, f"unknown output extension {suffix!r}", option)
    files = output_files(target, text if folder else path, label=True)
    return ResolvedOutput(target, path, axes, files)


def write_result(labels: np.ndarray, geometry: Geometry, output: str | os.PathLike | None = None,
                 *, resolved: ResolvedOutput | None = None,
                 class_names: dict[int, str] | None = None) -> list[Path]:
    """Write a label map ``(t, *s)`` of an image with ``geometry`` to ``output`` in the format
    its extension names (:func:`resolve_output`, or ``resolved`` from it); returns the files.
    ``class_names``: the segment names of a DICOM Segmentation.

    A per-frame series goes into a temporary folder first and is renamed into place whole
    (into an existing non-empty folder, given with ``--overwrite``, each frame moves in
    complete, one at a time). Every file is checked to be on disk and not empty before it is
    returned.
    """
    out = resolved or resolve_output(geometry, output)
    if out.segmentation:
        return [write_segmentation(labels, geometry, out.path, class_names)]
    if out.axes is not None:
        labels = np.transpose(labels, (0, *(1 + a for a in out.axes)))
    if out.series and out.files[0].parent == out.path:  # the frames of a folder
        folder = out.path
        keep_others = folder.is_dir() and any(folder.iterdir())
        with atomic_dir(folder, replace=not keep_others) as tmp:
            names = [p.name for p in write_label(labels, out.geometry, tmp)]
        written = [folder / n for n in names]
    else:
        written = write_label(labels, out.geometry, out.files)
    for p in written:
        if not p.is_file() or p.stat().st_size == 0:
            raise OSError(f"{p} was not written completely")
    return written
