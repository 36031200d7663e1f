"""Truncated backpropagation through time (``train.tbptt``): the state carried across
consecutive chunks of a training window equals one pass when nothing is detached."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from clstm4d.engine.run.config import TrainConfig
from clstm4d.engine.training.loop import fit
from clstm4d.engine.training.losses import SequenceLoss
from clstm4d.engine.training.tbptt import check_tbptt, chunked_backward
from clstm4d.errors import ConfigError
from clstm4d.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from engine_toys import ToySequences  # noqa: E402


def _net(temporal="bottleneck", **kw):
    torch.manual_seed(0)
    return create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3,
                        channels=(4, 6), temporal=temporal, **kw).double()


def _window(t=7, ignore=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, t, 1, 12, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4 if ignore else 3, (2, t, 12, 12), generator=g)  # 3: ignore
    lengths = torch.tensor([t, t - 2])
    labelled = torch.rand(2, t, generator=g) < 0.7
    labelled[:, 0] = True
    return x, y, lengths, labelled


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


def _one_pass(net, loss_fn, x, y, lengths, labelled):
    net.zero_grad()
    loss = loss_fn(net(x), y, lengths, labelled)
    loss.backward()
    return loss.detach(), _grads(net)


@pytest.mark.parametrize(("temporal", "chunk"), [("bottleneck", 2), ("skips", 3),
                                                  ("bottleneck", 7), ("none", 4)])
def test_carried_state_without_detaching_equals_one_pass(temporal, chunk):
    """float64: consecutive chunks with the state carried and nothing detached give the
    loss and the gradients of one pass over the whole window (padding, sparse annotation and
    an ignore class included, chunks of unequal length)."""
    net, loss_fn = _net(temporal), SequenceLoss(ignore_index=3)
    x, y, lengths, labelled = _window()
    ref_loss, ref_grads = _one_pass(net, loss_fn, x, y, lengths, labelled)
    net.zero_grad()
    loss = chunked_backward(net, loss_fn, x, y, lengths, labelled, chunk=chunk, detach=False)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)  # float32 total
    for g, r in zip(_grads(net), ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_detaching_cuts_the_gradient_through_the_state_only():
    """With the state detached the forward (so the loss) is still the one pass, the
    gradients are not, and they equal the sum of each chunk's gradient with its incoming
    state held constant (an independent loop)."""
    net, loss_fn = _net(), SequenceLoss(ignore_index=3)
    x, y, lengths, labelled = _window(t=6)
    ref_loss, one_pass = _one_pass(net, loss_fn, x, y, lengths, labelled)
    net.zero_grad()
    loss = chunked_backward(net, loss_fn, x, y, lengths, labelled, chunk=3)
    got = _grads(net)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    assert any(not torch.allclose(g, r) for g, r in zip(got, one_pass, strict=True))
    # reference: chunk 2's loss with chunk 1's final state as a constant input
    totals = loss_fn.totals(y, lengths, labelled)
    net.zero_grad()
    with torch.no_grad():
        _, state = net(x[:, :3], return_state=True)
    first = loss_fn(net(x[:, :3]), y[:, :3], lengths.clamp(max=3), labelled[:, :3],
                    totals=totals)
    second = loss_fn(net(x[:, 3:], state=state), y[:, 3:], (lengths - 3).clamp(0, 3),
                     labelled[:, 3:], totals=totals)
    (first + second).backward()
    for g, r in zip(got, _grads(net), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_a_model_that_cannot_carry_its_state_is_refused_in_one_line(tmp_path):
    check_tbptt(_net(), 4)
    check_tbptt(_net(bidirectional=True), None)
    for net, why in ((_net(bidirectional=True), "bidirectional"),
                     (create_model("tac-tiny", spatial_dims=2), "fixed window")):
        with pytest.raises(ConfigError, match=f"'train.tbptt'.*streamable.*{why}") as e:
            fit(net.float(), ToySequences(), TrainConfig(out=str(tmp_path / "r"), steps=1,
                                                         tbptt=2, progress=False,
                                                         device="cpu"), batch_size=2)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()


def test_the_loop_trains_in_chunks(tmp_path):
    """``train.tbptt`` in the loop: the first step's loss is the whole window's (the same
    forward), later steps differ from whole-window training (other gradients)."""
    losses = {}
    for tbptt in (None, 2):
        torch.manual_seed(0)
        net = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=2,
                           channels=(4, 6))
        out = tmp_path / f"run_{tbptt}"
        fit(net, ToySequences(frames=6), TrainConfig(out=str(out), steps=3, lr=1e-2,
                                                     log_every=1, progress=False, device="cpu",
                                                     tbptt=tbptt), batch_size=2)
        losses[tbptt] = [json.loads(line)["loss"]
                         for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[2][0] == pytest.approx(losses[None][0], rel=1e-5)
    assert losses[2][2] != pytest.approx(losses[None][2], rel=1e-7)
