"""Evaluation of a trained model on a split, honest about what each number measures.

The *headline* setting is the plain method: the model's resolution, threshold 0.5 (or the
call's ``threshold``), no
test-time augmentation (TTA), no post-processing. Threshold, TTA and post-processing are
then chosen on the **validation** split (or out-of-fold predictions) only and the chosen
setting is reported on test, so no test number is tuned on test. Everything is also scored
at the images' source resolution (probabilities resized back bilinearly, ground truth
rasterised from the COCO annotations at full size).
"""

from __future__ import annotations

from dataclasses import asdict, field, make_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainseg_lib.config import Params, names, params_from_dict
from brainseg_lib.data.arrays import (
    SplitArrays,
    SplitLesions,
    load_split_arrays,
    load_split_lesions,
)
from brainseg_lib.data.coco import dataset_hash, load_split
from brainseg_lib.data.duplicates import near_duplicate_groups
from brainseg_lib.data.identity import check_data_identity, data_for_run
from brainseg_lib.data.locate import DataSource
from brainseg_lib.evaluation.postprocess import binarise, postprocess
from brainseg_lib.evaluation.predictions import SplitPrediction, predict_split
from brainseg_lib.evaluation.records import (
    LESION_RULE,
    add_metric_blocks,
    calibration_record,
    console_summary,
    reference_comparison,
    write_evaluation,
)
from brainseg_lib.evaluation.selection import (
    choose_setting,
    describe,
    plain_setting,
    threshold_table,
)
from brainseg_lib.inference.predictor import Backend, LoadedModel, load_model
from brainseg_lib.io import atomic_write_json
from brainseg_lib.metrics.calibration import (
    apply_temperature,
    calibration_tallies,
    fit_temperature,
)
from brainseg_lib.metrics.functional import (
    METRIC_DEFINITIONS,
    ConfusionCounts,
    hd95,
    per_image_dice,
    per_image_iou,
)
from brainseg_lib.metrics.lesion import FIELDS, LESION_DEFINITIONS, image_lesions, lesion_table
from brainseg_lib.rundir import METRICS_FILE, eval_dir, git_commit
from brainseg_lib.tracking import log_evaluation

# what an evaluation takes from the call, never from the run: the evaluation group
EVALUATION_KEYS = names(groups=("evaluation",))
EvalSettings = make_dataclass(
    "EvalSettings",
    [(n, Params.__dataclass_fields__[n].type, field(default=Params.__dataclass_fields__[n].default))
     for n in EVALUATION_KEYS],
    frozen=True,
    namespace={
        "__doc__": "The evaluation parameters of a call (the ``Params`` fields of the "
                   "evaluation group): threshold, TTA, post-processing, bootstrap and its "
                   "seed, the near-duplicate threshold of the clean subset.",
        "from_params": classmethod(lambda cls, p: cls(**{k: getattr(p, k)
                                                          for k in EVALUATION_KEYS})),
    })


def evaluate_run(run_dir: str | Path, split: str = "test", device: str = "auto",
                 verbose: bool = True, settings: Any = None, backend: Backend = "torch",
                 ) -> dict[str, Any]:
    """Evaluate a run's ``best.pt`` (or an exported model laid out as a run) on ``split``.

    ``settings``: the caller's parameters (threshold, TTA, post-processing, bootstrap...,
    and ``data_dir``), or a mapping of just those to change; default: the run's. Writes
    ``run_dir/eval-<split>/`` and, for test, ``run_dir/metrics.json``.
    The data must be what the run trained on (same annotations hash) or what its training
    copy was made from (recorded provenance); anything else is an error. ``backend``: the
    engine (:func:`inference.predictor.load_model`); the figures agree across engines.
    With ``tracking_uri`` set, the figures and files go to the run's MLflow run too.
    """
    run_dir = Path(run_dir)
    loaded = load_model(run_dir, device, backend)
    if isinstance(settings, dict):
        settings = params_from_dict(loaded.params.to_dict() | settings, "evaluation settings")
    call = settings if settings is not None else loaded.params
    st = EvalSettings.from_params(call)
    source = data_for_run(run_dir, loaded.params, call.data_dir)
    data_note = check_data_identity(run_dir, source)
    valid_arrays = load_split_arrays(source.path, "valid", loaded.params.image_size,
                                     loaded.params.cache_path())
    valid = predict_split(loaded, valid_arrays, st.tta)
    out = evaluate_on_split(loaded, source, split, eval_dir(run_dir, split), st, valid,
                            "valid", verbose, data_note)
    if split == "test":  # the run's headline file
        atomic_write_json(run_dir / METRICS_FILE, out)
    # into the run's MLflow run when the call or the run turned tracking on
    tracked = call if call.tracking_uri else loaded.params
    log_evaluation(run_dir, tracked, out)
    return out


def evaluate_on_split(loaded: LoadedModel, source: DataSource, split: str, out_dir: Path,
                      settings: Any, selection: SplitPrediction,
                      selection_name: str = "valid", verbose: bool = True,
                      data_note: str = "") -> dict[str, Any]:
    """Score ``loaded`` on ``split`` of ``source``; write ``out_dir/metrics.json`` and tables.

    ``selection`` holds the predictions that threshold, TTA and post-processing are chosen
    on (the validation split, or out-of-fold predictions). Every block is reported for the
    full split and, on test, for the clean subset (images with no near-duplicate in
    train/valid). Files: see :func:`records.write_evaluation`.
    """
    p, st = loaded.params, settings
    arrays = load_split_arrays(source.path, split, p.image_size, p.cache_path())
    if verbose:
        print(f"evaluating {loaded.source} on {split}: {len(arrays)} images, {source.kind} "
              f"data, {loaded.device}, {loaded.backend}")
    pred = predict_split(loaded, arrays, st.tta)
    chosen, variants = choose_setting(selection, st.min_component_px, st.tune_threshold,
                                      st.tta, st.threshold)
    clean = _clean_test_mask(source, arrays, st, p) if split == "test" else None
    out = _record_header(loaded, source, split, pred, st, chosen, selection_name, data_note,
                         clean)
    lesions = load_split_lesions(source.path, split, p.image_size)
    if lesions.files != arrays.files:
        raise ValueError(f"{source.path} {split}: the annotations list other images than the "
                         "decoded arrays; clear the cache and evaluate again")
    groups = _groups(out, lesions)
    per_image = pd.DataFrame({"file": arrays.files,
                              "tumour_area_fraction": arrays.masks.mean((1, 2)),
                              "box_area_px": lesions.box_area} | groups)
    if clean is not None:
        per_image["clean"] = clean
    for key, setting in (("headline", plain_setting(st.threshold)), ("selected", chosen)):
        in_sample = key == "selected" and split == selection_name
        _score_setting(out, per_image, key, setting, pred, source, split, st, clean, in_sample,
                       lesions, groups)
    out["calibration"] = _calibration(pred, selection, selection_name, clean, st)
    out["reference_comparison"] = reference_comparison(out)
    write_evaluation(out_dir, out, per_image, variants, threshold_table(selection, False))
    if verbose:
        print(console_summary(out))
    return out


def _groups(out: dict[str, Any], lesions: SplitLesions) -> dict[str, np.ndarray]:
    """Each image's annotation sub-class and box-area quintile (Q1 smallest; ties broken by
    split order so every quintile is filled), with the quintile edges recorded in ``out``."""
    area = pd.Series(lesions.box_area)
    quintile = pd.qcut(area.rank(method="first"), min(5, len(area)),
                       labels=[f"Q{i + 1}" for i in range(min(5, len(area)))])
    edges = [float(area[quintile == q].max()) for q in quintile.cat.categories]
    out["groups"] = {
        "subclass": "the category name of the image's annotations, as the dataset names it "
                    "(mixed: several, none: no annotation)",
        "size_quintile": "quintile of the summed annotation box area in source pixels on this "
                         "split (Q1 smallest)",
        "size_quintile_upper_px": dict(zip(quintile.cat.categories, edges, strict=True))}
    return {"subclass": np.asarray(lesions.subclass),
            "size_quintile": np.asarray(quintile.astype(str))}


def _calibration(pred: SplitPrediction, selection: SplitPrediction, selection_name: str,
                 clean: np.ndarray | None, st: Any) -> dict[str, Any]:
    """Pixel calibration of the plain probabilities, raw and with the temperature fitted on
    the selection split (never on the split scored)."""
    temperature = fit_temperature(selection.probs, selection.arrays.masks)
    masks = pred.arrays.masks
    return calibration_record(calibration_tallies(pred.probs, masks),
                              calibration_tallies(apply_temperature(pred.probs, temperature),
                                                  masks),
                              temperature, selection_name, clean, st.bootstrap, st.seed)


def _clean_test_mask(source: DataSource, arrays: SplitArrays, st: Any, p: Params,
                     ) -> np.ndarray:
    """Which test images have no near-duplicate in train or valid."""
    clean = set(near_duplicate_groups(source, st.duplicate_bits, p.cache_path())["clean_test"])
    return np.array([f in clean for f in arrays.files])


def _record_header(loaded: LoadedModel, source: DataSource, split: str,
                   pred: SplitPrediction, st: Any, chosen: dict[str, Any],
                   selection_name: str, data_note: str, clean: np.ndarray | None,
                   ) -> dict[str, Any]:
    """What was evaluated, on what, how, and what was chosen where: the top of metrics.json."""
    p = loaded.params
    out: dict[str, Any] = {
        "model": loaded.source, "split": split, "checkpoint_epoch": loaded.epoch,
        "members": len(loaded.members),
        "dataset": {"kind": source.kind, "path": str(source.path),
                    "images": len(pred.arrays),
                    "annotations_sha256": dataset_hash(source.path)},
        "data_identity": data_note,
        "evaluated_with": {"git_commit": git_commit(), "device": str(loaded.device),
                           "torch": torch.__version__, "backend": loaded.backend,
                           "settings": asdict(st)},
        "loss": {"name": p.loss, "value": pred.loss, "bce": pred.bce,
                 "definition": "mean over images of each image's own loss"},
        "definitions": METRIC_DEFINITIONS | LESION_DEFINITIONS, "lesion_rule": LESION_RULE,
        "batch_size_for_batch_pooled_iou": p.batch_size,
        "chosen_on": selection_name, "chosen_on_valid": chosen,
        "selected_is_in_sample": split == selection_name,
    }
    if clean is not None:
        out["clean_test"] = {
            "images": int(clean.sum()), "of": len(clean),
            "definition": f"test images with no near-duplicate (pHash within "
                          f"{st.duplicate_bits} bits, transitively) in train or valid"}
    return out


def _score_setting(out: dict[str, Any], per_image: pd.DataFrame, key: str,
                   setting: dict[str, Any], pred: SplitPrediction, source: DataSource,
                   split: str, st: Any, clean: np.ndarray | None, in_sample: bool,
                   lesions: SplitLesions, groups: dict[str, np.ndarray]) -> None:
    """One setting's metric blocks (model and source resolution; full, clean and by group)
    and per-image columns."""
    arrays = pred.arrays
    batch_size = out["batch_size_for_batch_pooled_iou"]
    label = describe(setting, f"{arrays.images.shape[-1]}px (model resolution)") + (
        " — IN-SAMPLE: chosen on this same split" if in_sample else "")
    masks = binarise(pred.probs_tta if setting["tta"] else pred.probs, setting["threshold"],
                     setting["postprocess"], st.min_component_px)
    counts = ConfusionCounts.from_masks(masks, arrays.masks)
    dists = np.asarray([hd95(m, t) for m, t in zip(masks, arrays.masks, strict=True)])
    table = lesion_table([image_lesions(t, m) for t, m in zip(lesions.lesions, masks,
                                                              strict=True)])
    add_metric_blocks(out, key, counts, dists, clean, batch_size, st.bootstrap, st.seed, label,
                      table, groups)
    for name in ("tp", "fp", "fn"):  # pooled metrics of any subset, paired comparisons
        per_image[f"{name}_{key}"] = getattr(counts, name)
    per_image[f"iou_{key}"] = per_image_iou(counts)
    per_image[f"dice_{key}"] = per_image_dice(counts)
    per_image[f"hd95_{key}"] = dists
    per_image[f"pred_area_fraction_{key}"] = masks.mean((1, 2))
    per_image[f"threshold_{key}"] = setting["threshold"]
    for name in FIELDS:  # lesion-wise figures of any subset, paired comparisons
        per_image[f"{name}_{key}"] = table[name]
    if st.eval_original_size:
        c_orig, d_orig, t_orig = score_at_source_resolution(pred, source.path, split, setting,
                                                            st.min_component_px)
        sizes = sorted({f"{w}x{h}" for h, w in arrays.source_sizes})
        add_metric_blocks(out, f"{key}_original_resolution", c_orig, d_orig, clean, batch_size,
                          st.bootstrap, st.seed,
                          describe(setting, f"source resolution ({', '.join(sizes)})"),
                          t_orig, groups)


def score_at_source_resolution(pred: SplitPrediction, data_dir: Path, split: str,
                               setting: dict[str, Any], min_px: int,
                               ) -> tuple[ConfusionCounts, np.ndarray, dict[str, np.ndarray]]:
    """Counts, HD95 and lesion tallies at each image's source size: probabilities resized
    back bilinearly, truth rasterised from the annotations at full size; ``min_px`` scales
    with the area."""
    coco = load_split(data_dir, split)
    by_name = {img["file_name"]: img for img in coco.images}
    probs = pred.probs_tta if setting["tta"] else pred.probs
    counts, dists, lesions = [], [], []
    for name, prob in zip(pred.arrays.files, probs, strict=True):
        target = coco.mask(by_name[name])
        up = F.interpolate(torch.from_numpy(prob)[None, None], size=target.shape,
                           mode="bilinear", align_corners=False)[0, 0].numpy()
        mask = postprocess(up >= setting["threshold"], setting["postprocess"],
                           int(min_px * up.size / prob.size))
        counts.append(ConfusionCounts.from_masks(mask[None], target[None]))
        dists.append(hd95(mask, target))
        lesions.append(image_lesions(coco.lesions(by_name[name]), mask))
    return ConfusionCounts.concat(counts), np.asarray(dists), lesion_table(lesions)
