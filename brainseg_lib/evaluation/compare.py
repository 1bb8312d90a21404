"""Runs side by side on the same test images: is B really better than A?

The comparison reads each run's test evaluation (``eval-test/``: metrics and the per-image
table with confusion counts); a run evaluated before the table held counts is evaluated
again first. Differences are paired: both runs are resampled on the same images, so the
interval says whether B beats A on *these* images, not whether two unrelated intervals
overlap. The first run is the baseline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainseg_lib.evaluation.result import SettingScores
from brainseg_lib.metrics.functional import ConfusionCounts
from brainseg_lib.metrics.intervals import paired_bootstrap, paired_lesion_bootstrap
from brainseg_lib.metrics.lesion import FIELDS as LESION_FIELDS
from brainseg_lib.rundir import (
    BEST_CHECKPOINT,
    METRICS_FILE,
    PER_IMAGE_FILE,
    RunDir,
    TrainRecord,
    eval_dir,
)


@dataclass
class RunResult:
    """One run's record and test evaluation."""

    name: str
    run_dir: Path
    record: TrainRecord | None  # train.json; None for a run that has not finished
    headline: SettingScores  # eval-test/metrics.json: the plain setting, full and clean test
    per_image: pd.DataFrame  # eval-test/per_image.csv, one row per test image
    history: pd.DataFrame | None

    def counts(self, files: list[str], key: str = "headline") -> ConfusionCounts:
        rows = self.per_image.set_index("file").loc[files]
        tn = np.zeros(len(rows), np.int64)  # not needed by the paired metrics
        return ConfusionCounts(*(rows[f"{k}_{key}"].to_numpy(np.int64)
                                 for k in ("tp", "fp", "fn")), tn)

    def lesions(self, files: list[str], key: str = "headline") -> dict[str, np.ndarray] | None:
        """Per-image lesion tallies of ``files``; None for an evaluation made before
        lesion-wise metrics existed."""
        if f"lesion_dice_{key}" not in self.per_image:
            return None
        rows = self.per_image.set_index("file").loc[files]
        return {k: rows[f"{k}_{key}"].to_numpy(float) for k in LESION_FIELDS}


def _runs_in(folder: Path) -> list[Path]:
    """A run directory, or every run inside a sweep or cross-validation folder."""
    if (folder / BEST_CHECKPOINT).exists():
        return [folder]
    return sorted(best.parent for best in folder.glob(f"*/{BEST_CHECKPOINT}"))


def find_runs(names: list[str], runs_dir: Path, default: Sequence[Path] = ()) -> list[Path]:
    """Run directories to compare, in the order given.

    ``names``: run ids under ``runs_dir``, run directories, or sweep / CV folders (their
    runs). Empty: the ``default`` runs that exist here (the caller's choice, e.g. those of
    the newest report); when fewer than two do, the two newest runs under ``runs_dir`` with
    a test evaluation.
    """
    found: list[Path] = []
    for name in names:
        path = Path(name) if Path(name).exists() else runs_dir / name
        runs = _runs_in(path) if path.is_dir() else []
        if not runs:
            raise FileNotFoundError(f"{name}: no run directory (with best.pt) there or under "
                                    f"{runs_dir}")
        found += runs
    if names:
        return found
    found = [run_dir for run_dir in default if RunDir(run_dir).has_model]
    if len(found) < 2:
        evaluated = sorted(runs_dir.glob(f"*/{eval_dir(Path(), 'test').name}/{METRICS_FILE}"),
                           key=lambda metrics: metrics.stat().st_mtime)
        found = [metrics.parent.parent for metrics in evaluated[-2:]]
    if not found:
        raise FileNotFoundError(f"no evaluated run under {runs_dir}: run notebooks 02 and 03 "
                                "(or brainseg run) first, or set compare")
    return found


def load_results(run_dirs: list[Path], settings: Any = None, device: str = "auto",
                 ) -> list[RunResult]:
    """Each run's results; runs without a per-image table of counts are evaluated on test
    first (with ``settings``, the caller's evaluation settings)."""
    from brainseg_lib.evaluation.evaluate import evaluate_run

    results = []
    for run_dir in run_dirs:
        table = eval_dir(run_dir, "test") / PER_IMAGE_FILE
        if not table.exists() or "tp_headline" not in pd.read_csv(table, nrows=1).columns:
            print(f"{run_dir.name}: evaluating on test first (no per-image counts yet)")
            evaluate_run(run_dir, "test", device, verbose=False, settings=settings)
        run = RunDir(run_dir)
        history = run.history()
        metrics = json.loads((eval_dir(run_dir, "test") / METRICS_FILE).read_text())
        results.append(RunResult(
            run.name, run_dir, run.train_record(), SettingScores.from_json(metrics, "headline"),
            pd.read_csv(table), pd.DataFrame(history) if history else None))
    return results


def summary_table(results: list[RunResult]) -> pd.DataFrame:
    """One row per run: what it is, how it trained, its test figures (full and clean)."""
    rows = []
    for r in results:
        params, record = RunDir(r.run_dir).params(), r.record
        total = record.train_seconds_total if record else None
        head = r.headline.full.metrics
        clean = r.headline.clean.metrics if r.headline.clean else {}
        rows.append({
            "run": r.name, "profile": params.profile,
            "model": f"{params.arch}/{params.encoder} {params.image_size}px",
            "epochs": record.epochs_run if record else None,
            "device": RunDir(r.run_dir).device(),
            "train min": np.nan if total is None else round(total / 60, 1),
            "best val": {record.monitor: round(record.best_value, 4)} if record else {},
            "test pooled IoU": head["pooled_iou"], "test image Dice": head["mean_image_dice"],
            "test fg+bg mIoU": head["fg_bg_miou"],
            "clean pooled IoU": clean.get("pooled_iou"),
            "clean image Dice": clean.get("mean_image_dice"),
            "test lesion sensitivity": head.get("lesion_sensitivity"),
            "test FP components / image": head.get("fp_components_per_image"),
            "test lesion Dice": head.get("lesion_dice"),
        })
    return pd.DataFrame(rows).set_index("run")


LOWER_IS_BETTER = ("fp_components_per_image", "lesion_hd95")


def paired_differences(results: list[RunResult], n_resamples: int = 1000, seed: int = 0,
                       ) -> pd.DataFrame:
    """Each run minus the first (the baseline) on the test images both scored, full split
    and clean subset, with paired bootstrap 95 % intervals and a plain verdict."""
    base, rows = results[0], []
    table = base.per_image
    clean = set(table.file[table.clean.astype(bool)]) if "clean" in table else set()
    for other in results[1:]:
        files = sorted(set(table.file) & set(other.per_image.file))
        if len(files) < len(table):
            print(f"{other.name}: {len(files)} test images in common with {base.name}")
        subsets = {"full": files, "clean": [f for f in files if f in clean]}
        for subset, chosen in subsets.items():
            if not chosen:
                continue
            diffs = paired_bootstrap(base.counts(chosen), other.counts(chosen), n_resamples,
                                     seed)
            a, b = base.lesions(chosen), other.lesions(chosen)
            if a is not None and b is not None:
                diffs |= paired_lesion_bootstrap(a, b, n_resamples, seed)
            for metric, (diff, low, high) in diffs.items():
                sign = -1 if metric in LOWER_IS_BETTER else 1  # the gain's interval:
                gain_low, gain_high = sorted((sign * low, sign * high))
                verdict = (f"{other.name} better" if gain_low > 0 else
                           f"{base.name} better" if gain_high < 0 else "no clear difference")
                rows.append({"run": other.name, "minus": base.name, "subset": subset,
                             "images": len(chosen), "metric": metric, "difference": diff,
                             "ci95 low": low, "ci95 high": high, "verdict": verdict})
    return pd.DataFrame(rows)


def aligned_dice(a: RunResult, b: RunResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-image Dice (and the clean flag) of two runs on the test images both scored."""
    columns = ["file", "dice_headline"] + (["clean"] if "clean" in a.per_image else [])
    left = a.per_image[columns].merge(b.per_image[["file", "dice_headline"]], on="file",
                                      suffixes=("", "_b"))
    clean = left["clean"].astype(bool) if "clean" in left else None
    return (pd.DataFrame({"dice": left.dice_headline, "clean": clean}),
            pd.DataFrame({"dice": left.dice_headline_b, "clean": clean}))
