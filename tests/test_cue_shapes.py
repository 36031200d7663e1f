"""Cue-then-track data with objects of varied form (``make_cue_shapes_case``, ``--task
cue-shapes``): deterministic per seed, identities right, overlaps happen, one family held out."""

from __future__ import annotations

import numpy as np
import pytest

from clstm4d.data import CUE_CLASS_NAMES, load_case, load_datalist, make_cue_shapes_case
from clstm4d.data.shapes import (
    HELD_OUT_SHAPES,
    SHAPE_FAMILIES,
    TUNING_SHAPES,
    draw_shape,
    parse_shapes,
    shape_mask,
)
from clstm4d.errors import ConfigError


def test_same_seed_same_case_other_seed_other_case():
    a = make_cue_shapes_case((3, 1), frames=10, size=40, shapes="all")
    b = make_cue_shapes_case((3, 1), frames=10, size=40, shapes="all")
    c = make_cue_shapes_case((3, 2), frames=10, size=40, shapes="all")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.meta == b.meta
    assert not np.array_equal(a.label, c.label)


@pytest.mark.parametrize("family", SHAPE_FAMILIES)
def test_identity_labels_follow_the_cued_object(family):
    """Class 1 is the object that is bright during the cue; afterwards it looks like the
    others, and from frame to frame class 1 overlaps its own previous mask, never the other
    class's (it is the same object moving, not a relabelled one)."""
    for seed in range(4):
        case = make_cue_shapes_case((seed,), frames=12, size=48, shapes=family, cue_frames=3)
        img, lab = case.image[:, 0], case.label
        assert case.meta["shapes"] == [family] * case.meta["objects"]
        assert 2 <= case.meta["objects"] <= 4
        for t in range(12):
            cued, other = img[t][lab[t] == 1].mean(), img[t][lab[t] == 2].mean()
            if t < 3:
                assert cued - other > 0.3
            else:
                assert abs(cued - other) < 0.2
        for t in range(1, 12):
            if {t - 1, t} & set(case.meta["overlap_frames"]):
                continue
            same = ((lab[t] == 1) & (lab[t - 1] == 1)).sum()
            swapped = ((lab[t] == 1) & (lab[t - 1] == 2)).sum()
            assert same > 0 and same > 3 * swapped


def test_overlaps_and_close_passes_occur():
    """Over a few seeds some objects overlap (fewer separate pieces of foreground than
    objects), and the cued one always comes close to another after the cue."""
    from scipy import ndimage

    merged = 0
    for seed in range(12):
        case = make_cue_shapes_case(seed, frames=16, size=48, shapes="disc", objects=(3, 4),
                                    min_gap=0.5)
        assert 3 <= case.meta["closest_frame"] < 16
        for t in case.meta["overlap_frames"]:
            pieces = ndimage.label(case.label[t] > 0)[1]
            merged += pieces < case.meta["objects"]
    assert merged > 0


def test_a_held_out_family_stays_out_of_the_default():
    assert set(HELD_OUT_SHAPES) and not set(HELD_OUT_SHAPES) & set(TUNING_SHAPES)
    assert set(HELD_OUT_SHAPES) | set(TUNING_SHAPES) == set(SHAPE_FAMILIES)
    assert parse_shapes(None) == TUNING_SHAPES == parse_shapes("tuning")
    seen = set()
    for seed in range(10):
        seen |= set(make_cue_shapes_case(seed, frames=6, size=40).meta["shapes"])
    assert seen <= set(TUNING_SHAPES) and len(seen) >= 2


def test_shapes_fit_their_bounding_circle():
    """Every shape lies inside its bounding circle and fills a fair share of it, so the
    scale sets the size."""
    grid = np.indices((64, 64), dtype=np.float32)
    for family in SHAPE_FAMILIES:
        rng = np.random.default_rng(0)
        for _ in range(8):
            mask = shape_mask(draw_shape(family, rng), grid, (32, 32), 20.0, angle=0.7)
            share = mask.sum() / (np.pi * 20**2)
            assert 0.12 < share < 1.02, (family, share)
            rows, cols = np.nonzero(mask)
            assert np.hypot(rows - 32, cols - 32).max() <= 20.5  # inside the circle


def test_bad_arguments_name_the_option():
    with pytest.raises(ConfigError, match="spatial_dims must be 2"):
        make_cue_shapes_case(0, spatial_dims=3)
    with pytest.raises(ConfigError, match="unknown shape family 'fog'"):
        make_cue_shapes_case(0, shapes="disc,fog")
    with pytest.raises(ConfigError, match="objects must be"):
        make_cue_shapes_case(0, objects=(1, 3))


def test_synth_cli_writes_the_cases_of_the_function(tmp_path, capsys):
    pytest.importorskip("nibabel")
    from clstm4d.cli import main

    assert main(["synth", "--out", str(tmp_path / "a"), "--cases", "2", "--frames", "6",
                 "--size", "32", "--task", "cue-shapes", "--shapes", "held-out",
                 "--objects", "2-3", "--validation", "0"]) == 0
    dl = load_datalist(tmp_path / "a" / "datalist.json")
    assert dl.labels == CUE_CLASS_NAMES
    ref = make_cue_shapes_case((0, 1), 6, 32, 2, shapes=["glyph"], objects=[2, 3])
    case = load_case(dl.training[1])
    np.testing.assert_array_equal(case.label, ref.label)
    assert dl.training[1].meta["shapes"] == ref.meta["shapes"]
    capsys.readouterr()
    for argv, message in ((["--task", "cue-track", "--shapes", "glyph"],
                           "--shapes and --objects apply to --task cue-shapes"),
                          (["--task", "cue-shapes", "--objects", "two"],
                           "--objects must be N or N-M")):
        assert main(["synth", "--out", str(tmp_path / "x"), *argv]) == 2
        assert message in capsys.readouterr().err
