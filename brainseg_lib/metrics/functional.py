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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch


@dataclass
class ConfusionCounts:
    """Per-image pixel counts, int64 arrays of shape (N,)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    @classmethod
    def from_masks(cls, pred: torch.Tensor | np.ndarray,
                   target: torch.Tensor | np.ndarray) -> ConfusionCounts:
        """Counts for a batch of binary masks shaped (N,1,H,W) or (N,H,W), tensors (on any
        device) or arrays, by ``smp.metrics.get_stats`` (imported here: the formulas below
        need only numpy)."""
        import segmentation_models_pytorch as smp
        import torch

        pred_t, target_t = (torch.as_tensor(np.array(a) if isinstance(a, np.ndarray)
                                            and not a.flags.writeable else a)
                            for a in (pred, target))  # a read-only memory map is copied
        if pred_t.ndim == 3:
            pred_t, target_t = pred_t.unsqueeze(1), target_t.unsqueeze(1)
        tp, fp, fn, tn = smp.metrics.get_stats(pred_t.long(), target_t.long(), mode="binary")
        return cls(*(s.sum(1).cpu().numpy().astype(np.int64) for s in (tp, fp, fn, tn)))

    @classmethod
    def concat(cls, parts: list[ConfusionCounts]) -> ConfusionCounts:
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in
                     ("tp", "fp", "fn", "tn")))

    def __len__(self) -> int:
        return len(self.tp)

    def take(self, index: np.ndarray) -> ConfusionCounts:
        return ConfusionCounts(self.tp[index], self.fp[index], self.fn[index], self.tn[index])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.where(den > 0, num / np.maximum(den, 1), 1.0)


# --- the formulas, once; on counts of any shape (one image, pooled sums, resampled sums)

def iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN); 1 where there is nothing to find and nothing predicted."""
    return _ratio(tp, tp + fp + fn)


def dice(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """2 TP / (2 TP + FP + FN) (F1); 1 where there is nothing to find and nothing predicted."""
    return _ratio(2 * tp, 2 * tp + fp + fn)


def precision(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """TP / (TP + FP); 1 when nothing is predicted."""
    return _ratio(tp, tp + fp)


def recall(tp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """TP / (TP + FN) (sensitivity); 1 when there is nothing to find."""
    return _ratio(tp, tp + fn)


def count_metrics(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray,
                     axis: int = -1) -> dict[str, np.ndarray]:
    """The pooled and per-image metrics of per-image counts along ``axis`` (images)."""
    sums = [x.sum(axis) for x in (tp, fp, fn, tn)]
    fg = iou(*sums[:3])
    return {"pooled_iou": fg, "pooled_dice": dice(*sums[:3]),
            "mean_image_iou": iou(tp, fp, fn).mean(axis),
            "mean_image_dice": dice(tp, fp, fn).mean(axis),
            "fg_bg_miou": (fg + iou(sums[3], sums[1], sums[2])) / 2,
            "precision": precision(sums[0], sums[1]), "recall": recall(sums[0], sums[2])}


# --- the same on ConfusionCounts

def per_image_iou(c: ConfusionCounts) -> np.ndarray:
    """Foreground IoU of each image; 1 when both masks are empty."""
    return iou(c.tp, c.fp, c.fn)


def per_image_dice(c: ConfusionCounts) -> np.ndarray:
    """Foreground Dice (F1) of each image; 1 when both masks are empty."""
    return dice(c.tp, c.fp, c.fn)


def pooled_iou(c: ConfusionCounts) -> float:
    """Foreground IoU with TP/FP/FN summed over all images (micro)."""
    return float(iou(c.tp.sum(), c.fp.sum(), c.fn.sum()))


def pooled_dice(c: ConfusionCounts) -> float:
    """Foreground Dice with counts summed over all images (micro)."""
    return float(dice(c.tp.sum(), c.fp.sum(), c.fn.sum()))



def batch_pooled_iou(c: ConfusionCounts, batch_size: int) -> float:
    """Foreground IoU pooled within consecutive batches, averaged over batches."""
    scores = [pooled_iou(c.take(np.arange(i, min(i + batch_size, len(c)))))
              for i in range(0, len(c), batch_size)]
    return float(np.mean(scores))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """95th-percentile Hausdorff distance between mask surfaces, in pixels, as MONAI defines it.

    MONAI's ``compute_hausdorff_distance(percentile=95)``: the 95th percentile of the
    prediction-to-truth surface distances and that of the truth-to-prediction distances,
    then the larger of the two (medpy instead pools both directions before the
    percentile, which gives a smaller figure). Surfaces are the pixels a 3x3 cross
    erosion removes; percentiles interpolate linearly. Empty policy, also MONAI's: when
    either mask is empty the distance is undefined (NaN), counted and left out of the mean.
    """
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if not pred.any() or not target.any():
        return float("nan")
    pred_surface, target_surface = _surface(pred), _surface(target)
    to_target = ndimage.distance_transform_edt(~target_surface)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface)[target_surface]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


METRIC_DEFINITIONS = {
    "pooled_iou": "Foreground IoU, pooled over the split",
    "pooled_dice": "Foreground Dice, pooled over the split",
    "mean_image_iou": "Mean per-image foreground IoU",
    "mean_image_dice": "Mean per-image foreground Dice",
    "fg_bg_miou": "Mean of foreground and background IoU (pooled)",
    "batch_pooled_iou": "Foreground IoU pooled per batch, mean over batches",
    "precision": "Pixel precision, pooled",
    "recall": "Pixel recall, pooled",
    "hd95": "HD95 in pixels (MONAI's definition), mean over images with both masks non-empty",
}


def summarise(c: ConfusionCounts, batch_size: int = 16,
              hd95_values: np.ndarray | None = None) -> dict[str, float]:
    """Every headline metric from per-image counts (and optional per-image HD95)."""
    out = {k: float(v) for k, v in count_metrics(c.tp, c.fp, c.fn, c.tn).items()}
    out["batch_pooled_iou"] = batch_pooled_iou(c, batch_size)
    if hd95_values is not None:
        finite = hd95_values[np.isfinite(hd95_values)]
        out["hd95"] = float(finite.mean()) if len(finite) else float("nan")
        out["hd95_undefined_images"] = int((~np.isfinite(hd95_values)).sum())
    return out
