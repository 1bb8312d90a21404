"""Figures: the zoom window that makes a small tumour visible in the galleries, the
reliability diagram."""

import numpy as np

from brainseg_lib.metrics.calibration import (
    calibration_tallies,
    reliability_bins,
    summarise_calibration,
)
from brainseg_lib.reporting.figures import overlay_rows, reliability_diagram, zoom_window


def _box(y0, y1, x0, x1, size=256):
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_zoom_window_holds_truth_and_prediction_with_a_margin():
    truth, pred = _box(100, 110, 200, 210), _box(104, 118, 196, 206)
    rows, cols = zoom_window(truth, pred)
    assert rows.stop - rows.start == cols.stop - cols.start == 51  # 20 % of 256 beats 18 * 2
    for m in (truth, pred):
        assert m[rows, cols].sum() == m.sum()  # nothing cut off
    big = _box(20, 120, 20, 60)
    rows, cols = zoom_window(big)
    assert rows.stop - rows.start == 200  # the 100 px side grown by half on each side
    assert big[rows, cols].sum() == big.sum()


def test_zoom_window_stays_inside_the_image_and_centres_on_nothing():
    rows, cols = zoom_window(_box(0, 4, 250, 256))
    assert rows.start == 0 and cols.stop == 256 and rows.stop - rows.start == 51
    rows, cols = zoom_window(np.zeros((256, 256), np.uint8))
    assert (rows.start + rows.stop) // 2 == 128 and (cols.start + cols.stop) // 2 == 128


def test_gallery_rows_have_a_zoom_panel():
    images = np.zeros((2, 3, 64, 64), np.uint8)
    masks = np.stack([_box(10, 14, 40, 44, 64), _box(30, 40, 5, 9, 64)])
    fig = overlay_rows(images, masks, masks, ["a", "b"], "t")
    assert len(fig.axes) == 8
    zoom = fig.axes[3]
    assert zoom.get_title().startswith("zoom: rows") and zoom.images[0].get_array().shape[0] < 64


def test_a_false_alarm_away_from_the_tumour_is_inside_the_zoom_when_asked():
    images = np.zeros((1, 3, 64, 64), np.uint8)
    truth, pred = _box(5, 9, 5, 9, 64)[None], _box(50, 54, 50, 54, 64)[None]
    around_truth = overlay_rows(images, truth, pred, ["a"], "t").axes[3]
    around_both = overlay_rows(images, truth, pred, ["a"], "t", zoom_on_both=True).axes[3]
    assert around_truth.images[0].get_array().shape[0] < 40  # the truth only
    assert around_both.images[0].get_array().shape[0] >= 49  # both corners' boxes


def test_reliability_diagram_plots_both_curves_with_their_ece():
    rng = np.random.default_rng(0)
    probs = rng.random((4, 16, 16)).astype(np.float32)
    labels = (rng.random(probs.shape) < probs).astype(np.uint8)
    tallies = calibration_tallies(probs, labels)
    cal = {"temperature": 1.5}
    for name, t in (("raw", tallies), ("temperature_scaled", tallies)):
        cal[name] = {"metrics": summarise_calibration(t), "reliability": reliability_bins(t)}
    fig = reliability_diagram(cal)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith("raw: ECE") for t in legend)
    assert any("T = 1.50" in t for t in legend)
    assert fig.axes[1].get_yscale() == "log"
