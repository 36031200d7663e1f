"""Synthetic 4D data: deterministic, exact labels, and degraded frames that only memory solves."""

import json

import numpy as np
import pytest

from clstm4d.data import (
    CLASS_NAMES,
    load_case,
    load_datalist,
    make_synthetic_case,
    write_synthetic_dataset,
)


def dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def best_threshold_dice(image, truth):
    """The best Dice any global threshold of this frame reaches (an oracle per-frame rule)."""
    return max(dice(image > q, truth) for q in np.quantile(image, np.linspace(0.0, 0.995, 100)))


@pytest.mark.parametrize("spatial_dims, size", [(2, 48), (3, 24)])
def test_memory_solves_degraded_frames_a_single_frame_does_not(spatial_dims, size):
    """The design claim behind the demo, checked without a network.

    Clean frames: the best intensity threshold segments the foreground well. Degraded frames:
    the best threshold of that frame fails, while copying the previous (clean) frame's mask
    is still good, so remembering earlier frames is what it takes.
    """
    clean, degraded_thr, degraded_copy = [], [], []
    for seed in range(6):
        case = make_synthetic_case(seed, frames=10, size=size, spatial_dims=spatial_dims)
        fg = case.label > 0
        bad = case.meta["degraded"]
        assert bad and 0 not in bad and all(b + 1 not in bad for b in bad)
        for t in range(10):
            score = best_threshold_dice(case.image[t, 0], fg[t])
            if t in bad:
                degraded_thr.append(score)
                degraded_copy.append(dice(fg[t - 1], fg[t]))
            else:
                clean.append(score)
    assert np.mean(clean) > 0.93 and min(clean) > 0.85
    assert np.mean(degraded_thr) < 0.3
    assert np.mean(degraded_copy) > 0.85 and min(degraded_copy) > 0.75


def test_deterministic_and_seed_dependent():
    a = make_synthetic_case(3, frames=6, size=32)
    b = make_synthetic_case(3, frames=6, size=32)
    c = make_synthetic_case(4, frames=6, size=32)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.meta == b.meta
    assert not np.array_equal(a.label, c.label)


def test_objects_move_smoothly_and_labels_are_exact_on_clean_frames():
    case = make_synthetic_case(5, frames=12, size=64, noise=0.0, drift=0.0,
                               degraded=[4], degradation=["dropout"])
    assert set(np.unique(case.label)) == {0, 1, 2} and case.meta["degraded"] == [4]
    for t in range(12):
        for k in (1, 2):
            assert (case.label[t] == k).sum() > 20
    # without noise, every clean frame's image is a function of its label (plus smooth fields)
    for t in (0, 5, 11):
        img, lab = case.image[t, 0], case.label[t]
        assert img[lab == 1].min() > img[lab == 0].max() - 0.1
    # the dropped-out frame carries no object signal: its image equals 0.7x background
    assert np.corrcoef(case.image[4, 0][case.label[4] > 0],
                       case.image[3, 0][case.label[4] > 0])[0, 1] < 0.9
    centres = [np.argwhere(case.label[t] == 1).mean(0) for t in range(12)]
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    assert steps.max() < 2.0  # pixels per frame


def test_options_are_validated():
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3, got 4"):
        make_synthetic_case(0, spatial_dims=4)
    with pytest.raises(ValueError, match="degradation: unknown degradation 'blur'"):
        make_synthetic_case(0, degradation=["blur"])
    with pytest.raises(ValueError, match="degradation must name at least one"):
        make_synthetic_case(0, degradation=[])
    with pytest.raises(ValueError, match=r"strength of 'snr' must be in \(0, 1\], got 2"):
        make_synthetic_case(0, degradation={"snr": 2})
    with pytest.raises(ValueError, match="size must be"):
        make_synthetic_case(0, size=8)
    with pytest.raises(ValueError, match="degraded: at most 3"):
        make_synthetic_case(0, frames=6, degraded=4)


def test_1d_variant():
    case = make_synthetic_case(0, frames=5, size=64, spatial_dims=1)
    assert case.image.shape == (5, 1, 64) and set(np.unique(case.label)) <= {0, 1, 2}


@pytest.mark.parametrize("fmt", ["nifti", "nrrd-series", "tiff"])
def test_write_synthetic_dataset_round_trip(tmp_path, fmt):
    pytest.importorskip({"nifti": "nibabel", "nrrd-series": "nrrd", "tiff": "tifffile"}[fmt])
    path = write_synthetic_dataset(tmp_path, cases=3, frames=5, size=24, spatial_dims=3,
                                   seed=7, format=fmt, test=1)
    doc = json.loads(path.read_text())
    assert doc["labels"] == {str(k): v for k, v in CLASS_NAMES.items()}
    assert doc["spatial_dims"] == 3
    dl = load_datalist(path)
    assert [len(dl.training), len(dl.validation), len(dl.test)] == [2, 1, 1]
    for i, case in enumerate(dl.cases()):
        ref = make_synthetic_case((7, i), 5, 24, 3)
        loaded = load_case(case)
        assert case.meta["degraded"] == ref.meta["degraded"]
        np.testing.assert_array_equal(loaded.label, ref.label)
        np.testing.assert_allclose(loaded.image, ref.image, rtol=1e-6)
        assert loaded.geometry.time_interval == pytest.approx(0.05)


def test_synth_arguments_map_onto_write_synthetic_dataset(tmp_path):
    pytest.importorskip("nibabel")
    from clstm4d.cli import main

    assert main(["synth", "--out", str(tmp_path), "--cases", "2", "--frames", "4", "--size",
                 "20", "--dims", "2", "--seed", "1", "--validation", "0", "--degraded", "2"]) == 0
    dl = load_datalist(tmp_path / "datalist.json")
    assert len(dl.training) == 2 and not dl.validation
    case = load_case(dl.training[0])
    assert case.image.shape == (4, 1, 20, 20) and len(case.meta["degraded"]) == 2


def test_dataset_written_to_a_relative_folder_loads_from_anywhere(tmp_path, monkeypatch):
    """`clstm4d synth --out data` (a relative path): the datalist stores paths relative to
    its own folder, so it loads from another working directory (was: paths relative to the
    working directory, doubled on loading)."""
    pytest.importorskip("nibabel")
    monkeypatch.chdir(tmp_path)
    path = write_synthetic_dataset("out/data", cases=2, frames=3, size=16, spatial_dims=2,
                                   seed=1, test=1)
    doc = json.loads(path.read_text())
    assert doc["training"][0]["image"].startswith("imagesTr/"), doc["training"][0]
    monkeypatch.chdir(tmp_path / "out")
    case = load_datalist("data/datalist.json").training[0]
    assert load_case(case).image.shape == (3, 1, 16, 16)


def test_anisotropic_spacing_samples_the_same_scene_more_coarsely():
    """Spacing 3 along the last axis: voxel i lies at 3 i + 1 of the isotropic grid, and the
    labels there are the isotropic case's (same scene, same draws)."""
    iso = make_synthetic_case(seed=4, frames=5, size=24, spatial_dims=3)
    aniso = make_synthetic_case(seed=4, frames=5, size=24, spatial_dims=3, spacing=(1, 1, 3))
    assert aniso.image.shape == (5, 1, 24, 24, 8)
    assert aniso.geometry.spacing == (1.0, 1.0, 3.0) and aniso.geometry.origin == (0, 0, 1.0)
    np.testing.assert_array_equal(aniso.label, iso.label[..., 1::3])
    assert aniso.meta == iso.meta
    with pytest.raises(ValueError, match="at least 4"):
        make_synthetic_case(size=16, spatial_dims=3, spacing=(1, 1, 5))
