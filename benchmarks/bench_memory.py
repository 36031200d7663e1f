"""Memory horizon: identity Dice against frames since the cue, on the cue-then-track task.

Two look-alike discs, told apart only during the first --cue-frames frames, move, bounce and
pass close to each other (``clstm4d synth --task cue-track``); labels mark the identity on
every frame. Each variant trains at the same budget (same training sequences, steps, batch,
learning rate, seed) and segments held-out sequences of --test-frames frames (longer than
training, so the state is carried beyond the training length). For every frame after the cue
it reports the *identity Dice* (mean Dice of the two identity classes; an identity-blind but
perfect segmentation scores about 0.5), the foreground Dice (both discs as one class: how well
they are found at all) and the identity accuracy (share of sequences where the identity Dice
beats the swapped-identity Dice). The *horizon* is the number of frames after the cue with
identity Dice >= 0.8 before the first drop below.

A variant is a name plus configuration overrides; ``task.frames=N`` trains it on sequences
of N frames instead (drawn the same way). Default variants (all with data.degrade=false):

    per-frame      model.temporal=none
    bottleneck     model.temporal=bottleneck
    bottleneck-t8  model.temporal=bottleneck task.frames=8     (short training sequences)
    bottleneck-t32 model.temporal=bottleneck task.frames=32    (long training sequences)
    skips          model.temporal=skips
    skips-t8       model.temporal=skips task.frames=8

    nice -n 10 python benchmarks/bench_memory.py --out /tmp/memory           # all variants
    python benchmarks/bench_memory.py --out /tmp/memory --only per-frame     # one, resumable
    python benchmarks/bench_memory.py --out /tmp/memory --report             # table + plot

Prints a table (rows: frames since the cue) and one JSON line per variant; writes
``OUT/memory_horizon.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _temporal as common  # noqa: E402

DEFAULT_VARIANTS = {  # no degradation augmentation: the task has no degraded frames
    "per-frame": ["model.temporal=none", "data.degrade=false"],
    "bottleneck": ["model.temporal=bottleneck", "data.degrade=false"],
    "bottleneck-t8": ["model.temporal=bottleneck", "task.frames=8", "data.degrade=false"],
    "bottleneck-t32": ["model.temporal=bottleneck", "task.frames=32", "data.degrade=false"],
    "skips": ["model.temporal=skips", "data.degrade=false"],
    "skips-t8": ["model.temporal=skips", "task.frames=8", "data.degrade=false"],
}
THRESHOLD = 0.8


def training_data(args, frames: int) -> Path:
    from clstm4d.data import write_synthetic_dataset

    folder = Path(args.out) / f"train_t{frames}"
    path = folder / "datalist.json"
    if not path.is_file():
        write_synthetic_dataset(folder, cases=args.cases, frames=frames, size=args.size,
                                spatial_dims=2, seed=args.seed, validation=0.0,
                                task="cue-track", cue_frames=args.cue_frames)
    return path


def test_cases(args):
    from clstm4d.data import make_cue_track_case

    return [make_cue_track_case((args.seed + 1, i), args.test_frames, args.size, 2,
                                cue_frames=args.cue_frames) for i in range(args.test)]


def encounters(label: np.ndarray, cue: int) -> np.ndarray:
    """``(t,)``: how many close passes (centres nearer than 3.5 radii, the generator's meeting
    distance) have begun between the end of the cue and each frame."""
    centres = np.array([[np.argwhere(frame == k).mean(0) for k in (1, 2)] for frame in label])
    radius = np.sqrt((label[0] == 1).sum() / np.pi)
    close = np.linalg.norm(centres[:, 0] - centres[:, 1], axis=1) < 3.5 * radius  # (t,)
    begins = close & ~np.concatenate([[False], close[:-1]])
    begins[cue] |= close[cue]  # a pass under way when the cue ends counts from there
    begins[:cue] = False
    return np.cumsum(begins)


def evaluate(predictor, cases, cue: int) -> dict:
    from clstm4d.engine.evaluation.metrics import dice_per_frame

    ident, fg, correct = [], [], []
    by_encounters: dict[int, list[bool]] = {}
    for c in cases:
        pred = predictor.predict_array(c.image, name=c.name)
        d = dice_per_frame(pred, c.label, 3).mean(1).numpy()  # (t,)
        swapped = np.where(c.label > 0, 3 - c.label, 0)
        ds = dice_per_frame(pred, swapped, 3).mean(1).numpy()
        f = dice_per_frame(pred > 0, c.label > 0, 2)[:, 0].numpy()
        ident.append(d)
        fg.append(f)
        correct.append(d > ds)
        for n, ok in zip(encounters(c.label, cue)[cue:], (d > ds)[cue:], strict=True):
            by_encounters.setdefault(min(int(n), 3), []).append(bool(ok))
    ident, fg, correct = (np.mean(a, 0) for a in (ident, fg, correct))
    after = ident[cue:]
    below = np.flatnonzero(after < THRESHOLD)
    horizon = int(below[0]) if below.size else len(after)
    return {"identity_dice": ident.round(4).tolist(), "foreground_dice": fg.round(4).tolist(),
            "identity_accuracy": correct.round(4).tolist(), "horizon": horizon,
            "identity_dice_cue": float(ident[:cue].mean()),
            "identity_dice_after_cue": float(after.mean()),
            # identity accuracy on the frames after 0, 1, 2, 3+ close passes (frames counted)
            "accuracy_by_encounters": {str(k): [round(float(np.mean(v)), 4), len(v)]
                                       for k, v in sorted(by_encounters.items())}}


def run(args, name: str, overrides: list[str]) -> dict:
    frames = args.train_frames
    rest = []
    for o in overrides:
        if o.startswith("task.frames="):
            frames = int(o.split("=", 1)[1])
        else:
            rest.append(o)
    datalist = training_data(args, frames)
    base = common.base_config(args, datalist, Path(args.out) / "runs" / common.slug(name),
                              window=frames, roi=None, foreground_prob=0.0)
    predictor, seconds, cpu = common.train_variant(base, rest)
    result = evaluate(predictor, test_cases(args), args.cue_frames)
    result.update(name=name, overrides=overrides, train_frames=frames,
                  train_seconds=round(seconds, 1),
                  train_cpu_seconds=round(cpu, 1))
    return result


def plot(results: dict, path: Path, cue: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for name, r in results.items():
        after = r["identity_dice"][cue:]
        ax.plot(np.arange(1, len(after) + 1), after, marker="o", ms=3,
                label=f"{name} (horizon {r['horizon']})")
    ax.axhline(THRESHOLD, color="0.4", ls="--", lw=1)
    ax.axhline(0.5, color="0.7", ls=":", lw=1)
    ax.text(1, 0.51, "chance", color="0.5", fontsize=8)
    ax.set_xlabel("frames since the cue ended")
    ax.set_ylabel("identity Dice")
    ax.set_ylim(0, 1.02)
    ax.set_title("Memory horizon: cue-then-track")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(p)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--cases", type=int, default=32, help="training sequences")
    p.add_argument("--test", type=int, default=16, help="held-out sequences")
    p.add_argument("--train-frames", type=int, default=20)
    p.add_argument("--test-frames", type=int, default=32)
    p.add_argument("--cue-frames", type=int, default=3)
    p.add_argument("--evaluate-only", action="store_true",
                   help="re-evaluate the variants' saved checkpoints (no training)")
    p.set_defaults(steps=600)
    args = p.parse_args()
    chosen = common.variants(args, DEFAULT_VARIANTS)
    results_dir = Path(args.out) / "results"
    if args.evaluate_only:
        from clstm4d.engine.inference.predictor import Predictor

        cases = test_cases(args)
        for name in chosen:
            path = results_dir / f"{common.slug(name)}.json"
            if not path.is_file():
                continue
            old = json.loads(path.read_text())
            run_dir = Path(args.out) / "runs" / common.slug(name)
            new = evaluate(Predictor.from_checkpoint(run_dir, device="cpu", amp="none"), cases,
                           args.cue_frames)
            common.save_result(path, {**old, **new})
    elif not args.report:
        for name, overrides in chosen.items():
            if args.only and name not in args.only:
                continue
            if (results_dir / f"{common.slug(name)}.json").is_file():
                continue
            common.save_result(results_dir / f"{common.slug(name)}.json",
                               run(args, name, overrides))
    results = common.load_results(results_dir, chosen)
    if not results:
        return
    cue = args.cue_frames
    names = list(results)
    print(f"memory horizon, cue-then-track 2D {args.size}^2, cue {cue} frames, test "
          f"{args.test} x {args.test_frames} frames; identity Dice per frame since the cue")
    head = f"{'since cue':>9} " + " ".join(f"{n[:14]:>14}" for n in names)
    print(head)
    print("-" * len(head))
    length = max(len(r["identity_dice"]) for r in results.values()) - cue
    for k in range(length):
        print(f"{k + 1:>9} " + " ".join(
            f"{results[n]['identity_dice'][cue + k]:>14.3f}" for n in names))
    for key, label in (("horizon", "horizon"), ("identity_dice_cue", "cue frames"),
                       ("train_seconds", "train s")):
        print(f"{label:>9} " + " ".join(f"{results[n][key]:>14.3g}" for n in names))
    print(f"{'fg Dice':>9} " + " ".join(
        f"{np.mean(results[n]['foreground_dice']):>14.3f}" for n in names))
    print("identity accuracy (share of frames with the identities right) after k close passes:")
    for k in ("0", "1", "2", "3"):
        cells = [results[n].get("accuracy_by_encounters", {}).get(k) for n in names]
        print(f"{k + ('+' if k == '3' else ''):>9} " + " ".join(
            f"{c[0]:>8.3f} ({c[1]:>3d})" if c else f"{'':>14}" for c in cells))
    plot(results, Path(args.out) / "memory_horizon.png", cue)
    for n in names:
        r = results[n]
        print(json.dumps({"bench": "memory", "variant": n, "overrides": r["overrides"],
                          "train_frames": r["train_frames"], "horizon": r["horizon"],
                          "identity_dice_after_cue": round(r["identity_dice_after_cue"], 4),
                          "identity_dice": r["identity_dice"][cue:],
                          "foreground_dice": round(float(np.mean(r["foreground_dice"])), 4),
                          "steps": args.steps, "batch": args.batch, "seed": args.seed}))


if __name__ == "__main__":
    main()
