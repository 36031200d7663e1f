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


class _Threshold(torch.nn.Module):
    """An oracle 'model': class 1 where the intensity is above 0.5; records the input shapes."""

    streamable = True

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.seen: list[tuple[int, ...]] = []
        self.config = {"name": "threshold", "spatial_dims": 3, "in_channels": 1,
                       "out_channels": 2}

    def forward(self, x, state=None, return_state=False):
        self.seen.append(tuple(x.shape[3:]))
        y = torch.cat([0.5 - x, x - 0.5], 2) * self.scale  # (n, t, 2, *s)
        return (y, None) if return_state else y


def _ball_image(shape, spacing, centre, radius):
    """A ball on an anisotropic grid (world = index * spacing): image and label (t=2)."""
    from clstm4d.data import Geometry

    g = Geometry.default("nifti", shape, frames=2, spacing=spacing, origin=(3.0, -2.0, 7.0))
    world = np.stack(np.meshgrid(*[np.arange(n) * h for n, h in zip(shape, spacing,
                                                                     strict=True)],
                                 indexing="ij"))
    dist = np.sqrt(sum((w - c) ** 2 for w, c in zip(world, centre, strict=True)))
    label = np.stack([dist <= radius, dist <= radius + 2]).astype(np.int64)
    return label[:, None].astype(np.float32), label, g


def test_resample_predict_resample_returns_labels_on_the_input_grid(tmp_path):
    """data.spacing = 1 mm: a (1, 1, 5) mm input is resampled up for the model and the
    probabilities back; the written labels have the input's shape and affine and overlay
    the input's own labels (Dice >= 0.98)."""
    from clstm4d.data import read_label, write_image
    from clstm4d.engine.config import SavedRun
    from clstm4d.engine.predictor import Predictor

    image, label, g = _ball_image((40, 36, 9), (1.0, 1.0, 5.0), (19.0, 17.0, 21.0), 11.0)
    model = _Threshold()
    run = SavedRun(Config.from_dict({"data": {"spacing": [1.0], "normalize": None}}),
                   model.config)
    predictor = Predictor(model, run, device="cpu")
    write_image(image, g, tmp_path / "img.nii.gz")
    (out,) = predictor.predict_file(tmp_path / "img.nii.gz", tmp_path / "pred.nii.gz")
    assert model.seen[-1] == (40, 36, 45)  # the model worked at 1 mm
    pred, pg = read_label(out)
    assert pred.shape == label.shape
    np.testing.assert_allclose(pg.affine, g.affine, atol=1e-6)
    dice = 2 * ((pred > 0) & (label > 0)).sum() / ((pred > 0).sum() + (label > 0).sum())
    assert dice >= 0.98
    # a coarser model grid (2 mm, in-plane detail lost) still overlays the input
    coarse = Predictor(model, SavedRun(Config.from_dict(
        {"data": {"spacing": [2.0, 2.0, 2.0], "normalize": None}}), model.config), device="cpu")
    pred = coarse.predict_array(image, g)
    assert model.seen[-1] == (20, 18, 22) and pred.shape == label.shape
    assert 2 * ((pred > 0) & (label > 0)).sum() / ((pred > 0).sum() + (label > 0).sum()) > 0.95
    # the switch: without data.spacing the model sees the input's own grid
    plain = Predictor(model, SavedRun(Config.from_dict({"data": {"normalize": None}}),
                                      model.config), device="cpu")
    plain.predict_array(image, g)
    assert model.seen[-1] == (40, 36, 9)


def test_training_resamples_cases_to_data_spacing(tmp_path, monkeypatch):
    """data.spacing = 1 mm on (1, 1, 2) mm cases: the patches come from 16^3 volumes, the
    spacing is saved with the run, and validation predicts on each case's own grid."""
    import clstm4d.engine.train as train_mod

    seen = {}
    fit = train_mod.fit

    def spy(model, dataset, *args, **kwargs):
        seen["shape"] = dataset.case_data(0).image.shape
        seen["validate"] = kwargs["validate"](model)
        return fit(model, dataset, *args, **kwargs)

    monkeypatch.setattr(train_mod, "fit", spy)
    from clstm4d.data import load_datalist

    data = write_synthetic_dataset(tmp_path / "data", cases=3, frames=3, size=16, spatial_dims=3,
                                   spacing=(1, 1, 2), validation=0.34)
    assert len(load_datalist(data).validation) == 1
    cfg = _train_cfg(data, tmp_path / "run")
    cfg.data.spacing = [1.0]
    cfg.data.roi = [8]
    res = train(cfg)
    assert seen["shape"] == (3, 1, 16, 16, 16)
    assert 0 <= seen["validate"]["val_dice"] <= 1
    _, run = load_model(res.checkpoint)
    assert run.config.data.spacing == [1.0]
    cfg.data.spacing = [1.0, 1.0]
    cfg.train.out = str(tmp_path / "run2")
    with pytest.raises(ValueError, match="data.spacing must be one positive number or 3"):
        train(cfg)
