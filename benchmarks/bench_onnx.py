"""Inference time on CPU: an ONNX export run by onnxruntime vs the PyTorch model, through the
same Predictor.

For each case (2D 128^2 and 3D 48^3 by default, --frames frames, the `tiny` time-resolved
UNet with a bottleneck ConvLSTM, random weights), save a checkpoint, export it with
`clstm4d export --format onnx` once per --steps value (frames per exported step), and segment
the same sequence with `Predictor.from_checkpoint` on the checkpoint (PyTorch, the baseline)
and on each export (onnxruntime): whole frames, chunks of --chunk frames with the state
carried. Both run on --threads threads. Repetitions are interleaved; the median is reported,
with the ratio PyTorch time / onnxruntime time (> 1: onnxruntime is faster) and the share of
voxels whose labels agree.

    python benchmarks/bench_onnx.py                        # 2D 128^2 and 3D 48^3, 16 frames
    python benchmarks/bench_onnx.py --cases 2:64 --reps 5  # one case

Prints a table and one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def checkpoint(folder: Path, dims: int):
    import torch

    from clstm4d.engine.run.checkpoint import save_checkpoint
    from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
    from clstm4d.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=dims, in_channels=1, out_channels=3,
                         temporal="bottleneck").eval()
    run = SavedRun(Config.from_dict({"data": {"normalize": "zscore"}}), ModelSpec.of(model),
                   {0: "background", 1: "a", 2: "b"})
    return save_checkpoint(folder, model, step=1, config=run.to_dict())


def bench_case(dims: int, size: int, args, folder: Path) -> list[dict]:
    import numpy as np

    from clstm4d.engine.apps.export import export_onnx
    from clstm4d.engine.inference.predictor import Predictor

    ck = checkpoint(folder / f"ck{dims}", dims)
    backends = {"pytorch": ck}
    for f in args.steps:
        backends[f"onnx step {f}"] = export_onnx(ck, folder / f"m{dims}_{f}.onnx", frames=f)
    predictors = {name: Predictor.from_checkpoint(path, device="cpu", amp="none",
                                                  chunk=args.chunk)
                  for name, path in backends.items()}
    image = np.random.default_rng(0).normal(size=(args.frames, 1, *[size] * dims))
    image = image.astype(np.float32)
    labels, times = {}, {name: [] for name in predictors}
    for name, p in predictors.items():  # warm-up
        labels[name] = p.predict_array(image[:2])
    for _ in range(args.reps):  # interleaved repetitions
        for name, p in predictors.items():
            t0 = time.perf_counter()
            labels[name] = p.predict_array(image)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["pytorch"])
    rows = []
    for name in predictors:
        sec = statistics.median(times[name])
        rows.append({"bench": "onnx", "backend": name, "dims": dims, "size": size,
                     "frames": args.frames, "chunk": args.chunk, "threads": args.threads,
                     "seconds": round(sec, 4), "speedup_vs_pytorch": round(base / sec, 3),
                     "labels_equal": round(float((labels[name] == labels["pytorch"]).mean()),
                                           5)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["2:128", "3:48"],
                   help="DIMS:SIZE, e.g. 2:128 (2D 128^2) or 3:48 (3D 48^3)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4],
                   help="frames per exported ONNX step (one export each)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # onnxruntime takes the same number (OnnxModel)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            dims, size = (int(v) for v in case.split(":"))
            rows += bench_case(dims, size, args, Path(tmp))
    head = (f"{'case':<10} {'backend':<12} {'seconds':>8} {'x pytorch':>10} "
            f"{'labels equal':>13}")
    print(f"predict on CPU, tiny bottleneck ConvLSTM, {args.frames} frames, chunk "
          f"{args.chunk}, {args.threads} thread(s), median of {args.reps}")
    print(head)
    print("-" * len(head))
    for r in rows:
        case = f"{r['dims']}D {r['size']}^{r['dims']}"
        print(f"{case:<10} {r['backend']:<12} {r['seconds']:>8.3f} "
              f"{r['speedup_vs_pytorch']:>10.2f} {r['labels_equal']:>13.5f}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
