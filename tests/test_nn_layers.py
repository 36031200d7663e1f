"""ConvLSTM/ConvGRU behaviour: shapes, lengths, gradients, recomputation, dtypes, devices."""

import pytest
import torch
import torch.nn.functional as F

from clstm4d import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell

DT = torch.float64
KINDS = {"lstm": ConvLSTM, "gru": ConvGRU}


def _h(state, kind):
    return state[0] if kind == "lstm" else state


def _states(state, kind):
    return tuple(state) if kind == "lstm" else (state,)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize(
    ("spatial", "kernel"),
    [((7,), 3), ((7,), 4), ((5, 3), (3, 2)), ((3, 5, 1), 2), ((3, 4, 5), (1, 3, 3))],
)
@pytest.mark.parametrize("t", [1, 3])
def test_shapes(kind, spatial, kernel, t):
    layer = KINDS[kind](len(spatial), 2, 3, kernel, num_layers=2, bidirectional=True)
    x = torch.randn(2, t, 2, *spatial)
    out, state = layer(x)
    assert out.shape == (2, t, 6, *spatial)
    for s in _states(state, kind):
        assert s.shape == (4, 2, 3, *spatial)
        assert s.dtype == x.dtype


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lengths_each_sample_equals_itself_alone(kind):
    torch.manual_seed(0)
    layer = KINDS[kind](2, 2, 3, 3, num_layers=2, bidirectional=True, dtype=DT)
    lengths = [4, 1, 3]
    x = torch.randn(3, 4, 2, 5, 3, dtype=DT)
    out, state = layer(x, lengths=torch.tensor(lengths))
    for i, n in enumerate(lengths):
        ref_out, ref_state = layer(x[i:i + 1, :n])
        torch.testing.assert_close(out[i:i + 1, :n], ref_out)
        assert out[i, n:].abs().max().item() == 0 if n < x.shape[1] else True
        for got, ref in zip(_states(state, kind), _states(ref_state, kind), strict=True):
            torch.testing.assert_close(got[:, i:i + 1], ref)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lengths_padding_values_do_not_matter(kind):
    torch.manual_seed(1)
    layer = KINDS[kind](1, 2, 3, 3, bidirectional=True, dtype=DT)
    x = torch.randn(2, 5, 2, 6, dtype=DT)
    y = x.clone()
    y[0, 3:] = 100.0
    lengths = torch.tensor([3, 5])
    a, sa = layer(x, lengths=lengths)
    b, sb = layer(y, lengths=lengths)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(_h(sa, kind), _h(sb, kind))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_full_lengths_equal_no_lengths(kind):
    layer = KINDS[kind](1, 2, 3, 3, num_layers=2, bidirectional=True, dtype=DT)
    x = torch.randn(2, 4, 2, 6, dtype=DT)
    a, sa = layer(x)
    b, sb = layer(x, lengths=[4, 4])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(_h(sa, kind), _h(sb, kind))


def _reference_peephole_cell(x, h, c, cell):
    """Independent ConvLSTM step with peepholes (Shi et al. 2015, channel-wise weights)."""
    pad = cell.kernel_size[0] // 2
    gates = (F.conv2d(x, cell.weight_ih, cell.bias_ih, padding=pad)
             + F.conv2d(h, cell.weight_hh, cell.bias_hh, padding=pad))
    gi, gf, gg, go = gates.chunk(4, 1)
    w_ci, w_cf, w_co = (w[None, :, None, None] for w in cell.weight_peephole.chunk(3))
    i = torch.sigmoid(gi + w_ci * c)
    f = torch.sigmoid(gf + w_cf * c)
    c_new = f * c + i * torch.tanh(gg)
    o = torch.sigmoid(go + w_co * c_new)
    return o * torch.tanh(c_new), c_new


def test_peephole_cell_matches_formula():
    torch.manual_seed(2)
    cell = ConvLSTMCell(2, 2, 3, 3, peephole=True, dtype=DT)
    with torch.no_grad():
        cell.weight_peephole.normal_()
    x, h, c = (torch.randn(2, ch, 4, 5, dtype=DT) for ch in (2, 3, 3))
    got = cell(x, (h, c))
    ref = _reference_peephole_cell(x, h, c, cell)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_concatenated_design_port():
    """The docstring's recipe ports weights from the cat(x, h) + one conv design (i, f, o, g)."""
    torch.manual_seed(3)
    c_in, hid = 2, 3
    weight = torch.randn(4 * hid, c_in + hid, 3, 3, dtype=DT)
    bias = torch.randn(4 * hid, dtype=DT)
    x = torch.randn(1, 4, c_in, 5, 5, dtype=DT)
    h = torch.zeros(1, hid, 5, 5, dtype=DT)
    c = torch.zeros_like(h)
    for t in range(x.shape[1]):
        gates = F.conv2d(torch.cat([x[:, t], h], 1), weight, bias, padding=1)
        i, f, o, g = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    layer = ConvLSTM(2, c_in, hid, 3, dtype=DT)
    reorder = lambda w: torch.cat([w.chunk(4)[k] for k in (0, 1, 3, 2)])  # noqa: E731
    with torch.no_grad():
        layer.weight_ih_l0.copy_(reorder(weight[:, :c_in]))
        layer.weight_hh_l0.copy_(reorder(weight[:, c_in:]))
        layer.bias_ih_l0.copy_(reorder(bias))
        layer.bias_hh_l0.zero_()
    _, (h_n, c_n) = layer(x)
    torch.testing.assert_close(h_n[0], h)
    torch.testing.assert_close(c_n[0], c)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradcheck(kind):
    torch.manual_seed(4)
    kwargs = {"peephole": True} if kind == "lstm" else {}
    layer = KINDS[kind](1, 1, 2, 2, num_layers=2, bidirectional=True, dtype=DT, **kwargs)
    x = torch.randn(2, 3, 1, 3, dtype=DT, requires_grad=True)
    h0 = torch.randn(4, 2, 2, 3, dtype=DT, requires_grad=True)
    state = (h0, torch.randn_like(h0).requires_grad_()) if kind == "lstm" else h0
    lengths = torch.tensor([3, 2])

    def fn(x, *s):
        out, s_n = layer(x, s if kind == "lstm" else s[0], lengths=lengths)
        return (out, *_states(s_n, kind))

    assert torch.autograd.gradcheck(fn, (x, *_states(state, kind)), fast_mode=True)
    params = tuple(layer.parameters())

    def fn_params(*p):
        out, _ = torch.func.functional_call(
            layer, dict(zip([n for n, _ in layer.named_parameters()], p, strict=True)), (x,))
        return out

    assert torch.autograd.gradcheck(fn_params, params, fast_mode=True)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize(
    ("kwargs", "with_state", "lengths"),
    [
        ({"kernel_size": 3}, False, None),
        ({"kernel_size": (2, 3), "dilation": (2, 1), "recompute": True}, True, [5, 2]),
        ({"kernel_size": 2, "num_layers": 2, "bidirectional": True}, True, [3, 5]),
        ({"kernel_size": 3, "bidirectional": True, "bias": False, "recompute": True}, False,
         [4, 5]),
        # large frames, small weights: the backward runs in segments of 2 + 3 frames
        ({"kernel_size": 3, "bidirectional": True, "spatial": (12, 13)}, True, [5, 3]),
        # batch 1, zero state: the first frame is left out of the recurrent weight gradient
        ({"kernel_size": 3, "bidirectional": True, "batch": 1}, False, None),
        # large weights, small frames: weight gradients computed in blocks of channels
        ({"kernel_size": (3, 4), "num_layers": 2, "spatial": (1, 1)}, True, None),
    ],
)
def test_fast_path_equals_reference_path(kind, kwargs, with_state, lengths):
    """The hand-written backward through time == autograd through the reference steps."""
    torch.manual_seed(8)
    if kind == "lstm":
        kwargs = {**kwargs, "peephole": True}
    spatial = kwargs.pop("spatial", (4, 5))
    batch = kwargs.pop("batch", 2)
    layer = KINDS[kind](2, 2, 3, dtype=DT, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    d = 2 if layer.bidirectional else 1
    x = torch.randn(batch, 5, 2, *spatial, dtype=DT)
    h0 = torch.randn(layer.num_layers * d, batch, 3, *spatial, dtype=DT)
    results = []
    for backend in ("fused", "reference"):
        layer.backend = backend
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        states = [h0.clone().requires_grad_(), h0.cos().requires_grad_()][
            : 2 if kind == "lstm" else 1] if with_state else []
        state = (tuple(states) if kind == "lstm" else states[0]) if with_state else None
        out, s_n = layer(xi, state, lengths=lengths)
        loss = out.sin().sum() + sum((s * s.cos()).sum() for s in _states(s_n, kind))
        loss.backward()
        grads = [xi.grad, *(s.grad for s in states), *(p.grad for p in layer.parameters())]
        results.append((out.detach(), [s.detach() for s in _states(s_n, kind)], grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1] + results[0][2], results[1][1] + results[1][2], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_backward_twice_with_retained_graph(kind):
    """The fast path overwrites its saved gates with their gradients unless the graph is
    retained: a second backward through a retained graph must see the same gates."""
    layer = KINDS[kind](2, 2, 3, 3, bidirectional=True, dtype=DT)
    x = torch.randn(1, 4, 2, 6, 5, dtype=DT, requires_grad=True)
    out, _ = layer(x)
    out.sin().sum().backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    out.sin().sum().backward()
    second = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(2 * a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cuda_fast_path_equals_reference_path(kind):
    torch.manual_seed(10)
    layer = KINDS[kind](3, 2, 4, 3, num_layers=2, bidirectional=True, device="cuda", dtype=DT)
    x = torch.randn(2, 4, 2, 5, 6, 7, device="cuda", dtype=DT)
    results = []
    for backend in ("fused", "reference"):
        layer.backend = backend
        layer.zero_grad()
        out, state = layer(x, lengths=torch.tensor([4, 2]))
        (out.sin().sum() + _h(state, kind).sum()).backward()
        results.append([out.detach()] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_fast_path_inference_and_float32_onednn():
    """No-grad forward (no saved buffers) and the float32 oneDNN convolutions agree too."""
    torch.manual_seed(9)
    layer = ConvLSTM(3, 2, 4, 3, bidirectional=True)
    x = torch.randn(1, 6, 2, 5, 6, 7)
    ref_layer = ConvLSTM(3, 2, 4, 3, bidirectional=True, dtype=DT)
    ref_layer.load_state_dict(layer.state_dict())
    ref_layer.backend = "reference"
    with torch.no_grad():
        out, (h_n, c_n) = layer(x, lengths=[4])
        ref, (ref_h, ref_c) = ref_layer(x.double(), lengths=[4])
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c_n, ref_c.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("recompute", [False, True])
def test_every_parameter_gets_a_gradient(kind, recompute):
    kwargs = {"peephole": True} if kind == "lstm" else {}
    layer = KINDS[kind](2, 2, 3, 3, num_layers=2, bidirectional=True, recompute=recompute,
                        **kwargs)
    out, state = layer(torch.randn(2, 3, 2, 4, 5))
    (out.square().sum() + _h(state, kind).sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recompute_gives_same_outputs_and_gradients(kind):
    torch.manual_seed(5)
    kwargs = {"peephole": True} if kind == "lstm" else {}
    plain = KINDS[kind](2, 2, 3, 3, num_layers=2, bidirectional=True, dtype=DT, **kwargs)
    ckpt = KINDS[kind](2, 2, 3, 3, num_layers=2, bidirectional=True, recompute=True,
                       dtype=DT, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 2, 5, 4, dtype=DT)
    results = []
    for layer in (plain, ckpt):
        xi = x.clone().requires_grad_()
        out, state = layer(xi, lengths=[4, 2])
        (out.sin().sum() + _h(state, kind).square().sum()).backward()
        grads = [xi.grad] + [p.grad for p in layer.parameters()]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_dropout_only_between_layers():
    torch.manual_seed(6)
    with pytest.warns(UserWarning, match="num_layers=1"):
        one = ConvLSTM(1, 2, 3, 3, dropout=0.5).train()
    x = torch.randn(2, 3, 2, 5)
    torch.testing.assert_close(one(x)[0], one.eval()(x)[0])  # last layer: no dropout
    two = ConvGRU(1, 2, 3, 3, num_layers=2, dropout=1.0).train()
    zeros_in = two(x)[0]  # layer 0's output fully dropped: layer 1 sees zeros
    ref = ConvGRU(1, 3, 3, 3)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(getattr(two, name.replace("_l0", "_l1")))
    torch.testing.assert_close(zeros_in, ref(torch.zeros(2, 3, 3, 5))[0])
    assert not torch.allclose(two.eval()(x)[0], zeros_in)


def test_init_and_forget_bias():
    layer = ConvLSTM(3, 4, 5, (1, 3, 3), num_layers=2, bidirectional=True, forget_bias=2.0)
    for name, p in layer.named_parameters():
        if name.startswith("bias_ih"):
            assert torch.equal(p[5:10], torch.full((5,), 2.0)), name
            assert p[:5].abs().sum() == 0 and p[10:].abs().sum() == 0, name
        elif name.startswith("bias_hh"):
            assert p.abs().sum() == 0, name
        else:
            bound = 1 / (p.shape[1] * 9) ** 0.5
            assert p.abs().max() <= bound and p.std() > bound / 3, name
    torch.manual_seed(0)
    layer.reset_parameters()
    first = [p.clone() for p in layer.parameters()]
    torch.manual_seed(0)
    layer.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(first, layer.parameters(), strict=True))
    gru = ConvGRU(2, 1, 2, 3)
    assert gru.bias_ih_l0.abs().sum() == 0  # no forget bias for the GRU


def test_parameter_names_and_extra_repr():
    layer = ConvLSTM(2, 3, 4, 3, num_layers=2, bidirectional=True, peephole=True,
                     bias=False)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {f"{w}_l{k}{s}" for w in ("weight_ih", "weight_hh", "weight_peephole")
                     for k in (0, 1) for s in ("", "_reverse")}
    assert layer.weight_ih_l1.shape == (16, 8, 3, 3)
    assert layer.weight_peephole_l0.shape == (12,)
    r = repr(layer)
    assert "num_layers=2" in r and "bidirectional=True" in r and "bias=False" in r
    assert "dropout" not in r and "recompute" not in r
    assert repr(ConvGRU(1, 1, 1, 3)) == "ConvGRU(spatial_dims=1, 1, 1, kernel_size=(3,))"


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU, ConvLSTMCell, ConvGRUCell])
def test_factory_kwargs(cls):
    layer = cls(2, 2, 3, 3, dtype=torch.float64, device="meta")
    for p in layer.parameters():
        assert p.dtype == torch.float64 and p.device.type == "meta"
    layer = cls(2, 2, 3, 3, dtype=torch.float64, device="cpu")
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.float64)
    out = layer(x if cls in (ConvLSTM, ConvGRU) else x[:, 0])
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.float64


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_non_contiguous_input(kind):
    layer = KINDS[kind](2, 3, 4, 3, bidirectional=True)
    x = torch.randn(2, 3, 5, 6, 4).movedim(1, 2)  # (n, t, c, h, w) view of (n, c, t, h, w)
    assert not x.is_contiguous()
    a, sa = layer(x)
    b, sb = layer(x.contiguous())
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(_h(sa, kind), _h(sb, kind))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bf16_autocast_keeps_state_dtypes(kind):
    layer = KINDS[kind](2, 2, 3, 3, num_layers=2)
    x = torch.randn(1, 3, 2, 6, 6)
    ref, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = layer(x[:, :2])
        more, state2 = layer(x[:, 2:], state)
    dtypes = {s.dtype for s in _states(state, kind) + _states(state2, kind)}
    assert len(dtypes) == 1, dtypes
    full = torch.cat([out, more], 1).float()
    torch.testing.assert_close(full, ref, atol=0.05, rtol=0.05)
    (full.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_torch_compile_smoke():
    """fullgraph: the layer traces without graph breaks (aot_eager: no C++ compiler needed)."""
    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    torch.manual_seed(7)
    layer = ConvLSTM(1, 2, 3, 3, bidirectional=True)
    x = torch.randn(1, 2, 2, 8, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out, (h_n, c_n) = compiled(x)
    out.sum().backward()
    ref, (ref_h, ref_c) = layer(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h_n, ref_h)
    torch.testing.assert_close(c_n, ref_c)
