"""Memory attention (models/memattn.py, ``cell="attention"``) beyond the shared battery:
an independent reference of its equations, gradients, causality, the memory outliving the
bank, streaming with chunks smaller than the bank, the bank bounded, autocast, a checkpoint
round trip, and one-line errors for options that cannot work."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from clstm4d import create_model
from clstm4d.engine.run.checkpoint import Checkpoint, save_checkpoint
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
from clstm4d.errors import ConfigError
from clstm4d.models.memattn import ROPE_BASE, MemoryAttention


def block(spatial_dims=2, channels=8, bank=3, pool=1, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MemoryAttention(spatial_dims, channels, bank, pool).to(dtype)


def seq(n, t, c, *size, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, c, *size, generator=g, dtype=dtype)


def _rope_complex(x, coords, r):
    """Axial rotary encoding of ``x`` ``(n, e, tokens, d)`` written with complex numbers:
    channel pairs (2i, 2i+1) of the ``r`` channels of axis ``a`` are turned by
    ``coords[a] * ROPE_BASE**(-2i/r)``."""
    out = x.clone()
    for a, coord in enumerate(coords):  # coord: (tokens,)
        part = x[..., a * r:(a + 1) * r]
        z = torch.view_as_complex(part.reshape(*part.shape[:-1], r // 2, 2).contiguous())
        freqs = ROPE_BASE ** (-torch.arange(0, r, 2, dtype=x.dtype) / r)
        turn = torch.polar(torch.ones_like(freqs), coord[:, None].to(x.dtype) * freqs)
        out[..., a * r:(a + 1) * r] = torch.view_as_real(z * turn).flatten(-2)  # (n, e, tokens, r)
    return out


def reference(m: MemoryAttention, x):
    """The module docstring's equations, one frame and one token at a time in spirit:
    explicit softmax, a Python list as the bank, pooling by reshaping, complex rotations."""
    n, t, c, *size = x.shape
    e, d = m.heads, c // m.heads
    pooled = [s // k for s, k in zip(size, m.pool, strict=True)]

    def grid_coords(shape, step):
        axes = [(torch.arange(s, dtype=torch.float64) + 0.5) * k - 0.5
                for s, k in zip(shape, step, strict=True)]
        return [g.flatten() for g in torch.meshgrid(*axes, indexing="ij")]

    def pool(u):  # (n, c, *s) -> (n, p, c)
        for ax, k in enumerate(m.pool):
            u = u.unflatten(2 + ax, (u.shape[2 + ax] // k, k)).mean(3 + ax)
        return u.flatten(2).transpose(1, 2)

    def heads(z):  # (n, tokens, c) -> (n, e, tokens, d)
        return z.unflatten(-1, (e, d)).transpose(1, 2)

    def keys(u_grid, norm, weight):
        k, v = (pool(norm(u_grid.movedim(1, -1)).movedim(-1, 1)) @ weight.T).chunk(2, -1)
        return _rope_complex(heads(k), grid_coords(pooled, m.pool), m.rotary), heads(v)

    ln = lambda z: F.layer_norm(z, (c,), m.norm.weight, m.norm.bias)  # noqa: E731
    ln_mem = lambda z: F.layer_norm(z, (c,), m.memory_norm.weight, m.memory_norm.bias)  # noqa
    bank, ys = [], []
    for j in range(t):
        tok = x[:, j].flatten(2).transpose(1, 2)  # (n, q, c)
        q = _rope_complex(heads(ln(tok) @ m.q.weight.T), grid_coords(size, [1] * len(size)),
                          m.rotary)
        own = keys(x[:, j], ln, m.kv.weight)
        frames = bank[-m.bank:] + [own]
        ago = range(len(frames) - 1, -1, -1)
        ks = torch.cat([k + m.time_k[a].reshape(e, 1, d) for (k, _), a in
                        zip(frames, ago, strict=True)], 2)
        vs = torch.cat([v + m.time_v[a].reshape(e, 1, d) for (_, v), a in
                        zip(frames, ago, strict=True)], 2)
        w = torch.softmax(q @ ks.transpose(-1, -2) / math.sqrt(d), -1)
        h = tok + (w @ vs).transpose(1, 2).flatten(-2) @ m.out.weight.T + m.out.bias
        y = h + m.mlp(h)
        ys.append(y.transpose(1, 2).reshape(n, c, *size))
        bank.append(keys(ys[-1], ln_mem, m.memory.weight))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("spatial_dims,size,pool,channels", [
    (1, (8,), (2,), 8), (2, (6, 4), (2, 2), 8), (2, (3, 5), (1, 1), 64),  # 64: two heads
    (3, (4, 2, 4), (2, 1, 2), 12)])
def test_equals_an_independent_reference(spatial_dims, size, pool, channels):
    m = block(spatial_dims, channels, bank=2, pool=pool, dtype=torch.float64)
    with torch.no_grad():
        for p in (m.time_k, m.time_v):
            p.normal_()  # make the time encoding matter
    x = seq(2, 6, channels, *size, dtype=torch.float64)
    y, _ = m(x)
    torch.testing.assert_close(y, reference(m, x), rtol=1e-10, atol=1e-10)


def test_gradcheck_float64_with_a_carried_bank():
    m = block(2, 4, bank=2, pool=(1, 2), dtype=torch.float64)
    x = seq(1, 3, 4, 2, 2, dtype=torch.float64).requires_grad_()
    with torch.no_grad():
        _, (k, v) = m(seq(1, 2, 4, 2, 2, seed=5, dtype=torch.float64))
    k, v = k.requires_grad_(), v.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: m(a, (b, c))[0], (x, k, v),
                                    fast_mode=True)


def test_causal_and_the_memory_outlives_the_bank():
    m = block(2, 8, bank=2)
    x = seq(2, 9, 8, 4, 5)
    later = x.clone()
    later[:, 4:] = torch.randn_like(later[:, 4:]) * 3
    with torch.no_grad():
        y, y_later = m(x)[0], m(later)[0]
        torch.testing.assert_close(y[:, :4], y_later[:, :4], rtol=0, atol=0)
        assert not torch.allclose(y[:, 4:], y_later[:, 4:])
        # frame 0 still changes frame 8, 4 bank lengths later: the bank holds outputs
        first = x.clone()
        first[:, 0] = -first[:, 0]
        assert (m(first)[0][:, 8] - y[:, 8]).abs().max() > 1e-6


@pytest.mark.parametrize("chunks", [(1,) * 11, (2, 1, 3, 5), (6, 5)])
def test_streaming_in_chunks_smaller_and_larger_than_the_bank_equals_one_pass(chunks):
    m = block(2, 8, bank=4, pool=2)
    x = seq(2, 11, 8, 4, 6)
    with torch.no_grad():
        whole, final = m(x)
        outs, state, start = [], None, 0
        for size in chunks:
            y, state = m(x[:, start:start + size], state)
            outs.append(y)
            start += size
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(state, final, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unet_streams_frame_by_frame_with_pooled_memory_at_skips():
    torch.manual_seed(0)
    net = create_model("unet", spatial_dims=2, in_channels=2, out_channels=3, channels=(4, 8),
                       temporal="skips", cell="attention", bank=2).eval()
    x = seq(1, 7, 2, 9, 6)
    with torch.no_grad():
        whole = net(x)
        outs, state = [], None
        for f in range(7):
            y, state = net(x[:, f:f + 1], state=state, return_state=True)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)


def test_the_bank_stays_bounded_over_a_long_sequence():
    net = create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8),
                       cell="attention", bank=3).eval()
    sizes = []
    state = None
    with torch.no_grad():
        for _ in range(12):  # 36 frames, 3 at a time
            _, state = net(torch.randn(1, 3, 1, 8, 8), state=state, return_state=True)
            sizes.append(sum(s.untyped_storage().nbytes() for s in tree_leaves(state)))
            assert all(s.shape[1] == 3 for s in tree_leaves(state))  # frames in the bank
    assert len(set(sizes)) == 1


def test_bf16_autocast_runs_streams_and_stays_close_to_float32():
    torch.manual_seed(0)
    net = create_model("unet", spatial_dims=2, in_channels=2, out_channels=3, channels=(4, 8),
                       cell="attention", bank=2)
    x = seq(2, 5, 2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = net(x)
        a, state = net(x[:, :2], return_state=True)
        b, _ = net(x[:, 2:], state=state, return_state=True)
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=0, atol=0)
    torch.testing.assert_close(whole.float(), net(x), rtol=0.1, atol=0.1)


def test_checkpoint_round_trip_rebuilds_the_same_function(tmp_path):
    torch.manual_seed(0)
    net = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3,
                       temporal="skips", cell="attention", bank=5).eval()
    assert net.config["cell"] == "attention" and net.config["bank"] == 5
    run = SavedRun(Config.from_dict({}), ModelSpec.of(net), {0: "bg", 1: "a", 2: "b"})
    ck = save_checkpoint(tmp_path / "ck", net, step=1, config=run.to_dict())
    again = Checkpoint.open(ck).build_model()
    assert again.config == net.config
    x = seq(1, 4, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("options,match", [
    ({"cell": "attention", "bidirectional": True}, "bidirectional=True is not available"),
    ({"cell": "attention", "temporal": "none"}, "cell='attention' needs a place"),
    ({"cell": "attention", "bank": 0}, "bank must be an int >= 1"),
    ({"cell": "attention", "bank": 2.5}, "bank must be an int >= 1"),
    ({"cell": "gru", "bank": 4}, "bank=4 is an option of cell='attention' only"),
    ({"cell": "transformer"}, "cell must be one of"),
])
def test_options_that_cannot_work_raise_one_line(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        ModelSpec("tiny", 2, 1, 2, options).build()
    assert "\n" not in str(err.value)


def test_a_state_from_another_size_is_refused():
    m = block(2, 8, bank=2)
    _, state = m(seq(1, 3, 8, 4, 4))
    with pytest.raises(ValueError, match=r"state must be the \(keys, values\) bank"):
        m(seq(1, 2, 8, 4, 6), state)
