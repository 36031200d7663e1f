"""TimeAsChannelsUNet and the presets behind create_model / list_models."""

import json

import pytest
import torch

import clstm4d
from clstm4d import TimeAsChannelsUNet, TimeResolvedUNet, create_model, list_models


def test_time_as_channels_shapes_and_window_dependence():
    torch.manual_seed(0)
    net = TimeAsChannelsUNet(3, in_channels=2, out_channels=3, frames=4, channels=(4, 8))
    x = torch.randn(2, 4, 2, 5, 6, 7)
    y = net(x)
    assert y.shape == (2, 4, 3, 5, 6, 7)
    # every output frame sees every input frame, the last one included
    x2 = x.clone()
    x2[:, 3] += 1
    assert not torch.allclose(net(x2)[:, 0], y[:, 0])
    assert not net.streamable


def test_time_as_channels_with_one_frame_is_the_per_frame_unet():
    torch.manual_seed(0)
    tac = TimeAsChannelsUNet(2, in_channels=2, out_channels=3, frames=1, channels=(4, 8))
    per_frame = TimeResolvedUNet(2, 2, 3, channels=(4, 8), temporal="none")
    per_frame.load_state_dict(tac.unet.state_dict())
    x = torch.randn(3, 1, 2, 9, 11)
    torch.testing.assert_close(tac(x), per_frame(x), rtol=0, atol=0)


def test_time_as_channels_frame_order_matches_channel_blocks():
    """Frame i's logits are channels [i*k, (i+1)*k) of the inner UNet, frame i's input
    channels are [i*c, (i+1)*c): checked against stacking by hand."""
    torch.manual_seed(0)
    net = TimeAsChannelsUNet(2, in_channels=2, out_channels=3, frames=3, channels=(4,))
    x = torch.randn(1, 3, 2, 6, 6)
    stacked = torch.cat([x[:, i] for i in range(3)], dim=1)[:, None]  # (1, 1, 6, 6, 6)
    inner = net.unet(stacked)[:, 0]  # (1, 9, 6, 6)
    expected = torch.stack([inner[:, 3 * i:3 * i + 3] for i in range(3)], dim=1)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_time_as_channels_rejects_other_window_lengths_and_state():
    net = TimeAsChannelsUNet(2, 1, 2, frames=4, channels=(4,))
    with pytest.raises(ValueError, match="frames=4, got T=3"):
        net(torch.randn(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="no state"):
        net(torch.randn(1, 4, 1, 8, 8), return_state=True)
    with pytest.raises(ValueError, match="frames must be an int >= 1, got 0"):
        TimeAsChannelsUNet(2, 1, 2, frames=0)


def test_list_models_has_the_fixed_names():
    names = list_models()
    assert {"tiny", "small", "reference", "tac-tiny", "tac-small"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["tiny", "small", "tac-tiny", "tac-small", "unet", "tac"])
def test_every_preset_builds_runs_and_rebuilds_from_its_json_config(name):
    torch.manual_seed(0)
    net = create_model(name, spatial_dims=2)
    cfg = json.loads(json.dumps(net.config))  # as the engine saves it
    assert cfg == net.config and cfg["name"] == name
    torch.manual_seed(0)
    again = create_model(cfg.pop("name"), **cfg)
    assert type(again) is type(net) and again.config == net.config
    for (ka, a), (kb, b) in zip(net.state_dict().items(), again.state_dict().items(),
                                strict=True):
        assert ka == kb and torch.equal(a, b)
    t = net.frames or 2
    x = torch.randn(1, t, 1, 16, 16)
    assert net(x).shape == (1, t, 2, 16, 16)


def test_defaults_and_the_engine_call():
    net = create_model("tiny")
    assert (net.spatial_dims, net.in_channels, net.out_channels) == (3, 1, 2)
    net = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3, temporal="none")
    assert net.config["temporal"] == "none" and net.streamable
    assert net(torch.randn(1, 8, 1, 64, 64)).shape == (1, 8, 3, 64, 64)
    assert clstm4d.create_model is create_model


def test_reference_preset_has_the_reference_widths_and_size():
    with torch.device("meta"):  # no memory for 80 M parameters
        net = create_model("reference")
    assert net.channels == (64, 128, 256, 512) and net.spatial_dims == 3
    assert list(net.recurrence) == ["3"] and net.config["cell"] == "lstm"
    lstm = sum(p.numel() for p in net.recurrence.parameters())
    # ConvLSTM 512 -> 512, k=3: two (4*512, 512, 3, 3, 3) kernels and two biases
    assert lstm == 2 * 4 * 512 * 512 * 27 + 2 * 4 * 512
    assert 70e6 < sum(p.numel() for p in net.parameters()) < 85e6


def test_create_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model name 'huge'.*tiny"):
        create_model("huge")
    with pytest.raises(TypeError, match="frame.*TimeResolvedUNet takes"):
        create_model("tiny", frame=3)
    with pytest.raises(ValueError, match="temporal must be one of"):
        create_model("small", temporal="everywhere")
