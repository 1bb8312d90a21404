"""What an evaluation writes and says: metric blocks (full split and clean subset, with
intervals), the comparison with the published reference, the files of ``eval-<split>/`` and
the one-line console summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainseg_lib.io import atomic_write, atomic_write_json
from brainseg_lib.metrics.functional import ConfusionCounts, summarise
from brainseg_lib.metrics.intervals import bootstrap_ci
from brainseg_lib.rundir import METRICS_FILE, PER_IMAGE_FILE, THRESHOLDS_FILE, VARIANTS_FILE

# the published reference method's test figures (U-Net/ResNet-34, BCE, Adam)
REFERENCE = {"test_loss": 0.07201, "test_iou": 0.80568}


def metric_block(counts: ConfusionCounts, dists: np.ndarray, batch_size: int, n_boot: int,
                 seed: int, setting: str) -> dict[str, Any]:
    """Every metric of one setting on one set of images, with bootstrap 95 % intervals."""
    block = {"setting": setting, "metrics": summarise(counts, batch_size, dists)}
    if n_boot:
        block["ci95"] = bootstrap_ci(counts, dists, n_boot, seed)
    return block


def add_metric_blocks(out: dict[str, Any], key: str, counts: ConfusionCounts,
                      dists: np.ndarray, clean: np.ndarray | None, batch_size: int,
                      n_boot: int, seed: int, label: str) -> None:
    """``out[key]`` for the full split and, when ``clean`` marks a subset, ``out[key_clean]``."""
    out[key] = metric_block(counts, dists, batch_size, n_boot, seed, label)
    if clean is not None and clean.any():
        idx = np.flatnonzero(clean)
        out[f"{key}_clean"] = metric_block(counts.take(idx), dists[idx], batch_size, n_boot,
                                           seed, label + "; clean test subset")


def reference_comparison(out: dict[str, Any]) -> dict[str, float]:
    """The reference's two figures beside ours, each key saying what it is compared with."""
    m = out["headline"]["metrics"]
    return {
        "reference_test_loss (BCE)": REFERENCE["test_loss"],
        "our_test_bce": out["loss"]["bce"],
        "reference_test_iou (as published; closest to fg+bg mIoU)": REFERENCE["test_iou"],
        "our_fg_bg_miou": m["fg_bg_miou"],
        "our_batch_pooled_iou": m["batch_pooled_iou"],
        "our_pooled_foreground_iou": m["pooled_iou"],
    }


def write_evaluation(out_dir: Path, out: dict[str, Any], per_image: pd.DataFrame,
                     variants: pd.DataFrame, thresholds: pd.DataFrame) -> None:
    """``metrics.json``, ``per_image.csv``, ``variants.csv`` and ``threshold_curve.csv``."""
    atomic_write_json(out_dir / METRICS_FILE, out)
    for name, table in ((PER_IMAGE_FILE, per_image), (VARIANTS_FILE, variants),
                        (THRESHOLDS_FILE, thresholds)):
        atomic_write(out_dir / name, lambda tmp, t=table: t.to_csv(tmp, index=False))


def console_summary(out: dict[str, Any]) -> str:
    """One line: loss, the plain setting's headline figures (full, clean), the selected one."""
    m, loss = out["headline"]["metrics"], out["loss"]
    line = (f"{out['split']} {loss['name']} loss {loss['value']:.4f} (BCE {loss['bce']:.4f}) | "
            f"pooled IoU {m['pooled_iou']:.4f} | mean image Dice {m['mean_image_dice']:.4f} | "
            f"fg+bg mIoU {m['fg_bg_miou']:.4f}")
    if "headline_clean" in out:
        c = out["headline_clean"]["metrics"]
        line += (f" | clean subset ({out['clean_test']['images']}): pooled IoU "
                 f"{c['pooled_iou']:.4f}, image Dice {c['mean_image_dice']:.4f}")
    s = out["selected"]
    return (line + f" | chosen on {out['chosen_on']}: {s['setting']} -> pooled IoU "
            f"{s['metrics']['pooled_iou']:.4f}, mean image Dice "
            f"{s['metrics']['mean_image_dice']:.4f}")
