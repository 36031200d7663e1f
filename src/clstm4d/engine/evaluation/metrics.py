"""Metrics over sequences, via MONAI, with time folded into the batch.

Shape legend: ``n`` batch, ``t`` frames, ``k`` classes (0 = background), ``*s`` spatial axes.

MONAI's metrics take ``(B, K, *s)``; every function here takes the frames of one sequence
``(t, *s)`` as that batch, so that every frame counts. Voxels of the ``"ignore"`` class
(``ignore_index``) count in no metric.

Examples:
    >>> import torch
    >>> label = torch.zeros(3, 4, 4, dtype=torch.long); label[:, 1:3, 1:3] = 1
    >>> pred = label.clone(); pred[2] = 0
    >>> d = dice_per_frame(pred, label, num_classes=2)
    >>> tuple(d.shape), [round(v, 3) for v in d[:, 0].tolist()]
    ((3, 1), [1.0, 1.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["dice_per_frame", "drop_ignored", "hd95_per_frame", "temporal_consistency"]


def drop_ignored(pred, label, ignore_index: int | None):
    """``pred`` and ``label`` with the ``ignore_index`` voxels of ``label`` set to background
    in both, so that foreground metrics leave them out (numpy or torch, ``(t, *s)``)."""
    if ignore_index is None:
        return pred, label
    drop = label == ignore_index
    if isinstance(label, torch.Tensor):
        return pred.masked_fill(drop, 0), label.masked_fill(drop, 0)
    return np.where(drop, 0, pred), np.where(drop, 0, label)


def _onehot(x: torch.Tensor, k: int) -> torch.Tensor:
    # (t, *s) -> (t, k, *s)
    return torch.nn.functional.one_hot(x.long(), k).movedim(-1, 1).float()


def dice_per_frame(pred, label, num_classes: int,
                   ignore_index: int | None = None) -> torch.Tensor:
    """Dice of every foreground class in every frame, via MONAI's ``compute_dice``.

    A frame where a class is absent from both prediction and label scores 1. Voxels whose
    label is ``ignore_index`` are left out (see :func:`drop_ignored`).

    Shape:
        - pred, label: ``(t, *s)`` integer class indices
        - output: ``(t, num_classes - 1)``
    """
    from monai.metrics import compute_dice

    pred, label = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(label))
    if pred.shape != label.shape:
        raise ValueError(
            f"prediction and label must have the same shape (t, *s): got {tuple(pred.shape)} "
            f"and {tuple(label.shape)}"
        )
    pred, label = drop_ignored(pred, label, ignore_index)
    d = compute_dice(_onehot(pred, num_classes), _onehot(label, num_classes),
                     include_background=False, ignore_empty=False)
    return d


def hd95_per_frame(pred, label, num_classes: int, spacing: Sequence[float] | None = None,
                   ignore_index: int | None = None) -> torch.Tensor:
    """95th-percentile Hausdorff distance per frame and foreground class (physical units when
    ``spacing`` is given), via MONAI. NaN where the class is absent from prediction or label.
    Voxels whose label is ``ignore_index`` count as background in both.

    Shape:
        - pred, label: ``(t, *s)``
        - output: ``(t, num_classes - 1)``
    """
    import warnings

    from monai.metrics import compute_hausdorff_distance

    pred, label = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(label))
    pred, label = drop_ignored(pred, label, ignore_index)
    p, y = _onehot(pred, num_classes), _onehot(label, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for every empty class
        hd = compute_hausdorff_distance(
            p, y, include_background=False, percentile=95,
            spacing=None if spacing is None else [float(v) for v in spacing],
        )
    pe = p[:, 1:].flatten(2).sum(-1) == 0
    ye = y[:, 1:].flatten(2).sum(-1) == 0
    hd = hd.float()
    hd[pe | ye | ~torch.isfinite(hd)] = float("nan")
    return hd


def temporal_consistency(pred, label=None, num_classes: int = 2) -> dict[str, list[float]]:
    """How smoothly the segmented volume changes from frame to frame, per foreground class.

    For each class with volume ``V(t)`` (voxel count):

    - ``volume_roughness``: mean ``|V(t) - V(t-1)|`` divided by the mean ``V`` — 0 for a
      constant volume; flicker (a structure vanishing in one frame) makes it large;
    - ``label_volume_roughness``: the same for the label (the true motion), when given;
    - ``volume_change_error``: mean ``|dV_pred(t) - dV_label(t)|`` / mean ``V_label``, when a
      label is given — 0 when the prediction changes exactly as much as the truth does;
    - ``consecutive_dice``: mean Dice between frames ``t-1`` and ``t`` of the prediction.

    Shape:
        - pred, label: ``(t, *s)``
    """
    pred = torch.as_tensor(np.asarray(pred))
    out: dict[str, list[float]] = {"volume_roughness": [], "consecutive_dice": []}
    if label is not None:
        label = torch.as_tensor(np.asarray(label))
        out["label_volume_roughness"] = []
        out["volume_change_error"] = []
    for k in range(1, num_classes):
        vp = (pred == k).flatten(1).sum(1).double()
        dp = vp.diff()
        out["volume_roughness"].append(_ratio(dp.abs().mean(), vp.mean()))
        if pred.shape[0] > 1:
            a, b = (pred[:-1] == k).flatten(1), (pred[1:] == k).flatten(1)
            inter = (a & b).sum(1).double()
            den = (a.sum(1) + b.sum(1)).double()
            cd = torch.where(den > 0, 2 * inter / den.clamp(min=1), torch.ones_like(den))
            out["consecutive_dice"].append(float(cd.mean()))
        else:
            out["consecutive_dice"].append(float("nan"))
        if label is not None:
            vl = (label == k).flatten(1).sum(1).double()
            dl = vl.diff()
            out["label_volume_roughness"].append(_ratio(dl.abs().mean(), vl.mean()))
            out["volume_change_error"].append(_ratio((dp - dl).abs().mean(), vl.mean()))
    return out


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = float(a), float(b)
    if not np.isfinite(a):
        return float("nan")
    return a / b if b > 0 else (0.0 if a == 0 else float("inf"))
