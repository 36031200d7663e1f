"""Read DICOM cine: one multi-frame file, or a folder (or list) of single-frame files.

Shape legend: ``t`` frames (time points), ``c`` channels, ``z`` slice positions, ``s`` / ``*s``
spatial axes. Arrays come back as ``(t, c, *s)`` float32 with the spatial axes in the order
ITK, 3D Slicer and NIfTI converters use: ``(column, row[, slice])``, i.e. ``(i, j[, k])``; the
affine maps them to DICOM patient coordinates (LPS, mm).

How frames are arranged:

- a **multi-frame file** whose frames carry plane positions (enhanced MR/CT) is read like a
  series of its frames; one without (ultrasound cine) is frames over time in stored order, the
  frame interval from Frame Time (0018,1063) or Frame Time Vector (0018,1065);
- a **series of files** (and the frames of an enhanced file) is grouped by slice position:
  Image Position (Patient) projected on the slice normal (never the file name or Instance
  Number); within every position the frames are ordered by the first of Temporal Position
  Identifier (0020,0100), Trigger Time (0018,1060), Acquisition Time (0008,0032) that every
  frame has and that does not repeat within a position. Every position must hold the same
  number of frames; slices must be evenly spaced.

Pixel values pass pydicom's modality LUT (Rescale Slope/Intercept); colour (RGB, YBR) comes
back as 3 channels in RGB (:func:`to_grey` makes one luminance channel of them). Compressed
transfer syntaxes decode when pydicom has a decoder for them installed (pillow and pyjpegls come
with the ``dicom`` extra); otherwise one line names the syntax and what to install.
pydicom is imported inside the functions that use it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._common import DataError, Geometry, full_suffix

__all__ = ["DICOM_SUFFIXES", "functional_group", "is_dicom", "nifti_geometry", "read_dicom",
           "require", "to_grey"]

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: temporal tags in their order of preference: (keyword, how messages name it)
TEMPORAL = (("TemporalPositionIdentifier", "Temporal Position Identifier (0020,0100)"),
            ("TriggerTime", "Trigger Time (0018,1060)"),
            ("AcquisitionTime", "Acquisition Time (0008,0032)"))
_INSTALL = "pip install 'clstm4d[dicom]'"
#: slice positions closer than this (mm) along the normal are the same position
_POSITION_TOL = 1e-3


def require(module: str, path=None):
    """Import ``module`` (pydicom, highdicom) or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading and writing DICOM needs {module.split('.')[0]}, which is not "
                        f"installed: {_INSTALL}", path) from None


def is_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file (``.dcm``/``.dicom``/``.ima``, or the ``DICM`` magic
    after the 128-byte preamble) or a folder holding at least one."""
    path = Path(path)
    if path.is_dir():
        return any(_is_dicom_file(p) for p in _folder_files(path))
    return _is_dicom_file(path)


def _is_dicom_file(path: Path) -> bool:
    if full_suffix(path) in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.upper() != "DICOMDIR")


# --------------------------------------------------------------------------------- records

@dataclass
class _Frame:
    """One 2D frame: where it is stored, where it lies, and when."""

    path: Path
    frame: int | None  # 0-based index in a multi-frame file; None for a single-frame file
    sop: str
    sop_class: str
    shape: tuple[int, ...]  # (rows, cols, samples)
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    times: dict[str, float] = field(default_factory=dict)
    rescale: tuple[float, float] | None = None  # per-frame (slope, intercept), enhanced files


def _floats(value, n=None):
    if value is None:
        return None
    out = np.asarray([float(v) for v in value], dtype=np.float64)
    return out if n is None or out.size == n else None


def _seconds(tm) -> float | None:
    """A DICOM TM (``HHMMSS.ffffff``) or the time of a DT, in seconds after midnight."""
    text = str(tm or "").strip()
    if len(text) >= 14 and text[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        text = text[8:]
    text = text.split("+")[0].split("-")[0]
    if len(text) < 2 or not text[:2].isdigit():
        return None
    whole, _, frac = text.partition(".")
    whole = whole.ljust(6, "0")
    try:
        return (int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6])
                + (float("0." + frac) if frac else 0.0))
    except ValueError:
        return None


def _times(ds) -> dict[str, float]:
    out = {}
    for key, _ in TEMPORAL:
        value = ds.get(key)
        if value is None or value == "":
            continue
        value = _seconds(value) if key == "AcquisitionTime" else float(value)
        if value is not None:
            out[key] = value
    return out


def _first(seq_owner, name):
    seq = seq_owner.get(name) if seq_owner is not None else None
    return seq[0] if seq else None


def functional_group(ds, frame, name):
    """Functional group ``name`` of an enhanced multi-frame file, per frame or shared."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    item = _first(per[frame], name) if per is not None and frame < len(per) else None
    return item if item is not None else _first(_first(ds, "SharedFunctionalGroupsSequence"),
                                                name)


def _single_frame(path: Path, ds) -> _Frame:
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return _Frame(path, None, *_uids(ds), _shape(ds, path),
                  _floats(ds.get("ImagePositionPatient"), 3),
                  _floats(ds.get("ImageOrientationPatient"), 6),
                  tuple(spacing) if spacing is not None else None, _times(ds))


def _enhanced_frames(path: Path, ds) -> list[_Frame]:
    """The frames of a multi-frame file whose frames carry plane positions."""
    out = []
    for i in range(_frame_count(ds)):
        pos, ori, meas, content, cardiac, value = (functional_group(ds, i, name) for name in (
            "PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
            "FrameContentSequence", "CardiacSynchronizationSequence",
            "PixelValueTransformationSequence"))
        times = {}
        if content is not None and content.get("TemporalPositionIndex") is not None:
            times["TemporalPositionIdentifier"] = float(content.TemporalPositionIndex)
        if cardiac is not None and cardiac.get("NominalCardiacTriggerDelayTime") is not None:
            times["TriggerTime"] = float(cardiac.NominalCardiacTriggerDelayTime)
        acq = _seconds(content.get("FrameAcquisitionDateTime")) if content is not None else None
        if acq is not None:
            times["AcquisitionTime"] = acq
        spacing = _floats(meas.get("PixelSpacing"), 2) if meas is not None else None
        rescale = None
        if value is not None and value.get("RescaleSlope") is not None:
            rescale = (float(value.RescaleSlope), float(value.get("RescaleIntercept", 0.0)))
        out.append(_Frame(path, i, *_uids(ds), _shape(ds, path),
                          _floats(pos.get("ImagePositionPatient"), 3) if pos else None,
                          _floats(ori.get("ImageOrientationPatient"), 6) if ori else None,
                          tuple(spacing) if spacing is not None else None, times, rescale))
    return out


#: Frame Increment Pointer values: frames over time, or the slices of one volume
_TIME_POINTERS = {0x00181063, 0x00181065}  # Frame Time, Frame Time Vector
_SLICE_POINTER = 0x3004000C  # Grid Frame Offset Vector (RT Dose)


def _frame_axis(path, ds) -> str:
    """``"t"`` when the frames of a multi-frame file without plane positions are time points
    (Frame Increment Pointer absent, or Frame Time / Frame Time Vector), ``"z"`` when they are
    slices (Grid Frame Offset Vector); anything else is refused."""
    pointers = ds.get("FrameIncrementPointer")
    if pointers is None:
        return "t"
    pointers = {int(p) for p in (pointers if isinstance(pointers, list) else [pointers])}
    if pointers & _TIME_POINTERS:
        return "t"
    if _SLICE_POINTER in pointers and ds.get("GridFrameOffsetVector"):
        return "z"
    names = ", ".join(f"({p >> 16:04X},{p & 0xFFFF:04X})" for p in sorted(pointers))
    raise DataError(f"the frames of this multi-frame file step along {names} (Frame Increment "
                    "Pointer), neither time nor slices; not read as a cine", path)


def _grid_frames(path, ds) -> list[_Frame]:
    """The frames of a volume stored with a Grid Frame Offset Vector: slices along the normal
    from Image Position (Patient), at one time point."""
    single = _single_frame(path, ds)
    if single.position is None or single.orientation is None:
        raise DataError("Grid Frame Offset Vector without Image Position / Orientation "
                        "(Patient): cannot place the slices", path)
    normal = np.cross(single.orientation[:3], single.orientation[3:])
    offsets = np.asarray([float(v) for v in ds.GridFrameOffsetVector])
    return [_Frame(path, i, single.sop, single.sop_class, single.shape,
                   single.position + (o - offsets[0]) * normal, single.orientation,
                   single.pixel_spacing) for i, o in enumerate(offsets)]


def _frame_count(ds) -> int:
    """Number of Frames (1 when absent)."""
    value = ds.get("NumberOfFrames")
    try:
        return max(int(value), 1) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise DataError(f"Number of Frames (0028,0008) is {value!r}, not a number",
                        ds.filename) from None


def _uids(ds) -> tuple[str, str]:
    """SOP Instance UID and SOP Class UID (from the file meta when the dataset lacks them)."""
    meta = getattr(ds, "file_meta", None) or {}
    return (str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID", "")),
            str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID", "")))


def _shape(ds, path) -> tuple[int, int, int]:
    try:
        return int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))
    except AttributeError:
        raise DataError("DICOM file has no image (no Rows/Columns)", path) from None


def _has_plane_positions(ds) -> bool:
    return functional_group(ds, 0, "PlanePositionSequence") is not None


# --------------------------------------------------------------------------------- reading

def read_dicom(path_or_paths, label: bool = False) -> tuple[np.ndarray, Geometry]:
    """Read a DICOM cine (see the module docstring) as ``(t, c, *s)`` float32 and a
    :class:`Geometry` of format ``"dicom"``.

    Args:
        path_or_paths: one DICOM file, a folder of them, or a list of files (one series).
        label: refused: label maps are not read from DICOM (a DICOM-SEG is an output).
    """
    if label:
        raise DataError("labels are not read from DICOM; give the reference labels as NIfTI, "
                        "NRRD or TIFF", _first_path(path_or_paths))
    datasets = _load(path_or_paths)
    single = len(datasets) == 1 and _frame_count(datasets[0][1]) > 1
    if single and not _has_plane_positions(datasets[0][1]) and _frame_axis(*datasets[0]) == "t":
        return _read_cine_file(*datasets[0])
    frames = []
    for path, ds in datasets:
        if _has_plane_positions(ds):  # enhanced files, also of one frame each
            frames.extend(_enhanced_frames(path, ds))
        elif single:  # frames are the slices of one volume (Grid Frame Offset Vector)
            frames.extend(_grid_frames(path, ds))
        elif _frame_count(ds) > 1:
            raise DataError("a multi-frame file without plane positions (a cine) is read on "
                            "its own, not as part of a folder or list of files", path)
        else:
            frames.append(_single_frame(path, ds))
    grid, info = arrange(frames)
    cache = {path: ds for path, ds in datasets}
    array = np.stack([np.stack([_pixels(cache[f.path], f) for f in row], axis=-1)
                      for row in grid])  # (t, c, cols, rows, z)
    if array.shape[-1] == 1:
        array = array[..., 0]  # one slice position: 2D+t
    return array, _series_geometry(grid, info, datasets[0][1], array.shape)


def _first_path(path_or_paths):
    if isinstance(path_or_paths, (str, os.PathLike)):
        return path_or_paths
    return next(iter(path_or_paths), None)


def _load(path_or_paths) -> list[tuple[Path, object]]:
    """(path, dataset) of every DICOM file named, one series, pixel data not yet decoded."""
    pydicom = require("pydicom", _first_path(path_or_paths))
    from pydicom.errors import InvalidDicomError

    if isinstance(path_or_paths, (str, os.PathLike)):
        path = Path(path_or_paths)
        paths = [p for p in _folder_files(path) if _is_dicom_file(p)] if path.is_dir() else [path]
    else:
        paths = [Path(p) for p in path_or_paths]
    if not paths:
        raise DataError("folder has no DICOM files", path_or_paths)
    out = []
    for p in paths:
        if not p.exists():
            raise DataError("file not found", p)
        try:
            ds = pydicom.dcmread(p)
        except (InvalidDicomError, OSError, ValueError, EOFError) as e:
            raise DataError(f"cannot read DICOM ({type(e).__name__}: {e})", p) from e
        if "PixelData" not in ds and "FloatPixelData" not in ds:
            raise DataError(f"DICOM file holds no image ({ds.get('SOPClassUID', 'unknown')!s} "
                            "without Pixel Data)", p)
        out.append((p, ds))
    _check_one_series(out)
    return out


def _check_one_series(datasets) -> None:
    by_series = defaultdict(list)
    for p, ds in datasets:
        by_series[str(ds.get("SeriesInstanceUID", "?"))].append((p, ds))
    if len(by_series) > 1:
        parts = []
        for uid, items in sorted(by_series.items()):
            ds = items[0][1]
            parts.append(f"{uid} (Series Number {ds.get('SeriesNumber', '?')}, "
                         f"{str(ds.get('SeriesDescription', '')) or 'no description'!r}, "
                         f"{len(items)} files, e.g. {items[0][0].name})")
        raise DataError(f"{len(by_series)} series in one input: {'; '.join(parts)}; give the "
                        "files of one series (a folder per series, or a list of files)",
                        datasets[0][0].parent)


def _pixels(ds, f: _Frame) -> np.ndarray:
    """Frame ``f`` as ``(c, cols, rows)`` float32, after the modality LUT."""
    arr = _decoded(ds, f.path)[f.frame or 0]
    return _channels_first(_rescaled(arr, ds, f.rescale), ds)


def _channels_first(arr, ds):
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        arr = arr[..., None]
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0).swapaxes(1, 2), dtype=np.float32)


def _rescaled(arr, ds, per_frame):
    if per_frame is not None:
        slope, intercept = per_frame
    else:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    arr = arr.astype(np.float32)
    if slope != 1.0 or intercept != 0.0:
        arr = arr * np.float32(slope) + np.float32(intercept)
    return arr


def _decoded(ds, path) -> np.ndarray:
    """All frames of ``ds`` ``(frames, rows, cols[, 3])`` (decoded once, kept on the dataset),
    colour as RGB."""
    cached = getattr(ds, "_clstm4d_pixels", None)
    if cached is not None:
        return cached
    from pydicom.pixels import apply_color_lut, get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(syntax) if syntax.is_compressed else None
    if decoder is not None and not decoder.is_available:
        raise DataError(f"cannot decode transfer syntax {syntax.name!r} ({syntax}): no decoder "
                        f"installed; install one of: {'; '.join(decoder.missing_dependencies)} "
                        "(e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)", path)
    try:
        arr = ds.pixel_array  # YBR is converted to RGB
    except Exception as e:  # pydicom raises several types for damaged or odd pixel data
        first = " ".join(line.strip() for line in str(e).splitlines())[:300]
        others = (f"; other decoders: {'; '.join(decoder.missing_dependencies)}"
                  if decoder is not None and decoder.missing_dependencies else "")
        raise DataError(f"cannot decode the pixel data ({syntax.name}; {type(e).__name__}: "
                        f"{first}){others}", path) from e
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 2 + (int(ds.get("SamplesPerPixel", 1)) > 1):
        arr = arr[None]  # one frame
    ds._clstm4d_pixels = arr
    return arr


def _read_cine_file(path: Path, ds) -> tuple[np.ndarray, Geometry]:
    """A multi-frame file without plane positions: its frames over time, in stored order."""
    arr = _decoded(ds, path)  # (t, rows, cols[, 3])
    image = np.stack([_channels_first(_rescaled(a, ds, None), ds) for a in arr])
    spacing, unit = _cine_spacing(ds)
    affine = np.diag([spacing[1], spacing[0], 1.0, 1.0])  # (col, row) axes
    interval = _cine_interval(ds)
    sop, sop_class = _uids(ds)
    header = {"dicom": {"grid": [[(str(path), i, sop)] for i in range(arr.shape[0])],
                        "temporal_key": "frame order", "multiframe": True,
                        "sop_class": sop_class,
                        "frame_of_reference": str(ds.get("FrameOfReferenceUID", "")) or None}}
    geometry = Geometry(format="dicom", spatial_shape=image.shape[2:], frames=image.shape[0],
                        channels=image.shape[1], affine=affine, space="", space_unit=unit,
                        time_interval=interval, time_unit="s" if interval else None,
                        sources=(str(path),), header=header)
    return image, geometry


def _cine_spacing(ds) -> tuple[tuple[float, float], str | None]:
    """(row spacing, column spacing) in mm of a cine without plane positions: the first
    ultrasound region with physical units in cm, else Pixel Spacing / Imager Pixel Spacing."""
    regions = list(ds.get("SequenceOfUltrasoundRegions", []) or [])
    regions.sort(key=lambda r: r.get("RegionSpatialFormat") != 1)  # 2D tissue regions first
    for region in regions:
        units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
        if units == (3, 3) and region.get("PhysicalDeltaX") and region.get("PhysicalDeltaY"):
            x1, y1 = region.get("RegionLocationMaxX1"), region.get("RegionLocationMaxY1")
            if (x1 or 0) >= int(ds.Columns) or (y1 or 0) >= int(ds.Rows):
                log.warning("%s: the ultrasound region (to x %s, y %s) reaches past the %dx%d "
                            "image (resized after acquisition?); its physical deltas are used "
                            "as the pixel size all the same", ds.filename, x1, y1,
                            int(ds.Columns), int(ds.Rows))
            return (10.0 * abs(float(region.PhysicalDeltaY)),
                    10.0 * abs(float(region.PhysicalDeltaX))), "mm"
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _floats(ds.get(key), 2)
        if value is not None:
            return (float(value[0]), float(value[1])), "mm"
    return (1.0, 1.0), None


def _cine_interval(ds) -> float | None:
    """Seconds between frames: Frame Time (ms), else the mean of Frame Time Vector."""
    if ds.get("FrameTime"):
        return float(ds.FrameTime) / 1000.0
    vector = ds.get("FrameTimeVector")
    if vector and len(vector) > 1:
        return float(np.mean([float(v) for v in list(vector)[1:]])) / 1000.0
    if ds.get("RecommendedDisplayFrameRate"):
        return 1.0 / float(ds.RecommendedDisplayFrameRate)
    return None


# --------------------------------------------------------------------------------- arrange

def arrange(frames: list[_Frame]) -> tuple[list[list[_Frame]], dict]:
    """Frames -> ``grid[t][z]`` (time points x slice positions along the normal) and what was
    used: ``info`` with ``orientation``, ``normal``, ``distances`` (sorted, mm),
    ``temporal_key`` and ``times`` (per time point, in the key's units)."""
    _check_sizes(frames)
    orientation = _common_orientation(frames)
    normal = np.cross(orientation[:3], orientation[3:])
    missing = [f for f in frames if f.position is None]
    if missing and len(missing) < len(frames):
        raise DataError(f"Image Position (Patient) (0020,0032) missing in {len(missing)} of "
                        f"{len(frames)} frames; cannot place them", missing[0].path)
    if missing:
        log.warning("%s: no Image Position (Patient) (0020,0032): assumed one slice position "
                    "(2D+t) at the origin", frames[0].path.parent)
    distance = [0.0 if f.position is None else float(f.position @ normal) for f in frames]
    slots = _positions(distance)
    by_slot = defaultdict(list)
    for f, d in zip(frames, distance, strict=True):
        by_slot[slots[d]].append(f)
    counts = {k: len(v) for k, v in by_slot.items()}
    if len(set(counts.values())) > 1:
        (most, _), (least, _) = Counter(counts).most_common()[0], Counter(counts).most_common()[-1]
        raise DataError(f"slice positions hold different numbers of frames ({counts[most]} at "
                        f"{most:.3f} mm, {counts[least]} at {least:.3f} mm along the normal): a "
                        "frame missing, or two series in one folder?", frames[0].path)
    key = _temporal_key(by_slot) if max(counts.values()) > 1 else None
    columns = [sorted(by_slot[s], key=lambda f: f.times[key]) if key else by_slot[s]
               for s in sorted(by_slot)]
    grid = [list(row) for row in zip(*columns, strict=True)]  # (t, z)
    times = ([float(np.mean([f.times[key] for f in row])) for row in grid] if key else None)
    return grid, {"orientation": orientation, "normal": normal, "distances": sorted(by_slot),
                  "temporal_key": key, "times": times, "missing_position": bool(missing)}


def _check_sizes(frames):
    sizes = Counter(f.shape for f in frames)
    if len(sizes) > 1:
        (common, _), (odd, _) = sizes.most_common()[0], sizes.most_common()[-1]
        bad = next(f for f in frames if f.shape == odd)
        raise DataError(f"frames of different sizes: {odd[0]}x{odd[1]} (x{odd[2]} samples) "
                        f"here, {common[0]}x{common[1]} (x{common[2]}) in {sizes[common]} "
                        "others: not one cine", bad.path)


def _common_orientation(frames) -> np.ndarray:
    given = [f.orientation for f in frames if f.orientation is not None]
    if not given:
        return np.array([1.0, 0, 0, 0, 1.0, 0])
    if len(given) < len(frames):
        bad = next(f for f in frames if f.orientation is None)
        raise DataError(f"Image Orientation (Patient) (0020,0037) missing in "
                        f"{len(frames) - len(given)} of {len(frames)} frames", bad.path)
    for f in frames:
        if not np.allclose(f.orientation, given[0], atol=1e-4):
            raise DataError(f"frames with different orientations ({np.round(f.orientation, 4)} "
                            f"vs {np.round(given[0], 4)}): not one cine", f.path)
    return given[0]


def _positions(distance: list[float]) -> dict[float, float]:
    """Map each distance to its position slot (the smallest distance within the tolerance)."""
    slots, out = [], {}
    for d in sorted(set(distance)):
        if not slots or d - slots[-1] > _POSITION_TOL:
            slots.append(d)
        out[d] = slots[-1]
    return out


def _temporal_key(by_slot) -> str:
    """The first temporal tag every frame has that orders each position's frames."""
    reasons = []
    frames = [f for fs in by_slot.values() for f in fs]
    for key, name in TEMPORAL:
        lacking = [f for f in frames if key not in f.times]
        if lacking:
            reasons.append(f"{name} missing in {len(lacking)} of {len(frames)} files "
                           f"(e.g. {lacking[0].path.name})")
            continue
        if any(len({f.times[key] for f in fs}) < len(fs) for fs in by_slot.values()):
            reasons.append(f"{name} repeats at one slice position")
            continue
        if reasons:
            log.warning("%s: frames ordered in time by %s (%s)", frames[0].path.parent, name,
                        "; ".join(reasons))
        return key
    raise DataError(f"cannot order {len(frames)} frames in time: {'; '.join(reasons)}",
                    frames[0].path)


# --------------------------------------------------------------------------------- geometry

def _series_geometry(grid, info, ds, shape) -> Geometry:
    first = grid[0][0]
    row_spacing, col_spacing = first.pixel_spacing or (1.0, 1.0)
    orientation, normal = info["orientation"], info["normal"]
    distances = info["distances"]
    if len(distances) > 1:
        gaps = np.diff(distances)
        if gaps.max() - gaps.min() > max(1e-2, 0.01 * gaps.mean()):
            raise DataError(f"slice positions are not evenly spaced (gaps "
                            f"{np.round(gaps, 3).tolist()} mm): a slice missing?", first.path)
        slice_spacing = float(gaps.mean())
    else:
        slice_spacing = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * col_spacing  # i: along a row (next column)
    affine[:3, 1] = orientation[3:] * row_spacing  # j: down a column (next row)
    affine[:3, 2] = normal * slice_spacing
    bottom = min(grid[0], key=lambda f: 0.0 if f.position is None else f.position @ normal)
    affine[:3, 3] = bottom.position if bottom.position is not None else 0.0
    interval = _series_interval(grid, info)
    header = {"dicom": {
        "grid": [[(str(f.path), f.frame, f.sop) for f in row] for row in grid],
        "temporal_key": info["temporal_key"], "multiframe": first.frame is not None,
        "sop_class": first.sop_class,
        "frame_of_reference": str(ds.get("FrameOfReferenceUID", "")) or None}}
    sources = tuple(dict.fromkeys(str(f.path) for row in grid for f in row))
    return Geometry(format="dicom", spatial_shape=shape[2:], frames=shape[0],
                    channels=shape[1], affine=affine, space="LPS",
                    space_unit="mm" if first.pixel_spacing else None, time_interval=interval,
                    time_unit="s" if interval else None, sources=sources, header=header)


def _series_interval(grid, info) -> float | None:
    """Seconds between time points: from trigger times (ms) or acquisition times (s)."""
    if len(grid) < 2:
        return None
    for key, scale in (("TriggerTime", 1e-3), ("AcquisitionTime", 1.0)):
        if all(key in f.times for row in grid for f in row):
            times = [np.mean([f.times[key] for f in row]) for row in grid]
            step = float(np.median(np.diff(times))) * scale
            if step > 0:
                return round(step, 9)
    return None


# --------------------------------------------------------------------------------- helpers

def to_grey(image: np.ndarray, name: str = "image") -> np.ndarray:
    """RGB ``(t, 3, *s)`` -> luminance ``(t, 1, *s)`` (ITU-R BT.601: 0.299 R + 0.587 G +
    0.114 B, the Y of DICOM's YBR_FULL), for a grey-scale model on colour cine.

    Examples:
        >>> to_grey(np.ones((2, 3, 4, 4), np.float32)).shape
        (2, 1, 4, 4)
    """
    image = np.asarray(image)
    if image.ndim < 3 or image.shape[1] != 3:
        raise DataError(f"grey: expected a colour image (t, 3, *s), got shape {image.shape}",
                        name)
    weights = np.array([0.299, 0.587, 0.114], np.float32).reshape(1, 3, *(1,) * (image.ndim - 2))
    return (image * weights).sum(1, keepdims=True, dtype=np.float32)


def nifti_geometry(geometry: Geometry) -> Geometry:
    """The NIfTI geometry of a DICOM image's grid: the same voxels, the affine from LPS to RAS
    (so a label map written with it lies over the images in any viewer)."""
    affine = geometry.ras_affine().copy()
    return Geometry(format="nifti", spatial_shape=geometry.spatial_shape, frames=geometry.frames,
                    channels=geometry.channels, affine=affine, space="RAS",
                    space_unit=geometry.space_unit, time_interval=geometry.time_interval,
                    time_unit=geometry.time_unit, sources=geometry.sources,
                    header={k: v for k, v in geometry.header.items() if k != "dicom"})
