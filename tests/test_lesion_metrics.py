"""Lesion-wise metrics (BraTS 2023 rule, panoptic quality) on masks worked out by hand and
against panoptica; pixel calibration (ECE, Brier, temperature) on synthetic predictors.
Pure numpy: no torch."""

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from brainseg_lib.metrics.calibration import (
    apply_temperature,
    calibration_tallies,
    fit_temperature,
    reliability_bins,
    summarise_calibration,
    take_images,
)
from brainseg_lib.metrics.functional import hd95
from brainseg_lib.metrics.intervals import (
    calibration_bootstrap_ci,
    lesion_bootstrap_ci,
    paired_lesion_bootstrap,
)
from brainseg_lib.metrics.lesion import (
    CONNECTIVITY,
    image_lesions,
    lesion_table,
    summarise_lesions,
    worst_cases,
)

SIZE = 20
DIAGONAL = math.hypot(SIZE, SIZE)  # the HD95 penalty of a missed lesion or FP component


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """A filled box, rows y0..y1 and columns x0..x1 inclusive."""
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y1 + 1, x0:x1 + 1] = True
    return m


LESION = box(2, 5, 2, 5)  # 16 px
SECOND = box(2, 5, 8, 11)  # 16 px, same rows, 2 columns of gap


def test_one_lesion_found():
    pred = box(2, 5, 3, 6)  # shifted one column: 12 px shared of 16 + 16
    r = image_lesions([LESION], pred)
    assert (r.lesions, r.detected, r.fp_components) == (1, 1, 0)
    assert r.lesion_dice == pytest.approx(2 * 12 / 32)
    assert r.lesion_hd95 == pytest.approx(hd95(pred, LESION))
    assert (r.pq_tp, r.pq_fp, r.pq_fn) == (1, 0, 0) and r.pq_iou_sum == pytest.approx(12 / 20)


def test_one_lesion_missed_scores_zero_and_the_diagonal():
    r = image_lesions([LESION], np.zeros((SIZE, SIZE), bool))
    assert (r.lesions, r.detected, r.fp_components) == (1, 0, 0)
    assert r.lesion_dice == 0 and r.lesion_hd95 == pytest.approx(DIAGONAL)
    assert (r.pq_tp, r.pq_fp, r.pq_fn) == (0, 0, 1)


def test_a_false_component_beside_a_found_lesion_halves_the_image_score():
    r = image_lesions([LESION], LESION | box(15, 16, 15, 16))
    assert (r.lesions, r.detected, r.fp_components) == (1, 1, 1)
    assert r.lesion_dice == pytest.approx((1 + 0) / 2)  # lesion Dice 1, FP component 0
    assert r.lesion_hd95 == pytest.approx((0 + DIAGONAL) / 2)
    assert (r.pq_tp, r.pq_fp, r.pq_fn) == (1, 1, 0)


def test_two_true_lesions_merged_by_one_prediction():
    merged = box(2, 5, 2, 11)  # 40 px covering both lesions and the gap
    r = image_lesions([LESION, SECOND], merged)
    # both lesions match the one component: Dice 2*16 / (16 + 40) each, no false positive
    assert (r.lesions, r.detected, r.fp_components) == (2, 2, 0)
    assert r.per_lesion_dice == pytest.approx((32 / 56, 32 / 56))
    assert r.lesion_dice == pytest.approx(32 / 56)
    # panoptic: IoU 16/40 = 0.4 < 0.5 with each, so one FP component and two missed lesions
    assert (r.pq_tp, r.pq_fp, r.pq_fn) == (0, 1, 2)


def test_the_dilation_decides_what_counts_as_a_false_positive():
    near = image_lesions([LESION], box(2, 5, 8, 9))  # 2 px of gap: inside 3 dilations
    far = image_lesions([LESION], box(2, 5, 9, 10))  # 3 px of gap: outside
    assert (near.detected, near.fp_components, near.lesion_dice) == (1, 0, 0.0)
    assert (far.detected, far.fp_components, far.lesion_dice) == (0, 1, 0.0)
    assert far.lesion_hd95 == pytest.approx(DIAGONAL)  # (missed + FP) / 2 penalties


def test_empty_image_with_nothing_predicted_is_perfect():
    r = image_lesions(np.zeros((0, SIZE, SIZE), bool), np.zeros((SIZE, SIZE), bool))
    assert (r.lesions, r.fp_components, r.lesion_dice, r.lesion_hd95) == (0, 0, 1.0, 0.0)


def hand_split():
    """Four images: found (Dice 3/4, IoU 0.6), missed, an FP on an image with no lesion,
    two lesions merged by one prediction."""
    empty = np.zeros((SIZE, SIZE), bool)
    return [image_lesions([LESION], box(2, 5, 3, 6)), image_lesions([LESION], empty),
            image_lesions(np.zeros((0, SIZE, SIZE), bool), box(10, 12, 10, 12)),
            image_lesions([LESION, SECOND], box(2, 5, 2, 11))]


def test_split_figures_by_hand():
    s = summarise_lesions(lesion_table(hand_split()))
    assert s["true_lesions"] == 4
    assert s["lesion_sensitivity"] == pytest.approx(3 / 4)
    assert s["fp_components_per_image"] == pytest.approx(1 / 4)
    assert s["lesion_dice"] == pytest.approx((0.75 + 0 + 0 + 32 / 56) / 4)
    # PQ pooled: TP 1 (IoU 0.6), FP 0+0+1+1, FN 0+1+0+2
    assert s["rq"] == pytest.approx(1 / (1 + (2 + 3) / 2))
    assert s["sq"] == pytest.approx(0.6)
    assert s["pq"] == pytest.approx(0.6 / 3.5)


def test_lesion_intervals_hold_the_estimate_and_a_run_against_itself_differs_by_zero():
    rng = np.random.default_rng(0)
    images = [random_case(rng) for _ in range(30)]
    table = lesion_table([image_lesions(t, p) for t, p in images])
    point = summarise_lesions(table)
    ci = lesion_bootstrap_ci(table, n_resamples=200)
    for key, (low, high) in ci.items():
        assert low <= point[key] + 1e-9 and point[key] <= high + 1e-9, key
    diff = paired_lesion_bootstrap(table, table, n_resamples=200)
    assert all(v == (0.0, 0.0, 0.0) for v in diff.values())


def random_case(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Up to three disjoint true boxes; a prediction of shifted, resized copies of most of
    them and up to one small false alarm."""
    truth, taken = [], np.zeros((size, size), bool)
    for _ in range(rng.integers(0, 4)):
        y, x = rng.integers(0, size - 12, 2)
        h, w = rng.integers(3, 12, 2)
        m = np.zeros((size, size), bool)
        m[y:y + h, x:x + w] = True
        if not (m & taken).any():
            truth.append(m)
            taken |= m
    pred = np.zeros((size, size), bool)
    for t in truth:
        if rng.random() < 0.7:
            ys, xs = np.nonzero(t)
            dy, dx = rng.integers(-2, 3, 2)
            pred[max(ys.min() + dy, 0):ys.max() + dy + rng.integers(0, 3),
                 max(xs.min() + dx, 0):xs.max() + dx + rng.integers(0, 3)] = True
    for _ in range(rng.integers(0, 2)):
        y, x = rng.integers(0, size - 5, 2)
        pred[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
    return np.array(truth).reshape(-1, size, size), pred


# panoptica 2.1.7 on the 40 cases of random_case(default_rng(18)): TP, FP, FN, RQ, SQ, PQ per
# image (Panoptica_Evaluator, UNMATCHED_INSTANCE input of the 8-connected components,
# NaiveThresholdMatching(IOU, 0.5)). panoptica pins numpy < 2.3 and pandas < 3, below this
# project's pins, so it cannot be a dependency: these are its outputs, run in a separate venv.
PANOPTICA = json.loads("""[[1, 2, 2, 0.333333, 0.666667, 0.222222], [0, 1, 1, 0.0, 0.0, 0.0],
[0, 1, 0, 0.0, 0.0, 0.0], [2, 1, 1, 0.666667, 0.522854, 0.348569], [0, 1, 2, 0.0, 0.0, 0.0],
[1, 1, 0, 0.666667, 0.64, 0.426667], [0, 2, 1, 0.0, 0.0, 0.0], [0, 1, 1, 0.0, 0.0, 0.0],
[1, 0, 0, 1.0, 0.666667, 0.666667], [0, 1, 1, 0.0, 0.0, 0.0], [0, 2, 2, 0.0, 0.0, 0.0],
[0, 0, 0, NaN, 0.0, 0.0], [0, 1, 0, 0.0, 0.0, 0.0], [2, 0, 0, 1.0, 0.638822, 0.638822],
[1, 1, 2, 0.4, 0.75, 0.3], [0, 2, 1, 0.0, 0.0, 0.0], [0, 1, 0, 0.0, 0.0, 0.0],
[0, 0, 0, NaN, 0.0, 0.0], [0, 0, 0, NaN, 0.0, 0.0], [2, 1, 1, 0.666667, 0.734127, 0.489418],
[0, 2, 1, 0.0, 0.0, 0.0], [0, 1, 2, 0.0, 0.0, 0.0], [1, 2, 1, 0.4, 0.628571, 0.251429],
[0, 1, 0, 0.0, 0.0, 0.0], [0, 1, 1, 0.0, 0.0, 0.0], [1, 0, 1, 0.666667, 0.875, 0.583333],
[0, 0, 2, 0.0, 0.0, 0.0], [0, 2, 1, 0.0, 0.0, 0.0], [1, 1, 1, 0.5, 0.797468, 0.398734],
[0, 0, 1, 0.0, 0.0, 0.0], [0, 0, 0, NaN, 0.0, 0.0], [0, 1, 1, 0.0, 0.0, 0.0],
[0, 2, 1, 0.0, 0.0, 0.0], [0, 0, 0, NaN, 0.0, 0.0], [0, 1, 0, 0.0, 0.0, 0.0],
[1, 1, 0, 0.666667, 0.666667, 0.444444], [2, 0, 0, 1.0, 0.537084, 0.537084],
[0, 2, 1, 0.0, 0.0, 0.0], [0, 1, 0, 0.0, 0.0, 0.0], [0, 1, 2, 0.0, 0.0, 0.0]]""")


def _per_image_pq(r) -> list[float]:
    den = r.pq_tp + (r.pq_fp + r.pq_fn) / 2
    rq = r.pq_tp / den if den else math.nan
    sq = r.pq_iou_sum / r.pq_tp if r.pq_tp else 0.0
    return [r.pq_tp, r.pq_fp, r.pq_fn, rq, sq, rq * sq if r.pq_tp else 0.0]


def test_panoptic_quality_agrees_with_panoptica_recorded():
    rng = np.random.default_rng(18)
    for n, expected in enumerate(PANOPTICA):
        ours = _per_image_pq(image_lesions(*random_case(rng)))
        assert ours[:3] == expected[:3], n
        np.testing.assert_allclose(ours[3:], expected[3:], atol=1e-6, err_msg=str(n))


def test_panoptic_quality_agrees_with_panoptica_live():
    panoptica = pytest.importorskip(
        "panoptica", reason="panoptica needs numpy < 2.3 and pandas < 3 (this project pins "
                            "newer); its recorded outputs are checked above")
    from panoptica.metrics import Metric

    evaluator = panoptica.Panoptica_Evaluator(
        expected_input=panoptica.InputType.UNMATCHED_INSTANCE,
        instance_matcher=panoptica.NaiveThresholdMatching(Metric.IOU, 0.5))
    rng = np.random.default_rng(18)
    for _ in range(40):
        truth, pred = random_case(rng)
        ref = np.zeros(pred.shape, np.uint8)
        for k, t in enumerate(truth):
            ref[t] = k + 1
        comps = ndimage.label(pred, structure=CONNECTIVITY)[0].astype(np.uint8)
        res = evaluator.evaluate(comps, ref, verbose=False)
        r = next(iter(res.values())) if isinstance(res, dict) else res
        ours = image_lesions(truth, pred)
        assert (ours.pq_tp, ours.pq_fp, ours.pq_fn) == (r.tp, r.fp, r.fn)


# --- calibration

def test_brier_and_ece_by_hand():
    probs = np.array([[[0.05, 0.95], [0.95, 0.45]]])  # bins 0, 14, 14, 6 of 15
    labels = np.array([[[0, 1], [0, 1]]])
    s = summarise_calibration(calibration_tallies(probs, labels))
    assert s["brier"] == pytest.approx((0.05**2 + 0.05**2 + 0.95**2 + 0.55**2) / 4)
    # bin 0: |0.05 - 0|; bin 14: 2 px, |0.95 - 0.5|; bin 6: |0.45 - 1|; weighted by pixels
    assert s["ece"] == pytest.approx((0.05 + 2 * 0.45 + 0.55) / 4)
    bins = reliability_bins(calibration_tallies(probs, labels))
    assert bins["pixels"][14] == 2 and bins["observed_frequency"][14] == 0.5


def synthetic(rng: np.random.Generator, sharpen: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn with the true probability; reported probabilities are the true ones with
    their logits multiplied by ``sharpen`` (1: perfectly calibrated, > 1: over-confident)."""
    true_p = rng.uniform(0.001, 0.999, (60, 32, 32))
    labels = (rng.random(true_p.shape) < true_p).astype(np.uint8)
    logit = np.log(true_p / (1 - true_p))
    return (1 / (1 + np.exp(-sharpen * logit))).astype(np.float32), labels


def test_a_calibrated_predictor_has_ece_near_zero_and_an_over_confident_one_does_not():
    rng = np.random.default_rng(1)
    calibrated = summarise_calibration(calibration_tallies(*synthetic(rng, 1.0)))
    over = summarise_calibration(calibration_tallies(*synthetic(rng, 4.0)))
    assert calibrated["ece"] < 0.01
    assert over["ece"] > 0.1
    assert over["brier"] > calibrated["brier"]


def test_temperature_fitted_on_one_sample_undoes_over_confidence_on_another():
    rng = np.random.default_rng(2)
    valid, test = synthetic(rng, 4.0), synthetic(rng, 4.0)
    t = fit_temperature(*valid)
    assert t == pytest.approx(4.0, rel=0.1)
    scaled = apply_temperature(test[0], t)
    assert np.array_equal(scaled >= 0.5, test[0] >= 0.5)  # no mask at 0.5 changes
    before = summarise_calibration(calibration_tallies(*test))
    after = summarise_calibration(calibration_tallies(scaled, test[1]))
    assert after["ece"] < 0.02 < before["ece"]


def test_calibration_intervals_hold_the_estimate_and_subsets_add_up():
    rng = np.random.default_rng(3)
    tallies = calibration_tallies(*synthetic(rng, 2.0))
    point = summarise_calibration(tallies)
    ci = calibration_bootstrap_ci(tallies, n_resamples=200)
    for key, (low, high) in ci.items():
        assert low < point[key] < high, key
    halves = [take_images(tallies, np.arange(i, 60, 2)) for i in (0, 1)]
    assert sum(h["count"].sum() for h in halves) == tallies["count"].sum()


def test_worst_cases_by_kind_pick_and_order_the_right_images():
    empty = np.zeros((SIZE, SIZE), bool)
    outcomes = [
        image_lesions([LESION], box(2, 5, 3, 6)),               # 0 found, Dice 0.75
        image_lesions([LESION], empty),                          # 1 missed, 16 px
        image_lesions([box(2, 9, 2, 9)], empty),                 # 2 missed, 64 px
        image_lesions([LESION], LESION | box(15, 16, 15, 16)),  # 3 found + 1 FP
        image_lesions([LESION], box(2, 5, 2, 4)),                # 4 found, Dice 24/28
        image_lesions([LESION], box(10, 11, 10, 11) | box(15, 16, 15, 16)),  # 5: 2 FP, missed
    ]
    tumour_px = np.array([16, 16, 64, 16, 16, 16])
    assert worst_cases(outcomes, "missed lesion", 5, tumour_px) == [2, 1, 5]
    assert worst_cases(outcomes, "false-positive component", 5, tumour_px) == [5, 3]
    assert worst_cases(outcomes, "boundary error", 5, tumour_px) == [0, 4]
    assert worst_cases(outcomes, "boundary error", 1, tumour_px) == [0]
    with pytest.raises(ValueError, match="unknown failure kind 'typo'"):
        worst_cases(outcomes, "typo", 1, tumour_px)


def test_temperature_fitted_on_a_stride_of_the_pixels_is_the_same(monkeypatch):
    import brainseg_lib.metrics.calibration as calibration

    valid = synthetic(np.random.default_rng(4), 3.0)
    every = fit_temperature(*valid)
    monkeypatch.setattr(calibration, "FIT_PIXELS", valid[0].size // 4)  # every 4th pixel
    assert calibration.fit_temperature(*valid) == pytest.approx(every, rel=0.05)
    assert every == pytest.approx(3.0, rel=0.1)
