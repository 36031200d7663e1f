"""The optimizer's parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from clstm4d.engine.run.config import TrainConfig

__all__ = ["lr_lambda", "param_groups"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on convolution and linear weights (tensors of
    2 or more dimensions) only; none on norm weights, biases (the LSTM's forget-gate bias
    included) and peephole weights, which are all 1-D: decaying them pulls norms towards
    zero gain and the forget bias away from its initial value.

    Examples:
        >>> from clstm4d import ConvLSTM
        >>> groups = param_groups(ConvLSTM(2, 1, 4, 3, peephole=True), 1e-4)
        >>> [(g["weight_decay"], len(g["params"])) for g in groups]
        [(0.0001, 2), (0.0, 3)]
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor of 0-based step ``i`` (``LambdaLR``): linear warm-up over
    ``train.warmup_steps``, then constant or a cosine down to 5% (``train.scheduler``)."""
    warm, total = max(0, cfg.warmup_steps), max(1, cfg.steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return f
