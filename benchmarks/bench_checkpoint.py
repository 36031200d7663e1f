"""Cost of the checkpoint checksums at load time: open + build the model, with the sha256 of
every file compared against ``checksums.json`` versus without (the baseline, same run).

For each model size, a resumable checkpoint (weights, AdamW moments, RNG) is written once;
then ``Checkpoint.open(path, weights_only=True).build_model()`` (what ``predict`` does: only
the weights' and JSON files' checksums) and
``Checkpoint.open(path)`` + ``restore`` (what ``train --resume`` does) are timed with and
without the checksum comparison, repetitions interleaved, median reported. The files are in
the page cache after the first repetition, so this is the CPU cost of hashing, the worst case
for the ratio (from a cold disk, reading dominates both).

    python benchmarks/bench_checkpoint.py                 # tiny and a 4x wider UNet, 3D
    python benchmarks/bench_checkpoint.py --reps 11 --widths 1 8

Prints a table and one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _checkpoint(folder: Path, width: int):
    import torch

    from clstm4d.engine.run.checkpoint import save_checkpoint
    from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
    from clstm4d.models import create_model

    torch.manual_seed(0)
    channels = tuple(c * width for c in (8, 16, 32, 64))
    model = create_model("tiny", spatial_dims=3, in_channels=1, out_channels=3,
                         channels=channels)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 2, 1, 16, 16, 16)).sum().backward()
    opt.step()  # AdamW moments exist: the optimizer file is twice the weights
    run = SavedRun(Config(), ModelSpec.of(model), {0: "background", 1: "a", 2: "b"})
    path = save_checkpoint(folder, model, step=1, config=run.to_dict(), optimizer=opt)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in path.iterdir())
    return path, model, opt, params, size


def _time(fn, reps: int) -> dict[bool, float]:
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(reps):
        for checksums in ((True, False) if i % 2 else (False, True)):  # interleaved
            t0 = time.perf_counter()
            fn(checksums)
            times[checksums].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    import torch

    from clstm4d.engine.run.checkpoint import Checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 4],
                        help="channel multipliers of (8, 16, 32, 64)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            path, model, opt, params, size = _checkpoint(Path(tmp) / f"w{width}", width)
            cases = {
                "open + build_model (predict)":
                    lambda c, p=path: Checkpoint.open(p, weights_only=True,
                                                      checksums=c).build_model(),
                "open + restore (train --resume)":
                    lambda c, p=path, m=model, o=opt: Checkpoint.open(p, checksums=c).restore(
                        m, o),
            }
            for name, fn in cases.items():
                t = _time(fn, args.reps)
                row = {"case": name, "width": width, "params": params,
                       "checkpoint_mb": round(size / 2**20, 2),
                       "seconds_verified": round(t[True], 5),
                       "seconds_unverified": round(t[False], 5),
                       "ratio": round(t[True] / t[False], 3), "reps": args.reps}
                rows.append(row)
    print(f"{'case':34s} {'params':>9s} {'MB':>7s} {'verified s':>11s} {'baseline s':>11s} "
          f"{'ratio':>6s}")
    for r in rows:
        print(f"{r['case']:34s} {r['params']:9d} {r['checkpoint_mb']:7.2f} "
              f"{r['seconds_verified']:11.4f} {r['seconds_unverified']:11.4f} {r['ratio']:6.3f}")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
