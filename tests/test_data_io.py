"""Readers/writers: values, geometry and units survive a round trip in every format."""

import os
from pathlib import Path

import numpy as np
import pytest

from clstm4d._common import atomic_file
from clstm4d.data import (
    DataError,
    Geometry,
    read_image,
    read_label,
    write_image,
    write_label,
)

nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")
tifffile = pytest.importorskip("tifffile")

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _oblique_affine():
    """A rotated, anisotropic, shifted grid (so axis mix-ups change the numbers)."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-12.0, 30.5, 7.25]
    return affine


@pytest.mark.parametrize("name, shape, tr", [("example4d.nii.gz", (128, 96, 24, 2), 2000.0),
                                             ("functional.nii", (17, 21, 3, 20), 2.0)])
def test_nibabel_shipped_4d_files_survive_read_write(tmp_path, name, shape, tr):
    path = NIBABEL_DATA / name
    if not path.exists():
        pytest.skip(f"nibabel's test data {name} is not installed at {NIBABEL_DATA}")
    image, geom = read_image(path)
    assert image.shape == (shape[3], 1, *shape[:3]) and image.dtype == np.float32
    assert geom.format == "nifti" and geom.time_interval == tr and geom.space_unit == "mm"
    src = nib.load(str(path))
    # independent reference: nibabel's own array, time moved first
    np.testing.assert_allclose(image[:, 0], np.moveaxis(src.get_fdata(), -1, 0), rtol=1e-6)
    out = tmp_path / name
    write_image(image, geom, out)
    back = nib.load(str(out))
    assert back.shape == src.shape
    np.testing.assert_allclose(back.get_fdata(), src.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
    np.testing.assert_allclose(back.get_qform(), src.get_qform(), atol=1e-6)
    assert back.header.get_zooms() == src.header.get_zooms()
    assert back.header.get_xyzt_units() == src.header.get_xyzt_units()
    assert int(back.header["sform_code"]) == int(src.header["sform_code"])
    image2, geom2 = read_image(out)
    np.testing.assert_array_equal(image2, image)
    assert geom2.spacing == pytest.approx(geom.spacing) and geom2.time_interval == tr


def test_nifti_2d_plus_time_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    geom = Geometry.default("nifti", (7, 5), frames=4, channels=2, spacing=(0.5, 0.7),
                            time_interval=0.04)
    image = rng.normal(size=(4, 2, 7, 5)).astype(np.float32)
    write_image(image, geom, tmp_path / "x.nii.gz")
    raw = nib.load(str(tmp_path / "x.nii.gz"))
    assert raw.shape == (7, 5, 1, 4, 2)  # NIfTI order x, y, z, t, c
    np.testing.assert_array_equal(raw.get_fdata(dtype=np.float32)[:, :, 0, 2, 1], image[2, 1])
    back, g = read_image(tmp_path / "x.nii.gz", spatial_dims=2)
    np.testing.assert_array_equal(back, image)
    assert g.spacing == pytest.approx((0.5, 0.7)) and g.time_interval == pytest.approx(0.04)
    as3d, g3 = read_image(tmp_path / "x.nii.gz")
    assert as3d.shape == (4, 2, 7, 5, 1) and g3.spatial_dims == 3


def test_nifti_label_keeps_affine_and_integer_values(tmp_path):
    affine = _oblique_affine()
    label = np.random.default_rng(1).integers(0, 4, size=(3, 6, 5, 4))
    geom = Geometry("nifti", (6, 5, 4), frames=3, affine=affine, space="RAS", space_unit="mm",
                    time_interval=0.5, time_unit="s")
    write_label(label, geom, tmp_path / "lab.nii.gz")
    raw = nib.load(str(tmp_path / "lab.nii.gz"))
    assert raw.get_data_dtype() == np.uint8
    np.testing.assert_allclose(raw.affine, affine, atol=1e-5)
    back, g = read_label(tmp_path / "lab.nii.gz")
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, label)
    np.testing.assert_allclose(g.spacing, [0.8, 1.1, 2.5], atol=1e-5)


def test_nifti_series_round_trip(tmp_path):
    affine = _oblique_affine()
    frames = [tmp_path / "in" / f"t{i}.nii.gz" for i in range(3)]
    frames[0].parent.mkdir()
    data = np.random.default_rng(2).normal(size=(3, 6, 5, 4)).astype(np.float32)
    for f, vol in zip(frames, data, strict=True):
        nib.save(nib.Nifti1Image(vol, affine), str(f))
    image, geom = read_image([str(f) for f in frames])
    assert geom.format == "nifti-series" and image.shape == (3, 1, 6, 5, 4)
    np.testing.assert_array_equal(image[:, 0], data)
    written = write_label((image[:, 0] > 0).astype(int), geom, tmp_path / "out")
    assert [p.name for p in written] == ["t0.nii.gz", "t1.nii.gz", "t2.nii.gz"]
    for p, vol in zip(written, data, strict=True):
        img = nib.load(str(p))
        assert img.shape == (6, 5, 4)
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol > 0)


def _write_nrrd_frame(path, vol, affine, **extra):
    header = {"space": "left-posterior-superior",
              "space directions": affine[:3, :3].T.copy(), "space origin": affine[:3, 3].copy(),
              "kinds": ["domain"] * 3, **extra}
    nrrd.write(str(path), vol, header, index_order="F")


def test_nrrd_series_with_seg_nrrd_labels(tmp_path):
    affine = _oblique_affine()
    rng = np.random.default_rng(3)
    vols = rng.normal(size=(3, 6, 5, 4)).astype(np.float32)
    labs = rng.integers(0, 3, size=(3, 6, 5, 4)).astype(np.uint8)
    seg_meta = {"Segment0_ID": "Segment_1", "Segment0_Name": "chamber",
                "Segment0_LabelValue": "1", "Segment0_Layer": "0",
                "Segment1_ID": "Segment_2", "Segment1_Name": "blob",
                "Segment1_LabelValue": "2", "Segment1_Layer": "0"}
    images, labels = [], []
    for i in range(3):
        images.append(tmp_path / f"f{i}.nrrd")
        labels.append(tmp_path / f"f{i}.seg.nrrd")
        _write_nrrd_frame(images[-1], vols[i], affine)
        _write_nrrd_frame(labels[-1], labs[i], affine, **seg_meta)
    image, geom = read_image(images)
    label, lgeom = read_label(labels)
    assert geom.format == "nrrd-series" and image.shape == (3, 1, 6, 5, 4)
    # the folder itself: images are the plain frames, labels the .seg.nrrd ones
    np.testing.assert_array_equal(read_image(tmp_path)[0], image)
    np.testing.assert_array_equal(read_label(tmp_path)[0], label)
    np.testing.assert_array_equal(image[:, 0], vols)
    np.testing.assert_array_equal(label, labs)
    np.testing.assert_allclose(geom.affine, affine, atol=1e-12)
    written = write_label(label, geom, tmp_path / "pred")
    assert [p.name for p in written] == ["f0.seg.nrrd", "f1.seg.nrrd", "f2.seg.nrrd"]
    data, header = nrrd.read(str(written[1]))
    np.testing.assert_array_equal(data, labs[1])
    np.testing.assert_allclose(header["space directions"], affine[:3, :3].T, atol=1e-12)
    np.testing.assert_allclose(header["space origin"], affine[:3, 3], atol=1e-12)
    assert header["space"] == "left-posterior-superior"
    # label read back from its own .seg.nrrd keeps the segment names
    written = write_label(label, lgeom, tmp_path / "pred2")
    assert nrrd.read_header(str(written[0]))["Segment0_Name"] == "chamber"
    out_img = write_image(image, geom, tmp_path / "img")
    np.testing.assert_array_equal(nrrd.read(str(out_img[2]))[0], vols[2])


def test_seg_nrrd_overlapping_layout_merged_or_refused(tmp_path):
    affine = _oblique_affine()
    layers = np.zeros((2, 6, 5, 4), np.uint8)
    layers[0, :2] = 1  # segment 0 in layer 0, value 1
    layers[1, 3:] = 1  # segment 1 in layer 1, value 1 (value reused across layers)
    header = {"space": "left-posterior-superior",
              "space directions": np.vstack([np.full(3, np.nan), affine[:3, :3].T]),
              "space origin": affine[:3, 3].copy(), "kinds": ["list", "domain", "domain",
                                                             "domain"],
              "Segment0_Layer": "0", "Segment0_LabelValue": "1",
              "Segment1_Layer": "1", "Segment1_LabelValue": "1"}
    path = tmp_path / "layers.seg.nrrd"
    nrrd.write(str(path), layers, header, index_order="F")
    label, geom = read_label([path])
    expected = np.zeros((6, 5, 4), int)
    expected[:2], expected[3:] = 1, 2
    np.testing.assert_array_equal(label[0], expected)
    np.testing.assert_allclose(geom.affine, affine, atol=1e-12)
    layers[1, 1] = 1  # now row 1 belongs to both segments
    nrrd.write(str(path), layers, header, index_order="F")
    with pytest.raises(DataError, match="segments overlap at 20 voxels"):
        read_label([path])


def test_tiff_hyperstack_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.random((3, 4, 2, 6, 5)).astype(np.float32)  # TZCYX
    path = tmp_path / "movie.tif"
    tifffile.imwrite(str(path), data, imagej=True, resolution=(1 / 0.2, 1 / 0.25),
                     metadata={"axes": "TZCYX", "spacing": 1.5, "unit": "um",
                               "finterval": 30.0})
    image, geom = read_image(path)
    assert image.shape == (3, 2, 4, 6, 5) and geom.format == "tiff"
    np.testing.assert_array_equal(image, np.moveaxis(data, 2, 1))
    assert geom.spacing == pytest.approx((1.5, 0.25, 0.2))  # (z, y, x)
    assert geom.time_interval == 30.0 and geom.space_unit == "um"
    out = tmp_path / "out.tif"
    write_image(image, geom, out)
    with tifffile.TiffFile(str(out)) as tf:
        assert tf.series[0].axes == "TZCYX"
        np.testing.assert_array_equal(tf.series[0].asarray(), data)
        assert tf.imagej_metadata["finterval"] == 30.0
    label = (image[:, 0] > 0.5).astype(int)
    write_label(label, geom, tmp_path / "lab.tif")
    back, lgeom = read_label(tmp_path / "lab.tif")
    np.testing.assert_array_equal(back, label)
    assert lgeom.spacing == pytest.approx(geom.spacing)


def test_tiff_2d_time_lapse(tmp_path):
    data = np.arange(3 * 6 * 5, dtype=np.uint16).reshape(3, 6, 5)
    tifffile.imwrite(str(tmp_path / "t.tif"), data, imagej=True, metadata={"axes": "TYX"})
    image, geom = read_image(tmp_path / "t.tif")
    assert image.shape == (3, 1, 6, 5) and geom.spatial_dims == 2
    np.testing.assert_array_equal(image[:, 0], data)
    image3, _ = read_image(tmp_path / "t.tif", spatial_dims=3)
    assert image3.shape == (3, 1, 6, 5, 1)


def test_atomic_write_leaves_old_file_and_no_temp_on_crash(tmp_path, monkeypatch):
    geom = Geometry.default("nifti", (4, 4, 4), frames=2)
    out = tmp_path / "pred.nii.gz"
    write_label(np.ones((2, 4, 4, 4), int), geom, out)
    before = out.read_bytes()

    def crash(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_label(np.zeros((2, 4, 4, 4), int), geom, out)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["pred.nii.gz"]
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "new.txt") as tmp:
        tmp.write_text("x")
        raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["pred.nii.gz"]


def test_writers_reject_wrong_shapes_and_values(tmp_path):
    geom = Geometry.default("nifti", (4, 4), frames=2)
    with pytest.raises(ValueError, match=r"does not match the geometry \(t=2"):
        write_label(np.zeros((3, 4, 4), int), geom, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match=r"\(t, \*s\) with 2 spatial axes"):
        write_label(np.zeros((2, 1, 4, 4), int), geom, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="labels must be in"):
        write_label(-np.ones((2, 4, 4), int), geom, tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="fractional"):
        write_label(np.full((2, 4, 4), 0.5), geom, tmp_path / "a.nii.gz")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("qcode, scode", [(1, 0), (0, 2), (2, 4), (0, 0)])
def test_nifti_qform_and_sform_codes_survive(tmp_path, qcode, scode):
    affine = _oblique_affine()
    img = nib.Nifti1Image(np.zeros((4, 3, 2, 2), np.int16), None)
    img.set_qform(affine if qcode else None, code=qcode)
    img.set_sform(affine if scode else None, code=scode)
    nib.save(img, str(tmp_path / "src.nii"))
    src = nib.load(str(tmp_path / "src.nii"))
    label, geom = read_label(tmp_path / "src.nii")
    write_label(label, geom, f"{tmp_path}/out/")  # a folder: named after the source
    back = nib.load(str(tmp_path / "out" / "src.nii"))
    if qcode or scode:
        assert (int(back.header["qform_code"]), int(back.header["sform_code"])) == (qcode, scode)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)


@pytest.mark.parametrize("name", ["bad.nrrd", "bad.tif", "bad.nii"])
def test_unreadable_files_name_the_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"garbage, not an image header at all" * 3)
    with pytest.raises(DataError, match=rf"{name}: cannot read"):
        read_image(tmp_path / name)
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / ("missing_" + name))


def test_multichannel_label_is_refused(tmp_path):
    geom = Geometry.default("nifti", (4, 4), frames=2, channels=2)
    write_image(np.zeros((2, 2, 4, 4), np.float32), geom, tmp_path / "two.nii.gz")
    with pytest.raises(DataError, match="a label map has one channel, this file has 2"):
        read_label(tmp_path / "two.nii.gz", spatial_dims=2)


def test_2d_nrrd_frames_with_spacings_and_no_space_directions(tmp_path):
    frames = []
    for i in range(3):
        frames.append(tmp_path / f"f{i}.nrrd")
        nrrd.write(str(frames[-1]), np.full((5, 4), i, np.int16),
                   {"spacings": [0.5, 2.0], "kinds": ["domain", "domain"]}, index_order="F")
    image, geom = read_image(frames)
    assert image.shape == (3, 1, 5, 4) and geom.spacing == (0.5, 2.0)
    np.testing.assert_array_equal(image[:, 0, 0, 0], [0, 1, 2])
    written = write_image(image * 2, geom, tmp_path / "out")
    back, g = read_image(written)
    np.testing.assert_array_equal(back, image * 2)
    assert g.spacing == (0.5, 2.0)


def test_output_path_keeps_cases_apart(tmp_path):
    from clstm4d.data import output_path

    geom = Geometry.default("nrrd-series", (4, 4, 4), 2)
    label = np.ones((2, 4, 4, 4), int)
    a = write_label(label, geom, output_path(geom, tmp_path, "a"))
    b = write_label(label, geom, output_path(geom, tmp_path, "b"))
    assert [p.relative_to(tmp_path).as_posix() for p in a + b] == [
        "a/frame_000.seg.nrrd", "a/frame_001.seg.nrrd", "b/frame_000.seg.nrrd",
        "b/frame_001.seg.nrrd"]
    nifti = Geometry.default("nifti", (4, 4, 4), 2)
    nifti.sources = ("/data/p01.nii",)
    assert write_label(label, nifti, output_path(nifti, tmp_path, "p01")) == [tmp_path / "p01.nii"]
    assert nib.load(str(tmp_path / "p01.nii")).shape == (4, 4, 4, 2)


def test_importing_the_data_layer_loads_no_format_library():
    import subprocess
    import sys

    code = ("import sys, clstm4d.data; "
            "print(sorted({'nibabel', 'nrrd', 'tifffile', 'scipy', 'monai'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.stdout.strip() == "[]", out.stdout


def test_nrrd_with_a_time_axis_or_unknown_label_layers_is_refused(tmp_path):
    affine = _oblique_affine()
    dirs = np.vstack([np.full(3, np.nan), affine[:3, :3].T])
    base = {"space": "left-posterior-superior", "space directions": dirs,
            "space origin": affine[:3, 3].copy(), "kinds": ["list", "domain", "domain", "domain"]}
    nrrd.write(str(tmp_path / "cine.nrrd"), np.zeros((3, 4, 4, 4), np.int16),
               {**base, "axis 0 quantity": "time"}, index_order="F")
    with pytest.raises(DataError, match="cine.nrrd: a 4D NRRD with a time axis"):
        read_image([tmp_path / "cine.nrrd"])
    nrrd.write(str(tmp_path / "lab.nrrd"), np.zeros((2, 4, 4, 4), np.uint8), base,
               index_order="F")
    with pytest.raises(DataError, match="lab.nrrd: a label frame must be one 3D volume"):
        read_label([tmp_path / "lab.nrrd"])
    image, _ = read_image([tmp_path / "lab.nrrd"])  # an image: the list axis is channels
    assert image.shape == (1, 2, 4, 4, 4)
