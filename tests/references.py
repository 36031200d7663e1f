"""Independent references the tests compare against (numpy, written from the definitions; not
a test module)."""

from __future__ import annotations

import numpy as np


def dice_reference(pred, label, num_classes: int, ignore: int | None = None) -> float:
    """Mean over frames of the mean over foreground classes of 2|P n L| / (|P| + |L|), a class
    absent from both counting 1; voxels labelled ``ignore`` left out of both."""
    pred, label = np.asarray(pred), np.asarray(label)
    per_frame = []
    for p, y in zip(pred, label, strict=True):
        keep = np.ones(y.shape, bool) if ignore is None else y != ignore
        scores = []
        for k in range(1, num_classes):
            a, b = (p == k) & keep, (y == k) & keep
            total = a.sum() + b.sum()
            scores.append(1.0 if total == 0 else 2.0 * (a & b).sum() / total)
        per_frame.append(np.mean(scores))
    return float(np.mean(per_frame))
