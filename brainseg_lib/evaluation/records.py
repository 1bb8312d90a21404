"""What an evaluation writes and says: metric blocks (full split and clean subset, with
intervals), the comparison with the published reference, the files of ``eval-<split>/`` and
the one-line console summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainseg_lib.evaluation.result import (
    Calibration,
    CalibrationBlock,
    EvalSettings,
    Evaluation,
    Header,
    MetricBlock,
    SettingScores,
)
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
CALIBRATION_TEXTS = {
    "definitions": CALIBRATION_DEFINITIONS,
    "binning": f"{N_BINS} equal-width bins of p(tumour) on [0, 1], every pixel of every "
               "image at the model's resolution, plain setting (no TTA)",
    "note": "temperature scaling divides the logits by T > 0: probabilities keep their "
            "order and 0.5 stays at logit 0, so no mask at threshold 0.5 changes",
}


@dataclass(frozen=True)
class Scored:
    """One setting's per-image outcome on a split: confusion counts, HD95 and (when scored)
    the lesion tallies of :func:`.lesion.lesion_table`."""

    counts: ConfusionCounts
    dists: np.ndarray
    lesions: dict[str, np.ndarray] | None = None

    def take(self, idx: np.ndarray) -> Scored:
        """The same outcome on the images ``idx``."""
        lesions = None if self.lesions is None else {k: self.lesions[k][idx] for k in FIELDS}
        return Scored(self.counts.take(idx), self.dists[idx], lesions)


def metric_block(scored: Scored, label: str, batch_size: int, scoring: EvalSettings,
                 images: int | None = None) -> MetricBlock:
    """Every metric of one setting on one set of images, with bootstrap 95 % intervals
    (``scoring.bootstrap`` resamples, ``scoring.seed``); lesion-wise figures when ``scored``
    has them."""
    metrics = summarise(scored.counts, batch_size, scored.dists)
    if scored.lesions is not None:
        metrics |= summarise_lesions(scored.lesions)
    ci95 = None
    if scoring.bootstrap and len(scored.counts) > 1:  # a bootstrap needs two images
        ci95 = bootstrap_ci(scored.counts, scored.dists, scoring.bootstrap, scoring.seed)
        if scored.lesions is not None:
            ci95 |= lesion_bootstrap_ci(scored.lesions, scoring.bootstrap, scoring.seed)
    return MetricBlock(label, metrics, ci95, images)


def setting_scores(scored: Scored, label: str, clean: np.ndarray | None,
                   groups: dict[str, np.ndarray], batch_size: int, scoring: EvalSettings,
                   ) -> SettingScores:
    """One setting's blocks: the full split; the clean subset when ``clean`` marks one; one
    block per label of each of ``groups`` (a name and one label per image: the annotation
    sub-class, the size quintile) on the full split."""
    clean_block = None
    if clean is not None and clean.any():
        clean_block = metric_block(scored.take(np.flatnonzero(clean)),
                                   label + "; clean test subset", batch_size, scoring)
    by_group = {
        name: {str(value): metric_block(scored.take(idx), f"{label}; {name} {value}",
                                        batch_size, scoring, len(idx))
               for value in sorted(set(labels)) for idx in [np.flatnonzero(labels == value)]}
        for name, labels in groups.items()}
    return SettingScores(metric_block(scored, label, batch_size, scoring), clean_block, by_group)


def calibration_record(tallies: dict[str, np.ndarray], scaled: dict[str, np.ndarray],
                       temperature: float, fitted_on: str, clean: np.ndarray | None,
                       scoring: EvalSettings) -> Calibration:
    """Calibration of the raw and temperature-scaled probabilities (full split and clean
    subset, with intervals) and the reliability diagram's bins."""
    def block(t: dict[str, np.ndarray], bins: bool) -> CalibrationBlock:
        ci95 = (calibration_bootstrap_ci(t, scoring.bootstrap, scoring.seed)
                if scoring.bootstrap and len(t["pixels"]) > 1 else None)
        return CalibrationBlock(summarise_calibration(t), ci95,
                                reliability_bins(t) if bins else None)

    def on_clean(t: dict[str, np.ndarray]) -> CalibrationBlock | None:
        if clean is None or not clean.any():
            return None
        return block(take_images(t, np.flatnonzero(clean)), False)

    return Calibration(temperature, fitted_on, block(tallies, True), block(scaled, True),
                       on_clean(tallies), on_clean(scaled), CALIBRATION_TEXTS)


def reference_comparison(header: Header, headline: MetricBlock) -> dict[str, float]:
    """The reference's two figures beside ours, each key saying what it is compared with."""
    m = headline.metrics
    return {
        "reference_test_loss (BCE)": REFERENCE["test_loss"],
        "our_test_bce": header.loss.bce,
        "reference_test_iou (as published; closest to fg+bg mIoU)": REFERENCE["test_iou"],
        "our_fg_bg_miou": m["fg_bg_miou"],
        "our_batch_pooled_iou": m["batch_pooled_iou"],
        "our_pooled_foreground_iou": m["pooled_iou"],
    }


def write_evaluation(out_dir: Path, result: Evaluation, per_image: pd.DataFrame,
                     variants: pd.DataFrame, thresholds: pd.DataFrame) -> None:
    """``metrics.json``, ``per_image.csv``, ``variants.csv`` and ``threshold_curve.csv``."""
    atomic_write_json(out_dir / METRICS_FILE, result.to_json())
    for name, table in ((PER_IMAGE_FILE, per_image), (VARIANTS_FILE, variants),
                        (THRESHOLDS_FILE, thresholds)):
        atomic_write(out_dir / name, lambda tmp, t=table: t.to_csv(tmp, index=False))


def console_summary(result: Evaluation) -> str:
    """One line: loss, the plain setting's headline figures (full, clean), the selected one."""
    h, head = result.header, result.headline
    m, loss = head.full.metrics, h.loss
    line = (f"{h.split} {loss.name} loss {loss.value:.4f} (BCE {loss.bce:.4f}) | "
            f"pooled IoU {m['pooled_iou']:.4f} | mean image Dice {m['mean_image_dice']:.4f} | "
            f"fg+bg mIoU {m['fg_bg_miou']:.4f}")
    if head.clean is not None and h.clean_test is not None:
        c = head.clean.metrics
        line += (f" | clean subset ({h.clean_test.images}): pooled IoU "
                 f"{c['pooled_iou']:.4f}, image Dice {c['mean_image_dice']:.4f}")
    s = result.selected.full
    line += (f" | chosen on {h.chosen_on}: {s.setting} -> pooled IoU "
             f"{s.metrics['pooled_iou']:.4f}, mean image Dice "
             f"{s.metrics['mean_image_dice']:.4f}")
    return line + ("\n" + lesion_summary(result) if "lesion_dice" in m else "")


def lesion_summary(result: Evaluation) -> str:
    """The lesion-wise line printed beside the pixel line: plain setting, full and clean."""
    def part(block: MetricBlock) -> str:
        m = block.metrics
        return (f"lesion sensitivity {m['lesion_sensitivity']:.3f} "
                f"({m['true_lesions']} lesions), FP components/image "
                f"{m['fp_components_per_image']:.3f}, lesion Dice {m['lesion_dice']:.4f}, "
                f"lesion HD95 {m['lesion_hd95']:.1f} px, PQ {m['pq']:.4f}")

    head = result.headline
    line = f"{result.header.split} lesion-wise (BraTS 2023 rule): {part(head.full)}"
    if head.clean is not None:
        line += f" | clean subset: {part(head.clean)}"
    return line
