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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from brainseg_lib.config import Params, params_from_dict
from brainseg_lib.data.arrays import (
    SplitArrays,
    SplitLesions,
    load_split_arrays,
    load_split_lesions,
)
from brainseg_lib.data.coco import DatasetError, dataset_hash, load_split
from brainseg_lib.data.duplicates import near_duplicate_groups
from brainseg_lib.data.identity import check_data_identity, data_for_run
from brainseg_lib.data.locate import DataSource
from brainseg_lib.evaluation.postprocess import postprocess
from brainseg_lib.evaluation.predictions import SplitPrediction, predict_split
from brainseg_lib.evaluation.records import (
    LESION_RULE,
    Scored,
    calibration_record,
    console_summary,
    reference_comparison,
    setting_scores,
    write_evaluation,
)
from brainseg_lib.evaluation.result import (
    SETTING_KEYS,
    Calibration,
    CleanSubset,
    DatasetRef,
    EvalSettings,
    Evaluation,
    GroupInfo,
    Header,
    LossRecord,
    Setting,
    SettingScores,
)
from brainseg_lib.evaluation.selection import (
    choose_setting,
    describe,
    masks_at,
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
from brainseg_lib.metrics.lesion import (
    FIELDS,
    LESION_DEFINITIONS,
    image_lesions,
    lesion_table,
    split_lesion_table,
)
from brainseg_lib.rundir import METRICS_FILE, eval_dir, git_commit
from brainseg_lib.tracking import log_evaluation


@dataclass(frozen=True)
class EvalTarget:
    """What one evaluation scores and where it writes: ``split`` of ``source`` into
    ``out_dir``; ``data_note`` says how the data relates to what the model trained on."""

    source: DataSource
    split: str
    out_dir: Path
    data_note: str = ""


@dataclass(frozen=True)
class ChosenOn:
    """The predictions threshold, TTA and post-processing are chosen on, and their name
    (the validation split, or out-of-fold predictions)."""

    pred: SplitPrediction
    name: str = "valid"
    lesions: SplitLesions | None = None  # its annotated lesions: a sensitivity floor needs them


@dataclass(frozen=True)
class EvaluationPlan:
    """Everything each setting of one evaluation is scored with: the split's predictions,
    its lesions, the clean-subset mask (test only) and each image's group labels."""

    target: EvalTarget
    settings: EvalSettings
    pred: SplitPrediction
    lesions: SplitLesions
    clean: np.ndarray | None
    groups: dict[str, np.ndarray]
    batch_size: int  # of the batch-pooled IoU


def evaluate_run(run_dir: str | Path, split: str = "test", device: str = "auto",
                 verbose: bool = True, settings: Params | dict[str, Any] | None = None,
                 backend: Backend = "torch") -> dict[str, Any]:
    """Evaluate a run's ``best.pt`` (or an exported model laid out as a run) on ``split``;
    returns the record of ``metrics.json``.

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
    scoring = EvalSettings.from_params(call)
    source = data_for_run(run_dir, loaded.params, call.data_dir)
    target = EvalTarget(source, split, eval_dir(run_dir, split),
                        check_data_identity(run_dir, source))
    valid_arrays = load_split_arrays(source.path, "valid", loaded.params.image_size,
                                     loaded.params.cache_path())
    valid_lesions = (load_split_lesions(source.path, "valid", loaded.params.image_size)
                     if scoring.min_lesion_sensitivity else None)
    valid = ChosenOn(predict_split(loaded, valid_arrays, scoring.tta), "valid", valid_lesions)
    out = evaluate_on_split(loaded, target, scoring, valid, verbose).to_json()
    if split == "test":  # the run's headline file
        atomic_write_json(run_dir / METRICS_FILE, out)
    # into the run's MLflow run when the call or the run turned tracking on
    tracked = call if call.tracking_uri else loaded.params
    log_evaluation(run_dir, tracked, out)
    return out


def evaluate_on_split(loaded: LoadedModel, target: EvalTarget, scoring: EvalSettings,
                      chosen_on: ChosenOn, verbose: bool = True) -> Evaluation:
    """Score ``loaded`` on ``target``; write its ``metrics.json`` and tables.

    Threshold, TTA and post-processing are chosen on ``chosen_on``. Every block is reported
    for the full split and, on test, for the clean subset (images with no near-duplicate in
    train/valid). Files: see :func:`records.write_evaluation`.
    """
    plan, per_image, group_info = _plan(loaded, target, scoring, verbose)
    chosen, variants = choose_setting(chosen_on.pred, scoring.min_component_px,
                                      scoring.tune_threshold, scoring.tta, scoring.threshold,
                                      chosen_on.lesions, scoring.min_lesion_sensitivity)
    scores: dict[str, SettingScores] = {}
    for key, setting in (("headline", plain_setting(scoring.threshold)), ("selected", chosen)):
        in_sample = key == "selected" and target.split == chosen_on.name
        blocks, columns = _score_setting(plan, key, setting, in_sample)
        scores |= blocks
        per_image = per_image.assign(**columns)
    scores = {k: scores[k] for k in SETTING_KEYS if k in scores}
    header = _header(loaded, plan, chosen, chosen_on.name)
    result = Evaluation(header, scores, group_info, _calibration(plan, chosen_on),
                        reference_comparison(header, scores["headline"].full))
    write_evaluation(target.out_dir, result, per_image, variants,
                     threshold_table(chosen_on.pred, False))
    if verbose:
        print(console_summary(result))
    return result


def _plan(loaded: LoadedModel, target: EvalTarget, scoring: EvalSettings, verbose: bool,
          ) -> tuple[EvaluationPlan, pd.DataFrame, GroupInfo]:
    """The split's predictions, lesions, clean subset and groups; the per-image table's
    first columns."""
    p, source, split = loaded.params, target.source, target.split
    arrays = load_split_arrays(source.path, split, p.image_size, p.cache_path())
    if verbose:
        print(f"evaluating {loaded.source} on {split}: {len(arrays)} images, {source.kind} "
              f"data, {loaded.device}, {loaded.backend}")
    pred = predict_split(loaded, arrays, scoring.tta)
    clean = _clean_test_mask(source, arrays, scoring, p) if split == "test" else None
    lesions = load_split_lesions(source.path, split, p.image_size)
    if lesions.files != arrays.files:
        raise DatasetError(f"{source.path} {split}: the annotations list other images than "
                           "the decoded arrays; clear the cache and evaluate again")
    group_info, groups = _groups(lesions)
    per_image = pd.DataFrame({"file": arrays.files,
                              "tumour_area_fraction": arrays.masks.mean((1, 2)),
                              "box_area_px": lesions.box_area} | groups)
    if clean is not None:
        per_image["clean"] = clean
    return (EvaluationPlan(target, scoring, pred, lesions, clean, groups, p.batch_size), per_image,
            group_info)


def _groups(lesions: SplitLesions) -> tuple[GroupInfo, dict[str, np.ndarray]]:
    """Each image's annotation sub-class and box-area quintile (Q1 smallest; ties broken by
    split order so every quintile is filled), and what they are with the quintile edges."""
    area = pd.Series(lesions.box_area)
    quintile = pd.qcut(area.rank(method="first"), min(5, len(area)),
                       labels=[f"Q{i + 1}" for i in range(min(5, len(area)))])
    edges = [float(area[quintile == q].max()) for q in quintile.cat.categories]
    info = GroupInfo(
        {"subclass": "the category name of the image's annotations, as the dataset names it "
                     "(mixed: several, none: no annotation)",
         "size_quintile": "quintile of the summed annotation box area in source pixels on "
                          "this split (Q1 smallest)"},
        dict(zip(quintile.cat.categories, edges, strict=True)))
    return info, {"subclass": np.asarray(lesions.subclass),
                  "size_quintile": np.asarray(quintile.astype(str))}


def _calibration(plan: EvaluationPlan, chosen_on: ChosenOn) -> Calibration:
    """Pixel calibration of the plain probabilities, raw and with the temperature fitted on
    the selection predictions (never on the split scored)."""
    temperature = fit_temperature(chosen_on.pred.probs, chosen_on.pred.arrays.masks)
    probs, masks = plan.pred.probs, plan.pred.arrays.masks
    return calibration_record(calibration_tallies(probs, masks),
                              calibration_tallies(apply_temperature(probs, temperature), masks),
                              temperature, chosen_on.name, plan.clean, plan.settings)


def _clean_test_mask(source: DataSource, arrays: SplitArrays, scoring: EvalSettings, p: Params,
                     ) -> np.ndarray:
    """Which test images have no near-duplicate in train or valid."""
    clean = set(near_duplicate_groups(source, scoring.duplicate_bits, p.cache_path())["clean_test"])
    return np.array([f in clean for f in arrays.files])


def _header(loaded: LoadedModel, plan: EvaluationPlan, chosen: Setting,
            chosen_on: str) -> Header:
    """What was evaluated, on what, how, and what was chosen where: the top of metrics.json."""
    source, scoring, pred, clean = plan.target.source, plan.settings, plan.pred, plan.clean
    clean_test = None if clean is None else CleanSubset(
        int(clean.sum()), len(clean),
        f"test images with no near-duplicate (pHash within {scoring.duplicate_bits} bits, "
        "transitively) in train or valid")
    return Header(
        model=loaded.source, split=plan.target.split, checkpoint_epoch=loaded.epoch,
        members=len(loaded.members),
        dataset=DatasetRef(source.kind, str(source.path), len(pred.arrays),
                           dataset_hash(source.path)),
        data_identity=plan.target.data_note,
        evaluated_with={"git_commit": git_commit(), "device": str(loaded.device),
                        "torch": torch.__version__, "backend": loaded.backend,
                        "settings": asdict(scoring)},
        loss=LossRecord(loaded.params.loss, pred.loss, pred.bce,
                        "mean over images of each image's own loss"),
        definitions=METRIC_DEFINITIONS | LESION_DEFINITIONS, lesion_rule=LESION_RULE,
        batch_size=plan.batch_size, chosen_on=chosen_on, chosen=chosen,
        selected_is_in_sample=plan.target.split == chosen_on, clean_test=clean_test)


def _score_setting(plan: EvaluationPlan, key: str, setting: Setting, in_sample: bool,
                   ) -> tuple[dict[str, SettingScores], dict[str, Any]]:
    """One setting's blocks (model and, when asked, source resolution; full, clean and by
    group) and its per-image columns."""
    arrays, scoring = plan.pred.arrays, plan.settings
    label = describe(setting, f"{arrays.images.shape[-1]}px (model resolution)") + (
        " — IN-SAMPLE: chosen on this same split" if in_sample else "")
    masks = masks_at(plan.pred, setting, scoring.min_component_px)
    counts = ConfusionCounts.from_masks(masks, arrays.masks)
    scored = Scored(counts, np.asarray([hd95(m, t) for m, t in zip(masks, arrays.masks,
                                                                     strict=True)]),
                    split_lesion_table(plan.lesions.lesions, masks))
    blocks = {key: _blocks(plan, scored, label)}
    if scoring.eval_original_size:
        sizes = sorted({f"{w}x{h}" for h, w in arrays.source_sizes})
        at_source = Scored(*score_at_source_resolution(plan.pred, plan.target.source.path,
                                                       plan.target.split, setting,
                                                       scoring.min_component_px))
        blocks[f"{key}_original_resolution"] = _blocks(
            plan, at_source, describe(setting, f"source resolution ({', '.join(sizes)})"))
    return blocks, _per_image_columns(key, setting, scored, masks)


def _blocks(plan: EvaluationPlan, scored: Scored, label: str) -> SettingScores:
    return setting_scores(scored, label, plan.clean, plan.groups, plan.batch_size,
                          plan.settings)


def _per_image_columns(key: str, setting: Setting, scored: Scored, masks: np.ndarray,
                       ) -> dict[str, Any]:
    """The per-image table's columns of one setting: counts (pooled metrics of any subset,
    paired comparisons), IoU, Dice, HD95, predicted area, threshold and lesion tallies."""
    counts = scored.counts
    columns = {f"{name}_{key}": getattr(counts, name) for name in ("tp", "fp", "fn")}
    columns |= {f"iou_{key}": per_image_iou(counts), f"dice_{key}": per_image_dice(counts),
                f"hd95_{key}": scored.dists, f"pred_area_fraction_{key}": masks.mean((1, 2)),
                f"threshold_{key}": setting.threshold}
    return columns | {f"{name}_{key}": scored.lesions[name] for name in FIELDS}


def score_at_source_resolution(pred: SplitPrediction, data_dir: Path, split: str,
                               setting: Setting, min_px: int,
                               ) -> tuple[ConfusionCounts, np.ndarray, dict[str, np.ndarray]]:
    """Counts, HD95 and lesion tallies at each image's source size: probabilities resized
    back bilinearly, truth rasterised from the annotations at full size; ``min_px`` scales
    with the area."""
    coco = load_split(data_dir, split)
    by_name = {img["file_name"]: img for img in coco.images}
    probs = pred.probs_tta if setting.tta else pred.probs
    counts, dists, lesions = [], [], []
    for name, prob in zip(pred.arrays.files, probs, strict=True):
        target = coco.mask(by_name[name])
        up = F.interpolate(torch.from_numpy(prob)[None, None], size=target.shape,
                           mode="bilinear", align_corners=False)[0, 0].numpy()
        mask = postprocess(up >= setting.threshold, setting.postprocess,
                           int(min_px * up.size / prob.size))
        counts.append(ConfusionCounts.from_masks(mask[None], target[None]))
        dists.append(hd95(mask, target))
        lesions.append(image_lesions(coco.lesions(by_name[name]), mask))
    return ConfusionCounts.concat(counts), np.asarray(dists), lesion_table(lesions)
