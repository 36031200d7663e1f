"""Memory that generalises: identity kept on a shape family no setting was tuned on.

Cue-then-track with objects of varied form (``clstm4d synth --task cue-shapes``): 2-4 objects
(discs, polygons, cell-like blobs; glyph-like strokes held out), the cued one bright only in
the first 3 frames, then all alike, moving, passing close and overlapping partly. Every stage
runs the command line in a fresh process: ``clstm4d synth`` writes the training set (tuning
families) and the test sets (the held-out family, the tuning families and, with ``--tests
crowded``, the tuning families with 4-5 objects; other seeds),
``clstm4d train`` trains each variant, ``clstm4d predict`` segments every test sequence
(one process per variant and test set, calling the CLI once per sequence) from the saved
checkpoint; the written predictions are scored here.

Scores per variant and seed, on 16-frame test sequences: the *identity Dice* (mean Dice of
the cued and the other class; an identity-blind perfect segmentation scores about 0.5) on
frames 8-15, the foreground Dice (all objects as one class), the frames after the cue whose
identity Dice (mean over the test sequences) is >= 0.8, and the *horizon*: those before the
first one below. The table gives the mean and the spread (min-max) over ``--seeds``; the
target is >= 12 frames after the cue at >= 0.8 and >= 0.10 over the per-frame model on frames
8-15 (held-out family).

A variant is a name plus ``section.key=value`` overrides of ``clstm4d train --set``; every
variant gets the same data, steps, batch, learning rate and seed (``--steps`` etc.).

    nice -n 10 python benchmarks/bench_generalise.py --out /tmp/gen              # all
    nice -n 10 python benchmarks/bench_generalise.py --out /tmp/gen128 --cases 128  # the
        # training set that met the target on every seed (docs/training.md)
    nice -n 10 python benchmarks/bench_generalise.py --out /tmp/gen --only per-frame skips
    python benchmarks/bench_generalise.py --out /tmp/gen --report                # table
    nice -n 10 python benchmarks/bench_generalise.py --out /tmp/gen --cross --only skips \
        --tests held-out      # each seed's model on every seed's test set (no training)

Prints a table and one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _temporal as common  # noqa: E402

DEFAULT_VARIANTS = common.PLACEMENTS
THRESHOLD = 0.8
#: test sets: name -> (shape families, objects per sequence; None: ``--objects``). ``crowded``
#: (tuning families, more objects than in training: more passes) is a harder tuning-family
#: set for choosing settings where ``tuning`` is near its ceiling
TESTS = {"held-out": ("held-out", None), "tuning": ("tuning", None), "crowded": ("tuning", "4-5")}
DEFAULT_TESTS = ["held-out", "tuning"]


def clstm4d(*argv: str) -> None:
    """``clstm4d ARGV`` in a fresh process (one torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "clstm4d", *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def synth(out: Path, shapes: str, cases: int, seed: int, args, objects=None) -> Path:
    if not (out / "datalist.json").is_file():
        clstm4d("synth", "--out", str(out), "--task", "cue-shapes", "--shapes", shapes,
                "--cases", str(cases), "--frames", str(args.frames), "--size", str(args.size),
                "--seed", str(seed), "--validation", "0", "--objects", objects or args.objects)
    return out / "datalist.json"


def train(datalist: Path, run: Path, overrides: list[str], seed: int, args) -> float:
    """Train one variant with ``clstm4d train``; returns the process's CPU seconds."""
    if (run / "checkpoints" / "latest.json").is_file():
        return float("nan")
    sets = [f"data.window={args.frames}", f"data.batch_size={args.batch}",
            f"train.seed={seed}", f"train.threads={args.threads}", "train.device=cpu",
            "train.progress=false", "train.log_every=50",
            f"train.warmup_steps={max(1, args.steps // 20)}", *overrides]
    argv = ["train", "--datalist", str(datalist), "--out", str(run), "--steps",
            str(args.steps), "--lr", str(args.lr), "--model", args.model]
    for s in sets:
        argv += ["--set", s]
    before = os.times()
    clstm4d(*argv)
    after = os.times()
    return after.children_user - before.children_user + after.children_system - \
        before.children_system


def predict(run: Path, datalist: Path, out: Path) -> list[tuple[Path, Path]]:
    """Segment every sequence of ``datalist`` with ``clstm4d predict`` (one fresh process
    calling the CLI per sequence); returns (prediction, label) paths."""
    from clstm4d.data import load_datalist

    cases = load_datalist(datalist).training
    pairs = [(out / Path(c.image).name, Path(c.label)) for c in cases]
    todo = [(str(c.image), str(p)) for c, (p, _) in zip(cases, pairs, strict=True)
            if not p.is_file()]
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        code = ("import sys, json\nfrom clstm4d.cli import main\n"
                "for i, o in json.loads(sys.argv[2]):\n"
                "    assert main(['predict', '--checkpoint', sys.argv[1], '--input', i,"
                " '--output', o, '--device', 'cpu', '--amp', 'none']) == 0\n")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", code, str(run), json.dumps(todo)], check=True,
                       env=env, stdout=subprocess.DEVNULL)
    return pairs


def score(pairs, cue: int) -> dict:
    """Identity and foreground Dice per frame (mean over sequences), frames 8-15, horizon;
    per sequence: identity and foreground Dice on frames 8-15 and the share of the cued
    object's voxels there that are labelled as another object (a swap)."""
    from clstm4d.data import read_label
    from clstm4d.engine.evaluation.metrics import dice_per_frame

    ident, fg, swapped = [], [], []
    for pred_path, label_path in pairs:
        pred, _ = read_label(pred_path)
        label, _ = read_label(label_path)
        ident.append(dice_per_frame(pred, label, 3).mean(1).numpy())  # (t,)
        fg.append(dice_per_frame(pred > 0, label > 0, 2)[:, 0].numpy())
        cued = np.asarray(label)[8:16] == 1
        swapped.append(float((np.asarray(pred)[8:16][cued] == 2).sum() / max(1, cued.sum())))
    per_seq = {"identity_late": [round(float(d[8:16].mean()), 3) for d in ident],
               "foreground_late": [round(float(f[8:16].mean()), 3) for f in fg],
               "swapped_late": [round(v, 3) for v in swapped]}
    ident, fg = np.mean(ident, 0), np.mean(fg, 0)
    below = np.flatnonzero(ident[cue:] < THRESHOLD)
    return {"identity_dice": ident.round(4).tolist(), "foreground_dice": fg.round(4).tolist(),
            "late": float(ident[8:16].mean()), "foreground_late": float(fg[8:16].mean()),
            "horizon": int(below[0]) if below.size else len(ident) - cue,
            "frames_above": int((ident[cue:] >= THRESHOLD).sum()), "per_sequence": per_seq}


def run_variant(args, name: str, overrides: list[str], seed: int) -> dict:
    out = Path(args.out)
    train_dl = synth(out / f"data_s{seed}" / "train", args.train_shapes, args.cases, seed, args)
    run = out / "runs" / f"{common.slug(name)}_s{seed}"
    t0 = time.perf_counter()
    cpu = train(train_dl, run, overrides, seed, args)
    result = {"name": name, "seed": seed, "overrides": overrides, "steps": args.steps,
              "train_cpu_seconds": round(cpu, 1),
              "train_seconds": round(time.perf_counter() - t0, 1)}
    for test in args.tests:
        dl = synth(out / f"data_s{seed}" / f"test_{test}", TESTS[test][0], args.test,
                   1000 + seed, args, TESTS[test][1])
        pairs = predict(run, dl, out / "preds" / f"{common.slug(name)}_s{seed}" / test)
        result[test] = score(pairs, cue=3)
    return result


def cross(args, chosen) -> None:
    """Each seed's checkpoint on every seed's test sets (no training): does a miss follow the
    model (its training seed) or the test sequences? Prints, per variant and test set, the
    identity Dice on frames 8-15 (frames >= 0.8 after the cue) with the models as rows and
    the test seeds as columns, then each cell's weak sequences (identity < 0.6 on frames
    8-15): ``swap`` where more than a third of the cued object is labelled as another
    object, ``seg`` where the foreground Dice is below 0.6, else ``mixed``."""
    out = Path(args.out)
    for name in chosen:
        if args.only and name not in args.only:
            continue
        runs = {s: out / "runs" / f"{common.slug(name)}_s{s}" for s in args.seeds}
        missing = [str(r) for r in runs.values() if not (r / "checkpoints").is_dir()]
        if missing:
            raise SystemExit(f"--cross: not trained yet: {missing}")
        cells = {}
        for test in args.tests:
            for a, b in ((a, b) for a in args.seeds for b in args.seeds):
                dl = synth(out / f"data_s{b}" / f"test_{test}", TESTS[test][0], args.test,
                           1000 + b, args, TESTS[test][1])
                folder = test if a == b else f"{test}_on_s{b}"
                pairs = predict(runs[a], dl, out / "preds" / f"{common.slug(name)}_s{a}" / folder)
                cells[f"{test} model s{a} test s{b}"] = score(pairs, cue=3)
            _print_cross(name, test, args.seeds, cells)
        common.save_result(out / "results" / f"cross_{common.slug(name)}.json", cells)


def _print_cross(name: str, test: str, seeds, cells) -> None:
    print(f"{name}, {test} test sets: identity Dice 8-15 (frames >= {THRESHOLD}); rows: the "
          f"model's seed, columns: the test set's seed")
    print(f"{'model':>6} " + " ".join(f"{'test s' + str(b):>14}" for b in seeds))
    for a in seeds:
        row = [cells[f"{test} model s{a} test s{b}"] for b in seeds]
        print(f"{'s' + str(a):>6} " + " ".join(f"{c['late']:>8.3f} ({c['frames_above']:>2})"
                                                  for c in row))
    for a, b in ((a, b) for a in seeds for b in seeds):
        per = cells[f"{test} model s{a} test s{b}"]["per_sequence"]
        weak = [f"#{i} {d:.2f} " + ("swap" if sw > 1 / 3 else "seg" if f < 0.6 else "mixed")
                for i, (d, f, sw) in enumerate(zip(per["identity_late"],
                                                   per["foreground_late"],
                                                   per["swapped_late"], strict=True))
                if d < 0.6]
        print(f"  model s{a} on test s{b}: weak sequences: {', '.join(weak) or 'none'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=40)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--cases", type=int, default=32, help="training sequences")
    p.add_argument("--test", type=int, default=12, help="test sequences per family set")
    p.add_argument("--objects", default="2-4")
    p.add_argument("--train-shapes", default="tuning")
    p.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, choices=list(TESTS),
                   help="test sets to score (tuning runs: --tests tuning, so that the held-out "
                        "family is not even looked at while choosing settings)")
    p.add_argument("--cross", action="store_true",
                   help="no training: predict each seed's checkpoint on every seed's test sets "
                        "(a miss that follows the model or the test data?)")
    p.set_defaults(steps=400, lr=3e-3, batch=4)
    args = p.parse_args(argv)
    chosen = common.variants(args, DEFAULT_VARIANTS)
    if args.cross:
        cross(args, chosen)
        return
    results_dir = Path(args.out) / "results"
    for name, overrides in chosen.items():
        if args.report or (args.only and name not in args.only):
            continue
        for seed in args.seeds:
            path = results_dir / f"{common.slug(name)}_s{seed}.json"
            old = json.loads(path.read_text()) if path.is_file() else {}
            if any(test not in old for test in args.tests):  # new, or a test set missing
                result = run_variant(args, name, overrides, seed)
                if old:  # trained before: keep that run's time and scores
                    result = {**result, **old, **{t: result[t] for t in args.tests}}
                common.save_result(path, result)
    report(args, chosen, results_dir)


def _mean_curve(results, test: str) -> list[float]:
    """Identity Dice per frame, mean over the seeds that scored ``test``."""
    curves = [r[test]["identity_dice"] for r in results if r[test]["identity_dice"]]
    return [round(float(v), 3) for v in np.mean(curves, 0)] if curves else []


def _counts(scores) -> str:
    return " ".join(f"{h['frames_above']}/{h['horizon']}" for h in scores)


def _spread(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ({v.min():.3f}-{v.max():.3f})" if v.size else "-"


def report(args, chosen, results_dir: Path) -> None:
    rows = {}
    for name in chosen:
        found = [json.loads((results_dir / f"{common.slug(name)}_s{s}.json").read_text())
                 for s in args.seeds
                 if (results_dir / f"{common.slug(name)}_s{s}.json").is_file()]
        if found:
            rows[name] = found
    if not rows:
        return
    base = next(iter(rows.values()))
    empty = {"late": float("nan"), "horizon": -1, "foreground_late": float("nan"),
             "identity_dice": []}
    for r in (r for rs in rows.values() for r in rs):
        for test in TESTS:
            r.setdefault(test, dict(empty))
            dice = np.asarray(r[test]["identity_dice"], float)
            r[test]["frames_above"] = int((dice[3:] >= THRESHOLD).sum())
    base_late = np.mean([r["held-out"]["late"] for r in base])
    print(f"cue-shapes, {args.size}^2, {args.frames} frames, trained on {args.train_shapes} "
          f"families; identity Dice on frames 8-15 (mean (min-max) over seeds); per seed "
          f"the frames after the cue with identity Dice >= {THRESHOLD} (of 13) and, after "
          f"'/', the horizon (those before the first one below); gain over {next(iter(rows))}; "
          f"crowded: tuning families, {TESTS['crowded'][1]} objects")
    head = (f"{'variant':<22} {'seeds':>5} {'held-out 8-15':>22} {'gain':>6} "
            f"{'frames>=0.8 / hor.':>20} {'fg':>6} {'tuning 8-15':>22} "
            f"{'frames>=0.8 / hor.':>20} {'crowded 8-15':>22} {'cpu s':>6}")
    print(head)
    print("-" * len(head))
    for name, rs in rows.items():
        held, tune = [r["held-out"] for r in rs], [r["tuning"] for r in rs]
        gain = np.mean([h["late"] for h in held]) - base_late
        crowded = [r["crowded"]["late"] for r in rs if "identity_dice" in r["crowded"]
                   and r["crowded"]["identity_dice"]]
        print(f"{name:<22} {len(rs):>5} {_spread([h['late'] for h in held]):>22} {gain:>+6.3f} "
              f"{_counts(held):>20} "
              f"{np.mean([h['foreground_late'] for h in held]):>6.3f} "
              f"{_spread([h['late'] for h in tune]):>22} "
              f"{_counts(tune):>20} {_spread(crowded):>22} "
              f"{np.mean([r['train_cpu_seconds'] for r in rs]):>6.0f}")
    for name, rs in rows.items():
        print(_json_line(name, rs))


def _json_line(name: str, rs) -> str:
    return json.dumps({"bench": "generalise", "variant": name, "overrides": rs[0]["overrides"],
                       "seeds": [r["seed"] for r in rs], "steps": rs[0]["steps"],
                       "held_out_late": [round(r["held-out"]["late"], 4) for r in rs],
                       "held_out_horizon": [r["held-out"]["horizon"] for r in rs],
                       "held_out_frames_above": [r["held-out"]["frames_above"] for r in rs],
                       "tuning_frames_above": [r["tuning"]["frames_above"] for r in rs],
                       "held_out_foreground_late": [round(r["held-out"]["foreground_late"], 4)
                                                    for r in rs],
                       "tuning_late": [round(r["tuning"]["late"], 4) for r in rs],
                       "tuning_horizon": [r["tuning"]["horizon"] for r in rs],
                       "crowded_late": [round(r["crowded"]["late"], 4) for r in rs],
                       "crowded_frames_above": [r["crowded"]["frames_above"] for r in rs],
                       "held_out_identity_dice": _mean_curve(rs, "held-out"),
                       "tuning_identity_dice": _mean_curve(rs, "tuning"),
                       "train_cpu_seconds": [r["train_cpu_seconds"] for r in rs]})


if __name__ == "__main__":
    main()
