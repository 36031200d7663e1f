"""Temporal memory on partially degraded frames: Dice per degradation family, temporal
models against the per-frame model at an equal budget (same data, steps, batch, seed).

--data synthetic (default): the chamber task in 2D (--size 64), --cases training and --test
held-out sequences of --frames frames; in every sequence --degraded frames (never frame 0,
never two in a row) are degraded by a family drawn from --degrade (default: the six partial
families at strength 0.5). Training and test sequences are drawn the same way.

--data c2c12: the real phase-contrast time-lapse in ../shared/data/c2c12 (10 frames of
234x234, cells = labels > 0; CC BY 4.0, Ker et al. 2018, via the laptrack repository).
Training on the left half of the field (x < 117), test on the right half: one clean copy
and, per family of --degrade (default all eight at 0.5 / 1), one copy with frames 2, 5 and
8 degraded. Also reported: copying the previous frame's true mask, and copying the
per-frame model's previous prediction, onto each degraded frame.

A variant is a name plus configuration overrides. Default variants (the first is the
baseline the gains are measured against):

    per-frame              model.temporal=none data.degrade=false
    per-frame+aug          model.temporal=none data.degrade=true
    bottleneck             model.temporal=bottleneck data.degrade=false
    bottleneck+aug         model.temporal=bottleneck data.degrade=true
    skips+aug              model.temporal=skips data.degrade=true
    bidirectional+aug      model.temporal=bottleneck model.bidirectional=true data.degrade=true

    nice -n 10 python benchmarks/bench_degraded.py --out /tmp/degraded
    nice -n 10 python benchmarks/bench_degraded.py --out /tmp/c2c12 --data c2c12
    python benchmarks/bench_degraded.py --out /tmp/degraded --report

Prints a table (Dice on clean frames, on degraded frames per family and their mean, the gain
over the first variant, temporal consistency) and one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _temporal as common  # noqa: E402

DEFAULT_VARIANTS = {
    "per-frame": ["model.temporal=none", "data.degrade=false"],
    "per-frame+aug": ["model.temporal=none", "data.degrade=true"],
    "bottleneck": ["model.temporal=bottleneck", "data.degrade=false"],
    "bottleneck+aug": ["model.temporal=bottleneck", "data.degrade=true"],
    "skips+aug": ["model.temporal=skips", "data.degrade=true"],
    "bidirectional+aug": ["model.temporal=bottleneck", "model.bidirectional=true",
                          "data.degrade=true"],
}
C2C12_FILE = Path("shared", "data", "c2c12", "c2c12_phase_10frames.npz")
# the first folder above the repository that holds shared/data/c2c12 (../shared from /work/main)
C2C12 = next((parent / C2C12_FILE for parent in Path(__file__).resolve().parents
              if (parent / C2C12_FILE).is_file()), C2C12_FILE)
C2C12_DEGRADED_FRAMES = (2, 5, 8)
CONSISTENCY = ("consecutive_dice", "volume_change_error", "volume_roughness")


def synthetic_data(args):
    """(training datalist, test cases) for the chamber task."""
    from clstm4d.data import make_synthetic_case, write_synthetic_dataset

    folder = Path(args.out) / "train"
    path = folder / "datalist.json"
    kw = {"degraded": args.degraded, "degradation": args.degrade or "partial"}
    if not path.is_file():
        write_synthetic_dataset(folder, cases=args.cases, frames=args.frames, size=args.size,
                                spatial_dims=2, seed=args.seed, validation=0.0, **kw)
    test = [make_synthetic_case((args.seed + 1, i), args.frames, args.size, 2, **kw)
            for i in range(args.test)]
    return path, test


def c2c12_data(args):
    """(training datalist of the left half, test cases of the right half)."""
    from clstm4d.data import CaseData, Geometry
    from clstm4d.data.degrade import degrade as degrade_frame
    from clstm4d.data.degrade import parse_degradations

    image, label, half, path = common.c2c12_left_half(args.c2c12, args.out)
    right_img, right_lab = image[..., half:], label[..., half:]
    geometry = Geometry.default("nifti", right_lab.shape[1:], right_lab.shape[0])
    test = [CaseData(right_img, right_lab, geometry, {"degraded": [], "degradation": []},
                     "right_clean")]
    for j, (kind, strength) in enumerate(parse_degradations(args.degrade or "all").items()):
        img = right_img.copy()
        for f in C2C12_DEGRADED_FRAMES:
            img[f] = degrade_frame(img[f], kind, strength, np.random.default_rng([args.seed, j, f]),
                                   label=right_lab[f])
        frames = list(C2C12_DEGRADED_FRAMES)
        test.append(CaseData(img, right_lab, geometry,
                             {"degraded": frames, "degradation": [kind] * len(frames)},
                             f"right_{kind}"))
    return path, test


def evaluate(predictor, cases, num_classes: int) -> tuple[dict, dict]:
    from clstm4d.engine.evaluation.evaluate import dice_by_degradation, evaluate_sequence

    rows, summaries, preds = [], [], {}
    for c in cases:
        pred = predictor.predict_array(c.image, name=c.name)
        preds[c.name] = pred
        ev = evaluate_sequence(pred, c.label, num_classes, degraded=c.meta["degraded"],
                               degradation=c.meta["degradation"], hd95=False)
        rows += ev.rows
        summaries.append(ev.summary())
    by_kind = dice_by_degradation(rows)
    degraded = [r["dice"] for r in rows if r["degraded"]]
    result = {"dice_clean": by_kind.pop("clean"), "dice_degraded": float(np.mean(degraded)),
              "dice_by_kind": by_kind}
    for key in CONSISTENCY:
        result[key] = float(np.nanmean([s[key] for s in summaries]))
    return result, preds


def copy_previous(cases, preds=None) -> dict[str, float]:
    """Dice of copying frame f - 1 (the truth, or ``preds``) onto each degraded frame f."""
    from clstm4d.engine.evaluation.metrics import dice_per_frame

    groups: dict[str, list[float]] = {}
    for c in cases:
        source = c.label if preds is None else preds[c.name]
        k = int(c.label.max()) + 1
        for f, kind in zip(c.meta["degraded"], c.meta["degradation"], strict=True):
            d = dice_per_frame(source[f - 1:f], c.label[f:f + 1], max(k, 2)).mean()
            groups.setdefault(kind, []).append(float(d))
    by_kind = {k: float(np.mean(v)) for k, v in groups.items()}
    return {"dice_degraded": float(np.mean([x for v in groups.values() for x in v])),
            "dice_by_kind": by_kind}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(p)
    p.add_argument("--data", default="synthetic", choices=("synthetic", "c2c12"))
    p.add_argument("--c2c12", default=str(C2C12), help="the c2c12 .npz")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--cases", type=int, default=24, help="training sequences (synthetic)")
    p.add_argument("--test", type=int, default=16, help="held-out sequences (synthetic)")
    p.add_argument("--degraded", type=int, default=6, help="degraded frames per sequence")
    p.add_argument("--degrade", default=None,
                   help="families and strengths (default: partial for synthetic, all for "
                        "c2c12), e.g. snr=0.5,defocus=0.5")
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--roi", type=int, default=None,
                   help="training patch (default: whole frames; 64 for c2c12)")
    args = p.parse_args()
    chosen = common.variants(args, DEFAULT_VARIANTS)
    datalist, test = synthetic_data(args) if args.data == "synthetic" else c2c12_data(args)
    num_classes = 3 if args.data == "synthetic" else 2
    roi = args.roi if args.roi is not None else (64 if args.data == "c2c12" else None)
    results_dir = Path(args.out) / "results"
    if not args.report:
        for name, overrides in chosen.items():
            if args.only and name not in args.only:
                continue
            result_path = results_dir / f"{common.slug(name)}.json"
            if result_path.is_file():
                continue
            base = common.base_config(args, datalist, Path(args.out) / "runs" / common.slug(name),
                                      window=args.window, roi=roi, foreground_prob=0.5)
            predictor, seconds, cpu = common.train_variant(base, overrides)
            result, preds = evaluate(predictor, test, num_classes)
            if args.data == "c2c12":
                result["copy_previous_prediction"] = copy_previous(test, preds)
            result.update(name=name, overrides=overrides, steps=args.steps, batch=args.batch,
                          window=args.window, degrade=args.degrade,
                          train_seconds=round(seconds, 1), train_cpu_seconds=round(cpu, 1))
            common.save_result(result_path, result)
    results = common.load_results(results_dir, chosen)
    if not results:
        return
    names = list(results)
    report(args, results, names, copy_previous(test))


def family_means(by_kind: dict[str, float]) -> dict[str, float]:
    """Mean Dice over the partial and over the full families present (each family counts
    once, whatever its number of frames: the target's "mean over the types")."""
    from clstm4d.data.degrade import FULL, PARTIAL

    out = {}
    for group, kinds in (("partial", PARTIAL), ("full", FULL)):
        values = [by_kind[k] for k in kinds if k in by_kind]
        out[group] = float(np.mean(values)) if values else float("nan")
    return out


def _round(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 4)


def _cell(v: float, width: int, sign: bool = False) -> str:
    return f"{'-':>{width}}" if not np.isfinite(v) else f"{v:>+{width}.3f}" if sign else \
        f"{v:>{width}.3f}"


def report(args, results: dict, names: list[str], truth: dict) -> None:
    from clstm4d.data.degrade import DEGRADATIONS

    kinds = sorted(results[names[0]]["dice_by_kind"], key=DEGRADATIONS.index)
    base = results[names[0]]
    base_groups = family_means(base["dice_by_kind"])
    steps, batch, window = (base.get(k, getattr(args, k)) for k in ("steps", "batch", "window"))
    print(f"degraded frames, {args.data}, {steps} steps x batch {batch} x window {window}, "
          f"seed {args.seed}, degradations {base.get('degrade') or args.degrade or 'default'}; "
          f"Dice (mean over foreground classes); gains over {names[0]}; partial/full = mean "
          f"over those families")
    head = (f"{'variant':<20} {'clean':>6} {'gain':>6} {'partial':>7} {'gain':>6} {'full':>6} "
            f"{'gain':>6} " + " ".join(f"{k[:8]:>8}" for k in kinds)
            + f" {'cons.D':>6} {'dV err':>6} {'rough':>6}")
    print(head)
    print("-" * len(head))
    lines = []
    for n in names:
        r = results[n]
        g = family_means(r["dice_by_kind"])
        print(f"{n:<20} {r['dice_clean']:>6.3f} {r['dice_clean'] - base['dice_clean']:>+6.3f} "
              f"{_cell(g['partial'], 7)} {_cell(g['partial'] - base_groups['partial'], 6, 1)} "
              f"{_cell(g['full'], 6)} {_cell(g['full'] - base_groups['full'], 6, 1)} "
              + " ".join(f"{r['dice_by_kind'][k]:>8.3f}" for k in kinds)
              + f" {r['consecutive_dice']:>6.3f} {r['volume_change_error']:>6.3f}"
              f" {r['volume_roughness']:>6.3f}")
        lines.append({"bench": "degraded", "data": args.data, "variant": n,
                      "overrides": r["overrides"], "dice_clean": round(r["dice_clean"], 4),
                      "gain_clean": round(r["dice_clean"] - base["dice_clean"], 4),
                      "dice_partial": _round(g["partial"]),
                      "gain_partial": _round(g["partial"] - base_groups["partial"]),
                      "dice_full": _round(g["full"]),
                      "gain_full": _round(g["full"] - base_groups["full"]),
                      "dice_degraded_frames": round(r["dice_degraded"], 4),
                      "dice_by_kind": {k: round(v, 4) for k, v in r["dice_by_kind"].items()},
                      **{k: round(r[k], 4) for k in CONSISTENCY},
                      "steps": r.get("steps", args.steps), "batch": r.get("batch", args.batch),
                      "seed": args.seed,
                      "train_seconds": r["train_seconds"],
                      "train_cpu_seconds": r.get("train_cpu_seconds")})
    copies = [("copy previous truth", truth)]
    if "copy_previous_prediction" in base:
        copies.append((f"copy prev. {names[0]}", base["copy_previous_prediction"]))
    for label, c in copies:
        g = family_means(c["dice_by_kind"])
        print(f"{label[:20]:<20} {'':>6} {'':>6} {_cell(g['partial'], 7)} {'':>6} "
              f"{_cell(g['full'], 6)} {'':>6} "
              + " ".join(f"{c['dice_by_kind'][k]:>8.3f}" for k in kinds))
        lines.append({"bench": "degraded", "data": args.data, "variant": label,
                      "dice_partial": _round(g["partial"]), "dice_full": _round(g["full"]),
                      "dice_by_kind": {k: round(v, 4) for k, v in c["dice_by_kind"].items()}})
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
