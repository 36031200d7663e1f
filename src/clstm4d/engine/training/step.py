"""One optimizer step, as the training loop takes it: what the memory model describes and
the planner times."""

from __future__ import annotations

import torch

from clstm4d.engine.run.runtime import autocast

__all__ = ["training_step"]


def training_step(model, optimizer, loss_fn, image, label, *, device, amp_dtype=None,
                  grad_clip: float | None = 1.0) -> float:
    """One optimizer step as :func:`~clstm4d.engine.training.loop.fit` takes it (forward under
    autocast, Dice + cross-entropy, gradients from ``None``, gradient clipping, AdamW): what
    the memory model describes and the planner times. Returns the loss.

    Shape:
        image ``(n, t, c, *s)``, label ``(n, t, *s)``.
    """
    model.train()
    with autocast(device, amp_dtype):
        logits = model(image)  # (n, t, k, *s)
    loss = loss_fn(logits, label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())
