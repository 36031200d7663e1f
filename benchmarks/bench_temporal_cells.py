"""ConvLSTM vs ConvGRU vs memory attention (and the per-frame model): the same placement,
data, budget and seeds, on four tasks.

Every variant is the `tiny` preset with its temporal block at ``--placement`` (default the
bottleneck) and differs from the others only in ``model.cell`` (``lstm``, ``gru``,
``attention`` with ``model.bank=--bank``) or, for the baseline, ``model.temporal=none``. Each
(task, variant, seed) trains once with ``train.seed=SEED`` on the same data (drawn with seed
0) and is scored on the same held-out data.

Tasks (``--tasks``, default all):

- ``degraded``: the chamber task of bench_degraded.py (2D ``--degraded-size``, 16 frames,
  6 frames per sequence partially degraded, windows of 8, ``data.degrade=true`` for every
  variant): Dice on clean frames and the mean over the six partial families.
- ``cue``: cue-then-track, trained on whole 16-frame sequences (no degradation
  augmentation). With the ``cue-shapes`` task of clstm4d.data (objects of varied form)
  the models train on the tuning families and are scored on the tuning families and on the
  held-out family (glyphs); without it, on the look-alike discs of ``cue-track``. Identity
  Dice (mean of the two identity classes; identity-blind ~0.5) on frames 8-15 and the
  horizon (frames after the cue with identity Dice >= 0.8 before the first drop below).
- ``c2c12``: the real phase-contrast time-lapse of bench_degraded.py (left half for
  training, right half for test, 64^2 crops, windows of 8): Dice on the clean sequence, on
  its first and last 3 frames (drift), and on frames 2, 5, 8 under each degradation family.
- ``cost``: parameters, training-step time (forward + backward, CPU seconds of one thread,
  median of interleaved repetitions, ratio to ConvLSTM measured in the same run) and peak
  memory (measured RSS and the memory model of ``clstm4d plan``) at 2D 64^2 x 8 frames x
  batch 4 and 3D 32^3 x 4 frames x batch 1; and the state carried between chunks after 8
  and 64 frames (flat for every cell: ConvLSTM/GRU hold one map, attention ``bank`` frames).

    nice -n 10 python benchmarks/bench_temporal_cells.py --out /tmp/cells          # all
    nice -n 10 python benchmarks/bench_temporal_cells.py --out /tmp/cells --tasks cue \\
        --seeds 0 1 2                                     # one task (resumable, parallel-safe)
    python benchmarks/bench_temporal_cells.py --out /tmp/cells --report

Prints one table per task (mean and seed-to-seed standard deviation) and one JSON line per
(task, variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _temporal as common  # noqa: E402
import bench_degraded  # noqa: E402

VARIANTS = ("per-frame", "convlstm", "convgru", "attention")
TASKS = ("degraded", "cue", "c2c12", "cost")
CUE_FRAMES = 3
LATE = slice(8, 16)  # frames 8-15 of 16-frame sequences
THRESHOLD = 0.8


def model_kwargs(args, name: str) -> dict:
    """The model options of a variant (everything else is the `tiny` preset's)."""
    if name == "per-frame":
        return {"temporal": "none"}
    kw = {"temporal": args.placement, "cell": {"convlstm": "lstm", "convgru": "gru",
                                               "attention": "attention"}[name]}
    return {**kw, "bank": args.bank} if name == "attention" else kw


def overrides(args, name: str) -> list[str]:
    return [f"model.{k}={v}" for k, v in model_kwargs(args, name).items()]


def _train(args, task: str, name: str, seed: int, datalist: Path, steps: int, **data):
    run = SimpleNamespace(steps=steps, batch=args.batch, lr=args.lr, model="tiny", seed=seed,
                          threads=args.threads)
    base = common.base_config(run, datalist, Path(args.out) / "runs" / task /
                              f"{name}_s{seed}", **data)
    return common.train_variant(base, overrides(args, name))


# ------------------------------------------------------------------------- the tasks

def degraded(args, name: str, seed: int) -> dict:
    ns = SimpleNamespace(out=str(Path(args.out) / "data" / "degraded"), cases=24, frames=16,
                         size=args.degraded_size, seed=0, test=16, degraded=6, degrade=None)
    datalist, test = bench_degraded.synthetic_data(ns)
    predictor, seconds, cpu = _train(args, "degraded", name, seed, datalist,
                                     args.degraded_steps, window=8, roi=None,
                                     foreground_prob=0.5, degrade=True)
    result, _ = bench_degraded.evaluate(predictor, test, 3)
    groups = bench_degraded.family_means(result["dice_by_kind"])
    return {"clean": result["dice_clean"], "partial": groups["partial"],
            "volume_change_error": result["volume_change_error"],
            "train_cpu_seconds": cpu, "train_seconds": seconds}


def cue_task(args) -> str:
    """``--cue-task``, or ``cue-shapes`` when clstm4d.data has it, else ``cue-track``."""
    import clstm4d.data as data

    if args.cue_task:
        return args.cue_task
    return "cue-shapes" if hasattr(data, "make_cue_shapes_case") else "cue-track"


def _identity(predictor, cases) -> dict:
    from clstm4d.engine.evaluation.metrics import dice_per_frame

    ident = []
    for c in cases:
        pred = predictor.predict_array(c.image, name=c.name)
        ident.append(dice_per_frame(pred, c.label, 3).mean(1).numpy())  # (t,)
    curve = np.mean(ident, 0)
    after = curve[CUE_FRAMES:]
    below = np.flatnonzero(after < THRESHOLD)
    return {"late": float(curve[LATE].mean()), "curve": curve.round(4).tolist(),
            "horizon": int(below[0]) if below.size else len(after)}


def cue(args, name: str, seed: int) -> dict:
    import clstm4d.data as data
    from clstm4d.data import write_synthetic_dataset

    task = cue_task(args)
    make_case, families = ((getattr(data, "make_cue_shapes_case", None), ("tuning", "held-out"))
                           if task == "cue-shapes" else (data.make_cue_track_case, ("discs",)))
    kw = {"shapes": "tuning"} if task == "cue-shapes" else {}
    folder = Path(args.out) / "data" / task
    datalist = folder / "datalist.json"
    if not datalist.is_file():
        write_synthetic_dataset(folder, cases=args.cue_cases, frames=16, size=args.cue_size,
                                spatial_dims=2, seed=0, validation=0.0, task=task,
                                cue_frames=CUE_FRAMES, **kw)
    predictor, seconds, cpu = _train(args, "cue", name, seed, datalist, args.cue_steps,
                                     window=16, roi=None, foreground_prob=0.0, degrade=False)
    out = {"task": task, "train_cpu_seconds": cpu, "train_seconds": seconds}
    for family in families:
        out[family] = _identity(predictor, test_cases(args, folder, family, make_case))
    return out


def test_cases(args, folder: Path, family: str, make_case) -> list:
    """The held-out cue sequences of ``family``, drawn once and kept in ``folder`` (so that
    every run, and a data generator of another version, scores the same sequences)."""
    path = folder / f"test_{family}.npz"
    if not path.is_file():
        kw = {"shapes": family} if family != "discs" else {}
        cases = [make_case((1, i), 16, args.cue_size, 2, cue_frames=CUE_FRAMES, **kw)
                 for i in range(args.cue_test)]
        np.savez_compressed(path, image=np.stack([c.image for c in cases]),
                            label=np.stack([c.label for c in cases]))
    z = np.load(path)
    return [SimpleNamespace(image=z["image"][i], label=z["label"][i], name=f"{family}_{i}")
            for i in range(len(z["label"]))]


def c2c12(args, name: str, seed: int) -> dict:
    from clstm4d.engine.evaluation.metrics import dice_per_frame

    ns = SimpleNamespace(out=str(Path(args.out) / "data" / "c2c12"), c2c12=args.c2c12,
                         seed=0, degrade=None)
    datalist, test = bench_degraded.c2c12_data(ns)
    predictor, seconds, cpu = _train(args, "c2c12", name, seed, datalist, args.c2c12_steps,
                                     window=8, roi=64, foreground_prob=0.5, degrade=True)
    result, preds = bench_degraded.evaluate(predictor, test, 2)
    clean = test[0]
    per_frame = dice_per_frame(preds[clean.name], clean.label, 2)[:, 0].numpy()
    return {"clean": result["dice_clean"], "degraded": result["dice_degraded"],
            "first3": float(per_frame[:3].mean()), "last3": float(per_frame[-3:].mean()),
            "per_frame": per_frame.round(4).tolist(),
            "train_cpu_seconds": cpu, "train_seconds": seconds}


# ------------------------------------------------------------------------------ cost

def _step(net, x, y):
    from clstm4d.engine.training.losses import SequenceLoss

    net.zero_grad(set_to_none=True)
    SequenceLoss()(net(x), y).backward()


def _state_bytes(net, frames: int, size) -> int:
    import torch
    from torch.utils._pytree import tree_leaves

    state = None
    with torch.no_grad():
        for _ in range(frames // 8):
            _, state = net(torch.randn(1, 8, 1, *size), state=state, return_state=True)
    return sum(leaf.numel() * leaf.element_size() for leaf in tree_leaves(state))


def cost(args, name: str, seed: int) -> dict:
    """Parameters, step time and peak memory of one variant, and (to compare within one
    process) the same for ConvLSTM measured interleaved with it."""
    import torch

    from clstm4d import create_model
    from clstm4d.engine.planning.memory import estimate_memory
    from clstm4d.engine.run.runtime import PeakMemory

    torch.set_num_threads(args.threads)
    out = {}
    for dims, size, t, n in ((2, (64, 64), 8, 4), (3, (32, 32, 32), 4, 1)):
        torch.manual_seed(seed)
        nets = {v: create_model("tiny", spatial_dims=dims, out_channels=3,
                                **model_kwargs(args, v)) for v in (name, "convlstm")}
        x, y = torch.randn(n, t, 1, *size), torch.randint(0, 3, (n, t, *size))
        times: dict[str, list[float]] = {v: [] for v in nets}
        for rep in range(args.cost_reps + 1):
            for v, net in nets.items():
                t0 = time.process_time()  # CPU seconds: what a loaded machine inflates least
                _step(net, x, y)
                if rep:  # the first one warms up
                    times[v].append(time.process_time() - t0)
        with PeakMemory(torch.device("cpu")) as peak:
            _step(nets[name], x, y)
        net = nets[name]
        out[f"{dims}d"] = {
            "parameters": sum(p.numel() for p in net.parameters()),
            "step_seconds": statistics.median(times[name]),
            "ratio_to_convlstm": statistics.median(times[name])
            / statistics.median(times["convlstm"]),
            "peak_mib": peak.peak_bytes / 2**20,
            "model_mib": estimate_memory(net.config, size, t, n, device="cpu") / 2**20,
            "state_kib_8": _state_bytes(net, 8, size) / 2**10,
            "state_kib_64": _state_bytes(net, 64, size) / 2**10}
    return out


# ---------------------------------------------------------------------------- report

def _stat(values) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    if all(float(v).is_integer() for v in values) and len(set(values)) == 1:
        return f"{int(values[0])}"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


#: per task: (column, function of one result)
COLUMNS = {
    "degraded": [("clean", lambda r: r["clean"]), ("partial", lambda r: r["partial"]),
                 ("dV error", lambda r: r["volume_change_error"])],
    "cue": [("tuning 8-15", lambda r: r.get("tuning", r.get("discs", {})).get("late")),
            ("tuning horizon", lambda r: r.get("tuning", r.get("discs", {})).get("horizon")),
            ("held-out 8-15", lambda r: r.get("held-out", {}).get("late")),
            ("held-out horizon", lambda r: r.get("held-out", {}).get("horizon"))],
    "c2c12": [("clean", lambda r: r["clean"]), ("degraded", lambda r: r["degraded"]),
              ("first 3", lambda r: r["first3"]), ("last 3", lambda r: r["last3"])],
    "cost": [(f"{d} {k}", lambda r, d=d, k=k: r[d][k]) for d in ("2d", "3d")
             for k in ("parameters", "step_seconds", "ratio_to_convlstm", "peak_mib",
                       "model_mib", "state_kib_8", "state_kib_64")],
}


def report(args, results: dict) -> None:
    for task, by_variant in results.items():
        seeds = sorted({s for runs in by_variant.values() for s in runs})
        cols = COLUMNS[task]
        print(f"\n{task}: placement {args.placement}, bank {args.bank}, seeds {seeds} "
              f"(mean ± sd over seeds)")
        print("| variant | " + " | ".join(c for c, _ in cols) + " | CPU s/run |")
        print("|---" * (len(cols) + 2) + "|")
        for name, runs in by_variant.items():
            cells = [_stat([fn(r) for r in runs.values()]) for _, fn in cols]
            cpu = _stat([r.get("train_cpu_seconds") for r in runs.values()])
            print(f"| {name} | " + " | ".join(cells) + f" | {cpu} |")
        for name, runs in by_variant.items():
            print(json.dumps({"bench": "temporal_cells", "task": task, "variant": name,
                              "seeds": sorted(runs),
                              **{c: [fn(r) for r in runs.values()] for c, fn in cols}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for data, runs and results (required)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--only", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--placement", default="bottleneck", choices=("bottleneck", "skips"))
    p.add_argument("--bank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--degraded-size", type=int, default=32)
    p.add_argument("--degraded-steps", type=int, default=300)
    p.add_argument("--cue-size", type=int, default=48)
    p.add_argument("--cue-cases", type=int, default=32)
    p.add_argument("--cue-test", type=int, default=16)
    p.add_argument("--cue-steps", type=int, default=300)
    p.add_argument("--cue-task", default=None, choices=("cue-track", "cue-shapes"),
                   help="default: cue-shapes (tuning and held-out families) where available")
    p.add_argument("--c2c12", default=str(bench_degraded.C2C12))
    p.add_argument("--c2c12-steps", type=int, default=300)
    p.add_argument("--cost-reps", type=int, default=5)
    p.add_argument("--report", action="store_true", help="only print the tables")
    args = p.parse_args()
    if args.out is None:
        print("skipped: this benchmark trains tiny models on four tasks (about 45 CPU "
              "minutes with the defaults); run it with --out DIR")
        return
    results: dict = {}
    for task in args.tasks:
        for name in args.only:
            for seed in args.seeds:
                folder = cue_task(args) if task == "cue" else task
                path = Path(args.out) / "results" / folder / f"{name}_s{seed}.json"
                if not path.is_file() and not args.report:
                    result = globals()[task](args, name, seed)
                    result["settings"] = {k: v for k, v in vars(args).items()
                                          if k not in ("out", "report", "only", "seeds")}
                    common.save_result(path, result)
                if path.is_file():
                    results.setdefault(task, {}).setdefault(name, {})[seed] = \
                        json.loads(path.read_text())
    report(args, results)


if __name__ == "__main__":
    main()
