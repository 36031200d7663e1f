"""Property-based fuzzing of `clstm4d predict`'s outputs: names, extensions and sizes.

Hypothesis draws an input (4D NIfTI, TIFF hyperstack, NIfTI or NRRD series; 1-4 frames of
1-20 x 1-20 pixels) and an `--output` (a name with spaces, dots, unicode; no extension, a
supported one in any case, an unsupported one, a trailing `/`; sometimes in a new subfolder),
and runs `predict` through `main([...])`. Every example must end in exactly one of:

- exit 0, every file it wrote complete (it reads back with the input's frames and voxels, in
  the axis order of its format), the printed path among them, no temporary file left; or
- exit 2 with one line on stderr naming the output (or the input, e.g. one too small for the
  model), no traceback, and nothing written.

Seeded (derandomized), bounded; the test also asserts that both outcomes were reached.
"""

from __future__ import annotations

import collections
import itertools
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clstm4d.cli import main  # noqa: E402
from clstm4d.data import Geometry, read_label, write_image  # noqa: E402

EXAMPLES = 50
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FORMATS = {"nifti": "scan.nii.gz", "tiff": "scan.tif", "nifti-series": "series",
           "nrrd-series": "series"}
EXTENSIONS = ["", "", ".nii.gz", ".nii", ".tif", ".tiff", ".TIF", ".NII.GZ", ".nrrd",
              ".seg.nrrd", ".png", ".mha", ".dcm", ".gz", ".ome.tif", "/"]
NAMES = st.text(st.sampled_from("ab c-_\u00fc\u2713.0"), min_size=1, max_size=10).filter(
    lambda s: not s.startswith(".") and s == s.strip())  # a hidden name: a temporary's look


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_faults_outputs import _checkpoint

    root = tmp_path_factory.mktemp("fuzz_outputs")
    return {"root": root, "ck": _checkpoint(root / "ck"), "n": itertools.count(),
            "outcomes": collections.Counter()}


def _input(folder: Path, fmt: str, frames: int, shape: tuple[int, int]) -> Path:
    image = np.random.default_rng(frames).random((frames, 1, *shape), dtype=np.float32)
    g = Geometry.default(fmt, shape, frames, spacing=(1.0, 1.5), time_interval=0.2)
    written = write_image(image, g, folder / FORMATS[fmt])
    return written[0] if fmt in ("nifti", "tiff") else folder / FORMATS[fmt]


def _voxels(shape) -> list[int]:
    return sorted(n for n in shape if n != 1)


def _new_entries(root: Path, before: set[Path]) -> set[Path]:
    return set(root.rglob("*")) - before


@FUZZ
@given(data=st.data())
def test_predict_output_names_extensions_and_sizes(world, capsys, data):
    case = world["root"] / f"case{next(world['n'])}"
    fmt = data.draw(st.sampled_from(list(FORMATS)), label="input format")
    frames = data.draw(st.integers(1, 4), label="frames")
    shape = data.draw(st.tuples(st.integers(1, 20), st.integers(1, 20)), label="shape")
    src = _input(case / "in", fmt, frames, shape)
    name = data.draw(NAMES, label="name") + data.draw(st.sampled_from(EXTENSIONS), label="ext")
    sub = data.draw(st.sampled_from(["", "new/", "new/deeper/"]), label="subfolder")
    out_root = case / "out"
    out_root.mkdir()
    output = str(out_root / sub) + "/" + name
    before = set(out_root.rglob("*"))
    capsys.readouterr()
    rc = main(["predict", "--checkpoint", str(world["ck"]), "--input", str(src),
               "--output", output, "--no-progress"])
    printed, err = capsys.readouterr()
    new = _new_entries(out_root, before)
    if rc == 2:
        world["outcomes"]["refused"] += 1
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert name.rstrip("/") in err or str(src) in err, err  # the output, or the input
        assert not new, new  # nothing written, no folder made
        return
    assert rc == 0, err
    world["outcomes"]["written"] += 1
    files = sorted(p for p in new if p.is_file())
    assert files and not [p for p in new if p.name.startswith(".")], new
    assert any(str(p) in printed or str(p.parent) in printed for p in files), printed
    for p in files:
        assert p.stat().st_size > 0
    if len(files) == 1:
        labels, g = read_label(files[0])
        assert labels.shape[0] == frames and _voxels(labels.shape[1:]) == _voxels(shape)
    else:  # a series: one file per frame, each of the input's voxels
        assert len(files) == frames
        for p in files:
            labels, _ = read_label(p)
            assert labels.shape[0] == 1 and _voxels(labels.shape[1:]) == _voxels(shape)
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_both_outcomes_were_reached(world):
    """Runs after the property (file order): it cannot pass on an all-refused or
    all-written run."""
    if not world["outcomes"]:
        pytest.skip("the property did not run (selected alone)")
    print(f"predict outputs fuzzed: {dict(world['outcomes'])}")
    assert world["outcomes"]["refused"] >= 5 and world["outcomes"]["written"] >= 5, \
        world["outcomes"]
