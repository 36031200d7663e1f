"""The memory model against measured peaks: predicted / measured for one training step.

Every configuration runs in a fresh subprocess (nothing else alive in it): build the model,
AdamW and the loss, take one warm-up step (AdamW allocates its moments, libraries their
caches), hand freed memory back to the OS, then measure the next step, batch creation included:

- CPU: the peak resident set of that step above the resident set before it (the kernel's
  high-water mark is reset through ``/proc/self/clear_refs``; the child runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS at once, as
  ``bench_unet.py`` does). Compared with the model's **step** part,
  ``estimate_memory(...) - persistent`` (parameters, AdamW moments and the previous step's
  gradients are alive before the step, so the measurement cannot see them; they are exact
  arithmetic: 16 bytes per parameter).
- CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the step from a reset,
  which sees everything PyTorch allocated, compared with the whole estimate.

``predicted / measured`` per configuration is the result; the target is 0.85-1.15 for every
one. ``--calibrate`` refits the workspace constants of ``clstm4d.engine.planning.memory`` that these
configurations bind (forward, transient, recompute, recurrence_weights) by least squares of
the log
ratio over the measurements and prints them (copy them into ``CONSTANTS``; then run again
without it to check).

Usage (from the repository root; about 5 minutes on one shared core):
    nice python benchmarks/bench_plan.py --threads 1
    nice python benchmarks/bench_plan.py --configs 3d-tiny,2d-tiny --threads 1
    nice python benchmarks/bench_plan.py --threads 1 --calibrate
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

# name -> model config, roi, window, batch, precision, activation checkpointing
CONFIGS: dict[str, dict] = {
    "2d-tiny": dict(model={"name": "tiny", "spatial_dims": 2}, roi=[128, 128], window=8,
                    batch=4, precision="fp32", recompute=False),
    "2d-small-skips": dict(model={"name": "small", "spatial_dims": 2, "temporal": "skips"},
                           roi=[96, 96], window=6, batch=2, precision="fp32",
                           recompute=False),
    "2d-small-skips-gated": dict(model={"name": "small", "spatial_dims": 2, "temporal": "skips",
                                        "fusion": "gated"},
                                 roi=[96, 96], window=6, batch=2, precision="fp32",
                                 recompute=False),
    "2d-small-ckpt": dict(model={"name": "small", "spatial_dims": 2}, roi=[128, 128],
                          window=8, batch=2, precision="fp32", recompute=True),
    "2d-small-bf16": dict(model={"name": "small", "spatial_dims": 2}, roi=[128, 128],
                          window=8, batch=2, precision="bf16", recompute=False),
    "2d-tac": dict(model={"name": "tac-small", "spatial_dims": 2}, roi=[96, 96], window=8,
                   batch=4, precision="fp32", recompute=False),
    "3d-tiny": dict(model={"name": "tiny"}, roi=[32, 32, 32], window=8, batch=1,
                    precision="fp32", recompute=False),
    "3d-tiny-b2-bf16": dict(model={"name": "tiny"}, roi=[32, 32, 32], window=4, batch=2,
                            precision="bf16", recompute=False),
    "3d-small": dict(model={"name": "small"}, roi=[32, 32, 32], window=4, batch=1,
                     precision="fp32", recompute=False),
    "3d-small-ckpt": dict(model={"name": "small"}, roi=[48, 48, 48], window=4, batch=1,
                          precision="fp32", recompute=True),
    "3d-small-ckpt-bf16": dict(model={"name": "small"}, roi=[48, 48, 48], window=4, batch=1,
                               precision="bf16", recompute=True),
    "3d-skips-gru-ckpt": dict(model={"name": "small", "temporal": "skips", "cell": "gru"},
                              roi=[32, 32, 32], window=4, batch=1, precision="fp32",
                              recompute=True),
    "3d-aniso": dict(model={"name": "small", "strides": [[2, 2, 1], [2, 2, 2], [2, 2, 2]],
                            "kernel_sizes": [[3, 3, 1], [3, 3, 1], 3, 3]},
                     roi=[64, 64, 16], window=4, batch=1, precision="fp32",
                     recompute=False),
    "3d-ref": dict(model={"name": "reference"}, roi=[32, 32, 32], window=5, batch=1,
                   precision="fp32", recompute=False),
    "3d-ref-ckpt": dict(model={"name": "reference"}, roi=[32, 32, 32], window=5, batch=1,
                        precision="fp32", recompute=True),
    "3d-ref-ckpt-bf16": dict(model={"name": "reference"}, roi=[32, 32, 32], window=5,
                             batch=1, precision="bf16", recompute=True),
}
TARGET = (0.85, 1.15)


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024


def child(name: str, device_name: str) -> dict:
    """In a fresh process: the measured peak of the second training step of ``name``."""
    import ctypes

    import torch

    from clstm4d.engine.planning.memory import memory_breakdown
    from clstm4d.engine.run.config import create
    from clstm4d.engine.training.losses import SequenceLoss
    from clstm4d.engine.training.optim import param_groups
    from clstm4d.engine.training.step import training_step

    c = CONFIGS[name]
    device = torch.device(device_name)
    mc = {**c["model"], "recompute": c["recompute"]}
    torch.manual_seed(0)
    model = create(**mc).to(device)
    k = model.config["out_channels"]
    optimizer = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-4)  # as fit builds it
    loss_fn = SequenceLoss()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[c["precision"]]

    def step(seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        shape = (c["batch"], c["window"])
        x = torch.randn(*shape, model.config["in_channels"], *c["roi"], generator=g)
        y = torch.randint(0, k, (*shape, *c["roi"]), generator=g)
        t0 = time.perf_counter()
        training_step(model, optimizer, loss_fn, x.to(device), y.to(device), device=device,
                      amp_dtype=dtype)
        return time.perf_counter() - t0

    step(1)  # warm-up: AdamW's moments, library caches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        seconds = step(2)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        seconds = step(2)
        measured = _status("VmHWM") - before
    est = memory_breakdown(c["model"], c["roi"], c["window"], c["batch"], c["precision"],
                           c["recompute"], device=device.type)
    predicted = est.total if device.type == "cuda" else est.step
    return {"measured": measured, "predicted": predicted, "seconds": seconds,
            "estimate": est.to_dict()}


def measure(names: list[str], device: str, threads: int | None) -> dict[str, dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"child {name} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        r = out[name]
        print(f"  {name}: measured {r['measured'] / 2**20:.1f} MiB, predicted "
              f"{r['predicted'] / 2**20:.1f} MiB ({r['seconds']:.1f} s)", file=sys.stderr,
              flush=True)
    return out


def calibrate(results: dict[str, dict], device: str) -> dict[str, float]:
    """Least squares of log(predicted / measured) over the workspace constants that these
    configurations bind (transient, recompute, recurrence_weights); the structural terms and
    the other constants stay as they are."""
    import dataclasses

    import numpy as np
    from scipy.optimize import least_squares

    from clstm4d.engine.planning import memory as plan

    names = list(results)
    base = plan.CONSTANTS[device]

    keys = ("forward", "transient", "recompute", "recurrence_weights")  # what these bind

    def residuals(v):
        consts = dataclasses.replace(base, **dict(zip(keys, v, strict=True)))
        plan.CONSTANTS[device] = consts
        try:
            out = []
            for name in names:
                c = CONFIGS[name]
                est = plan.memory_breakdown(c["model"], c["roi"], c["window"], c["batch"],
                                            c["precision"], c["recompute"], device=device)
                pred = est.total if device == "cuda" else est.step
                out.append(math.log(pred / results[name]["measured"]))
            return np.array(out)
        finally:
            plan.CONSTANTS[device] = base

    fit = least_squares(residuals, x0=[getattr(base, k) for k in keys],
                        bounds=([0] * len(keys), [20] * len(keys)), diff_step=1e-2)
    out = {k: round(float(v), 3) for k, v in zip(keys, fit.x, strict=True)}
    out["ratios"] = [round(float(math.exp(r)), 3) for r in fit.fun]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--calibrate", action="store_true",
                   help="refit the workspace constants from these measurements")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.device)))
        return 0
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    results = measure(names, args.device, args.threads)
    import torch

    what = "whole estimate vs max_memory_allocated" if args.device.startswith("cuda") else \
        "step part (estimate - parameters, gradients, AdamW moments) vs peak RSS above the " \
        "step's start"
    print(f"one training step (AdamW), {args.device}, torch {torch.__version__}; {what}")
    print(f"{'config':<20}{'dims':>5}{'roi':>14}{'t':>3}{'n':>3}{'prec':>6}{'ckpt':>6}"
          f"{'measured MiB':>14}{'predicted MiB':>15}{'pred/meas':>11}")
    rows = []
    for name in names:
        c, r = CONFIGS[name], results[name]
        ratio = r["predicted"] / r["measured"]
        rows.append({"bench": "plan", "config": name, **{k: c[k] for k in
                     ("model", "roi", "window", "batch", "precision", "recompute")},
                     "device": args.device, "measured_mib": round(r["measured"] / 2**20, 1),
                     "predicted_mib": round(r["predicted"] / 2**20, 1),
                     "ratio": round(ratio, 3), "in_target": TARGET[0] <= ratio <= TARGET[1],
                     "total_estimate_mib": round(r["estimate"]["total"] / 2**20, 1),
                     "phase": r["estimate"]["phase"], "seconds": round(r["seconds"], 2),
                     "threads": args.threads, "torch": torch.__version__})
        print(f"{name:<20}{len(c['roi']):>5}{'x'.join(map(str, c['roi'])):>14}"
              f"{c['window']:>3}{c['batch']:>3}{c['precision']:>6}"
              f"{'on' if c['recompute'] else 'off':>6}{r['measured'] / 2**20:>14.1f}"
              f"{r['predicted'] / 2**20:>15.1f}{ratio:>11.3f}")
    ratios = [r["ratio"] for r in rows]
    inside = sum(r["in_target"] for r in rows)
    print(f"{inside}/{len(rows)} ratios in {TARGET[0]}-{TARGET[1]}; range "
          f"{min(ratios):.3f}-{max(ratios):.3f}")
    for r in rows:
        print(json.dumps(r))
    if args.calibrate:
        print("calibrated constants:", json.dumps(calibrate(results, args.device.split(":")[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
