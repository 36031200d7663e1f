"""The demo: what temporal memory buys, measured on embedded synthetic 4D data.

:func:`run_demo` generates a synthetic dataset (sequences with dropped-out and occluded
frames), trains the time-resolved UNet (a ConvLSTM at the bottleneck) and the same network
without memory (``temporal="none"``) with the same data, steps and seed, evaluates both on
held-out sequences longer than the training window, and writes ``report.json``, plots, a GIF
and the checkpoints into the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clstm4d._common import atomic_write_text, json_finite, nanmean
from clstm4d.data import load_case, load_datalist, spread_frames, write_synthetic_dataset
from clstm4d.data.degrade import DEGRADATIONS, parse_degradations
from clstm4d.engine.evaluation.evaluate import (
    dice_by_degradation,
    evaluate_sequence,
    write_frames_csv,
)
from clstm4d.engine.evaluation.plots import overlay_montage, plot_dice_per_frame, write_gif
from clstm4d.engine.inference.predictor import Predictor
from clstm4d.engine.run.config import Config
from clstm4d.engine.run.folders import OutputFolder
from clstm4d.engine.run.progress import check_threads
from clstm4d.engine.training.loop import TrainResult
from clstm4d.engine.training.train import train
from clstm4d.errors import Preempted, UserError

__all__ = ["DemoOptions", "format_table", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    """Settings of the demo (the defaults are what ``clstm4d demo`` runs).

    ``dims=2`` is the default because it is what trains well on a 2-core CPU in minutes (see
    docs/training.md for the measurement); ``dims=3`` runs the same comparison on volumes.
    ``size``, ``steps`` and ``batch_size`` left at ``None`` take the per-dimension defaults
    in :data:`DIMS_DEFAULTS`. ``degrade`` names the degradation families of the synthetic
    data's degraded frames (``degraded`` per sequence, default 3/8 of the frames: 6 of 16;
    see :mod:`clstm4d.data.degrade`): by default all of them, partial ones at strength 0.5
    and full ones at 1, so the report shows what memory buys per family.
    """

    out: str = "demo_out"
    dims: int = 2
    size: int | None = None
    frames: int = 16
    cases: int = 24
    test: int = 8
    model: str = "tiny"
    steps: int | None = None
    batch_size: int | None = None
    window: int = 8
    roi: list[int] | None = None
    lr: float = 3e-3
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    degrade: str = "all"
    degraded: int | None = None
    overwrite: bool = False
    #: annotated frames per training sequence (spread as ED/ES would be: the first, one near
    #: the middle for 2); ``None`` = every frame. Evaluation always scores every frame.
    labelled_frames: int | None = None
    #: ``section.key=value`` configuration overrides applied to every model's training
    #: configuration after the demo's own settings (e.g. ``train.unlabelled_weight=0.5``)
    overrides: list[str] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "temporal (ConvLSTM)": {"temporal": "bottleneck"},
        "per-frame": {"temporal": "none"},
    })


# per spatial dims: size, steps, batch size (what fits the demo's time budget on 2 CPU cores)
DIMS_DEFAULTS = {2: {"size": 64, "steps": 400, "batch_size": 4},
                 3: {"size": 24, "steps": 200, "batch_size": 2}}


def default_threads() -> int:
    """CPU threads for the demo: half the cores, at least 1, at most 4.

    On a 2-core machine that is one thread: measured on the shared 2-core development machine,
    a training step took 0.5 s with one thread and 2.5-3 s with two, because two OpenMP threads
    stall each other whenever another process takes a core; one thread keeps the demo's time
    predictable (its whole run is about 3.5 min of CPU).
    """
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def _train_child(cfg_dict: dict[str, Any], threads: int, queue) -> None:
    """Train in a child process; send back the result (or the error message)."""
    try:
        check_threads(threads, warn=False)  # the parent has warned
        cpu0 = time.process_time()
        # the demo owns its run folders: a second demo trains them again from step 0
        res = train(Config.from_dict(cfg_dict), progress_validation=False, overwrite=True)
        queue.put(("ok", {"checkpoint": str(res.checkpoint), "steps": res.steps,
                          "seconds": res.seconds, "peak": res.peak_memory_bytes,
                          "cpu": time.process_time() - cpu0}))
    except (UserError, OSError, Preempted) as e:  # the parent raises a user error
        queue.put(("user", str(e)))
    except MemoryError as e:  # ... and this as a MemoryError, which the CLI explains
        queue.put(("memory", f"while training: {e}" if str(e) else "while training"))
    except BaseException as e:
        queue.put(("error", f"{type(e).__name__}: {e}"))
        raise


def _train_isolated(cfg: Config, threads: int):
    """Train each model in a fresh process, so that its time and peak memory are its own
    (not shared with allocator caches and lazy initialisation left by the other model)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_child, args=(cfg.to_dict(), threads, queue))
    proc.start()
    import queue as queue_module

    while True:
        try:
            status, payload = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"the training process ended without a result (exit code {proc.exitcode})"
                ) from None
    proc.join()
    if status == "user":
        raise UserError(payload)
    if status == "memory":
        raise MemoryError(payload)
    if status != "ok":
        raise RuntimeError(f"training failed in the child process: {payload}")
    res = TrainResult(Path(payload["checkpoint"]), payload["steps"], payload["seconds"],
                      payload["peak"])
    return res, payload["cpu"]


def _say_default(msg: str) -> None:
    log.info(msg)


def run_demo(opts: DemoOptions, say: Callable[[str], None] = _say_default) -> dict[str, Any]:
    """Run the whole demo and return the report (also written to ``out/report.json``).

    ``opts.out`` must be new, empty or an earlier demo's output (see
    :class:`~clstm4d.engine.run.folders.OutputFolder`) unless ``opts.overwrite``.
    """
    with OutputFolder(opts.out, "demo", overwrite=opts.overwrite):
        t0 = time.perf_counter()
        _resolve(opts)
        check_threads(opts.threads or default_threads())
        out = Path(opts.out)
        datalist_path, labelled = _write_data(opts, out, say)
        dl = load_datalist(datalist_path)
        t_data = time.perf_counter() - t0
        results = _train_models(opts, datalist_path, out, say)
        say(f"[3/4] evaluating on {len(dl.test)} held-out sequences")
        test_cases = [load_case(c) for c in dl.test]
        models, showcase = _evaluate(results, test_cases, dl, out)
        say("[4/4] writing plots, GIF and report")
        report = _report(opts, models, datalist_path, dl, labelled, t_data)
        report["plots"] = _plots(test_cases[0], showcase, out)
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out / "report.json", json.dumps(json_finite(report), indent=2))
        return report


def _resolve(opts: DemoOptions) -> None:
    """Fill in the per-dimension defaults and check the options (before any work)."""
    if opts.dims not in DIMS_DEFAULTS:
        raise UserError(f"demo dims must be 2 or 3, got {opts.dims}")
    for key, value in DIMS_DEFAULTS[opts.dims].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"demo: --threads must be >= 1, got {opts.threads}")
    if min(opts.steps, opts.cases, opts.test, opts.batch_size) < 1 or opts.frames < 2:
        raise UserError("demo: steps, cases, test and batch size must be >= 1, frames >= 2")
    if opts.labelled_frames is not None and not 1 <= opts.labelled_frames <= opts.frames:
        raise UserError(f"demo: --labelled-frames must be 1-{opts.frames} (the frames per "
                        f"sequence), got {opts.labelled_frames}")
    Config.from_dict(None, overrides=opts.overrides)  # a bad override fails before any work


def _write_data(opts: DemoOptions, out: Path, say: Callable[[str], None]
                ) -> tuple[Path, list[int]]:
    """The synthetic dataset (and its sparse annotation); returns the datalist and the
    annotated frames of the training sequences."""
    say(f"[1/4] synthetic {opts.dims}D+t data: {opts.cases} training + {opts.test} held-out "
        f"sequences of {opts.frames} frames, {opts.size}^{opts.dims} voxels -> {out / 'data'}")
    datalist_path = write_synthetic_dataset(
        out / "data", cases=opts.cases, frames=opts.frames, size=opts.size,
        spatial_dims=opts.dims, seed=opts.seed, validation=0.0, test=opts.test,
        degraded=(opts.degraded if opts.degraded is not None
                   else min(opts.frames // 2, round(3 * opts.frames / 8))),
        degradation=parse_degradations(opts.degrade, owner="demo degrade"),
    )
    labelled = _annotate_sparsely(datalist_path, opts.frames, opts.labelled_frames)
    if opts.labelled_frames is not None:
        say(f"      training sequences annotated on {len(labelled)} of {opts.frames} frames "
            f"only: {labelled}")
    return datalist_path, labelled


def _train_models(opts: DemoOptions, datalist_path: Path, out: Path,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """Train every variant with the same data, budget and seed, each in its own process."""
    results: dict[str, Any] = {}
    for i, (name, overrides) in enumerate(opts.variants.items()):
        slug = _slug(name)
        cfg = Config.from_dict({
            "model": {"name": opts.model, **overrides},
            "data": {"datalist": str(datalist_path), "window": opts.window, "roi": opts.roi,
                     "batch_size": opts.batch_size, "foreground_prob": 0.5},
            "train": {"out": str(out / "runs" / slug), "steps": opts.steps, "lr": opts.lr,
                      "seed": opts.seed, "log_every": 10, "progress": opts.progress,
                      "warmup_steps": max(1, opts.steps // 20)},
            "predict": {"roi": None, "chunk": 16},
        }, overrides=opts.overrides)
        say(f"[2/4] training {name} ({i + 1}/{len(opts.variants)}): model '{opts.model}' "
            f"{overrides}, {opts.steps} steps x batch {opts.batch_size} x {opts.window} frames")
        res, cpu = _train_isolated(cfg, opts.threads or default_threads())
        results[name] = {"train": res, "predictor": Predictor.from_checkpoint(res.checkpoint),
                         "slug": slug, "cpu_seconds": cpu}
    return results


def _evaluate(results: dict[str, Any], test_cases, dl, out: Path
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every model on every held-out sequence: the report's model entries, and the first
    sequence's predictions and Dice curves (``showcase``) for the plots."""
    class_names = {k: v for k, v in dl.labels.items() if k}
    models: dict[str, Any] = {}
    showcase: dict[str, Any] = {"preds": {}, "curves": {}}
    for name, r in results.items():
        t_eval = time.perf_counter()
        per_case, frames_all = [], []
        for c in test_cases:
            pred = r["predictor"].predict_array(c.image, c.geometry, name=c.name)
            ev = evaluate_sequence(pred, c.label, dl.num_classes, spacing=c.geometry.spacing,
                                   degraded=c.meta.get("degraded", []),
                                   degradation=c.meta.get("degradation", []),
                                   class_names=class_names, unit=c.geometry.space_unit)
            per_case.append({"case": c.name, **ev.summary()})
            frames_all += [{"case": c.name, **row} for row in ev.rows]
            if c is test_cases[0]:
                showcase["preds"][name] = pred
                showcase["curves"][name] = [row["dice"] for row in ev.rows]
        write_frames_csv(frames_all, out / f"frames_{r['slug']}.csv", ev.units())
        models[name] = _model_entry(r, per_case, frames_all, time.perf_counter() - t_eval)
        models[name]["hd95_unit"] = ev.unit
    return models, showcase


def _model_entry(r: dict[str, Any], per_case: list[dict[str, Any]],
                 frames_all: list[dict[str, Any]], eval_seconds: float) -> dict[str, Any]:
    dice = np.array([f["dice"] for f in frames_all])
    corr = np.array([f["degraded"] for f in frames_all], bool)
    tr = r["train"]
    return {
        "model": r["predictor"].run.model_spec.to_dict(),
        "parameters": int(sum(p.numel() for p in r["predictor"].model.parameters())),
        "dice": nanmean(dice),
        "dice_degraded": nanmean(dice[corr]),
        "dice_clean": nanmean(dice[~corr]),
        "dice_by_degradation": dice_by_degradation(frames_all),
        "hd95": nanmean(c["hd95"] for c in per_case),
        "volume_change_error": nanmean(c["volume_change_error"] for c in per_case),
        "consecutive_dice": nanmean(c["consecutive_dice"] for c in per_case),
        "train_seconds": round(tr.seconds, 2),
        "train_cpu_seconds": round(r["cpu_seconds"], 2),
        "train_steps": tr.steps,
        "peak_memory_mb": round(tr.peak_memory_bytes / 2**20, 1),
        "eval_seconds": round(eval_seconds, 2),
        "checkpoint": str(tr.checkpoint),
        "cases": per_case,
    }


def _plots(case, showcase: dict[str, Any], out: Path) -> dict[str, str]:
    degraded = case.meta.get("degraded", [])
    return {
        "dice_per_frame": str(plot_dice_per_frame(
            showcase["curves"], out / "dice_per_frame.png", degraded=degraded,
            title=f"Dice per frame, held-out sequence {case.name}")),
        "montage": str(overlay_montage(case.image, case.label, showcase["preds"],
                                       out / "montage.png", degraded=degraded)),
        "gif": str(write_gif(case.image, case.label, showcase["preds"], out / "sequence.gif",
                             degraded=degraded)),
    }


def _report(opts: DemoOptions, models: dict[str, Any], datalist_path: Path, dl,
            labelled: list[int], t_data: float) -> dict[str, Any]:
    names = list(models)
    margin, margin_by = float("nan"), {}
    if len(names) >= 2:
        margin = models[names[0]]["dice_degraded"] - models[names[1]]["dice_degraded"]
        first, second = (models[n]["dice_by_degradation"] for n in names[:2])
        margin_by = {k: first[k] - second[k] for k in first if k in second}
    return {
        "settings": {k: v for k, v in asdict(opts).items() if k != "progress"},
        "data": {"datalist": str(datalist_path), "training_cases": len(dl.training),
                 "test_cases": len(dl.test), "classes": dl.labels, "frames": opts.frames,
                 "labelled_frames": labelled, "seconds": round(t_data, 2)},
        "models": models,
        "degraded_margin": margin,
        "margin_by_degradation": margin_by,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The demo's result table as text (one row per model)."""
    unit = next(iter(report["models"].values()), {}).get("hd95_unit", "")
    head = (f"{'model':<22} {'Dice all':>8} {'degraded':>9} {'clean':>7} "
            f"{('HD95 ' + unit).strip():>8} {'train s':>8} {'peak MB':>8} {'params':>8}")
    lines = [head, "-" * len(head)]
    for name, m in report["models"].items():
        lines.append(
            f"{name:<22} {m['dice']:>8.3f} {m['dice_degraded']:>9.3f} {m['dice_clean']:>7.3f} "
            f"{_fmt(m['hd95']):>8} {m['train_seconds']:>8.1f} {m['peak_memory_mb']:>8.1f} "
            f"{m['parameters']:>8d}"
        )
    margin = report["degraded_margin"]
    lines.append(f"temporal - per-frame Dice on degraded frames: {margin:+.3f}")
    data = report.get("data", {})
    if "labelled_frames" in data:
        n, t = len(data["labelled_frames"]), data["frames"]
        lines.append(f"trained with {n} of {t} frames labelled per training sequence"
                     + (f" (frames {data['labelled_frames']})" if n < t else "")
                     + "; Dice over every frame of the held-out sequences")
    overrides = report.get("settings", {}).get("overrides")
    if overrides:
        lines.append(f"both models trained with --set {' --set '.join(overrides)}")
    lines += ["", *format_by_degradation(report)]
    return "\n".join(lines)


def _annotate_sparsely(datalist_path: Path, frames: int, n: int | None) -> list[int]:
    """Declare only ``n`` frames of every training sequence annotated (``labelled_frames``;
    the label files keep every frame, the others are then unannotated); returns them."""

    if n is None:
        return list(range(frames))
    chosen = spread_frames(frames, n)
    raw = json.loads(Path(datalist_path).read_text())
    for entry in raw["training"]:
        entry["labelled_frames"] = chosen
    atomic_write_text(Path(datalist_path), json.dumps(raw, indent=2) + "\n")
    return chosen


def format_by_degradation(report: dict[str, Any]) -> list[str]:
    """Lines of the per-degradation table: Dice of every model per family, and the gain of
    the first model over the second."""
    models = report["models"]
    names = list(models)
    margin = report.get("margin_by_degradation") or {}
    kinds = [k for k in models[names[0]].get("dice_by_degradation", {}) if k != "clean"]
    if not kinds:
        return []
    kinds = sorted(kinds, key=lambda k: DEGRADATIONS.index(k) if k in DEGRADATIONS else 99)
    head = f"{'degradation':<18} " + " ".join(f"{n[:20]:>20}" for n in names) + f" {'gain':>7}"
    lines = [head, "-" * len(head)]
    for k in [*kinds, "clean"]:
        cells = " ".join(f"{models[n]['dice_by_degradation'].get(k, float('nan')):>20.3f}"
                         for n in names)
        lines.append(f"{k:<18} {cells} {margin.get(k, float('nan')):>+7.3f}")
    return lines


def _fmt(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.split("(")[0].strip().lower())
