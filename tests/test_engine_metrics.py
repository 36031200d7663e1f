"""Metrics and loss against independent references (numpy formulas, hand-made cases)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clstm4d.engine.evaluation.evaluate import evaluate_sequence
from clstm4d.engine.evaluation.metrics import dice_per_frame, hd95_per_frame, temporal_consistency
from clstm4d.engine.training.losses import SequenceLoss


def test_dice_matches_numpy_formula():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (5, 9, 7))
    label = rng.integers(0, 3, (5, 9, 7))
    got = dice_per_frame(pred, label, 3).numpy()
    for t in range(5):
        for k in (1, 2):
            p, y = pred[t] == k, label[t] == k
            ref = 2 * (p & y).sum() / (p.sum() + y.sum())
            assert got[t, k - 1] == pytest.approx(ref, abs=1e-6)


def test_dice_absent_class_counts_as_perfect_and_3d_works():
    label = np.zeros((2, 4, 5, 6), np.int64)
    label[0, 1:3, 1:3, 1:3] = 1
    got = dice_per_frame(label, label, 3).numpy()
    np.testing.assert_allclose(got, 1.0)


def test_hd95_of_a_shifted_square_is_the_shift():
    label = np.zeros((1, 32, 32), np.int64)
    label[0, 8:20, 8:20] = 1
    pred = np.roll(label, 3, axis=2)
    assert hd95_per_frame(pred, label, 2)[0, 0].item() == pytest.approx(3.0)
    # physical units: spacing 2 along the shifted axis
    assert hd95_per_frame(pred, label, 2, spacing=(1.0, 2.0))[0, 0].item() == pytest.approx(6.0)
    # a class missing from the prediction has no distance
    assert np.isnan(hd95_per_frame(np.zeros_like(label), label, 2)[0, 0].item())


def test_temporal_consistency_on_known_sequences():
    label = np.zeros((4, 10, 10), np.int64)
    label[:, 2:6, 2:6] = 1  # constant volume 16
    same = temporal_consistency(label, label, 2)
    assert same["volume_roughness"] == [0.0] and same["volume_change_error"] == [0.0]
    assert same["consecutive_dice"] == [1.0]
    flicker = label.copy()
    flicker[2] = 0  # volumes 16, 16, 0, 16: |dV| = 0, 16, 16
    r = temporal_consistency(flicker, label, 2)
    mean_v = (16 * 3) / 4
    assert r["volume_roughness"][0] == pytest.approx((32 / 3) / mean_v)
    assert r["volume_change_error"][0] == pytest.approx((32 / 3) / 16)
    assert r["consecutive_dice"][0] == pytest.approx(1 / 3)


def test_evaluate_splits_degraded_frames():
    label = np.zeros((4, 8, 8), np.int64)
    label[:, 2:6, 2:6] = 1
    pred = label.copy()
    pred[3] = 0
    s = evaluate_sequence(pred, label, 2, degraded=[3], class_names={1: "lv"}).summary()
    assert s["dice_degraded"] == 0.0 and s["dice_clean"] == 1.0 and s["dice_lv"] == 0.75


def test_sequence_loss_ignores_padded_frames():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, 6, 6)
    label = torch.randint(0, 3, (2, 5, 6, 6))
    loss = SequenceLoss()
    lengths = torch.tensor([5, 3])
    masked = loss(logits, label, lengths)
    # reference: the real frames, folded into one batch, through MONAI directly
    from monai.losses import DiceCELoss

    x = torch.cat([logits[0], logits[1, :3]])
    y = torch.cat([label[0], label[1, :3]]).unsqueeze(1)
    ref = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)(x, y)
    assert masked.item() == pytest.approx(ref.item(), rel=1e-6)
    # garbage in the padded frames changes nothing
    logits2 = logits.clone()
    logits2[1, 3:] = 100.0
    assert loss(logits2, label, lengths).item() == pytest.approx(masked.item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        loss(logits, label[:, :4])
