"""Sparse annotations in the data layer: labelled_frames, label dicts, the "ignore" class,
the ACDC layout, and how PatchDataset samples windows and crops from annotated frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clstm4d.data import (
    CaseData,
    DataError,
    Geometry,
    PatchDataset,
    datalist_from_folder,
    load_case,
    load_datalist,
    save_datalist,
    validate_datalist,
    write_image,
    write_label,
)

nib = pytest.importorskip("nibabel")

LABELS = {"0": "background", "1": "a", "2": "b"}


def _sequence(t=5, shape=(6, 5, 4), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(t, 1, *shape)).astype(np.float32)
    label = rng.integers(0, 3, size=(t, *shape))
    return image, label


def _write(folder, name, image, label, frame_files=(), spacing=None):
    """4D image + 4D label, and 2D/3D label files for the frames in ``frame_files``."""
    shape = image.shape[2:]
    geom = Geometry.default("nifti", shape, image.shape[0], spacing=spacing)
    write_image(image, geom, folder / f"{name}.nii.gz")
    write_label(label, geom, folder / f"{name}_seg.nii.gz")
    one = Geometry.default("nifti", shape, 1, spacing=spacing)
    for f in frame_files:
        write_label(label[f : f + 1], one, folder / f"{name}_f{f}.nii.gz")


def _datalist(folder, training, labels=LABELS, **top):
    doc = {"labels": labels, "training": training, **top}
    (folder / "list.json").write_text(json.dumps(doc))
    return folder / "list.json"


@pytest.mark.parametrize("shape, dims", [((6, 5, 4), 3), ((7, 6), 2)])
def test_label_dict_of_frame_files_loads_as_a_sparse_sequence(tmp_path, shape, dims):
    image, label = _sequence(t=5, shape=shape)
    _write(tmp_path, "p1", image, label, frame_files=(0, 3))
    path = _datalist(tmp_path, [{"image": "p1.nii.gz",
                                 "label": {"3": "p1_f3.nii.gz", "0": "p1_f0.nii.gz"}}],
                     spatial_dims=dims)
    case = load_datalist(path).training[0]
    assert case.labelled_frames == [0, 3] and sorted(case.label) == [0, 3]
    data = load_case(case)
    np.testing.assert_array_equal(data.image, image)
    assert data.labelled.tolist() == [True, False, False, True, False]
    np.testing.assert_array_equal(data.label[[0, 3]], label[[0, 3]])
    assert (data.label[[1, 2, 4]] == 0).all()  # frames without annotation hold nothing


def test_labelled_frames_with_a_4d_label_mms_style(tmp_path):
    image, label = _sequence(t=6)
    label[[1, 2, 4, 5]] = 9  # unannotated frames may hold anything, even undeclared values
    _write(tmp_path, "p1", image, label)
    path = _datalist(tmp_path, [{"image": "p1.nii.gz", "label": "p1_seg.nii.gz",
                                 "labelled_frames": [3, 0]}])
    dl = load_datalist(path)
    assert dl.training[0].labelled_frames == [0, 3] and "labelled_frames" not in \
        dl.training[0].meta
    data = load_case(dl.training[0])
    assert data.labelled.tolist() == [True, False, False, True, False, False]
    np.testing.assert_array_equal(data.label[[0, 3]], label[[0, 3]])
    assert (data.label[~data.labelled] == 0).all()
    assert validate_datalist(dl) == []
    # a fully labelled case: all frames annotated, label as stored
    _write(tmp_path, "p2", image, label[[0, 0, 0, 3, 3, 3]])
    full = load_case(load_datalist(_datalist(tmp_path, [
        {"image": "p2.nii.gz", "label": "p2_seg.nii.gz"}])).training[0])
    assert full.labelled.all()


def test_bad_annotation_keys_are_reported_together_naming_case_and_key(tmp_path):
    entries = [
        {"name": "empty", "image": "x.nii.gz", "label": "x_seg.nii.gz", "labelled_frames": []},
        {"name": "dup", "image": "x.nii.gz", "label": "x_seg.nii.gz",
         "labelled_frames": [0, 4, 4]},
        {"name": "neg", "image": "x.nii.gz", "label": "x_seg.nii.gz", "labelled_frames": [-1]},
        {"name": "keys", "image": "x.nii.gz", "label": {"ED": "x_f0.nii.gz"}},
        {"name": "disagree", "image": "x.nii.gz", "label": {"0": "a.nii.gz", "9": "b.nii.gz"},
         "labelled_frames": [0, 10]},
        {"name": "ok", "image": "x.nii.gz", "label": {"0": "a.nii.gz", "9": "b.nii.gz"},
         "labelled_frames": [9, 0]},
    ]
    path = _datalist(tmp_path, entries, labels={"0": "background", "1": "ignore", "2": "a"})
    with pytest.raises(DataError) as info:
        load_datalist(path)
    msg = str(info.value)
    assert "6 problem(s)" in msg
    for expected in [
        "training[0] (case 'empty'): key 'labelled_frames': expected a non-empty list of "
        "distinct frame indices (integers >= 0), got [] (empty)",
        "training[1] (case 'dup'): key 'labelled_frames'", "(duplicates [4])",
        "training[2] (case 'neg'): key 'labelled_frames'", "(-1 is not a frame index)",
        "training[3] (case 'keys'): key 'label': the keys of a label dict must be frame "
        "indices ('0', '11', ...), got ['ED']",
        "training[4] (case 'disagree'): key 'labelled_frames' [0, 10] disagrees with the "
        "frames of the 'label' dict [0, 9]",
        "'labels': the 'ignore' class must have the highest value (nnU-Net's convention): "
        "expected a value above 2, got 1",
    ]:
        assert expected in msg
    assert "case 'ok'" not in msg


def test_validate_lists_json_and_file_problems_together(tmp_path):
    image, label = _sequence(t=4)
    _write(tmp_path, "p1", image, label, frame_files=(0, 2))
    wrong = Geometry.default("nifti", (6, 5, 3), 1)
    write_label(label[:1, :, :, :3], wrong, tmp_path / "small.nii.gz")
    entries = [
        {"name": "past", "image": "p1.nii.gz", "label": {"0": "p1_f0.nii.gz",
                                                         "4": "p1_f2.nii.gz"}},
        {"name": "pastlf", "image": "p1.nii.gz", "label": "p1_seg.nii.gz",
         "labelled_frames": [1, 7]},
        {"name": "grid", "image": "p1.nii.gz", "label": {"2": "small.nii.gz"}},
        {"name": "many", "image": "p1.nii.gz", "label": {"1": "p1_seg.nii.gz"}},
        {"name": "dup", "image": "p1.nii.gz", "label": "p1_seg.nii.gz",
         "labelled_frames": [1, 1]},
        {"name": "good", "image": "p1.nii.gz", "label": {"0": "p1_f0.nii.gz",
                                                         "2": "p1_f2.nii.gz"}},
    ]
    path = _datalist(tmp_path, entries)
    problems = validate_datalist(path, strict=False)
    assert len(problems) == 5, problems
    expected = [
        "(case 'dup'): key 'labelled_frames'",
        "case 'past': key 'label' [0, 4]: expected frame indices 0-3 (the image has 4 "
        "frames), got [4]",
        "case 'pastlf': key 'labelled_frames' [1, 7]: expected frame indices 0-3 (the image "
        "has 4 frames), got [7]",
        "case 'grid': ", "small.nii.gz: label of frame 2 spatial shape (6, 5, 3) differs "
        "from the image's (6, 5, 4)",
        "case 'many': ", "p1_seg.nii.gz: label of frame 1: expected one 2D/3D label frame, "
        "the file holds 4 frames",
    ]
    joined = "\n".join(problems)
    for text in expected:
        assert text in joined
    with pytest.raises(DataError, match=r"5 problem\(s\)"):
        validate_datalist(path)


def test_cli_reports_a_bad_annotation_in_one_line(tmp_path, capsys):
    from clstm4d.cli import main

    path = _datalist(tmp_path, [{"name": "p9", "image": "x.nii.gz", "label": "x_seg.nii.gz",
                                 "labelled_frames": [2, 2]}])
    assert main(["train", "--datalist", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "case 'p9'" in err and "'labelled_frames'" in err and "duplicates [2]" in err


def test_ignore_class_is_not_counted_as_a_predicted_class(tmp_path):
    dl = load_datalist(_datalist(tmp_path, [], labels={"0": "bg", "1": "cell",
                                                       "2": "Ignore"}))
    assert dl.ignore_index == 2 and dl.num_classes == 2
    plain = load_datalist(_datalist(tmp_path, [], labels=LABELS))
    assert plain.ignore_index is None and plain.num_classes == 3


def test_save_datalist_round_trips_label_dicts(tmp_path):
    image, label = _sequence(t=3)
    _write(tmp_path / "d", "p1", image, label, frame_files=(1,))
    path = save_datalist(tmp_path / "d" / "list.json", labels={0: "bg", 1: "a", 2: "b"},
                         training=[{"image": tmp_path / "d" / "p1.nii.gz",
                                    "label": {1: tmp_path / "d" / "p1_f1.nii.gz"}}])
    raw = json.loads(path.read_text())
    assert raw["training"][0]["label"] == {"1": "p1_f1.nii.gz"}  # relative to the JSON
    data = load_case(load_datalist(path).training[0])
    assert data.labelled.tolist() == [False, True, False]


# ------------------------------------------------------------------------------ ACDC layout

def _write_acdc_patient(folder, name, t=6, ed=1, es=4, gt=True, shape=(10, 9, 3), seed=0):
    """A synthetic patient in ACDC's layout (no real ACDC data): 4D image, ED/ES frames and
    their ground truth, Info.cfg with 1-based frames. Returns (image, full label)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(t, 1, *shape)).astype(np.float32)
    label = rng.integers(0, 4, size=(t, *shape))
    p = folder / name
    geom = Geometry.default("nifti", shape, t, spacing=(1.5, 1.5, 10.0), time_interval=0.03)
    write_image(image, geom, p / f"{name}_4d.nii.gz")
    one = Geometry.default("nifti", shape, 1, spacing=(1.5, 1.5, 10.0))
    for frame in (ed, es):
        write_image(image[frame - 1 : frame], one, p / f"{name}_frame{frame:02d}.nii.gz")
        if gt:
            write_label(label[frame - 1 : frame], one, p / f"{name}_frame{frame:02d}_gt.nii.gz")
    (p / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\n"
                                f"NbFrame: {t}\nWeight: 80.0\n")
    return image, label


def test_acdc_layout_round_trip(tmp_path):
    root = tmp_path / "ACDC"
    truth = {}
    for i, (ed, es) in enumerate([(1, 4), (1, 5), (2, 6)]):
        truth[f"patient00{i + 1}"] = (ed, es, *_write_acdc_patient(
            root / "training", f"patient00{i + 1}", ed=ed, es=es, seed=i))
    _write_acdc_patient(root / "testing", "patient101", gt=False, seed=9)
    path = datalist_from_folder(root, layout="acdc", validation=0.34)
    dl = load_datalist(path)
    assert sorted(c.name for c in dl.training + dl.validation) == sorted(truth)
    assert len(dl.validation) == 1 and [c.name for c in dl.test] == ["patient101"]
    assert dl.labels[3] == "left ventricle" and dl.spatial_dims == 3 and dl.num_classes == 4
    raw = json.loads(path.read_text())
    entry = next(e for e in raw["training"] + raw["validation"] if e["name"] == "patient003")
    assert entry["label"] == {"1": "training/patient003/patient003_frame02_gt.nii.gz",
                              "5": "training/patient003/patient003_frame06_gt.nii.gz"}
    assert entry["phases"] == {"ED": 1, "ES": 5}
    for case in dl.training + dl.validation:
        ed, es, image, label = truth[case.name]
        data = load_case(case)
        np.testing.assert_array_equal(data.image, image)
        assert np.flatnonzero(data.labelled).tolist() == [ed - 1, es - 1]
        np.testing.assert_array_equal(data.label[data.labelled], label[[ed - 1, es - 1]])
        assert (data.label[~data.labelled] == 0).all()
        assert data.geometry.spacing == pytest.approx((1.5, 1.5, 10.0))
    assert load_case(dl.test[0]).label is None
    # a folder of patientNNN folders works the same
    flat = load_datalist(datalist_from_folder(root / "training", tmp_path / "flat.json",
                                              layout="acdc", validation=0))
    assert [c.name for c in flat.training] == ["patient001", "patient002", "patient003"]


def test_acdc_layout_bad_patients_are_listed(tmp_path):
    _write_acdc_patient(tmp_path, "patient001")
    _write_acdc_patient(tmp_path, "patient002")
    (tmp_path / "patient002" / "patient002_frame04_gt.nii.gz").unlink()
    _write_acdc_patient(tmp_path, "patient003")
    (tmp_path / "patient003" / "Info.cfg").write_text("ED: 1\nES: \n")
    (tmp_path / "patient004").mkdir()
    with pytest.raises(DataError) as info:
        datalist_from_folder(tmp_path, layout="acdc")
    msg = str(info.value)
    assert "3 bad patient folder(s)" in msg
    assert "patient002: " in msg and "['patient002_frame04_gt.nii.gz'] missing" in msg
    assert "patient003: " in msg and "key 'ES': expected a 1-based frame number, got " \
        "'nothing'" in msg
    assert "patient004: " in msg and "missing the 4D sequence patient004_4d.nii.gz" in msg
    with pytest.raises(DataError, match="expected the ACDC layout"):
        datalist_from_folder(tmp_path / "patient001", layout="acdc")
    with pytest.raises(ValueError, match="layout must be one of"):
        datalist_from_folder(tmp_path, layout="nnunet")


# ------------------------------------------------------------------------------ sampling

def _sparse_case(t=12, shape=(20, 20), labelled=(0, 7), name="sparse"):
    """Foreground in annotated frames only at (15, 15); unannotated frames hold a decoy
    foreground at (3, 3) (what an unannotated frame might contain)."""
    label = np.zeros((t, *shape), np.int64)
    mask = np.zeros(t, bool)
    mask[list(labelled)] = True
    label[mask, 15, 15] = 1
    label[~mask, 3, 3] = 1
    grids = np.indices((t, *shape))
    image = (10000 * grids[0] + 100 * grids[1] + grids[2])[:, None].astype(np.float32)
    return CaseData(image, label, Geometry.default("nifti", shape, t), {}, name, mask)


def test_every_window_holds_an_annotated_frame_and_starts_are_uniform_among_those():
    ds = PatchDataset([_sparse_case()], window=4, roi=6, normalize=None, samples_per_case=50)
    starts = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            s = item["start"]
            starts.add(s)
            assert item["labelled"].tolist() == [s + k in (0, 7) for k in range(4)]
            assert item["labelled"].any()
    # windows [s, s+4) of 12 frames that contain frame 0 or 7; all of them are drawn
    assert starts == {0, 4, 5, 6, 7}


def test_foreground_crops_come_from_annotated_frames_only():
    ds = PatchDataset([_sparse_case()], window=4, roi=5, normalize=None,
                      foreground_prob=1.0, samples_per_case=40)
    for i in range(len(ds)):
        img = ds[i]["image"][0, 0]
        y, x = (img % 10000) // 100, img % 100
        centre = (int(y[2, 2]), int(x[2, 2]))
        assert centre == (15, 15)  # never the decoy at (3, 3) of the unannotated frames


def test_ignore_voxels_are_never_crop_centres():
    case = _sparse_case(labelled=range(12))
    case.label[:, 3, 3] = 2  # the decoy becomes the ignore class
    ds = PatchDataset([case], window=3, roi=5, normalize=None, foreground_prob=1.0,
                      samples_per_case=40, ignore_index=2)
    for i in range(len(ds)):
        img = ds[i]["image"][0, 0]
        assert (int((img[2, 2] % 10000) // 100), int(img[2, 2] % 100)) == (15, 15)


def test_padding_frames_are_never_annotated_and_empty_cases_are_refused():
    ds = PatchDataset([_sparse_case(t=3, labelled=(1,))], window=5, roi=4, normalize=None)
    item = ds[0]
    assert item["length"] == 3 and item["labelled"].tolist() == [False, True, False, False,
                                                                 False]
    batch = torch.utils.data.default_collate([ds[0], ds[0]])
    assert batch["labelled"].shape == (2, 5) and batch["labelled"].dtype == torch.bool
    none = _sparse_case(t=3, labelled=(), name="blank")
    with pytest.raises(DataError, match="case 'blank': no annotated frame"):
        PatchDataset([none], window=5)[0]


def test_unannotated_label_content_cannot_change_an_item():
    a = _sparse_case()
    b = _sparse_case()
    rng = np.random.default_rng(0)
    b.label[~b.labelled] = rng.integers(0, 3, size=b.label[~b.labelled].shape)
    kw = dict(window=4, roi=6, normalize=None, foreground_prob=0.7, samples_per_case=30,
              augment=True, degrade={"prob": 0.5, "kinds": ("occlusion", "partial")})
    da, db = PatchDataset([a], **kw), PatchDataset([b], **kw)
    for i in range(len(da)):
        x, y = da[i], db[i]
        assert x["start"] == y["start"] and torch.equal(x["image"], y["image"])
        assert torch.equal(x["labelled"], y["labelled"])
        assert torch.equal(x["label"][x["labelled"]], y["label"][y["labelled"]])
