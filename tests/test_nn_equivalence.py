"""Equivalences that pin down the ConvLSTM/ConvGRU semantics against independent references.

- kernel_size=1 == torch.nn.LSTM / nn.GRU applied at every voxel (weights loaded by name);
- a sequence layer == a hand-written loop over the cell;
- chunks with the carried state == one pass;
- depth-1 3D with kernel (1, k, k) == 2D.
"""

import pytest
import torch
from torch import nn

from clstm4d import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell

DT = torch.float64
LAYERS = {"lstm": (ConvLSTM, nn.LSTM), "gru": (ConvGRU, nn.GRU)}


def _per_voxel(x):
    """(n, t, c, *s) -> (n*prod(s), t, c): one nn.LSTM sequence per voxel."""
    return x.movedim(2, -1).movedim(1, -2).flatten(0, -3)


def _from_per_voxel(y, n, spatial):
    """(n*prod(s), t, c) -> (n, t, c, *s)."""
    return y.unflatten(0, (n, *spatial)).movedim(-2, 1).movedim(-1, 2)


def _state_per_voxel(s):
    """(l*d, n, h, *s) -> (l*d, n*prod(s), h)."""
    return s.movedim(2, -1).flatten(1, -2)


def _load_rnn_weights(conv_rnn, rnn):
    """Copy an nn.LSTM/nn.GRU's parameters into a kernel-1 ConvLSTM/ConvGRU, by name."""
    params = dict(conv_rnn.named_parameters())
    assert set(params) == {name for name, _ in rnn.named_parameters()}
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            params[name].copy_(p.reshape(params[name].shape))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("spatial", [(3,), (2, 3)])
def test_kernel1_equals_torch_rnn(kind, bidirectional, spatial):
    conv_cls, rnn_cls = LAYERS[kind]
    torch.manual_seed(0)
    n, t, c, h, layers = 2, 5, 3, 4, 2
    rnn = rnn_cls(c, h, num_layers=layers, bidirectional=bidirectional, batch_first=True,
                  dtype=DT)
    conv = conv_cls(len(spatial), c, h, kernel_size=1, num_layers=layers,
                    bidirectional=bidirectional, dtype=DT)
    _load_rnn_weights(conv, rnn)
    x = torch.randn(n, t, c, *spatial, dtype=DT)
    d = 2 if bidirectional else 1
    h0 = torch.randn(layers * d, n, h, *spatial, dtype=DT)
    c0 = torch.randn(layers * d, n, h, *spatial, dtype=DT)
    state = (h0, c0) if kind == "lstm" else h0
    ref_state = ((_state_per_voxel(h0), _state_per_voxel(c0)) if kind == "lstm"
                 else _state_per_voxel(h0))

    out, s_n = conv(x, state)
    ref_out, ref_s_n = rnn(_per_voxel(x), ref_state)

    torch.testing.assert_close(out, _from_per_voxel(ref_out, n, spatial))
    finals = s_n if kind == "lstm" else (s_n,)
    ref_finals = ref_s_n if kind == "lstm" else (ref_s_n,)
    for got, ref in zip(finals, ref_finals, strict=True):
        assert got.shape == (layers * d, n, h, *spatial)
        torch.testing.assert_close(_state_per_voxel(got), ref)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_kernel1_lengths_equal_packed_sequence(kind):
    conv_cls, rnn_cls = LAYERS[kind]
    torch.manual_seed(1)
    n, t, c, h = 3, 6, 2, 3
    rnn = rnn_cls(c, h, num_layers=2, bidirectional=True, batch_first=True, dtype=DT)
    conv = conv_cls(1, c, h, kernel_size=1, num_layers=2, bidirectional=True, dtype=DT)
    _load_rnn_weights(conv, rnn)
    lengths = torch.tensor([6, 2, 4])
    x = torch.randn(n, t, c, 1, dtype=DT)
    out, s_n = conv(x, lengths=lengths)
    packed = nn.utils.rnn.pack_padded_sequence(x[..., 0], lengths, batch_first=True,
                                               enforce_sorted=False)
    ref_packed, ref_s_n = rnn(packed)
    ref_out, _ = nn.utils.rnn.pad_packed_sequence(ref_packed, batch_first=True, total_length=t)
    torch.testing.assert_close(out[..., 0], ref_out)
    h_n = s_n[0] if kind == "lstm" else s_n
    ref_h_n = ref_s_n[0] if kind == "lstm" else ref_s_n
    torch.testing.assert_close(h_n[..., 0], ref_h_n)


@pytest.mark.parametrize("peephole", [False, True])
def test_lstm_layer_equals_loop_over_cell(peephole):
    torch.manual_seed(2)
    layer = ConvLSTM(2, 3, 4, kernel_size=(3, 2), peephole=peephole, dtype=DT)
    cell = ConvLSTMCell(2, 3, 4, kernel_size=(3, 2), peephole=peephole, dtype=DT)
    with torch.no_grad():
        for name, p in cell.named_parameters():
            getattr(layer, name + "_l0").normal_()
            p.copy_(getattr(layer, name + "_l0"))
    x = torch.randn(2, 4, 3, 5, 6, dtype=DT)
    out, (h_n, c_n) = layer(x)
    state = None
    for t in range(x.shape[1]):
        state = cell(x[:, t], state)
        torch.testing.assert_close(out[:, t], state[0])
    torch.testing.assert_close(h_n[0], state[0])
    torch.testing.assert_close(c_n[0], state[1])


def test_gru_layer_equals_loop_over_cell():
    torch.manual_seed(3)
    layer = ConvGRU(1, 2, 3, kernel_size=3, dilation=2, dtype=DT)
    cell = ConvGRUCell(1, 2, 3, kernel_size=3, dilation=2, dtype=DT)
    with torch.no_grad():
        for name, p in cell.named_parameters():
            getattr(layer, name + "_l0").normal_()
            p.copy_(getattr(layer, name + "_l0"))
    x = torch.randn(2, 5, 2, 9, dtype=DT)
    out, h_n = layer(x)
    h = None
    for t in range(x.shape[1]):
        h = cell(x[:, t], h)
        torch.testing.assert_close(out[:, t], h)
    torch.testing.assert_close(h_n[0], h)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_chunked_equals_whole(kind):
    conv_cls = LAYERS[kind][0]
    torch.manual_seed(4)
    kwargs = {"peephole": True} if kind == "lstm" else {}
    layer = conv_cls(2, 2, 3, kernel_size=3, num_layers=2, dtype=DT, **kwargs)
    x = torch.randn(2, 7, 2, 5, 4, dtype=DT)
    whole, final = layer(x)
    outs, state = [], None
    for chunk in x.split([3, 1, 3], dim=1):
        out, state = layer(chunk, state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), whole)
    for a, b in zip(state if kind == "lstm" else (state,),
                    final if kind == "lstm" else (final,), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_depth1_3d_equals_2d(kind):
    conv_cls = LAYERS[kind][0]
    torch.manual_seed(5)
    l2 = conv_cls(2, 2, 3, kernel_size=3, num_layers=2, bidirectional=True, dtype=DT)
    l3 = conv_cls(3, 2, 3, kernel_size=(1, 3, 3), num_layers=2, bidirectional=True, dtype=DT)
    with torch.no_grad():
        for name, p in l2.named_parameters():
            getattr(l3, name).copy_(p.unsqueeze(2) if p.dim() > 1 else p)
    x = torch.randn(2, 3, 2, 6, 5, dtype=DT)
    out2, s2 = l2(x)
    out3, s3 = l3(x.unsqueeze(3))
    torch.testing.assert_close(out3[:, :, :, 0], out2)
    h2 = s2[0] if kind == "lstm" else s2
    h3 = s3[0] if kind == "lstm" else s3
    torch.testing.assert_close(h3[:, :, :, 0], h2)
