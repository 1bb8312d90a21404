"""Every metric on hand-computed masks, cross-checked against smp.metrics."""

import math
import warnings

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from brainseg_lib.metrics.functional import (
    ConfusionCounts,
    batch_pooled_iou,
    hd95,
    iou,
    per_image_dice,
    per_image_iou,
    pooled_dice,
    pooled_iou,
    summarise,
)
from brainseg_lib.metrics.intervals import bootstrap_ci


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
    assert summarise(c)["precision"] == pytest.approx(4 / 6)
    assert summarise(c)["recall"] == pytest.approx(4 / 6)
    assert iou(c.tn.sum(), c.fp.sum(), c.fn.sum()) == pytest.approx(40 / 44)  # background
    assert summarise(c)["fg_bg_miou"] == pytest.approx((4 / 8 + 40 / 44) / 2)
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
    assert summarise(c)["recall"] == pytest.approx(smp.metrics.recall(*stats, reduction="micro")
                                             .item())


def test_hd95_by_hand():
    a = np.zeros((20, 20), bool)
    a[5:10, 5:10] = True
    assert hd95(a, a) == 0.0
    shifted = np.roll(a, 3, axis=1)  # every surface point moves 3 px along x
    assert hd95(a, shifted) == pytest.approx(3.0)
    # One stray pixel 7 px from the box: 1 of the prediction's 17 surface pixels is 7 px
    # away, so its directed 95th percentile is 0.2 * 7 = 1.4 (linear interpolation between
    # the 16th and 17th sorted distances); truth-to-prediction is 0. MONAI takes the larger
    # directed figure, 1.4; pooling both directions (33 distances) would give 0.
    stray = a.copy()
    stray[7, 16] = True
    assert hd95(stray, a) == pytest.approx(1.4) and hd95(a, stray) == pytest.approx(1.4)
    empty = np.zeros_like(a)
    assert all(math.isnan(hd95(p, t)) for p, t in ((empty, empty), (a, empty), (empty, a)))


def _random_masks(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of the kinds a segmentation produces: boxes (the truth here), blobs with holes
    and specks, masks touching the border, single pixels, non-square images."""
    h, w = rng.integers(8, 48, size=2)
    out = []
    for _ in range(2):
        kind = rng.integers(4)
        m = np.zeros((h, w), bool)
        if kind == 0:      # a box, possibly clipped by the border
            y, x = rng.integers(-3, h), rng.integers(-3, w)
            m[max(y, 0):y + rng.integers(1, h), max(x, 0):x + rng.integers(1, w)] = True
        elif kind == 1:    # smoothed noise: irregular blobs, holes, several components
            from scipy import ndimage
            m = ndimage.gaussian_filter(rng.random((h, w)), 1.5) > 0.52
        elif kind == 2:    # scattered pixels
            m = rng.random((h, w)) > 0.97
        else:              # one pixel
            m[rng.integers(h), rng.integers(w)] = True
        out.append(m)
    return out[0], out[1]


def test_hd95_agrees_with_monai():
    monai_metrics = pytest.importorskip(
        "monai.metrics", reason="MONAI is a test-only dependency: pip install -e '.[dev]'")
    rng = np.random.default_rng(0)
    cases = [_random_masks(rng) for _ in range(150)]
    box = np.zeros((20, 30), bool)
    box[4:9, 6:20] = True
    cases += [(box, np.roll(box, 5, axis=0)), (box, box), (box, np.zeros_like(box)),
              (np.zeros_like(box), np.zeros_like(box))]
    compared = 0
    for pred, target in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about empty masks
            expected = float(monai_metrics.compute_hausdorff_distance(
                torch.as_tensor(pred)[None, None].float(),
                torch.as_tensor(target)[None, None].float(),
                include_background=True, percentile=95))
        ours = hd95(pred, target)
        if math.isnan(expected):
            assert math.isnan(ours), (pred.astype(int), target.astype(int))
        else:
            assert ours == pytest.approx(expected, rel=1e-5, abs=1e-5)
            compared += 1
    assert compared > 100  # most cases have a defined distance


def test_summary_leaves_undefined_hd95_out_and_counts_it():
    c = ConfusionCounts.from_masks(*masks())
    s = summarise(c, 2, np.array([1.0, 0.0, np.nan]))
    assert s["hd95"] == pytest.approx(0.5) and s["hd95_undefined_images"] == 1
    assert s["mean_image_iou"] == pytest.approx((4 / 6 + 1 + 0) / 3)


def _population(rng: np.random.Generator, n: int) -> ConfusionCounts:
    """Per-image counts like a fair model on small boxes: sizes vary ~10x between images."""
    area = rng.lognormal(6, 0.8, n).astype(np.int64) + 10
    tp = rng.binomial(area, rng.beta(8, 3, n))
    fp = rng.binomial(area, 0.15)
    return ConfusionCounts(tp, fp, area - tp, 65536 - area - fp)


def test_bootstrap_interval_covers_the_population_value_about_95_percent_of_the_time():
    """Draw many test sets of 100 images from a known population: the percentile CI of each
    must contain the population's pooled IoU and mean image Dice in roughly 95 % of them
    (a binomial 99.9 % band for 200 draws), and narrow like 1/sqrt(n)."""
    rng = np.random.default_rng(7)
    population = _population(rng, 200_000)
    truth = {"pooled_iou": pooled_iou(population),
             "mean_image_dice": float(per_image_dice(population).mean())}
    hits = dict.fromkeys(truth, 0)
    draws = 200
    for i in range(draws):
        sample = population.take(rng.integers(0, len(population), 100))
        ci = bootstrap_ci(sample, n_resamples=400, seed=i)
        for key, value in truth.items():
            hits[key] += ci[key][0] <= value <= ci[key][1]
    for key in truth:
        assert 0.88 <= hits[key] / draws <= 0.995, (key, hits[key])
    small = bootstrap_ci(population.take(np.arange(100)), n_resamples=400)["pooled_iou"]
    large = bootstrap_ci(population.take(np.arange(1600)), n_resamples=400)["pooled_iou"]
    ratio = (small[1] - small[0]) / (large[1] - large[0])
    assert 2.5 < ratio < 6  # sqrt(1600 / 100) = 4
