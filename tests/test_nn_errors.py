"""Bad input raises ValueError/TypeError naming the argument, the expectation and the value."""

import pytest
import torch

from clstm4d import ConvGRU, ConvGRUCell, ConvLSTM, ConvLSTMCell

GOOD = {"spatial_dims": 2, "in_channels": 2, "hidden_channels": 3, "kernel_size": 3}


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU, ConvLSTMCell, ConvGRUCell])
@pytest.mark.parametrize(
    ("override", "error", "words"),
    [
        ({"spatial_dims": 4}, ValueError, ["spatial_dims", "1, 2 or 3", "4"]),
        ({"spatial_dims": True}, ValueError, ["spatial_dims", "True"]),
        ({"in_channels": 0}, ValueError, ["in_channels", ">= 1", "0"]),
        ({"hidden_channels": 2.5}, TypeError, ["hidden_channels", "int", "2.5"]),
        ({"kernel_size": (3, 3, 3)}, ValueError, ["kernel_size", "2 ints", "(3, 3, 3)"]),
        ({"kernel_size": 0}, ValueError, ["kernel_size", ">= 1", "0"]),
        ({"dilation": (1, -1)}, ValueError, ["dilation", ">= 1", "-1"]),
        ({"bias": 1}, TypeError, ["bias", "bool", "1"]),
    ],
)
def test_bad_constructor_values(cls, override, error, words):
    with pytest.raises(error) as info:
        cls(**{**GOOD, **override})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("cls", "override", "words"),
    [
        (ConvLSTM, {"num_layers": 0}, ["num_layers", ">= 1", "0"]),
        (ConvGRU, {"dropout": -0.1}, ["dropout", "[0, 1]", "-0.1"]),
        (ConvLSTM, {"dropout": 1.5}, ["dropout", "[0, 1]", "1.5"]),
        (ConvLSTM, {"forget_bias": float("nan")}, ["forget_bias", "finite", "nan"]),
    ],
)
def test_bad_layer_options(cls, override, words):
    with pytest.raises(ValueError) as info:
        cls(**{**GOOD, **override})
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("cls", [ConvLSTM, ConvGRU])
def test_bad_sequence_input(cls):
    layer = cls(**GOOD, num_layers=2)
    with pytest.raises(ValueError, match=r"x of shape \(N, T, C_in, \*S\).*5 dims.*\(2, 2, 4, 4\)"):
        layer(torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"in_channels=2.*\(1, 3, 5, 4, 4\)"):
        layer(torch.randn(1, 3, 5, 4, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        layer([1, 2])


def test_bad_state():
    lstm = ConvLSTM(**GOOD, num_layers=2)
    x = torch.randn(1, 3, 2, 4, 5)
    h = torch.zeros(2, 1, 3, 4, 5)
    with pytest.raises(ValueError, match=r"state must be a tuple \(h_0, c_0\)"):
        lstm(x, h)
    with pytest.raises(ValueError, match=r"state must be a tuple \(h_0, c_0\)"):
        lstm(x, (h, h, h))
    with pytest.raises(ValueError, match=r"state c_0 .* \(2, 1, 3, 4, 5\), got \(1, 1, 3, 4, 5\)"):
        lstm(x, (h, h[:1]))
    gru = ConvGRU(**GOOD, bidirectional=True)
    with pytest.raises(ValueError, match=r"state h_0 .* \(2, 1, 3, 4, 5\), got \(2, 1, 3, 4, 4\)"):
        gru(x, torch.zeros(2, 1, 3, 4, 4))
    with pytest.raises(TypeError, match="state must be a Tensor h_0, got tuple"):
        gru(x, (h,))
    cell = ConvLSTMCell(**GOOD)
    with pytest.raises(ValueError, match=r"state c of shape \(1, 3, 4, 5\), got \(1, 3, 4, 4\)"):
        cell(x[:, 0], (h[0], h[0, ..., :4]))
    with pytest.raises(TypeError, match="state must be a Tensor h, got tuple"):
        ConvGRUCell(**GOOD)(x[:, 0], (h[0],))


def test_bad_lengths():
    gru = ConvGRU(**GOOD)
    x = torch.randn(2, 3, 2, 4, 5)
    with pytest.raises(ValueError, match=r"lengths of shape \(N,\) = \(2,\), got \(3,\)"):
        gru(x, lengths=[3, 3, 3])
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T\] = \[1, 3\].*\[1, 4\]"):
        gru(x, lengths=[1, 4])
    with pytest.raises(ValueError, match=r"\[1, 3\], got values in \[0, 2\]"):
        gru(x, lengths=torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="lengths must hold integers, got dtype torch.float32"):
        gru(x, lengths=torch.tensor([1.0, 2.0]))


def test_cell_bad_input():
    cell = ConvGRUCell(**GOOD)
    with pytest.raises(ValueError, match=r"x of shape \(N, C_in, \*S\).*4 dims.*\(1, 2, 4\)"):
        cell(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"in_channels=2 at dim 1"):
        cell(torch.randn(1, 3, 4, 4))
