"""Peak memory and time of `predict` versus sequence length: chunks with carried state vs one pass.

For T in --frames, segment a (T, 1, *size) sequence with the `tiny` time-resolved UNet
(bottleneck ConvLSTM) in two ways: chunks of --chunk frames with the recurrent state carried
(and sliding windows of --roi over space), and one pass over all frames at once (the
baseline, measured in the same run). With --bidirectional, also the same network with a
bidirectional ConvLSTM (offline prediction) in two ways: the whole sequence in one pass (the
default of `predict_sequence` for such models; sliding windows of --roi) and chunks of
--chunk frames with --margin frames of context on both sides (`time_margin`). Every
measurement runs in a fresh subprocess so that the peak is its own; repetitions are
interleaved and the median is reported. Memory is the peak above the level before
`predict_sequence` is called (the input is already in memory; the output labels, T x S
bytes, are included). On CUDA it is torch's peak allocation.

    python benchmarks/bench_predict.py                      # 3D 48^3, T = 10 and 100
    python benchmarks/bench_predict.py --dims 2 --size 128  # 2D+t
    python benchmarks/bench_predict.py --bidirectional      # + bidirectional offline modes

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

    from clstm4d.engine.inference.sliding import predict_sequence
    from clstm4d.engine.run.runtime import PeakMemory, resolve_device
    from clstm4d.models import create_model

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    bidirectional = args.mode.startswith("bidir")
    model = create_model("tiny", spatial_dims=args.dims, in_channels=1, out_channels=3,
                         temporal="bottleneck", bidirectional=bidirectional).to(device).eval()
    x = torch.randn(args.t, 1, *([args.size] * args.dims))
    settings = {  # mode -> predict_sequence keywords
        "one-pass": {"chunk": None, "roi": None},
        "chunked": {"chunk": args.chunk, "roi": args.roi},
        "bidir-whole": {"chunk": args.chunk, "roi": args.roi},
        "bidir-margin": {"chunk": args.chunk, "roi": args.roi, "time_margin": args.margin},
    }[args.mode]
    # warm-up on two frames so that lazy initialisation is not counted
    predict_sequence(model, x[:2], chunk=2, roi=None, device=device)
    t0 = time.perf_counter()
    with PeakMemory(device) as pm:
        predict_sequence(model, x, device=device, **settings)
    return {"seconds": time.perf_counter() - t0, "peak_mb": pm.peak_bytes / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, default=3, choices=(2, 3))
    p.add_argument("--size", type=int, default=48, help="spatial size per axis")
    p.add_argument("--frames", type=int, nargs="+", default=[10, 100])
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--margin", type=int, default=8,
                   help="bidirectional chunks: frames of context on both sides")
    p.add_argument("--bidirectional", action="store_true",
                   help="also measure a bidirectional model (whole sequence; chunks + margin)")
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
    modes = ["chunked", "one-pass"] + (["bidir-whole", "bidir-margin"] if args.bidirectional
                                       else [])
    cases = [(t, mode) for t in args.frames for mode in modes]
    runs: dict = {c: [] for c in cases}
    for _ in range(args.reps):  # interleaved repetitions
        for t, mode in cases:
            cmd = [sys.executable, __file__, "--mode", mode, "--t", str(t)] + [
                f"--{k}={v}" for k, v in (("dims", args.dims), ("size", args.size),
                                          ("chunk", args.chunk), ("roi", args.roi),
                                          ("margin", args.margin),
                                          ("threads", args.threads), ("device", args.device))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[(t, mode)].append(json.loads(out.strip().splitlines()[-1]))
    head = f"{'T':>5} {'mode':<12} {'peak MB':>9} {'x one-pass':>10} {'seconds':>8}"
    print(f"predict, tiny bottleneck ConvLSTM, {args.dims}D {args.size}^{args.dims}, "
          f"chunk {args.chunk}, roi {args.roi}, device {args.device}, median of {args.reps}"
          + (f"; bidirectional margin {args.margin}" if args.bidirectional else ""))
    print(head)
    print("-" * len(head))
    lines = []
    for t, mode in cases:
        peak = statistics.median(r["peak_mb"] for r in runs[(t, mode)])
        base = statistics.median(r["peak_mb"] for r in runs[(t, "one-pass")])
        sec = statistics.median(r["seconds"] for r in runs[(t, mode)])
        print(f"{t:>5} {mode:<12} {peak:>9.1f} {peak / base:>10.2f} {sec:>8.2f}")
        lines.append({"bench": "predict", "frames": t, "mode": mode, "dims": args.dims,
                      "size": args.size,
                      "chunk": args.chunk if mode in ("chunked", "bidir-margin") else t,
                      "time_margin": args.margin if mode == "bidir-margin" else None,
                      "roi": None if mode == "one-pass" else args.roi, "device": args.device,
                      "peak_mb": round(peak, 2), "ratio_to_one_pass": round(peak / base, 3),
                      "seconds": round(sec, 3)})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
