"""Datalists and case loading, including every kind of bad input the issue lists."""

import json

import numpy as np
import pytest

from clstm4d.data import (
    DataError,
    Geometry,
    load_case,
    load_datalist,
    validate_datalist,
    write_image,
    write_label,
)

nib = pytest.importorskip("nibabel")


def _write_case(folder, name, t=3, shape=(6, 5, 4), label_t=None, label_shape=None,
                label_values=(0, 1, 2), nan=False, affine=None):
    geom = Geometry.default("nifti", shape, t, spacing=(1.0, 1.2, 2.0), time_interval=0.5)
    if affine is not None:
        geom.affine = affine
    rng = np.random.default_rng(len(name))
    image = rng.normal(size=(t, 1, *shape)).astype(np.float32)
    if nan:
        image[1, 0, 2, 2, 2] = np.nan
    write_image(image, geom, folder / f"{name}.nii.gz")
    lt, ls = label_t or t, label_shape or shape
    lgeom = Geometry.default("nifti", ls, lt, spacing=(1.0, 1.2, 2.0), time_interval=0.5)
    label = rng.choice(label_values, size=(lt, *ls))
    write_label(label, lgeom, folder / f"{name}_seg.nii.gz")
    return image, label


def _datalist(folder, training, **top):
    doc = {"labels": {"0": "background", "1": "a", "2": "b"}, "training": training, **top}
    (folder / "list.json").write_text(json.dumps(doc))
    return folder / "list.json"


def test_relative_paths_lists_folders_and_globs_resolve(tmp_path):
    (tmp_path / "data").mkdir()
    image, label = _write_case(tmp_path / "data", "p1")
    series = tmp_path / "data" / "p2"
    series.mkdir()
    geom = Geometry.default("nifti-series", (6, 5, 4), 3)
    write_image(image, geom, series)  # frame_000.nii.gz ...
    seg = tmp_path / "data" / "p2seg"
    write_label(label, geom, seg)
    path = _datalist(tmp_path, [
        {"image": "data/p1.nii.gz", "label": "data/p1_seg.nii.gz", "degraded": [1]},
        {"name": "p2", "image": "data/p2", "label": "data/p2seg/frame_*.nii.gz"},
    ], validation=[{"name": "p2-list", "image": [f"data/p2/frame_{i:03d}.nii.gz"
                                                  for i in range(3)],
                    "label": "data/p2seg"}],
        test=[{"name": "p1-test", "image": "data/p1.nii.gz"}], spatial_dims=3, time_interval=0.5)
    dl = load_datalist(path)
    assert [c.name for c in dl.cases()] == ["p1", "p2", "p2-list", "p1-test"]
    assert dl.num_classes == 3 and dl.spatial_dims == 3
    assert dl.training[0].meta["degraded"] == [1]
    loaded = [load_case(c) for c in dl.cases("training", "validation")]
    for case in loaded:
        np.testing.assert_array_equal(case.image, image)
        np.testing.assert_array_equal(case.label, label)
    assert loaded[1].geometry.format == "nifti-series"
    assert loaded[1].geometry.time_interval == 0.5  # from the datalist
    assert load_case(dl.test[0]).label is None


def test_test_section_duplicate_names_are_reported(tmp_path):
    path = _datalist(tmp_path, [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}],
                     test=["a.nii.gz"])
    with pytest.raises(DataError, match="duplicate case name 'a'"):
        load_datalist(path)


def test_datalist_with_wrong_keys_lists_every_problem(tmp_path):
    doc = {"labels": {"0": "background"}, "trainig": [],
           "training": [{"img": "a.nii.gz", "label": "b.nii.gz"},
                        {"image": "c.nii.gz", "lable": "d.nii.gz"},
                        {"image": 3, "label": "e.nii.gz"}],
           "validation": {"image": "x"}, "spatial_dims": 4}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        load_datalist(tmp_path / "bad.json")
    msg = str(info.value)
    assert "bad.json" in msg and "6 problem(s)" in msg
    assert "unknown top-level keys ['trainig']" in msg
    assert "training[0]: missing key 'image' (keys: ['img', 'label'])" in msg
    assert "training[1]: missing key 'label' (keys: ['image', 'lable'])" in msg
    assert "training[2]: 'image' must be a path or a non-empty list of paths, got int" in msg
    assert "'validation' must be a list, got dict" in msg
    assert "spatial_dims must be 1, 2 or 3, got 4" in msg


@pytest.mark.parametrize("content, problem", [("{not json", "not valid JSON"),
                                              ("[1, 2]", "must be a JSON object"),
                                              ('{"labels": {}}', "no section")])
def test_malformed_datalist_files(tmp_path, content, problem):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(DataError, match=problem):
        load_datalist(tmp_path / "d.json")
    with pytest.raises(DataError, match="datalist file not found"):
        load_datalist(tmp_path / "missing.json")


def test_validate_reports_every_bad_case_at_once(tmp_path):
    _write_case(tmp_path, "good")
    _write_case(tmp_path, "frames", label_t=4)
    _write_case(tmp_path, "shape", label_shape=(6, 5, 3))
    _write_case(tmp_path, "classes", label_values=(0, 1, 5))
    _write_case(tmp_path, "nan", nan=True)
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    _write_case(tmp_path, "grid")
    moved = np.eye(4)
    moved[0, 3] = 5.0
    _write_case(tmp_path, "gridlab", affine=moved)  # only its label is used below
    names = ["good", "frames", "shape", "classes", "nan"]
    training = [{"image": f"{n}.nii.gz", "label": f"{n}_seg.nii.gz"} for n in names]
    training += [{"image": "missing.nii.gz", "label": "good_seg.nii.gz"},
                 {"image": "broken.nii.gz", "label": "good_seg.nii.gz"},
                 {"image": "gridlab.nii.gz", "label": "grid_seg.nii.gz"}]
    dl = load_datalist(_datalist(tmp_path, training))
    problems = validate_datalist(dl, strict=False)
    assert len(problems) == 7
    expected = [
        ("frames", "frames_seg.nii.gz", "label has 4 frames, the image"),
        ("shape", "shape_seg.nii.gz", "label spatial shape (6, 5, 3) differs from the image's "
                                      "(6, 5, 4)"),
        ("classes", "classes_seg.nii.gz", "label values [5] are not among the declared classes "
                                          "[0, 1, 2]"),
        ("nan", "nan.nii.gz", "image has 1 NaN/inf values (first in frame 1)"),
        ("missing", "missing.nii.gz", "file not found"),
        ("broken", "broken.nii.gz", "cannot read NIfTI header"),
        ("gridlab", "grid_seg.nii.gz", "label grid (affine) differs from the image's"),
    ]
    for problem, (case, file, text) in zip(problems, expected, strict=True):
        assert problem.startswith(f"case {case!r}: ") and file in problem and text in problem
    with pytest.raises(DataError, match=r"7 problem\(s\)"):
        validate_datalist(tmp_path / "list.json")
    assert validate_datalist(load_datalist(_datalist(tmp_path, training[:1]))) == []


def test_series_frames_with_different_shape_or_geometry(tmp_path):
    geom = Geometry.default("nifti", (6, 5, 4), 1)
    frames = []
    for i, shape in enumerate([(6, 5, 4), (6, 5, 4), (6, 5, 3)]):
        path = tmp_path / f"f{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), geom.affine), str(path))
        frames.append(path)
    from clstm4d.data import read_image

    with pytest.raises(DataError, match=r"f2.nii.gz: frame shape .* differs from the first"):
        read_image(frames)
    shifted = geom.affine.copy()
    shifted[2, 3] = 3.0
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4), np.float32), shifted), str(frames[2]))
    with pytest.raises(DataError, match=r"f2.nii.gz: frame geometry .* differs from the first"):
        read_image(frames)
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 4, 2), np.float32), geom.affine), str(frames[2]))
    with pytest.raises(DataError, match="a frame of a series must be one volume"):
        read_image(frames)


def test_label_files_must_hold_integers(tmp_path):
    from clstm4d.data import read_label

    nib.save(nib.Nifti1Image(np.full((4, 4, 4, 2), 0.5, np.float32), np.eye(4)),
             str(tmp_path / "x.nii.gz"))
    with pytest.raises(DataError, match="non-integer values"):
        read_label(tmp_path / "x.nii.gz")
    with pytest.raises(DataError, match="unknown file type '.mha'"):
        read_label(tmp_path / "x.mha")
    with pytest.raises(DataError, match="expected 2 spatial axes"):
        read_label(tmp_path / "x.nii.gz", spatial_dims=2)


def test_datalist_from_folder_pairs_files_and_frame_folders(tmp_path):
    from clstm4d.data import datalist_from_folder

    geom = Geometry.default("nifti", (6, 5, 4), 3)
    series = Geometry.default("nrrd-series", (6, 5, 4), 3)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 1, 6, 5, 4)).astype(np.float32)
    label = rng.integers(0, 2, size=(3, 6, 5, 4))
    write_image(image, geom, tmp_path / "imagesTr" / "a.nii.gz")
    write_label(label, geom, tmp_path / "labelsTr" / "a_seg.nii.gz")
    write_image(image, series, tmp_path / "imagesTr" / "b")  # b/frame_000.nrrd ...
    write_label(label, series, tmp_path / "labelsTr" / "b")  # b/frame_000.seg.nrrd ...
    write_image(image, geom, tmp_path / "imagesTs" / "c.nii.gz")
    path = datalist_from_folder(tmp_path, labels={0: "background", 1: "x"}, validation=0,
                                time_interval=0.25)
    dl = load_datalist(path)
    assert [c.name for c in dl.training] == ["a", "b"] and [c.name for c in dl.test] == ["c"]
    for case in dl.training:
        data = load_case(case)
        np.testing.assert_array_equal(data.image, image)
        np.testing.assert_array_equal(data.label, label)
    assert load_case(dl.training[1]).geometry.time_interval == 0.25
    (tmp_path / "imagesTr" / "d.nii.gz").write_bytes(b"")
    (tmp_path / "imagesTr" / "e.tif").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 image\(s\) without a label in labelsTr: \['d', 'e'\]"):
        datalist_from_folder(tmp_path)
    with pytest.raises(DataError, match="expected an 'imagesTr'"):
        datalist_from_folder(tmp_path / "labelsTr")


def test_keys_of_earlier_versions_are_read_under_todays_names(tmp_path):
    """Datalists written before "degraded" was the one word ("corrupted", "corruption",
    "corruption_strength") still load, with their values under today's keys."""
    (tmp_path / "list.json").write_text(json.dumps({"training": [{
        "image": "a.nii.gz", "label": "a_seg.nii.gz", "corrupted": [2, 5],
        "corruption": ["snr", "dropout"], "corruption_strength": [0.5, 1.0]}]}))
    meta = load_datalist(tmp_path / "list.json").training[0].meta
    assert meta == {"degraded": [2, 5], "degradation": ["snr", "dropout"],
                    "degradation_strength": [0.5, 1.0]}
    (tmp_path / "bad.json").write_text(json.dumps({"training": [{
        "image": "a.nii.gz", "label": "a_seg.nii.gz", "corrupted": [-1]}]}))
    with pytest.raises(DataError, match="'degraded' must be a list of frame indices"):
        load_datalist(tmp_path / "bad.json")
