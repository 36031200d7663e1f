"""The ``clstm4d`` command: demo, train, predict, evaluate, synth, plan, export, bench.

``main(argv) -> int`` is the console script (and ``python -m clstm4d``). Each command has a
parser builder (``_add_<command>``) and a handler that parses, calls one engine function and
prints. Errors the user can fix (:class:`~clstm4d.errors.UserError`: a missing file, an
unknown configuration key, a wrong channel count, a checkpoint of another model, bad data, an
output that would replace an input) and ``OSError`` (a full disk, a read-only folder) end
with one line on stderr and exit code 2; anything else is a bug and keeps its traceback
(``--debug`` shows the traceback of user errors too). ``train`` stopped by SIGTERM or SIGINT
finishes its step, writes a checkpoint and exits with 75 (``EXIT_PREEMPTED``; run the same
command with ``--resume`` to continue).

Examples:
    >>> main(["train", "--set", "train.stpes=3"])  # one line on stderr, exit code 2
    2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_USER_ERROR = 2
# train stopped by SIGTERM/SIGINT after checkpointing: sysexits.h EX_TEMPFAIL ("temporary
# failure; try again later"), distinct from errors (1, 2) and from death by a signal (128+N)
EXIT_PREEMPTED = 75


class _Parser(argparse.ArgumentParser):
    """argparse that shows defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML",
                   help="configuration file (sections model, data, train, predict); "
                        "see docs/training.md for every key")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override one configuration key, e.g. --set train.lr=1e-3 "
                        "(repeatable; values are parsed as YAML)")


def _add_threads_progress(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads ({default}); more threads than free cores are "
                        "warned about: on a busy machine they slow each other down")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress at all (otherwise a bar on a terminal; in a redirected "
                        "log, training writes about a dozen lines: step, loss, s/step, ETA)")


def _add_overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"{what} (refused by default); inputs are never replaced")


@contextlib.contextmanager
def _options_named(args, keys: dict[str, str]):
    """Configuration errors about keys that a command-line option set (``keys``: option
    dest -> ``section.key``) name the option (``--sw-batch-size``), not the key."""
    from clstm4d.errors import ConfigError

    try:
        yield
    except ConfigError as e:
        msg = str(e)
        for opt, key in keys.items():
            if getattr(args, opt, None) is not None:
                msg = msg.replace(f"'{key}'", f"--{opt.replace('_', '-')}")
        if msg == str(e):
            raise
        raise ConfigError(msg) from None


#: what to lower when a command runs out of memory
_LOWER = {"train": "data.roi, data.window or data.batch_size (or set train.recompute)",
          "predict": "--roi, --chunk or --sw-batch-size",
          "evaluate": "the frames scored (--frames), or skip HD95 (--no-hd95)",
          "demo": "--size, --window or --batch-size", "synth": "--size, --frames or --cases",
          "plan": "--shape"}


def _out_of_memory(e: BaseException) -> str | None:
    """What ran out, when ``e`` says an allocation failed (``MemoryError``, torch's CPU
    allocator, CUDA out of memory); else None."""
    import re

    from clstm4d._common import human_bytes

    if isinstance(e, MemoryError):
        return str(e).strip() or "an allocation failed"
    text = str(e)
    if not (type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text
            or "not enough memory" in text):
        return None
    size = re.search(r"tried to allocate (\d+) bytes", text)
    if size:
        return f"could not allocate {human_bytes(int(size.group(1)))}"
    return " ".join(text.split())[:200]


def _command(sub, name: str, handler, help: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help=help, description=description)
    p.set_defaults(handler=handler)
    return p


# ------------------------------------------------------------------------------ demo

def _add_demo(sub) -> None:
    from clstm4d.engine.apps.demo import DemoOptions

    default = DemoOptions()
    d = _command(sub, "demo", _cmd_demo,
                 "synthetic data -> train temporal and per-frame models -> compare",
                 "Generate synthetic 4D data, train the time-resolved UNet (ConvLSTM at the "
                 "bottleneck) and the same network without memory with the same budget, "
                 "evaluate both on held-out sequences, print a table and write report.json, "
                 "plots, a GIF and the checkpoints into --out.")
    d.add_argument("--out", default=default.out, help="output folder")
    d.add_argument("--dims", type=int, choices=(2, 3), default=default.dims,
                   help="2 = 2D+t (fits a 2-core CPU in minutes), 3 = 3D+t volumes")
    d.add_argument("--steps", type=int, default=default.steps,
                   help="training steps per model (default: 400 in 2D, 200 in 3D)")
    d.add_argument("--frames", type=int, default=default.frames,
                   help="frames per synthetic sequence")
    d.add_argument("--cases", type=int, default=default.cases, help="training sequences")
    d.add_argument("--test", type=int, default=default.test, help="held-out test sequences")
    d.add_argument("--size", type=int, default=default.size,
                   help="spatial size per axis (default 64 in 2D, 24 in 3D)")
    d.add_argument("--model", default=default.model,
                   help="model preset (see clstm4d.list_models())")
    d.add_argument("--batch-size", type=int, default=default.batch_size,
                   help="windows per step (default 4 in 2D, 2 in 3D)")
    d.add_argument("--window", type=int, default=default.window,
                   help="frames per training sample")
    d.add_argument("--seed", type=int, default=default.seed, help="seed for data and training")
    _add_threads_progress(d, "default: half the cores, 1 to 4")
    d.add_argument("--degrade", default=default.degrade, metavar="KIND[=S],...",
                   help="degradation families of the data's degraded frames (partial ones at "
                        "strength 0.5, full ones at 1; see clstm4d synth --help)")
    _add_overwrite_arg(d, "write into an --out that holds files the demo did not write")
    d.add_argument("--labelled-frames", type=int, default=default.labelled_frames, metavar="N",
                   help="annotate only N frames of each training sequence (the first, then "
                        "evenly spread: 0 and the middle for 2); default: every frame")
    d.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a key of both models' training configuration, e.g. "
                        "--set train.unlabelled_weight=0.5 (repeatable; values parsed as YAML)")


def _cmd_demo(args) -> int:
    from clstm4d.engine.apps.demo import DemoOptions, format_table, run_demo

    fields = {f.name for f in dataclasses.fields(DemoOptions)}
    opts = DemoOptions(**{k: v for k, v in vars(args).items() if k in fields},
                       progress=not args.no_progress)
    t0 = time.perf_counter()
    report = run_demo(opts, say=lambda m: print(m, flush=True))
    out = Path(args.out)
    print()
    print(format_table(report))
    print()
    print(f"wrote {out / 'report.json'}, {out / 'dice_per_frame.png'}, {out / 'montage.png'}, "
          f"{out / 'sequence.gif'} and checkpoints under {out / 'runs'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


# ------------------------------------------------------------------------------ train

#: ``train`` options that set one configuration key each
_TRAIN_KEYS = {"datalist": "data.datalist", "out": "train.out", "model": "model.name",
               "steps": "train.steps", "batch_size": "data.batch_size", "lr": "train.lr",
               "amp": "train.amp", "device": "train.device",
               "recompute": "train.recompute",
               "checkpoint_every": "train.checkpoint_every", "threads": "train.threads"}


def _add_train(sub) -> None:
    t = _command(sub, "train", _cmd_train,
                 "train a model from a datalist (single process or under torchrun)",
                 "Train on a datalist (Decathlon-style JSON). Runs the same under `torchrun "
                 "--nproc_per_node=N` with DistributedDataParallel. Command-line options "
                 "override the --config file.")
    _add_config_args(t)
    t.add_argument("--datalist", help="datalist JSON (data.datalist)")
    t.add_argument("--out", help="run folder for checkpoints and metrics (train.out)")
    t.add_argument("--model", help="model preset (model.name)")
    t.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    t.add_argument("--batch-size", type=int, help="sequences per step and process "
                   "(data.batch_size)")
    t.add_argument("--lr", type=float, help="learning rate (train.lr)")
    t.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"),
                   help="mixed precision (train.amp)")
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    t.add_argument("--recompute", action="store_true", default=None,
                   help="recompute activations in backward to save memory (activation "
                        "checkpointing; train.recompute)")
    t.add_argument("--checkpoint-every", type=int, help="save every N steps "
                   "(train.checkpoint_every)")
    _add_threads_progress(t, "train.threads; default: torch's choice, the cores")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue exactly from a checkpoint (default: the latest in --out)")
    _add_overwrite_arg(t, "start again from step 0 in an --out that holds a run (without it "
                       "a run continues only with --resume), or write into a folder of other "
                       "files")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration and exit")
    t.add_argument("--force", action="store_true",
                   help="start even when the memory model predicts that a training step "
                        "will not fit in the device's free memory")


def _cmd_train(args) -> int:
    from clstm4d.engine.run.config import load_config
    from clstm4d.engine.training.train import train

    values = {key: getattr(args, opt) for opt, key in _TRAIN_KEYS.items()}
    values["train.progress"] = False if args.no_progress else None
    with _options_named(args, _TRAIN_KEYS):
        cfg = load_config(args.config, args.overrides, values=values)
    if args.print_config:
        print(cfg.to_json())
        return 0
    resume = None if args.resume is None else (args.resume or cfg.train.out)
    res = train(cfg, resume=resume, overwrite=args.overwrite, force=args.force)
    if res.checkpoint is not None:
        last = res.history[-1] if res.history else {}
        print(f"trained {res.steps} steps in {res.seconds:.1f} s"
              + (f", loss {last['loss']:.4f}" if last.get("loss") is not None else "")
              + (f", val Dice {last['val_dice']:.3f}" if "val_dice" in last else "")
              + (f", peak memory {last['peak_mb']:.0f} MiB (predicted "
                 f"{last['predicted_peak_mb']:.0f})" if "peak_mb" in last else "")
              + f"; checkpoint {res.checkpoint}")
    return 0


# ------------------------------------------------------------------------------ predict

def _add_predict(sub) -> None:
    p = _command(sub, "predict", _cmd_predict, "segment a sequence with a trained checkpoint",
                 "Segment every frame of an image sequence: sliding windows over space "
                 "(Gaussian blending), chunks of frames over time with the recurrent state "
                 "carried between chunks. The output is written in the input's format and "
                 "geometry.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, its model.safetensors, a training run folder, or "
                        "an ONNX export (model.onnx; runs with onnxruntime)")
    p.add_argument("--input", required=True, nargs="+",
                   help="one 4D file (NIfTI/TIFF/.npy/.npz), or the per-frame files of one "
                        "sequence or their folder; DICOM: one multi-frame file, or the files "
                        "of one series or their folder")
    p.add_argument("--output", required=True,
                   help="output file (single-file formats) or folder (per-frame series); for "
                        "DICOM input seg.dcm (a DICOM Segmentation) or seg.nii.gz")
    p.add_argument("--grey", action="store_true",
                   help="colour (RGB) input: segment its luminance (for a grey-scale model)")
    p.add_argument("--axes", help="NumPy input: axis order, letters T C Z Y X, e.g. TZYX "
                   "(default: a sidecar JSON, else (t, c, *s) or (t, *s))")
    p.add_argument("--spacing", type=float, nargs="+",
                   help="NumPy input: voxel size per spatial axis in the array's order (one "
                   "value for all; default: a sidecar JSON, else 1)")
    p.add_argument("--roi", type=int, nargs="+", help="sliding-window size per spatial axis "
                   "(one value for all); default: the checkpoint's predict.roi (whole frames)")
    p.add_argument("--overlap", type=float, help="window overlap fraction (default 0.25)")
    p.add_argument("--chunk", type=int, help="frames per chunk (default 16)")
    p.add_argument("--time-margin", type=int,
                   help="bidirectional models: frames of context on both sides of each chunk "
                        "(default: the whole sequence in one pass)")
    p.add_argument("--sw-batch-size", type=int, help="windows run together (default 1)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's "
                   "predict.device, auto)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"),
                   help="mixed precision (default: the checkpoint's predict.amp, auto)")
    _add_overwrite_arg(p, "replace an existing --output file, or write into a non-empty "
                       "--output folder")
    _add_threads_progress(p, "default: torch's choice, the cores")


#: ``predict`` options that override one ``predict`` key of the checkpoint's configuration
_PREDICT_OPTIONS = ("roi", "overlap", "chunk", "time_margin", "sw_batch_size")


def _cmd_predict(args) -> int:
    from clstm4d.engine.inference.predictor import Predictor
    from clstm4d.engine.run.progress import check_threads
    from clstm4d.errors import ConfigError

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    check_threads(args.threads)
    with _options_named(args, {k: f"predict.{k}" for k in _PREDICT_OPTIONS}):
        predictor = Predictor.from_checkpoint(
            args.checkpoint, device=args.device, amp=args.amp,
            **{k: getattr(args, k) for k in _PREDICT_OPTIONS})
    t0 = time.perf_counter()
    written = predictor.predict_file(args.input, args.output, overwrite=args.overwrite,
                                     progress=not args.no_progress, grey=args.grey,
                                     axes=args.axes, spacing=args.spacing)
    print(f"segmented {args.input[0] if len(args.input) == 1 else f'{len(args.input)} files'} "
          f"in {time.perf_counter() - t0:.1f} s -> "
          f"{written[0] if len(written) == 1 else f'{len(written)} files in {args.output}'}")
    return 0


# ------------------------------------------------------------------------------ evaluate

def _add_evaluate(sub) -> None:
    e = _command(sub, "evaluate", _cmd_evaluate,
                 "per-frame Dice, HD95 and temporal consistency of a prediction",
                 "Compare a predicted label sequence with the reference: Dice and HD95 per "
                 "frame and class, how smoothly the segmented volume changes frame to frame; "
                 "writes frames.csv, summary.json and plots.")
    e.add_argument("--pred", required=True, nargs="+", help="predicted label file(s)")
    e.add_argument("--label", nargs="+", help="reference label file(s) (or --datalist)")
    e.add_argument("--datalist", help="take the reference from this datalist's entry --case: "
                   "its label, annotated frames, degraded frames, classes and ignore class")
    e.add_argument("--case", help="the datalist entry (needed when it has several)")
    e.add_argument("--frames", default=None,
                   help="score only these frames, e.g. 0,10 (default: every frame, or the "
                        "entry's annotated frames with --datalist)")
    e.add_argument("--out", default=None, help="folder for frames.csv, summary.json and plots")
    e.add_argument("--num-classes", type=int, default=None,
                   help="classes including background (default: the datalist's or the "
                        "checkpoint's labels, else the largest value in the files + 1); a "
                        "value outside the classes is refused")
    e.add_argument("--checkpoint", default=None,
                   help="take the classes and their names from this checkpoint's labels")
    e.add_argument("--resample-to-label", action="store_true",
                   help="resample a prediction on another voxel grid onto the label's "
                        "(nearest neighbour) instead of refusing it")
    e.add_argument("--degraded", default=None,
                   help="comma-separated frames to report separately, e.g. 3,7 (default: "
                        "none, or the entry's \"degraded\" with --datalist)")
    e.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    _add_overwrite_arg(e, "write into an --out that holds files evaluate did not write")


def _cmd_evaluate(args) -> int:
    from clstm4d.engine.apps.evaluate import run_evaluate

    res, written = run_evaluate(
        args.pred, args.label, datalist=args.datalist, case=args.case, frames=args.frames,
        degraded=args.degraded, num_classes=args.num_classes, hd95=not args.no_hd95,
        checkpoint=args.checkpoint, resample_to_label=args.resample_to_label,
        out=args.out, overwrite=args.overwrite)
    print((f"case {res.case}  " if res.case else "")
          + f"frames {len(res.frames)}  Dice {res.dice:.4f}"
          + (f"  HD95 {res.hd95:.3f} {res.unit}" if res.hd95_computed else "")
          + f"  volume change error {res.temporal['volume_change_error']:.4f}  "
          f"consecutive-frame Dice {res.temporal['consecutive_dice']:.4f}"
          + (f"  Dice degraded {res.dice_degraded:.4f}" if res.degraded else ""))
    print("per class Dice: " + "  ".join(f"{name} {v['dice']:.4f}"
                                         for name, v in res.per_class.items()))
    print("per frame Dice:", " ".join(f"{r['frame']}:{r['dice']:.3f}" for r in res.rows))
    for line in res.notes():
        print(f"note: {line}")
    if written:
        print(f"wrote {written[0]}, " + ", ".join(p.name for p in written[1:]))
    return 0


# ------------------------------------------------------------------------------ synth

def _spacing_arg(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 1,1,4; "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _add_synth(sub) -> None:
    import inspect

    from clstm4d.data.degrade import DEGRADATIONS
    from clstm4d.data.synthetic import FORMATS, TASKS, write_synthetic_dataset

    default = {k: p.default for k, p in
               inspect.signature(write_synthetic_dataset).parameters.items()}
    s = _command(sub, "synth", _cmd_synth, "write a synthetic 4D dataset (files + datalist)",
                 "Write a deterministic synthetic 2D+t/3D+t dataset with degraded frames as "
                 "files plus a datalist.json.")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--cases", type=int, default=default["cases"], help="labelled cases")
    s.add_argument("--frames", type=int, default=default["frames"], help="frames per case")
    s.add_argument("--size", type=int, default=default["size"],
                   help="spatial size per axis (default 64 in 2D, 32 in 3D)")
    s.add_argument("--dims", type=int, default=default["spatial_dims"], choices=(1, 2, 3),
                   help="spatial dimensions")
    s.add_argument("--seed", type=int, default=default["seed"], help="random seed")
    s.add_argument("--format", default=default["format"], choices=sorted(FORMATS),
                   help="file format (nifti: one 4D .nii.gz per case)")
    s.add_argument("--validation", type=float, default=default["validation"],
                   help="fraction of cases for validation")
    s.add_argument("--test", type=int, default=default["test"], help="extra test cases")
    s.add_argument("--noise", type=float, default=0.08, help="std of the image noise")
    s.add_argument("--blobs", type=int, default=2, help="drifting blobs per case")
    s.add_argument("--degraded", type=int, default=None,
                   help="degraded frames per case (default: about a quarter of the frames)")
    s.add_argument("--spacing", type=_spacing_arg, default=None, metavar="S[,S,S]",
                   help="voxel size per spatial axis in the arrays' axis order, e.g. 1,1,4 for "
                        "slices 4x thicker than the in-plane pixels (the scene keeps its "
                        "extent --size, so that axis gets size/4 voxels; default 1)")
    s.add_argument("--degrade", default=None, metavar="KIND[=S],...",
                   help="degradation families of those frames, each with a strength in (0, 1]: "
                        + ", ".join(DEGRADATIONS) + " (or partial, full, all; default "
                        "strength 0.5 partial, 1 full), e.g. snr=0.5,defocus=0.3 (default: "
                        "dropout,occlusion)")
    s.add_argument("--task", default=default["task"], choices=sorted(TASKS),
                   help="chamber: beating chamber + blobs; cue-track: two look-alike discs "
                        "labelled by identity, told apart only in the first frames; "
                        "cue-shapes: the same with 2-4 objects of varied form (--shapes)")
    s.add_argument("--cue-frames", type=int, default=3,
                   help="cue-track, cue-shapes: frames at the start where the objects differ")
    s.add_argument("--shapes", default=None, metavar="FAMILY,...",
                   help="cue-shapes: shape families of the objects: disc, polygon, cell, glyph, "
                        "or tuning (disc,polygon,cell: the default), held-out (glyph: kept out "
                        "of all tuning), all")
    s.add_argument("--objects", default=None, metavar="N[-M]",
                   help="cue-shapes: objects per sequence, a number or a range (default 2-4)")
    _add_overwrite_arg(s, "write into an --out that holds files synth did not write")


def _synth_options(args) -> dict[str, Any]:
    """Keyword arguments of :func:`~clstm4d.data.write_synthetic_dataset` from the options."""
    from clstm4d.data.degrade import parse_degradations
    from clstm4d.errors import ConfigError

    opts = {"cases": args.cases, "frames": args.frames, "size": args.size,
            "spatial_dims": args.dims, "seed": args.seed, "format": args.format,
            "validation": args.validation, "test": args.test, "noise": args.noise}
    if args.task != "cue-shapes" and (args.shapes is not None or args.objects is not None):
        raise ConfigError(f"--shapes and --objects apply to --task cue-shapes, not {args.task}")
    if args.task in ("cue-track", "cue-shapes"):
        if args.degrade is not None or args.degraded is not None or args.spacing is not None:
            raise ConfigError("--degrade, --degraded and --spacing apply to --task chamber, "
                              f"not {args.task}")
        opts.update(task=args.task, cue_frames=args.cue_frames)
        if args.task == "cue-shapes":
            from clstm4d.data.shapes import parse_shapes

            opts["shapes"] = list(parse_shapes(args.shapes, owner="--shapes"))
            if args.objects is not None:
                opts["objects"] = _objects_arg(args.objects)
        return opts
    opts.update(blobs=args.blobs, degraded=args.degraded)
    if args.spacing is not None:
        opts["spacing"] = args.spacing
    if args.degrade is not None:
        opts["degradation"] = parse_degradations(args.degrade, owner="--degrade")
    return opts


def _objects_arg(text: str) -> list[int]:
    from clstm4d.errors import ConfigError

    try:
        lo, _, hi = text.partition("-")
        return [int(lo), int(hi or lo)]
    except ValueError:
        raise ConfigError(f"--objects must be N or N-M (e.g. 2-4), got {text!r}") from None


def _cmd_synth(args) -> int:
    from clstm4d.engine.apps.synth import run_synth

    print(f"wrote {run_synth(args.out, _synth_options(args), overwrite=args.overwrite)}")
    return 0


# ------------------------------------------------------------------------------ plan

def _add_plan(sub) -> None:
    pl = _command(sub, "plan", _cmd_plan,
                  "plan training for a memory budget (patch, window, batch, spacing, strides, "
                  "recomputation)",
                  "Fingerprint a datalist (every training case read once: spacing, shape, "
                  "frames, intensities, class voxels), choose the target spacing, then the "
                  "largest patch, window and batch, the per-axis strides and kernels, "
                  "recomputation and precision whose predicted peak memory fits --memory with a "
                  "margin. Writes a config that `clstm4d train --config` uses as is (and "
                  "fingerprint.json beside it) and prints the choices, the predicted peak, the "
                  "share of the budget and a predicted step time. With --shape T,D,H,W instead "
                  "of --datalist it answers for a sequence size without data.")
    pl.add_argument("--datalist", help="datalist JSON of the training data")
    pl.add_argument("--shape", metavar="T,D,H,W",
                    help="frames and spatial size (arrays' axis order) instead of a datalist")
    pl.add_argument("--memory", default=None, metavar="SIZE",
                    help="budget, e.g. 24GB, 1.5GB, 800MB (GB = GiB; default: the free "
                         "memory of the training device)")
    pl.add_argument("--model", default="tiny", help="model preset (widths, recurrence)")
    pl.add_argument("--out", default="plan.yaml", help="the plan (config YAML) to write")
    pl.add_argument("--device", default="auto", help="training device: auto, cpu, cuda[:N]")
    pl.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="auto: bf16 on CUDA, fp32 on CPU")
    pl.add_argument("--min-window", type=int, default=4,
                    help="frames per window the roi search starts from")
    pl.add_argument("--max-batch", type=int, default=8, help="largest batch to propose")
    pl.add_argument("--recompute", choices=("auto", "on", "off"), default="auto",
                    help="activation recomputation: auto (only when it buys a larger patch or "
                         "window), on or off")
    pl.add_argument("--no-time", action="store_true", help="skip the step-time calibration")
    pl.add_argument("--time-per-step", type=float, default=None, metavar="SECONDS",
                    help="longest predicted seconds per training step (from the calibration): "
                         "smaller batch, window, then patch until a step fits")


def _cmd_plan(args) -> int:
    from clstm4d.engine.apps.plan import capacity_lines, run_plan

    plan, written = run_plan(memory=args.memory, datalist=args.datalist, shape=args.shape,
                             model=args.model, out=args.out, device=args.device,
                             precision=args.precision, min_window=args.min_window,
                             max_batch=args.max_batch, measure_time=not args.no_time,
                             time_per_step=args.time_per_step,
                             recompute={"auto": None, "on": True, "off": False}[args.recompute],
                             say=lambda m: print(m, file=sys.stderr, flush=True))
    print(plan.table())
    if args.shape:
        print()
        print("\n".join(capacity_lines(plan, args.model, args.shape)))
    if written:
        print("wrote " + ", ".join(str(p) for p in written)
              + (f"; train with: clstm4d train --config {written[0]}" if args.datalist else ""))
    return 0


# ------------------------------------------------------------------------------ export

def _add_export(sub) -> None:
    p = _command(sub, "export", _cmd_export, "export a trained model (ONNX, MONAI bundle)",
                 "onnx: one streaming step (frames and the recurrent state in, logits and the "
                 "new state out; dynamic batch and spatial size), run by `clstm4d predict "
                 "--checkpoint model.onnx` with onnxruntime; bidirectional models are refused. "
                 "monai-bundle: a folder that `python -m monai.bundle run` runs.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, its model.safetensors, or a training run folder")
    p.add_argument("--format", required=True, choices=("onnx", "monai-bundle"))
    p.add_argument("--out", required=True,
                   help="the .onnx file (onnx) or the bundle folder (monai-bundle)")
    p.add_argument("--frames", type=int, default=1,
                   help="onnx: frames per exported step (prediction chunks must be a "
                        "multiple of it)")
    _add_overwrite_arg(p, "replace an existing --out")


def _cmd_export(args) -> int:
    from clstm4d.engine.apps.export import run_export

    t0 = time.perf_counter()
    out = run_export(args.checkpoint, args.format, args.out, frames=args.frames,
                     overwrite=args.overwrite)
    print(f"exported {args.checkpoint} as {args.format} in {time.perf_counter() - t0:.1f} s "
          f"-> {out}")
    return 0


# ------------------------------------------------------------------------------ bench

def _add_bench(sub) -> None:
    b = _command(sub, "bench", _cmd_bench, "run the benchmark scripts in benchmarks/",
                 "Run benchmarks/bench_<NAME>.py (all of them without NAME); further arguments "
                 "go to the script.")
    b.add_argument("name", nargs="?", default=None,
                   help="NAME of benchmarks/bench_NAME.py, e.g. convlstm, unet, predict, "
                        "plan (default: all)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")


def _cmd_bench(args) -> int:
    from clstm4d.errors import UserError

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    if not root.is_dir():
        raise UserError(f"benchmarks/ not found next to the sources ({root}); "
                        "run from a source checkout")
    scripts = sorted(root.glob("bench_*.py"))
    if args.name:
        scripts = [s for s in scripts if s.stem == f"bench_{args.name}"]
        if not scripts:
            known = ", ".join(s.stem[6:] for s in sorted(root.glob("bench_*.py")))
            raise UserError(f"unknown benchmark '{args.name}' (known: {known})")
    rc = 0
    for script in scripts:
        print(f"== {script.name}", flush=True)
        rc = max(rc, subprocess.call([sys.executable, str(script), *args.args]))
    return rc


# ------------------------------------------------------------------------------ main

_COMMANDS = (_add_demo, _add_train, _add_predict, _add_evaluate, _add_synth, _add_plan,
             _add_export, _add_bench)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clstm4d", description="Convolutional recurrent segmentation of "
                     "sequences of images and volumes (2D+t, 3D+t).")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``clstm4d`` command line; returns the exit code.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse already printed
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from clstm4d.errors import Preempted, UserError

    try:
        return args.handler(args)
    except Preempted as e:
        print(f"clstm4d {args.command}: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"clstm4d {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError, MemoryError, RuntimeError) as e:
        memory = None if isinstance(e, (UserError, OSError)) else _out_of_memory(e)
        if args.debug or os.environ.get("CLSTM4D_DEBUG") or (
                memory is None and not isinstance(e, (UserError, OSError))):
            raise  # a RuntimeError that is not about memory is a bug: its traceback
        msg = " ".join(str(e).split()) or type(e).__name__
        if memory is not None:
            msg = f"out of memory ({memory}); lower {_LOWER.get(args.command, 'the sizes')}"
        if isinstance(e, FileNotFoundError) and e.filename:
            msg = f"file not found: {e.filename}"
        elif isinstance(e, OSError) and e.filename and e.strerror:  # full disk, read-only
            msg = f"{e.strerror}: {e.filename}"
        print(f"clstm4d {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
