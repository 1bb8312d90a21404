"""Lesion-wise (instance) metrics: what a clinician asks first — how many tumours were found,
how many false alarms were raised, and how well each found tumour was outlined.

**True lesions** are the dataset's annotations (one instance each, never merged);
**predicted lesions** are the connected components (8-connectivity) of the binary
prediction, after whichever post-processing the setting applies.

BraTS 2023 lesion-wise Dice and HD95, in 2D (the challenge's definition, with its 3D
constants replaced by their 2D counterparts):

* **overlap rule**: each true lesion is dilated by ``LESION_DILATION`` = 3 iterations of the
  3x3 (8-connected) structuring element; every predicted component that touches the dilated
  lesion is matched to it (one component may match several lesions, a lesion several
  components). The lesion counts as **detected** when at least one component matches.
* **lesion Dice / HD95** of a detected lesion: Dice and HD95 (MONAI's definition, see
  :func:`.functional.hd95`) between the (undilated) lesion and the union of its matched
  components.
* **penalties**: a missed lesion and every **false-positive component** (one that touches no
  dilated true lesion) score Dice 0 and HD95 = the image diagonal in pixels (BraTS uses
  374, the diagonal of its 240x240x155 volume).
* **per image**: the sum over true lesions and false-positive components divided by their
  number; an image with no lesion and no prediction scores Dice 1 and HD95 0. The split's
  figure is the mean over images. BraTS's 50-voxel minimum lesion size is not applied; a
  lesion too small to leave a pixel at the scored resolution is left out.

**Lesion sensitivity** = detected true lesions / all true lesions, pooled over the split;
**false-positive components per image** = their mean count.

Panoptic quality (Kirillov et al.; as ``panoptica`` computes it): a true lesion and a
predicted component are a match (TP) when their IoU is >= ``PQ_IOU`` = 0.5 (panoptica's
``NaiveThresholdMatching`` default: greedy by IoU, one-to-one); unmatched predictions are
FP, unmatched lesions FN. RQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches,
PQ = RQ x SQ, each pooled over the split (TP, FP, FN and the IoU sum added up over images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from brainseg_lib.metrics.functional import dice, hd95

LESION_DILATION = 3
PQ_IOU = 0.5
# the one definition of a component: 8-connected in 2D (diagonal neighbours join). The lesion
# metric and post-processing both label through label_components, so a mask is never
# counted as one component by one and two by the other.
CONNECTIVITY = ndimage.generate_binary_structure(2, 2)

LESION_DEFINITIONS = {
    "lesion_sensitivity": "Lesion sensitivity: detected true lesions / all (BraTS 2023 overlap "
                          "rule, 3-px dilation), pooled",
    "fp_components_per_image": "False-positive components per image (touching no dilated true "
                               "lesion), mean",
    "lesion_dice": "Lesion-wise Dice (BraTS 2023: missed lesion and FP component score 0), "
                   "mean over images",
    "lesion_hd95": "Lesion-wise HD95 in pixels (BraTS 2023: penalty = image diagonal), mean "
                   "over images",
    "pq": "Panoptic quality (IoU >= 0.5 matching), pooled",
    "rq": "Recognition quality (detection F1 at IoU >= 0.5), pooled",
    "sq": "Segmentation quality (mean IoU of matched lesions), pooled",
}

# per-image tallies, in the order the bootstrap receives them
FIELDS = ("lesions", "detected", "fp_components", "lesion_dice", "lesion_hd95", "pq_tp",
          "pq_fp", "pq_fn", "pq_iou_sum")


@dataclass
class ImageLesions:
    """One image's lesion-wise outcome."""

    lesions: int  # true lesions
    detected: int  # true lesions matched by at least one predicted component
    fp_components: int  # predicted components touching no dilated true lesion
    lesion_dice: float  # BraTS 2023 lesion-wise Dice of the image
    lesion_hd95: float  # BraTS 2023 lesion-wise HD95 of the image, pixels
    pq_tp: int
    pq_fp: int
    pq_fn: int
    pq_iou_sum: float  # IoU summed over the PQ matches
    per_lesion_dice: tuple[float, ...]  # each true lesion's Dice (0 when missed)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The connected components of a binary mask (``CONNECTIVITY``): labels 1..n, and n."""
    labels, n = ndimage.label(mask, structure=CONNECTIVITY)
    return labels, int(n)


def _as_stack(lesions: np.ndarray | list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    stack = np.asarray(lesions, bool)
    return stack.reshape((-1, *shape)) if stack.size == 0 else stack


def image_lesions(lesions: np.ndarray | list[np.ndarray], pred: np.ndarray) -> ImageLesions:
    """Lesion-wise scores of one image: ``lesions`` (K,H,W) holds one mask per true lesion,
    ``pred`` (H,W) the binary prediction."""
    pred = np.asarray(pred, bool)
    truth = _as_stack(lesions, pred.shape)
    truth = truth[truth.any((1, 2))]  # none left at this resolution
    components, n_comp = label_components(pred)
    penalty = float(np.hypot(*pred.shape))
    matched: set[int] = set()
    dices, dists, detected = [], [], 0
    for lesion in truth:
        grown = ndimage.binary_dilation(lesion, CONNECTIVITY, iterations=LESION_DILATION)
        hits = np.setdiff1d(np.unique(components[grown]), [0])
        matched.update(int(h) for h in hits)
        if len(hits):
            detected += 1
            found = np.isin(components, hits)
            tp, fp, fn = (np.sum(found & lesion), np.sum(found & ~lesion),
                          np.sum(~found & lesion))
            dices.append(float(dice(tp, fp, fn)))
            dists.append(hd95(found, lesion))
        else:
            dices.append(0.0)
            dists.append(penalty)
    n_fp = n_comp - len(matched)
    n = len(truth) + n_fp
    tp_, fp_, fn_, iou_sum = _panoptic(truth, components, n_comp)
    return ImageLesions(
        lesions=len(truth), detected=detected, fp_components=n_fp,
        lesion_dice=sum(dices) / n if n else 1.0,
        lesion_hd95=(sum(dists) + n_fp * penalty) / n if n else 0.0,
        pq_tp=tp_, pq_fp=fp_, pq_fn=fn_, pq_iou_sum=iou_sum,
        per_lesion_dice=tuple(dices))


def _panoptic(truth: np.ndarray, components: np.ndarray, n_comp: int,
              ) -> tuple[int, int, int, float]:
    """TP, FP, FN and the IoU sum of one-to-one matches with IoU >= ``PQ_IOU``, greedy by
    IoU as panoptica's ``NaiveThresholdMatching``."""
    pairs = []
    for i, lesion in enumerate(truth):
        for c in np.setdiff1d(np.unique(components[lesion]), [0]):
            comp = components == c
            inter, union = np.sum(comp & lesion), np.sum(comp | lesion)
            if inter / union >= PQ_IOU:
                pairs.append((inter / union, i, int(c)))
    used_t, used_p, iou_sum = set(), set(), 0.0
    for value, i, c in sorted(pairs, reverse=True):
        if i not in used_t and c not in used_p:
            used_t.add(i)
            used_p.add(c)
            iou_sum += float(value)
    tp = len(used_t)
    return tp, n_comp - tp, len(truth) - tp, iou_sum


def lesion_table(per_image: list[ImageLesions]) -> dict[str, np.ndarray]:
    """Per-image tallies as arrays (one per name in ``FIELDS``), for sums and the bootstrap."""
    return {k: np.asarray([getattr(r, k) for r in per_image], float) for k in FIELDS}


def split_lesion_table(truths: list[np.ndarray], preds: np.ndarray) -> dict[str, np.ndarray]:
    """The tallies of a split: each image's true lesions (K,H,W) against its prediction."""
    return lesion_table([image_lesions(t, m) for t, m in zip(truths, preds, strict=True)])


def lesion_metrics(table: dict[str, np.ndarray], axis: int = -1) -> dict[str, np.ndarray]:
    """The split's lesion-wise figures from per-image tallies (one array per name in
    ``FIELDS``) along ``axis`` (images). Sensitivity is 1 when there is no lesion to find; SQ
    and PQ are 0 without a match."""
    n_lesions, tp = table["lesions"].sum(axis), table["pq_tp"].sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(n_lesions > 0,
                               table["detected"].sum(axis) / np.maximum(n_lesions, 1), 1.0)
        den = tp + (table["pq_fp"].sum(axis) + table["pq_fn"].sum(axis)) / 2
        rq = np.where(den > 0, tp / np.maximum(den, 1e-12), 1.0)
        sq = np.where(tp > 0, table["pq_iou_sum"].sum(axis) / np.maximum(tp, 1), 0.0)
    return {"lesion_sensitivity": sensitivity,
            "fp_components_per_image": table["fp_components"].mean(axis),
            "lesion_dice": table["lesion_dice"].mean(axis),
            "lesion_hd95": table["lesion_hd95"].mean(axis),
            "pq": rq * sq, "rq": rq, "sq": sq}


def summarise_lesions(table: dict[str, np.ndarray]) -> dict[str, float]:
    """The lesion-wise figures of a set of images (tallies from :func:`lesion_table`)."""
    out = {k: float(v) for k, v in lesion_metrics(table).items()}
    out["true_lesions"] = int(table["lesions"].sum())
    return out


FAILURE_KINDS = {
    "missed lesion": "an annotated tumour no predicted component touches",
    "false-positive component": "a predicted component touching no annotated tumour",
    "boundary error": "every tumour found and no false alarm, but the outline is off",
}


def worst_cases(outcomes: list[ImageLesions], kind: str, n: int,
                tumour_px: np.ndarray) -> list[int]:
    """Indices of the ``n`` worst images of one kind of failure (``FAILURE_KINDS``): missed
    lesions (most tumour pixels first: the biggest misses), false-positive components (most
    first, then the lowest lesion Dice), boundary errors (every lesion found, no false alarm,
    lowest lesion Dice first)."""
    r = outcomes
    if kind == "missed lesion":
        pick = [i for i in range(len(r)) if r[i].detected < r[i].lesions]
        key = [(-float(tumour_px[i]), 0.0) for i in pick]
    elif kind == "false-positive component":
        pick = [i for i in range(len(r)) if r[i].fp_components]
        key = [(-r[i].fp_components, r[i].lesion_dice) for i in pick]
    elif kind == "boundary error":
        pick = [i for i in range(len(r)) if r[i].detected == r[i].lesions > 0
                and not r[i].fp_components]
        key = [(r[i].lesion_dice, 0.0) for i in pick]
    else:
        raise ValueError(f"unknown failure kind '{kind}': use {', '.join(FAILURE_KINDS)}")
    order = sorted(range(len(pick)), key=lambda j: key[j])
    return [pick[j] for j in order[:n]]
