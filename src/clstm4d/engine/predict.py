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
    ...     streamable = True
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
    ...     streamable = False
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

from .runtime import autocast

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

    Returns:
        Labels ``(t, *s)`` as ``uint8`` (``int64`` beyond 255 classes), and the probabilities
        when ``return_probs``.
    """
    from monai.inferers import sliding_window_inference

    image = torch.as_tensor(image)
    if image.dim() < 3:
        raise ValueError(
            f"image must be (t, c, *s) with 1-3 spatial axes, got {tuple(image.shape)}"
        )
    t, c = image.shape[:2]
    spatial = tuple(image.shape[2:])
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    streamable = bool(getattr(model, "streamable", False))
    frames = (getattr(model, "config", None) or {}).get("frames")
    if time_margin is not None and (isinstance(time_margin, bool) or int(time_margin) < 0):
        raise ValueError(f"time_margin must be None or an int >= 0, got {time_margin!r}")
    margin = 0
    if frames is not None and not streamable:
        chunk = int(frames)
    elif not streamable:  # bidirectional: the whole sequence, or chunks with context
        if time_margin is None:
            chunk = None
        else:
            margin = int(time_margin)
    if chunk is None or chunk <= 0:
        chunk = t
    if roi is not None:
        roi = [int(roi)] * len(spatial) if isinstance(roi, int) else [int(r) for r in roi]
        if len(roi) != len(spatial):
            raise ValueError(
                f"roi needs one size per spatial axis ({len(spatial)}), got {roi}"
            )
        if all(r >= s for r, s in zip(roi, spatial, strict=True)):
            roi = None  # one window covers everything: no need to slide
    model.eval()
    labels = None
    probs_all = None
    states: dict[Any, Any] = {}

    def run(x: torch.Tensor, key: Any) -> torch.Tensor:
        # x: (n, tc, c, *roi) -> probabilities (n, tc, k, *roi) in float32
        with autocast(device, amp_dtype):
            if streamable:
                logits, states[key] = model(x, state=states.get(key), return_state=True)
            else:
                logits = model(x)
        return torch.softmax(logits.float(), dim=2)

    for t0 in range(0, t, chunk):
        lo = max(0, t0 - margin)  # context before the chunk (bidirectional models)
        x = image[lo:t0 + chunk + margin]  # (context + tc + context, c, *s)
        tc = min(chunk, t - t0)
        if frames is not None and not streamable and x.shape[0] < chunk:
            # time-as-channels needs its full window: repeat the last frame
            x = torch.cat([x, x[-1:].expand(chunk - x.shape[0], *x.shape[1:])], 0)
        if roi is None:
            p = run(x.unsqueeze(0).to(device), "whole")[0]  # (tc, k, *s)
        else:
            n_t = x.shape[0]
            folded = x.flatten(0, 1).unsqueeze(0)  # (1, tc*c, *s): time folded into channels

            def predictor(win, coords, n_t=n_t):
                w = win.unflatten(1, (n_t, c)).to(device)  # (nw, tc, c, *roi)
                return run(w, _window_key(coords)).flatten(1, 2)  # (nw, tc*k, *roi)

            p = sliding_window_inference(
                folded, roi, sw_batch_size, predictor, overlap=overlap, mode=mode,
                with_coord=True, sw_device=device, device=image.device,
            )
            p = torch.as_tensor(p)[0].unflatten(0, (n_t, -1))  # (tc, k, *s)
        p = p[t0 - lo: t0 - lo + tc].to(image.device)  # the chunk's own frames
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
    return (labels, probs_all) if return_probs else labels
