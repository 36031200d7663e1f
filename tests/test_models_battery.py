"""The battery every sequence model class runs (the contract of models/protocol.py).

A model class joins by subclassing :class:`SequenceModelBattery` with its ``VARIANTS`` (the
keyword arguments of the configurations worth covering) and ``make``. Each variant then gets:
forward shapes over 1D/2D/3D with odd sizes and T=1; causality where it is streamable;
streaming in chunks equals one pass (or a clear refusal); gradients reach every parameter;
the config round trip through ``create_model`` (same weights, same output); the protocol's
attributes. Behaviour particular to one class stays in that class's own test file.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

from clstm4d import create_model
from clstm4d.models import SequenceModel

# (spatial_dims, odd spatial size): 3 levels pad to a multiple of 4 in 2D/3D
SIZES = [(1, (11,)), (2, (13, 10)), (3, (5, 7, 6))]
IN, OUT = 2, 3


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        variants = metafunc.cls.VARIANTS
        metafunc.parametrize("variant", variants, ids=[v["id"] for v in variants])


def seq(size, t, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, IN, *size, generator=g)


class SequenceModelBattery:
    """Tests every sequence model class passes; subclasses set ``VARIANTS`` and ``make``."""

    VARIANTS: list[dict] = []

    def make(self, spatial_dims: int, variant: dict, seed: int = 0) -> torch.nn.Module:
        raise NotImplementedError  # each subclass builds its model

    def frames(self, model, t: int) -> int:
        """The number of frames to feed: a fixed window's length, else ``t``."""
        return model.frames if model.frames is not None else t

    @pytest.mark.parametrize("spatial_dims,size", SIZES)
    @pytest.mark.parametrize("t", [1, 3])
    def test_forward_shapes_over_1d_2d_3d_odd_sizes_and_one_frame(self, variant, spatial_dims,
                                                                 size, t):
        net = self.make(spatial_dims, variant)
        t = self.frames(net, t)
        y = net(seq(size, t))
        assert y.shape == (2, t, OUT, *size)
        assert torch.isfinite(y).all()

    def test_keeps_the_protocol(self, variant):
        net = self.make(2, variant)
        assert isinstance(net, SequenceModel)
        assert isinstance(net.streamable, bool)
        assert net.frames is None or (isinstance(net.frames, int) and net.frames >= 1)
        assert net.config["spatial_dims"] == 2 and net.config["out_channels"] == OUT

    @pytest.mark.parametrize("spatial_dims,size", SIZES[1:])
    def test_streaming_in_chunks_equals_one_pass(self, variant, spatial_dims, size):
        net = self.make(spatial_dims, variant)
        x = seq(size, self.frames(net, 6))
        if not net.streamable:
            with pytest.raises(ValueError, match="streamable"):
                net(x, return_state=True)
            return
        whole, final = net(x, return_state=True)
        outs, state = [], None
        for a, b in [(0, 2), (2, 3), (3, 6)]:
            y, state = net(x[:, a:b], state=state, return_state=True)
            outs.append(y)
        torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)
        for s_chunk, s_whole in zip(tree_leaves(state), tree_leaves(final), strict=True):
            torch.testing.assert_close(s_chunk, s_whole, rtol=1e-5, atol=1e-5)

    def test_streamable_models_are_causal(self, variant):
        net = self.make(2, variant)
        if not net.streamable:
            pytest.skip("not streamable: its frames may see later ones")
        x = seq((9, 10), 5)
        later = x.clone()
        later[:, 3:] = torch.randn_like(later[:, 3:]) * 3
        torch.testing.assert_close(net(x)[:, :3], net(later)[:, :3], rtol=0, atol=0)

    def test_every_parameter_gets_a_gradient(self, variant):
        net = self.make(2, variant)
        net(seq((9, 12), self.frames(net, 3))).square().mean().backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
        assert not missing

    def test_config_round_trip_rebuilds_the_same_function(self, variant):
        net = self.make(2, variant).eval()
        torch.manual_seed(123)  # another seed: the weights come from the state dict
        again = create_model(**net.config).eval()
        assert type(again) is type(net) and again.config == net.config
        again.load_state_dict(net.state_dict())
        x = seq((9, 10), self.frames(net, 3))
        with torch.no_grad():
            torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


class TestTimeResolvedUNet(SequenceModelBattery):
    VARIANTS = [
        {"id": "bottleneck-lstm", "temporal": "bottleneck", "cell": "lstm"},
        {"id": "skips-gru", "temporal": "skips", "cell": "gru"},
        {"id": "skips-lstm", "temporal": "skips", "cell": "lstm"},
        {"id": "per-frame", "temporal": "none"},
        {"id": "bidirectional-gru", "temporal": "bottleneck", "cell": "gru",
         "bidirectional": True},
        {"id": "skips-lstm-gated-bidirectional", "temporal": "skips", "cell": "lstm",
         "bidirectional": True, "fusion": "gated"},
        {"id": "skips-gru-gated", "temporal": "skips", "cell": "gru", "fusion": "gated"},
        {"id": "bottleneck-attention", "temporal": "bottleneck", "cell": "attention"},
        {"id": "skips-attention-bank2-gated", "temporal": "skips", "cell": "attention",
         "bank": 2, "fusion": "gated"},
    ]

    def make(self, spatial_dims, variant, seed=0):
        torch.manual_seed(seed)
        kw = {k: v for k, v in variant.items() if k != "id"}
        return create_model("unet", spatial_dims=spatial_dims, in_channels=IN,
                            out_channels=OUT, channels=(4, 6, 8), **kw)


class TestTimeAsChannelsUNet(SequenceModelBattery):
    VARIANTS = [{"id": "window-3", "frames": 3}, {"id": "window-1", "frames": 1}]

    def make(self, spatial_dims, variant, seed=0):
        torch.manual_seed(seed)
        return create_model("tac", spatial_dims=spatial_dims, in_channels=IN, out_channels=OUT,
                            channels=(4, 6, 8), frames=variant["frames"])
