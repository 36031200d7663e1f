"""Shared by the temporal-memory benchmarks (bench_memory.py, bench_degraded.py).

A *variant* is a name plus ``section.key=value`` overrides of the training configuration
(``model.temporal=none``, ``data.degrade=true``, ...). Every variant of one comparison trains
on the same datalist with the same steps, batch, window, learning rate and seed (the equal
budget); only its overrides differ. Runs are resumable: a variant whose result file exists is
not trained again, so a comparison can be run one variant per process (``--only NAME``) and
reported at the end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

#: the per-frame model and the two placements of the recurrence (bench_drift, bench_generalise)
PLACEMENTS = {
    "per-frame": ["model.temporal=none"],
    "bottleneck": ["model.temporal=bottleneck"],
    "skips": ["model.temporal=skips"],
}


def add_common_arguments(p) -> None:
    p.add_argument("--out", default=None,
                   help="folder for data, runs and results (required: without it the script "
                        "only says what it would train, so that `clstm4d bench` stays short)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--model", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME [KEY=VALUE ...]",
                   help="a variant: its name, then section.key=value overrides (repeatable; "
                        "default: the script's list)")
    p.add_argument("--only", nargs="+", default=None, help="train/evaluate only these variants")
    p.add_argument("--report", action="store_true",
                   help="only print the table from the results already there")


def variants(args, defaults: dict[str, list[str]]) -> dict[str, list[str]]:
    if args.out is None:
        print(f"skipped: this benchmark trains {len(args.variant or defaults)} models "
              f"({args.steps} steps each; tens of CPU minutes); run it with --out DIR")
        raise SystemExit(0)
    chosen = ({v[0]: v[1:] for v in args.variant} if args.variant else dict(defaults))
    if args.only:
        unknown = [n for n in args.only if n not in chosen]
        if unknown:
            raise SystemExit(f"--only: unknown variant(s) {unknown}; known: {list(chosen)}")
    return chosen


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def base_config(args, datalist: Path, run_out: Path, **data: Any) -> dict[str, Any]:
    """The configuration every variant of a comparison shares (the equal budget)."""
    return {
        "model": {"name": args.model},
        "data": {"datalist": str(datalist), "batch_size": args.batch, **data},
        "train": {"out": str(run_out), "steps": args.steps, "lr": args.lr, "seed": args.seed,
                  "threads": args.threads, "progress": False, "log_every": 50,
                  "warmup_steps": max(1, args.steps // 20), "device": "cpu"},
        "predict": {"roi": None, "chunk": 16},
    }


def train_variant(base: dict[str, Any], overrides: list[str]):
    """Train one variant; returns ``(Predictor of the final checkpoint, wall seconds, CPU
    seconds)`` (``time.process_time``: what a loaded, shared machine does not inflate)."""
    import torch

    from clstm4d.engine.inference.predictor import Predictor
    from clstm4d.engine.run.config import Config
    from clstm4d.engine.training.train import train

    torch.set_num_threads(int(base["train"]["threads"]))
    t0, cpu0 = time.perf_counter(), time.process_time()
    run = Path(base["train"]["out"])
    cfg = Config.from_dict(base, overrides=overrides)
    latest = run / "checkpoints" / "latest.json"
    if latest.is_file() and json.loads(latest.read_text())["step"] >= cfg.train.steps:
        # trained before: score it again (a run stopped early is continued below)
        predictor = Predictor.from_checkpoint(run, device="cpu", amp="none")
        return predictor, float("nan"), float("nan")
    res = train(cfg, progress_validation=False, resume=run)
    predictor = Predictor.from_checkpoint(res.checkpoint, device="cpu", amp="none")
    return predictor, time.perf_counter() - t0, time.process_time() - cpu0


def save_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def load_results(folder: Path, names) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        p = folder / f"{slug(name)}.json"
        if p.is_file():
            out[name] = json.loads(p.read_text())
    return out


def c2c12_left_half(npz: str | Path, out: str | Path):
    """The real C2C12 time-lapse split down the middle: the left half written once as the
    training datalist under ``out/train``. Returns ``(image (t, 1, y, x), label (t, y, x), half,
    datalist path)``; the right half (``[..., half:]``) is for testing."""
    import numpy as np

    from clstm4d.data import Geometry, save_datalist, write_image, write_label

    z = np.load(npz)
    image = z["images"].astype(np.float32)[:, None]  # (t, 1, y, x)
    label = (z["labels"] > 0).astype(np.int64)  # (t, y, x)
    half = image.shape[-1] // 2
    folder = Path(out) / "train"
    path = folder / "datalist.json"
    if not path.is_file():
        geometry = Geometry.default("nifti", image.shape[2:3] + (half,), image.shape[0])
        img = write_image(image[..., :half], geometry, folder / "left.nii.gz")[0]
        lab = write_label(label[..., :half], geometry, folder / "left_label.nii.gz")[0]
        save_datalist(path, training=[{"name": "c2c12_left", "image": img, "label": lab}],
                      labels={0: "background", 1: "cell"}, spatial_dims=2)
    return image, label, half, path
