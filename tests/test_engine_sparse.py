"""Training on sparse annotations: the loss sees only annotated frames and non-ignored
voxels, how it reduces over mixed windows, and whole runs whose unannotated frames differ."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clstm4d.data import CaseData, Geometry, PatchDataset
from clstm4d.engine.evaluation.metrics import dice_per_frame
from clstm4d.engine.run.config import TrainConfig
from clstm4d.engine.training.loop import fit
from clstm4d.engine.training.losses import SequenceLoss

sys.path.insert(0, str(Path(__file__).parent))
from engine_toys import ToyTemporalNet  # noqa: E402
from references import dice_reference  # noqa: E402


def _batch(n=2, t=5, k=3, shape=(6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, k, *shape, generator=g, dtype=torch.float64)
    label = torch.randint(0, k, (n, t, *shape), generator=g)
    return logits, label


def test_loss_equals_monai_dicece_on_the_annotated_frames():
    from monai.losses import DiceCELoss

    logits, label = _batch()
    labelled = torch.tensor([[True, False, False, True, False], [False, True, False, False,
                                                                 False]])
    got = SequenceLoss()(logits, label, labelled=labelled)
    x = torch.cat([logits[0, [0, 3]], logits[1, [1]]])
    y = torch.cat([label[0, [0, 3]], label[1, [1]]]).unsqueeze(1)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)(x, y)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    # padding and annotation masks combine: frame 3 of sequence 0 is padding here
    both = SequenceLoss()(logits, label, lengths=torch.tensor([3, 5]), labelled=labelled)
    ref2 = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)(
        torch.cat([logits[0, [0]], logits[1, [1]]]),
        torch.cat([label[0, [0]], label[1, [1]]]).unsqueeze(1))
    assert both.item() == pytest.approx(ref2.item(), rel=1e-10)


def test_unannotated_frames_cannot_change_loss_or_gradient():
    logits, label = _batch()
    labelled = torch.zeros(2, 5, dtype=torch.bool)
    labelled[0, 0] = labelled[1, 2] = True
    loss = SequenceLoss()
    a = logits.clone().requires_grad_()
    la = loss(a, label, labelled=labelled)
    la.backward()
    other_logits, other_label = logits.clone(), label.clone()
    other_logits[~labelled] = 1e4 * torch.randn_like(other_logits[~labelled])
    other_label[~labelled] = 2 - other_label[~labelled]
    b = other_logits.requires_grad_()
    lb = loss(b, other_label, labelled=labelled)
    lb.backward()
    assert torch.equal(la, lb)  # bitwise
    assert torch.equal(a.grad[labelled], b.grad[labelled])
    assert (a.grad[~labelled] == 0).all()
    none = loss(a, label, labelled=torch.zeros(2, 5, dtype=torch.bool))
    assert none.item() == 0 and none.requires_grad


def _reference_loss(logits, label, frames, ignore):
    """Dice (per frame and foreground class, smooth 1e-5) + CE over non-ignored voxels,
    written out in float64 numpy from the formulas."""
    dice, ce_sum, ce_n = [], 0.0, 0
    for n, t in frames:
        z = logits[n, t].numpy()  # (k, *s)
        y = label[n, t].numpy()
        keep = y != ignore
        p = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
        for c in range(1, z.shape[0]):
            pc, yc = p[c][keep], (y[keep] == c).astype(float)
            dice.append(1 - (2 * (pc * yc).sum() + 1e-5) / (pc.sum() + yc.sum() + 1e-5))
        logp = np.log(p)
        yk = y[keep]
        ce_sum += -logp.reshape(z.shape[0], -1)[:, keep.ravel()][yk, np.arange(yk.size)].sum()
        ce_n += yk.size
    return np.mean(dice) + ce_sum / ce_n


def test_ignore_voxels_are_excluded_from_loss_and_gradient():
    logits, label = _batch(k=3)
    ignore = 3
    label[0, 1, :2] = ignore
    label[1, :, 4:, 4:] = ignore
    labelled = torch.ones(2, 5, dtype=torch.bool)
    labelled[1, 4] = False
    loss = SequenceLoss(ignore_index=ignore)
    frames = [(n, t) for n in range(2) for t in range(5) if labelled[n, t]]
    x = logits.clone().requires_grad_()
    got = loss(x, label, labelled=labelled)
    assert got.item() == pytest.approx(_reference_loss(logits, label, frames, ignore), rel=1e-9)
    got.backward()
    assert (x.grad.movedim(2, -1)[label == ignore] == 0).all()  # no gradient at ignore voxels
    changed = logits.clone()
    changed.movedim(2, -1)[label == ignore] = 50.0
    assert torch.equal(loss(changed, label, labelled=labelled), got.detach())
    with pytest.raises(ValueError, match="ignore_index 2 is a predicted class"):
        SequenceLoss(ignore_index=2)(logits, label)


def test_reduction_weighs_every_annotated_frame_equally():
    """A window with 2 annotated frames and one with 1: the loss is the mean over the 3
    frames (each frame as its own sample), not the mean of the two windows' means."""
    logits, label = _batch(n=2, t=4, shape=(8, 8), seed=3)
    labelled = torch.tensor([[True, False, True, False], [False, True, False, False]])
    loss = SequenceLoss()
    mixed = loss(logits, label, labelled=labelled).item()
    frames = [(0, 0), (0, 2), (1, 1)]
    singles = loss(torch.stack([logits[n, t : t + 1] for n, t in frames]),
                   torch.stack([label[n, t : t + 1] for n, t in frames])).item()
    assert mixed == pytest.approx(singles, rel=1e-12)
    per_frame = [loss(logits[n, t][None, None], label[n, t][None, None]).item()
                 for n, t in frames]
    assert mixed == pytest.approx(np.mean(per_frame), rel=1e-9)  # equal sizes: plain mean
    window_means = np.mean([np.mean(per_frame[:2]), per_frame[2]])
    assert abs(mixed - window_means) > 1e-3  # the other reduction would differ measurably


def test_dice_per_frame_leaves_ignore_voxels_out():
    label = np.zeros((2, 8, 8), np.int64)
    label[:, 2:6, 2:6] = 1
    label[:, 0, :] = 9  # ignore row
    pred = np.where(label == 9, 1, label)  # predicted foreground where nobody annotated
    assert dice_per_frame(pred, label, 2, ignore_index=9).tolist() == [[1.0], [1.0]]
    assert dice_per_frame(pred, np.where(label == 9, 0, label), 2)[0, 0] < 0.9


# ------------------------------------------------------------------------------ whole runs

def _cfg(out, steps=4):
    return TrainConfig(out=str(out), steps=steps, lr=1e-2, warmup_steps=1, log_every=1,
                       progress=False, device="cpu", seed=0)


def _losses(out):
    return [json.loads(x)["loss"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _toy_cases(garbage_seed=None):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(3):
        image = rng.normal(size=(6, 1, 12, 12)).astype(np.float32)
        label = (image[:, 0] > 0.3).astype(np.int64)
        labelled = np.zeros(6, bool)
        labelled[[0, 3 + i % 2]] = True
        if garbage_seed is not None:  # what unannotated frames hold must not matter
            g = np.random.default_rng(garbage_seed)
            label[~labelled] = g.integers(0, 2, size=label[~labelled].shape)
        cases.append(CaseData(image, label, Geometry.default("nifti", (12, 12), 6), {},
                              f"c{i}", labelled))
    return cases


def test_fit_on_cases_differing_only_in_unannotated_frames_is_bitwise_identical(tmp_path):
    runs = {}
    for name, garbage in (("zeros", None), ("noise", 1), ("other", 2)):
        torch.manual_seed(0)
        model = ToyTemporalNet()
        ds = PatchDataset(_toy_cases(garbage), window=4, roi=8, foreground_prob=0.5,
                          augment=True, seed=0)
        fit(model, ds, _cfg(tmp_path / name), batch_size=2)
        runs[name] = (_losses(tmp_path / name), model.state_dict())
    assert runs["zeros"][0] == runs["noise"][0] == runs["other"][0]
    for k, v in runs["zeros"][1].items():
        assert torch.equal(v, runs["noise"][1][k]) and torch.equal(v, runs["other"][1][k])
    # control: changing an annotated frame does change the curve
    cases = _toy_cases()
    cases[0].label[3] = 1 - cases[0].label[3]  # in every window of case 0
    torch.manual_seed(0)
    fit(ToyTemporalNet(), PatchDataset(cases, window=4, roi=8, foreground_prob=0.5,
                                       augment=True, seed=0),
        _cfg(tmp_path / "control"), batch_size=2)
    assert _losses(tmp_path / "control") != runs["zeros"][0]


def _sparse_dataset(folder, fill):
    """Synthetic sequences on disk whose unannotated frames hold ``fill`` (a function of the
    true label), and a datalist with "labelled_frames"."""
    from clstm4d.data import make_synthetic_case, save_datalist, write_label

    folder.mkdir(parents=True)
    entries = []
    for i in range(3):
        case = make_synthetic_case((5, i), 6, 16, 2)
        geom = Geometry.default("nifti", case.geometry.spatial_shape, 6)
        from clstm4d.data import write_image

        write_image(case.image, geom, folder / f"c{i}.nii.gz")
        frames = [0, 3]
        label = case.label.copy()
        keep = np.zeros(6, bool)
        keep[frames] = True
        label[~keep] = fill(label[~keep])
        write_label(label, geom, folder / f"c{i}_seg.nii.gz")
        entries.append({"name": f"c{i}", "image": folder / f"c{i}.nii.gz",
                        "label": folder / f"c{i}_seg.nii.gz", "labelled_frames": frames})
    return save_datalist(folder / "datalist.json", training=entries[:2],
                         validation=entries[2:],
                         labels={0: "background", 1: "chamber", 2: "blob"}, spatial_dims=2)


def test_train_on_datalists_differing_only_in_unannotated_frames_is_bitwise_identical(
        tmp_path):
    pytest.importorskip("nibabel")
    from clstm4d.engine.run.config import Config
    from clstm4d.engine.training.train import train

    fills = {"truth": lambda x: x, "zeros": np.zeros_like,
             "noise": lambda x: np.random.default_rng(1).integers(0, 3, size=x.shape)}
    curves = {}
    for name, fill in fills.items():
        dl = _sparse_dataset(tmp_path / name / "data", fill)
        cfg = Config.from_dict({
            "model": {"name": "tiny", "channels": [4, 8]},
            "data": {"datalist": str(dl), "window": 4, "batch_size": 2},
            "train": {"out": str(tmp_path / name / "run"), "steps": 3, "log_every": 1,
                      "val_every": 3, "progress": False, "device": "cpu"}})
        res = train(cfg)
        curves[name] = [(r.get("loss"), r.get("val_dice")) for r in res.history]
    assert curves["truth"] == curves["zeros"] == curves["noise"]
    assert all(v is not None for _, v in curves["truth"][-1:])


def test_validation_scores_annotated_frames_only():
    from clstm4d.engine.inference.predictor import Predictor
    from clstm4d.engine.run.config import Config, ModelSpec, SavedRun
    from clstm4d.engine.training.validate import make_validator
    from clstm4d.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", spatial_dims=2, in_channels=1, out_channels=2,
                         channels=(4, 8))
    run = SavedRun(Config(), ModelSpec.of(model), {0: "background", 1: "cell", 2: "ignore"})
    cases = []
    for i, frames in enumerate([(0, 2), (1,)]):
        rng = np.random.default_rng(i)
        image = rng.random((4, 1, 16, 16)).astype(np.float32)
        label = (image[:, 0] > 0.5).astype(np.int64)
        label[:, :3] = 2  # ignore rows
        labelled = np.isin(np.arange(4), frames)
        label[~labelled] = 0
        cases.append(CaseData(image, label, Geometry.default("nifti", (16, 16), 4), {},
                              f"v{i}", labelled))
    run.config.model.out_channels = 2
    out = make_validator(run, cases, torch.device("cpu"))(model)
    predictor = Predictor(model, run, device="cpu", amp="none")
    ref = {}
    for c in cases:
        pred = predictor.predict_array(c.image)
        for f in np.flatnonzero(c.labelled):
            keep = c.label[f] != 2
            p, y = pred[f][keep] == 1, c.label[f][keep] == 1
            ref[(c.name, f)] = 2 * (p & y).sum() / max(p.sum() + y.sum(), 1)
    assert out["val_dice"] == pytest.approx(np.mean(list(ref.values())), abs=1e-6)
    assert out["val_dice_per_frame"][3] is None  # no validation case is annotated there
    assert out["val_dice_per_frame"][1] == pytest.approx(ref[("v1", 1)], abs=1e-6)


def test_ignore_class_end_to_end_is_not_predicted(tmp_path):
    """A datalist whose blobs are the "ignore" class: the model gets 2 outputs (background,
    chamber), training runs on the masked loss, predictions never hold the ignore value."""
    pytest.importorskip("nibabel")
    from clstm4d.data import load_case, load_datalist, save_datalist, write_synthetic_dataset
    from clstm4d.engine.inference.predictor import Predictor
    from clstm4d.engine.run.checkpoint import Checkpoint
    from clstm4d.engine.run.config import Config
    from clstm4d.engine.training.train import train

    src = load_datalist(write_synthetic_dataset(tmp_path / "data", cases=3, frames=5, size=16,
                                                validation=0.34))
    dl = save_datalist(tmp_path / "data" / "ignore.json", training=[
        {"image": c.image, "label": c.label} for c in src.training], validation=[
        {"image": c.image, "label": c.label} for c in src.validation],
        labels={0: "background", 1: "chamber", 2: "ignore"}, spatial_dims=2)
    assert load_datalist(dl).num_classes == 2
    cfg = Config.from_dict({
        "model": {"name": "tiny", "channels": [4, 8]},
        "data": {"datalist": str(dl), "window": 4, "batch_size": 2, "foreground_prob": 1.0},
        "train": {"out": str(tmp_path / "run"), "steps": 2, "progress": False,
                  "device": "cpu", "val_every": 2}})
    res = train(cfg)
    assert np.isfinite(res.history[-1]["loss"])
    ck = Checkpoint.open(res.checkpoint)
    model, run = ck.build_model(), ck.saved
    assert run.model_spec.out_channels == 2 and run.labels[2] == "ignore"
    case = load_case(load_datalist(dl).validation[0])
    assert (case.label == 2).any()
    pred = Predictor(model, run, device="cpu").predict_array(case.image)
    assert set(np.unique(pred).tolist()) <= {0, 1}
    # validation left the ignore voxels out, as the reference does
    assert res.history[-1]["val_dice"] == pytest.approx(
        dice_reference(pred, case.label, 2, ignore=2), abs=1e-6)


# ------------------------------------------------------------------------------ pseudo-labels

def _reference_pseudo(logits, label, lengths, labelled, threshold, ignore):
    """The pseudo-label term from its formula, voxel by voxel in float64 numpy."""
    z, total, count = logits.double().numpy(), 0.0, 0
    for n in range(z.shape[0]):
        for t in range(int(lengths[n])):
            for v in np.ndindex(*z.shape[3:]):
                if labelled[n, t] and label[(n, t, *v)] != ignore:
                    continue  # annotated voxel
                count += 1
                zv = z[(n, t, slice(None), *v)]
                p = np.exp(zv - zv.max()) / np.exp(zv - zv.max()).sum()
                if p.max() >= threshold:
                    total -= np.log(p[p.argmax()])
    return total / count


def test_pseudo_label_loss_matches_its_formula_and_skips_padding_and_annotations():
    from clstm4d.engine.training.losses import PseudoLabelLoss

    logits, label = _batch(n=2, t=4, k=3, shape=(3, 5), seed=4)
    logits = 3 * logits  # a spread of confidences around the threshold
    ignore = 3
    label[0, 0, 0] = ignore  # an annotated frame's ignore voxels count as unannotated
    labelled = torch.tensor([[True, False, True, False], [False, True, False, True]])
    lengths = torch.tensor([4, 3])  # frame 3 of sequence 1 is padding (and "labelled")
    loss = PseudoLabelLoss(0.8, ignore_index=ignore)
    x = logits.clone().requires_grad_()
    got = loss(x, label, lengths, labelled)
    ref = _reference_pseudo(logits, label, lengths, labelled, 0.8, ignore)
    assert got.item() == pytest.approx(ref, rel=1e-12)
    got.backward()
    assert (x.grad[1, 3] == 0).all()  # padding
    assert (x.grad[0, 2] == 0).all()  # annotated, no ignore voxel
    assert (x.grad[0, 0].movedim(0, -1)[label[0, 0] != ignore] == 0).all()
    assert (x.grad[0, 1] != 0).any()  # unannotated frames do get a gradient
    # padding frames and annotated voxels cannot change it; nor unannotated frames' labels
    other_logits, other_label = logits.clone(), label.clone()
    other_logits[1, 3] = 1e3 * torch.randn_like(other_logits[1, 3])
    other_label[~labelled] = (other_label[~labelled] + 1) % 4  # incl. ignore values
    other_label[1, 3] = ignore
    assert torch.equal(loss(other_logits, other_label, lengths, labelled), got.detach())
    # threshold bounds, and nothing unannotated -> an attached 0
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="threshold must be in"):
            PseudoLabelLoss(bad)
    none = PseudoLabelLoss(0.5)(x, label)
    assert none.item() == 0 and none.requires_grad


def test_fit_with_pseudo_labels_off_is_todays_run_and_on_ignores_unannotated_content(
        tmp_path):
    def run(name, garbage=None, **keys):
        torch.manual_seed(0)
        model = ToyTemporalNet()
        ds = PatchDataset(_toy_cases(garbage), window=4, roi=8, foreground_prob=0.5,
                          augment=True, seed=0)
        cfg = _cfg(tmp_path / name, steps=3)
        for k, v in keys.items():
            setattr(cfg, k, v)
        fit(model, ds, cfg, batch_size=2)
        return _losses(tmp_path / name)

    default = run("default")
    # weight 0: the term is not computed at all, whatever its other settings
    assert run("off", unlabelled_weight=0.0, unlabelled_threshold=0.5,
               unlabelled_rampup=0.0) == default
    on = {"unlabelled_weight": 1.0, "unlabelled_threshold": 0.5, "unlabelled_rampup": 0.0}
    with_term = run("on", **on)
    assert with_term != default  # the term is active
    assert run("on_noise", garbage=1, **on) == with_term  # bitwise, as without the term


def test_pseudo_label_config_keys_are_checked():
    from clstm4d.engine.run.config import Config
    from clstm4d.errors import ConfigError

    assert Config().train.unlabelled_weight == 0.0  # off by default
    for item in ("train.unlabelled_weight=-0.1", "train.unlabelled_threshold=0",
                 "train.unlabelled_threshold=1", "train.unlabelled_threshold=1.2",
                 "train.unlabelled_rampup=1.5", "train.unlabelled_weight=high"):
        key = item.split("=")[0]
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Config.from_dict(None, overrides=[item])
