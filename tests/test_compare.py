"""05_compare: runs found, aligned on the same images, paired differences that add up, and a
verdict that follows the evidence (better, no clear difference, worse)."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import papermill
import pytest

from brainseg_lib.evaluation.compare import (
    LOWER_IS_BETTER,
    RunResult,
    aligned_dice,
    find_runs,
    load_results,
    paired_differences,
    summary_table,
)
from brainseg_lib.evaluation.result import MetricBlock, SettingScores
from brainseg_lib.metrics.functional import ConfusionCounts
from brainseg_lib.metrics.intervals import paired_bootstrap
from brainseg_lib.metrics.lesion import LESION_DEFINITIONS
from conftest import ROOT

# every figure the comparison reports a paired interval for
COMPARED = ("pooled_iou", "mean_image_dice", *LESION_DEFINITIONS)


@pytest.fixture
def two_runs(evaluated_runs):
    return evaluated_runs


def _per_image(quality: str, n: int = 40, seed: int = 0) -> pd.DataFrame:
    """One model's per-image table (counts and lesion tallies, as ``eval-test/per_image.csv``
    holds them) on ``n`` one-tumour images, half of them in the clean subset.

    "strong" beats "weak" on every image and every figure: more true-positive pixels, fewer
    false ones, every tumour found, no false-alarm component, closer outlines. The draws
    share ``seed``, so both describe the same images."""
    rng = np.random.default_rng(seed)
    tumour = rng.integers(200, 400, n)  # true tumour pixels of each image
    strong = quality == "strong"
    missed = rng.uniform(0.05, 0.15, n) if strong else rng.uniform(0.4, 0.6, n)
    fn = np.round(tumour * missed).astype(int)
    fp = rng.integers(5, 20, n) if strong else rng.integers(80, 160, n)
    found = np.ones(n) if strong else (np.arange(n) % 3 != 0).astype(float)
    matched_iou = rng.uniform(0.75, 0.9, n) if strong else rng.uniform(0.5, 0.6, n)
    table = {"file": [f"img{i:03d}.jpg" for i in range(n)], "clean": np.arange(n) % 2 == 0,
             "tp_headline": tumour - fn, "fp_headline": fp, "fn_headline": fn,
             "lesions_headline": np.ones(n), "detected_headline": found,
             "fp_components_headline": np.zeros(n) if strong else rng.integers(1, 3, n),
             "lesion_dice_headline": rng.uniform(0.8, 0.95, n) if strong
             else rng.uniform(0.2, 0.5, n),
             "lesion_hd95_headline": rng.uniform(1, 3, n) if strong else rng.uniform(10, 30, n),
             "pq_tp_headline": found, "pq_fp_headline": np.zeros(n) if strong else 1 - found,
             "pq_fn_headline": 1 - found, "pq_iou_sum_headline": found * matched_iou}
    return pd.DataFrame(table)


def _result(name: str, per_image: pd.DataFrame) -> RunResult:
    return RunResult(name, Path(name), None, SettingScores(MetricBlock("plain", {})), per_image,
                     None)


def _verdicts(baseline: RunResult, other: RunResult) -> pd.DataFrame:
    diffs = paired_differences([baseline, other], n_resamples=300)
    assert set(diffs.subset) == {"full", "clean"}
    assert set(diffs.metric) == set(COMPARED)
    return diffs


def test_a_model_better_on_every_image_is_called_better_whichever_way_the_metric_points():
    diffs = _verdicts(_result("weak", _per_image("weak")), _result("strong", _per_image("strong")))
    assert (diffs.verdict == "strong better").all(), diffs[["subset", "metric", "verdict"]]
    for row in diffs.to_dict("records"):  # the interval excludes 0 on the side of the gain
        if row["metric"] in LOWER_IS_BETTER:  # fewer false alarms, closer outlines
            assert row["difference"] < 0 and row["ci95 high"] < 0, row
        else:
            assert row["difference"] > 0 and row["ci95 low"] > 0, row


def test_a_worse_model_is_called_worse_and_the_baseline_better():
    diffs = _verdicts(_result("strong", _per_image("strong")), _result("weak", _per_image("weak")))
    assert (diffs.verdict == "strong better").all(), diffs[["subset", "metric", "verdict"]]
    fp = diffs.set_index(["subset", "metric"]).loc[("full", "fp_components_per_image")]
    assert fp.difference > 0 and fp["ci95 low"] > 0  # B - A up, and that is the worse way


def test_the_same_images_scored_in_another_pairing_straddle_zero():
    """Each image's figures moved to its neighbour: every total and mean is the same, but
    each image differs, so the interval straddles 0 and no side is declared better."""
    base = _per_image("weak")
    swapped = base.copy()
    order = np.arange(len(base)).reshape(-1, 2)[:, ::-1].ravel()  # 0<->1, 2<->3, ...
    scores = [c for c in base if c not in ("file", "clean")]
    swapped[scores] = base[scores].to_numpy()[order]
    diffs = _verdicts(_result("a", base), _result("b", swapped))
    full = diffs[diffs.subset == "full"].set_index("metric")
    assert full.difference.to_numpy() == pytest.approx(0, abs=1e-12)
    for metric in ("pooled_iou", "mean_image_dice", "lesion_sensitivity",
                   "fp_components_per_image", "lesion_dice", "lesion_hd95"):
        assert full.loc[metric, "ci95 low"] < 0 < full.loc[metric, "ci95 high"], metric
    assert (diffs.verdict == "no clear difference").all()


def test_identical_runs_are_no_clear_difference_with_a_zero_interval():
    table = _per_image("strong")
    diffs = _verdicts(_result("a", table), _result("b", table.copy()))
    assert (diffs.verdict == "no clear difference").all()
    assert (diffs[["difference", "ci95 low", "ci95 high"]].to_numpy() == 0).all()


def test_paired_bootstrap_of_a_run_against_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    tp, fp, fn = (rng.integers(0, 50, 30) for _ in range(3))
    c = ConfusionCounts(tp, fp, fn, np.zeros(30, np.int64))
    assert paired_bootstrap(c, c) == {"pooled_iou": (0.0, 0.0, 0.0),
                                      "mean_image_dice": (0.0, 0.0, 0.0)}
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(c, c.take(np.arange(10)))


def test_runs_are_found_by_id_folder_or_the_callers_default(two_runs, tmp_path):
    runs_dir = two_runs[0].parent
    assert find_runs(["b-longer", str(two_runs[0])], runs_dir) == [two_runs[1], two_runs[0]]
    assert find_runs([str(runs_dir)], runs_dir) == sorted(two_runs)  # a sweep-like folder
    default = [two_runs[1], tmp_path / "gone", two_runs[0]]  # e.g. the newest report's runs
    assert find_runs([], runs_dir, default) == [two_runs[1], two_runs[0]]
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        find_runs(["no-such-run"], runs_dir)
    with pytest.raises(FileNotFoundError, match="no evaluated run"):
        find_runs([], tmp_path / "empty", [tmp_path / "gone"])


def test_differences_match_each_runs_own_metrics_whatever_the_row_order(two_runs):
    a, b = load_results(two_runs)
    b.per_image = b.per_image.sample(frac=1, random_state=0)  # images in another order
    diffs = paired_differences([a, b], n_resamples=200)
    full = diffs[diffs.subset == "full"].set_index("metric")
    for metric in ("pooled_iou", "mean_image_dice", "lesion_sensitivity",
                   "fp_components_per_image", "lesion_dice", "lesion_hd95", "pq"):
        expected = b.headline.full.metrics[metric] - a.headline.full.metrics[metric]
        assert full.loc[metric, "difference"] == pytest.approx(expected)
    assert full.loc["pooled_iou", "ci95 low"] <= full.loc["pooled_iou", "ci95 high"]
    assert full.loc["mean_image_dice", "verdict"] == "b-longer better"  # 8 epochs vs 1
    table = summary_table([a, b])
    assert table.loc["b-longer", "test lesion Dice"] == b.headline.full.metrics["lesion_dice"]
    assert table.loc["b-longer", "clean image Dice"] == b.headline.clean.metrics[
        "mean_image_dice"]
    assert table.loc["b-longer", "epochs"] == 8 and table.loc["a-short", "epochs"] == 1
    left, right = aligned_dice(a, b)
    assert (right.dice - left.dice).mean() == pytest.approx(
        full.loc["mean_image_dice", "difference"])


def test_a_run_without_per_image_counts_is_evaluated_first(two_runs, tmp_path, capsys):
    run_dir = tmp_path / two_runs[0].name  # a copy: the session's runs stay as they are
    shutil.copytree(two_runs[0], run_dir)
    table = run_dir / "eval-test" / "per_image.csv"
    old = pd.read_csv(table)
    old.drop(columns=[c for c in old if c.startswith(("tp_", "fp_", "fn_"))]).to_csv(
        table, index=False)
    (result,) = load_results([run_dir])
    assert "evaluating on test first" in capsys.readouterr().out
    assert result.per_image.tp_headline.tolist() == old.tp_headline.tolist()
    assert "tp_headline" in pd.read_csv(two_runs[0] / "eval-test" / "per_image.csv", nrows=1)


def test_the_notebook_compares_the_runs_it_is_given(two_runs, tmp_path):
    out = tmp_path / "05.ipynb"
    papermill.execute_notebook(
        ROOT / "notebooks" / "05_compare.ipynb", out, kernel_name="python3",
        parameters={"compare": [str(r) for r in two_runs], "runs_dir": str(tmp_path)},
        cwd=str(ROOT / "notebooks"), progress_bar=False)
    text = out.read_text()
    assert "b-longer better" in text and "baseline (first): a-short" in text
    assert text.count('"image/png"') >= 2  # learning curves, per-image scatter
