"""Data: 4D image I/O with geometry, datalists, synthetic 4D data and patch sampling.

Arrays are numpy: images ``(t, c, *s)`` float32, labels ``(t, *s)`` int64. nibabel, pynrrd,
tifffile, pydicom and highdicom are imported only by the functions that read or write their
formats.
"""

from ._common import DataError, Geometry
from .arrays import array_geometry
from .datalist import (
    Case,
    CaseData,
    Datalist,
    datalist_from_folder,
    ignore_index,
    load_case,
    load_datalist,
    save_datalist,
    spread_frames,
    validate_datalist,
)
from .dicom import to_grey
from .dicom_seg import check_segmentation_output, write_segmentation
from .io import (
    detect_format,
    output_files,
    output_path,
    read_image,
    read_label,
    write_image,
    write_label,
)
from .output import convert_geometry, resolve_output, write_result
from .resample import (
    check_resample_memory,
    resample_case,
    resample_image,
    resample_label,
    resampled_geometry,
    target_shape,
)
from .sampling import PatchDataset, crop_or_pad
from .synthetic import (
    CLASS_NAMES,
    CUE_CLASS_NAMES,
    design_check,
    make_cue_shapes_case,
    make_cue_track_case,
    make_synthetic_case,
    write_synthetic_dataset,
)
from .transforms import Augment, Degrade, normalize_intensity

__all__ = [
    "DataError", "Geometry",
    "Case", "CaseData", "Datalist", "datalist_from_folder", "load_case", "load_datalist",
    "save_datalist", "validate_datalist", "ignore_index", "spread_frames",
    "detect_format", "output_files", "output_path", "read_image", "read_label", "write_image",
    "write_label", "array_geometry", "to_grey", "check_segmentation_output", "write_segmentation",
    "convert_geometry", "resolve_output", "write_result",
    "PatchDataset", "crop_or_pad",
    "check_resample_memory", "resample_case", "resample_image", "resample_label",
    "resampled_geometry", "target_shape",
    "CLASS_NAMES", "CUE_CLASS_NAMES", "design_check",
    "make_cue_shapes_case", "make_cue_track_case", "make_synthetic_case", "write_synthetic_dataset",
    "Augment", "Degrade", "normalize_intensity",
]
