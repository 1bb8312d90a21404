"""What an evaluation writes and says: metric blocks (full split and clean subset, with
intervals), the comparison with the published reference, the files of ``eval-<split>/`` and
the one-line console summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainseg_lib.io import atomic_write, atomic_write_json
from brainseg_lib.metrics.calibration import (
    CALIBRATION_DEFINITIONS,
    N_BINS,
    reliability_bins,
    summarise_calibration,
    take_images,
)
from brainseg_lib.metrics.functional import ConfusionCounts, summarise
from brainseg_lib.metrics.intervals import (
    bootstrap_ci,
    calibration_bootstrap_ci,
    lesion_bootstrap_ci,
)
from brainseg_lib.metrics.lesion import FIELDS, LESION_DILATION, summarise_lesions
from brainseg_lib.rundir import METRICS_FILE, PER_IMAGE_FILE, THRESHOLDS_FILE, VARIANTS_FILE

# the published reference method's test figures (U-Net/ResNet-34, BCE, Adam)
REFERENCE = {"test_loss": 0.07201, "test_iou": 0.80568}


LESION_RULE = (f"true lesions: the COCO annotations; predicted lesions: 8-connected "
               f"components of the mask; BraTS 2023 overlap rule, each lesion dilated "
               f"{LESION_DILATION} px; a missed lesion and each false-positive component "
               "score Dice 0 and HD95 = the image diagonal; PQ matches at IoU >= 0.5")


def _take(table: dict[str, np.ndarray] | None, idx: np.ndarray) -> dict[str, np.ndarray] | None:
    return None if table is None else {k: table[k][idx] for k in FIELDS}


def metric_block(counts: ConfusionCounts, dists: np.ndarray, batch_size: int, n_boot: int,
                 seed: int, setting: str,
                 lesions: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every metric of one setting on one set of images, with bootstrap 95 % intervals;
    ``lesions``: per-image lesion tallies (:func:`.lesion.lesion_table`) add the lesion-wise
    figures."""
    block = {"setting": setting, "metrics": summarise(counts, batch_size, dists)}
    if lesions is not None:
        block["metrics"] |= summarise_lesions(lesions)
    if n_boot and len(counts) > 1:  # a bootstrap needs two images (a small group may not)
        block["ci95"] = bootstrap_ci(counts, dists, n_boot, seed)
        if lesions is not None:
            block["ci95"] |= lesion_bootstrap_ci(lesions, n_boot, seed)
    return block


def add_metric_blocks(out: dict[str, Any], key: str, counts: ConfusionCounts,
                      dists: np.ndarray, clean: np.ndarray | None, batch_size: int,
                      n_boot: int, seed: int, label: str,
                      lesions: dict[str, np.ndarray] | None = None,
                      groups: dict[str, np.ndarray] | None = None) -> None:
    """``out[key]`` for the full split and, when ``clean`` marks a subset, ``out[key_clean]``;
    for each of ``groups`` (a name and one label per image: the annotation sub-class, the
    size quintile) ``out[key_by_<name>][label]``, one block per label on the full split."""
    out[key] = metric_block(counts, dists, batch_size, n_boot, seed, label, lesions)
    if clean is not None and clean.any():
        idx = np.flatnonzero(clean)
        out[f"{key}_clean"] = metric_block(counts.take(idx), dists[idx], batch_size, n_boot,
                                           seed, label + "; clean test subset",
                                           _take(lesions, idx))
    for name, labels in (groups or {}).items():
        out[f"{key}_by_{name}"] = {
            str(value): {"images": len(idx)} | metric_block(
                counts.take(idx), dists[idx], batch_size, n_boot, seed,
                f"{label}; {name} {value}", _take(lesions, idx))
            for value in sorted(set(labels))
            for idx in [np.flatnonzero(labels == value)]}


def calibration_record(tallies: dict[str, np.ndarray], scaled: dict[str, np.ndarray],
                       temperature: float, fitted_on: str, clean: np.ndarray | None,
                       n_boot: int, seed: int) -> dict[str, Any]:
    """Calibration of the raw and temperature-scaled probabilities (full split and clean
    subset, with intervals) and the reliability diagram's bins."""
    def block(t: dict[str, np.ndarray]) -> dict[str, Any]:
        b = {"metrics": summarise_calibration(t)}
        if n_boot and len(t["pixels"]) > 1:
            b["ci95"] = calibration_bootstrap_ci(t, n_boot, seed)
        return b

    rec: dict[str, Any] = {
        "definitions": CALIBRATION_DEFINITIONS,
        "binning": f"{N_BINS} equal-width bins of p(tumour) on [0, 1], every pixel of every "
                   "image at the model's resolution, plain setting (no TTA)",
        "temperature": temperature, "temperature_fitted_on": fitted_on,
        "note": "temperature scaling divides the logits by T > 0: probabilities keep their "
                "order and 0.5 stays at logit 0, so no mask at threshold 0.5 changes",
    }
    for name, t in (("raw", tallies), ("temperature_scaled", scaled)):
        rec[name] = block(t) | {"reliability": reliability_bins(t)}
        if clean is not None and clean.any():
            rec[f"{name}_clean"] = block(take_images(t, np.flatnonzero(clean)))
    return rec


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
    line += (f" | chosen on {out['chosen_on']}: {s['setting']} -> pooled IoU "
             f"{s['metrics']['pooled_iou']:.4f}, mean image Dice "
             f"{s['metrics']['mean_image_dice']:.4f}")
    return line + ("\n" + lesion_summary(out) if "lesion_dice" in m else "")


def lesion_summary(out: dict[str, Any]) -> str:
    """The lesion-wise line printed beside the pixel line: plain setting, full and clean."""
    def part(block: dict[str, Any]) -> str:
        m = block["metrics"]
        return (f"lesion sensitivity {m['lesion_sensitivity']:.3f} "
                f"({m['true_lesions']} lesions), FP components/image "
                f"{m['fp_components_per_image']:.3f}, lesion Dice {m['lesion_dice']:.4f}, "
                f"lesion HD95 {m['lesion_hd95']:.1f} px, PQ {m['pq']:.4f}")

    line = f"{out['split']} lesion-wise (BraTS 2023 rule): {part(out['headline'])}"
    if "headline_clean" in out:
        line += f" | clean subset: {part(out['headline_clean'])}"
    return line
