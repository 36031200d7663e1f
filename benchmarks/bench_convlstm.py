"""ConvLSTM layer benchmark: clstm4d.ConvLSTM vs the usual "cat(x_t, h) + one conv per step".

For every config it measures forward + backward (loss = sum of the outputs, gradients for the
input and all weights) of

- ``baseline``: the common design, re-implemented here: per step ``cat(x_t, h)``, one conv to
  4H channels, chunk into i, f, o, g, gate update; outputs stacked at the end;
- ``clstm4d``: :class:`clstm4d.ConvLSTM` (``recompute=`` as the config says);
- ``floor``: the same convolution FLOPs as one batched call per weight (all frames folded into
  the batch: input->hidden and hidden->hidden conv of every layer), the speed limit of any
  ConvLSTM that runs these convolutions.

Mixed precision (``--precisions``, default ``fp32 bf16``): for ``bf16`` / ``fp16`` the same
step runs under ``torch.autocast`` with float32 parameters: ``clstm4d`` (the fused backend),
``reference`` (``backend="reference"``: autograd through the same steps, what the layer did
under autocast before the fused path supported it) and ``floor`` (the floor's convolutions
under autocast). Their rows give ``clstm4d / floor`` of the same precision and ``clstm4d /
clstm4d fp32``, all from one interleaved run.

Time: median over interleaved repetitions (baseline, clstm4d, floor, baseline, ...) in one
process, after warm-up; ratios are taken between numbers measured in the same run, because the
machine may be shared. Peak memory: each (config, implementation) runs in a fresh subprocess
with ``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks are mmapped and returned to the OS on
free, so the resident set follows live memory); after one warm-up iteration the kernel's RSS
high-water mark is reset (``/proc/self/clear_refs``), one more iteration runs, and the peak is
``VmHWM - RSS before the iteration``: everything the iteration added (activations saved for
backward, gradients, temporaries and convolution workspaces), not parameters and inputs.
On CUDA the peak is ``torch.cuda.max_memory_allocated`` above the memory allocated before.

Process-to-process noise: on a shared machine the same config can measure 20-40% apart in two
fresh processes (the whole process runs slower or faster: the floor too), and what else the
process ran before changes the ratios (the float32 ``baseline`` in the same process made the
16-channel bf16 ratio about 1.45x where a process without it measured about 1.27x, median over
processes; we did not find the cause: not the allocator's thresholds, not the order of the
cases). ``--processes N`` repeats the timing in N fresh processes and prints the median and
range of every ratio over them; ``--no-baseline`` leaves the float32 cat+conv baseline out of
the timed process (the bf16 rows do not use it).

Prints a table and one JSON line per config. Example::

    nice python benchmarks/bench_convlstm.py            # all configs (minutes on 2 cores)
    python benchmarks/bench_convlstm.py --quick          # small smoke run
    python benchmarks/bench_convlstm.py --configs small bottleneck --reps 7
    nice python benchmarks/bench_convlstm.py --configs small mid128 vol32 --threads 1 \
        --precisions fp32 bf16 --no-memory
    python benchmarks/bench_convlstm.py --configs small --threads 1 --processes 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from clstm4d import ConvLSTM  # noqa: E402

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Config:
    name: str
    spatial_dims: int
    n: int
    t: int
    channels: int
    size: int
    num_layers: int = 1
    kernel: int = 3
    recompute: bool = False
    time_target: float | None = None  # clstm4d time / baseline time
    memory_target: float | None = None  # clstm4d peak / baseline peak
    low_floor_target: float | None = None  # clstm4d bf16 time / bf16 floor time
    low_fp32_target: float | None = None  # clstm4d bf16 time / clstm4d fp32 time


CONFIGS = {
    c.name: c
    for c in [
        Config("small", 3, 1, 5, 16, 16, time_target=0.4, memory_target=0.65,
               low_floor_target=1.35, low_fp32_target=0.65),
        # small's channels and frames at 4^3 voxels: convolutions nearly free, so its time is
        # the fixed cost of a step (Python, dispatch, per-frame calls)
        Config("fixed16", 3, 1, 5, 16, 4),
        Config("mid128", 3, 1, 5, 128, 8, low_floor_target=1.2, low_fp32_target=0.45),
        Config("bottleneck", 3, 1, 5, 512, 8, time_target=0.7, memory_target=0.65),
        Config("vol32", 3, 1, 8, 32, 32, num_layers=2, time_target=0.9, memory_target=0.8,
               low_floor_target=1.2, low_fp32_target=0.55),
        Config("vol32_ckpt", 3, 1, 8, 32, 32, num_layers=2, recompute=True,
               time_target=1.2, memory_target=0.45),
        Config("2d", 2, 4, 10, 64, 64, time_target=1.05, memory_target=0.8),
    ]
}
QUICK = {
    c.name: c
    for c in [
        Config("quick3d", 3, 1, 3, 8, 8),
        Config("quick3d_ckpt", 3, 1, 3, 8, 8, num_layers=2, recompute=True),
        Config("quick2d", 2, 2, 3, 8, 16),
    ]
}


class CatConvLSTM(nn.Module):
    """The usual design: per step one conv over cat(x_t, h) to 4H channels, gates i, f, o, g."""

    def __init__(self, spatial_dims, in_channels, hidden, kernel, num_layers):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.hidden = hidden
        self.convs = nn.ModuleList(
            conv((in_channels if k == 0 else hidden) + hidden, 4 * hidden, kernel,
                 padding=kernel // 2)
            for k in range(num_layers)
        )

    def forward(self, x):  # (n, t, c, *s)
        for conv in self.convs:
            h = x.new_zeros((x.shape[0], self.hidden, *x.shape[3:]))
            c = torch.zeros_like(h)
            outputs = []
            for t in range(x.shape[1]):
                gates = conv(torch.cat([x[:, t], h], dim=1))
                i, f, o, g = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
        return x, (h, c)


class ConvFloor(nn.Module):
    """The convolution FLOPs of a ConvLSTM run as one batched call per weight."""

    def __init__(self, spatial_dims, in_channels, hidden, kernel, num_layers):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.pad = kernel // 2
        self.weights = nn.ParameterList()
        k_shape = (kernel,) * spatial_dims
        for k in range(num_layers):
            c_in = in_channels if k == 0 else hidden
            for c in (c_in, hidden):  # w_ih, w_hh
                self.weights.append(nn.Parameter(torch.randn(4 * hidden, c, *k_shape) * 0.01))
        self.hidden = hidden

    def forward(self, x):  # (n, t, c, *s)
        conv = _CONV[self.spatial_dims]
        frames = x.flatten(0, 1)  # (n*t, c, *s)
        for w_ih, w_hh in zip(self.weights[::2], self.weights[1::2], strict=True):
            gates = conv(frames, w_ih, padding=self.pad)  # (n*t, 4h, *s)
            h_all = gates[:, : self.hidden]  # stands in for the hidden states
            gates = gates + conv(h_all.contiguous(), w_hh, padding=self.pad)
            frames = gates[:, self.hidden: 2 * self.hidden]
        return frames, None


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = {"fp32": ("baseline", "clstm4d", "floor"), "bf16": ("clstm4d", "reference", "floor"),
         "fp16": ("clstm4d", "reference", "floor")}


def build(impl: str, cfg: Config, device: str):
    torch.manual_seed(0)
    args = (cfg.spatial_dims, cfg.channels, cfg.channels, cfg.kernel, cfg.num_layers)
    if impl == "baseline":
        model = CatConvLSTM(*args)
    elif impl in ("clstm4d", "reference"):
        model = ConvLSTM(*args, recompute=cfg.recompute,
                         backend="auto" if impl == "clstm4d" else "reference")
    else:
        model = ConvFloor(*args)
    model = model.to(device)
    x = torch.randn(cfg.n, cfg.t, cfg.channels, *(cfg.size,) * cfg.spatial_dims, device=device,
                    requires_grad=True)
    return model, x


def step(model, x, precision: str = "fp32"):
    dtype = PRECISIONS[precision]
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out, _ = model(x)
    out.float().sum().backward()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_config(cfg: Config, cases, reps: int, device: str
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process CPU time of a step of every ``(impl, precision)`` case, keyed
    ``"impl precision"``. CPU time (all threads of the process) is not inflated by waiting
    for a core that other jobs hold; with ``--threads 1`` it is the steadier figure on a
    shared machine (on CUDA only the wall time means anything)."""
    built = {impl: build(impl, cfg, device) for impl in {impl for impl, _ in cases}}
    for impl, precision in cases:  # warm-up
        step(*built[impl], precision)
    times = {f"{impl} {precision}": [] for impl, precision in cases}
    cpu = {key: [] for key in times}
    for _ in range(reps):
        for impl, precision in cases:
            model, x = built[impl]
            model.zero_grad(set_to_none=True)
            x.grad = None
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step(model, x, precision)
            sync(device)
            times[f"{impl} {precision}"].append(time.perf_counter() - start)
            cpu[f"{impl} {precision}"].append(time.process_time() - start_cpu)
    return ({key: statistics.median(v) for key, v in times.items()},
            {key: statistics.median(v) for key, v in cpu.items()})


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_here(cfg: Config, impl: str, device: str, precision: str = "fp32") -> float:
    """Peak MiB added by one forward + backward (run in a fresh process; see module doc)."""
    model, x = build(impl, cfg, device)
    step(model, x, precision)  # warm-up: lazy initialisation, gradient buffers exist afterwards
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, x, precision)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    step(model, x, precision)
    return (_rss_kib("VmHWM") - base) / 1024


def peak_memory(cfg: Config, impl: str, device: str, precision: str = "fp32") -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_convlstm as b; b.torch.set_num_threads({torch.get_num_threads()}); "
            f"print(b.peak_memory_here(b.Config(**{asdict(cfg)!r}), {impl!r}, {device!r}, "
            f"{precision!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _fmt(value, spec=".2f", width=7) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


RATIOS = ("clstm4d_over_floor", "cpu_clstm4d_over_floor", "clstm4d_over_fp32",
          "cpu_clstm4d_over_fp32", "time_ratio", "reference_over_floor")


def over_processes(args, argv: list[str]) -> int:
    """Run the timing in ``args.processes`` fresh processes; print each ratio's median and
    range over them (and the memory of one more run, unless ``--no-memory``)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for i in range(args.processes):
        # the last --processes wins in argparse: each child times once
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--processes", "1"]
        if i > 0 or args.no_memory:
            cmd.append("--no-memory")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                res = json.loads(line)
                runs.setdefault((res["config"]["name"], res["precision"]), []).append(res)
    print(f"# {args.processes} fresh processes; median [min - max] of each ratio over them")
    for (name, p), results in runs.items():
        summary = {"config": name, "precision": p, "processes": len(results)}
        cells = []
        for key in RATIOS:
            values = [r[key] for r in results if r.get(key) is not None]
            if not values:
                continue
            med = statistics.median(values)
            summary[key] = {"median": med, "min": min(values), "max": max(values),
                            "values": values}
            cells.append(f"{key} {med:.2f} [{min(values):.2f} - {max(values):.2f}]")
        mem = [r["peak_mib"] for r in results if r["peak_mib"]]
        if mem:
            summary["peak_mib"] = mem[0]
        print(json.dumps(summary))
        print(f"{name:<12} {p:<5} " + "; ".join(cells))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None,
                        help=f"subset of {list(CONFIGS)} (default: all)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--quick", action="store_true", help="tiny configs, 3 reps: smoke run")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                        choices=list(PRECISIONS), help="fp32 is always measured (the reference)")
    parser.add_argument("--processes", type=int, default=1,
                        help="repeat the timing in N fresh processes; print the median and "
                             "range of every ratio over them (memory is measured once)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="leave the float32 cat+conv baseline out of the timed process")
    args = parser.parse_args(argv)
    if args.processes > 1:
        return over_processes(args, sys.argv[1:] if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    table = QUICK if args.quick else CONFIGS
    names = args.configs or list(table)
    reps = 3 if args.quick else args.reps
    precisions = ["fp32"] + [p for p in args.precisions if p != "fp32"]
    cases = [(impl, p) for p in precisions for impl in IMPLS[p]
             if not (args.no_baseline and impl == "baseline")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torch {torch.__version__}, device {args.device}, threads "
          f"{torch.get_num_threads()}, {reps} interleaved reps, {'/'.join(precisions)}, "
          f"forward+backward, load average {load:.1f}")
    header = (f"{'config':<12} {'prec':<5} {'clstm4d s':>10} {'floor s':>9} {'ours/floor':>10} "
              f"{'target':>7} {'base s':>8} {'x base':>7} {'target':>7} {'ref s':>8} "
              f"{'ours/fp32':>9} {'target':>7} {'ours MiB':>9} {'mem x':>6} {'target':>7} "
              f"{'cpu: ours/floor':>15} {'x base':>7} {'ours/fp32':>9}")
    rows, results = [], []
    fp32_mem = None
    for name in names:
        cfg = table[name]
        t, cpu = time_config(cfg, cases, reps, args.device)
        for p in precisions:
            low = p != "fp32"
            mem = {} if args.no_memory else {
                impl: peak_memory(cfg, impl, args.device, p)
                for impl in (("clstm4d",) if low else ("baseline", "clstm4d"))}
            ours = t[f"clstm4d {p}"]
            res = {
                "config": asdict(cfg), "precision": p, "device": args.device,
                "threads": torch.get_num_threads(), "reps": reps, "load": load,
                "time_s": {k.split()[0]: v for k, v in t.items() if k.endswith(" " + p)},
                "cpu_s": {k.split()[0]: v for k, v in cpu.items() if k.endswith(" " + p)},
                "clstm4d_over_floor": ours / t[f"floor {p}"],
                "cpu_clstm4d_over_floor": cpu[f"clstm4d {p}"] / cpu[f"floor {p}"],
                "peak_mib": mem,
            }
            if low:
                res["clstm4d_over_fp32"] = ours / t["clstm4d fp32"]
                res["cpu_clstm4d_over_fp32"] = cpu[f"clstm4d {p}"] / cpu["clstm4d fp32"]
                res["reference_over_floor"] = t[f"reference {p}"] / t[f"floor {p}"]
                res["peak_over_fp32"] = mem["clstm4d"] / fp32_mem if mem else None
            else:
                base = "baseline fp32" in t
                res["time_ratio"] = ours / t["baseline fp32"] if base else None
                res["cpu_time_ratio"] = (cpu["clstm4d fp32"] / cpu["baseline fp32"] if base
                                         else None)
                res["baseline_over_floor"] = t["baseline fp32"] / t["floor fp32"] if base else None
                res["memory_ratio"] = mem["clstm4d"] / mem["baseline"] if mem else None
                fp32_mem = mem.get("clstm4d")
            results.append(res)
            print(json.dumps(res), flush=True)
            rows.append(
                f"{name:<12} {p:<5} {ours:>10.3f} {t[f'floor {p}']:>9.3f} "
                f"{res['clstm4d_over_floor']:>10.2f} "
                f"{_fmt(cfg.low_floor_target if low else None)} "
                f"{_fmt(None if low else t.get('baseline fp32'), '.3f', 8)} "
                f"{_fmt(None if low else res['time_ratio'])} "
                f"{_fmt(None if low else cfg.time_target)} "
                f"{_fmt(t[f'reference {p}'] if low else None, '.3f', 8)} "
                f"{_fmt(res.get('clstm4d_over_fp32'), '.2f', 9)} "
                f"{_fmt(cfg.low_fp32_target if low else None)} "
                f"{_fmt(mem.get('clstm4d'), '.1f', 9)} "
                f"{_fmt(res['peak_over_fp32'] if low else res['memory_ratio'], '.2f', 6)} "
                f"{_fmt(None if low else cfg.memory_target)} "
                f"{res['cpu_clstm4d_over_floor']:>15.2f} "
                f"{_fmt(None if low else res['cpu_time_ratio'])} "
                f"{_fmt(res.get('cpu_clstm4d_over_fp32'), '.2f', 9)}"
            )
    print(header)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
