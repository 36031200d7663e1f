"""REAL DATA: the C2C12 time-lapse (Ker et al. 2018, CC BY 4.0, via yfukai/laptrack) through
TIFF hyperstacks, sparse-label training, prediction and per-frame evaluation. Slow, and
skipped unless the file is there (``CLSTM4D_C2C12`` or ``../shared/data`` beside the repo);
the data is not shipped with clstm4d."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from references import dice_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NPZ = Path(os.environ.get("CLSTM4D_C2C12", ROOT.parent / "shared" / "data" / "c2c12" /
                          "c2c12_phase_10frames.npz"))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not NPZ.is_file(), reason=f"real data not found at {NPZ}")]


def _script():
    spec = importlib.util.spec_from_file_location("real_data_c2c12",
                                                  ROOT / "scripts" / "real_data_c2c12.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_c2c12_tiff_round_trip_sparse_training_and_evaluation(tmp_path):
    pytest.importorskip("tifffile")
    from clstm4d.data import load_case, load_datalist

    script = _script()
    assert script.main(["--npz", str(NPZ), "--out", str(tmp_path), "--labelled", "0,5",
                        "--steps", "40"]) == 0
    raw = np.load(NPZ)
    case = load_case(load_datalist(tmp_path / "data" / "datalist.json").training[0])
    np.testing.assert_array_equal(case.image[:, 0], raw["images"])  # the TIFF holds the data
    assert case.labelled.tolist() == [f in (0, 5) for f in range(10)]
    np.testing.assert_array_equal(case.label[[0, 5]], raw["labels"][[0, 5]] > 0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    truth = (raw["labels"] > 0).astype(np.int64)
    others = [f for f in range(10) if f not in (0, 5)]
    for name in ("temporal", "per-frame"):
        scores = summary["models"][name]
        from clstm4d.data import read_label

        pred, _ = read_label(tmp_path / f"pred_{name}.tif")
        assert pred.shape == raw["labels"].shape  # every frame is segmented
        # the reported scores are the Dice of the written predictions against the masks
        assert scores["annotated"] == pytest.approx(
            dice_reference(pred[[0, 5]], truth[[0, 5]], 2), abs=1e-6)
        assert scores["other"] == pytest.approx(
            dice_reference(pred[others], truth[others], 2), abs=1e-6)
