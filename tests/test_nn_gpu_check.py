"""benchmarks/gpu_check.py runs end to end in its CPU dry-run form (same code, tiny sizes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _dry_run(out: Path, *extra: str) -> str:
    res = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _check_results(out: Path) -> None:
    layer = [json.loads(line) for line in (out / "layer.jsonl").read_text().splitlines()]
    assert {r["precision"] for r in layer} == {"fp32", "bf16"}
    assert all(r["clstm4d_over_floor"] > 0 for r in layer)
    unet = [json.loads(line) for line in (out / "unet.jsonl").read_text().splitlines()]
    assert {r["case"] for r in unet} >= {"ours fp32", "ours bf16", "ours-ckpt bf16"}
    assert all(r["time_s"] > 0 for r in unet)
    plan = [json.loads(line) for line in (out / "plan.jsonl").read_text().splitlines()]
    assert [r["config"] for r in plan] == ["2d-tiny"] and plan[0]["measured_mib"] > 0
    cli = [json.loads(line) for line in (out / "plan_cli.jsonl").read_text().splitlines()]
    assert [r["config"] for r in cli] == ["2d-many-small-640MB-fp32"]
    assert cli[0]["measured_mb"] > 0 and cli[0]["predicted_s"] > 0
    summary = (out / "summary.md").read_text()
    assert "gpu_check on CPU (dry run)" in summary and "| quick3d | bf16 |" in summary
    assert "| 2d-many-small-640MB-fp32 | 48x48 x 6 x 1 |" in summary


def test_gpu_check_dry_run_layer_and_unet(tmp_path):
    _dry_run(tmp_path, "--skip", "tests")
    _check_results(tmp_path)


@pytest.mark.slow
def test_gpu_check_dry_run_everything(tmp_path):
    stdout = _dry_run(tmp_path)
    assert '"step": "tests", "returncode": 0' in stdout
    assert "1 passed" in (tmp_path / "tests.log").read_text()
    _check_results(tmp_path)
