"""Evaluation of a trained run on a split, honest about what each number measures.

The *headline* setting is the plain method: the model's resolution, threshold 0.5, no
test-time augmentation (TTA), no post-processing. Threshold, TTA and post-processing are
then chosen on the **validation** split only and the chosen setting is reported on test, so
no test number is tuned on test. Everything is also scored at the images' source
resolution (probabilities resized back bilinearly, ground truth rasterised from the COCO
annotations at full size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from brainseg_lib.metrics.functional import (
    ConfusionCounts,
    summarise,
)
from brainseg_lib.metrics.intervals import bootstrap_ci

if TYPE_CHECKING:
    from brainseg_lib.evaluation.evaluate import EvalSettings

REFERENCE = {"test_loss": 0.07201, "test_iou": 0.80568}


def metric_block(counts: ConfusionCounts, dists: np.ndarray, batch_size: int, n_boot: int,
           seed: int, setting: str) -> dict[str, Any]:
    block = {"setting": setting, "metrics": summarise(counts, batch_size, dists)}
    if n_boot:
        block["ci95"] = bootstrap_ci(counts, dists, n_boot, seed)
    return block


def add_metric_blocks(out: dict[str, Any], key: str, counts: ConfusionCounts, dists: np.ndarray,
            clean: np.ndarray | None, batch_size: int, st: EvalSettings, label: str) -> None:
    out[key] = metric_block(counts, dists, batch_size, st.bootstrap, st.seed, label)
    if clean is not None and clean.any():
        idx = np.flatnonzero(clean)
        out[f"{key}_clean"] = metric_block(counts.take(idx), dists[idx], batch_size, st.bootstrap,
                                     st.seed, label + "; clean test subset")
