"""The dataset fingerprint: every training case read once (one at a time) and summarised:
spacing, shape, frames, channels, intensities and class voxels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from clstm4d.data import load_case, load_datalist
from clstm4d.errors import UserError

__all__ = ["fingerprint"]

def fingerprint(datalist: str | os.PathLike, *, progress: Any = None) -> dict[str, Any]:
    """Read every training case once, one at a time (never all in memory), and record per
    case: spacing, spatial shape, frames, channels, intensity statistics and class voxel
    counts (labelled frames only, when the data says which are labelled).

    Returns:
        A JSON-serialisable dict: ``cases`` (one entry per case), ``spatial_dims``,
        ``channels``, ``labels`` and ``notes`` (e.g. formats without a stated spacing).

    Raises:
        UserError: no training cases, or cases that disagree in channel count or spatial dims
            (naming the cases).
    """
    path = Path(datalist)
    dl = load_datalist(path, require="training")
    cases, notes = [], []
    first = None
    for i, entry in enumerate(dl.training):
        case = load_case(entry)
        image, label, g = case.image, case.label, case.geometry
        if first is None:
            first = (case.name, image.shape[1], image.ndim - 2)
        elif image.ndim - 2 != first[2]:
            raise UserError(f"case '{case.name}' has {image.ndim - 2} spatial dims, case "
                            f"'{first[0]}' has {first[2]}: all training cases must agree")
        elif image.shape[1] != first[1]:
            raise UserError(f"case '{case.name}' has {image.shape[1]} channels per frame, case "
                            f"'{first[0]}' has {first[1]}: all training cases must agree")
        stated = g.space_unit is not None or g.format in ("nifti", "nifti-series")
        if not stated:
            notes.append(f"case '{case.name}' ({g.format}): the file states no voxel size; "
                         f"{list(g.spacing)} (1 per voxel) is used")
        entry_out = {
            "name": case.name, "spacing": [round(v, 6) for v in g.spacing],
            "spacing_stated": bool(stated), "shape": list(g.spatial_shape),
            "frames": int(image.shape[0]), "channels": int(image.shape[1]),
            "format": g.format, "intensity": _intensity(image, label),
        }
        if label is not None:
            frames = getattr(case, "labelled", None)
            lab = label if frames is None else label[np.asarray(frames, bool)]
            values, counts = np.unique(lab, return_counts=True)
            entry_out["class_voxels"] = {str(int(v)): int(n) for v, n in zip(values, counts,
                                                                             strict=True)}
            entry_out["labelled_frames"] = int(lab.shape[0])
        cases.append(entry_out)
        del case, image, label
        if progress is not None:
            progress(i + 1, len(dl.training), entry_out["name"])
    return {"datalist": str(path.resolve()), "spatial_dims": first[2], "channels": first[1],
            "labels": {str(k): v for k, v in sorted((dl.labels or {}).items())},
            "num_classes": int(dl.num_classes),
            "cases": cases, "notes": notes}


def _intensity(image: np.ndarray, label: np.ndarray | None) -> dict[str, Any]:
    """Per channel: mean, std and 0.5/50/99.5 percentiles of all voxels and of the
    foreground (label > 0) voxels."""
    out = []
    for c in range(image.shape[1]):
        values = image[:, c]
        stats = {"all": _stats(values)}
        if label is not None and (label > 0).any():
            stats["foreground"] = _stats(values[label > 0])
        out.append(stats)
    return {"channels": out}


def _stats(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, np.float64).ravel()
    p = np.percentile(v, [0.5, 50, 99.5])
    return {"mean": float(v.mean()), "std": float(v.std()), "p00_5": float(p[0]),
            "p50": float(p[1]), "p99_5": float(p[2])}
