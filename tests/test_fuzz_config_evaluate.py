"""Property-based fuzzing (issue 17) of two surfaces users type into: configuration values
(a YAML file and `--set` overrides, numbers in every notation a person writes) and `clstm4d
evaluate` (class sets, voxel grids, sizes).

Each case has an oracle written here, independent of the code under test:

- config: every key drawn as valid (a number in its range, in plain, decimal or scientific
  notation) or invalid (text, a boolean, a value out of range); the command must succeed with
  exactly the numbers written when all are valid, else fail with one line that names every
  invalid key (all at once); a broken YAML line must be named by its line number;
- evaluate: a prediction and a label of random sizes and classes, on the same grid or not,
  with or without `--num-classes` and `--resample-to-label`: the command must refuse exactly
  when a value lies outside a declared class set or the grids differ without resampling (one
  line, exit 2), and otherwise report the Dice of a numpy reference that leaves out classes
  absent from both files.

Seeded (derandomized), bounded; in the style of tests/test_fuzz_inputs.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clstm4d.cli import main  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# key -> (type, low, high, low inclusive, high inclusive): what the docs promise
KEYS = {"train.lr": (float, 0, None, False), "train.weight_decay": (float, 0, None, True),
        "train.dist_timeout": (float, 0, None, False),
        "train.unlabelled_threshold": (float, 0, 1, False),
        "data.foreground_prob": (float, 0, 1, True), "predict.overlap": (float, 0, 0.99, True),
        "train.steps": (int, 1, None, True), "train.log_every": (int, 1, None, True),
        "data.window": (int, 1, None, True), "predict.chunk": (int, 1, None, True)}


@st.composite
def number_text(draw, kind, low, high, low_in):
    """A valid value of the key and how a person might write it."""
    if kind is int:
        n = draw(st.integers(max(1, low), 10**6))
        if n % 1000 == 0 and draw(st.booleans()):
            return n, f"{n // 1000}e3"  # 5e3 steps
        return n, str(n)
    hi = 1e6 if high is None else high
    v = draw(st.floats(low, hi, allow_nan=False, exclude_min=not low_in, exclude_max=True))
    if v == 0 and not low_in:
        v = 1e-3
    if 0 < v < 1e-12:  # subnormal and tiny values: write them as they are
        v = 1e-12
    style = draw(st.sampled_from(["e", "E", "nodot", "g", "repr"]))
    if style == "nodot":
        exp = math.floor(math.log10(v)) if v > 0 else 0
        mant = round(v / 10**exp)
        if 1 <= mant <= 9 and (high is None or mant * 10.0**exp < high):
            return float(f"{mant}e{exp}"), f"{mant}e{exp}"  # 1e-3: the README's own example
        style = "repr"
    text = {"e": f"{v:.3e}", "E": f"{v:.2E}", "g": f"{v:g}", "repr": repr(v)}[style]
    value = float(text)
    if value < low or (value == low and not low_in) or (high is not None and value >= high):
        text, value = repr(v), v  # rounded out of range (0.99999 -> 1.0): write it exactly
    return value, text


JUNK = ["fast", "1e", "e5", "1.2.3", "'1e-3'", "yes", "-1", ".nan", ".inf", "[1, 2]", "{}"]


@st.composite
def config_case(draw):
    keys = draw(st.lists(st.sampled_from(sorted(KEYS)), min_size=1, max_size=5, unique=True))
    entries = {}
    for key in keys:
        kind, low, high, low_in = KEYS[key]
        if draw(st.integers(0, 3)) == 0:
            text = draw(st.sampled_from(JUNK + (["0"] if not low_in else [])
                                        + (["2.5"] if kind is int else [])))
            entries[key] = (None, text)
        else:
            entries[key] = draw(number_text(kind, low, high, low_in))
    in_file = {k: v for k, v in entries.items() if draw(st.booleans())}
    broken = draw(st.sampled_from([None, "tab", "indent", "bracket"]))
    return entries, in_file, broken


@given(case=config_case())
@FUZZ
def test_fuzz_config_values_in_yaml_and_set(tmp_path_factory, capsys, case):
    entries, in_file, broken = case
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    lines: list[str] = []
    sections: dict[str, list[str]] = {}
    for key, (_, text) in in_file.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"  {name}: {text}")
    for section, body in sections.items():
        lines += [f"{section}:", *body]
    bad_line = None
    if broken:
        bad_line = len(lines) + 2
        lines += ["model:", {"tab": "\tname: tiny", "indent": "  name: tiny\n    x: 1",
                             "bracket": "  channels: [2, 4"}[broken]]
        if broken == "bracket":  # noticed where the next key starts
            lines.append("train:")
        bad_line += broken != "tab"  # the line after `model:`'s first
    path.write_text("\n".join(lines) + "\n")
    sets = [f"{k}={text}" for k, (_, text) in entries.items() if k not in in_file]
    argv = ["train", "--config", str(path), "--print-config"]
    for s in sets:
        argv += ["--set", s]
    rc = main(argv)
    out, err = capsys.readouterr()
    invalid = [k for k, (v, _) in entries.items() if v is None]
    if broken:
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert str(path) in err and f"line {bad_line}" in err, (lines, err)
        return
    if not invalid:
        assert rc == 0, (entries, err)
        printed = json.loads(out)
        for key, (value, text) in entries.items():
            section, name = key.split(".")
            assert printed[section][name] == pytest.approx(value, rel=1e-12), (key, text)
            assert type(printed[section][name]) is KEYS[key][0], (key, text)
        return
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for key in invalid:
        assert f"'{key}'" in err, (key, entries, err)  # every one at once
    if len(invalid) > 1:
        assert f"{len(invalid)} configuration errors" in err, err


def _reference_dice(pred, label, classes):
    """Mean over frames of the mean Dice over the classes present in either map; frames with
    none left out (NaN when no frame has any)."""
    per_frame = []
    for p, y in zip(pred, label, strict=True):
        scores = [2 * ((p == k) & (y == k)).sum() / ((p == k).sum() + (y == k).sum())
                  for k in classes if (p == k).any() or (y == k).any()]
        if scores:
            per_frame.append(np.mean(scores))
    return float(np.mean(per_frame)) if per_frame else float("nan")


@st.composite
def evaluate_case(draw):
    t = draw(st.integers(1, 3))
    shape = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    top = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    label = rng.integers(0, top + 1, (t, *shape)) * (rng.random((t, *shape)) < 0.6)
    pred = np.where(rng.random((t, *shape)) < 0.3, rng.integers(0, top + 2, (t, *shape)),
                    label)
    num_classes = draw(st.none() | st.integers(2, 6))
    grid = draw(st.sampled_from(["same", "same", "spacing", "origin", "flip"]))
    resample = draw(st.booleans())
    return label, pred, num_classes, grid, resample


@given(case=evaluate_case())
@FUZZ
def test_fuzz_evaluate_class_sets_grids_and_sizes(tmp_path_factory, capsys, case):
    from clstm4d.data import Geometry, write_label

    label, pred, num_classes, grid, resample = case
    root = tmp_path_factory.mktemp("ev")
    t, *shape = label.shape
    geom = Geometry.default("nifti", shape, t, spacing=(0.5, 2.0))
    affine = geom.affine.copy()
    shown = pred
    if grid == "spacing":  # every voxel split in two along x: the same objects
        shown = np.repeat(pred, 2, axis=1)
        affine[0, 0], affine[0, 3] = 0.25, -0.125
    elif grid == "origin":  # one more column at the start along y: the same objects
        shown = np.concatenate([np.zeros_like(pred[:, :, :1]), pred], axis=2)
        affine[1, 3] -= 2.0
    elif grid == "flip":
        shown = pred[:, ::-1]
        affine[0, 0], affine[0, 3] = -0.5, (shape[0] - 1) * 0.5
    write_label(label, geom, root / "label.nii.gz")
    write_label(shown, Geometry("nifti", shown.shape[1:], t, affine=affine, space_unit="mm"),
                root / "pred.nii.gz")
    argv = ["evaluate", "--pred", str(root / "pred.nii.gz"), "--label",
            str(root / "label.nii.gz"), "--no-hd95"]
    if num_classes is not None:
        argv += ["--num-classes", str(num_classes)]
    if resample:
        argv += ["--resample-to-label"]
    rc = main(argv)
    out, err = capsys.readouterr()
    outside = num_classes is not None and max(pred.max(), label.max()) >= num_classes
    other_grid = grid != "same" and not resample
    if outside or other_grid:
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert ("outside the" in err) if not other_grid else ("same voxel grid" in err), err
        return
    assert rc == 0, err
    k = num_classes or max(2, int(max(pred.max(), label.max())) + 1)
    expected = _reference_dice(pred, label, range(1, k))
    got = float(out.split("Dice ")[1].split()[0])
    if math.isnan(expected):
        assert math.isnan(got), out
    else:
        assert got == pytest.approx(expected, abs=5e-5), (out, expected)
    assert "HD95" not in out
