"""DICOM series written here with pydicom, for the reader and SEG tests (not a test module).

``write_series(folder, image, ...)`` writes ``image (t, z, rows, cols)`` as one single-frame MR
file per (time point, slice) with Image Position (Patient) along the slice normal, temporal tags
of choice, shuffled file names and shuffled Instance Numbers, so that only the tags give the
order back.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _base(sop_class, study, series, frame_of_reference, series_number=1):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Toy^Cine", "T1", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = frame_of_reference
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = (
        "20260101", "120000", "", "")
    ds.StudyID, ds.SeriesNumber, ds.Modality = "1", series_number, "MR"
    ds.Manufacturer = "clstm4d tests"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def orientation_frame(orientation):
    """Row direction, column direction and slice normal (unit vectors) of an orientation."""
    o = np.asarray(orientation, float)
    return o[:3], o[3:], np.cross(o[:3], o[3:])


def write_series(folder, image, *, spacing=(0.8, 0.7), slice_gap=2.5, frame_ms=40.0,
                 origin=(-20.0, 10.0, 5.0), orientation=(0, 1, 0, 0, 0, -1),
                 temporal=("TemporalPositionIdentifier", "TriggerTime", "AcquisitionTime"),
                 seed=0, series=None, study=None, frame_of_reference=None, series_number=1,
                 rescale=(1.0, 0.0), jitter_ms=0.0, compress=None, prefix="IM",
                 photometric="MONOCHROME2"):
    """Write ``image (t, z, rows, cols)`` (uint16 stored values; ``(..., 3)`` uint8 for
    ``photometric`` RGB or YBR_FULL) as single-frame files.

    ``spacing`` is (row spacing, column spacing) = Pixel Spacing; ``temporal`` the tags to
    write; ``rescale`` (slope, intercept); ``jitter_ms`` shifts each slice's trigger times;
    ``compress`` a transfer syntax UID to compress with (pydicom's own encoders); ``prefix``
    starts every file name. Returns the files in (t, z) order."""
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t, z = image.shape[:2]
    study, series = study or generate_uid(), series or generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    rows_dir, cols_dir, normal = orientation_frame(orientation)
    numbers = rng.permutation(t * z) + 1
    names = rng.permutation(t * z)
    files = []
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    for i in range(t):
        for k in range(z):
            ds = _base(MR, study, series, frame_of_reference, series_number)
            ds.InstanceNumber = int(numbers[i * z + k])
            ds.Rows, ds.Columns = image.shape[2:4]
            ds.PixelSpacing = [spacing[0], spacing[1]]
            ds.SliceThickness = slice_gap
            ds.ImageOrientationPatient = [float(v) for v in orientation]
            ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * slice_gap
                                       * normal]
            ms = i * frame_ms + k * jitter_ms
            if "TemporalPositionIdentifier" in temporal:
                ds.TemporalPositionIdentifier = i + 1
            if "TriggerTime" in temporal:
                ds.TriggerTime = ms
            if "AcquisitionTime" in temporal:
                ds.AcquisitionTime = (start + datetime.timedelta(milliseconds=ms)).strftime(
                    "%H%M%S.%f")
            if rescale != (1.0, 0.0):
                ds.RescaleSlope, ds.RescaleIntercept = rescale
            if photometric == "MONOCHROME2":
                ds.PixelData = np.ascontiguousarray(image[i, k], dtype=np.uint16).tobytes()
            else:  # colour, 8 bits, interleaved samples
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, photometric
                ds.PlanarConfiguration = 0
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
                ds.PixelData = np.ascontiguousarray(image[i, k], dtype=np.uint8).tobytes()
            if compress is not None:
                ds.compress(compress)
            path = folder / f"{prefix}{names[i * z + k]:04d}"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def toy_image(t=4, z=3, rows=12, cols=10, seed=0):
    """Stored values ``(t, z, rows, cols)`` uint16 where every voxel names its frame, slice,
    row and column (so any reordering shows)."""
    ti, zi, ri, ci = np.meshgrid(*(np.arange(n) for n in (t, z, rows, cols)), indexing="ij")
    return (1000 * ti + 100 * zi + 3 * ri + ci + 1).astype(np.uint16)


def rgb_to_ybr_full(rgb):
    """DICOM YBR_FULL (PS3.3 C.7.6.3.1.2, BT.601 full range) of RGB values, rounded."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.clip(np.round(np.stack([y, cb, cr], -1)), 0, 255).astype(np.uint8)


def write_enhanced(path, image, *, spacing=(0.8, 0.7), slice_gap=2.5, frame_ms=40.0,
                   origin=(-20.0, 10.0, 5.0), orientation=(1, 0, 0, 0, 1, 0), seed=0,
                   uids=None, first_time=0):
    """Write ``image (t, z, rows, cols)`` as one enhanced MR multi-frame file, its frames
    stored in shuffled order, each with its plane position, Temporal Position Index and
    Nominal Cardiac Trigger Delay Time in the per-frame functional groups. ``uids``: (study,
    series, frame of reference) to share with other files; ``first_time`` the time index of
    ``image[0]``. Returns the file and the storage order (frame number -> (t, z))."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    t, z = image.shape[:2]
    ds = _base(ENHANCED_MR, *(uids or (generate_uid(), generate_uid(), generate_uid())))
    ds.InstanceNumber, ds.ContentDate, ds.ContentTime = 1, "20260101", "120000"
    ds.Rows, ds.Columns, ds.NumberOfFrames = *image.shape[2:4], t * z
    _, _, normal = orientation_frame(orientation)
    shared = Dataset()
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = list(spacing), slice_gap
    plane.ImageOrientationPatient = [float(v) for v in orientation]
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    order = [(i, k) for i in range(t) for k in range(z)]
    order = [order[j] for j in rng.permutation(len(order))]
    items = []
    for i, k in order:
        item, pos, content, cardiac = Dataset(), Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * slice_gap * normal]
        content.TemporalPositionIndex = first_time + i + 1
        cardiac.NominalCardiacTriggerDelayTime = (first_time + i) * frame_ms
        item.PlanePositionSequence = Sequence([pos])
        item.FrameContentSequence = Sequence([content])
        item.CardiacSynchronizationSequence = Sequence([cardiac])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    ds.PixelData = np.ascontiguousarray(np.stack([image[i, k] for i, k in order]),
                                        dtype=np.uint16).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return Path(path), order
