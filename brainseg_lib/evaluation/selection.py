"""Choosing the evaluation setting on the selection split (validation or out-of-fold
predictions): threshold, flip TTA and post-processing, each scored by pooled IoU. The test
split never takes part in the choice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainseg_lib.evaluation.postprocess import POSTPROCESSING, binarise
from brainseg_lib.evaluation.predictions import SplitPrediction
from brainseg_lib.evaluation.result import Setting
from brainseg_lib.metrics.functional import (
    ConfusionCounts,
    summarise,
)

THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)


def plain_setting(threshold: float = 0.5) -> Setting:
    """The plain method: the given threshold, no TTA, no post-processing."""
    return Setting(threshold)


def counts_at(pred: SplitPrediction, threshold: float, tta: bool, method: str,
              min_px: int) -> ConfusionCounts:
    """Per-image confusion counts of ``pred`` binarised in one setting."""
    probs = pred.probs_tta if tta else pred.probs
    return ConfusionCounts.from_masks(binarise(probs, threshold, method, min_px),
                                      pred.arrays.masks)


def threshold_table(pred: SplitPrediction, tta: bool = False) -> pd.DataFrame:
    rows = []
    for t in THRESHOLDS:
        s = summarise(counts_at(pred, float(t), tta, "none", 0))
        rows.append({"threshold": float(t), "tta": tta, **s})
    return pd.DataFrame(rows)


def choose_setting(valid: SplitPrediction, min_px: int, tune_threshold: bool,
                   tta: bool, threshold: float = 0.5) -> tuple[Setting, pd.DataFrame]:
    """Pick threshold, TTA and post-processing maximising pooled IoU on the selection split;
    the plain setting (``threshold``, no TTA, no post-processing) is always a candidate."""
    rows = []
    for use_tta in ([False, True] if tta else [False]):
        best_t = threshold
        if tune_threshold:
            curve = threshold_table(valid, use_tta)
            best_t = float(curve.loc[curve.pooled_iou.idxmax(), "threshold"])
        for method in POSTPROCESSING:
            for t in sorted({threshold, best_t}):
                s = summarise(counts_at(valid, t, use_tta, method, min_px))
                rows.append({"tta": use_tta, "postprocess": method, "threshold": t, **s})
    table = pd.DataFrame(rows)
    best = table.loc[table.pooled_iou.idxmax()]
    return Setting(float(best.threshold), bool(best.tta), str(best.postprocess)), table


def describe(setting: Setting, resolution: str) -> str:
    """The setting in words, as the metric blocks name it."""
    return (f"{resolution}, threshold {setting.threshold:.2f}, "
            f"{'flip TTA' if setting.tta else 'no TTA'}, {POSTPROCESSING[setting.postprocess]}")
