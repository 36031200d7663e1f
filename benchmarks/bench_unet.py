"""One training step of the time-resolved UNet against the reference layout, same run.

A training step = forward of ``(b, t, 1, *s)``, cross-entropy over **all** frames, backward
(no optimiser). Cases (``--cases``, comma separated; default all):

- ``ref-published``: the reference layout as published (re-implemented below, benchmark-only):
  3D UNet 64-128-256-512, BatchNorm + ReLU, trilinear upsampling, a concatenated-design
  ConvLSTM (one conv over ``cat(x_t, h)`` per step) at the bottleneck, and **four** upsampling
  stages for three poolings: the last one zooms the full-resolution map 2x and crops its centre.
- ``ref-fixed``: the same with the extra stage removed (three up-stages): **the baseline**.
- ``ours``, ``ours-ckpt``, ``ours-ckpt-bf16``: ``create_model("reference")`` (same widths,
  ConvLSTM k=3 at the bottleneck), plain / ``recompute=True`` / plus bf16 autocast;
  ``ours-bf16``: plain under bf16 autocast; ``ours-bf16-rnn32``, ``ours-ckpt-bf16-rnn32``: bf16
  with the recurrence held in float32 (the rule the UNet had before the fused recurrence ran
  in bf16; benchmark-only wrapper), to compare the two.
- ``none-ckpt``, ``skips-ckpt``: the other ``temporal`` modes at the same widths, checkpointed.
- ``small``: ``create_model("small")`` (16-32-64-128), plain.

Time: every case in one process, one warm-up step each, then ``--reps`` rounds; in each round
every case runs once (interleaved), so drifting machine load hits all cases alike. Reported:
median wall time of a step and the median over rounds of the per-round ratio to ``ref-fixed``,
and the same for the process CPU time (``time.process_time``, all threads), which waiting for
a CPU shared with other jobs does not inflate.

Memory: a fresh subprocess per case (nothing else alive in it): build the model and the
batch, reset the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5) and run one step
with gradients starting from ``None``. ``step_peak`` = VmHWM after the step minus VmRSS before
it: activations, parameter gradients (``grad_mb``), workspace and whatever the first step
allocates for good (library caches), so it is conservative; the interpreter, torch and the
parameters are excluded and listed as ``rss_before``. The child runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed tensors to the OS at once and
RSS follows the live tensors (otherwise its dynamic threshold keeps freed blocks in the heap
and RSS overstates later peaks). Linux only.

Usage (from the repository root):
    nice python benchmarks/bench_unet.py                  # 32^3, t=5, b=1, all cases
    nice python benchmarks/bench_unet.py --size 64 --skip-time --cases ref-fixed,ours-ckpt
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from clstm4d import create_model  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the reference layout (benchmark baseline only; written from its published description)


class _TwoConvBN(nn.Sequential):
    """(conv 3^3 with bias -> BatchNorm -> ReLU) x 2, as the reference's blocks."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        )


class _ConcatConvLSTM(nn.Module):
    """The common design: per step one conv over cat(x_t, h) to 4h channels, gates i, f, o, g."""

    def __init__(self, cin: int, hidden: int, k: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv3d(cin + hidden, 4 * hidden, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, c, *s) -> (b, t, h, *s)
        b, t, _, *s = x.shape
        h = x.new_zeros(b, self.hidden, *s)
        c = x.new_zeros(b, self.hidden, *s)
        outs = []
        for step in range(t):
            i, f, o, g = self.conv(torch.cat([x[:, step], h], 1)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, 1)


class _Up(nn.Module):
    """Trilinear 2x upsampling, pad (or, when larger, centre-crop) to the skip, concat, convs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _TwoConvBN(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        pads = []
        for a, b in zip(reversed(skip.shape[2:]), reversed(x.shape[2:]), strict=True):
            d = a - b  # negative: crop the centre
            pads += [d // 2, d - d // 2]
        return self.conv(torch.cat([skip, F.pad(x, pads)], 1))


class ReferenceUNet(nn.Module):
    """The reference time-resolved UNet; ``published=True`` keeps its extra 4th up-stage."""

    def __init__(self, in_channels: int = 1, out_channels: int = 2, published: bool = True):
        super().__init__()
        w = (64, 128, 256, 512)
        self.inc = _TwoConvBN(in_channels, w[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool3d(2), _TwoConvBN(w[i], w[i + 1])) for i in range(3))
        self.clstm = _ConcatConvLSTM(w[3], w[3])
        self.ups = nn.ModuleList([_Up(w[3] + w[2], w[2]), _Up(w[2] + w[1], w[1]),
                                  _Up(w[1] + w[0], w[0])])
        if published:
            self.ups.append(_Up(w[0] + w[0], w[0]))  # zooms the centre, misaligned with skip
        self.outc = nn.Conv3d(w[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        feats = [self.inc(x.flatten(0, 1))]  # (b*t, 64, *s)
        for down in self.downs:
            feats.append(down(feats[-1]))
        y = self.clstm(feats[-1].unflatten(0, (b, t))).flatten(0, 1)
        skips = feats[2::-1] + [feats[0]]  # the 4th stage reuses the full-resolution skip
        for up, skip in zip(self.ups, skips, strict=False):
            y = up(y, skip)
        return self.outc(y).unflatten(0, (b, t))


# ----------------------------------------------------------------------------------------------
# cases

def _float32_recurrence(model: nn.Module) -> nn.Module:
    """Run the model's recurrences in float32 under autocast (the former rule)."""
    for rec in model.recurrence.values():
        plain = rec.forward

        def forward(x, state=None, _plain=plain):
            with torch.autocast(x.device.type, enabled=False):
                return _plain(x.float(), state)

        rec.forward = forward
    return model


CASES = {
    "ref-published": (lambda: ReferenceUNet(published=True), False),
    "ref-fixed": (lambda: ReferenceUNet(published=False), False),
    "ours": (lambda: create_model("reference"), False),
    "ours-bf16": (lambda: create_model("reference"), True),
    "ours-bf16-rnn32": (lambda: _float32_recurrence(create_model("reference")), True),
    "ours-ckpt": (lambda: create_model("reference", recompute=True), False),
    "ours-ckpt-bf16": (lambda: create_model("reference", recompute=True), True),
    "ours-ckpt-bf16-rnn32": (
        lambda: _float32_recurrence(create_model("reference", recompute=True)), True),
    "none-ckpt": (lambda: create_model("reference", temporal="none", recompute=True), False),
    "skips-ckpt": (lambda: create_model("reference", temporal="skips", recompute=True), False),
    "small": (lambda: create_model("small"), False),
}
BASELINE = "ref-fixed"


def make_batch(size: int, frames: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 1, size, size, size, generator=g)
    y = torch.randint(0, 2, (batch, frames, size, size, size), generator=g)
    return x, y


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               amp: bool | torch.dtype) -> None:
    """Forward, cross-entropy over every frame, backward (gradients left in ``.grad``);
    ``amp``: an autocast dtype, True for bfloat16 or False for none."""
    dtype = torch.bfloat16 if amp is True else amp
    with torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext():
        logits = model(x)  # (b, t, k, *s)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(0, 1))
    loss.backward()


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


def child_memory(case: str, size: int, frames: int) -> dict:
    """Run in a fresh process: peak RSS of one training step (see module docstring)."""
    torch.manual_seed(0)
    build, bf16 = CASES[case]
    model = build().train()
    x, y = make_batch(size, frames)
    gc.collect()
    before = _status_mb("VmRSS")  # interpreter, torch, parameters, batch
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    train_step(model, x, y, bf16)  # the first step: one-time allocations count too
    peak = _status_mb("VmHWM")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                if p.grad is not None) / 2**20
    return {"rss_before_mb": round(before, 1), "step_peak_mb": round(peak - before, 1),
            "grad_mb": round(grads, 1)}


def measure_memory(cases: list[str], size: int, frames: int) -> dict[str, dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    for case in cases:
        cmd = [sys.executable, __file__, "--child", case, "--size", str(size),
               "--frames", str(frames), "--threads", str(torch.get_num_threads())]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[case] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  memory {case}: {out[case]}", file=sys.stderr, flush=True)
    return out


def measure_time(cases: list[str], size: int, frames: int,
                 reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    models = {}
    for case in cases:
        torch.manual_seed(0)
        models[case] = CASES[case][0]().train()
    x, y = make_batch(size, frames)
    times: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    for rep in range(reps + 1):  # round 0 is the warm-up
        for case in cases:
            model = models[case]
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(model, x, y, CASES[case][1])
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            model.zero_grad(set_to_none=True)
            if rep:
                times[case].append(dt)
                cpu[case].append(dc)
        print(f"  round {rep}: " + ", ".join(f"{c} {times[c][-1]:.2f}s" for c in cases if rep),
              file=sys.stderr, flush=True)
    return times, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="cubic patch edge (default 32)")
    p.add_argument("--frames", type=int, default=5, help="frames t (default 5)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--skip-time", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args.child, args.size, args.frames)))
        return 0
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    if BASELINE not in cases:
        cases.insert(0, BASELINE)
    mem = {} if args.skip_memory else measure_memory(cases, args.size, args.frames)
    times, cpu = ({}, {}) if args.skip_time else measure_time(cases, args.size, args.frames,
                                                              args.reps)

    rows = []
    for case in cases:
        torch.manual_seed(0)
        with torch.device("meta"):
            params = sum(q.numel() for q in CASES[case][0]().parameters()) / 1e6
        row = {"bench": "unet", "case": case, "size": args.size, "frames": args.frames,
               "batch": 1, "params_m": round(params, 2), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
        if times:
            row["time_s"] = round(statistics.median(times[case]), 3)
            row["time_ratio"] = round(statistics.median(
                a / b for a, b in zip(times[case], times[BASELINE], strict=True)), 3)
            row["cpu_s"] = round(statistics.median(cpu[case]), 3)
            row["cpu_ratio"] = round(statistics.median(
                a / b for a, b in zip(cpu[case], cpu[BASELINE], strict=True)), 3)
            row["reps"] = args.reps
        if mem:
            row.update(mem[case])
            row["mem_ratio"] = round(mem[case]["step_peak_mb"]
                                     / mem[BASELINE]["step_peak_mb"], 3)
        rows.append(row)

    head = (f"{'case':<16}{'params M':>9}{'time s':>9}{'x fixed':>9}{'cpu s':>9}{'x fixed':>9}"
            f"{'peak MB':>9}{'x fixed':>9}")
    print(f"one training step, b=1, t={args.frames}, {args.size}^3, CPU "
          f"({torch.get_num_threads()} threads); baseline = {BASELINE}")
    print(head)
    nan = float("nan")
    for r in rows:
        print(f"{r['case']:<16}{r['params_m']:>9.1f}{r.get('time_s', nan):>9.2f}"
              f"{r.get('time_ratio', nan):>9.2f}{r.get('cpu_s', nan):>9.2f}"
              f"{r.get('cpu_ratio', nan):>9.2f}"
              f"{r.get('step_peak_mb', nan):>9.0f}{r.get('mem_ratio', nan):>9.2f}")
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
