"""Figures: the zoom window that makes a small tumour visible in the galleries."""

import numpy as np

from brainseg_lib.reporting.figures import overlay_rows, zoom_window


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
