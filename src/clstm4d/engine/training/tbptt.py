"""Truncated backpropagation through time: a long training window in chunks, the state carried.

Shape legend: ``n`` batch, ``t`` frames, ``c`` channels, ``k`` classes, ``*s`` spatial axes.

With ``train.tbptt: K`` the loop cuts each training window of ``data.window`` frames into
consecutive chunks of ``K`` frames and runs them one after the other, passing the recurrent
state of one chunk on to the next (``forward(x, state, return_state=True)``). After each
chunk the loss of its frames is backpropagated and the state is detached, so gradients flow
within a chunk only while the forward pass sees the whole window; the gradients of the
chunks add up and the optimizer steps once per window. Activations of one chunk at a time
are kept, so the memory of a step is that of a ``K``-frame window, whatever ``data.window``.

Each chunk's loss is its share of the window's loss
(:meth:`~clstm4d.engine.training.losses.SequenceLoss.forward` with ``totals``), so with
nothing detached the summed gradients equal one pass over the whole window
(``tests/test_tbptt.py`` checks it in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from clstm4d.errors import ConfigError

__all__ = ["check_tbptt", "chunked_backward", "detach_state"]


def check_tbptt(model: Any, chunk: int | None) -> None:
    """Raise a one-line :class:`ConfigError` when ``train.tbptt`` is set for a model whose
    state cannot be carried from chunk to chunk."""
    if chunk is None or getattr(model, "streamable", False):
        return
    config = getattr(model, "config", {}) or {}
    name = config.get("name", type(model).__name__)
    why = ("it is bidirectional" if config.get("bidirectional")
           else "it takes a fixed window of frames at once")
    raise ConfigError(f"'train.tbptt' carries the state from chunk to chunk and needs a "
                      f"streamable (causal, unidirectional) model; model '{name}' is not "
                      f"({why}): leave train.tbptt unset")


def detach_state(state: Any) -> Any:
    """The same nested state (tensors in tuples, lists, dicts) cut from the graph."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    return state


def chunked_backward(net, loss_fn, image: torch.Tensor, label: torch.Tensor, lengths=None,
                     labelled=None, *, chunk: int, detach: bool = True,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                     forward: Callable | None = None,
                     extra: Callable | None = None) -> torch.Tensor:
    """Run ``image`` through ``net`` in chunks of ``chunk`` frames with the state carried,
    and backpropagate the window's loss chunk by chunk; returns the window's loss (detached).

    Args:
        net: a streamable model (``net(x, state=..., return_state=True)``).
        loss_fn: a :class:`~clstm4d.engine.training.losses.SequenceLoss`.
        image, label, lengths, labelled: the window, as the loss takes them.
        chunk: frames per chunk.
        detach: cut the state from the graph between chunks (truncated backpropagation);
            ``False`` keeps the graph of the whole window and backpropagates once at the
            end (the same gradients as one pass; for tests).
        backward: called with each loss to backpropagate (e.g. through a gradient scaler).
        forward: wraps the model call, ``forward(fn) -> fn()`` (e.g. under autocast).
        extra: ``extra(logits, label, lengths, labelled) -> loss`` added to each chunk's loss,
            weighted by the chunk's share of the frames (the pseudo-label term).

    Shape:
        image ``(n, t, c, *s)``, label ``(n, t, *s)``, lengths ``(n,)``, labelled ``(n, t)``.
    """
    n, t = label.shape[:2]
    totals = loss_fn.totals(label, lengths, labelled)
    state, total, pending = None, image.new_zeros((), dtype=torch.float32), []
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        part = slice(start, stop)
        lens = (None if lengths is None
                else (torch.as_tensor(lengths) - start).clamp(0, stop - start))
        lab = None if labelled is None else labelled[:, part]

        def run(x=image[:, part], s=state):
            return net(x, state=s, return_state=True)

        logits, state = forward(run) if forward is not None else run()  # (n, t_c, k, *s)
        loss = loss_fn(logits, label[:, part], lens, lab, totals=totals)
        if extra is not None:
            loss = loss + extra(logits, label[:, part], lens, lab) * ((stop - start) / t)
        total = total + loss.detach().float()
        if detach:
            backward(loss)
            state = detach_state(state)
        else:
            pending.append(loss)
    if pending:
        backward(torch.stack(pending).sum())
    return total
