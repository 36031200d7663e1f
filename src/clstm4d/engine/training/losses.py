"""Training losses over sequences, via MONAI, with time folded into the batch.

Shape legend: ``n`` batch, ``t`` frames, ``k`` classes (0 = background), ``*s`` spatial axes.

Padded frames (``lengths``) and frames without an annotation (``labelled``) are dropped before
anything is computed; voxels of the ``"ignore"`` class (``ignore_index``) count in no term.
"""

from __future__ import annotations

import torch

from clstm4d.engine.run.config import TrainConfig

__all__ = ["PseudoLabelLoss", "SequenceLoss", "unlabelled_weight", "valid_frames_mask"]


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
                labelled=None, totals: tuple[int, int] | None = None) -> torch.Tensor:
        """The loss; with ``totals`` (:meth:`totals` of a longer window this one is a chunk
        of), this chunk's share of that window's loss: the chunks' shares add up to the
        window's loss exactly (truncated backpropagation through time)."""
        x, y = self._kept(logits, label, lengths, labelled)
        if x.shape[0] == 0:
            return logits.sum() * 0.0
        ignore = -100 if self.ignore_index is None else self.ignore_index
        frames, voxels = totals if totals is not None else self._counts(y)
        dice = self.dice(x, y.unsqueeze(1)) * (x.shape[0] / max(frames, 1))
        ce = torch.nn.functional.cross_entropy(x, y.long(), ignore_index=ignore,
                                               reduction="sum")
        return self.lambda_dice * dice + self.lambda_ce * ce / max(voxels, 1)

    def totals(self, label: torch.Tensor, lengths=None, labelled=None) -> tuple[int, int]:
        """``(frames, voxels)`` that count in the loss of a window with this ``label``
        ``(n, t, *s)``: what :meth:`forward` divides by."""
        n, t = label.shape[:2]
        return self._counts(label.flatten(0, 1)[self._mask(n, t, lengths, labelled,
                                                           label.device)])

    def _counts(self, y: torch.Tensor) -> tuple[int, int]:
        voxels = y.numel() if self.ignore_index is None else int((y != self.ignore_index).sum())
        return int(y.shape[0]), voxels

    @staticmethod
    def _mask(n: int, t: int, lengths, labelled, device) -> torch.Tensor:
        """``(n*t,)``: the frames that count (real and annotated)."""
        mask = valid_frames_mask(lengths, n, t, device)  # (n, t)
        if labelled is not None:
            labelled = torch.as_tensor(labelled, device=device)
            if labelled.shape != (n, t):
                raise ValueError(f"labelled must be (n, t) = {(n, t)} bool, got shape "
                                 f"{tuple(labelled.shape)}")
            mask = mask & labelled.bool()
        return mask.flatten()

    def _kept(self, logits, label, lengths, labelled) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(frames, k, *s)`` (at least float32) and labels ``(frames, *s)`` of the
        frames that count."""
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
        mask = self._mask(n, t, lengths, labelled, logits.device)  # (n*t,)
        x = logits.flatten(0, 1)[mask]  # (frames, k, *s)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision -> fp32
        return x, label.flatten(0, 1)[mask]


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


def unlabelled_weight(cfg: TrainConfig, step: int) -> float:
    """The pseudo-label term's weight at 0-based ``step``: ``cfg.unlabelled_weight``, ramped
    up linearly over the first ``cfg.unlabelled_rampup`` fraction of the run.

    Examples:
        >>> cfg = TrainConfig(steps=100, unlabelled_weight=0.5, unlabelled_rampup=0.2)
        >>> [unlabelled_weight(cfg, s) for s in (0, 10, 20, 99)]
        [0.0, 0.25, 0.5, 0.5]
    """
    ramp = cfg.unlabelled_rampup * cfg.steps
    return cfg.unlabelled_weight * (min(1.0, step / ramp) if ramp > 0 else 1.0)
