"""Evaluation of a trained run on a split, honest about what each number measures.

The *headline* setting is the plain method: the model's resolution, threshold 0.5, no
test-time augmentation (TTA), no post-processing. Threshold, TTA and post-processing are
then chosen on the **validation** split only and the chosen setting is reported on test, so
no test number is tuned on test. Everything is also scored at the images' source
resolution (probabilities resized back bilinearly, ground truth rasterised from the COCO
annotations at full size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage

from brainseg_lib.coco import load_split
from brainseg_lib.dataset import SplitArrays, load_split_arrays
from brainseg_lib.io import atomic_write, atomic_write_json
from brainseg_lib.locate import DataSource, data_source
from brainseg_lib.losses import build_loss
from brainseg_lib.metrics import (
    HEADLINE,
    ConfusionCounts,
    bootstrap_ci,
    hd95,
    per_image_dice,
    per_image_iou,
    summarise,
)
from brainseg_lib.modeling.predict import LoadedModel, load_checkpoint, predict_logits

POSTPROCESSING = {
    "none": "no post-processing",
    "drop_small": "drop components smaller than min_component_px",
    "keep_largest": "keep the largest component only",
    "fill_box": "drop small components, fill each remaining one's bounding box",
}
THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)
REFERENCE = {"test_loss": 0.07201, "test_iou": 0.80568}


def postprocess(mask: np.ndarray, method: str, min_px: int = 20) -> np.ndarray:
    """Clean one binary mask; the ground truth masks here are filled boxes."""
    if method == "none" or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    if method == "keep_largest":
        return labels == (np.argmax(sizes) + 1)
    keep = np.flatnonzero(sizes >= min_px) + 1
    if method == "drop_small":
        return np.isin(labels, keep)
    if method == "fill_box":
        out = np.zeros_like(mask, dtype=bool)
        for sl, label in zip(ndimage.find_objects(labels), range(1, n + 1), strict=True):
            if label in keep:
                out[sl] = True
        return out
    raise ValueError(f"unknown post-processing '{method}': use {', '.join(POSTPROCESSING)}")


@dataclass
class SplitPrediction:
    """Probabilities at the model's resolution for one split, with and without TTA."""

    arrays: SplitArrays
    probs: np.ndarray  # (N,H,W) float32
    probs_tta: np.ndarray | None
    loss: float  # the run's own loss, mean per image
    bce: float  # BCE, mean per image (the reference's loss, comparable across runs)


def predict_split(loaded: LoadedModel, arrays: SplitArrays, tta: bool,
                  batch_size: int = 32) -> SplitPrediction:
    loss_fn, bce_fn = build_loss(loaded.params.loss), torch.nn.BCEWithLogitsLoss()
    probs, probs_tta = [], []
    loss = torch.zeros((), device=loaded.device)
    bce = torch.zeros((), device=loaded.device)
    for i in range(0, len(arrays), batch_size):
        x = torch.from_numpy(arrays.images[i:i + batch_size])
        y = torch.from_numpy(arrays.masks[i:i + batch_size]).to(loaded.device)
        y = y.unsqueeze(1).float()
        logits = predict_logits(loaded, x)
        loss += loss_fn(logits, y) * len(x)
        bce += bce_fn(logits, y) * len(x)
        probs.append(torch.sigmoid(logits)[:, 0].cpu().numpy())
        if tta:
            probs_tta.append(torch.sigmoid(predict_logits(loaded, x, tta=True))[:, 0]
                             .cpu().numpy())
    n = len(arrays)
    return SplitPrediction(arrays, np.concatenate(probs),
                           np.concatenate(probs_tta) if tta else None, loss.item() / n,
                           bce.item() / n)


def binarise(probs: np.ndarray, threshold: float, method: str, min_px: int) -> np.ndarray:
    masks = probs >= threshold
    if method != "none":
        masks = np.stack([postprocess(m, method, min_px) for m in masks])
    return masks


def score(pred: SplitPrediction, threshold: float, tta: bool, method: str,
          min_px: int) -> ConfusionCounts:
    probs = pred.probs_tta if tta else pred.probs
    return ConfusionCounts.from_masks(binarise(probs, threshold, method, min_px),
                                      pred.arrays.masks)


def threshold_curve(pred: SplitPrediction, tta: bool = False) -> pd.DataFrame:
    rows = []
    for t in THRESHOLDS:
        s = summarise(score(pred, float(t), tta, "none", 0))
        rows.append({"threshold": float(t), "tta": tta, **s})
    return pd.DataFrame(rows)


def choose_setting(valid: SplitPrediction, min_px: int, tune_threshold: bool,
                   tta: bool) -> tuple[dict[str, Any], pd.DataFrame]:
    """Pick threshold, TTA and post-processing maximising pooled IoU on validation."""
    rows = []
    for use_tta in ([False, True] if tta else [False]):
        curve = threshold_curve(valid, use_tta) if tune_threshold else None
        best_t = float(curve.loc[curve.pooled_iou.idxmax(), "threshold"]) if tune_threshold \
            else 0.5
        for method in POSTPROCESSING:
            for t in sorted({0.5, best_t}):
                s = summarise(score(valid, t, use_tta, method, min_px))
                rows.append({"tta": use_tta, "postprocess": method, "threshold": t, **s})
    table = pd.DataFrame(rows)
    best = table.loc[table.pooled_iou.idxmax()]
    setting = {"threshold": float(best.threshold), "tta": bool(best.tta),
               "postprocess": str(best.postprocess)}
    return setting, table


def _per_image_original(pred: SplitPrediction, data_dir: Path, split: str, threshold: float,
                        tta: bool, method: str, min_px: int,
                        ) -> tuple[ConfusionCounts, np.ndarray]:
    """Counts and HD95 at each image's source size (probabilities resized bilinearly)."""
    coco = load_split(data_dir, split)
    by_name = {img["file_name"]: img for img in coco.images}
    probs = pred.probs_tta if tta else pred.probs
    counts, dists = [], []
    for name, prob in zip(pred.arrays.files, probs, strict=True):
        img = by_name[name]
        target = coco.mask(img)
        up = F.interpolate(torch.from_numpy(prob)[None, None], size=target.shape,
                           mode="bilinear", align_corners=False)[0, 0].numpy()
        mask = postprocess(up >= threshold, method, int(min_px * up.size / prob.size))
        counts.append(ConfusionCounts.from_masks(mask[None], target[None]))
        dists.append(hd95(mask, target))
    return ConfusionCounts.concat(counts), np.asarray(dists)


def _block(counts: ConfusionCounts, dists: np.ndarray, batch_size: int, n_boot: int,
           seed: int, setting: str) -> dict[str, Any]:
    block = {"setting": setting, "metrics": summarise(counts, batch_size, dists)}
    if n_boot:
        block["ci95"] = bootstrap_ci(counts, dists, n_boot, seed)
    return block


def describe(setting: dict[str, Any], resolution: str) -> str:
    return (f"{resolution}, threshold {setting['threshold']:.2f}, "
            f"{'flip TTA' if setting['tta'] else 'no TTA'}, "
            f"{POSTPROCESSING[setting['postprocess']]}")


def data_source_of(run_dir: Path, loaded: LoadedModel) -> DataSource:
    """The dataset the run was trained on, as recorded in env.json, else resolved anew."""
    import json

    env_file = run_dir / "env.json"
    if env_file.exists():
        recorded = json.loads(env_file.read_text()).get("dataset", {})
        path = Path(recorded.get("path", ""))
        if recorded and (path / "test").is_dir():
            return DataSource(path, recorded["kind"], recorded.get("found_by", "env.json"))
    return data_source(loaded.params)


def evaluate_run(run_dir: str | Path, split: str = "test", device: str = "auto",
                 verbose: bool = True) -> dict[str, Any]:
    """Evaluate ``run_dir/best.pt`` on ``split``; writes ``run_dir/eval-<split>/`` (and, for
    the test split, the run's ``metrics.json``).

    Files: ``metrics.json`` (all blocks below), ``per_image.csv``, ``variants.csv``
    (validation search), ``threshold_curve.csv`` (validation, no TTA).
    """
    run_dir = Path(run_dir)
    loaded = load_checkpoint(run_dir / "best.pt", device)
    p = loaded.params
    source = data_source_of(run_dir, loaded)
    test_arrays = load_split_arrays(source.path, split, p.image_size, p.cache_path())
    valid_arrays = load_split_arrays(source.path, "valid", p.image_size, p.cache_path())
    say = print if verbose else (lambda *a, **k: None)
    say(f"evaluating {run_dir.name} (epoch {loaded.epoch}) on {split}: {len(test_arrays)} "
        f"images, {source.kind} data, {loaded.device}")
    test = predict_split(loaded, test_arrays, p.tta)
    valid = predict_split(loaded, valid_arrays, p.tta)

    plain = {"threshold": p.threshold, "tta": False, "postprocess": "none"}
    chosen, variants = choose_setting(valid, p.min_component_px, p.tune_threshold, p.tta)
    res = f"{p.image_size}px (model resolution)"
    out: dict[str, Any] = {
        "run": run_dir.name, "split": split, "checkpoint_epoch": loaded.epoch,
        "dataset": {"kind": source.kind, "path": str(source.path), "images": len(test_arrays)},
        "loss": {"name": p.loss, "value": test.loss, "bce": test.bce},
        "definitions": HEADLINE, "batch_size_for_batch_pooled_iou": p.batch_size,
        "chosen_on_valid": chosen,
    }
    per_image = pd.DataFrame({"file": test_arrays.files,
                              "tumour_area_fraction": test_arrays.masks.mean((1, 2))})
    for key, setting in (("headline", plain), ("selected", chosen)):
        masks = binarise(test.probs_tta if setting["tta"] else test.probs,
                         setting["threshold"], setting["postprocess"], p.min_component_px)
        counts = ConfusionCounts.from_masks(masks, test_arrays.masks)
        dists = np.asarray([hd95(m, t) for m, t in zip(masks, test_arrays.masks, strict=True)])
        out[key] = _block(counts, dists, p.batch_size, p.bootstrap, p.seed,
                          describe(setting, res))
        per_image[f"iou_{key}"] = per_image_iou(counts)
        per_image[f"dice_{key}"] = per_image_dice(counts)
        per_image[f"hd95_{key}"] = dists
        per_image[f"pred_area_fraction_{key}"] = masks.mean((1, 2))
        if p.eval_original_size:
            c_orig, d_orig = _per_image_original(test, source.path, split,
                                                 setting["threshold"], setting["tta"],
                                                 setting["postprocess"], p.min_component_px)
            sizes = sorted({f"{w}x{h}" for h, w in test_arrays.source_sizes})
            out[f"{key}_original_resolution"] = _block(
                c_orig, d_orig, p.batch_size, p.bootstrap, p.seed,
                describe(setting, f"source resolution ({', '.join(sizes)})"))
    out["reference_comparison"] = {
        "reference_test_loss (BCE)": REFERENCE["test_loss"],
        "our_test_bce": test.bce,
        "reference_test_iou (as published; closest to fg+bg mIoU)": REFERENCE["test_iou"],
        "our_fg_bg_miou": out["headline"]["metrics"]["fg_bg_miou"],
        "our_batch_pooled_iou": out["headline"]["metrics"]["batch_pooled_iou"],
        "our_pooled_foreground_iou": out["headline"]["metrics"]["pooled_iou"],
    }
    eval_dir = run_dir / f"eval-{split}"
    atomic_write_json(eval_dir / "metrics.json", out)
    if split == "test":  # the run's headline file
        atomic_write_json(run_dir / "metrics.json", out)
    for name, table in (("per_image", per_image), ("variants", variants),
                        ("threshold_curve", threshold_curve(valid, False))):
        atomic_write(eval_dir / f"{name}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
    m = out["headline"]["metrics"]
    say(f"test {p.loss} loss {test.loss:.4f} (BCE {test.bce:.4f}) | pooled IoU "
        f"{m['pooled_iou']:.4f} | mean image Dice {m['mean_image_dice']:.4f} | fg+bg mIoU "
        f"{m['fg_bg_miou']:.4f} | chosen on valid: {describe(chosen, res)} -> pooled IoU "
        f"{out['selected']['metrics']['pooled_iou']:.4f}, mean image Dice "
        f"{out['selected']['metrics']['mean_image_dice']:.4f}")
    return out
