"""The public ``backend=`` switch, the private-API gate, second-order gradients and warnings.

- ``auto`` runs the fused node where supported, the reference path elsewhere; an explicit
  ``fused`` that cannot run says why and names the alternative;
- the public-API fallbacks of :mod:`clstm4d.nn._kernels` give the numbers of the private APIs;
- second-order gradients (gradgradcheck, float64) hold for both backends;
- ``dropout > 0`` with one layer warns, as nn.LSTM does.
"""

import re
import warnings
from pathlib import Path

import pytest
import torch

from clstm4d import ConvGRU, ConvLSTM
from clstm4d.nn import _kernels

DT = torch.float64
KINDS = {"lstm": ConvLSTM, "gru": ConvGRU}


def _node_names(out):
    """Names of the autograd nodes reachable from ``out``."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_auto_picks_fused_and_reference_does_not(kind):
    x = torch.randn(1, 3, 2, 5, 4)
    names = {}
    for backend in ("auto", "fused", "reference"):
        layer = KINDS[kind](2, 2, 3, 3, backend=backend)
        names[backend] = _node_names(layer(x)[0])
    assert "ConvRecurrenceBackward" in names["auto"]
    assert "ConvRecurrenceBackward" in names["fused"]
    assert "ConvRecurrenceBackward" not in names["reference"]
    assert "ConvolutionBackward0" in names["reference"]


def test_backend_validated_and_in_repr():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'fused', "):
        ConvLSTM(2, 1, 2, 3, backend="fast")
    assert "backend='reference'" in repr(ConvGRU(1, 1, 1, 3, backend="reference"))
    assert "backend" not in repr(ConvGRU(1, 1, 1, 3))


def test_fused_unsupported_says_why_and_names_the_alternative():
    layer = ConvLSTM(2, 2, 3, 3, dtype=torch.bfloat16, backend="fused")
    x = torch.randn(1, 2, 2, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"backend='fused' does not support parameters of "
                       r"dtype torch.bfloat16.*backend='reference'"):
        layer(x)
    layer.backend = "auto"  # falls back to the reference path
    out, _ = layer(x)
    assert out.dtype == torch.bfloat16 and "ConvRecurrenceBackward" not in _node_names(out)


def test_input_dtype_must_match_parameters_without_autocast():
    layer = ConvGRU(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"expected x of dtype torch.float32.*got torch.float64"):
        layer(torch.randn(1, 2, 2, 5, dtype=DT))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("recompute", [False, True])
def test_public_api_fallbacks_give_the_same_numbers(kind, recompute):
    """oneDNN / convolution_backward / keep-graph query vs F.conv / torch.nn.grad."""
    torch.manual_seed(0)
    kwargs = {"peephole": True} if kind == "lstm" else {}
    layer = KINDS[kind](3, 2, 3, (3, 2, 3), bidirectional=True, recompute=recompute,
                        backend="fused", **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1, 4, 2, 3, 4, 5)
    results = []
    for public in (False, True):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        with _kernels.public_api_only() if public else torch.enable_grad():
            out, _ = layer(xi, lengths=[3])
            out.sin().sum().backward()
        results.append([out.detach(), xi.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*results, strict=True):
        # float32 rounding of different kernels (oneDNN vs PyTorch's native ones)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_private_api_gate_follows_the_version():
    """The gate matches the declared torch floor, which the running torch meets."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = tuple(int(v) for v in re.search(r'"torch>=([\d.]+)"', text).group(1).split("."))
    assert _kernels.PRIVATE_API_FROM == floor
    assert torch.__version__ >= floor
    new_enough = torch.__version__ >= _kernels.PRIVATE_API_FROM
    assert _kernels._HAS["convolution_backward"] == new_enough
    with _kernels.public_api_only():
        assert not _kernels._use("convolution_backward")
        assert _kernels.graph_is_retained()  # the safe answer


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_second_order_gradients(kind, backend):
    """gradgradcheck w.r.t. input, initial state and parameters; lengths and recompute."""
    torch.manual_seed(1)
    kwargs = {"peephole": True} if kind == "lstm" else {}
    layer = KINDS[kind](1, 1, 2, 2, recompute=True, dtype=DT, backend=backend, **kwargs)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(2, 3, 1, 3, dtype=DT, requires_grad=True)
    h0 = torch.randn(1, 2, 2, 3, dtype=DT, requires_grad=True)
    lengths = torch.tensor([3, 2])

    def fn(x, h0, *params):
        state = (h0, h0.cos()) if kind == "lstm" else h0
        out, _ = torch.func.functional_call(layer, dict(zip(names, params, strict=True)),
                                            (x, state), {"lengths": lengths})
        return out

    assert torch.autograd.gradgradcheck(fn, (x, h0, *layer.parameters()), fast_mode=True)


def test_second_order_gradient_value_fused_equals_reference():
    """A gradient penalty (the use case): d/dw |d loss / dx|^2 is the same on both paths."""
    torch.manual_seed(2)
    layer = ConvLSTM(2, 2, 3, 3, bidirectional=True, dtype=DT)
    x = torch.randn(2, 3, 2, 4, 5, dtype=DT, requires_grad=True)
    grads = []
    for backend in ("fused", "reference"):
        layer.backend = backend
        layer.zero_grad()
        out, (h_n, _) = layer(x)
        (gx,) = torch.autograd.grad(out.sin().sum() + h_n.sum(), x, create_graph=True)
        gx.square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match=r"dropout=0.5 .* no effect with num_layers=1"):
        ConvLSTM(1, 2, 3, 3, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConvGRU(1, 2, 3, 3, num_layers=2, dropout=0.5)
        ConvGRU(1, 2, 3, 3)
