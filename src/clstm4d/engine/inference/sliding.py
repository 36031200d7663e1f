"""Inference on whole sequences of any size and length.

Shape legend: ``t`` frames, ``c`` input channels, ``k`` classes, ``*s`` spatial axes.

Space is covered by sliding windows (MONAI's ``sliding_window_inference``, overlapping
windows blended with Gaussian weights); time is processed in chunks of frames. For a
streamable (unidirectional) model the recurrent state of every window is carried from one
chunk to the next, so the result equals one pass over the whole sequence while memory is set
by the window and chunk sizes, not by the number of frames. A bidirectional model (offline
analysis: every frame depends on past and future frames) runs over the whole sequence in one
pass by default, the exact result, with memory growing with the number of frames; with
``time_margin=m`` it runs chunks of ``chunk`` frames, each seen with up to ``m`` frames of
context before and after it (chunks that overlap by ``2 m`` frames; only the middle ``chunk``
frames of each are kept), so every frame sees at least ``m`` frames both ways (fewer only at
the ends of the sequence) while memory is bounded by ``chunk + 2 m`` frames. A
time-as-channels model always gets chunks of its fixed window (``frames``), the last one
padded by repeating its final frame.

Examples:
    >>> import torch
    >>> class Running(torch.nn.Module):  # a toy streamable model: running mean over time
    ...     streamable, frames = True, None
    ...     def forward(self, x, state=None, return_state=False):
    ...         s = torch.zeros_like(x[:, 0]) if state is None else state[0]
    ...         n0 = 0 if state is None else state[1]
    ...         outs = []
    ...         for i in range(x.shape[1]):
    ...             s = s + x[:, i]
    ...             outs.append(torch.cat([-s, s], 1) / (n0 + i + 1))
    ...         y = torch.stack(outs, 1)
    ...         return (y, (s, n0 + x.shape[1])) if return_state else y
    >>> x = torch.randn(7, 1, 12, 10)
    >>> full = predict_sequence(Running(), x, chunk=7, roi=None, return_probs=True)[1]
    >>> chunked = predict_sequence(Running(), x, chunk=3, roi=[8, 8], return_probs=True)[1]
    >>> bool(torch.allclose(full, chunked, atol=1e-5))
    True
    >>> class Total(torch.nn.Module):  # a toy bidirectional model: every frame sees them all
    ...     streamable, frames = False, None
    ...     def forward(self, x):
    ...         s = x.sum(1, keepdim=True).expand_as(x)
    ...         return torch.cat([-s, s], 2)
    >>> x = torch.randn(9, 1, 6, 6)
    >>> whole = predict_sequence(Total(), x, chunk=4)                    # default: one pass
    >>> bool((whole == (x.sum(0)[0] > 0).to(torch.uint8)).all())
    True
    >>> wide = predict_sequence(Total(), x, chunk=4, time_margin=9)      # margins span all
    >>> bool((wide == whole).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from clstm4d._common import per_axis
from clstm4d.engine.run.runtime import autocast
from clstm4d.errors import ConfigError

__all__ = ["predict_sequence"]


def _window_key(coords) -> tuple:
    # coords: one list of slices per window in the batch: [batch, channel, *spatial]
    return tuple(tuple((s.start, s.stop) for s in w[2:]) for w in coords)


@torch.no_grad()
def predict_sequence(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    roi: Sequence[int] | int | None = None,
    overlap: float = 0.25,
    chunk: int | None = 16,
    time_margin: int | None = None,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    return_probs: bool = False,
    chunk_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Segment every frame of one sequence.

    Args:
        model: maps ``(n, t, c, *s)`` to logits ``(n, t, k, *s)``; when ``model.streamable``
            is true it must accept ``state=`` and ``return_state=True``.
        image: ``(t, c, *s)`` (a numpy array is accepted too).
        roi: spatial window size (one int for all axes); ``None`` runs every frame whole.
            Axes where the window is larger than the image are padded by MONAI.
        overlap: fraction of overlap between neighbouring windows.
        chunk: frames per chunk (``None``: all frames at once). A bidirectional model ignores
            it unless ``time_margin`` is set.
        time_margin: bidirectional models only: ``None`` (default) runs the whole sequence in
            one pass; an int ``m >= 0`` runs chunks of ``chunk`` frames, each with up to ``m``
            frames of context on both sides (``chunk + 2 m`` frames in memory at once).
        sw_batch_size: windows run together (they share a chunk; states stay per window).
        mode: blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        device: where the model runs (default: where its parameters are); the result is
            accumulated on the image's device.
        amp_dtype: autocast dtype, or None for full precision.
        return_probs: also return the class probabilities ``(t, k, *s)`` (float32).
        chunk_probs: maps each time chunk's probabilities ``(tc, k, *s)`` to ``(tc, k,
            *out)`` before its labels are taken (the Predictor resamples them back to the
            input's grid here), so that only one chunk is held at the model's grid; labels
            and probabilities are then ``(t, *out)`` and ``(t, k, *out)``.
        progress: called with the number of frames after each time chunk is done.

    Returns:
        Labels ``(t, *s)`` as ``uint8`` (``int64`` beyond 255 classes), and the probabilities
        when ``return_probs``.
    """
    image = torch.as_tensor(image)
    if image.dim() < 3:
        raise ValueError(
            f"image must be (t, c, *s) with 1-3 spatial axes, got {tuple(image.shape)}"
        )
    t = image.shape[0]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunk, margin = _time_chunks(model, t, chunk, time_margin)
    roi = _window(roi, tuple(image.shape[2:]))
    model.eval()
    run = _Runner(model, torch.device(device), amp_dtype, roi, overlap, sw_batch_size, mode)
    labels = probs_all = None
    for t0 in range(0, t, chunk):
        tc = min(chunk, t - t0)
        p = run.chunk(image, t0, chunk, margin)[:tc].to(image.device)  # the chunk's own frames
        if chunk_probs is not None:
            p = chunk_probs(p)  # (tc, k, *out)
        if labels is None:
            k, out = p.shape[1], tuple(p.shape[2:])
            labels = torch.empty((t, *out), dtype=torch.uint8 if k <= 256 else torch.int64)
            if return_probs:
                probs_all = torch.empty((t, k, *out), dtype=torch.float32)
        labels[t0:t0 + tc] = p.argmax(1).to(labels.dtype)
        if return_probs:
            probs_all[t0:t0 + tc] = p
        if progress is not None:
            progress(tc)
    return (labels, probs_all) if return_probs else labels


def _time_chunks(model: torch.nn.Module, t: int, chunk: int | None,
                 time_margin: int | None) -> tuple[int, int]:
    """Frames per chunk and frames of context on each side, for a sequence of ``t`` frames:
    a fixed-window model gets its window; a bidirectional one the whole sequence, or chunks
    with ``time_margin`` frames of context; a streamable one chunks of ``chunk``."""
    if time_margin is not None and (isinstance(time_margin, bool) or int(time_margin) < 0):
        raise ConfigError(f"time_margin must be None or an int >= 0, got {time_margin!r}")
    margin = 0
    if model.frames is not None:
        chunk = int(model.frames)
    elif not model.streamable:  # bidirectional: the whole sequence, or chunks with context
        if time_margin is None:
            chunk = None
        else:
            margin = int(time_margin)
    return (t if chunk is None or chunk <= 0 else int(chunk)), margin


def _window(roi: Sequence[int] | int | None, spatial: tuple[int, ...]) -> list[int] | None:
    """The sliding window per spatial axis, or None when one window covers the image."""
    if roi is None:
        return None
    roi = list(per_axis("roi", roi, len(spatial), error=ConfigError))
    if all(r >= s for r, s in zip(roi, spatial, strict=True)):
        return None  # one window covers everything: no need to slide
    return roi


class _Runner:
    """Runs the model on the windows of one chunk of frames, carrying each window's state to
    the same window of the next chunk (streamable models)."""

    def __init__(self, model, device, amp_dtype, roi, overlap, sw_batch_size, mode):
        self.model, self.device, self.amp_dtype = model, device, amp_dtype
        self.roi, self.overlap, self.sw_batch_size, self.mode = roi, overlap, sw_batch_size, mode
        self.states: dict[Any, Any] = {}

    def probs(self, x: torch.Tensor, key: Any) -> torch.Tensor:
        # x: (n, tc, c, *roi) -> probabilities (n, tc, k, *roi) in float32
        with autocast(self.device, self.amp_dtype):
            if self.model.streamable:
                logits, self.states[key] = self.model(x, state=self.states.get(key),
                                                      return_state=True)
            else:
                logits = self.model(x)
        return torch.softmax(logits.float(), dim=2)

    def chunk(self, image: torch.Tensor, t0: int, chunk: int, margin: int) -> torch.Tensor:
        """Probabilities ``(frames from t0, k, *s)`` of the chunk starting at ``t0`` (its
        context frames before ``t0`` dropped)."""
        from monai.inferers import sliding_window_inference

        lo = max(0, t0 - margin)  # context before the chunk (bidirectional models)
        x = image[lo:t0 + chunk + margin]  # (context + tc + context, c, *s)
        if self.model.frames is not None and x.shape[0] < chunk:
            # a fixed window needs all its frames: repeat the last one
            x = torch.cat([x, x[-1:].expand(chunk - x.shape[0], *x.shape[1:])], 0)
        if self.roi is None:
            return self.probs(x.unsqueeze(0).to(self.device), "whole")[0][t0 - lo:]
        n_t, c = x.shape[:2]
        folded = x.flatten(0, 1).unsqueeze(0)  # (1, tc*c, *s): time folded into channels

        def predictor(win, coords):
            w = win.unflatten(1, (n_t, c)).to(self.device)  # (nw, tc, c, *roi)
            return self.probs(w, _window_key(coords)).flatten(1, 2)  # (nw, tc*k, *roi)

        p = sliding_window_inference(folded, self.roi, self.sw_batch_size, predictor,
                                     overlap=self.overlap, mode=self.mode, with_coord=True,
                                     sw_device=self.device, device=image.device)
        return torch.as_tensor(p)[0].unflatten(0, (n_t, -1))[t0 - lo:]  # (tc, k, *s)
