"""GPU check of the recurrence core: CUDA tests, layer benchmark, UNet training steps.

One prepared run (about 8 minutes on one GPU) that writes everything it measures under
``--out``:

1. ``tests.log``: the CUDA tests (``pytest -k cuda``): fused == reference on CUDA in float64,
   and the fused path under bf16 and fp16 autocast against the float32 reference
   (``tests/test_nn_mixed_precision.py``, ``tests/test_nn_layers.py``);
2. ``layer.jsonl`` / ``layer.txt``: ``bench_convlstm.py`` on the GPU in fp32, bf16 and fp16,
   each against the cuDNN conv floor of the same precision (same interleaved run);
3. ``unet.jsonl``: one training step (forward, cross-entropy over all frames, backward) of
   ``create_model("reference")`` at 64^3 and 96^3 x T=5, fp32 / bf16 / bf16 + checkpoint,
   against the reference layout (``ref-fixed`` of ``bench_unet.py``): median time of
   ``--steps`` steps after a warm-up and ``torch.cuda.max_memory_allocated`` above the memory
   held before the step;
4. ``plan.jsonl`` / ``plan.txt``: ``bench_plan.py --device cuda``, the memory model of
   one training step (the whole estimate) against ``torch.cuda.max_memory_allocated`` of one
   step, for three of its configurations (ratios to record beside the CPU ones);
5. ``plan_cli.jsonl``: ``bench_plan_cli.py --device cuda``, the plan as a user runs it
   (``synth``, ``plan``, ``train --config plan.yaml`` with validation, fresh processes) on
   its CUDA matrix: the reference widths at 64^3 x 5 frames (40 GB bf16 and fp32, 8 GB with
   recomputation), the largest patch the plan gives for 40 GB on 128^3 cases, a 1 x 1 x 4 mm
   and a 2D fp16 configuration; predicted/measured peak of the process
   (``max_memory_reserved`` plus the context) and step time;
6. ``summary.md``: the tables for docs/benchmarks.md, with the GPU's name.

``--dry-run`` runs the same code on the CPU at tiny sizes (one CPU test, the quick layer
configs, the UNet step at 16^3 with the "tiny" widths) so that CI checks the script; its
numbers mean nothing.

Usage::

    python benchmarks/gpu_check.py --out gpu_results          # on a machine with a GPU
    python benchmarks/gpu_check.py --dry-run --out /tmp/check # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

import bench_convlstm  # noqa: E402
import bench_unet  # noqa: E402
from clstm4d import create_model  # noqa: E402

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_tests(out: Path, dry_run: bool) -> dict:
    """The CUDA tests (dry run: one CPU mixed-precision test) in a pytest subprocess."""
    select = ("test_fused_autocast_equals_reference_autocast and lstm-cpu-bf16" if dry_run
              else "cuda")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", select,
           "tests/test_nn_mixed_precision.py", "tests/test_nn_layers.py"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "tests.log").write_text(res.stdout + res.stderr)
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    return {"step": "tests", "returncode": res.returncode, "selection": select,
            "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - t0, 1)}


def run_layer_bench(out: Path, device: str, dry_run: bool) -> dict:
    """bench_convlstm in every precision against the floor of the same precision."""
    precisions = ["fp32", "bf16"] + ([] if device == "cpu" else ["fp16"])
    argv = ["--device", device, "--precisions", *precisions, "--no-memory"]
    argv += ["--quick"] if dry_run else ["--configs", "small", "mid128", "bottleneck", "vol32",
                                         "--reps", "10"]
    t0 = time.perf_counter()
    buffer = StringIO()
    with redirect_stdout(buffer):
        bench_convlstm.main(argv)
    text = buffer.getvalue()
    (out / "layer.txt").write_text(text)
    rows = [line for line in text.splitlines() if line.startswith("{")]
    (out / "layer.jsonl").write_text("\n".join(rows) + "\n")
    return {"step": "layer", "rows": len(rows), "seconds": round(time.perf_counter() - t0, 1)}


def run_plan_bench(out: Path, device: str, dry_run: bool) -> dict:
    """bench_plan (memory model vs measured peak of one training step) in a subprocess."""
    cmd = [sys.executable, str(HERE / "bench_plan.py"), "--device", device]
    # three configurations (a fresh CUDA process each, ~10 s apiece): the process-level check
    # (plan_cli) is the one the plan is judged by
    cmd += (["--configs", "2d-tiny", "--threads", "1"] if dry_run else
            ["--configs", "3d-small,3d-ref,3d-ref-ckpt-bf16"])
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "plan.txt").write_text(res.stdout + res.stderr)
    rows = [line for line in res.stdout.splitlines() if line.startswith("{")]
    (out / "plan.jsonl").write_text("".join(r + "\n" for r in rows))
    return {"step": "plan", "returncode": res.returncode, "rows": len(rows),
            "seconds": round(time.perf_counter() - t0, 1)}


def run_plan_cli(out: Path, device: str, dry_run: bool) -> dict:
    """bench_plan_cli (plan, then train from the plan, as a user runs them) in a subprocess:
    its CUDA matrix (dry run: one small CPU configuration)."""
    cmd = [sys.executable, str(HERE / "bench_plan_cli.py"), "--device", device, "--steps", "3",
           "--json", str(out / "plan_cli.jsonl")]
    if dry_run:
        cmd += ["--configs", "2d-many-small-640MB-fp32"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "plan_cli.txt").write_text(res.stdout + res.stderr)
    if not (out / "plan_cli.jsonl").exists():
        (out / "plan_cli.jsonl").write_text("")
    return {"step": "plan_cli", "returncode": res.returncode,
            "seconds": round(time.perf_counter() - t0, 1)}


def unet_step(case: str, model, x, y, amp, steps: int, device: str) -> dict:
    """Median step time and peak memory of one training step (CUDA: max_memory_allocated)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    bench_unet.train_step(model, x, y, amp or False)  # warm-up (cuDNN autotuning, caches)
    model.zero_grad(set_to_none=True)
    times = []
    peak = None
    for i in range(steps):
        sync()
        if device == "cuda" and i == 0:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        bench_unet.train_step(model, x, y, amp or False)
        sync()
        times.append(time.perf_counter() - t0)
        if device == "cuda" and i == 0:
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        model.zero_grad(set_to_none=True)
    return {"case": case, "time_s": round(statistics.median(times), 4),
            "peak_mib": None if peak is None else round(peak, 1)}


def run_unet(out: Path, device: str, dry_run: bool) -> dict:
    sizes = [16] if dry_run else [64, 96]
    steps = 1 if dry_run else 3
    preset = {"channels": (8, 16, 32)} if dry_run else {}
    cases = {
        "ref-fixed fp32": (lambda: bench_unet.ReferenceUNet(published=False), None),
        "ours fp32": (lambda: create_model("reference", **preset), None),
        "ours bf16": (lambda: create_model("reference", **preset), "bf16"),
        "ours-ckpt fp32": (lambda: create_model("reference", recompute=True, **preset), None),
        "ours-ckpt bf16": (lambda: create_model("reference", recompute=True, **preset), "bf16"),
    }
    if dry_run:
        cases.pop("ref-fixed fp32")  # the reference widths are far too big for a smoke run
    rows = []
    t0 = time.perf_counter()
    for size in sizes:
        x, y = bench_unet.make_batch(size, 5)
        x, y = x.to(device), y.to(device)
        for case, (build, amp) in cases.items():
            torch.manual_seed(0)
            model = build().to(device).train()
            try:
                row = unet_step(case, model, x, y, AMP[amp] if amp else None, steps, device)
            except torch.cuda.OutOfMemoryError as err:  # report and go on with the next case
                row = {"case": case, "error": str(err).splitlines()[0]}
            row.update(size=size, frames=5, device=device)
            rows.append(row)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    for size in sizes:  # ratios to the reference layout of the same size
        base = next((r for r in rows if r["size"] == size and r["case"] == "ref-fixed fp32"
                     and "time_s" in r), None)
        for r in rows:
            if base and r["size"] == size and "time_s" in r:
                r["time_x_ref"] = round(r["time_s"] / base["time_s"], 3)
                if r["peak_mib"] and base["peak_mib"]:
                    r["mem_x_ref"] = round(r["peak_mib"] / base["peak_mib"], 3)
    (out / "unet.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"step": "unet", "rows": len(rows), "seconds": round(time.perf_counter() - t0, 1)}


def summary(out: Path, device: str, steps: list[dict]) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    lines = [f"# gpu_check on {name}, torch {torch.__version__}", ""]
    lines += [f"- {s['step']}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "step")
              for s in steps]
    def table(title: str, file: str, columns: list[str], row, left: int = 2) -> None:
        # the first `left` columns are names, the others numbers (right-aligned)
        lines.extend(["", f"## {title}", "", "| " + " | ".join(columns) + " |",
                      "|" + "|".join("---" if i < left else "---:"
                                     for i in range(len(columns))) + "|"])
        for line in (out / file).read_text().splitlines():
            lines.append("| " + " | ".join(str(v) for v in row(json.loads(line))) + " |")

    table("Layer (fused vs conv floor of the same precision)", "layer.jsonl",
          ["config", "precision", "clstm4d s", "floor s", "ours/floor", "ours/fp32"],
          lambda r: [r["config"]["name"], r["precision"], f"{r['time_s']['clstm4d']:.4f}",
                     f"{r['time_s']['floor']:.4f}", f"{r['clstm4d_over_floor']:.2f}",
                     f"{r.get('clstm4d_over_fp32', 1.0):.2f}"])
    table("UNet training step (b=1, t=5)", "unet.jsonl",
          ["size", "case", "time s", "x ref", "peak MiB", "x ref"],
          lambda r: [f"{r['size']}^3", r["case"], r.get("time_s", r.get("error")),
                     r.get("time_x_ref", "-"), r.get("peak_mib", "-"), r.get("mem_x_ref", "-")])
    table("Memory model (engine.plan) vs measured peak of one training step", "plan.jsonl",
          ["config", "precision", "ckpt", "measured MiB", "predicted MiB", "pred/meas"],
          lambda r: [r["config"], r["precision"], r["recompute"], r["measured_mib"],
                     r["predicted_mib"], r["ratio"]], left=3)
    table("The plan as a user runs it: train process peak and step time", "plan_cli.jsonl",
          ["config", "roi x window x batch", "pred MiB", "meas MiB", "mem ratio", "pred s",
           "meas s", "time ratio"],
          lambda r: [r["config"], r.get("refused", "x".join(map(str, r.get("roi", [])))
                                        + f" x {r.get('window')} x {r.get('batch')}"),
                     r.get("predicted_mb", "-"), r.get("measured_mb", "-"),
                     round(r["predicted_mb"] / r["measured_mb"], 3) if "measured_mb" in r
                     else "-", round(r.get("predicted_s", 0), 3),
                     round(r.get("measured_s", 0), 3),
                     round(r["predicted_s"] / r["measured_s"], 3) if "measured_s" in r
                     else "-"], left=2)
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--dry-run", action="store_true",
                        help="the same code on the CPU at tiny sizes (numbers mean nothing)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["tests", "layer", "unet", "plan", "plan_cli"])
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = []
    for name, fn in (("tests", lambda: run_tests(args.out, args.dry_run)),
                     ("layer", lambda: run_layer_bench(args.out, device, args.dry_run)),
                     ("unet", lambda: run_unet(args.out, device, args.dry_run)),
                     ("plan", lambda: run_plan_bench(args.out, device, args.dry_run)),
                     ("plan_cli", lambda: run_plan_cli(args.out, device, args.dry_run))):
        if name in args.skip:
            (args.out / f"{name}.jsonl").write_text("")
            continue
        steps.append(fn())
        print(json.dumps(steps[-1]), flush=True)
    print(summary(args.out, device, steps))
    failed = [s for s in steps if s.get("returncode", 0) != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
