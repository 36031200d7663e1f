"""Drift over long sequences: does a temporal model's Dice fall over a sequence 2-4x longer
than its training window, where a per-frame model's does not?

Each variant trains at the same budget (same data, steps, batch, window, learning rate, seed)
and predicts long sequences with the state carried from chunk to chunk (``predict.chunk``).
For every test sequence it records the per-frame Dice (foreground classes) and the ratio of
predicted to true foreground area, then reports the mean Dice over the first and the last
quarter of the frames, the *decline* (first quarter minus last quarter; positive = falls),
the least-squares slope per 10 frames, and the area ratio in both quarters (a model whose
state drifts shows a ratio moving away from 1). Two diagnostics: ``reset``, the decline when
the state is started afresh every ``--window`` frames (never older than in training: if the
state drifted with age, this would remove the decline), and what the memory changes: the
voxels predicted with the state carried but not on each frame alone (``added``, per frame),
the share of them that is foreground (``true``) and the share the model itself predicted in
one of the 3 frames before (``stale``: memory keeping old foreground).

Data (``--data``):

- ``c2c12``: the real phase-contrast time-lapse in ``../shared/data/c2c12`` (10 frames of
  234x234, cells vs background): trained on the left half of the field (random 64^2 crops,
  windows of ``--window`` frames), tested on the right half played forward, backward and
  forward again (frames 0..9, 8..0, 1..9: 28 real frames with exact masks, 3.5x a window of
  8; each frame is real, only the order is constructed);
- ``synthetic``: the chamber task (beating chamber + drifting blobs, default dropout and
  occlusion frames) in 2D 64^2, trained on 16-frame sequences in windows of ``--window``,
  tested on ``--test-frames``-frame sequences (default 32, 4x a window of 8); the quarters
  count clean frames only.

    nice -n 10 python benchmarks/bench_drift.py --out /tmp/drift --data c2c12
    nice -n 10 python benchmarks/bench_drift.py --out /tmp/drift-synth --data synthetic
    python benchmarks/bench_drift.py --out /tmp/drift --data c2c12 --report

Prints a table and one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _temporal as common  # noqa: E402

DEFAULT_VARIANTS = common.PLACEMENTS
C2C12_FILE = Path("shared", "data", "c2c12", "c2c12_phase_10frames.npz")
_ROOT = Path(__file__).resolve().parents[1]
C2C12 = next((p / C2C12_FILE for p in _ROOT.parents if (p / C2C12_FILE).is_file()),
             _ROOT.parent / C2C12_FILE)
PING_PONG = list(range(10)) + list(range(8, -1, -1)) + list(range(1, 10))  # 28 frames


def c2c12_data(args):
    """(training datalist of the left half, test groups of the right half: ``forward``
    (frames 0..9) and ``ping-pong`` (0..9, 8..0, 1..9))."""
    from clstm4d.data import CaseData, Geometry

    image, label, half, path = common.c2c12_left_half(args.c2c12, args.out)
    groups = {}
    for name, order in (("forward", list(range(10))), ("ping-pong", PING_PONG)):
        right_img, right_lab = image[order][..., half:], label[order][..., half:]
        geometry = Geometry.default("nifti", right_lab.shape[1:], right_lab.shape[0])
        groups[name] = [CaseData(right_img, right_lab, geometry, {"degraded": []}, name)]
    return path, groups, 2


def synthetic_data(args):
    from clstm4d.data import make_synthetic_case, write_synthetic_dataset

    folder = Path(args.out) / "train"
    path = folder / "datalist.json"
    if not path.is_file():
        write_synthetic_dataset(folder, cases=args.cases, frames=16, size=args.size,
                                spatial_dims=2, seed=args.seed, validation=0.0)
    test = [make_synthetic_case((args.seed + 1, i), args.test_frames, args.size, 2)
            for i in range(args.test)]
    return path, {f"{args.test_frames} frames": test}, 3


def quarters(values: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """Mean of ``values`` ``(t,)`` over the kept frames of the first and the last quarter."""
    t = len(values)
    q = max(1, t // 4)
    first, last = np.arange(t) < q, np.arange(t) >= t - q
    return float(values[first & keep].mean()), float(values[last & keep].mean())


def evaluate(predictor, groups: dict, k: int, window: int) -> dict:
    return {name: _evaluate(predictor, cases, k, window) for name, cases in groups.items()}


def _in_pieces(predictor, image: np.ndarray, frames: int) -> np.ndarray:
    """Prediction with the state started afresh every ``frames`` frames."""
    return np.concatenate([predictor.predict_array(image[s:s + frames])
                           for s in range(0, len(image), frames)])


def _memory_effect(pred, alone, label) -> dict:
    """What the memory changes: the voxels the model predicts with its state carried but not
    on each frame alone (``added``), the share of them that is foreground now (``added_true``)
    and the share that the model predicted in one of the 3 frames before (``added_stale``)."""
    added, true, stale = 0, 0, 0
    for f in range(1, len(pred)):
        extra = (pred[f] > 0) & ~(alone[f] > 0)
        added += int(extra.sum())
        true += int((extra & (label[f] > 0)).sum())
        stale += int((extra & (pred[max(0, f - 3):f] > 0).any(0)).sum())
    return {"added_per_frame": added / max(len(pred) - 1, 1),
            "added_true": true / max(added, 1), "added_stale": stale / max(added, 1)}


def _evaluate(predictor, cases, k: int, window: int) -> dict:
    from clstm4d.engine.evaluation.metrics import dice_per_frame

    rows = []
    for c in cases:
        pred = predictor.predict_array(c.image, name=c.name)
        reset = dice_per_frame(_in_pieces(predictor, c.image, window), c.label, k).mean(1).numpy()
        alone = _in_pieces(predictor, c.image, 1)
        dice = dice_per_frame(pred, c.label, k).mean(1).numpy()  # (t,)
        area = (pred > 0).reshape(len(pred), -1).sum(1) / np.maximum(
            (c.label > 0).reshape(len(pred), -1).sum(1), 1)  # (t,)
        keep = np.ones(len(dice), bool)
        keep[list(c.meta.get("degraded", []))] = False
        d0, d1 = quarters(dice, keep)
        a0, a1 = quarters(area, keep)
        t = np.flatnonzero(keep)
        slope = float(np.polyfit(t, dice[keep], 1)[0] * 10)
        r0, r1 = quarters(reset, keep)
        rows.append({"dice": dice.round(4).tolist(), "area_ratio": area.round(3).tolist(),
                     "first": d0, "last": d1, "slope10": slope, "area_first": a0,
                     "area_last": a1, "decline_reset": r0 - r1,
                     **_memory_effect(pred, alone, c.label)})
    out = {key: float(np.mean([r[key] for r in rows]))
           for key in ("first", "last", "slope10", "area_first", "area_last", "decline_reset",
                       "added_per_frame", "added_true", "added_stale")}
    out["decline"] = out["first"] - out["last"]
    out["dice_per_frame"] = np.mean([r["dice"] for r in rows], 0).round(4).tolist()
    out["area_ratio_per_frame"] = np.mean([r["area_ratio"] for r in rows], 0).round(3).tolist()
    out["frames"] = len(rows[0]["dice"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(p)
    p.add_argument("--data", default="c2c12", choices=("c2c12", "synthetic"))
    p.add_argument("--c2c12", default=str(C2C12), help="the c2c12 .npz")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--cases", type=int, default=24, help="training sequences (synthetic)")
    p.add_argument("--test", type=int, default=8, help="test sequences (synthetic)")
    p.add_argument("--test-frames", type=int, default=32, help="test frames (synthetic)")
    p.add_argument("--roi", type=int, default=None,
                   help="training patch (default: 64 for c2c12, whole frames for synthetic)")
    args = p.parse_args(argv)
    chosen = common.variants(args, DEFAULT_VARIANTS)
    datalist, test, k = c2c12_data(args) if args.data == "c2c12" else synthetic_data(args)
    roi = args.roi if args.roi is not None else (64 if args.data == "c2c12" else None)
    results_dir = Path(args.out) / "results"
    for name, overrides in chosen.items():
        result_path = results_dir / f"{common.slug(name)}.json"
        if args.report or (args.only and name not in args.only) or result_path.is_file():
            continue
        run = Path(args.out) / "runs" / common.slug(name)
        base = common.base_config(args, datalist, run, window=args.window, roi=roi,
                                  foreground_prob=0.5)
        predictor, seconds, cpu = common.train_variant(base, overrides)
        result = {"groups": evaluate(predictor, test, k, args.window), "name": name,
                  "overrides": overrides, "steps": args.steps, "window": args.window,
                  "train_cpu_seconds": round(cpu, 1)}
        common.save_result(result_path, result)
    report(args, common.load_results(results_dir, chosen))


def report(args, results: dict) -> None:
    if not results:
        return
    first = next(iter(results.values()))
    print(f"drift, {args.data}: trained on windows of {first['window']} frames, "
          f"{first['steps']} steps, seed {args.seed}; state carried over the whole test "
          f"sequence; Dice over its first / last quarter, decline = first - last (and its "
          f"difference to {next(iter(results))}'s), slope of Dice per 10 frames, predicted / "
          f"true area")
    head = (f"{'variant':<26} {'test (frames)':<16} {'first':>6} {'last':>6} {'decline':>8} "
            f"{'vs base':>8} {'slope10':>8} {'area 1st':>8} {'area last':>9} {'reset':>7} "
            f"{'added':>6} {'true':>5} {'stale':>5}")
    print(head)
    print("-" * len(head))
    lines = []
    for group in first["groups"]:
        base = first["groups"][group]["decline"]
        for name, res in results.items():
            r = res["groups"][group]
            print(f"{name:<26} {group + ' (' + str(r['frames']) + ')':<16} {r['first']:>6.3f} "
                  f"{r['last']:>6.3f} {r['decline']:>+8.3f} {r['decline'] - base:>+8.3f} "
                  f"{r['slope10']:>+8.3f} {r['area_first']:>8.2f} {r['area_last']:>9.2f} "
                  f"{r['decline_reset']:>+7.3f} {r['added_per_frame']:>6.0f} "
                  f"{r['added_true']:>5.2f} {r['added_stale']:>5.2f}")
            lines.append({"bench": "drift", "data": args.data, "test": group, "variant": name,
                          "overrides": res["overrides"], "seed": args.seed,
                          **{key: round(r[key], 4) for key in
                             ("first", "last", "decline", "slope10", "area_first",
                              "area_last", "decline_reset", "added_per_frame", "added_true",
                              "added_stale")},
                          "decline_vs_first_variant": round(r["decline"] - base, 4),
                          "frames": r["frames"], "steps": res["steps"],
                          "window": res["window"],
                          "train_cpu_seconds": res["train_cpu_seconds"]})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
