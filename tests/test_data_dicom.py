"""DICOM in: pydicom's own example cine and series written here (dicom_toys), against what
pydicom says about each file (positions, pixel values) and the layout the files were written
with (every voxel of the toy image names its frame, slice, row and column)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from clstm4d.data import DataError, read_image, read_label, to_grey
from clstm4d.data.dicom import nifti_geometry

pydicom = pytest.importorskip("pydicom")
sys.path.insert(0, str(Path(__file__).parent))
from pydicom.data import get_testdata_file  # noqa: E402

from dicom_toys import (  # noqa: E402
    orientation_frame,
    rgb_to_ybr_full,
    toy_image,
    write_enhanced,
    write_series,
)


def _expected(image):
    """toy ``(t, z, rows, cols)`` -> the reader's ``(t, 1, cols, rows[, z])``."""
    out = np.transpose(image, (0, 3, 2, 1))[:, None].astype(np.float32)
    return out[..., 0] if image.shape[1] == 1 else out


def test_example_ultrasound_cine_frames_spacing_interval_and_colour(caplog):
    """pydicom's ultrasound cine (30 frames, JPEG baseline, YBR_FULL_422): frames over time,
    spacing from the ultrasound region (cm -> mm), Frame Time 33.333 ms, colour as RGB. Its
    region reaches past the 320x240 image (x up to 595): a warning says so."""
    path = get_testdata_file("examples_ybr_color.dcm", download=False)
    image, g = read_image(path)
    assert "reaches past the 320x240 image" in caplog.text
    assert image.shape == (30, 3, 320, 240) and g.format == "dicom"
    assert g.time_interval == pytest.approx(0.033333) and g.time_unit == "s"
    assert g.spacing == pytest.approx((0.5104970559477806,) * 2) and g.space_unit == "mm"
    rgb = pydicom.dcmread(path).pixel_array  # (t, rows, cols, 3) in RGB
    np.testing.assert_array_equal(image, np.transpose(rgb, (0, 3, 2, 1)))


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_comes_back_as_rgb_and_to_grey_is_its_luminance(tmp_path, photometric):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 1, 6, 5, 3)).astype(np.uint8)
    stored = rgb if photometric == "RGB" else rgb_to_ybr_full(rgb)
    write_series(tmp_path / "s", stored, photometric=photometric)
    image, _ = read_image(tmp_path / "s")
    expected = np.transpose(rgb[:, 0], (0, 3, 2, 1)).astype(np.float32)  # (t, 3, cols, rows)
    assert np.abs(image - expected).max() <= (0 if photometric == "RGB" else 2)
    y = np.transpose(rgb_to_ybr_full(rgb)[:, 0, ..., 0], (0, 2, 1))[:, None]
    assert np.abs(to_grey(image) - y).max() <= 1.5


def test_compressed_example_decodes():
    """RLE (pydicom's own decoder), RGB, 2 frames."""
    path = get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)
    image, g = read_image(path)
    assert image.shape == (2, 3, 100, 100) and g.frames == 2
    np.testing.assert_array_equal(image, np.transpose(pydicom.dcmread(path).pixel_array,
                                                      (0, 3, 2, 1)))


def test_series_3d_t_order_spacing_interval_and_positions(tmp_path):
    """Shuffled file names and Instance Numbers: the order comes from the tags only; the
    affine puts every slice where its Image Position (Patient) says."""
    image = toy_image(t=4, z=3)
    files = write_series(tmp_path / "s", image, spacing=(0.8, 0.7), slice_gap=2.5,
                         frame_ms=40.0, orientation=(0, 1, 0, 0, 0, -1))
    got, g = read_image(tmp_path / "s")
    np.testing.assert_array_equal(got, _expected(image))
    assert g.spacing == pytest.approx((0.7, 0.8, 2.5)) and g.time_interval == pytest.approx(0.04)
    assert g.space == "LPS" and g.header["dicom"]["temporal_key"] == "TemporalPositionIdentifier"
    for k in range(3):  # file (t=0, slice k) lies at affine @ (0, 0, k)
        ds = pydicom.dcmread(files[k], stop_before_pixels=True)
        np.testing.assert_allclose(g.affine @ [0, 0, k, 1], [*ds.ImagePositionPatient, 1])
    row, col, _ = orientation_frame((0, 1, 0, 0, 0, -1))
    np.testing.assert_allclose(g.affine[:3, 0], 0.7 * row)  # i: next column
    np.testing.assert_allclose(g.affine[:3, 1], 0.8 * col)  # j: next row
    # the same files listed in any order, and NIfTI's view of the grid: LPS -> RAS
    again, _ = read_image(list(reversed(files)))
    np.testing.assert_array_equal(again, got)
    np.testing.assert_allclose(nifti_geometry(g).affine[:2], -g.affine[:2])


def test_enhanced_multiframe_3d_t_in_shuffled_frame_order(tmp_path):
    """An enhanced MR file whose frames are stored shuffled: arranged by the per-frame plane
    positions and Temporal Position Index; interval from the trigger delay times."""
    image = toy_image(t=3, z=2)
    path, _ = write_enhanced(tmp_path / "enh.dcm", image, spacing=(0.8, 0.7), slice_gap=2.5)
    got, g = read_image(path)
    np.testing.assert_array_equal(got, _expected(image))
    assert g.spacing == pytest.approx((0.7, 0.8, 2.5)) and g.time_interval == pytest.approx(0.04)
    assert g.origin == pytest.approx((-20.0, 10.0, 5.0))


def test_a_folder_of_enhanced_files_one_per_time_point(tmp_path):
    """Enhanced files of one series, one volume each (one of them a single frame): arranged
    like the frames of one file."""
    image = toy_image(t=3, z=2)
    uids = ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    for i in (2, 0, 1):
        write_enhanced(tmp_path / "s" / f"t{i}.dcm", image[i:i + 1], uids=uids, first_time=i,
                       seed=i)
    write_enhanced(tmp_path / "one" / "a.dcm", image[:1, :1], uids=uids)
    write_enhanced(tmp_path / "one" / "b.dcm", image[1:2, :1], uids=uids, first_time=1)
    got, g = read_image(tmp_path / "s")
    np.testing.assert_array_equal(got, _expected(image))
    assert g.time_interval == pytest.approx(0.04)
    got, _ = read_image(tmp_path / "one")  # NumberOfFrames 1: positions still per frame
    np.testing.assert_array_equal(got, _expected(image[:2, :1]))


def test_example_rt_dose_frames_are_slices():
    """pydicom's RT Dose: its frames step along the Grid Frame Offset Vector, so they are the
    slices of one volume, not time points."""
    path = get_testdata_file("rtdose.dcm", download=False)
    image, g = read_image(path)
    ds = pydicom.dcmread(path)
    assert image.shape == (1, 1, 10, 10, 15) and g.time_interval is None
    assert g.spacing == pytest.approx((10.0, 10.0, 5.0))
    assert g.origin == pytest.approx([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_array_equal(image[0, 0], np.transpose(ds.pixel_array, (2, 1, 0)))


@pytest.mark.parametrize("t", [1, 3])
def test_segmentation_of_an_enhanced_file_maps_to_its_source_frames(tmp_path, t):
    """Each frame of the SEG refers to exactly the source frame (time point and slice) it
    segments, also when the positions repeat over time."""
    hd = pytest.importorskip("highdicom")
    from clstm4d.data import write_segmentation

    image = toy_image(t=t, z=3)
    path, order = write_enhanced(tmp_path / "enh.dcm", image, seed=4)
    got, g = read_image(path)
    labels = (got[:, 0] % 3).astype(np.int64)  # (t, cols, rows, z)
    write_segmentation(labels, g, tmp_path / "seg.dcm", {0: "bg", 1: "a", 2: "b"})
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    for number, (i, k) in enumerate(order, start=1):  # source frame `number`: (time i, slice k)
        back = seg.get_pixels_by_source_frame(sop, [number], combine_segments=True)[0]
        np.testing.assert_array_equal(back, labels[i, :, :, k].T)
    for item in seg.PerFrameFunctionalGroupsSequence:
        (ref,) = item.DerivationImageSequence[0].SourceImageSequence
        assert order[int(ref.ReferencedFrameNumber) - 1][0] + 1 == item.FrameContentSequence[
            0].get("TemporalPositionIndex", 1)
    write_segmentation(labels, g, tmp_path / "again.dcm", {0: "bg", 1: "a", 2: "b"})
    again = pydicom.dcmread(tmp_path / "again.dcm", stop_before_pixels=True)
    assert again.SOPInstanceUID != seg.SOPInstanceUID  # a new instance every time
    assert again.SeriesInstanceUID != seg.SeriesInstanceUID


@pytest.mark.parametrize("temporal, jitter", [
    (("TriggerTime",), 3.0),  # trigger times differ per slice: ordered within each position
    (("AcquisitionTime",), 0.0),
    (("TemporalPositionIdentifier", "AcquisitionTime"), 0.0),
])
def test_series_ordered_by_the_temporal_tag_present(tmp_path, temporal, jitter):
    image = toy_image(t=5, z=2)
    write_series(tmp_path / "s", image, temporal=temporal, jitter_ms=jitter, seed=3)
    got, g = read_image(tmp_path / "s")
    np.testing.assert_array_equal(got, _expected(image))
    assert g.header["dicom"]["temporal_key"] == temporal[0]
    assert g.time_interval == pytest.approx(0.04)


def test_temporal_position_identifier_wins_over_trigger_time(tmp_path):
    """The preferred tag decides even when a later one says otherwise."""
    image = toy_image(t=3, z=1)
    files = write_series(tmp_path / "s", image)
    for f in files:  # trigger times reversed against the Temporal Position Identifier
        ds = pydicom.dcmread(f)
        ds.TriggerTime = 1000 - float(ds.TriggerTime)
        ds.save_as(f)
    got, _ = read_image(tmp_path / "s")
    np.testing.assert_array_equal(got, _expected(image))


def test_2d_t_series_and_rescale(tmp_path):
    image = toy_image(t=6, z=1)
    write_series(tmp_path / "s", image, rescale=(2.0, -100.0))
    got, g = read_image(tmp_path / "s")
    assert g.spatial_dims == 2 and g.frames == 6
    np.testing.assert_array_equal(got, 2.0 * _expected(image) - 100.0)
    three, g3 = read_image(tmp_path / "s", spatial_dims=3)
    assert three.shape == got.shape + (1,) and g3.spatial_dims == 3


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless"])
def test_compressed_series_equals_uncompressed(tmp_path, syntax):
    import pydicom.uid
    from pydicom.pixels import get_encoder

    uid = getattr(pydicom.uid, syntax)
    if not get_encoder(uid).is_available:
        pytest.skip(f"no {syntax} encoder installed here")
    image = toy_image(t=2, z=2)
    write_series(tmp_path / "s", image, seed=2, compress=uid)
    got, _ = read_image(tmp_path / "s")
    np.testing.assert_array_equal(got, _expected(image))


# ----------------------------------------------------------------------------- bad input

def test_missing_temporal_tags_name_each_tag(tmp_path):
    write_series(tmp_path / "s", toy_image(t=3, z=2), temporal=())
    with pytest.raises(DataError, match=r"cannot order 6 frames in time: Temporal Position "
                       r"Identifier \(0020,0100\) missing in 6 of 6 files.*Trigger Time "
                       r"\(0018,1060\) missing.*Acquisition Time \(0008,0032\) missing"):
        read_image(tmp_path / "s")


def test_one_volume_needs_no_temporal_tag(tmp_path):
    write_series(tmp_path / "s", toy_image(t=1, z=4), temporal=())
    got, g = read_image(tmp_path / "s")
    assert got.shape == (1, 1, 10, 12, 4) and g.time_interval is None


def test_a_tag_missing_in_some_files_falls_back_and_says_so(tmp_path, caplog):
    image = toy_image(t=3, z=1)
    files = write_series(tmp_path / "s", image)
    ds = pydicom.dcmread(files[1])
    del ds.TemporalPositionIdentifier
    ds.save_as(files[1])
    got, g = read_image(tmp_path / "s")
    np.testing.assert_array_equal(got, _expected(image))
    assert g.header["dicom"]["temporal_key"] == "TriggerTime"
    assert "Temporal Position Identifier (0020,0100) missing in 1 of 3 files" in caplog.text


def test_missing_positions_and_two_series_and_sizes_are_refused(tmp_path):
    files = write_series(tmp_path / "s", toy_image(t=2, z=2))
    ds = pydicom.dcmread(files[0])
    del ds.ImagePositionPatient
    ds.save_as(files[0])
    with pytest.raises(DataError, match=r"Image Position \(Patient\) \(0020,0032\) missing in "
                       "1 of 4 frames"):
        read_image(tmp_path / "s")
    write_series(tmp_path / "two", toy_image(t=2, z=1), seed=1, series="1.2.3.4", series_number=7)
    write_series(tmp_path / "two", toy_image(t=2, z=1), seed=2, series="1.2.3.5", prefix="B")
    with pytest.raises(DataError, match=r"2 series in one input: 1\.2\.3\.4 \(Series Number 7.*"
                       r"1\.2\.3\.5"):
        read_image(tmp_path / "two")
    write_series(tmp_path / "size", toy_image(t=2, z=1), seed=3, series="9.9")
    shutil.copy(write_series(tmp_path / "other", toy_image(t=1, z=1, rows=8), seed=4,
                             series="9.9")[0], tmp_path / "size" / "odd.dcm")
    with pytest.raises(DataError, match="frames of different sizes: 8x10"):
        read_image(tmp_path / "size")


def test_uneven_slices_are_refused(tmp_path):
    files = write_series(tmp_path / "s", toy_image(t=1, z=4))
    for f in files:
        ds = pydicom.dcmread(f)
        if ds.ImagePositionPatient[0] == -27.5:  # the last slice moves 1 mm further
            ds.ImagePositionPatient = [-28.5, *ds.ImagePositionPatient[1:]]
            ds.save_as(f)
    with pytest.raises(DataError, match=r"not evenly spaced \(gaps \[2.5, 2.5, 3.5\] mm\)"):
        read_image(tmp_path / "s")


def test_an_undecodable_syntax_names_it_and_the_package(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    (f,) = write_series(tmp_path / "s", toy_image(t=1, z=1))
    ds = pydicom.dcmread(f)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds.save_as(f, enforce_file_format=True)
    with pytest.raises(DataError, match=r"cannot decode transfer syntax 'JPEG Lossless.*"
                       r"pylibjpeg-libjpeg"):
        read_image(f)


def test_labels_are_not_read_from_dicom(tmp_path):
    write_series(tmp_path / "s", toy_image(t=2, z=1))
    with pytest.raises(DataError, match="labels are not read from DICOM"):
        read_label(tmp_path / "s")


def test_a_datalist_case_with_a_dicom_image_and_a_nifti_label(tmp_path):
    """Training reads DICOM too: the label written as NIfTI over the DICOM grid (RAS) is on
    the image's grid (LPS); a label on another grid is still refused."""
    import json

    from clstm4d.data import load_case, load_datalist, write_label

    image = toy_image(t=3, z=2)
    write_series(tmp_path / "dcm", image)
    got, g = read_image(tmp_path / "dcm")
    labels = (got[:, 0] % 2).astype(np.int64)
    write_label(labels, g, tmp_path / "lab.nii.gz")
    shifted = nifti_geometry(g)
    shifted.affine[0, 3] += 5.0
    write_label(labels, shifted, tmp_path / "off.nii.gz")
    entry = {"image": "dcm", "label": "lab.nii.gz"}
    (tmp_path / "d.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "a"}, "spatial_dims": 3,
        "training": [entry, {**entry, "label": "off.nii.gz", "name": "off"}]}))
    good, bad = load_datalist(tmp_path / "d.json").training
    case = load_case(good)
    np.testing.assert_array_equal(case.image, got)
    np.testing.assert_array_equal(case.label, labels)
    with pytest.raises(DataError, match="grid"):
        load_case(bad)


def test_a_file_no_installed_decoder_can_read_names_the_other_decoders():
    """pydicom's 12-bit JPEG Extended example: pillow cannot decode it."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGExtended12Bit

    if not get_decoder(JPEGExtended12Bit).missing_dependencies:
        pytest.skip("every decoder plugin is installed here")
    path = get_testdata_file("JPEG-lossy.dcm", download=False)
    try:
        read_image(path)
    except DataError as e:
        assert "JPEG Extended (Process 2 and 4)" in str(e) and "pylibjpeg-libjpeg" in str(e)
        assert "\n" not in str(e)
    else:
        pytest.skip("a decoder for it is installed here")


def test_damaged_headers_are_data_errors():
    """pydicom's odd examples: an invalid Number of Frames, no SOP Instance UID."""
    with pytest.raises(DataError, match=r"Number of Frames \(0028,0008\) is '1A'"):
        read_image(get_testdata_file("badVR.dcm", download=False))
    image, g = read_image(get_testdata_file("liver_1frame.dcm", download=False))
    assert image.shape[0] == 1 and g.space == "LPS"  # enhanced, Number of Frames absent


def test_every_example_file_of_pydicom_reads_or_is_one_data_error():
    """The files pydicom ships (odd ones included): an image, or a DataError, never another
    exception (which the CLI would show as a traceback)."""
    import os
    import warnings

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    read = refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for root, _, names in os.walk(folder):
            for name in sorted(n for n in names if n.endswith(".dcm")):
                try:
                    read_image(Path(root) / name)
                    read += 1
                except DataError as e:
                    assert "\n" not in str(e), name
                    refused += 1
    assert read > 40 and refused > 15  # the examples hold both kinds
