"""Plans that fit the data: the roi never exceeds the (resampled) image along any axis, the
window never exceeds the median frame count, a dataset too small for the network's strides is
refused naming its smallest case, and a dataset without validation cases is told so."""

from __future__ import annotations

import itertools

import pytest

from clstm4d.data import write_synthetic_dataset
from clstm4d.engine.planning.fingerprint import fingerprint
from clstm4d.engine.planning.planner import make_plan, plan_from_fingerprint
from clstm4d.errors import UserError

MiB = 2**20


@pytest.mark.parametrize("shape", [[117, 234], [234, 117], [45, 50, 13], [33, 20, 7]])
def test_roi_never_exceeds_the_image_along_any_axis(shape):
    # 117 x 234 is the time-lapse of the issue: the old planner rounded it up to 120 x 236
    # and the patches' zero padding gave false positives along the border
    for budget in (64 * MiB, 256 * MiB, 8 * 2**30):
        try:
            plan = make_plan(budget, model="tiny", median_shape=shape, median_frames=10,
                             device="cpu", runtime=0)
        except UserError:
            continue
        assert all(r <= n for r, n in zip(plan.roi, shape, strict=True)), (budget, plan.roi)
    whole = make_plan(8 * 2**30, model="tiny", median_shape=shape, median_frames=10,
                      device="cpu", runtime=0)
    assert whole.roi == shape  # the whole image when it fits: no padding beyond it


def test_a_shrunk_roi_is_a_multiple_of_the_strides():
    plan = make_plan(40 * MiB, model="tiny", median_shape=[117, 234], median_frames=10,
                     device="cpu", runtime=0)
    assert plan.roi != [117, 234]
    for r, n, mult in zip(plan.roi, [117, 234], [4, 4], strict=True):
        assert r == n or r % mult == 0


@pytest.mark.parametrize("frames, min_window", itertools.product([1, 2, 3, 9], [1, 4, 16]))
def test_window_never_exceeds_the_median_frame_count(frames, min_window):
    plan = make_plan(8 * 2**30, model="tiny", median_shape=[32, 32], median_frames=frames,
                     device="cpu", min_window=min_window, runtime=0)
    assert 1 <= plan.window <= frames
    assert plan.window == frames  # everything fits: the whole sequence


def test_a_fixed_window_longer_than_the_sequences_is_refused():
    with pytest.raises(UserError, match=r"model 'tac-tiny' takes windows of exactly 8 frames, "
                                        r"but the median sequence has 5"):
        make_plan(8 * 2**30, model="tac-tiny", median_shape=[32, 32], median_frames=5,
                  device="cpu", runtime=0)


def test_cases_too_small_for_the_strides_are_refused_naming_the_smallest(tmp_path):
    import numpy as np

    from clstm4d.data import Geometry, save_datalist, write_image, write_label

    entries = []
    for name, shape in (("big", (14, 12)), ("small", (12, 10))):
        g = Geometry.default("nifti", shape, frames=2, channels=1)
        image = write_image(np.random.default_rng(0).random((2, 1, *shape), np.float32), g,
                            tmp_path / f"{name}.nii.gz")[0]
        label = write_label(np.ones((2, *shape), np.int64), g, tmp_path / f"{name}_l.nii.gz")
        entries.append({"image": str(image), "label": str(label[0]), "name": name})
    dl = save_datalist(tmp_path / "dl.json", training=entries, spatial_dims=2)
    with pytest.raises(UserError, match=r"no training case is large enough for model 'tiny' "
                                        r"\(2 poolings\): it needs at least 16 voxels along "
                                        r"axes \[0, 1\] .* the smallest case 'small' is "
                                        r"12 x 10"):
        plan_from_fingerprint(fingerprint(dl), 2**30, model="tiny", device="cpu")


def test_one_sequence_plans_no_validation_and_says_so(tmp_path):
    dl = write_synthetic_dataset(tmp_path, cases=1, frames=4, size=24, spatial_dims=2,
                                 validation=0.0)
    plan = plan_from_fingerprint(fingerprint(dl), 2**30, model="tiny", device="cpu")
    assert plan.roi == [24, 24] and plan.window == 4
    note = [n for n in plan.notes if n.startswith("no validation")]
    assert note and "with 1 training sequence none can be held out" in note[0]


# ------------------------------------------------------------------ time: batch and budget

def _timer(fixed):
    from clstm4d.engine.planning.timing import StepTime

    return StepTime(rate=2e9, fixed=fixed, data=0.0)


def test_the_batch_grows_only_while_an_epoch_gets_faster():
    kw = dict(model="tiny", median_shape=[64, 64], median_frames=8, device="cpu", runtime=0)
    # no fixed cost per step: a larger batch trains an epoch no faster, so it stays at 1
    assert make_plan(8 * 2**30, timer=_timer(0.0), **kw).batch == 1
    # a large fixed cost per step (a GPU's launches): sharing it pays, up to max_batch
    assert make_plan(8 * 2**30, timer=_timer(100.0), **kw).batch == 8
    assert make_plan(8 * 2**30, **kw).batch == 8  # without a timer: the largest that fits


def test_a_time_budget_shrinks_the_plan_and_says_when_it_cannot():
    kw = dict(model="tiny", median_shape=[96, 96], median_frames=8, device="cpu", runtime=0,
              timer=_timer(0.0))
    free = make_plan(8 * 2**30, **kw)
    limit = free.step_seconds / 3
    quick = make_plan(8 * 2**30, time_per_step=limit, **kw)
    assert quick.step_seconds <= limit < free.step_seconds
    assert quick.roi != free.roi and all(r <= n for r, n in zip(quick.roi, [96, 96],
                                                                  strict=True))
    assert quick.run_seconds >= 200 * quick.step_seconds  # the default train.steps
    with pytest.raises(UserError, match=r"--time-per-step 1e-09 s is too short: the smallest "
                                        r"plan .* takes about [\d.]+ s per step"):
        make_plan(8 * 2**30, time_per_step=1e-9, **kw)
