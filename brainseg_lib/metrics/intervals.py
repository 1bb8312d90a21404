"""Bootstrap 95 % confidence intervals over images, with ``scipy.stats.bootstrap`` (BCa).

Images are resampled with replacement and every metric is recomputed from the resampled
per-image counts with the formulas of :mod:`.functional`. Comparisons are paired: both runs
are resampled on the same images, so what they share (hard images, easy images) cancels
out of the interval of their difference. When every resample gives the same value (a run
against itself, a perfect model) the interval is that value.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

from brainseg_lib.metrics.calibration import calibration_metrics
from brainseg_lib.metrics.functional import ConfusionCounts, count_metrics, dice, iou
from brainseg_lib.metrics.lesion import FIELDS as LESION_FIELDS
from brainseg_lib.metrics.lesion import LESION_DEFINITIONS, lesion_metrics

Interval = tuple[float, float]


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable[..., np.ndarray],
               n_resamples: int, seed: int) -> np.ndarray:
    """(2, k) low/high bounds of a vector-valued statistic of paired per-image arrays."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(data, statistic, n_resamples=n_resamples, paired=True,
                                 vectorized=True, method="BCa", rng=np.random.default_rng(seed))
    bounds = np.array([result.confidence_interval.low, result.confidence_interval.high])
    degenerate = ~np.isfinite(bounds).all(axis=0)  # BCa is undefined when nothing varies
    if degenerate.any():
        spread = np.percentile(result.bootstrap_distribution, [2.5, 97.5], axis=-1)
        bounds[:, degenerate] = spread[:, degenerate]
    return bounds


def bootstrap_ci(c: ConfusionCounts, hd95_values: np.ndarray | None = None,
                 n_resamples: int = 1000, seed: int = 0) -> dict[str, Interval]:
    """95 % intervals of the pooled and per-image metrics (and mean HD95 over the images
    where it is defined), resampling images with replacement."""
    keys = list(count_metrics(c.tp[:1], c.fp[:1], c.fn[:1], c.tn[:1]))

    def statistic(tp, fp, fn, tn, axis=-1):
        return np.stack(list(count_metrics(tp, fp, fn, tn, axis).values()))

    bounds = _bootstrap((c.tp, c.fp, c.fn, c.tn), statistic, n_resamples, seed)
    out = {k: (float(bounds[0, i]), float(bounds[1, i])) for i, k in enumerate(keys)}
    if hd95_values is not None and np.isfinite(hd95_values).sum() > 1:
        finite = hd95_values[np.isfinite(hd95_values)]
        hd = _bootstrap((finite,), lambda v, axis=-1: np.mean(v, axis)[None], n_resamples,
                        seed)
        out["hd95"] = (float(hd[0, 0]), float(hd[1, 0]))
    return out


def paired_bootstrap(a: ConfusionCounts, b: ConfusionCounts, n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """B minus A on the same images: (difference, 95 % low, 95 % high) of pooled IoU and
    mean image Dice, both runs resampled on one set of images."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same images ({len(a)} vs {len(b)})")

    def statistic(*counts, axis=-1):  # a's tp, fp, fn, then b's
        runs = (counts[:3], counts[3:])
        pooled = [iou(*(x.sum(axis) for x in run)) for run in runs]
        per_image = [dice(*run).mean(axis) for run in runs]
        return np.stack([pooled[1] - pooled[0], per_image[1] - per_image[0]])

    data = (a.tp, a.fp, a.fn, b.tp, b.fp, b.fn)
    point = statistic(*data)
    bounds = _bootstrap(data, statistic, n_resamples, seed)
    return {k: (float(point[i]), float(bounds[0, i]), float(bounds[1, i]))
            for i, k in enumerate(("pooled_iou", "mean_image_dice"))}


def lesion_bootstrap_ci(table: dict[str, np.ndarray], n_resamples: int = 1000,
                        seed: int = 0) -> dict[str, Interval]:
    """95 % intervals of the lesion-wise figures (:func:`.lesion.lesion_metrics`) from
    per-image tallies (:func:`.lesion.lesion_table`), resampling images."""
    data = tuple(table[f] for f in LESION_FIELDS)

    def statistic(*arrays, axis=-1):
        m = lesion_metrics(dict(zip(LESION_FIELDS, arrays, strict=True)), axis)
        return np.stack([m[k] for k in LESION_DEFINITIONS])

    bounds = _bootstrap(data, statistic, n_resamples, seed)
    return {k: (float(bounds[0, i]), float(bounds[1, i]))
            for i, k in enumerate(LESION_DEFINITIONS)}


def calibration_bootstrap_ci(tallies: dict[str, np.ndarray], n_resamples: int = 1000,
                             seed: int = 0) -> dict[str, Interval]:
    """95 % intervals of ECE and Brier score (:func:`.calibration.calibration_metrics`),
    resampling images; each bin's tallies travel with their image."""
    n_bins = len(tallies["count"])
    data = (*tallies["count"], *tallies["prob_sum"], *tallies["positive"],
            tallies["sq_err"], tallies["pixels"])

    def statistic(*arrays, axis=-1):
        parts = [np.stack(arrays[i * n_bins:(i + 1) * n_bins]) for i in range(3)]
        m = calibration_metrics(*parts, arrays[-2], arrays[-1], axis=axis)
        return np.stack([m["ece"], m["brier"]])

    bounds = _bootstrap(data, statistic, n_resamples, seed)
    return {k: (float(bounds[0, i]), float(bounds[1, i])) for i, k in enumerate(("ece",
                                                                                  "brier"))}


def paired_lesion_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                            n_resamples: int = 1000, seed: int = 0,
                            ) -> dict[str, tuple[float, float, float]]:
    """B minus A on the same images: (difference, 95 % low, 95 % high) of every lesion-wise
    figure, both runs' per-image tallies resampled on one set of images."""
    if len(a["lesions"]) != len(b["lesions"]):
        raise ValueError(f"paired comparison needs the same images ({len(a['lesions'])} vs "
                         f"{len(b['lesions'])})")
    k = len(LESION_FIELDS)

    def statistic(*arrays, axis=-1):
        ma, mb = (lesion_metrics(dict(zip(LESION_FIELDS, run, strict=True)), axis)
                  for run in (arrays[:k], arrays[k:]))
        return np.stack([mb[key] - ma[key] for key in LESION_DEFINITIONS])

    data = tuple(a[f] for f in LESION_FIELDS) + tuple(b[f] for f in LESION_FIELDS)
    point = statistic(*data)
    bounds = _bootstrap(data, statistic, n_resamples, seed)
    return {key: (float(point[i]), float(bounds[0, i]), float(bounds[1, i]))
            for i, key in enumerate(LESION_DEFINITIONS)}
