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
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import dice_per_frame, hd95_per_frame, temporal_consistency

__all__ = ["dice_by_corruption", "evaluate_sequence", "write_frames_csv"]


def _nanmean(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


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
) -> dict[str, Any]:
    """Compare a predicted label sequence with the truth, frame by frame.

    Args:
        pred, label: ``(t, *s)`` integer class maps.
        num_classes: ``k`` including background.
        spacing: voxel size per spatial axis, so HD95 comes in physical units.
        corrupted: frames to report separately (``dice_corrupted`` / ``dice_clean``).
        class_names: index -> name for the per-class columns (default ``class1``, ...).
        hd95: compute the 95th-percentile Hausdorff distance (the slowest part).
        corruption: the kind of each frame in ``corrupted`` (same order, e.g. a synthetic
            case's ``meta["corruption"]``); rows then carry it (``""`` on clean frames) and
            :func:`dice_by_corruption` groups them.

    Returns:
        ``{"frames": [one row per frame: frame, corrupted, dice (mean over foreground
        classes), dice_<class>, hd95_<class>, volume_<class>, label_volume_<class>],
        "summary": {dice, dice_corrupted, dice_clean, hd95, dice_<class>,
        temporal consistency measures (see
        :func:`~clstm4d.engine.metrics.temporal_consistency`)}}``.
    """
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(
            f"prediction {pred.shape} and label {label.shape} must have the same shape (t, *s)"
        )
    names = {k: (class_names or {}).get(k, f"class{k}") for k in range(1, num_classes)}
    dice = dice_per_frame(pred, label, num_classes).numpy()  # (t, k-1)
    hd = (hd95_per_frame(pred, label, num_classes, spacing).numpy() if hd95
          else np.full_like(dice, np.nan))
    voxel = float(np.prod(spacing)) if spacing is not None else 1.0
    corrupted_set = {int(f) for f in corrupted}
    if corruption and len(corruption) != len(corrupted):
        raise ValueError(f"corruption needs one kind per corrupted frame: {len(corrupted)} "
                         f"frames, {len(corruption)} kinds")
    kind_of = {int(f): str(k) for f, k in zip(corrupted, corruption, strict=False)}
    rows = []
    for f in range(pred.shape[0]):
        row: dict[str, Any] = {"frame": f, "corrupted": f in corrupted_set,
                               "dice": float(dice[f].mean())}
        if corruption:
            row["corruption"] = kind_of.get(f, "")
        for j, k in enumerate(names):
            row[f"dice_{names[k]}"] = float(dice[f, j])
            row[f"hd95_{names[k]}"] = float(hd[f, j])
            row[f"volume_{names[k]}"] = float((pred[f] == k).sum()) * voxel
            row[f"label_volume_{names[k]}"] = float((label[f] == k).sum()) * voxel
        rows.append(row)
    per_frame = dice.mean(1)
    is_c = np.array([r["corrupted"] for r in rows], bool)
    summary: dict[str, Any] = {
        "frames": int(pred.shape[0]),
        "dice": float(per_frame.mean()),
        "dice_corrupted": float(per_frame[is_c].mean()) if is_c.any() else float("nan"),
        "dice_clean": float(per_frame[~is_c].mean()) if (~is_c).any() else float("nan"),
        "hd95": _nanmean(hd),
    }
    for j, k in enumerate(names):
        summary[f"dice_{names[k]}"] = float(dice[:, j].mean())
        summary[f"hd95_{names[k]}"] = _nanmean(hd[:, j])
    for key, values in temporal_consistency(pred, label, num_classes).items():
        summary[key] = _nanmean(values)
        for j, k in enumerate(names):
            summary[f"{key}_{names[k]}"] = values[j]
    return {"frames": rows, "summary": summary}


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
    from .checkpoint import atomic_write_text

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
