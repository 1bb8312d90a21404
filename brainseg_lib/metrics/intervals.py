"""Segmentation metrics, each named for what it measures.

All metrics take binary masks: a pixel is foreground when its sigmoid probability is
``>= threshold`` (0.5 unless stated). They are computed from per-image confusion counts
(TP, FP, FN, TN, via ``smp.metrics.get_stats``), so the same counts give every reduction:

* **pooled** ("micro"): counts summed over the whole split, then the ratio. Large tumours
  weigh more. ``pooled_iou`` is the usual foreground IoU of a test set.
* **per-image** ("micro-imagewise", mean over images): the ratio per image, then the mean.
  Empty-mask policy: an image with empty ground truth *and* empty prediction scores 1;
  empty ground truth with a non-empty prediction scores 0 (smp's ``zero_division=1``).
* **batch-pooled**: pooled within consecutive batches of ``batch_size`` images in split
  order, then averaged over batches. This is what a Keras/PyTorch loop that averages a
  batch-level IoU reports; it depends on the batch size, which is recorded with it.
* **fg+bg mIoU**: the mean of the pooled foreground IoU and the pooled background IoU
  (TN / (TN + FP + FN)). Background is ~97 % of the pixels here, so this is far higher than
  the foreground IoU; the reference notebook's 0.806 is comparable to this, not to IoU.

Ratios whose denominator is zero (nothing predicted and nothing to find) are 1.
Resolution is the caller's: the evaluation reports both the model's and the source's.
"""

from __future__ import annotations

import numpy as np

from brainseg_lib.metrics.functional import ConfusionCounts, _ratio


def bootstrap_ci(c: ConfusionCounts, hd95_values: np.ndarray | None = None,
                 n_resamples: int = 1000, seed: int = 0,
                 ) -> dict[str, tuple[float, float]]:
    """Percentile 95 % confidence intervals, resampling images with replacement."""
    rng = np.random.default_rng(seed)
    n = len(c)
    idx = rng.integers(0, n, size=(n_resamples, n))
    tp, fp, fn, tn = (getattr(c, k)[idx] for k in ("tp", "fp", "fn", "tn"))
    tps, fps, fns, tns = tp.sum(1), fp.sum(1), fn.sum(1), tn.sum(1)
    samples = {
        "pooled_iou": _ratio(tps, tps + fps + fns),
        "pooled_dice": _ratio(2 * tps, 2 * tps + fps + fns),
        "mean_image_iou": _ratio(tp, tp + fp + fn).mean(1),
        "mean_image_dice": _ratio(2 * tp, 2 * tp + fp + fn).mean(1),
        "fg_bg_miou": (_ratio(tps, tps + fps + fns) + _ratio(tns, tns + fps + fns)) / 2,
        "precision": _ratio(tps, tps + fps),
        "recall": _ratio(tps, tps + fns),
    }
    if hd95_values is not None:
        vals = hd95_values[idx]
        with np.errstate(invalid="ignore"):
            samples["hd95"] = np.nanmean(np.where(np.isfinite(vals), vals, np.nan), axis=1)
    return {k: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)))
            for k, v in samples.items()}


def paired_bootstrap(a: ConfusionCounts, b: ConfusionCounts, n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """B minus A on the same images: (difference, 95 % low, 95 % high) of pooled IoU and
    mean image Dice. Each resample draws one set of images for both, so what the two runs
    share (hard images, easy images) cancels out of the interval."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same images ({len(a)} vs {len(b)})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_resamples, len(a)))

    def scores(c: ConfusionCounts, take: np.ndarray | slice) -> dict[str, np.ndarray]:
        tp, fp, fn = c.tp[take], c.fp[take], c.fn[take]
        return {"pooled_iou": _ratio(tp.sum(-1), (tp + fp + fn).sum(-1)),
                "mean_image_dice": _ratio(2 * tp, 2 * tp + fp + fn).mean(-1)}

    point_a, point_b = scores(a, slice(None)), scores(b, slice(None))
    boot_a, boot_b = scores(a, idx), scores(b, idx)
    return {k: (float(point_b[k] - point_a[k]),
                float(np.percentile(boot_b[k] - boot_a[k], 2.5)),
                float(np.percentile(boot_b[k] - boot_a[k], 97.5))) for k in point_a}
