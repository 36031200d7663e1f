"""predict on DICOM and NumPy inputs: DICOM in -> DICOM-SEG out read back with highdicom equals
the NIfTI output; .npy/.npz (axes and spacing by option or sidecar) and predict_array(spacing=)
equal the NIfTI path; bad inputs end in one line, exit 2, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clstm4d.cli import main
from clstm4d.data import Geometry, read_label, to_grey, write_image
from clstm4d.engine.inference.predictor import Predictor
from clstm4d.engine.run.checkpoint import save_checkpoint
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
from clstm4d.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from dicom_toys import toy_image, write_series  # noqa: E402

NAMES = {0: "background", 1: "left ventricle", 2: "myocardium"}


def _checkpoint(folder, spatial_dims, spacing=None):
    torch.manual_seed(1)
    model = create_model("tiny", spatial_dims=spatial_dims, in_channels=1, out_channels=3,
                         channels=(4, 8)).eval()
    cfg = Config.from_dict({"data": {"normalize": "zscore", "spacing": spacing}})
    run = SavedRun(cfg, ModelSpec.of(model), NAMES)
    return save_checkpoint(folder, model, step=1, config=run.to_dict())


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    return {2: _checkpoint(root / "2d", 2), 3: _checkpoint(root / "3d", 3),
            "spaced": _checkpoint(root / "spaced", 2, spacing=[1.0, 1.0])}


def _one_error_line(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("t, z", [(4, 1), (3, 3)])
def test_dicom_seg_read_back_equals_the_nifti_output(ck, tmp_path, t, z):
    pydicom = pytest.importorskip("pydicom")
    hd = pytest.importorskip("highdicom")
    image = toy_image(t=t, z=z, rows=12, cols=10).astype(np.float32)
    image = (np.sin(image / 7.0) * 500 + 600).astype(np.uint16)  # some contrast for the net
    files = write_series(tmp_path / "dcm", image)  # (t, z) order
    dims = 2 if z == 1 else 3
    args = ["predict", "--checkpoint", str(ck[dims]), "--input", str(tmp_path / "dcm")]
    assert main([*args, "--output", str(tmp_path / "seg.dcm")]) == 0
    assert main([*args, "--output", str(tmp_path / "seg.nii.gz")]) == 0
    labels, g = read_label(tmp_path / "seg.nii.gz", dims)  # (t, cols, rows[, z])
    assert len(np.unique(labels)) >= 2  # the comparison below is not between empty maps
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    # the NIfTI grid lies over the DICOM positions: voxel (0, 0, k) is slice k, in RAS
    for k in range(z):
        x, y, zz = sources[k].ImagePositionPatient
        np.testing.assert_allclose(g.affine @ [0, 0, k, 1], [-x, -y, zz, 1], atol=1e-4)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left ventricle", "myocardium"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID
                  for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}
    time_of = {s.SOPInstanceUID: int(s.TemporalPositionIdentifier) for s in sources}
    for item in seg.PerFrameFunctionalGroupsSequence:  # every frame at its source's time
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert item.FrameContentSequence[0].TemporalPositionIndex == time_of[ref]
    nifti = labels if dims == 3 else labels[..., None]
    for i in range(t):
        sops = [s.SOPInstanceUID for s in sources[i * z:(i + 1) * z]]
        back = seg.get_pixels_by_source_instance(sops, combine_segments=True)  # (z, rows, cols)
        np.testing.assert_array_equal(back, np.transpose(nifti[i], (2, 1, 0)))


def test_seg_for_other_inputs_is_refused_in_one_line(ck, tmp_path, capsys):
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    g = Geometry.default("nifti", (12, 10), 3)
    src = write_image(np.ones((3, 1, 12, 10), np.float32), g, tmp_path / "scan.nii.gz")[0]
    out = tmp_path / "seg.dcm"
    rc = main(["predict", "--checkpoint", str(ck[2]), "--input", str(src), "--output", str(out)])
    assert "references its source DICOM images, and this input is nifti" in _one_error_line(
        capsys, rc)
    cine = get_testdata_file("examples_ybr_color.dcm", download=False)
    rc = main(["predict", "--checkpoint", str(ck[2]), "--input", cine, "--output", str(out),
               "--grey"])
    assert "needs a Frame of Reference UID" in _one_error_line(capsys, rc)
    rc = main(["predict", "--checkpoint", str(ck[2]), "--input", cine, "--output",
               str(tmp_path / "seg.tif")])
    assert "written as NIfTI (.nii.gz) or" in _one_error_line(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_bad_dicom_folders_are_one_line(ck, tmp_path, capsys):
    pytest.importorskip("pydicom")
    write_series(tmp_path / "two", toy_image(t=2, z=1), series="1.2.3.4")
    write_series(tmp_path / "two", toy_image(t=2, z=1), series="1.2.3.5", prefix="B")
    write_series(tmp_path / "untimed", toy_image(t=2, z=1), temporal=())
    write_series(tmp_path / "sizes", toy_image(t=2, z=1), series="9.9")
    write_series(tmp_path / "sizes", toy_image(t=1, z=1, rows=8), series="9.9", prefix="B")
    out = tmp_path / "out" / "seg.dcm"
    for folder, expected in (("two", "2 series in one input: 1.2.3.4"),
                             ("untimed", "cannot order 2 frames in time"),
                             ("sizes", "frames of different sizes: 8x10")):
        rc = main(["predict", "--checkpoint", str(ck[2]), "--input", str(tmp_path / folder),
                   "--output", str(out)])
        assert expected in _one_error_line(capsys, rc)
    assert not (tmp_path / "out").exists()


def test_numpy_inputs_equal_the_nifti_path(ck, tmp_path):
    """The same frames as NIfTI (spacing in the header), as .npy with a sidecar, as .npz
    with --axes/--spacing, and through predict_array(spacing=): equal labels. The checkpoint
    was trained at 1 mm, so a spacing that did not arrive would change the result."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (4, 1, 15, 11)).astype(np.float32)  # (t, c, a, b)
    spacing = (1.5, 0.7)
    g = Geometry.default("nifti", (15, 11), 4, spacing=spacing, time_interval=0.04)
    write_image(image, g, tmp_path / "scan.nii.gz")
    np.save(tmp_path / "cine.npy", image[:, 0])  # (t, a, b)
    (tmp_path / "cine.json").write_text(json.dumps({"axes": "TYX", "spacing": list(spacing)}))
    np.savez(tmp_path / "cine2.npz", image=np.moveaxis(image, 1, -1))  # (t, a, b, c)
    run = ["predict", "--checkpoint", str(ck["spaced"]), "--input"]
    assert main([*run, str(tmp_path / "scan.nii.gz"), "--output", str(tmp_path / "a.nii.gz")]) == 0
    assert main([*run, str(tmp_path / "cine.npy"), "--output", str(tmp_path / "b.npy")]) == 0
    assert main([*run, str(tmp_path / "cine2.npz"), "--output", str(tmp_path / "c.npz"),
                 "--axes", "TYXC", "--spacing", "1.5", "0.7"]) == 0
    assert main([*run, str(tmp_path / "cine2.npz"), "--output", str(tmp_path / "d.npy"),
                 "--axes", "TYXC"]) == 0  # no spacing: taken to be the model's 1 mm
    reference, _ = read_label(tmp_path / "a.nii.gz", 2)
    assert len(np.unique(reference)) >= 2
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), reference)
    np.testing.assert_array_equal(np.load(tmp_path / "c.npz")["labels"], reference)
    assert not np.array_equal(np.load(tmp_path / "d.npy"), reference)
    predictor = Predictor.from_checkpoint(ck["spaced"], device="cpu")
    np.testing.assert_array_equal(predictor.predict_array(image, spacing=spacing), reference)


def test_grey_on_colour_and_bad_numpy_options(ck, tmp_path, capsys):
    rgb = np.random.default_rng(1).uniform(0, 255, (3, 3, 12, 10)).astype(np.float32)
    np.save(tmp_path / "rgb.npy", rgb)
    run = ["predict", "--checkpoint", str(ck[2]), "--input", str(tmp_path / "rgb.npy")]
    rc = main([*run, "--output", str(tmp_path / "x.npy")])
    assert "expects 1 (in_channels); for a colour cine" in _one_error_line(capsys, rc)
    assert main([*run, "--output", str(tmp_path / "g.npy"), "--grey"]) == 0
    predictor = Predictor.from_checkpoint(ck[2], device="cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"),
                                  predictor.predict_array(to_grey(rgb)))
    for extra, expected in ((["--axes", "TQYX"], "axes 'TQYX' do not fit"),
                            (["--spacing", "1", "2", "3"], "expected 2 positive numbers")):
        rc = main([*run, "--output", str(tmp_path / "y.npy"), *extra])
        assert expected in _one_error_line(capsys, rc)
    g = Geometry.default("nifti", (12, 10), 3)
    src = write_image(np.ones((3, 1, 12, 10), np.float32), g, tmp_path / "scan.nii.gz")[0]
    rc = main(["predict", "--checkpoint", str(ck[2]), "--input", str(src), "--output",
               str(tmp_path / "z.nii.gz"), "--axes", "TYX"])
    assert "apply to NumPy (.npy/.npz) inputs only" in _one_error_line(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "rgb.npy", "scan.nii.gz"]


def test_missing_pydicom_or_highdicom_is_one_line_with_the_install_command(
        ck, tmp_path, capsys, monkeypatch):
    pytest.importorskip("pydicom")
    write_series(tmp_path / "dcm", toy_image(t=2, z=1))
    run = ["predict", "--checkpoint", str(ck[2]), "--input", str(tmp_path / "dcm")]
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom raises ImportError
    rc = main([*run, "--output", str(tmp_path / "seg.dcm")])
    assert "needs highdicom, which is not installed: pip install 'clstm4d[dicom]'" in (
        _one_error_line(capsys, rc))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    rc = main([*run, "--output", str(tmp_path / "seg.nii.gz")])
    assert "needs pydicom, which is not installed" in _one_error_line(capsys, rc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcm"]
