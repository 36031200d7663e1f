"""Planning for anisotropic 3D+t data: strides/kernels through checkpoints, resampling around
prediction, the memory model, the plan and the train-time guard."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clstm4d import create_model
from clstm4d.data import write_synthetic_dataset
from clstm4d.engine.run.checkpoint import Checkpoint
from clstm4d.engine.run.config import Config
from clstm4d.engine.training.train import train

sys.path.insert(0, str(Path(__file__).parent))
from references import dice_reference  # noqa: E402


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
    ck = Checkpoint.open(res.checkpoint)
    model, run = ck.build_model(), ck.saved
    assert model.config["strides"] == strides
    assert model.config["kernel_sizes"] == [[3, 3, 1], [3, 3, 1], [3, 3, 3]]
    assert run.config.model.strides == strides  # the typed config keeps what was asked
    assert model.encoder[1].pool.kernel_size == (2, 2, 1)
    # the weights saved have the anisotropic shapes, and a rebuild from the saved config
    # computes the same function
    assert model.encoder[0].unit1.conv.weight.shape[2:] == (3, 3, 1)
    again = create_model(**model.config)
    ck.load_weights(again)
    x = torch.randn(1, 2, 1, 16, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model(x))
    assert np.isfinite(res.history[-1]["loss"])


class _Threshold(torch.nn.Module):
    """An oracle 'model': class 1 where the intensity is above 0.5; records the input shapes."""

    streamable, frames = True, None

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
    from clstm4d.engine.inference.predictor import Predictor
    from clstm4d.engine.run.config import ModelSpec, SavedRun

    image, label, g = _ball_image((40, 36, 9), (1.0, 1.0, 5.0), (19.0, 17.0, 21.0), 11.0)
    model = _Threshold()
    run = SavedRun(Config.from_dict({"data": {"spacing": [1.0], "normalize": None}}),
                   ModelSpec.from_dict(model.config))
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
        {"data": {"spacing": [2.0, 2.0, 2.0], "normalize": None}}),
        ModelSpec.from_dict(model.config)), device="cpu")
    pred = coarse.predict_array(image, g)
    assert model.seen[-1] == (20, 18, 22) and pred.shape == label.shape
    assert 2 * ((pred > 0) & (label > 0)).sum() / ((pred > 0).sum() + (label > 0).sum()) > 0.95
    # labels taken frame by frame (no sequence of probabilities on the input grid) are those
    # of the whole sequence's resampled probabilities
    labels, probs = coarse.predict_array(image, g, return_probs=True)
    assert probs.shape == (image.shape[0], 2, *label.shape[1:])
    np.testing.assert_array_equal(labels, pred)
    np.testing.assert_array_equal(probs.argmax(1), pred)
    # the switch: without data.spacing the model sees the input's own grid
    plain = Predictor(model, SavedRun(Config.from_dict({"data": {"normalize": None}}),
                                      ModelSpec.from_dict(model.config)), device="cpu")
    plain.predict_array(image, g)
    assert model.seen[-1] == (40, 36, 9)


def test_training_resamples_cases_to_data_spacing(tmp_path, monkeypatch):
    """data.spacing = 1 mm on (1, 1, 2) mm cases: the patches come from 16^3 volumes, the
    spacing is saved with the run, and validation predicts on each case's own grid."""
    import clstm4d.engine.training.train as train_mod

    seen = {}
    fit = train_mod.fit

    def spy(model, dataset, *args, **kwargs):
        seen["shape"] = dataset.case_data(0).image.shape
        seen["validate"] = kwargs["validate"](model)
        return fit(model, dataset, *args, **kwargs)

    monkeypatch.setattr(train_mod, "fit", spy)
    from clstm4d.data import load_case, load_datalist
    from clstm4d.engine.inference.predictor import Predictor

    data = write_synthetic_dataset(tmp_path / "data", cases=3, frames=3, size=16, spatial_dims=3,
                                   spacing=(1, 1, 2), validation=0.34)
    assert len(load_datalist(data).validation) == 1
    cfg = _train_cfg(data, tmp_path / "run")
    cfg.data.spacing = [1.0]
    cfg.data.roi = [8]
    res = train(cfg)
    assert seen["shape"] == (3, 1, 16, 16, 16)
    # validation predicted the case on its own (1, 1, 2) grid, as `predict` would
    case = load_case(load_datalist(data).validation[0])
    assert case.label.shape[1:] == (16, 16, 8)
    with torch.random.fork_rng():  # the weights at that moment: before training
        torch.manual_seed(cfg.train.seed)
        fresh = Checkpoint.open(res.checkpoint).saved.model_spec.build()
    pred = Predictor(fresh, Checkpoint.open(res.checkpoint).saved,
                     device="cpu").predict_array(case.image, case.geometry)
    assert seen["validate"]["val_dice"] == pytest.approx(dice_reference(pred, case.label, 3),
                                                         abs=1e-6)
    run = Checkpoint.open(res.checkpoint).saved
    assert run.config.data.spacing == [1.0]
    cfg.data.spacing = [1.0, 1.0]
    cfg.train.out = str(tmp_path / "run2")
    with pytest.raises(ValueError, match="data.spacing must be one positive number or 3"):
        train(cfg)


# ---------------------------------------------------------------------------------- memory

def _saved_bytes(model_config, roi, t, n, bf16=False):
    """What autograd keeps for backward in a forward + loss (new storages only, parameters
    excluded): an independent count of the memory model's activation term."""
    from clstm4d.engine.training.losses import SequenceLoss

    torch.manual_seed(0)
    model = create_model(**model_config).train()
    k = model.config["out_channels"]
    x = torch.randn(n, t, model.config["in_channels"], *roi)
    y = torch.randint(0, k, (n, t, *roi))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in params:
            seen.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        SequenceLoss()(logits, y)
    return sum(seen.values())


@pytest.mark.parametrize("model_config,roi,t,n,bf16", [
    ({"name": "tiny"}, (16, 16, 16), 3, 1, False),
    ({"name": "tiny"}, (16, 16, 16), 2, 2, True),  # CPU autocast: max_pool3d in float32
    ({"name": "small", "spatial_dims": 2, "temporal": "skips", "cell": "gru",
      "out_channels": 3}, (40, 36), 3, 2, False),  # odd sizes: padded to 8
    ({"name": "small", "spatial_dims": 2, "channels": [32, 64]}, (24, 24), 2, 1, False),
    ({"name": "small", "spatial_dims": 2, "temporal": "skips"}, (32, 32), 3, 2, True),
    ({"name": "tiny", "bidirectional": True, "strides": [[2, 2, 1], 2],
      "kernel_sizes": [[3, 3, 1], 3, 3]}, (16, 16, 8), 3, 1, False),
    ({"name": "tac-tiny", "spatial_dims": 2, "frames": 4}, (32, 32), 4, 2, False),
    ({"name": "tiny", "spatial_dims": 2, "cell": "attention", "bank": 2}, (32, 32), 6, 1,
     False),  # memory attention: keys of at most bank + 1 frames per query frame
    ({"name": "tiny", "spatial_dims": 2, "temporal": "skips", "cell": "attention"}, (32, 32),
     4, 2, True),  # pooled memory above the bottleneck, bf16
    ({"name": "tiny", "cell": "attention", "bank": 3}, (16, 16, 16), 5, 1, False),
    ({"name": "tiny", "spatial_dims": 2, "norm": "batch"}, (32, 32), 3, 2, False),
    ({"name": "tiny", "spatial_dims": 2, "norm": "none", "dropout": 0.2}, (32, 32), 3, 2,
     False),
])
def test_memory_model_counts_what_autograd_saves(model_config, roi, t, n, bf16):
    from clstm4d.engine.planning.memory import memory_breakdown

    est = memory_breakdown(model_config, roi, t, n, "bf16" if bf16 else "fp32", device="cpu")
    saved = _saved_bytes(model_config, roi, t, n, bf16)
    assert est.activations == pytest.approx(saved, rel=0.05)


# ---------------------------------------------------------------------------------- the plan

@pytest.fixture(scope="module")
def thick_slices(tmp_path_factory):
    """Synthetic 3D+t cases with 1 x 1 x 5 mm voxels (5 mm along the last array axis)."""
    root = tmp_path_factory.mktemp("thick")
    return write_synthetic_dataset(root, cases=3, frames=4, size=40, spatial_dims=3,
                                   spacing=(1, 1, 5), validation=0.0)


def test_plan_for_thick_slices_keeps_z_unpooled_and_trains_as_is(thick_slices, tmp_path):
    import json

    from clstm4d.engine.apps.plan import run_plan
    from clstm4d.engine.planning.planner import MARGIN
    from clstm4d.engine.run.config import load_config

    plan, written = run_plan(memory="1GB", datalist=str(thick_slices), model="tiny",
                             out=tmp_path / "plan.yaml", device="cpu", max_batch=2)
    assert plan.step_seconds > 0 and "calibrated on the real step and data" in plan.table()
    assert plan.run_seconds > 200 * plan.step_seconds - 1e-9  # the default train.steps
    assert [p.name for p in written] == ["plan.yaml", "fingerprint.json"]
    assert plan.spacing == [1.0, 1.0, 5.0] and "percentile" in plan.spacing_rule
    assert plan.strides[0] == [2, 2, 1]  # z is 5x coarser: not pooled at level 0
    assert plan.kernel_sizes[0] == [3, 3, 1]  # ... and not convolved while coarse
    assert plan.predicted <= (1 - MARGIN) * 2**30
    assert plan.memory["runtime"] > 0 and plan.memory["data"] > 0  # the process, not a step
    fp = json.loads((tmp_path / "fingerprint.json").read_text())
    assert [c["shape"] for c in fp["cases"]] == [[40, 40, 8]] * 3
    assert fp["cases"][0]["frames"] == 4 and fp["cases"][0]["spacing"] == [1.0, 1.0, 5.0]
    assert set(fp["cases"][0]["class_voxels"]) == {"0", "1", "2"}
    assert fp["cases"][0]["intensity"]["channels"][0]["foreground"]["mean"] > \
        fp["cases"][0]["intensity"]["channels"][0]["all"]["mean"]
    # the written config is what train reads, as is
    cfg = load_config(tmp_path / "plan.yaml", ["train.steps=1", f"train.out={tmp_path / 'r'}",
                                               "train.progress=false"])
    assert cfg.model.strides == plan.strides and cfg.data.roi == plan.roi
    res = train(cfg)
    model = Checkpoint.open(res.checkpoint).build_model()
    assert model.config["strides"] == plan.strides


def test_plan_order_roi_then_window_then_batch():
    from clstm4d.engine.planning.memory import estimate_memory
    from clstm4d.engine.planning.planner import MARGIN, make_plan

    big = make_plan(8 * 2**30, model="tiny", median_shape=[48, 48, 48], median_frames=12,
                    device="cpu", runtime=0)
    assert big.roi == [48, 48, 48] and big.window == 12 and big.batch > 1  # everything fits
    small = make_plan(300 * 2**20, model="tiny", median_shape=[96, 96, 96], median_frames=12,
                      device="cpu", runtime=0)
    assert small.window == 4 and small.batch == 1 and max(small.roi) < 96  # roi first
    assert small.predicted <= (1 - MARGIN) * 300 * 2**20
    larger = [r + 8 for r in small.roi]
    assert estimate_memory(small.model_config(), larger, 4, 1, "fp32", small.recompute,
                           device="cpu") > (1 - MARGIN) * 300 * 2**20


def test_memory_attention_costs_grow_with_its_bank_and_window_not_beyond():
    """The cost model counts the attention's keys of at most bank + 1 frames per frame: its
    memory and work grow with the bank, and with the window only linearly once the window
    is longer than the bank."""
    from clstm4d.engine.planning.memory import estimate_memory, step_macs

    def cost(bank, window):
        cfg = {"name": "tiny", "spatial_dims": 2, "cell": "attention", "bank": bank}
        return (estimate_memory(cfg, (64, 64), window, 2, device="cpu"),
                step_macs(cfg, (64, 64), window, 2))

    for i in range(2):  # memory, work
        assert cost(2, 8)[i] < cost(4, 8)[i] < cost(8, 8)[i]
        # once the bank is full every frame attends over bank + 1 frames: equal increments
        step = cost(2, 16)[i] - cost(2, 8)[i]
        assert cost(2, 24)[i] - cost(2, 16)[i] == pytest.approx(step, rel=1e-3)
        # ... while a bank of 8 still fills during the first 8 frames: the next 8 cost more
        assert cost(8, 16)[i] - cost(8, 8)[i] > (cost(8, 8)[i] - cost(8, 1)[i]) * 8 / 7


def test_plan_errors_name_what_is_wrong(tmp_path, capsys):
    from clstm4d.cli import main

    out = ["--out", str(tmp_path / "p.yaml"), "--no-time", "--device", "cpu"]
    assert main(["plan", "--shape", "8,64,64,64", "--memory", "lots", *out]) == 2
    assert "memory must look like 24GB" in capsys.readouterr().err
    assert main(["plan", "--shape", "8,64,64,64", "--memory", "2MB", *out]) == 2
    err = capsys.readouterr().err
    assert "is too small: the smallest plan" in err and "needs about" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["plan", "--shape", "8", "--memory", "1GB", *out]) == 2
    assert "--shape must be T,D,H,W" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()
    # planning for a GPU this machine does not have: a model estimate, no device needed
    assert main(["plan", "--shape", "8,96,96,96", "--memory", "12GB", "--model", "small",
                 "--out", str(tmp_path / "p.yaml"), "--no-time", "--device", "cuda"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"roi \(patch\) +96 x 96 x 96\n", text) and "window   8" in text
    assert (tmp_path / "p.yaml").exists()


def test_fingerprint_refuses_cases_that_disagree_in_channels(tmp_path):
    from clstm4d.data import Geometry, save_datalist, write_image, write_label
    from clstm4d.engine.planning.fingerprint import fingerprint
    from clstm4d.errors import UserError

    entries = []
    for name, c in (("a", 1), ("b", 2)):
        g = Geometry.default("nifti", (8, 8, 4), frames=2, channels=c)
        image = write_image(np.zeros((2, c, 8, 8, 4), np.float32), g,
                            tmp_path / f"{name}.nii.gz")[0]
        label = write_label(np.zeros((2, 8, 8, 4), np.int64), g, tmp_path / f"{name}_l.nii.gz")
        entries.append({"image": str(image), "label": str(label[0]), "name": name})
    dl = save_datalist(tmp_path / "dl.json", training=entries)
    with pytest.raises(UserError, match="case 'b' has 2 channels per frame, case 'a' has 1"):
        fingerprint(dl)


def test_edited_plans_that_cannot_train_name_the_key(aniso_data, tmp_path):
    from clstm4d.errors import ConfigError

    cfg = _train_cfg(aniso_data, tmp_path / "a", strides=[[2, 2, 1]])  # tiny: 2 poolings
    with pytest.raises(ConfigError, match="strides must be a sequence of 2 entries"):
        train(cfg)
    # roi z = 8: pooled to 4, then pooled again from 4
    cfg = _train_cfg(aniso_data, tmp_path / "b", strides=[[2, 2, 2], [2, 2, 2]])
    with pytest.raises(ConfigError, match=r"model.strides\[1\] pools axis 2 by 2, but the "
                                          r"patch \[16, 16, 8\] is down to 4 voxels"):
        train(cfg)


def test_guard_stops_an_over_budget_run_and_force_overrides(aniso_data, tmp_path, monkeypatch):
    import json

    from clstm4d.engine.training import guard
    from clstm4d.errors import UserError

    monkeypatch.setattr(guard, "available_memory", lambda device: 5 * 2**20)
    monkeypatch.setattr(guard, "process_memory", lambda device, peak=True: 0)
    cfg = _train_cfg(aniso_data, tmp_path / "run")
    with pytest.raises(UserError, match=r"this run would not fit: .*roi 16 x 16 x 8, window 3, "
                                        r"batch 1.*needs about [\d.]+ [MG]iB \(runtime \d+ \+ "
                                        r"data \d+ \+ step \d+ MiB\), and cpu has 5 MiB; run "
                                        r"`clstm4d plan .*--memory 5MiB`"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing started
    res = train(cfg, force=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 1 and first["peak_mb"] > 0 and first["predicted_peak_mb"] > 0
    assert last["step"] == 2 and last["peak_mb"] >= first["peak_mb"]  # the whole run's peak
    state = json.loads((res.checkpoint / "state.json").read_text())
    assert state["extra"]["predicted_peak_mb"] == first["predicted_peak_mb"]
    assert state["extra"]["peak_mb"] == last["peak_mb"]


def test_guard_refuses_a_plan_edited_beyond_its_budget(aniso_data, tmp_path):
    from clstm4d.errors import UserError

    cfg = _train_cfg(aniso_data, tmp_path / "run")
    cfg.train.memory = "300MB"  # what `plan` wrote; the batch was then edited up by hand
    cfg.data.batch_size = 64
    with pytest.raises(UserError, match=r"this run would not fit: .* batch 64, .*needs about "
                                        r"[\d.]+ [GM]iB \(runtime .*\), and its budget "
                                        r"\(train.memory\) has 300 MiB"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()



def test_guard_predicts_with_the_constants_the_plan_measured(aniso_data, tmp_path):
    """``train.memory_model`` (what a CUDA plan measured) is what the guard predicts with, on
    a device of the type it was measured on; another type's constants are not used."""
    from clstm4d.errors import UserError

    cfg = _train_cfg(aniso_data, tmp_path / "run")
    cfg.train.memory = "4000MB"
    cfg.train.memory_model = {"device": "cuda", "runtime_mb": 1.0, "step_scale": 1000.0,
                              "validation_scale": 1.0}
    cfg.train.steps = 1
    train(cfg)  # measured on a GPU: the CPU run keeps the CPU constants (and fits)
    cfg = _train_cfg(aniso_data, tmp_path / "run2")
    cfg.train.memory = "4000MB"
    cfg.train.memory_model = {"device": "cpu", "runtime_mb": 1.0, "step_scale": 1000.0,
                              "validation_scale": 1.0}
    with pytest.raises(UserError, match=r"this run would not fit: .*needs about [\d.]+ GiB "
                                        r"\(runtime 1 \+ .*step \d+ MiB\), and its "
                                        r"budget \(train.memory\) has 3.91 GiB"):
        train(cfg)
