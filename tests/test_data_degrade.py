"""Degradation families: deterministic given a seed, inputs and labels untouched, each one
does what it says, and the synthetic data and the training augmentation share them."""


import numpy as np
import pytest

from clstm4d.data import (
    CUE_CLASS_NAMES,
    Degrade,
    PatchDataset,
    load_case,
    load_datalist,
    make_cue_track_case,
    make_synthetic_case,
)
from clstm4d.data.degrade import DEGRADATIONS, FULL, PARTIAL, degrade, noise_sigma


def frame_and_label(spatial_dims=2, size=32, seed=0):
    case = make_synthetic_case(seed, frames=2, size=size, spatial_dims=spatial_dims,
                               degraded=[])
    return case.image[1], case.label[1]  # (1, *s), (*s)


@pytest.mark.parametrize("kind", DEGRADATIONS)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_every_family_is_deterministic_and_leaves_its_inputs_alone(kind, spatial_dims):
    x, label = frame_and_label(spatial_dims, size={1: 64, 2: 32, 3: 20}[spatial_dims])
    x0, label0 = x.copy(), label.copy()
    a = degrade(x, kind, 0.5, np.random.default_rng(3), label=label)
    b = degrade(x, kind, 0.5, np.random.default_rng(3), label=label)
    c = degrade(x, kind, 0.5, np.random.default_rng(4), label=label)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32 and np.isfinite(a).all()
    assert not np.allclose(a, x, atol=1e-3)  # it degrades
    if kind not in ("defocus", "dropout"):  # the deterministic ones draw nothing that matters
        assert not np.array_equal(a, c)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(label, label0)


@pytest.mark.parametrize("kind", ["snr", "defocus", "motion", "ghosting", "bias", "dropout"])
def test_stronger_degrades_more(kind):
    x, label = frame_and_label()
    dist = [np.abs(degrade(x, kind, s, np.random.default_rng(0), label=label) - x).mean()
            for s in (0.2, 0.5, 1.0)]
    assert dist[0] < dist[1] < dist[2], dist


def test_each_family_does_what_it_says():
    x, label = frame_and_label(size=48)
    fg, bg = label > 0, label == 0

    def contrast(y):
        return y[0][fg].mean() - y[0][bg].mean()

    rng = np.random.default_rng(0)
    # reduced SNR: less contrast, more noise
    y = degrade(x, "snr", 0.5, rng)
    assert contrast(y) < 0.8 * contrast(x) and noise_sigma(y)[0] > 2 * noise_sigma(x)[0]
    # defocus: noise smoothed away, edges spread out (fewer voxels near the extremes)
    y = degrade(x, "defocus", 0.5, rng)
    assert noise_sigma(y)[0] < 0.5 * noise_sigma(x)[0]
    assert np.ptp(y) < np.ptp(x)
    # full dropout onto a given background, no noise: exactly the background
    np.testing.assert_array_equal(degrade(x, "dropout", 1.0, rng, background=0.3, noise=0),
                                  np.full_like(x, 0.3))
    # full occlusion: one box of constant (noise-free) object-like intensity over all objects
    y = degrade(x, "occlusion", 1.0, rng, label=label, level=1.0, noise=0)
    assert np.unique(y[0][fg]).size == 1 and 0.85 <= y[0][fg][0] <= 1.05
    # partial occlusion: part of the foreground hidden, part still as it was
    y = degrade(x, "partial_occlusion", 0.5, rng, label=label, level=2.0, noise=0)
    hidden = (y[0] != x[0]) & fg
    assert 0 < hidden.sum() < fg.sum() and np.allclose(y[0][hidden], y[0][hidden][0])
    # ghosting adds a shifted copy: the image correlates with a wrapped copy of itself
    y = degrade(x, "ghosting", 1.0, rng)
    assert not np.allclose(y, x) and y.mean() == pytest.approx(x.mean(), abs=0.05)


def test_bad_arguments_are_named():
    x, label = frame_and_label()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind must be one of"):
        degrade(x, "blur", 0.5, rng)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\], got 0 for 'snr'"):
        degrade(x, "snr", 0, rng)
    with pytest.raises(ValueError, match="label shape"):
        degrade(x, "occlusion", 1.0, rng, label=label[:-1])


def test_synthetic_degradations_leave_labels_as_they_are():
    """The same seed gives the same objects whatever degrades the frames; frames chosen for
    one family carry it in meta, with its strength."""
    ref = make_synthetic_case(2, frames=10, size=32, degraded=[3, 6])
    for kind in DEGRADATIONS:
        case = make_synthetic_case(2, frames=10, size=32, degraded=[3, 6],
                                   degradation={kind: 0.4 if kind in PARTIAL else 1.0})
        np.testing.assert_array_equal(case.label, ref.label)
        assert case.meta["degradation"] == [kind, kind]
        assert case.meta["degradation_strength"] == [0.4 if kind in PARTIAL else 1.0] * 2
    mixed = make_synthetic_case(2, frames=40, size=32, degraded=20, degradation="partial")
    assert set(mixed.meta["degradation"]) == set(PARTIAL)
    assert set(mixed.meta["degradation_strength"]) == {0.5}


def test_degrade_augmentation_changes_inputs_only():
    case = make_synthetic_case(1, frames=8, size=32, degraded=[])
    image, label = case.image.copy(), case.label.copy()
    aug = Degrade(prob=0.5, strength=(0.3, 0.7))
    out, degraded = aug(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(image, case.image)  # the input array is not modified
    np.testing.assert_array_equal(label, case.label)
    assert out.shape == image.shape and out.dtype == np.float32
    assert degraded.dtype == bool and degraded.shape == (8,) and not degraded[0]
    assert degraded.any() and not degraded.all()
    changed = ~np.isclose(out, image).all(axis=tuple(range(1, image.ndim)))
    np.testing.assert_array_equal(changed, degraded)  # exactly the frames it says
    again, _ = aug(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)
    # first=True may degrade frame 0 too; prob=1 degrades every allowed frame
    _, every = Degrade(prob=1.0, first=True)(image, label, np.random.default_rng(0))
    assert every.all()


def test_degrade_augmentation_validates():
    with pytest.raises(ValueError, match="prob must be in"):
        Degrade(prob=1.5)
    with pytest.raises(ValueError, match="strength must be"):
        Degrade(strength=(0.5, 0.2))
    with pytest.raises(ValueError, match="unknown degradation 'blur'"):
        Degrade(kinds=("blur",))


def test_patch_dataset_degrades_inputs_not_labels_and_marks_the_frames():
    cases = [make_synthetic_case(s, frames=8, size=32, degraded=[]) for s in range(2)]
    plain = PatchDataset(cases, window=6, roi=24, seed=0)
    aug = PatchDataset(cases, window=6, roi=24, seed=0, degrade={"prob": 0.5})
    for i in range(2):
        a, b = plain[i], aug[i]
        assert a["start"] == b["start"]
        np.testing.assert_array_equal(a["label"], b["label"])
        frames_changed = ~(a["image"] == b["image"]).flatten(1).all(1)
        assert frames_changed.any()
        assert b["degraded"].tolist() == frames_changed.tolist()
    assert FULL[0] in Degrade().kinds


def test_cue_track_case():
    case = make_cue_track_case(4, frames=20, size=32, cue_frames=3)
    again = make_cue_track_case(4, frames=20, size=32, cue_frames=3)
    np.testing.assert_array_equal(case.image, again.image)
    assert case.meta["cue_frames"] == 3 and case.meta["closest_frame"] >= 3
    img, lab = case.image[:, 0], case.label
    for t in range(20):
        a, b = img[t][lab[t] == 1].mean(), img[t][lab[t] == 2].mean()
        if t < 3:
            assert a - b > 0.35  # told apart by intensity during the cue
        else:
            assert abs(a - b) < 0.2  # look-alike afterwards (up to the smooth bias field)
        assert (lab[t] == 1).sum() == pytest.approx((lab[t] == 2).sum(), rel=0.3)
    centres = np.array([[np.argwhere(lab[t] == k).mean(0) for k in (1, 2)] for t in range(20)])
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=2)
    assert steps.max() < 3.0  # they move smoothly (the memory has something to follow)
    gap = np.linalg.norm(centres[:, 0] - centres[:, 1], axis=1)
    assert gap[3:].min() < 3.5 * 3.2 + 1  # they meet after the cue
    with pytest.raises(ValueError, match="cue_frames must be in"):
        make_cue_track_case(0, frames=3, cue_frames=3)


def test_synth_cli_options_for_degradations_and_cue_track(tmp_path, capsys):
    pytest.importorskip("nibabel")
    from clstm4d.cli import main

    assert main(["synth", "--out", str(tmp_path / "a"), "--cases", "2", "--frames", "6",
                 "--size", "20", "--validation", "0", "--degraded", "2",
                 "--degrade", "snr=0.3,defocus"]) == 0
    dl = load_datalist(tmp_path / "a" / "datalist.json")
    meta = dl.training[0].meta
    assert set(meta["degradation"]) <= {"snr", "defocus"} and len(meta["degraded"]) == 2
    assert all(s == {"snr": 0.3, "defocus": 0.5}[k]
               for k, s in zip(meta["degradation"], meta["degradation_strength"], strict=True))
    assert main(["synth", "--out", str(tmp_path / "b"), "--cases", "2", "--frames", "6",
                 "--size", "24", "--task", "cue-track", "--cue-frames", "2"]) == 0
    dl = load_datalist(tmp_path / "b" / "datalist.json")
    assert dl.labels == CUE_CLASS_NAMES and dl.training[0].meta["cue_frames"] == 2
    ref = make_cue_track_case((0, 0), 6, 24, 2, cue_frames=2)
    np.testing.assert_array_equal(load_case(dl.training[0]).label, ref.label)
    capsys.readouterr()
    for argv, message in ((["--task", "cue-track", "--degrade", "snr"],
                           "--degrade, --degraded and --spacing apply to"),
                          (["--degrade", "fog=0.2"], "--degrade: unknown degradation 'fog'")):
        assert main(["synth", "--out", str(tmp_path / "x"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_training_degrades_inputs_of_temporal_models_by_default():
    """``data.degrade: auto`` (the default) turns the augmentation on for models with memory
    and off for per-frame ones; true/false/a mapping are taken as given."""
    from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
    from clstm4d.engine.training.build import build_dataset
    from clstm4d.errors import ConfigError

    cases = [make_synthetic_case(0, frames=6, size=24, degraded=[])]
    for temporal, on in (("bottleneck", True), ("skips", True), ("none", False)):
        for value, expected in (("auto", on), (True, True), (False, False),
                                ({"prob": 0.5}, True)):
            cfg = Config.from_dict({"data": {"degrade": value, "window": 4}})
            spec = ModelSpec("tiny", 2, 1, 2, {"temporal": temporal})
            run = SavedRun(cfg, spec, {})
            ds = build_dataset(cfg, cases, run)
            assert (ds.degrade is not None) == expected, (temporal, value)
    assert Config().data.degrade == "auto"
    cfg = Config.from_dict({"data": {"degrade": "sometimes"}})
    with pytest.raises(ConfigError, match="data.degrade must be true, false, 'auto'"):
        build_dataset(cfg, cases, SavedRun(cfg, ModelSpec("tiny", 2, 1, 2, {"temporal": "none"}),
                                           {}))
