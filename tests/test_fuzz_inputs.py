"""Property-based fuzzing of what users hand to `clstm4d train`: datalists and config YAMLs.

Hypothesis mutates a valid datalist (deleted, added and retyped keys, empty sections, paths with
spaces and unicode, missing files, images with NaN, labels outside `labels`) and a valid config
(the same, plus unparseable YAML). Each case runs `clstm4d train` through `main([...])` with the
training loop cut to its first step, and must end in exactly one of:

- success (exit 0), or
- exit 2 with one line on stderr, no traceback, naming the field (or file) that is wrong, and no
  file written anywhere.

Any other exception escapes `main` and fails the test. Seeded (derandomized), bounded.
Allocation sizes (batch size, window, patch size, workers, threads) are drawn from small
ranges only: a request for more memory than exists is the memory guard's business, not a
parsing error.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clstm4d.cli import main  # noqa: E402

EXAMPLES = 100  # per property (two properties)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

SCALARS = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.sampled_from([0, -1, 1, 2, 10**18, -(10**18)])
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["", " ", "a b", "ünïcødé ✓", "../x", "null"]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
EDGY_NUMBERS = st.sampled_from([0, -1, -0.5, 1e-12, 10**12, 1e308, float("nan"), float("inf"),
                                 -float("inf"), 0.999, 1.5, 2])
SMALL = st.integers(-3, 40) | st.lists(st.integers(-3, 40), max_size=4)  # allocation sizes


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A valid dataset and config, plus the odd files the mutations may point at."""
    from clstm4d.data import read_image, read_label, write_image, write_label

    root = tmp_path_factory.mktemp("fuzz")
    assert main(["synth", "--out", str(root / "data"), "--cases", "2", "--frames", "3",
                 "--size", "16", "--validation", "0", "--test", "1"]) == 0
    data = root / "data"
    doc = json.loads((data / "datalist.json").read_text())
    image, geometry = read_image(data / doc["training"][0]["image"])
    label, lgeom = read_label(data / doc["training"][0]["label"])
    odd = data / "odd"
    nan = image.copy()
    nan[1, 0, 3, 4] = np.nan
    write_image(nan, geometry, odd / "nan image.nii.gz")
    write_label(np.where(label > 0, 7, 0), lgeom, odd / "label 7.nii.gz")
    write_label(label[:2], type(lgeom)(**{**lgeom.__dict__, "frames": 2}),
                odd / "two frames.nii.gz")
    space = odd / "dir with space" / "ünïcødé case.nii.gz"
    space.parent.mkdir(parents=True)
    shutil.copy(data / doc["training"][0]["image"], space)
    (odd / "notes.txt").write_text("not an image")
    files = {"nan image": "odd/nan image.nii.gz", "label 7": "odd/label 7.nii.gz",
             "two frames": "odd/two frames.nii.gz",
             "unicode copy": "odd/dir with space/ünïcødé case.nii.gz",
             "missing": "odd/nowhere ✓/missing case.nii.gz", "text file": "odd/notes.txt",
             "folder": "odd", "glob": "imagesTr/*.nii.gz"}
    config = {"model": {"name": "tiny", "channels": [2, 4]},
              "data": {"window": 2, "batch_size": 1, "roi": [16, 16], "augment": True},
              "train": {"steps": 3, "lr": 0.001, "progress": False, "log_every": 1,
                        "threads": 1, "device": "cpu"},
              "predict": {"chunk": 4}}
    return {"root": root, "data": data, "doc": doc, "files": files, "config": config}


@pytest.fixture(autouse=True)
def one_step_only(monkeypatch):
    """Cut the training loop to its first step: the fuzz is about inputs, not about training
    (and skip the full garbage collection that starts a peak-memory measurement)."""
    from clstm4d.engine.run import runtime
    from clstm4d.engine.training import sampling as train_module

    real_iter = train_module.StepBatchSampler.__iter__

    def first_batch(self):
        yield next(iter(real_iter(self)))

    monkeypatch.setattr(train_module.StepBatchSampler, "__iter__", first_batch)
    monkeypatch.setattr(runtime, "_release_free_memory", lambda: None)


def _paths(obj, prefix=()):
    """Every key path of a JSON document (dict keys and list indices)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) \
        else ()
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _set(doc, path, value, delete=False):
    target = doc
    for k in path[:-1]:
        target = target[k]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value


def _mutate(data, doc, *, extra_values=None):
    """Apply 1-3 random mutations to ``doc``; return it and the names each mutation touched."""
    doc = copy.deepcopy(doc)
    named = []
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(doc)
        kind = data.draw(st.sampled_from(["delete", "set", "add", "special"]), label="kind")
        if kind == "special" and extra_values is not None:
            path, value = extra_values(data, doc)
            if path is None:
                continue
            _set(doc, path, value)
        elif kind == "add" or not paths:
            holders = [()] + [p for p in paths if isinstance(_get(doc, p), dict)]
            path = data.draw(st.sampled_from(holders), label="holder")
            key = data.draw(st.text(min_size=1, max_size=8), label="new key")
            _get(doc, path)[key] = data.draw(VALUES, label="new value")
            path = (*path, key)
        else:
            path = data.draw(st.sampled_from(paths), label="path")
            if kind == "delete":
                _set(doc, path, None, delete=True)
            else:
                _set(doc, path, data.draw(VALUES, label="value"))
        named.append(path)
    return doc, named


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _mentions(path):
    """What an error about ``path`` may name: a key on it, ``section[i]``, a section.key."""
    words = {str(k) for k in path if isinstance(k, str)}
    words |= {f"{a}[{b}]" for a, b in zip(path, path[1:], strict=False) if isinstance(b, int)}
    words |= {f"{a}.{b}" for a, b in zip(path, path[1:], strict=False)}
    return {w for w in words if w.strip()}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(world, capsys, tmp_path, datalist_doc, config_doc, *, raw_config=None):
    dl = world["data"] / f"fuzz_{tmp_path.name}.json"
    dl.write_text(json.dumps(datalist_doc))
    cfg = tmp_path / "config.yaml"
    if raw_config is not None:
        cfg.write_text(raw_config)
    else:
        import yaml

        cfg.write_text(yaml.safe_dump(config_doc, allow_unicode=True))
    out = tmp_path / "run"
    shutil.rmtree(out, ignore_errors=True)
    before = _files(world["root"])
    import torch

    threads = torch.get_num_threads()
    try:
        capsys.readouterr()
        rc = main(["train", "--config", str(cfg), "--datalist", str(dl), "--out", str(out)])
        err = capsys.readouterr().err
        written = _files(world["root"]) ^ before
    finally:
        torch.set_num_threads(threads)
        dl.unlink()
    return rc, err, written, out


def _check(rc, err, written, out, mentions, outcomes):
    if rc == 0:
        outcomes["success"] += 1
        return
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    # the message names what is wrong (a key of a mutation, or a file it pointed at)
    assert any(m in lines[0] for m in mentions), (lines[0], sorted(mentions))
    assert not out.exists(), "a failed run left its folder"
    assert not written, f"a failed run wrote files: {sorted(written)}"
    outcomes["refused"] += 1


def _both_outcomes(prop: str, outcomes: dict[str, int]) -> None:
    """Every example ended in success or a clean refusal, and the mutations reached both
    (neither all accepted nor all refused). With -s, prints the counts docs/reliability.md
    quotes."""
    ok, refused = outcomes["success"], outcomes["refused"]
    print(f"fuzz {prop}: {ok + refused} examples: {ok} succeeded, {refused} refused with one "
          "line naming the field")
    assert ok > 0 and refused > 0, (prop, outcomes)


def test_mutated_datalists_succeed_or_fail_cleanly(world, capsys, tmp_path):
    outcomes = {"success": 0, "refused": 0}
    _datalist_property(world, capsys, tmp_path, outcomes)
    _both_outcomes("datalist", outcomes)


@FUZZ
@given(data=st.data())
def _datalist_property(world, capsys, tmp_path, outcomes, data):
    files = world["files"]

    def special(data, doc):  # point an entry's image or label at an odd file
        entries = [(s, i) for s in ("training", "validation", "test")
                   if isinstance(doc.get(s), list) for i in range(len(doc[s]))
                   if isinstance(doc[s][i], dict)]
        if not entries:
            return None, None
        section, i = data.draw(st.sampled_from(entries), label="entry")
        key = data.draw(st.sampled_from(["image", "label"]), label="key")
        name = data.draw(st.sampled_from(sorted(files)), label="file")
        return (section, i, key), files[name]

    doc, named = _mutate(data, world["doc"], extra_values=special)
    if data.draw(st.booleans(), label="empty a section"):
        doc[data.draw(st.sampled_from(["training", "validation", "test"]))] = []
        named.append(("training",))
    mentions = set().union(*map(_mentions, named))
    for path in named:  # odd files: the message may name the file
        value = _get_or_none(doc, path)
        if isinstance(value, str):
            mentions |= {Path(value).name, value}
    mentions |= {Path(v).name for v in files.values()} | {"case_00", "image", "label"}
    rc, err, written, out = _run(world, capsys, tmp_path, doc, world["config"])
    _check(rc, err, written, out, mentions, outcomes)


def _get_or_none(doc, path):
    try:
        return _get(doc, path)
    except (KeyError, IndexError, TypeError):
        return None


SIZE_KEYS = {("data", "batch_size"), ("data", "window"), ("data", "roi"),
             ("data", "num_workers"), ("train", "threads"), ("model", "channels")}


def test_mutated_configs_succeed_or_fail_cleanly(world, capsys, tmp_path):
    outcomes = {"success": 0, "refused": 0}
    _config_property(world, capsys, tmp_path, outcomes)
    _both_outcomes("config", outcomes)


@FUZZ
@given(data=st.data())
def _config_property(world, capsys, tmp_path, outcomes, data):
    from clstm4d.engine.run.config import Config

    known = Config().to_dict()

    def special(data, doc):  # a known key (maybe absent from the base) with an odd value
        section = data.draw(st.sampled_from(sorted(known)), label="section")
        key = data.draw(st.sampled_from(sorted(known[section])), label="known key")
        if not isinstance(doc.get(section), dict):
            return None, None
        default = known[section][key]
        if (section, key) == ("data", "num_workers"):
            value = data.draw(st.integers(-2, 1), label="workers")
        elif (section, key) in SIZE_KEYS:
            value = data.draw(SMALL, label="size")
        elif isinstance(default, bool) or default is None:
            value = data.draw(VALUES, label="value")
        elif isinstance(default, (int, float)):  # the right type, an edgy value
            value = data.draw(EDGY_NUMBERS, label="number")
        elif isinstance(default, str):
            value = data.draw(st.sampled_from(["", " ", "ünïcødé", "none", "cuda:7", "fp16",
                                               "a b", default.upper()]), label="string")
        else:
            value = data.draw(VALUES, label="value")
        return (section, key), value

    raw = None
    if data.draw(st.integers(0, 9), label="garbage") == 0:
        raw = data.draw(st.sampled_from(["model: [unclosed", "{a: 1", ": :", "\t- x", "[1, 2]",
                                         "just text", "train: 5", "null"]), label="yaml")
        doc, named = {}, [("config",)]
    else:
        doc, named = _mutate(data, world["config"], extra_values=special)
        for path in named:  # big allocation sizes are out of scope (see the module docstring)
            if tuple(path[:2]) in SIZE_KEYS and _too_big(_get_or_none(doc, path[:2])):
                _set(doc, path[:2], 2)
    mentions = set().union(*map(_mentions, named)) | {"config", "section", "mapping"}
    rc, err, written, out = _run(world, capsys, tmp_path, world["doc"], doc, raw_config=raw)
    _check(rc, err, written, out, mentions, outcomes)


def _too_big(value) -> bool:
    def big(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (
            not math.isfinite(v) or abs(v) > 64)

    if isinstance(value, list):
        return any(big(v) or isinstance(v, (list, dict)) for v in value) or len(value) > 4
    return big(value) or isinstance(value, (dict, str)) and len(value) > 64


@pytest.mark.parametrize("override, message", [
    ("train.lr=-1", "'train.lr' must be > 0, got -1.0"),
    ("train.lambda_dice=.nan", "'train.lambda_dice' must be a finite number"),
    ("train.threads=-1", "'train.threads' must be >= 1"),
    ("train.seed=-1", "'train.seed' must be in [0, 4294967295]"),
    ("data.roi=[16, 0]", "'data.roi' must be >= 1"),
    ("predict.overlap=1", "'predict.overlap' must be in [0, 1)"),
    ("predict.mode=gauss", "'predict.mode' must be one of gaussian, constant"),
])
def test_edge_values_found_by_the_sweep_are_refused_naming_the_key(override, message):
    from clstm4d.engine.run.config import Config
    from clstm4d.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Config.from_dict({}, [override])
    assert message in str(info.value)


@pytest.mark.parametrize("entry, message", [
    ({"degraded": None}, "'degraded' must be a list of frame indices"),
    ({"degraded": [1, -2]}, "'degraded' must be a list of frame indices"),
    ({"name": ""}, "'name' must be a non-empty string"),
    ({"time_interval": "fast"}, "'time_interval' must be a number of seconds > 0"),
])
def test_entry_keys_found_by_the_fuzzer_are_refused_naming_the_entry(tmp_path, entry, message):
    from clstm4d.data import DataError, load_datalist

    path = tmp_path / "list.json"
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz",
                                              **entry}]}))
    with pytest.raises(DataError) as info:
        load_datalist(path)
    assert f"training[0]: {message}" in str(info.value)
