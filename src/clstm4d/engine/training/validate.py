"""Validation during training: mean Dice of the model's predictions on the validation cases,
predicted exactly as ``clstm4d predict`` would (the :class:`Predictor`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from clstm4d.data import ignore_index
from clstm4d.engine.evaluation.metrics import dice_per_frame
from clstm4d.engine.inference.predictor import Predictor
from clstm4d.engine.run.config import SavedRun
from clstm4d.engine.run.runtime import release_cached_memory

__all__ = ["make_validator"]


def make_validator(run: SavedRun, cases, device: torch.device):
    """A function ``model -> {"val_dice": mean Dice over the annotated frames and foreground
    classes, "val_dice_per_frame": [mean over the validation cases annotated there, of frame
    0, 1, ...; None where none is]}``; voxels of the ``"ignore"`` class are left out. Predicts
    every frame with a :class:`~clstm4d.engine.inference.predictor.Predictor` (full precision) and
    leaves the model in training mode."""
    k = run.config.model.out_channels
    ignore = ignore_index(run.labels)

    def validate(model: torch.nn.Module) -> dict[str, Any]:
        release_cached_memory(device)  # the training step's cached blocks
        predictor = Predictor(model, run, device=device, amp="none")
        scores: list[dict[int, float]] = []  # per case: annotated frame -> Dice
        for c in cases:
            pred = predictor.predict_array(c.image, c.geometry, name=c.name)
            annotated = np.flatnonzero(c.labelled)
            dice = dice_per_frame(pred[annotated], c.label[annotated], k, ignore).mean(1)
            scores.append(dict(zip(annotated.tolist(), dice.tolist(), strict=True)))
        model.train()
        release_cached_memory(device)  # validation's, before training goes on
        longest = max(len(c.labelled) for c in cases)
        per_frame = [[s[f] for s in scores if f in s] for f in range(longest)]
        return {"val_dice": float(np.mean([v for s in scores for v in s.values()])),
                "val_dice_per_frame": [float(np.mean(v)) if v else None for v in per_frame]}

    return validate
