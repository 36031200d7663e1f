"""Peak memory and time of `predict` versus sequence length: chunks with carried state vs one pass.

For T in --frames, segment a (T, 1, *size) sequence with the `tiny` time-resolved UNet
(bottleneck ConvLSTM) in two ways: chunks of --chunk frames with the recurrent state carried
(and sliding windows of --roi over space), and one pass over all frames at once (the
baseline, measured in the same run). Every measurement runs in a fresh subprocess so that the
peak is its own; repetitions are interleaved and the median is reported. Memory is the peak
above the level before `predict_sequence` is called (the input is already in memory; the
output labels, T x S bytes, are included). On CUDA it is torch's peak allocation.

    python benchmarks/bench_predict.py                      # 3D 48^3, T = 10 and 100
    python benchmarks/bench_predict.py --dims 2 --size 128  # 2D+t

Prints a table and one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(args) -> dict:
    import torch

    from clstm4d.engine.predict import predict_sequence
    from clstm4d.engine.runtime import PeakMemory, resolve_device
    from clstm4d.models import create_model

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=args.dims, in_channels=1, out_channels=3,
                         temporal="bottleneck").to(device).eval()
    x = torch.randn(args.t, 1, *([args.size] * args.dims))
    one_pass = args.mode == "one-pass"
    # warm-up on two frames so that lazy initialisation is not counted
    predict_sequence(model, x[:2], chunk=2, roi=None, device=device)
    t0 = time.perf_counter()
    with PeakMemory(device) as pm:
        predict_sequence(model, x, chunk=None if one_pass else args.chunk,
                         roi=None if one_pass else args.roi, device=device)
    return {"seconds": time.perf_counter() - t0, "peak_mb": pm.peak_bytes / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, default=3, choices=(2, 3))
    p.add_argument("--size", type=int, default=48, help="spatial size per axis")
    p.add_argument("--frames", type=int, nargs="+", default=[10, 100])
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--roi", type=int, default=32, help="sliding-window size per axis")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode is not None:  # child process: one measurement
        print(json.dumps(measure(args)))
        return
    cases = [(t, mode) for t in args.frames for mode in ("chunked", "one-pass")]
    runs: dict = {c: [] for c in cases}
    for _ in range(args.reps):  # interleaved repetitions
        for t, mode in cases:
            cmd = [sys.executable, __file__, "--mode", mode, "--t", str(t)] + [
                f"--{k}={v}" for k, v in (("dims", args.dims), ("size", args.size),
                                          ("chunk", args.chunk), ("roi", args.roi),
                                          ("threads", args.threads), ("device", args.device))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[(t, mode)].append(json.loads(out.strip().splitlines()[-1]))
    head = f"{'T':>5} {'mode':<10} {'peak MB':>9} {'x one-pass':>10} {'seconds':>8}"
    print(f"predict, tiny bottleneck ConvLSTM, {args.dims}D {args.size}^{args.dims}, "
          f"chunk {args.chunk}, roi {args.roi}, device {args.device}, median of {args.reps}")
    print(head)
    print("-" * len(head))
    lines = []
    for t, mode in cases:
        peak = statistics.median(r["peak_mb"] for r in runs[(t, mode)])
        base = statistics.median(r["peak_mb"] for r in runs[(t, "one-pass")])
        sec = statistics.median(r["seconds"] for r in runs[(t, mode)])
        print(f"{t:>5} {mode:<10} {peak:>9.1f} {peak / base:>10.2f} {sec:>8.2f}")
        lines.append({"bench": "predict", "frames": t, "mode": mode, "dims": args.dims,
                      "size": args.size, "chunk": args.chunk if mode == "chunked" else t,
                      "roi": args.roi if mode == "chunked" else None, "device": args.device,
                      "peak_mb": round(peak, 2), "ratio_to_one_pass": round(peak / base, 3),
                      "seconds": round(sec, 3)})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
