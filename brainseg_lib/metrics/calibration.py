"""Pixel-level calibration: can the model's probabilities be trusted as probabilities?

* **binning**: ``N_BINS`` = 15 equal-width bins of the predicted tumour probability on
  [0, 1] (the last bin closed); every pixel of every image counts.
* **reliability**: per bin, the mean predicted probability and the observed tumour frequency.
* **ECE** (expected calibration error) = sum over bins of (pixels in bin / all pixels) x
  |mean probability - observed frequency|. Background is ~97 % of the pixels and mostly
  predicted near 0, so ECE is small in absolute terms; compare models with it, and read the
  diagram.
* **Brier score** = mean over pixels of (p - y)^2.
* **temperature scaling** (Guo et al. 2017): logits divided by one scalar T fitted by
  minimising the pixel NLL on the **validation** split; it keeps the order of the
  probabilities and leaves 0.5 at logit 0, so no mask at threshold 0.5 changes.

Per-image tallies (pixels, probability sum and tumour count per bin, the squared-error sum)
let the bootstrap resample images, as for every other metric.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

N_BINS = 15
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before taking logits

CALIBRATION_DEFINITIONS = {
    "ece": f"Expected calibration error, {N_BINS} equal-width bins of p(tumour), all pixels",
    "brier": "Brier score: mean over pixels of (p - y)^2",
}


def calibration_tallies(probs: np.ndarray, labels: np.ndarray,
                        n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per-image tallies of (N,H,W) probabilities against (N,H,W) 0/1 labels: ``count``,
    ``prob_sum`` and ``positive`` (n_bins, N) per bin, ``sq_err`` and ``pixels`` (N,)."""
    n = len(probs)
    p = np.asarray(probs, np.float64).reshape(n, -1)
    y = np.asarray(labels, np.float64).reshape(n, -1)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    flat = (bins * n + np.arange(n)[:, None]).ravel()  # one index per (bin, image)

    def per_bin(weights: np.ndarray | None) -> np.ndarray:
        return np.bincount(flat, weights, minlength=n * n_bins).reshape(n_bins, n)

    return {"count": per_bin(None), "prob_sum": per_bin(p.ravel()),
            "positive": per_bin(y.ravel()), "sq_err": ((p - y) ** 2).sum(1),
            "pixels": np.full(n, p.shape[1], np.float64)}


def calibration_metrics(count: np.ndarray, prob_sum: np.ndarray, positive: np.ndarray,
                        sq_err: np.ndarray, pixels: np.ndarray,
                        axis: int = -1) -> dict[str, np.ndarray]:
    """ECE and Brier score from tallies: images along ``axis`` (the last), bins along the
    first axis of ``count``, ``prob_sum`` and ``positive``."""
    total = pixels.sum(axis)
    gap = np.abs(prob_sum.sum(axis) - positive.sum(axis))  # = n_b |mean p - freq|
    return {"ece": gap.sum(0) / total, "brier": sq_err.sum(axis) / total}


def reliability_bins(tallies: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """The reliability diagram's points: per bin, its edges, the pixel count, the mean
    probability and the observed tumour frequency (NaN for an empty bin)."""
    count = tallies["count"].sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = tallies["prob_sum"].sum(-1) / count
        freq = tallies["positive"].sum(-1) / count
    edges = np.linspace(0, 1, count.size + 1)
    return {"low": edges[:-1].tolist(), "high": edges[1:].tolist(),
            "pixels": count.astype(int).tolist(), "mean_probability": mean_p.tolist(),
            "observed_frequency": freq.tolist()}


def take_images(tallies: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The tallies of a subset of images."""
    return {k: v[..., index] for k, v in tallies.items()}


def summarise_calibration(tallies: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v) for k, v in calibration_metrics(**tallies).items()}


def logits_of(probs: np.ndarray) -> np.ndarray:
    """Logits back from sigmoid probabilities (float32), clipped to [EPS, 1 - EPS]."""
    p = np.clip(np.asarray(probs, np.float32), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


FIT_PIXELS = 2**24  # the temperature is fitted on at most this many pixels (a regular stride)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the mean pixel NLL of sigmoid(logit / T), searched on
    log T in [log 0.05, log 20] (bounded Brent); beyond ``FIT_PIXELS`` pixels every k-th
    pixel is used, which keeps memory bounded for out-of-fold predictions of a whole dataset."""
    step = -(-np.size(probs) // FIT_PIXELS)
    z = logits_of(np.ravel(probs)[::step])
    y = np.asarray(labels, np.float32).ravel()[::step]
    signed = np.where(y > 0, z, -z)  # NLL = softplus(-signed / T)

    def nll(log_t: float) -> float:
        return float(np.logaddexp(0, -signed / np.exp(log_t)).mean())

    res = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)),
                                   method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by ``temperature`` (float32)."""
    return (1 / (1 + np.exp(-logits_of(probs) / temperature))).astype(np.float32)
