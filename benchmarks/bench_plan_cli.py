"""The plan as a user runs it: ``clstm4d synth``, ``clstm4d plan``, then ``clstm4d train
--config plan.yaml --steps N`` with validation on, each in a fresh subprocess, over a matrix
of datasets (2D and 3D, isotropic and 1 x 1 x 4 / 1 x 1 x 8 mm, few large cases and many small
ones), budgets (256 MB to 8 GB), precisions and recomputation.

Per configuration it prints the plan's predicted peak of the ``train`` process next to the
peak that process logged (``peak_mb`` of the last metrics row: on CPU its peak resident set,
``VmHWM``; on CUDA ``max_memory_reserved`` plus the context), and the plan's predicted
seconds per step next to the measured mean step time (steps 2..N, from the metrics rows'
cumulative ``seconds``; validation runs after the last step and is not in them). Targets:
memory ratio 0.85-1.15 and measured peak under the budget in every run; time ratio 0.7-1.4.
A budget below what the runtime alone needs must be refused by ``plan`` (one line, exit 2).

The process model's calibrated constants (``PROCESS_CONSTANTS``: the runtime and the scale of
the step's / validation's peak) are refitted by least squares on a training split of the
configurations (every other one) and the ratios with the refitted constants are reported on
the held-out others, so the fit is not judged on the data it was fitted to. The time model's
overall factor is checked the same way.

Usage (from the repository root; about 15-25 minutes on a shared 2-core CPU):
    nice -n 10 python benchmarks/bench_plan_cli.py
    nice -n 10 python benchmarks/bench_plan_cli.py --configs 3d-1x1x4-2GB-fp32 --steps 3
    nice -n 10 python benchmarks/bench_plan_cli.py --json plan_cli.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

#: name -> ``clstm4d synth`` arguments (validation 0.25 of the cases: validation is on)
DATASETS = {
    "2d-few-large": ["--dims", "2", "--cases", "4", "--frames", "8", "--size", "192"],
    "2d-many-small": ["--dims", "2", "--cases", "24", "--frames", "6", "--size", "48"],
    "3d-iso": ["--dims", "3", "--cases", "4", "--frames", "5", "--size", "48"],
    "3d-1x1x4": ["--dims", "3", "--cases", "4", "--frames", "6", "--size", "64",
                 "--spacing", "1,1,4"],
    "3d-1x1x8": ["--dims", "3", "--cases", "4", "--frames", "6", "--size", "64",
                 "--spacing", "1,1,8"],
    "3d-many-small": ["--dims", "3", "--cases", "16", "--frames", "5", "--size", "24"],
}

#: (dataset, --memory, --precision, --recompute[, --model: default tiny]): the CPU matrix
MATRIX = [
    ("2d-few-large", "256MB", "fp32", "auto"),  # below the runtime: plan must refuse
    ("2d-few-large", "768MB", "fp32", "auto"),
    ("2d-few-large", "2GB", "fp32", "auto"),
    ("2d-few-large", "1GB", "bf16", "on"),
    ("2d-few-large", "8GB", "bf16", "auto"),
    ("2d-many-small", "640MB", "fp32", "auto"),
    ("2d-many-small", "4GB", "bf16", "off"),
    ("3d-iso", "1GB", "fp32", "on"),
    ("3d-iso", "2GB", "fp32", "off"),
    ("3d-iso", "4GB", "bf16", "auto"),
    ("3d-1x1x4", "768MB", "fp32", "auto"),
    ("3d-1x1x4", "1GB", "fp32", "off"),
    ("3d-1x1x4", "2GB", "fp32", "auto"),
    ("3d-1x1x4", "2GB", "bf16", "on"),
    ("3d-1x1x8", "1GB", "fp32", "auto"),
    ("3d-1x1x8", "8GB", "bf16", "off"),
    ("3d-many-small", "768MB", "fp32", "on"),
    ("3d-many-small", "2GB", "bf16", "off"),
]

#: the CUDA part (benchmarks/gpu_check.py runs it): the reference widths at 64^3 x 5 frames,
#: and the largest patch the plan gives for 40 GB on cases of 128^3
CUDA_MATRIX = [
    ("3d-64x5", "40GB", "bf16", "auto", "reference"),
    ("3d-64x5", "40GB", "fp32", "off", "reference"),
    ("3d-64x5", "8GB", "bf16", "on", "reference"),
    ("3d-128x5", "40GB", "bf16", "auto", "reference"),
    ("3d-1x1x4", "2GB", "bf16", "auto", "small"),
    ("2d-few-large", "4GB", "fp16", "auto", "small"),
]
DATASETS.update({
    "3d-64x5": ["--dims", "3", "--cases", "4", "--frames", "5", "--size", "64"],
    "3d-128x5": ["--dims", "3", "--cases", "4", "--frames", "5", "--size", "128"],
})


def name_of(row) -> str:
    dataset, memory, precision, recompute, *model = row
    return (f"{dataset}-{memory}-{precision}" + ("" if recompute == "auto" else f"-rc{recompute}")
            + "".join(f"-{m}" for m in model))


def clstm4d(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """One CLI command in a fresh subprocess."""
    return subprocess.run([sys.executable, "-m", "clstm4d", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT)


def run_config(row, work: Path, steps: int, env: dict[str, str], device: str = "cpu") -> dict:
    dataset, memory, precision, recompute, *model = row
    data = work / dataset / "datalist.json"
    if not data.exists():
        done = clstm4d(["synth", "--out", str(data.parent), *DATASETS[dataset]], env)
        if done.returncode:
            raise RuntimeError(done.stderr)
    name = name_of(row)
    plan_path = work / f"{name}.yaml"
    plan = clstm4d(["plan", "--datalist", str(data), "--memory", memory, "--device", device,
                    "--precision", precision, "--recompute", recompute, "--out",
                    str(plan_path), "--model", (model or ["tiny"])[0]], env)
    out = {"config": name, "dataset": dataset, "budget_mb": _mb(memory), "device": device,
           "precision": precision, "recompute": recompute, "model": (model or ["tiny"])[0]}
    if plan.returncode:
        return {**out, "refused": plan.stderr.strip().splitlines()[-1]}
    fp = json.loads((plan_path.parent / "fingerprint.json").read_text())["plan"]
    run = work / f"run-{name}"
    t0 = time.perf_counter()
    train = clstm4d(["train", "--config", str(plan_path), "--out", str(run), "--steps",
                     str(steps), "--set", "train.log_every=1", "--set", "train.progress=false",
                     "--set", "train.warmup_steps=1", "--set", f"train.device={device}"], env)
    if train.returncode:
        raise RuntimeError(f"{name}: train failed\n{train.stderr}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows if "seconds" in r]
    last = rows[-1]
    return {**out, "roi": fp["roi"], "window": fp["window"], "batch": fp["batch"],
            "recompute_used": fp["recompute"], "memory": fp["memory"],
            "predicted_mb": last["predicted_peak_mb"], "measured_mb": last["peak_mb"],
            "predicted_s": fp["step_seconds"], "measured_s": float(np.mean(np.diff(seconds))),
            "val_dice": last.get("val_dice"), "wall_s": round(time.perf_counter() - t0, 1)}


def _mb(memory: str) -> float:
    return float(memory[:-2]) * (1024 if memory.endswith("GB") else 1)


def refit(results: list[dict]) -> dict:
    """Least squares of the measured peak = runtime + data + scale * peak part on the
    training split (even rows) and of the time factor; ratios on the held-out (odd) rows."""
    ok = [r for r in results if "refused" not in r]
    train, held = ok[0::2], ok[1::2]
    a = np.array([[1.0, r["memory"]["peak"] / MiB] for r in train])
    b = np.array([r["measured_mb"] - r["memory"]["data"] / MiB for r in train])
    (runtime, scale), *_ = np.linalg.lstsq(a, b, rcond=None)
    factor = float(np.exp(np.mean([np.log(r["measured_s"] / r["predicted_s"]) for r in train])))
    for r in held:
        refit_mb = runtime + r["memory"]["data"] / MiB + scale * r["memory"]["peak"] / MiB
        r["heldout_memory_ratio"] = round(refit_mb / r["measured_mb"], 3)
        r["heldout_time_ratio"] = round(factor * r["predicted_s"] / r["measured_s"], 3)
    return {"runtime_mib": round(float(runtime), 1), "scale": round(float(scale), 3),
            "time_factor": round(factor, 3), "train": [r["config"] for r in train],
            "held_out": [r["config"] for r in held]}


def report(results: list[dict], fit: dict | None) -> None:
    head = (f"{'config':<34}{'roi x window x batch':>24}{'pred MiB':>10}{'meas MiB':>10}"
            f"{'mem':>7}{'budget':>8}{'pred s':>8}{'meas s':>8}{'time':>7}{'held-out':>12}")
    print(head)
    for r in results:
        if "refused" in r:
            print(f"{r['config']:<34}  refused: {r['refused']}")
            continue
        shape = "x".join(map(str, r["roi"])) + f" x {r['window']} x {r['batch']}"
        held = "" if "heldout_memory_ratio" not in r else \
            f"{r['heldout_memory_ratio']:.2f}/{r['heldout_time_ratio']:.2f}"
        print(f"{r['config']:<34}{shape:>24}{r['predicted_mb']:>10.0f}{r['measured_mb']:>10.0f}"
              f"{r['predicted_mb'] / r['measured_mb']:>7.2f}"
              f"{'ok' if r['measured_mb'] < r['budget_mb'] else 'OVER':>8}"
              f"{r['predicted_s']:>8.2f}{r['measured_s']:>8.2f}"
              f"{r['predicted_s'] / r['measured_s']:>7.2f}{held:>12}")
    ok = [r for r in results if "refused" not in r]
    if ok:
        mem = [r["predicted_mb"] / r["measured_mb"] for r in ok]
        tim = [r["predicted_s"] / r["measured_s"] for r in ok]
        print(f"memory ratio {min(mem):.2f}-{max(mem):.2f} (target 0.85-1.15), time ratio "
              f"{min(tim):.2f}-{max(tim):.2f} (target 0.7-1.4), over budget: "
              f"{sum(r['measured_mb'] >= r['budget_mb'] for r in ok)} of {len(ok)}")
    if fit:
        print(f"refit on {len(fit['train'])} configs: runtime {fit['runtime_mib']} MiB, scale "
              f"{fit['scale']}, time factor {fit['time_factor']} (held-out ratios: last column)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", help="comma-separated names (default: the whole matrix)")
    p.add_argument("--device", default="cpu", help="cpu (the CPU matrix) or cuda (CUDA_MATRIX)")
    p.add_argument("--steps", type=int, default=8, help="training steps per run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    p.add_argument("--json", help="also write one JSON line per configuration here")
    args = p.parse_args(argv)
    matrix = MATRIX if args.device == "cpu" else CUDA_MATRIX
    if args.configs:
        wanted = args.configs.split(",")
        matrix = [row for row in MATRIX + CUDA_MATRIX if name_of(row) in wanted]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for row in matrix:
            r = run_config(row, work, args.steps, env, args.device)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    fit = refit(results) if sum("refused" not in r for r in results) >= 4 else None
    report(results, fit)
    for r in results:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
