"""TimeResolvedUNet beyond the shared battery (test_models_battery.py): causality, the memory
being used, recomputation, frame independence, layouts, fusion, errors."""

import pytest
import torch

from clstm4d import TimeResolvedUNet
from clstm4d.models import blocks

# (spatial_dims, odd spatial size) pairs; 3 levels -> padding to a multiple of 4 is exercised
SIZES = [(2, (13, 10)), (3, (5, 7, 6))]


def make(spatial_dims=2, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("channels", (4, 6, 8))
    return TimeResolvedUNet(spatial_dims, kw.pop("in_channels", 2), kw.pop("out_channels", 3),
                            **kw)


def seq(spatial_dims, size, t=4, n=2, c=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, c, *size, generator=g)


def test_one_level_and_1d():
    net = make(1, channels=(5,), temporal="skips")
    assert net(seq(1, (7,), t=2)).shape == (2, 2, 3, 7)


@pytest.mark.parametrize("temporal,cell,fusion", [("bottleneck", "lstm", "replace"),
                                                  ("skips", "gru", "replace"),
                                                  ("skips", "lstm", "gated")])
def test_causal_output_at_t_ignores_later_frames(temporal, cell, fusion):
    net = make(2, temporal=temporal, cell=cell, fusion=fusion)
    x = seq(2, (9, 10), t=5)
    x2 = x.clone()
    x2[:, 3:] = torch.randn_like(x2[:, 3:]) * 3
    y, y2 = net(x), net(x2)
    torch.testing.assert_close(y[:, :3], y2[:, :3], rtol=0, atol=0)
    assert not torch.allclose(y[:, 3:], y2[:, 3:])  # later frames do change
    # ... and the memory is used: an earlier frame changes a later output
    x3 = x.clone()
    x3[:, 0] = -x3[:, 0]
    assert not torch.allclose(net(x3)[:, 4], y[:, 4])


def test_bidirectional_sees_the_future_and_refuses_streaming():
    net = make(2, bidirectional=True)
    assert not net.streamable
    x = seq(2, (8, 8), t=4)
    x2 = x.clone()
    x2[:, 3] += 1
    assert not torch.allclose(net(x)[:, 0], net(x2)[:, 0])
    with pytest.raises(ValueError, match="streamable"):
        net(x, return_state=True)


@pytest.mark.parametrize("temporal,cell,dropout,chunk", [
    ("bottleneck", "lstm", 0.0, False),
    ("bottleneck", "lstm", 0.0, True),  # large stages recomputed in pieces of the n*t axis
    ("skips", "gru", 0.3, True),  # dropout: never in pieces (masks must replay exactly)
    ("skips", "attention", 0.0, False),  # memory attention recomputed as a whole
])
def test_recompute_gives_the_same_gradients(temporal, cell, dropout, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(blocks, "CHUNK_ELEMENTS", 200)
    plain = make(3, temporal=temporal, cell=cell, dropout=dropout)
    ckpt = make(3, temporal=temporal, cell=cell, dropout=dropout, recompute=True)
    ckpt.load_state_dict(plain.state_dict())
    x = seq(3, (6, 5, 7), t=3)
    grads = []
    for net in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks; recomputation must replay them
        xi = x.clone().requires_grad_()
        net(xi).square().mean().backward()
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    for g_plain, g_ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-6)


def test_temporal_none_has_no_cross_frame_dependence():
    net = make(3, temporal="none")
    x = seq(3, (4, 6, 5), t=5)
    perm = torch.tensor([3, 0, 4, 2, 1])
    torch.testing.assert_close(net(x[:, perm]), net(x)[:, perm], rtol=1e-5, atol=1e-6)
    # every frame alone gives what it gives inside the sequence
    alone = torch.cat([net(x[:, i:i + 1]) for i in range(5)], 1)
    torch.testing.assert_close(alone, net(x), rtol=1e-5, atol=1e-6)


def test_deterministic_with_a_fixed_seed():
    x = seq(2, (9, 9), t=3)
    a, b = make(2, seed=7, temporal="skips"), make(2, seed=7, temporal="skips")
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    c = make(2, seed=8, temporal="skips")
    assert not torch.allclose(a(x), c(x))


def test_odd_size_equals_zero_padded_input_cropped():
    """Any size: the input is zero-padded at the end of each axis to a multiple of the total
    stride (4 here) and the logits cropped back, identically to doing it by hand."""
    net = make(2, temporal="bottleneck")
    x = seq(2, (13, 10), t=3)
    by_hand = net(torch.nn.functional.pad(x, (0, 2, 0, 3)))[..., :13, :10]
    torch.testing.assert_close(net(x), by_hand, rtol=1e-5, atol=1e-6)


def test_bad_input_raises_clear_errors():
    net = make(2)
    with pytest.raises(ValueError, match=r"expected input of 5 dims \(N, T, C, H, W\).*unsqueeze"):
        net(torch.randn(2, 2, 8, 8))
    with pytest.raises(ValueError, match="expected 2 input channels.*got 3"):
        net(torch.randn(1, 2, 3, 8, 8))
    with pytest.raises(ValueError, match="state must be the tuple of 1"):
        net(torch.randn(1, 2, 2, 8, 8), state=(None, None))


@pytest.mark.parametrize("kw,match", [
    ({"spatial_dims": 4}, "spatial_dims must be 1, 2 or 3, got 4"),
    ({"in_channels": 0}, "in_channels must be an int >= 1, got 0"),
    ({"channels": ()}, "channels must be a non-empty sequence"),
    ({"channels": (4, -1)}, r"channels\[i\] must be an int >= 1, got -1"),
    ({"temporal": "encoder"}, "temporal must be one of"),
    ({"cell": "rnn"}, "cell must be one of"),
    ({"norm": "layer"}, "norm must be one of"),
    ({"act": "tanh"}, "act must be one of"),
    ({"dropout": 1.5}, r"dropout must be a float in \[0, 1\), got 1.5"),
    ({"fusion": "add"}, "fusion must be one of"),
])
def test_bad_constructor_values_name_the_argument(kw, match):
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, **kw}
    with pytest.raises(ValueError, match=match):
        TimeResolvedUNet(**args)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gated_fusion_open_is_replace_and_closed_is_per_frame(bidirectional):
    """With the gate's weights at 0, a large positive bias passes the recurrence's output
    (the "replace" model with the same weights), a large negative one the level's own
    features (the "none" model with the same encoder and decoder)."""
    gated = make(2, temporal="skips", fusion="gated", bidirectional=bidirectional)
    replace = make(2, temporal="skips", bidirectional=bidirectional, seed=5)
    none = make(2, temporal="none", seed=6)
    missing = replace.load_state_dict(gated.state_dict(), strict=False).missing_keys
    assert missing == []  # every parameter of "replace" exists in "gated"
    none.load_state_dict({k: v for k, v in gated.state_dict().items()
                          if not k.startswith("recurrence.")})
    x = seq(2, (9, 12), t=4)
    gates = [m.gate for m in gated.recurrence.values()]
    assert len(gates) == 3
    with torch.no_grad():
        for g in gates:
            g.weight.zero_()
            g.bias.fill_(40.0)
        torch.testing.assert_close(gated(x), replace(x), rtol=1e-6, atol=1e-6)
        for g in gates:
            g.bias.fill_(-40.0)
        torch.testing.assert_close(gated(x), none(x), rtol=1e-6, atol=1e-6)
    assert gated.config["fusion"] == "gated" and replace.config["fusion"] == "replace"


@pytest.mark.parametrize("norm,act", [("batch", "relu"), ("group", "gelu"), ("none", "silu")])
def test_norm_and_act_choices(norm, act):
    net = make(2, norm=norm, act=act)
    assert net(seq(2, (8, 8), t=2)).shape == (2, 2, 3, 8, 8)


def test_bf16_autocast_runs_keeps_the_recurrent_state_in_float32_and_streams():
    net = make(2, temporal="skips")
    x = seq(2, (9, 8), t=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = net(x[:, :2], return_state=True)
        y2, state2 = net(x[:, 2:], state=state, return_state=True)
    assert y.shape == (2, 2, 3, 9, 8) and torch.isfinite(y).all()
    assert all(s.dtype == torch.float32 for s in torch.utils._pytree.tree_leaves(state2))
    # close to float32 (bf16 convolutions, recurrent ones included; float32 state)
    torch.testing.assert_close(torch.cat([y, y2], 1).float(), net(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("spatial_dims,size", SIZES)
def test_channels_last_layout_computes_the_same_function(spatial_dims, size, monkeypatch):
    """Wide models run their per-frame stages channels-last; the result must not change."""
    from clstm4d.models import unet

    default = make(spatial_dims, temporal="skips", recompute=True)
    monkeypatch.setattr(unet, "CHANNELS_LAST_MIN_WIDTH", 1)
    cl = make(spatial_dims, temporal="skips", recompute=True)
    assert cl._layout != default._layout
    cl.load_state_dict(default.state_dict())
    x = seq(spatial_dims, size, t=3)
    outs, grads = [], []
    for net in (default, cl):
        y = net(x)
        y.square().mean().backward()
        outs.append(y)
        grads.append([p.grad for p in net.parameters()])
    assert outs[1].is_contiguous()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
