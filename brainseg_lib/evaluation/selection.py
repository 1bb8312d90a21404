"""Choosing the evaluation setting on the selection split (validation or out-of-fold
predictions): threshold, flip TTA and post-processing, each scored by pooled IoU. The test
split never takes part in the choice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from brainseg_lib.data.arrays import SplitLesions
from brainseg_lib.errors import BrainsegError
from brainseg_lib.evaluation.postprocess import POSTPROCESSING, binarise
from brainseg_lib.evaluation.predictions import SplitPrediction
from brainseg_lib.evaluation.result import Setting
from brainseg_lib.metrics.functional import (
    ConfusionCounts,
    summarise,
)
from brainseg_lib.metrics.lesion import split_lesion_table, summarise_lesions

THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)


def plain_setting(threshold: float = 0.5) -> Setting:
    """The plain method: the given threshold, no TTA, no post-processing."""
    return Setting(threshold)


def masks_at(pred: SplitPrediction, setting: Setting, min_px: int) -> np.ndarray:
    """``pred`` binarised in ``setting``: its TTA or plain probabilities, threshold and
    post-processing."""
    probs = pred.probs_tta if setting.tta else pred.probs
    return binarise(probs, setting.threshold, setting.postprocess, min_px)


def counts_at(pred: SplitPrediction, threshold: float, tta: bool, method: str,
              min_px: int) -> ConfusionCounts:
    """Per-image confusion counts of ``pred`` binarised in one setting."""
    return ConfusionCounts.from_masks(masks_at(pred, Setting(threshold, tta, method), min_px),
                                      pred.arrays.masks)


def _candidate(pred: SplitPrediction, threshold: float, tta: bool, method: str,
               min_px: int) -> dict[str, object]:
    """One candidate setting and its pixel figures: a row of the selection table."""
    return {"tta": tta, "postprocess": method, "threshold": threshold,
            **summarise(counts_at(pred, threshold, tta, method, min_px))}


def _setting_of(row: pd.Series) -> Setting:
    return Setting(float(row.threshold), bool(row.tta), str(row.postprocess))


def threshold_table(pred: SplitPrediction, tta: bool = False) -> pd.DataFrame:
    rows = []
    for t in THRESHOLDS:
        s = summarise(counts_at(pred, float(t), tta, "none", 0))
        rows.append({"threshold": float(t), "tta": tta, **s})
    return pd.DataFrame(rows)


def lesion_sensitivity_at(pred: SplitPrediction, lesions: SplitLesions, setting: Setting,
                          min_px: int) -> float:
    """Annotated tumours found / all, on ``pred`` binarised in ``setting`` (lesion rule of
    :mod:`metrics.lesion`)."""
    table = split_lesion_table(lesions.lesions, masks_at(pred, setting, min_px))
    return summarise_lesions(table)["lesion_sensitivity"]


def _choose_under_floor(valid: SplitPrediction, lesions: SplitLesions | None, min_px: int,
                        tta: bool, threshold: float, floor: float,
                        ) -> tuple[Setting, pd.DataFrame]:
    """Every threshold, TTA and post-processing, by pooled IoU: the first whose lesion
    sensitivity reaches ``floor`` (sensitivity is computed down the list until one does),
    or the most sensitive one when none does."""
    if lesions is None:
        raise BrainsegError("min_lesion_sensitivity needs the selection split's annotated "
                            "lesions; out-of-fold selection does not provide them")
    rows = [_candidate(valid, t, use_tta, method, min_px)
            for use_tta in ([False, True] if tta else [False]) for method in POSTPROCESSING
            for t in sorted({threshold, *(float(x) for x in THRESHOLDS)})]
    table = pd.DataFrame(rows).sort_values("pooled_iou", ascending=False, ignore_index=True)
    table["lesion_sensitivity"] = np.nan
    for i, row in table.iterrows():
        setting = _setting_of(row)
        table.loc[i, "lesion_sensitivity"] = lesion_sensitivity_at(valid, lesions, setting,
                                                                   min_px)
        if table.loc[i, "lesion_sensitivity"] >= floor:
            return setting, table
    return _setting_of(table.loc[table.lesion_sensitivity.idxmax()]), table


def choose_setting(valid: SplitPrediction, min_px: int, tune_threshold: bool,
                   tta: bool, threshold: float = 0.5, lesions: SplitLesions | None = None,
                   min_sensitivity: float = 0.0) -> tuple[Setting, pd.DataFrame]:
    """Pick threshold, TTA and post-processing maximising pooled IoU on the selection split;
    the plain setting (``threshold``, no TTA, no post-processing) is always a candidate.
    With ``min_sensitivity`` > 0, the best pooled IoU among the settings whose lesion
    sensitivity on the selection split (``lesions``) reaches it: a missed tumour costs a
    reader more than a few pixels of outline."""
    if min_sensitivity > 0:
        return _choose_under_floor(valid, lesions, min_px, tta, threshold, min_sensitivity)
    rows = []
    for use_tta in ([False, True] if tta else [False]):
        best_t = threshold
        if tune_threshold:
            curve = threshold_table(valid, use_tta)
            best_t = float(curve.loc[curve.pooled_iou.idxmax(), "threshold"])
        rows += [_candidate(valid, t, use_tta, method, min_px)
                 for method in POSTPROCESSING for t in sorted({threshold, best_t})]
    table = pd.DataFrame(rows)
    return _setting_of(table.loc[table.pooled_iou.idxmax()]), table


def describe(setting: Setting, resolution: str) -> str:
    """The setting in words, as the metric blocks name it."""
    return (f"{resolution}, threshold {setting.threshold:.2f}, "
            f"{'flip TTA' if setting.tta else 'no TTA'}, {POSTPROCESSING[setting.postprocess]}")
