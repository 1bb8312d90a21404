"""Figures for the reports; every one titled, labelled and returned (never only shown).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

GT_COLOUR, PRED_COLOUR = "#2ca02c", "#d62728"


def _grey(image_chw: np.ndarray) -> np.ndarray:
    return image_chw[0] if image_chw.ndim == 3 else image_chw


def _outline(ax: plt.Axes, mask: np.ndarray, colour: str) -> None:
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)


def _tint(ax: plt.Axes, mask: np.ndarray, colour: str, alpha: float = 0.4) -> None:
    rgba = np.zeros((*mask.shape, 4))
    rgba[..., :3] = plt.matplotlib.colors.to_rgb(colour)
    rgba[..., 3] = mask.astype(float) * alpha
    ax.imshow(rgba)


def learning_curves(history: pd.DataFrame, monitor: str = "val_loss",
                    best_epoch: int | None = None) -> Figure:
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    panels = [("Loss", ["train_loss", "val_loss"]), ("Validation IoU (pooled)", ["val_iou"]),
              ("Validation Dice (pooled)", ["val_dice"]), ("Learning rate", ["lr"])]
    for ax, (title, cols) in zip(axes, panels, strict=True):
        for col in cols:
            ax.plot(history.epoch, history[col], marker=".", label=col)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best ({monitor})")
        ax.set(title=title, xlabel="epoch")
        ax.legend(fontsize=8)
    fig.suptitle("Learning curves")
    fig.tight_layout()
    return fig


def dataset_geometry(boxes: pd.DataFrame) -> Figure:
    """Tumour box area and position distributions per split."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    sns.histplot(boxes, x="area_fraction", hue="split", stat="density", common_norm=False,
                 element="step", bins=40, ax=axes[0])
    axes[0].set(title="Tumour box area", xlabel="fraction of the image", ylabel="density")
    sns.scatterplot(boxes, x="centre_x", y="centre_y", hue="split", s=8, alpha=0.5,
                    ax=axes[1])
    axes[1].set(title="Tumour box centres", xlabel="x (fraction of width)",
                ylabel="y (fraction of height)", xlim=(0, 1), ylim=(1, 0))
    axes[1].set_aspect("equal")
    sns.scatterplot(boxes, x="width_fraction", y="height_fraction", hue="split", s=8,
                    alpha=0.5, ax=axes[2])
    axes[2].set(title="Tumour box shape", xlabel="width (fraction)", ylabel="height (fraction)")
    fig.tight_layout()
    return fig


def sample_grid(images: np.ndarray, masks: np.ndarray, titles: list[str],
                title: str = "Samples with their tumour masks outlined", cols: int = 4
                ) -> Figure:
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, mask, t in zip(axes.ravel(), images, masks, titles, strict=False):
        ax.imshow(_grey(img), cmap="gray")
        _outline(ax, mask, GT_COLOUR)
        ax.set_title(t, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def zoom_window(*masks: np.ndarray, margin: float = 0.5, min_frac: float = 0.2,
                ) -> tuple[slice, slice]:
    """A square window around everything the masks mark (tumour boxes are ~3 % of the image
    and vanish at thumbnail size): their joint bounding box grown by ``margin`` of its side,
    at least ``min_frac`` of the image, kept inside it. The centre when the masks are empty."""
    h, w = masks[0].shape
    ys, xs = np.nonzero(np.logical_or.reduce([m > 0 for m in masks]))
    if len(ys) == 0:
        ys, xs = np.array([h // 2]), np.array([w // 2])
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    side = int(min(max(side * (1 + 2 * margin), min_frac * max(h, w)), h, w))
    cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
    top = int(np.clip(cy - side // 2, 0, h - side))
    left = int(np.clip(cx - side // 2, 0, w - side))
    return slice(top, top + side), slice(left, left + side)


def overlay_rows(images: np.ndarray, targets: np.ndarray, preds: np.ndarray,
                 titles: list[str], title: str, zoom_on_both: bool = False) -> Figure:
    """Like the reference: original | ground truth on the image | prediction on the image,
    plus a zoom on the tumour with truth and prediction outlined (``zoom_on_both``: on
    truth and prediction together, so a false alarm away from the tumour is in the crop)."""
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(10.5, 2.8 * n), squeeze=False)
    for row, (img, gt, pr, t) in enumerate(zip(images, targets, preds, titles, strict=True)):
        g = _grey(img)
        rows, cols = (zoom_window(gt, pr) if zoom_on_both  # the tumour, or what was found
                      else zoom_window(gt if gt.any() else pr))
        zoom = axes[row, 3]
        for ax, picture in zip(axes[row], (g, g, g, g[rows, cols]), strict=True):
            ax.imshow(picture, cmap="gray")
            ax.axis("off")
        _tint(axes[row, 1], gt, GT_COLOUR)
        _tint(axes[row, 2], pr, PRED_COLOUR)
        _outline(axes[row, 2], gt, GT_COLOUR)
        _outline(zoom, gt[rows, cols], GT_COLOUR)
        _outline(zoom, pr[rows, cols], PRED_COLOUR)
        axes[row, 0].set_title(f"original\n{t}", fontsize=8)
        axes[row, 1].set_title("ground truth (green)", fontsize=8)
        axes[row, 2].set_title("prediction (red), truth outlined", fontsize=8)
        zoom.set_title(f"zoom: rows {rows.start}-{rows.stop}, cols {cols.start}-{cols.stop}",
                       fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metric_by_size(per_image: pd.DataFrame, metric: str = "dice_headline",
                   bins: int = 5) -> Figure:
    df = per_image.copy()
    df["size bin"] = pd.qcut(df.tumour_area_fraction * 100, q=bins, duplicates="drop")
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.boxplot(df, x="size bin", y=metric, ax=ax, color="#9ecae1")
    sns.stripplot(df, x="size bin", y=metric, ax=ax, size=2.5, color="k", alpha=0.5)
    ax.set(title=f"Per-image {metric.split('_')[0].upper()} by tumour size (quintiles)",
           xlabel="tumour area, % of image", ylabel=metric.replace("_", " "), ylim=(-0.02, 1.02))
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def threshold_curve(curve: pd.DataFrame, chosen: float | None = None) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    for col, label in (("pooled_iou", "foreground IoU (pooled)"),
                       ("mean_image_dice", "mean per-image Dice"),
                       ("precision", "precision"), ("recall", "recall")):
        ax.plot(curve.threshold, curve[col], marker=".", label=label)
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen {chosen:.2f}")
    ax.set(title="Threshold on the validation split (no TTA, no post-processing)",
           xlabel="probability threshold", ylabel="score", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def variants_chart(variants: pd.DataFrame) -> Figure:
    df = variants.copy()
    df["setting"] = df.apply(lambda r: f"{r.postprocess}, t={r.threshold:.2f}"
                             f"{', TTA' if r.tta else ''}", axis=1)
    df = df.sort_values("pooled_iou")
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(df) + 1.2))
    ax.barh(df.setting, df.pooled_iou, color="#6baed6")
    lo = max(0.0, df.pooled_iou.min() - 0.05)
    ax.set(xlim=(lo, min(1.0, df.pooled_iou.max() + 0.02)),
           title="Validation: threshold, TTA and post-processing",
           xlabel="foreground IoU (pooled), validation split")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return fig


def learning_curves_overlay(histories: dict[str, pd.DataFrame]) -> Figure:
    """Validation loss and IoU of several runs against the epoch, one line per run."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8))
    for ax, (col, title) in zip(axes, (("val_loss", "Validation loss"),
                                       ("val_iou", "Validation IoU (pooled)")), strict=True):
        for name, history in histories.items():
            if col in history:
                ax.plot(history.epoch, history[col], marker=".", ms=3, label=name)
        ax.set(title=title, xlabel="epoch")
        ax.legend(fontsize=8)
    fig.suptitle("Learning curves")
    fig.tight_layout()
    return fig


def paired_scatter(a: pd.Series, b: pd.Series, name_a: str, name_b: str,
                   clean: pd.Series | None = None) -> Figure:
    """Per-image Dice of run B against run A; points above the diagonal are B's wins."""
    fig, ax = plt.subplots(figsize=(5, 5))
    groups = [(np.ones(len(a), bool), "test image", "tab:blue")] if clean is None else [
        (clean.to_numpy(bool), "clean", "tab:blue"),
        (~clean.to_numpy(bool), "has a near-duplicate in train/valid", "tab:orange")]
    for keep, label, colour in groups:
        ax.scatter(a[keep], b[keep], s=12, alpha=0.6, color=colour, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    wins = int((b > a).sum()), int((b < a).sum())
    ax.set(xlabel=f"Dice, {name_a}", ylabel=f"Dice, {name_b}", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title=f"Per-image Dice: B higher on {wins[0]}, lower on "
                                     f"{wins[1]} images")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def reliability_diagram(calibration: dict[str, Any]) -> Figure:
    """Observed tumour frequency against the mean predicted probability per bin, raw and
    temperature-scaled (from ``metrics.json``'s calibration record), with the pixels per bin
    (log scale) beneath: most pixels are background predicted near 0."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(6, 7), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    t = calibration["temperature"]
    for name, label, colour in (("raw", "raw", "tab:blue"),
                                ("temperature_scaled", f"temperature-scaled (T = {t:.2f})",
                                 "tab:orange")):
        rec = calibration[name]
        ece = rec["metrics"]["ece"]
        ax.plot(rec["reliability"]["mean_probability"], rec["reliability"]["observed_frequency"],
                marker="o", ms=4, color=colour, label=f"{label}: ECE {ece:.4f}")
        centres = (np.array(rec["reliability"]["low"]) + rec["reliability"]["high"]) / 2
        counts.bar(centres + (0.01 if name == "raw" else -0.01), rec["reliability"]["pixels"],
                   width=0.02, color=colour)
    ax.set(title="Reliability (test pixels, plain setting)", ylabel="observed tumour frequency",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left")
    counts.set(yscale="log", xlabel="predicted tumour probability", ylabel="pixels")
    fig.tight_layout()
    return fig
