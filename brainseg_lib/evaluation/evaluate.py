"""Evaluation of a trained run on a split, honest about what each number measures.

The *headline* setting is the plain method: the model's resolution, threshold 0.5, no
test-time augmentation (TTA), no post-processing. Threshold, TTA and post-processing are
then chosen on the **validation** split only and the chosen setting is reported on test, so
no test number is tuned on test. Everything is also scored at the images' source
resolution (probabilities resized back bilinearly, ground truth rasterised from the COCO
annotations at full size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainseg_lib.config import params_from_dict
from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.coco import load_split
from brainseg_lib.data.duplicates import near_duplicate_groups
from brainseg_lib.data.locate import DataSource, data_source
from brainseg_lib.evaluation.postprocess import binarise, postprocess
from brainseg_lib.evaluation.predictions import SplitPrediction, predict_split
from brainseg_lib.evaluation.records import REFERENCE, add_metric_blocks
from brainseg_lib.evaluation.selection import choose_setting, describe, threshold_table
from brainseg_lib.inference.predictor import LoadedModel, load_model
from brainseg_lib.io import atomic_write, atomic_write_json
from brainseg_lib.metrics.functional import (
    HEADLINE,
    ConfusionCounts,
    hd95,
    per_image_dice,
    per_image_iou,
)


def data_to_evaluate(run_dir: Path, loaded: LoadedModel) -> DataSource:
    """The data to evaluate on: what the caller configured (``data_dir``, $BRAINSEG_DATA,
    data/ in the repository), else the path the run recorded when it still exists there.
    Synthetic runs are evaluated on their own synthetic data. The identity of whatever is
    chosen is checked against the training record (:func:`check_data_identity`)."""
    import json

    from brainseg_lib.data.locate import find_real_dataset

    env_file = run_dir / "env.json"
    recorded = json.loads(env_file.read_text()).get("dataset", {}) if env_file.exists() \
        else {}
    if loaded.params.synthetic or recorded.get("kind") == "synthetic":
        return data_source(loaded.params)
    found = find_real_dataset(loaded.params.data_dir)
    if found:
        return found
    path = Path(recorded.get("path", ""))
    if recorded and (path / "test").is_dir():
        return DataSource(path, recorded["kind"], "the path recorded in env.json")
    return data_source(loaded.params)


@dataclass
class EvalSettings:
    """What shapes a measurement (not the weights): taken from the call, never from the run."""

    threshold: float = 0.5
    tune_threshold: bool = True
    tta: bool = True
    min_component_px: int = 20
    bootstrap: int = 1000
    eval_original_size: bool = True
    seed: int = 42
    duplicate_bits: int = 4

    @classmethod
    def from_params(cls, p: Any) -> EvalSettings:
        return cls(**{k: getattr(p, k) for k in cls.__dataclass_fields__})


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


def evaluate_on_split(loaded: LoadedModel, source: DataSource, split: str, out_dir: Path,
                   settings: EvalSettings, selection: SplitPrediction,
                   selection_name: str = "valid", verbose: bool = True,
                   data_note: str = "") -> dict[str, Any]:
    """Score ``loaded`` on ``split`` of ``source``; write ``out_dir/metrics.json`` and tables.

    ``selection`` holds the predictions that threshold, TTA and post-processing are chosen
    on (the validation split, or out-of-fold predictions). Every block is reported for the
    full split and, on test, for the clean subset (images with no near-duplicate in
    train/valid). Files: ``metrics.json``, ``per_image.csv``, ``variants.csv``,
    ``threshold_curve.csv`` (both on the selection predictions).
    """
    from brainseg_lib.data.coco import dataset_hash
    from brainseg_lib.rundir import git_commit

    p, st = loaded.params, settings
    arrays = load_split_arrays(source.path, split, p.image_size, p.cache_path())
    say = print if verbose else (lambda *a, **k: None)
    say(f"evaluating {loaded.source} on {split}: {len(arrays)} images, {source.kind} data, "
        f"{loaded.device}")
    pred = predict_split(loaded, arrays, st.tta)
    plain = {"threshold": st.threshold, "tta": False, "postprocess": "none"}
    chosen, variants = choose_setting(selection, st.min_component_px, st.tune_threshold,
                                      st.tta)
    in_sample = split == selection_name
    clean = None
    if split == "test":
        groups = near_duplicate_groups(source, st.duplicate_bits, p.cache_path())
        clean_set = set(groups["clean_test"])
        clean = np.array([f in clean_set for f in arrays.files])
    res = f"{p.image_size}px (model resolution)"
    out: dict[str, Any] = {
        "model": loaded.source, "split": split, "checkpoint_epoch": loaded.epoch,
        "members": len(loaded.members),
        "dataset": {"kind": source.kind, "path": str(source.path), "images": len(arrays),
                    "annotations_sha256": dataset_hash(source.path)},
        "data_identity": data_note,
        "evaluated_with": {"git_commit": git_commit(), "device": str(loaded.device),
                           "torch": torch.__version__, "settings": asdict(st)},
        "loss": {"name": p.loss, "value": pred.loss, "bce": pred.bce,
                 "definition": "mean over images of each image's own loss"},
        "definitions": HEADLINE, "batch_size_for_batch_pooled_iou": p.batch_size,
        "chosen_on": selection_name, "chosen_on_valid": chosen,
        "selected_is_in_sample": in_sample,
    }
    if clean is not None:
        out["clean_test"] = {
            "images": int(clean.sum()), "of": len(clean),
            "definition": f"test images with no near-duplicate (pHash within "
                          f"{st.duplicate_bits} bits, transitively) in train or valid"}
    per_image = pd.DataFrame({"file": arrays.files,
                              "tumour_area_fraction": arrays.masks.mean((1, 2))})
    if clean is not None:
        per_image["clean"] = clean
    for key, setting in (("headline", plain), ("selected", chosen)):
        label = describe(setting, res) + (" — IN-SAMPLE: chosen on this same split"
                                           if key == "selected" and in_sample else "")
        masks = binarise(pred.probs_tta if setting["tta"] else pred.probs,
                         setting["threshold"], setting["postprocess"], st.min_component_px)
        counts = ConfusionCounts.from_masks(masks, arrays.masks)
        dists = np.asarray([hd95(m, t) for m, t in zip(masks, arrays.masks, strict=True)])
        add_metric_blocks(out, key, counts, dists, clean, p.batch_size, st, label)
        for name in ("tp", "fp", "fn"):  # pooled metrics of any subset, paired comparisons
            per_image[f"{name}_{key}"] = getattr(counts, name)
        per_image[f"iou_{key}"] = per_image_iou(counts)
        per_image[f"dice_{key}"] = per_image_dice(counts)
        per_image[f"hd95_{key}"] = dists
        per_image[f"pred_area_fraction_{key}"] = masks.mean((1, 2))
        per_image[f"threshold_{key}"] = setting["threshold"]
        if st.eval_original_size:
            c_orig, d_orig = _per_image_original(pred, source.path, split,
                                                 setting["threshold"], setting["tta"],
                                                 setting["postprocess"], st.min_component_px)
            sizes = sorted({f"{w}x{h}" for h, w in arrays.source_sizes})
            label = describe(setting, f"source resolution ({', '.join(sizes)})")
            add_metric_blocks(out, f"{key}_original_resolution", c_orig, d_orig, clean,
                              p.batch_size, st, label)
    out["reference_comparison"] = {
        "reference_test_loss (BCE)": REFERENCE["test_loss"],
        "our_test_bce": pred.bce,
        "reference_test_iou (as published; closest to fg+bg mIoU)": REFERENCE["test_iou"],
        "our_fg_bg_miou": out["headline"]["metrics"]["fg_bg_miou"],
        "our_batch_pooled_iou": out["headline"]["metrics"]["batch_pooled_iou"],
        "our_pooled_foreground_iou": out["headline"]["metrics"]["pooled_iou"],
    }
    atomic_write_json(out_dir / "metrics.json", out)
    for name, table in (("per_image", per_image), ("variants", variants),
                        ("threshold_curve", threshold_table(selection, False))):
        atomic_write(out_dir / f"{name}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
    m = out["headline"]["metrics"]
    say(f"{split} {p.loss} loss {pred.loss:.4f} (BCE {pred.bce:.4f}) | pooled IoU "
        f"{m['pooled_iou']:.4f} | mean image Dice {m['mean_image_dice']:.4f} | fg+bg mIoU "
        f"{m['fg_bg_miou']:.4f}" + (
            f" | clean subset ({int(clean.sum())}): pooled IoU "
            f"{out['headline_clean']['metrics']['pooled_iou']:.4f}, image Dice "
            f"{out['headline_clean']['metrics']['mean_image_dice']:.4f}" if clean is not None
            else "") + f" | chosen on {selection_name}: {describe(chosen, res)} -> pooled IoU "
        f"{out['selected']['metrics']['pooled_iou']:.4f}, mean image Dice "
        f"{out['selected']['metrics']['mean_image_dice']:.4f}")
    return out


def evaluate_run(run_dir: str | Path, split: str = "test", device: str = "auto",
                 verbose: bool = True, settings: Any = None) -> dict[str, Any]:
    """Evaluate a run's ``best.pt`` (or an exported model folder) on ``split``.

    ``settings``: the caller's parameters (threshold, TTA, post-processing, bootstrap...),
    or a mapping of just those to change; default: the run's. Writes
    ``run_dir/eval-<split>/`` and, for test, ``run_dir/metrics.json``.
    The data must be what the run trained on (same annotations hash) or what its training
    copy was made from (recorded provenance); anything else is an error.
    """
    run_dir = Path(run_dir)
    loaded = load_model(run_dir, device)
    if isinstance(settings, dict):
        settings = params_from_dict(loaded.params.to_dict() | settings, "evaluation settings")
    st = EvalSettings.from_params(settings if settings is not None else loaded.params)
    source = data_to_evaluate(run_dir, loaded)
    data_note = check_data_identity(run_dir, source)
    valid_arrays = load_split_arrays(source.path, "valid", loaded.params.image_size,
                                     loaded.params.cache_path())
    valid = predict_split(loaded, valid_arrays, st.tta)
    out = evaluate_on_split(loaded, source, split, run_dir / f"eval-{split}", st, valid,
                         "valid", verbose, data_note)
    if split == "test":  # the run's headline file
        atomic_write_json(run_dir / "metrics.json", out)
    return out


def check_data_identity(run_dir: Path, source: DataSource) -> str:
    """Compare the evaluated labels with those the run trained on; returns a sentence for
    reports. Raises ValueError on a mismatch that no recorded provenance explains."""
    import json

    from brainseg_lib.data.coco import dataset_hash

    env_file = run_dir / "env.json"
    if not env_file.exists():
        return "training data not recorded"
    trained = json.loads(env_file.read_text()).get("dataset", {})
    now = dataset_hash(source.path)
    if trained.get("annotations_sha256") in (None, now):
        return f"evaluated on the training data (annotations {now})"
    origin = trained.get("derived_from", {}).get("source_annotations_sha256")
    if origin == now:
        return f"{trained.get('provenance')}; evaluated on that dataset ({now})"
    raise ValueError(f"{run_dir}: trained on annotations {trained.get('annotations_sha256')} "
                     f"but {source.path} holds {now}, and no recorded provenance links them")
