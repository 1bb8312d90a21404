"""Every metric on hand-computed masks, cross-checked against smp.metrics."""

import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from brainseg_lib.metrics import (
    ConfusionCounts,
    batch_pooled_iou,
    bootstrap_ci,
    fg_bg_miou,
    hd95,
    per_image_dice,
    per_image_iou,
    pooled_background_iou,
    pooled_dice,
    pooled_iou,
    pooled_precision,
    pooled_recall,
    summarise,
)


def masks():
    """Three 4x4 images. 0: truth 4 px, prediction 6 px, 4 shared -> IoU 4/6, Dice 8/10.
    1: both empty. 2: truth 2 px, prediction empty -> IoU 0."""
    target = np.zeros((3, 4, 4), np.uint8)
    pred = np.zeros((3, 4, 4), np.uint8)
    target[0, :2, :2] = 1
    pred[0, :2, :3] = 1
    target[2, 3, :2] = 1
    return pred, target


def test_counts_by_hand():
    c = ConfusionCounts.from_masks(*masks())
    assert c.tp.tolist() == [4, 0, 0] and c.fp.tolist() == [2, 0, 0]
    assert c.fn.tolist() == [0, 0, 2] and c.tn.tolist() == [10, 16, 14]


def test_per_image_scores_and_empty_policy():
    c = ConfusionCounts.from_masks(*masks())
    np.testing.assert_allclose(per_image_iou(c), [4 / 6, 1.0, 0.0])
    np.testing.assert_allclose(per_image_dice(c), [8 / 10, 1.0, 0.0])
    # empty truth with a non-empty prediction scores 0
    pred, target = np.zeros((1, 4, 4)), np.zeros((1, 4, 4))
    pred[0, 0, 0] = 1
    assert per_image_iou(ConfusionCounts.from_masks(pred, target))[0] == 0.0


def test_pooled_scores_by_hand():
    c = ConfusionCounts.from_masks(*masks())
    assert pooled_iou(c) == pytest.approx(4 / 8)            # tp 4, fp 2, fn 2
    assert pooled_dice(c) == pytest.approx(8 / 12)
    assert pooled_precision(c) == pytest.approx(4 / 6)
    assert pooled_recall(c) == pytest.approx(4 / 6)
    assert pooled_background_iou(c) == pytest.approx(40 / 44)  # tn 40
    assert fg_bg_miou(c) == pytest.approx((4 / 8 + 40 / 44) / 2)
    # batches of 2: images (0,1) pooled 4/6, image (2) pooled 0 -> mean 1/3
    assert batch_pooled_iou(c, 2) == pytest.approx((4 / 6 + 0) / 2)
    assert batch_pooled_iou(c, 3) == pytest.approx(pooled_iou(c))


def test_agrees_with_smp_metrics():
    rng = np.random.default_rng(0)
    target = (rng.random((6, 1, 16, 16)) > 0.8).astype(np.int64)
    pred = (rng.random((6, 1, 16, 16)) > 0.7).astype(np.int64)
    stats = smp.metrics.get_stats(torch.from_numpy(pred), torch.from_numpy(target),
                                  mode="binary")
    c = ConfusionCounts.from_masks(pred, target)
    assert pooled_iou(c) == pytest.approx(smp.metrics.iou_score(*stats, reduction="micro")
                                          .item())
    assert per_image_iou(c).mean() == pytest.approx(
        smp.metrics.iou_score(*stats, reduction="micro-imagewise").item())
    assert pooled_dice(c) == pytest.approx(smp.metrics.f1_score(*stats, reduction="micro")
                                           .item())
    assert pooled_recall(c) == pytest.approx(smp.metrics.recall(*stats, reduction="micro")
                                             .item())


def test_hd95_by_hand():
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    assert hd95(a, a) == 0.0
    shifted = np.roll(a, 3, axis=1)  # every surface point moves 3 px along x
    assert hd95(a, shifted) == pytest.approx(3.0)
    empty = np.zeros_like(a)
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(a, empty)) and math.isnan(hd95(empty, a))


def test_summary_leaves_undefined_hd95_out_and_counts_it():
    c = ConfusionCounts.from_masks(*masks())
    s = summarise(c, 2, np.array([1.0, 0.0, np.nan]))
    assert s["hd95"] == pytest.approx(0.5) and s["hd95_undefined_images"] == 1
    assert s["mean_image_iou"] == pytest.approx((4 / 6 + 1 + 0) / 3)


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    target = (rng.random((40, 16, 16)) > 0.8).astype(np.uint8)
    pred = target.copy()
    pred[rng.random(pred.shape) > 0.9] ^= 1
    c = ConfusionCounts.from_masks(pred, target)
    ci = bootstrap_ci(c, n_resamples=300, seed=0)
    for key, value in (("pooled_iou", pooled_iou(c)), ("mean_image_dice",
                                                        per_image_dice(c).mean())):
        low, high = ci[key]
        assert low < value < high and high - low < 0.2
