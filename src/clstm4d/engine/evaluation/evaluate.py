"""Per-frame, per-class evaluation of a segmented sequence: Dice, HD95, temporal consistency.

Shape legend: ``t`` frames, ``k`` classes (0 = background), ``*s`` spatial axes.

Examples:
    >>> import numpy as np
    >>> label = np.zeros((4, 8, 8), np.int64); label[:, 2:6, 2:6] = 1
    >>> pred = label.copy(); pred[1] = 0          # the prediction misses frame 1
    >>> r = evaluate_sequence(pred, label, num_classes=2, corrupted=[1])
    >>> round(r["summary"]["dice"], 3), r["summary"]["dice_corrupted"], r["summary"]["dice_clean"]
    (0.75, 0.0, 1.0)
    >>> [row["dice"] for row in r["frames"]]
    [1.0, 0.0, 1.0, 1.0]
    >>> r = evaluate_sequence(pred, label, num_classes=2, frames=[0, 3])  # annotated frames
    >>> [row["frame"] for row in r["frames"]], r["summary"]["dice"]
    ([0, 3], 1.0)
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d._common import atomic_write_text, nanmean
from clstm4d.data import load_case, load_datalist, read_label
from clstm4d.errors import UserError

from .metrics import dice_per_frame, drop_ignored, hd95_per_frame, temporal_consistency
from .plots import plot_dice_per_frame, plot_volumes

__all__ = ["dice_by_corruption", "evaluate_files", "evaluate_sequence", "parse_frames",
           "write_evaluation", "write_frames_csv"]


def evaluate_sequence(
    pred,
    label,
    num_classes: int,
    *,
    spacing: Sequence[float] | None = None,
    corrupted: Sequence[int] = (),
    class_names: dict[int, str] | None = None,
    hd95: bool = True,
    corruption: Sequence[str] = (),
    frames: Sequence[int] | None = None,
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """Compare a predicted label sequence with the truth, frame by frame.

    Args:
        pred, label: ``(t, *s)`` integer class maps.
        num_classes: ``k`` including background (the ``"ignore"`` class not counted).
        spacing: voxel size per spatial axis, so HD95 comes in physical units.
        corrupted: frames to report separately (``dice_corrupted`` / ``dice_clean``).
        class_names: index -> name for the per-class columns (default ``class1``, ...).
        hd95: compute the 95th-percentile Hausdorff distance (the slowest part).
        corruption: the kind of each frame in ``corrupted`` (same order, e.g. a synthetic
            case's ``meta["corruption"]``); rows then carry it (``""`` on clean frames) and
            :func:`dice_by_corruption` groups them.
        frames: score only these frames (e.g. the annotated ones); ``None`` = all.
        ignore_index: label value whose voxels are left out of every measure.

    Returns:
        ``{"frames": [one row per scored frame: frame, corrupted, dice (mean over foreground
        classes), dice_<class>, hd95_<class>, volume_<class>, label_volume_<class>],
        "summary": {frames (how many were scored), scored_frames, dice, dice_corrupted,
        dice_clean, hd95, dice_<class>, temporal consistency measures over the scored frames
        in order (see :func:`~clstm4d.engine.evaluation.metrics.temporal_consistency`)}}``.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(
            f"prediction {pred.shape} and label {label.shape} must have the same shape (t, *s)"
        )
    scored = list(range(pred.shape[0])) if frames is None else parse_frames(
        frames, pred.shape[0])
    pred, label = drop_ignored(pred[scored], label[scored], ignore_index)  # (scored, *s)
    names = {k: (class_names or {}).get(k, f"class{k}") for k in range(1, num_classes)}
    dice = dice_per_frame(pred, label, num_classes).numpy()  # (scored, k-1)
    hd = (hd95_per_frame(pred, label, num_classes, spacing).numpy() if hd95
          else np.full_like(dice, np.nan))
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    corrupted_set = {int(f) for f in corrupted}
    if corruption and len(corruption) != len(corrupted):
        raise ValueError(f"corruption needs one kind per corrupted frame: {len(corrupted)} "
                         f"frames, {len(corruption)} kinds")
    kind_of = {int(f): str(k) for f, k in zip(corrupted, corruption, strict=False)}
    rows = []
    for i, f in enumerate(scored):
        row: dict[str, Any] = {"frame": f, "corrupted": f in corrupted_set,
                               "dice": float(dice[i].mean())}
        if corruption:
            row["corruption"] = kind_of.get(f, "")
        for j, k in enumerate(names):
            row[f"dice_{names[k]}"] = float(dice[i, j])
            row[f"hd95_{names[k]}"] = float(hd[i, j])
            row[f"volume_{names[k]}"] = float((pred[i] == k).sum()) * voxel
            row[f"label_volume_{names[k]}"] = float((label[i] == k).sum()) * voxel
        rows.append(row)
    per_frame = dice.mean(1)
    is_c = np.array([r["corrupted"] for r in rows], bool)
    summary: dict[str, Any] = {
        "frames": len(scored),
        "scored_frames": scored,
        "dice": float(per_frame.mean()),
        "dice_corrupted": float(per_frame[is_c].mean()) if is_c.any() else float("nan"),
        "dice_clean": float(per_frame[~is_c].mean()) if (~is_c).any() else float("nan"),
        "hd95": nanmean(hd),
    }
    for j, k in enumerate(names):
        summary[f"dice_{names[k]}"] = float(dice[:, j].mean())
        summary[f"hd95_{names[k]}"] = nanmean(hd[:, j])
    for key, values in temporal_consistency(pred, label, num_classes).items():
        summary[key] = nanmean(values)
        for j, k in enumerate(names):
            summary[f"{key}_{names[k]}"] = values[j]
    return {"frames": rows, "summary": summary}


def parse_frames(frames: str | Sequence[int], t: int | None = None,
                 option: str = "frames") -> list[int]:
    """Frame indices from ``"0,10"`` or a sequence, checked against ``t`` frames.

    Examples:
        >>> parse_frames("0, 10", 12)
        [0, 10]
    """
    if isinstance(frames, str):
        try:
            frames = [int(x) for x in frames.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--{option} must be comma-separated frame numbers, got "
                            f"{frames!r}") from None
    out = [int(f) for f in frames]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise UserError(f"--{option}: expected distinct frame indices >= 0, got {out}")
    if t is not None and max(out) >= t:
        raise UserError(f"--{option}: expected frame indices 0-{t - 1} (the sequence has {t} "
                        f"frames), got {[f for f in out if f >= t]}")
    return out


def evaluate_files(pred: str | Path | Sequence[str | Path],
                   label: str | Path | Sequence[str | Path] | None = None, *,
                   datalist: str | Path | None = None, case: str | None = None,
                   frames: str | Sequence[int] | None = None,
                   corrupted: str | Sequence[int] | None = None,
                   num_classes: int | None = None, hd95: bool = True) -> dict[str, Any]:
    """Read a prediction and its reference and evaluate them (what ``clstm4d evaluate`` does).

    The reference is either ``label`` (file(s)) or the entry ``case`` of ``datalist``; from a
    datalist entry come its annotated frames (the frames scored unless ``frames`` is given,
    which must then be annotated ones), its corrupted frames, the class names, the number of
    classes and the ``"ignore"`` class.

    Returns:
        :func:`evaluate_sequence`'s result plus ``num_classes``, ``class_names`` and ``case``.
    """
    paths = [pred] if isinstance(pred, (str, Path)) else list(pred)
    for f in paths + ([label] if isinstance(label, (str, Path)) else list(label or [])):
        if not Path(f).exists():
            raise UserError(f"file not found: {f}")
    if (label is None) == (datalist is None):
        raise UserError("give the reference as --label files or as --datalist (with --case)")
    names: dict[int, str] = {}
    ignore = annotated = None
    if datalist is not None:
        dl = load_datalist(datalist)
        chosen = _datalist_case(dl, case, datalist)
        ref = load_case(chosen)
        reference, geometry, dims = ref.label, ref.geometry, dl.spatial_dims
        annotated = np.flatnonzero(ref.labelled).tolist()
        names = {k: v for k, v in dl.labels.items() if k and k != dl.ignore_index}
        ignore, case = dl.ignore_index, chosen.name
        num_classes = num_classes or dl.num_classes or None
        if corrupted is None:
            corrupted = chosen.meta.get("corrupted", [])
    else:
        reference, geometry = read_label(label if isinstance(label, (str, Path)) or
                                         len(label) != 1 else label[0])
        dims = None
    prediction, _ = read_label(paths[0] if len(paths) == 1 else paths, dims)
    if prediction.shape != reference.shape:
        raise UserError(f"prediction {prediction.shape} and label {reference.shape} differ in "
                        "shape (t, *s)")
    t = reference.shape[0]
    scored = None if frames is None else parse_frames(frames, t)
    if annotated is not None:
        unannotated = [f for f in (scored or []) if f not in annotated]
        if unannotated:
            raise UserError(f"--frames {unannotated}: not annotated in case '{case}' "
                            f"(annotated frames: {annotated})")
        scored = scored or annotated
    if isinstance(corrupted, str):
        corrupted = parse_frames(corrupted, t, "corrupted") if corrupted.strip() else []
    corrupted = list(corrupted or [])
    if not num_classes:  # from the values: the largest class seen, ignore voxels aside
        _, kept = drop_ignored(prediction, reference, ignore)
        num_classes = int(max(prediction.max(), kept.max())) + 1
    k = max(num_classes, 2)
    result = evaluate_sequence(prediction, reference, k, spacing=geometry.spacing,
                               corrupted=corrupted, class_names=names, hd95=hd95,
                               frames=scored, ignore_index=ignore)
    names = {j: names.get(j, f"class{j}") for j in range(1, k)}
    return {**result, "num_classes": k, "class_names": names, "case": case,
            "corrupted": corrupted}


def _datalist_case(dl, name: str | None, path):
    cases = dl.cases()
    if name is None:
        labelled = [c for c in cases if c.label is not None]
        if len(labelled) == 1:
            return labelled[0]
        raise UserError(f"datalist {path} has {len(labelled)} labelled cases: name one with "
                        f"--case ({', '.join(c.name for c in labelled[:20])})")
    for c in cases:
        if c.name == name:
            if c.label is None:
                raise UserError(f"case '{name}' of datalist {path} has no label")
            return c
    raise UserError(f"no case '{name}' in datalist {path} (cases: "
                    f"{', '.join(c.name for c in cases[:20])})")


def write_evaluation(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``frames.csv``, ``summary.json``, ``dice_per_frame.png`` and
    ``volume_per_frame.png`` for an :func:`evaluate_files` result into ``out``."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_frames_csv(result["frames"], out / "frames.csv")]
    summary = {key: (v if not isinstance(v, float) or np.isfinite(v) else None)
               for key, v in result["summary"].items()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    written.append(out / "summary.json")
    names = list(result["class_names"].values())
    rows = result["frames"]
    curves = {n: [r[f"dice_{n}"] for r in rows] for n in names}
    written.append(plot_dice_per_frame(curves, out / "dice_per_frame.png",
                                       corrupted=result.get("corrupted", []), ylabel="Dice",
                                       frames=[r["frame"] for r in rows]))
    written.append(plot_volumes(rows, names, out / "volume_per_frame.png"))
    return written


def dice_by_corruption(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean per-frame Dice of ``rows`` (from any number of sequences) grouped by their
    ``"corruption"`` kind; ``"clean"`` for the frames without one.

    Examples:
        >>> rows = [{"dice": 1.0, "corruption": ""}, {"dice": 0.5, "corruption": "snr"},
        ...         {"dice": 0.7, "corruption": "snr"}]
        >>> dice_by_corruption(rows)
        {'clean': 1.0, 'snr': 0.6}
    """
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r.get("corruption") or "clean", []).append(r["dice"])
    return {k: float(np.mean(v)) for k, v in groups.items()}


def write_frames_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write per-frame rows (dicts with the same keys) as CSV; NaN is written empty."""
    path = Path(path)
    if not rows:
        atomic_write_text(path, "")
        return path
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v
                    for v in (r.get(k, "") for k in keys)])
    atomic_write_text(path, buf.getvalue())
    return path
