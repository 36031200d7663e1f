"""The contract every sequence model here keeps, and that the engine relies on.

Shape legend: ``n`` batch, ``t`` frames, ``c`` channels, ``k`` classes, ``*s`` spatial axes.

A :class:`SequenceModel` maps ``(n, t, c, *s)`` to logits ``(n, t, k, *s)`` for every frame and
says, as attributes, what the engine needs to know to train and run it:

- ``config``: the keyword arguments (with the preset's ``name``) that rebuild it through
  :func:`~clstm4d.models.create_model`; saved with every checkpoint;
- ``streamable``: True when running a sequence in chunks with the state carried
  (``forward(x, state, return_state=True)``) equals one pass over the whole sequence;
- ``frames``: the fixed number of frames the model takes at once (a time-as-channels
  window), or None when it takes any number of frames.

The engine asks "is this a fixed-window model?" as ``model.frames is not None`` and "can the
state be carried?" as ``model.streamable``, nothing else.

Examples:
    >>> from clstm4d.models import create_model
    >>> net = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=2)
    >>> isinstance(net, SequenceModel), net.streamable, net.frames
    (True, True, None)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["SequenceModel"]


@runtime_checkable
class SequenceModel(Protocol):
    """A model over sequences (see the module docstring)."""

    config: dict[str, Any]
    streamable: bool
    frames: int | None

    def forward(self, x: Any, state: Any = None, return_state: bool = False) -> Any:
        """``(n, t, c, *s)`` -> logits ``(n, t, k, *s)``; with ``return_state`` also the state
        to pass back for the next frames (streamable models)."""
        ...
