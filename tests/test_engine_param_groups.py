"""engine.train.param_groups: AdamW weight decay on conv/linear weights, not on 1-D params."""

import torch

from clstm4d import ConvLSTM, create_model
from clstm4d.engine.training.optim import param_groups


def test_decay_only_on_weights_of_two_or_more_dims():
    net = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3)
    decay, no_decay = param_groups(net, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in net.named_parameters()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    exempt = {by_id[id(p)] for p in no_decay["params"]}
    assert decayed | exempt == set(by_id.values()) and not decayed & exempt
    assert all(n.rsplit(".", 1)[-1].startswith("weight") and "norm" not in n for n in decayed)
    assert any("norm" in n for n in exempt) and any(n.endswith("bias") for n in exempt)
    assert "recurrence.2.rnn.bias_ih_l0" in exempt  # holds the forget-gate bias


def test_peepholes_and_biases_keep_their_values_under_adamw():
    """With zero gradients only decay moves a parameter: exempt ones stay put."""
    layer = ConvLSTM(2, 1, 2, 3, peephole=True, forget_bias=1.0)
    with torch.no_grad():
        layer.weight_peephole_l0.fill_(0.5)
    before = {n: p.clone() for n, p in layer.named_parameters()}
    opt = torch.optim.AdamW(param_groups(layer, 0.5), lr=0.1)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in layer.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == name.startswith(("weight_ih", "weight_hh")), name


def test_a_checkpoint_with_one_group_resumes_into_the_grouped_optimizer(tmp_path):
    """Runs saved before param_groups had one AdamW group; resuming regroups their moments."""
    from clstm4d.engine.run.checkpoint import Checkpoint, save_checkpoint

    torch.manual_seed(0)
    net = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8))
    old = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    net(torch.randn(1, 2, 1, 8, 8)).sum().backward()
    old.step()
    ck = save_checkpoint(tmp_path, net, step=1, config={}, optimizer=old)
    new = torch.optim.AdamW(param_groups(net, 0.1), lr=1e-2)
    Checkpoint.open(ck).restore(net, new)
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0]
    for p in net.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(new.state[p][key], old.state[p][key])
