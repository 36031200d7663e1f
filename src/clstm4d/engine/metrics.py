"""Losses and metrics over sequences, via MONAI, with time folded into the batch.

Shape legend: ``n`` batch, ``t`` frames, ``k`` classes (0 = background), ``*s`` spatial axes.

MONAI's losses and metrics take ``(B, K, *s)``; every function here folds ``(n, t)`` into
``B`` so that every frame counts, and drops padded frames (``lengths``) and frames without an
annotation (``labelled``) before doing so. Voxels of the ``"ignore"`` class (``ignore_index``)
count neither in the loss nor in the metrics.

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

__all__ = [
    "PseudoLabelLoss",
    "SequenceLoss",
    "dice_per_frame",
    "drop_ignored",
    "hd95_per_frame",
    "temporal_consistency",
    "valid_frames_mask",
]


def valid_frames_mask(lengths: torch.Tensor | None, n: int, t: int, device=None) -> torch.Tensor:
    """Boolean mask ``(n, t)``: True for real frames, False for padding beyond ``lengths``."""
    if lengths is None:
        return torch.ones(n, t, dtype=torch.bool, device=device)
    lengths = torch.as_tensor(lengths, device=device).reshape(n, 1)
    return torch.arange(t, device=device).reshape(1, t) < lengths


class SequenceLoss(torch.nn.Module):
    """Dice + cross-entropy over the annotated frames of a batch of sequences.

    The frames that count (real, not padding beyond ``lengths``, and annotated where
    ``labelled`` says so) are folded into one batch; the others are dropped before anything
    is computed, so their logits and labels cannot change the loss or its gradient (the
    model still ran over them, so the recurrence saw them). The Dice term is MONAI's
    ``DiceLoss(to_onehot_y=True, softmax=True, include_background=False)`` with each frame's
    Dice on its own (``batch=False``) and ``ignore_index`` masking; the cross-entropy term is
    torch's, with ``ignore_index``, averaged over the non-ignored voxels. With every frame
    annotated and no ignore class this equals MONAI's ``DiceCELoss``.

    Reduction: every kept frame weighs the same (Dice: mean over frames and classes; CE: mean
    over voxels), whichever window it came from. A batch of one window with 2 annotated frames
    and one with 1 annotated frame is the mean over those 3 frames, not the mean of the two
    windows' means; so training weighs each annotation equally, as if each annotated frame
    were its own sample (``tests/test_engine_sparse.py`` checks both properties).

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        ignore_index: the label value of the ``"ignore"`` class (not predicted, so at least
            the number of classes ``k``), or ``None``.

    Shape:
        - logits: ``(n, t, k, *s)``
        - label: ``(n, t, *s)`` integer class indices (``ignore_index`` allowed)
        - lengths: ``(n,)`` or ``None`` (all frames real)
        - labelled: ``(n, t)`` bool or ``None`` (all frames annotated)
        - output: scalar (0, still attached to the graph, when no frame is annotated)
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 ignore_index: int | None = None):
        super().__init__()
        from monai.losses import DiceLoss

        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.ignore_index = ignore_index
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False,
                             ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, label: torch.Tensor, lengths=None,
                labelled=None) -> torch.Tensor:
        if logits.dim() != label.dim() + 1 or logits.shape[:2] != label.shape[:2]:
            raise ValueError(
                f"logits (n, t, k, *s) and label (n, t, *s) do not match: got logits "
                f"{tuple(logits.shape)} and label {tuple(label.shape)}"
            )
        n, t = label.shape[:2]
        k = logits.shape[2]
        if self.ignore_index is not None and self.ignore_index < k:
            raise ValueError(f"SequenceLoss: ignore_index {self.ignore_index} is a predicted "
                             f"class (the model has {k} outputs); the ignore class must come "
                             "after every predicted class")
        mask = valid_frames_mask(lengths, n, t, logits.device)  # (n, t)
        if labelled is not None:
            labelled = torch.as_tensor(labelled, device=logits.device)
            if labelled.shape != (n, t):
                raise ValueError(f"labelled must be (n, t) = {(n, t)} bool, got shape "
                                 f"{tuple(labelled.shape)}")
            mask = mask & labelled.bool()
        mask = mask.flatten()  # (n*t,)
        x = logits.flatten(0, 1)[mask]  # (frames, k, *s)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision -> fp32
        y = label.flatten(0, 1)[mask]  # (frames, *s)
        if x.shape[0] == 0:
            return logits.sum() * 0.0
        loss = self.lambda_dice * self.dice(x, y.unsqueeze(1))
        ignore = -100 if self.ignore_index is None else self.ignore_index
        ce = torch.nn.functional.cross_entropy(x, y.long(), ignore_index=ignore,
                                               reduction="sum")
        counted = y.numel() if self.ignore_index is None else int((y != ignore).sum())
        return loss + self.lambda_ce * ce / max(counted, 1)


class PseudoLabelLoss(torch.nn.Module):
    """Cross-entropy towards the model's own confident predictions where nobody annotated.

    The voxels it covers are the *unannotated* ones of the real (non-padding) frames: every
    voxel of a frame that ``labelled`` marks unannotated, and the ``ignore_index`` voxels of
    annotated frames. For each such voxel ``v`` with softmax ``p_v`` (computed in float32 and
    detached: the target carries no gradient), the pseudo-label is ``argmax p_v`` and it
    counts when ``max p_v >= threshold``:

        L = 1/|U| * sum_{v in U} [max_k p_vk >= threshold] * -log softmax(z_v)[argmax_k p_vk]

    with ``U`` the unannotated voxels of the batch. Dividing by ``|U|`` (not by the confident
    voxels; FixMatch's reduction) makes the term small while the model is rarely confident.
    Label content is read only on annotated frames (for their ignore voxels), so what an
    unannotated frame's label holds cannot change this term either.

    Args:
        threshold: in (0, 1), the least max-softmax probability that makes a pseudo-label.
        ignore_index: the label value of the ``"ignore"`` class, or ``None``.

    Shape:
        - logits: ``(n, t, k, *s)``
        - label: ``(n, t, *s)`` (read on annotated frames only)
        - lengths: ``(n,)`` or ``None``; labelled: ``(n, t)`` bool or ``None`` (all
          annotated: then only ignore voxels are unannotated)
        - output: scalar (0, still attached to the graph, when no voxel is unannotated)

    Examples:
        >>> z = torch.zeros(1, 2, 2, 1, 1); z[0, 1, 0] = 4.0  # frame 1: p = (0.98, 0.02)
        >>> lab = torch.zeros(1, 2, 1, 1, dtype=torch.long)
        >>> loss = PseudoLabelLoss(0.9)(z, lab, labelled=torch.tensor([[True, False]]))
        >>> round(loss.item(), 4)  # -log(0.982) over the one unannotated voxel
        0.0181
    """

    def __init__(self, threshold: float = 0.9, ignore_index: int | None = None):
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"PseudoLabelLoss: threshold must be in (0, 1), got {threshold}")
        self.threshold, self.ignore_index = float(threshold), ignore_index

    def forward(self, logits: torch.Tensor, label: torch.Tensor, lengths=None,
                labelled=None) -> torch.Tensor:
        n, t = logits.shape[:2]
        real = valid_frames_mask(lengths, n, t, logits.device)  # (n, t)
        annotated = real if labelled is None else real & torch.as_tensor(
            labelled, device=logits.device).bool()
        x = logits.flatten(0, 1)[real.flatten()]  # (frames, k, *s)
        x = x.to(torch.promote_types(x.dtype, torch.float32)).movedim(1, -1)  # (frames, *s, k)
        # unannotated voxels (frames, *s): all of unannotated frames, ignore voxels of the rest
        free_frame = ~annotated.flatten()[real.flatten()]  # (frames,)
        free = free_frame.reshape(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).clone()
        if self.ignore_index is not None:  # label content of annotated frames only
            free[~free_frame] = label.flatten(0, 1)[annotated.flatten()] == self.ignore_index
        x, count = x[free], int(free.sum())  # (voxels, k)
        if count == 0:
            return logits.sum() * 0.0
        with torch.no_grad():
            confidence, target = x.detach().softmax(-1).max(-1)
            keep = confidence >= self.threshold
        ce = torch.nn.functional.cross_entropy(x[keep], target[keep], reduction="sum")
        return ce / count


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
