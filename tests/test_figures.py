"""Figures show what they are given: the plotted data are the input values, the mask overlays
have their colours on the masked pixels only, the zoom window makes a small tumour visible in
the galleries, and every panel says what it shows."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb, to_rgba

from brainseg_lib.metrics.calibration import (
    calibration_tallies,
    reliability_bins,
    summarise_calibration,
)
from brainseg_lib.reporting.figures import (
    GT_COLOUR,
    PRED_COLOUR,
    learning_curves,
    learning_curves_overlay,
    overlay_rows,
    paired_scatter,
    reliability_diagram,
    threshold_curve,
    variants_chart,
    zoom_window,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _box(y0, y1, x0, x1, size=256):
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _lines(ax) -> dict[str, tuple[list, list]]:
    """Each labelled line of ``ax``: its x and y data."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()}


def _contour_colours(ax) -> list[tuple[float, float, float]]:
    return [tuple(c.get_edgecolor()[0][:3]) for c in ax.collections]


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


def test_gallery_rows_show_the_image_the_tinted_masks_and_the_zoomed_crop():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    truth = np.stack([_box(10, 14, 40, 44, 64), _box(30, 40, 5, 9, 64)])
    pred = np.stack([_box(12, 16, 40, 44, 64), np.zeros((64, 64), np.uint8)])
    fig = overlay_rows(images, truth, pred, ["first.jpg", "second.jpg"], "Test images")
    assert fig.get_suptitle() == "Test images" and len(fig.axes) == 8
    for row in range(2):
        original, gt_panel, pred_panel, zoom = fig.axes[4 * row:4 * row + 4]
        grey = images[row, 0]
        for ax in (original, gt_panel, pred_panel):  # the image itself, whole, unscaled
            np.testing.assert_array_equal(ax.images[0].get_array(), grey)
            assert ax.images[0].get_extent() == [-0.5, 63.5, 63.5, -0.5]
        rows, cols = zoom_window(truth[row])  # a truth is present: the zoom centres on it
        np.testing.assert_array_equal(zoom.images[0].get_array(), grey[rows, cols])
        assert zoom.get_title() == (f"zoom: rows {rows.start}-{rows.stop}, "
                                    f"cols {cols.start}-{cols.stop}")
        assert zoom.images[0].get_array().shape[0] < 64
        assert original.get_title() == f"original\n{['first.jpg', 'second.jpg'][row]}"
        for panel, mask, colour in ((gt_panel, truth[row], GT_COLOUR),
                                    (pred_panel, pred[row], PRED_COLOUR)):
            tint = panel.images[1].get_array()  # RGBA: the colour where the mask is, else clear
            assert tint.shape == (64, 64, 4)
            inside = tint[mask.astype(bool)]
            assert np.allclose(inside[:, 3], 0.4) and np.allclose(inside[:, :3], to_rgb(colour))
            assert (tint[~mask.astype(bool), 3] == 0).all()
    assert _contour_colours(fig.axes[2]) == [to_rgb(GT_COLOUR)]  # truth outlined on the prediction
    assert _contour_colours(fig.axes[3]) == [to_rgb(GT_COLOUR), to_rgb(PRED_COLOUR)]
    assert _contour_colours(fig.axes[7]) == [to_rgb(GT_COLOUR)]  # nothing predicted: no red
    assert fig.axes[1].get_title() == "ground truth (green)"


def test_a_false_alarm_away_from_the_tumour_is_inside_the_zoom_when_asked():
    images = np.zeros((1, 3, 64, 64), np.uint8)
    truth, pred = _box(5, 9, 5, 9, 64)[None], _box(50, 54, 50, 54, 64)[None]
    around_truth = overlay_rows(images, truth, pred, ["a"], "t").axes[3]
    around_both = overlay_rows(images, truth, pred, ["a"], "t", zoom_on_both=True).axes[3]
    assert around_truth.images[0].get_array().shape[0] < 40  # the truth only
    assert around_both.images[0].get_array().shape[0] >= 49  # both corners' boxes
    assert _contour_colours(around_truth) == [to_rgb(GT_COLOUR)]  # the alarm is outside
    assert _contour_colours(around_both) == [to_rgb(GT_COLOUR), to_rgb(PRED_COLOUR)]


def test_learning_curves_plot_the_history_and_mark_the_best_epoch():
    history = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.9, 0.5, 0.4],
                            "val_loss": [0.8, 0.6, 0.65], "val_iou": [0.2, 0.5, 0.45],
                            "val_dice": [0.3, 0.6, 0.55], "lr": [1e-3, 5e-4, 1e-4]})
    fig = learning_curves(history, "val_iou", best_epoch=2)
    loss, iou, dice, lr = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [
        "Loss", "Validation IoU (pooled)", "Validation Dice (pooled)", "Learning rate"]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    for ax, cols in ((loss, ["train_loss", "val_loss"]), (iou, ["val_iou"]),
                     (dice, ["val_dice"]), (lr, ["lr"])):
        lines = _lines(ax)
        for col in cols:
            assert lines[col] == (history.epoch.tolist(), history[col].tolist())
        assert lines["best (val_iou)"][0] == [2, 2]


def test_threshold_curve_plots_each_score_and_the_chosen_threshold():
    curve = pd.DataFrame({"threshold": [0.3, 0.5, 0.7], "pooled_iou": [0.5, 0.6, 0.55],
                          "mean_image_dice": [0.6, 0.7, 0.65], "precision": [0.5, 0.7, 0.9],
                          "recall": [0.9, 0.8, 0.6]})
    ax = threshold_curve(curve, chosen=0.5).axes[0]
    lines = _lines(ax)
    assert lines["foreground IoU (pooled)"] == ([0.3, 0.5, 0.7], [0.5, 0.6, 0.55])
    assert lines["recall"][1] == [0.9, 0.8, 0.6]
    assert lines["chosen 0.50"][0] == [0.5, 0.5]
    assert ax.get_ylim() == (0, 1) and ax.get_xlabel() == "probability threshold"


def test_variants_chart_has_one_bar_per_setting_sorted_by_score():
    variants = pd.DataFrame({"postprocess": ["none", "keep_largest", "none"],
                             "threshold": [0.5, 0.5, 0.4], "tta": [False, True, False],
                             "pooled_iou": [0.61, 0.65, 0.58]})
    ax = variants_chart(variants).axes[0]
    assert [p.get_width() for p in ax.patches] == [0.58, 0.61, 0.65]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "none, t=0.40", "none, t=0.50", "keep_largest, t=0.50, TTA"]


def test_learning_curves_overlay_draws_one_line_per_run():
    a = pd.DataFrame({"epoch": [1, 2], "val_loss": [0.5, 0.4], "val_iou": [0.3, 0.4]})
    b = pd.DataFrame({"epoch": [1, 2, 3], "val_loss": [0.6, 0.3, 0.2], "val_iou": [0.2, 0.5,
                                                                                   0.6]})
    loss, iou = learning_curves_overlay({"a-short": a, "b-longer": b}).axes
    assert _lines(loss) == {"a-short": ([1, 2], [0.5, 0.4]),
                            "b-longer": ([1, 2, 3], [0.6, 0.3, 0.2])}
    assert _lines(iou)["b-longer"] == ([1, 2, 3], [0.2, 0.5, 0.6])


def test_paired_scatter_places_each_image_at_its_two_scores_and_counts_wins():
    a = pd.Series([0.2, 0.5, 0.8, 0.6])
    b = pd.Series([0.4, 0.5, 0.7, 0.9])
    clean = pd.Series([True, False, True, True])
    ax = paired_scatter(a, b, "a-short", "b-longer", clean).axes[0]
    clean_points, dup_points = (c.get_offsets() for c in ax.collections)
    np.testing.assert_array_equal(clean_points, [[0.2, 0.4], [0.8, 0.7], [0.6, 0.9]])
    np.testing.assert_array_equal(dup_points, [[0.5, 0.5]])
    assert ax.get_title() == "Per-image Dice: B higher on 2, lower on 1 images"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Dice, a-short", "Dice, b-longer")
    assert tuple(ax.collections[0].get_facecolor()[0]) == pytest.approx(
        to_rgba("tab:blue", 0.6))


def test_reliability_diagram_plots_both_curves_their_pixels_and_their_ece():
    rng = np.random.default_rng(0)
    probs = rng.random((4, 16, 16)).astype(np.float32)
    labels = (rng.random(probs.shape) < probs).astype(np.uint8)
    tallies = calibration_tallies(probs, labels)
    raw = {"metrics": summarise_calibration(tallies), "reliability": reliability_bins(tallies)}
    cal = {"temperature": 1.5, "raw": raw, "temperature_scaled": raw}
    fig = reliability_diagram(cal)
    curves, counts = fig.axes
    lines = _lines(curves)
    ece = raw["metrics"]["ece"]
    bins = raw["reliability"]
    for label in (f"raw: ECE {ece:.4f}", f"temperature-scaled (T = 1.50): ECE {ece:.4f}"):
        assert lines[label] == (list(bins["mean_probability"]), list(bins["observed_frequency"]))
    assert lines["perfect calibration"] == ([0, 1], [0, 1])
    heights = [p.get_height() for p in counts.patches]
    assert heights == [*bins["pixels"], *bins["pixels"]]  # raw bars, then scaled ones
    assert sum(bins["pixels"]) == probs.size
    assert counts.get_yscale() == "log" and curves.get_ylabel() == "observed tumour frequency"
