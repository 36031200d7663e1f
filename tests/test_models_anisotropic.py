"""Per-level, per-axis pooling strides and kernel sizes (anisotropic voxels) in both UNets."""

import pytest
import torch

from clstm4d import TimeAsChannelsUNet, TimeResolvedUNet, create_model

ANISO = {"strides": [(2, 2, 1), (2, 2, 2)], "kernel_sizes": [(3, 3, 1), (3, 3, 1), (3, 3, 3)]}


def seq(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temporal", ["bottleneck", "skips"])
def test_3d_with_depth_1_and_flat_kernels_equals_the_2d_model(temporal):
    """A 3D net that never pools or convolves along its first axis, on inputs one voxel deep
    along it, is the 2D net (same weights with a singleton kernel axis), recurrence included."""
    torch.manual_seed(0)
    net2 = TimeResolvedUNet(2, 1, 3, channels=(4, 6, 8), temporal=temporal)
    net3 = TimeResolvedUNet(3, 1, 3, channels=(4, 6, 8), temporal=temporal,
                            strides=[(1, 2, 2)] * 2, kernel_sizes=[(1, 3, 3)] * 3)
    weights = {k: v.unsqueeze(2) if v.dim() >= 4 else v for k, v in net2.state_dict().items()}
    net3.load_state_dict(weights)
    x = seq(2, 3, 1, 10, 13)
    torch.testing.assert_close(net3(x.unsqueeze(3)).squeeze(3), net2(x), rtol=1e-5, atol=1e-5)


def test_layers_follow_the_strides_and_kernels():
    net = TimeResolvedUNet(3, 1, 2, channels=(4, 6, 8), temporal="skips", **ANISO)
    assert net.encoder[1].pool.kernel_size == (2, 2, 1)
    assert net.encoder[2].pool.stride == (2, 2, 2)
    assert net.encoder[0].unit1.conv.kernel_size == (3, 3, 1)
    assert net.encoder[0].unit1.conv.padding == (1, 1, 0)
    assert net.decoder[0].up.stride == (2, 2, 1) and net.decoder[1].up.kernel_size == (2, 2, 2)
    assert net.decoder[0].unit2.conv.kernel_size == (3, 3, 1)
    # the recurrence's kernel follows its level's
    assert net.recurrence["0"].rnn.kernel_size == (3, 3, 1)
    assert net.recurrence["2"].rnn.kernel_size == (3, 3, 3)


def test_padding_uses_the_per_axis_product_of_the_strides():
    """Total strides (4, 4, 2): a (6, 5, 3) input is padded to (8, 8, 4) and cropped back."""
    torch.manual_seed(0)
    net = TimeResolvedUNet(3, 1, 2, channels=(4, 6, 8), **ANISO)
    x = seq(1, 2, 1, 6, 5, 3)
    by_hand = net(torch.nn.functional.pad(x, (0, 1, 0, 3, 0, 2)))[..., :6, :5, :3]
    torch.testing.assert_close(net(x), by_hand, rtol=1e-5, atol=1e-6)
    # an axis of 2 voxels with total stride 2 needs no padding: works at its minimum size
    assert net(seq(1, 2, 1, 8, 8, 2)).shape == (1, 2, 2, 8, 8, 2)


def test_strides_and_kernels_rebuild_from_config_for_both_models():
    for name, extra in (("tiny", {}), ("tac-tiny", {"frames": 3})):
        net = create_model(name, spatial_dims=3, strides=[(2, 2, 1), 2],
                           kernel_sizes=[(3, 3, 1), 3, (3, 3, 1)], **extra)
        assert net.config["strides"] == [[2, 2, 1], [2, 2, 2]]
        assert net.config["kernel_sizes"] == [[3, 3, 1], [3, 3, 3], [3, 3, 1]]
        same = create_model(**net.config)
        same.load_state_dict(net.state_dict())  # same parameter shapes
        x = seq(1, 3, 1, 8, 8, 5)
        torch.testing.assert_close(same(x), net(x))


def test_tac_passes_strides_and_kernels_to_its_unet():
    net = TimeAsChannelsUNet(3, 1, 2, frames=2, channels=(4, 8), strides=[(2, 2, 1)],
                             kernel_sizes=[(3, 3, 1), 3])
    assert net.unet.encoder[1].pool.kernel_size == (2, 2, 1)
    assert net(seq(1, 2, 1, 6, 6, 3)).shape == (1, 2, 2, 6, 6, 3)


@pytest.mark.parametrize("kw,match", [
    ({"strides": [2]}, r"strides must be a sequence of 2 entries \(one per pooling"),
    ({"strides": [2, (2, 2)]}, r"strides\[1\] must be an int or 3 ints"),
    ({"strides": [2, 0]}, r"strides\[1\] must be an int or 3 ints >= 1 \(one per .*got 0"),
    ({"kernel_sizes": [3, 3]}, r"kernel_sizes must be a sequence of 3 entries \(one per level"),
    ({"kernel_sizes": [3, (3, 2, 3), 3]}, r"kernel_sizes\[1\] must be an int or 3 odd ints"),
    ({"strides": "22"}, "strides must be a sequence"),
])
def test_bad_strides_and_kernels_name_the_argument(kw, match):
    for cls, extra in ((TimeResolvedUNet, {}), (TimeAsChannelsUNet, {"frames": 2})):
        with pytest.raises(ValueError, match=match):
            cls(3, 1, 2, channels=(4, 6, 8), **extra, **kw)
