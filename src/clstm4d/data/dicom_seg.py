"""Write a label sequence over a DICOM series as one DICOM Segmentation (highdicom).

Shape legend: ``t`` time points, ``z`` slice positions, ``s`` / ``*s`` spatial axes as
:mod:`clstm4d.data.dicom` returns them (``(column, row[, slice])``).

The Segmentation references the source series and every source instance: each of its frames
names, in its Derivation Image Sequence, the source instance (and frame) it segments; every
class but the background is one segment, labelled with the class name. highdicom builds one
Segmentation per time point (it maps frames to sources by plane position, which a cine repeats;
over a multi-frame source each frame's reference is then narrowed to the frame of its time
point); for several time points their frames are joined into one instance whose Frame Content
Sequence carries the Temporal Position Index (1-based, in the reader's time order) as a third
dimension index, next to the segment number and the plane position. highdicom and pydicom are
imported inside the functions that use them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from clstm4d._common import atomic_file

from ._common import DataError, Geometry
from .dicom import functional_group, require

__all__ = ["write_segmentation", "check_segmentation_output"]

log = logging.getLogger(__name__)


def check_segmentation_output(geometry: Geometry, out: str | os.PathLike) -> None:
    """Refuse, before any computation, a DICOM Segmentation that cannot be written for an
    image with ``geometry`` (one line naming why)."""
    if geometry.format != "dicom":
        source = Path(geometry.sources[0]).name if geometry.sources else "an array"
        raise DataError(f"a DICOM Segmentation (.dcm) references its source DICOM images, and "
                        f"this input is {geometry.format} ({source}); write NIfTI (--output "
                        "seg.nii.gz) or predict from the DICOM series", out)
    require("highdicom", out)
    info = geometry.header["dicom"]
    if info["frame_of_reference"] is None and len(info["grid"]) * len(info["grid"][0]) > 1:
        raise DataError(f"a DICOM Segmentation of several frames needs a Frame of Reference UID "
                        f"in the source, and {Path(geometry.sources[0]).name} (a cine without "
                        "patient coordinates) has none (highdicom); write NIfTI "
                        "(--output seg.nii.gz) instead", out)


def write_segmentation(labels: np.ndarray, geometry: Geometry, out: str | os.PathLike,
                       classes: Mapping[int, str] | None = None) -> Path:
    """Write ``labels (t, *s)`` over the DICOM images read with ``geometry`` as one DICOM
    Segmentation file ``out`` (atomically).

    Args:
        labels: class per voxel, on the image's grid.
        geometry: from :func:`~clstm4d.data.read_image` of a DICOM input.
        out: the ``.dcm`` file to write.
        classes: class value -> name (0 = background, not a segment); default: ``class N`` for
            every value found. Every class but 0 becomes a segment, also an empty one.

    Returns:
        ``out`` as a path.
    """
    check_segmentation_output(geometry, out)
    labels = np.asarray(labels)
    if labels.shape != (geometry.frames, *geometry.spatial_shape):
        raise ValueError(f"write_segmentation: labels must be {(geometry.frames,)} + "
                         f"{geometry.spatial_shape}, got {labels.shape}")
    names = dict(classes) if classes else {int(v): f"class {int(v)}" for v in np.unique(labels)}
    names = {int(k): str(v) for k, v in names.items() if int(k) != 0}
    found = sorted(set(np.unique(labels).tolist()) - {0} - set(names))
    if found or not names:
        raise DataError(f"labels hold values {found} that no class names; classes: {names}",
                        out)
    import highdicom as hd

    info = geometry.header["dicom"]
    planes = _planes(labels, geometry.spatial_dims)  # (t, z, rows, cols)
    uids = (hd.UID(), hd.UID())  # series, instance: new for every Segmentation written
    parts = [_one_time_point(row, planes[i], names, info, uids)
             for i, row in enumerate(info["grid"])]
    seg = parts[0] if len(parts) == 1 else _join(parts)
    with atomic_file(out) as tmp:
        seg.save_as(tmp)
    return Path(out)


def _planes(labels, spatial_dims) -> np.ndarray:
    """``(t, cols, rows[, z])`` -> ``(t, z, rows, cols)``, the segment numbers as uint8/16."""
    if spatial_dims == 2:
        labels = labels[..., None]
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return np.ascontiguousarray(np.transpose(labels, (0, 3, 2, 1))).astype(dtype)


def _descriptions(names):
    from importlib.metadata import PackageNotFoundError, version

    import highdicom as hd
    from pydicom.sr.codedict import codes

    try:
        ours = version("clstm4d")
    except PackageNotFoundError:
        ours = "unknown"
    algorithm = hd.AlgorithmIdentificationSequence(
        name="clstm4d", version=ours, family=codes.cid7162.ArtificialIntelligence)
    # segment numbers must run 1..n: class values are numbered in order
    return [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64],
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=name[:64], tracking_uid=hd.UID())
        for number, name in enumerate((names[k] for k in sorted(names)), start=1)], ours


def _one_time_point(row, planes, names, info, uids):
    """The Segmentation of one time point: ``row`` its sources per slice, ``planes (z, rows,
    cols)`` its class values."""
    import highdicom as hd
    import pydicom

    values = sorted(names)
    numbers = np.zeros(max(values) + 1, dtype=planes.dtype)
    numbers[values] = np.arange(1, len(values) + 1)
    planes = numbers[planes]  # class value -> segment number
    paths = list(dict.fromkeys(path for path, _, _ in row))  # single-frame files: one a slice
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    spatial = {}
    if info["multiframe"] and len(info["grid"]) > 1:  # this time point's frames of the file
        spatial = _planes_of(sources[0], row)
    elif info["multiframe"]:  # one source file, one time point: its frame order
        pixel = np.zeros((int(sources[0].NumberOfFrames),) + planes.shape[1:], planes.dtype)
        for (_, frame, _), plane in zip(row, planes, strict=True):
            pixel[frame] = plane
        planes = pixel
    descriptions, ours = _descriptions(names)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=planes,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=uids[0], series_number=1000,
        sop_instance_uid=uids[1], instance_number=1, manufacturer="clstm4d",
        manufacturer_model_name="clstm4d", software_versions=ours, device_serial_number="0",
        series_description="clstm4d segmentation", omit_empty_frames=False, **spatial)
    if spatial:
        _reference_own_frames(seg, sources[0], row)
    return seg


def _position(source, frame) -> tuple:
    item = functional_group(source, frame, "PlanePositionSequence")
    return tuple(np.round(np.asarray(item.ImagePositionPatient, float), 3).tolist())


def _planes_of(source, row) -> dict:
    """highdicom's plane positions, orientation and pixel measures of one time point's frames
    of a multi-frame source, in ``row`` (slice) order."""
    import highdicom as hd

    patient = hd.CoordinateSystemNames.PATIENT
    first = row[0][1]
    orientation = functional_group(source, first, "PlaneOrientationSequence")
    measures = functional_group(source, first, "PixelMeasuresSequence")
    return {
        "plane_positions": [hd.PlanePositionSequence(patient, list(_position(source, f)))
                            for _, f, _ in row],
        "plane_orientation": hd.PlaneOrientationSequence(
            patient, [float(v) for v in orientation.ImageOrientationPatient]),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=[float(v) for v in measures.PixelSpacing],
            slice_thickness=float(measures.get("SliceThickness") or 1.0))}


def _reference_own_frames(seg, source, row) -> None:
    """highdicom refers each frame to every source frame at its position, i.e. at every time
    point; keep the one of this time point."""
    from pydicom.sequence import Sequence

    frame_at = {_position(source, f): f + 1 for _, f, _ in row}
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(np.round(np.asarray(
            item.PlanePositionSequence[0].ImagePositionPatient, float), 3).tolist())
        derivation = item.DerivationImageSequence[0]
        derivation.SourceImageSequence = Sequence(
            [ref for ref in derivation.SourceImageSequence
             if int(ref.ReferencedFrameNumber) == frame_at[position]])


def _join(parts):
    """Join the Segmentations of successive time points into the first one."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.tag import Tag

    seg = parts[0]
    frames, items = [], []
    for t, part in enumerate(parts, start=1):
        for item in part.PerFrameFunctionalGroupsSequence:
            content = item.FrameContentSequence[0]
            content.TemporalPositionIndex = t
            content.DimensionIndexValues = [int(v) for v in content.DimensionIndexValues] + [t]
            items.append(item)
        frames.append(part.pixel_array.reshape(-1, part.Rows, part.Columns))
    dim = Dataset()
    first = seg.DimensionIndexSequence[0]
    dim.DimensionOrganizationUID = first.DimensionOrganizationUID
    dim.DimensionIndexPointer = Tag("TemporalPositionIndex")
    dim.FunctionalGroupPointer = Tag("FrameContentSequence")
    dim.DimensionDescriptionLabel = "Temporal Position Index"
    seg.DimensionIndexSequence.append(dim)
    seg.PerFrameFunctionalGroupsSequence = Sequence(items)
    seg.SourceImageSequence = _unique(i for p in parts for i in p.SourceImageSequence)
    series = seg.ReferencedSeriesSequence[0]
    series.ReferencedInstanceSequence = _unique(
        i for p in parts for i in p.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
    bits = np.packbits(np.concatenate(frames).astype(bool).ravel(), bitorder="little")
    data = bits.tobytes()
    seg.PixelData = data + b"\0" * (len(data) % 2)
    seg.NumberOfFrames = len(items)
    return seg


def _unique(items):
    """A Sequence of the items, each source instance (and frame) once (a multi-frame source is
    referenced by every time point)."""
    from pydicom.sequence import Sequence

    seen, out = set(), []
    for item in items:
        key = (item.ReferencedSOPInstanceUID, str(item.get("ReferencedFrameNumber", "")))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return Sequence(out)
