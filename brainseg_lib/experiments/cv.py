"""``brainseg cv``: grouped k-fold cross-validation over train+valid, and the fold ensemble.

nnU-Net's protocol on this dataset: folds split by near-duplicate cluster (our stand-in for
patients), one run per fold (resumable; in parallel where there are GPUs), out-of-fold
(OOF) predictions for every development image, threshold / TTA / post-processing chosen on
the OOF predictions, and the ensemble of the fold models (mean of probabilities) scored on
the test split, full and clean.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from brainseg_lib.config import Params, load_params
from brainseg_lib.data.arrays import SplitArrays, load_dataset
from brainseg_lib.data.duplicates import near_duplicate_groups
from brainseg_lib.data.locate import DataSource, data_source
from brainseg_lib.data.splits import dev_keys, fold_indices, make_folds, read_folds
from brainseg_lib.errors import BrainsegError
from brainseg_lib.evaluation.evaluate import ChosenOn, EvalTarget, evaluate_on_split
from brainseg_lib.evaluation.predictions import SplitPrediction, predict_split
from brainseg_lib.evaluation.records import Scored, metric_block
from brainseg_lib.evaluation.result import EvalSettings
from brainseg_lib.evaluation.selection import counts_at, describe, plain_setting
from brainseg_lib.experiments.launcher import TrainJob, run_jobs
from brainseg_lib.inference.predictor import LoadedModel, load_model
from brainseg_lib.io import atomic_write_json
from brainseg_lib.metrics.functional import hd95, pooled_iou
from brainseg_lib.rundir import CV_FILE, FOLDS_FILE, LOGS_DIR, eval_dir
from brainseg_lib.tracking import FINAL_FIGURES, parent_run


def cv_dir_for(params: Params, k: int) -> Path:
    name = params.run_id or f"{datetime.now():%Y%m%d-%H%M%S}-{params.profile}-cv{k}"
    return params.resolve_path(params.runs_dir) / name


def out_of_fold(members: list[LoadedModel], dev: SplitArrays,
                indices: list[np.ndarray], tta: bool) -> SplitPrediction:
    """Each development image predicted by the one fold model that did not train on it
    (``indices``: each fold's positions in ``dev``, from :func:`data.splits.fold_indices`)."""
    probs = np.full((len(dev), *dev.masks.shape[1:]), np.nan, np.float32)
    probs_tta = probs.copy() if tta else None
    loss = bce = 0.0
    for model, idx in zip(members, indices, strict=True):
        pred = predict_split(model, dev.subset(idx), tta)
        probs[idx] = pred.probs
        if tta:
            probs_tta[idx] = pred.probs_tta
        loss += pred.loss * len(idx)
        bce += pred.bce * len(idx)
    if np.isnan(probs).any():
        raise ValueError("out-of-fold predictions do not cover every development image")
    return SplitPrediction(dev, probs, probs_tta, loss / len(dev), bce / len(dev))


def _prepare_folds(params: Params, source: DataSource,
                   k: int) -> tuple[Path, list[list[str]], dict[str, Any]]:
    """The cv folder, its folds by near-duplicate cluster (written once, so a resumed cv
    keeps them) and the clusters themselves."""
    groups = near_duplicate_groups(source, params.duplicate_bits, params.cache_path())
    cv_dir = cv_dir_for(params, k)
    folds_file = cv_dir / FOLDS_FILE
    if not folds_file.exists():
        atomic_write_json(folds_file, make_folds(groups, k, params.seed))
    return cv_dir, read_folds(folds_file)["folds"], groups


class FoldsError(BrainsegError, RuntimeError):
    """Fold trainings that failed or did not finish: rerunning the command resumes them."""


def _train_folds(params_file: Path, overrides: dict[str, Any], cv_dir: Path, n_folds: int,
                 parallel: int, evaluate: bool) -> list[TrainJob]:
    """One run per fold (finished ones are kept); RuntimeError when one failed, or is not
    finished and the folds are to be evaluated."""
    folds_file = str((cv_dir / FOLDS_FILE).resolve())
    jobs = [TrainJob(f"fold{i}", load_params(params_file, **(overrides | {
                "fold": i, "folds_file": folds_file, "runs_dir": str(cv_dir.resolve()),
                "run_id": f"fold{i}"})))
            for i in range(n_folds)]
    codes = run_jobs(jobs, parallel, cv_dir / LOGS_DIR)
    failed = [n for n, c in codes.items() if c != 0]
    if failed:
        raise FoldsError(f"cv {cv_dir}: fold(s) {', '.join(failed)} failed; see "
                         f"{cv_dir / 'logs'}; run the same command again to resume")
    unfinished = [job.name for job in jobs if not job.run.is_finished]
    if unfinished and evaluate:
        raise FoldsError(f"cv {cv_dir}: fold(s) {', '.join(unfinished)} not finished; run "
                         "the same command again to resume")
    return jobs


def _score_out_of_fold(members: list[LoadedModel], data: dict[str, SplitArrays],
                       folds: list[list[str]], params: Params,
                       scoring: EvalSettings) -> tuple[dict[str, Any], SplitPrediction]:
    """The CV metrics: out-of-fold predictions of train+valid scored in the plain setting,
    with each fold's pooled IoU and the loss; and those predictions."""
    dev = SplitArrays.concat("dev", [data["train"], data["valid"]])
    indices = fold_indices(dev_keys(data), folds)
    oof = out_of_fold(members, dev, indices, scoring.tta)
    plain = plain_setting(scoring.threshold)
    counts = counts_at(oof, scoring.threshold, False, "none", 0)
    dists = np.asarray([hd95(m, t) for m, t in zip(oof.probs >= scoring.threshold, dev.masks,
                                                   strict=True)])
    block = metric_block(Scored(counts, dists),
                         "out-of-fold, " + describe(plain, f"{params.image_size}px"),
                         params.batch_size, scoring).to_json()
    block["per_fold_pooled_iou"] = [pooled_iou(counts.take(idx)) for idx in indices]
    block["loss"] = {"name": params.loss, "value": oof.loss, "bce": oof.bce}
    return block, oof


def _score_ensemble(members: list[LoadedModel], cv_dir: Path, source: DataSource,
                    scoring: EvalSettings, oof: SplitPrediction, verbose: bool) -> dict[str, Any]:
    """The fold models' mean probability on the test split, with the threshold / TTA /
    post-processing chosen on the out-of-fold predictions."""
    ensemble = LoadedModel([m.model for m in members], members[0].params, members[0].device,
                           0, f"{cv_dir.name}: ensemble of {len(members)} fold models")
    test = evaluate_on_split(ensemble, EvalTarget(source, "test", eval_dir(cv_dir, "test")),
                             scoring, ChosenOn(oof, "out-of-fold predictions"), verbose).to_json()
    return {"chosen_on_oof": test["chosen_on_valid"],
            "ensemble_test": {key: test[key] for key in test
                              if key.startswith(("headline", "selected"))},
            "clean_test": test.get("clean_test")}


def run_cv(params_file: str | Path, k: int = 5, overrides: dict[str, Any] | None = None,
           parallel: int = 0, evaluate: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Train the missing folds, then score OOF and the ensemble; writes ``cv.json``."""
    params_file, overrides = Path(params_file), dict(overrides or {})
    overrides["report_model"] = ""  # cross-validation always trains
    params = load_params(params_file, **overrides)
    source = data_source(params)
    data = load_dataset(source.path, params.image_size, params.cache_path())
    cv_dir, folds, groups = _prepare_folds(params, source, k)
    say = print if verbose else (lambda *a, **kw: None)
    say(f"cv {cv_dir}: {len(folds)} folds over {sum(map(len, folds))} train+valid images in "
        f"{groups['n_clusters']} near-duplicate clusters; {len(groups['clean_test'])} of "
        f"{groups['n_test']} test images are clean")
    result: dict[str, Any] = {"cv_dir": str(cv_dir), "folds": len(folds),
                              "groups": {key: value for key, value in groups.items()
                                         if key not in ("clusters", "clean_test")}}
    # with tracking_uri, the cv's MLflow run: the fold runs (other processes) nest under it
    with parent_run(params, cv_dir) as parent:
        jobs = _train_folds(params_file, overrides, cv_dir, len(folds), parallel, evaluate)
        if not evaluate:
            return result
        scoring = EvalSettings.from_params(params)
        members = [load_model(job.run.path) for job in jobs]
        result["cv"], oof = _score_out_of_fold(members, data, folds, params, scoring)
        result.update(_score_ensemble(members, cv_dir, source, scoring, oof, verbose))
        atomic_write_json(cv_dir / CV_FILE, result)
        cv = result["cv"]["metrics"]
        if parent:
            parent.log_metrics({f"cv_{k}": cv[k] for k in FINAL_FIGURES if k in cv})
            parent.log_artifact(cv_dir / CV_FILE)
    say(f"CV (out-of-fold, plain): pooled IoU {cv['pooled_iou']:.4f}, mean image Dice "
        f"{cv['mean_image_dice']:.4f}; wrote {cv_dir / CV_FILE}")
    return result
