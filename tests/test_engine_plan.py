"""Planning for anisotropic 3D+t data: strides/kernels through checkpoints, resampling around
prediction, the memory model, the plan and the train-time guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clstm4d import create_model
from clstm4d.data import write_synthetic_dataset
from clstm4d.engine.builders import load_model
from clstm4d.engine.checkpoint import load_weights
from clstm4d.engine.config import Config
from clstm4d.engine.train import train


def _train_cfg(datalist, out, **model):
    return Config.from_dict({
        "model": {"name": "tiny", **model},
        "data": {"datalist": str(datalist), "window": 3, "roi": [16, 16, 8], "batch_size": 1,
                 "augment": False},
        "train": {"out": str(out), "steps": 2, "device": "cpu", "progress": False,
                  "warmup_steps": 1, "amp": "none"},
    })


@pytest.fixture(scope="module")
def aniso_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("aniso")
    return write_synthetic_dataset(root, cases=2, frames=3, size=16, spatial_dims=3,
                                   spacing=(1, 1, 2), validation=0.0)


def test_strides_and_kernels_round_trip_through_a_checkpoint(aniso_data, tmp_path):
    strides, kernels = [[2, 2, 1], [2, 2, 2]], [[3, 3, 1], [3, 3, 1], 3]
    res = train(_train_cfg(aniso_data, tmp_path / "run", strides=strides,
                           kernel_sizes=kernels))
    model, run = load_model(res.checkpoint)
    assert model.config["strides"] == strides
    assert model.config["kernel_sizes"] == [[3, 3, 1], [3, 3, 1], [3, 3, 3]]
    assert run.config.model.strides == strides  # the typed config keeps what was asked
    assert model.encoder[1].pool.kernel_size == (2, 2, 1)
    # the weights saved have the anisotropic shapes, and a rebuild from the saved config
    # computes the same function
    assert model.encoder[0].unit1.conv.weight.shape[2:] == (3, 3, 1)
    again = create_model(**model.config)
    load_weights(again, res.checkpoint)
    x = torch.randn(1, 2, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x))
    assert np.isfinite(res.history[-1]["loss"])
