"""Predictor: the one prediction path (CLI, demo, validation) against a second path written
here from the pieces (normalisation + predict_sequence), and the typed saved configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clstm4d.data import Geometry, normalize_intensity, read_label, write_image
from clstm4d.engine.inference.predictor import Predictor
from clstm4d.engine.inference.sliding import predict_sequence
from clstm4d.engine.run.checkpoint import save_checkpoint
from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
from clstm4d.errors import CheckpointError, ConfigError, UserError
from clstm4d.models import create_model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3,
                         channels=(4, 8)).eval()
    cfg = Config.from_dict({"data": {"normalize": "zscore"},
                            "predict": {"chunk": 3, "roi": [16, 16], "overlap": 0.5}})
    run = SavedRun(cfg, ModelSpec.of(model), {0: "background", 1: "a", 2: "b"})
    ck = save_checkpoint(tmp_path / "ck", model, step=1, config=run.to_dict())
    image = np.random.default_rng(0).normal(3.0, 2.0, (5, 1, 20, 18)).astype(np.float32)
    return {"model": model, "run": run, "ck": ck, "image": image}


def test_from_checkpoint_equals_normalise_then_predict_sequence(saved):
    p = Predictor.from_checkpoint(saved["ck"], device="cpu")
    assert isinstance(p.run.config, Config) and p.run.labels[2] == "b"
    assert p.settings.roi == [16, 16] and p.settings.chunk == 3
    got, probs = p.predict_array(saved["image"], return_probs=True)
    x = torch.from_numpy(normalize_intensity(saved["image"], "zscore"))
    ref_labels, ref = predict_sequence(saved["model"], x, roi=[16, 16], overlap=0.5, chunk=3,
                                       return_probs=True)
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-5)
    np.testing.assert_array_equal(got, ref_labels.numpy())


def test_overrides_replace_saved_settings_and_unknown_ones_are_refused(saved):
    p = Predictor(saved["model"], saved["run"], device="cpu", roi=[12], chunk=None)
    assert p.settings.roi == [12, 12] and p.settings.chunk == 3  # None keeps the saved value
    assert saved["run"].config.predict.roi == [16, 16]  # the saved run is not modified
    with pytest.raises(ConfigError, match="unknown prediction setting"):
        Predictor(saved["model"], saved["run"], device="cpu", chunks=2)


def test_wrong_channels_or_axes_name_the_input(saved):
    p = Predictor(saved["model"], saved["run"], device="cpu")
    with pytest.raises(UserError, match="scan.nii.gz has 2 channel"):
        p.predict_array(np.zeros((3, 2, 8, 8), np.float32), name="scan.nii.gz")
    with pytest.raises(UserError, match="2 spatial axes"):
        p.predict_array(np.zeros((3, 1, 8, 8, 8), np.float32))


def test_predict_file_writes_labels_in_the_input_geometry(saved, tmp_path):
    geometry = Geometry.default("nifti", (20, 18), 5, spacing=(1.5, 0.7), origin=(3, -2))
    src = write_image(saved["image"], geometry, tmp_path / "scan.nii.gz")[0]
    p = Predictor.from_checkpoint(saved["ck"], device="cpu")
    (out,) = p.predict_file(src, tmp_path / "seg.nii.gz")
    labels, g = read_label(out, 2)
    np.testing.assert_allclose(g.affine, geometry.affine)
    np.testing.assert_array_equal(labels, p.predict_array(saved["image"]))


def _copy_weights_and_state(src, dst):
    """A checkpoint assembled by hand from ``src``'s weights and state, as written before
    checksums were recorded (its config.json is the caller's)."""
    import json

    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    state = json.loads((src / "state.json").read_text())
    state.pop("checksums")
    (dst / "state.json").write_text(json.dumps(state))


def test_saved_run_errors_name_the_checkpoint(saved, tmp_path):
    import json

    bad = tmp_path / "bad"
    bad.mkdir()
    _copy_weights_and_state(saved["ck"], bad)
    (bad / "config.json").write_text(json.dumps({"model": {"name": "tiny"}}))
    with pytest.raises(CheckpointError, match="model_config: expected a mapping with the model"):
        Predictor.from_checkpoint(bad)
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'"):
        SavedRun.from_dict({**saved["run"].to_dict(), "train": {"stpes": 1}})


def test_bidirectional_time_margin_reaches_predict_sequence():
    """The saved (or overridden) predict.time_margin is what a bidirectional model runs with."""
    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=3,
                         channels=(4, 8), bidirectional=True).eval()
    cfg = Config.from_dict({"data": {"normalize": None}, "predict": {"chunk": 2,
                                                                    "time_margin": 1}})
    run = SavedRun(cfg, ModelSpec.of(model), {0: "background", 1: "a", 2: "b"})
    image = np.random.default_rng(1).normal(size=(7, 1, 12, 12)).astype(np.float32)
    x = torch.from_numpy(image)
    for margin, p in ((1, Predictor(model, run, device="cpu")),
                      (None, Predictor(model, run, device="cpu", time_margin=None)),
                      (3, Predictor(model, run, device="cpu", time_margin=3))):
        _, got = p.predict_array(image, return_probs=True)
        _, ref = predict_sequence(model, x, chunk=2, time_margin=margin or p.settings.time_margin,
                                  return_probs=True)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)
    _, whole = predict_sequence(model, x, chunk=2, return_probs=True)
    _, short = Predictor(model, run, device="cpu").predict_array(image, return_probs=True)
    assert not np.allclose(short, whole.numpy(), atol=1e-4)


def test_checkpoints_and_configs_of_earlier_versions_load(saved, tmp_path):
    """A checkpoint written before activation recomputation was called ``recompute`` (the
    model's ``checkpoint`` keyword, the config's ``train.activation_checkpointing``) loads,
    with the same weights and the switch under today's name."""
    import json

    old = tmp_path / "old"
    old.mkdir()
    _copy_weights_and_state(saved["ck"], old)
    doc = json.loads((saved["ck"] / "config.json").read_text())
    doc["model_config"]["checkpoint"] = doc["model_config"].pop("recompute")
    doc["model_config"]["checkpoint"] = True
    doc["train"]["activation_checkpointing"] = doc["train"].pop("recompute")
    doc["train"]["activation_checkpointing"] = True
    (old / "config.json").write_text(json.dumps(doc))
    p = Predictor.from_checkpoint(old, device="cpu")
    assert p.model.config["recompute"] is True and p.run.config.train.recompute is True
    assert p.run.model_spec.options["recompute"] is True
    new = Predictor.from_checkpoint(saved["ck"], device="cpu")
    np.testing.assert_array_equal(p.predict_array(saved["image"]),
                                  new.predict_array(saved["image"]))
    assert Config.from_dict({"train": {"activation_checkpointing": True}}).train.recompute
