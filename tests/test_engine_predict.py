"""predict_sequence with the real models: chunks with carried state == one pass; models that
cannot stream get whole windows."""

from __future__ import annotations

import pytest
import torch

from clstm4d.engine.inference.sliding import predict_sequence
from clstm4d.models import create_model


def _model(name="tiny", **kw):
    torch.manual_seed(0)
    kw = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": (4, 8), **kw}
    return create_model(name, **kw).eval()


def test_chunks_with_state_equal_one_pass_for_every_temporal_mode():
    x = torch.randn(7, 1, 20, 18)
    for temporal in ("bottleneck", "skips", "none"):
        model = _model(temporal=temporal)
        _, one = predict_sequence(model, x, chunk=None, return_probs=True)
        _, chunked = predict_sequence(model, x, chunk=3, return_probs=True)
        torch.testing.assert_close(chunked, one, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            ref = torch.softmax(model(x.unsqueeze(0))[0], 1)
        torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-4)


def test_chunk_probs_maps_each_chunk_before_the_labels_are_taken():
    """chunk_probs (the Predictor's resampling back) sees one chunk at a time, and the
    result equals mapping the whole sequence's probabilities afterwards."""
    from clstm4d.data import resample_image

    model = _model(temporal="bottleneck")
    x = torch.randn(7, 1, 20, 18)
    _, whole = predict_sequence(model, x, chunk=None, return_probs=True)
    seen = []

    def up(p):
        seen.append(p.shape[0])
        return torch.from_numpy(resample_image(p.numpy(), (33, 29)))

    labels, probs = predict_sequence(model, x, chunk=3, return_probs=True, chunk_probs=up)
    assert seen == [3, 3, 1] and labels.shape == (7, 33, 29) and probs.shape == (7, 3, 33, 29)
    ref = torch.from_numpy(resample_image(whole.numpy(), (33, 29)))
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(labels, ref.argmax(1).to(labels.dtype), atol=0, rtol=0)
    only = predict_sequence(model, x, chunk=3, chunk_probs=up)
    torch.testing.assert_close(only, labels, atol=0, rtol=0)


def test_time_as_channels_gets_full_windows():
    model = _model("tac-tiny", frames=4)
    x = torch.randn(6, 1, 16, 16)
    labels, probs = predict_sequence(model, x, chunk=2, return_probs=True)
    assert labels.shape == (6, 16, 16) and probs.shape == (6, 3, 16, 16)
    with torch.no_grad():  # the first window is frames 0-3; the last is 4, 5 + 5 repeated
        first = torch.softmax(model(x[None, :4])[0], 1)
        last = torch.softmax(model(torch.cat([x[4:], x[5:].expand(2, -1, -1, -1)])[None])[0], 1)
    torch.testing.assert_close(probs[:4], first, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs[4:], last[:2], atol=1e-5, rtol=1e-4)


def test_sliding_windows_cover_every_voxel_and_keep_state_per_window():
    model = _model(temporal="bottleneck")
    x = torch.randn(5, 1, 40, 36)
    _, a = predict_sequence(model, x, roi=[16, 16], overlap=0.5, chunk=None, return_probs=True)
    _, b = predict_sequence(model, x, roi=[16, 16], overlap=0.5, chunk=2, return_probs=True)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)  # states carried per window
    torch.testing.assert_close(a.sum(1), torch.ones(5, 40, 36), atol=1e-4, rtol=0)


def test_bidirectional_uses_the_whole_sequence_by_default():
    """Offline prediction with a bidirectional model equals one pass of the model over all
    frames, whatever ``chunk`` says (was: each chunk on its own)."""
    x = torch.randn(7, 1, 13, 11)
    for temporal in ("bottleneck", "skips"):
        model = _model(temporal=temporal, bidirectional=True)
        with torch.no_grad():
            ref = torch.softmax(model(x.unsqueeze(0))[0], 1)
        for chunk in (None, 3):
            _, probs = predict_sequence(model, x, chunk=chunk, return_probs=True)
            torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)
    # also under sliding windows: each window sees all frames
    _, win = predict_sequence(model, x, roi=[8, 8], overlap=0.5, chunk=3, return_probs=True)
    _, win_ref = predict_sequence(model, x, roi=[8, 8], overlap=0.5, chunk=None,
                                  time_margin=7, return_probs=True)
    torch.testing.assert_close(win, win_ref, atol=1e-5, rtol=1e-4)


def test_bidirectional_chunks_with_a_time_margin():
    """With ``time_margin=m`` frame f of a chunk [t0, t0 + chunk) is the model's output on
    frames [t0 - m, t0 + chunk + m) (clipped to the sequence); a margin covering the whole
    sequence gives the one-pass result."""
    model = _model(temporal="bottleneck", bidirectional=True)
    x = torch.randn(10, 1, 12, 12)
    _, probs = predict_sequence(model, x, chunk=4, time_margin=2, return_probs=True)
    with torch.no_grad():
        for t0, lo, hi in ((0, 0, 6), (4, 2, 10), (8, 6, 10)):
            ref = torch.softmax(model(x[None, lo:hi])[0], 1)
            keep = ref[t0 - lo: t0 - lo + 4]
            torch.testing.assert_close(probs[t0:t0 + len(keep)], keep, atol=1e-5, rtol=1e-4)
        one = torch.softmax(model(x[None])[0], 1)
    assert not torch.allclose(probs, one, atol=1e-4)  # short context differs from the whole
    _, wide = predict_sequence(model, x, chunk=3, time_margin=10, return_probs=True)
    torch.testing.assert_close(wide, one, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="time_margin must be None or an int >= 0"):
        predict_sequence(model, x, time_margin=-1)
