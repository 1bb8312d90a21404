"""05_compare: runs found, aligned on the same images, paired differences that add up."""

import json

import numpy as np
import pandas as pd
import papermill
import pytest

from brainseg_lib.evaluation.compare import (
    aligned_dice,
    find_runs,
    load_results,
    paired_differences,
    summary_table,
)
from brainseg_lib.metrics.functional import ConfusionCounts
from brainseg_lib.metrics.intervals import paired_bootstrap
from conftest import ROOT


@pytest.fixture
def two_runs(evaluated_runs):
    return evaluated_runs


def test_paired_bootstrap_of_a_run_against_itself_is_exactly_zero():
    rng = np.random.default_rng(0)
    tp, fp, fn = (rng.integers(0, 50, 30) for _ in range(3))
    c = ConfusionCounts(tp, fp, fn, np.zeros(30, np.int64))
    assert paired_bootstrap(c, c) == {"pooled_iou": (0.0, 0.0, 0.0),
                                      "mean_image_dice": (0.0, 0.0, 0.0)}
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(c, c.take(np.arange(10)))


def test_runs_are_found_by_id_folder_or_latest_report(two_runs, tmp_path):
    runs_dir = two_runs[0].parent
    assert find_runs(["b-longer", str(two_runs[0])], runs_dir) == [two_runs[1], two_runs[0]]
    assert find_runs([str(runs_dir)], runs_dir) == sorted(two_runs)  # a sweep-like folder
    day = tmp_path / "reports" / "2026-01-02"
    for run_dir in two_runs:
        (day / run_dir.name).mkdir(parents=True)
        (day / run_dir.name / "summary.json").write_text(json.dumps({"run_id": run_dir.name}))
    (tmp_path / "reports" / "2026-01-01").mkdir()  # an older day: not taken
    assert find_runs([], runs_dir, tmp_path / "reports") == sorted(two_runs)
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        find_runs(["no-such-run"], runs_dir)
    with pytest.raises(FileNotFoundError, match="no evaluated run"):
        find_runs([], tmp_path / "empty", tmp_path / "reports-none")


def test_differences_match_each_runs_own_metrics_whatever_the_row_order(two_runs):
    a, b = load_results(two_runs)
    b.per_image = b.per_image.sample(frac=1, random_state=0)  # images in another order
    diffs = paired_differences([a, b], n_resamples=200)
    full = diffs[diffs.subset == "full"].set_index("metric")
    for metric in ("pooled_iou", "mean_image_dice", "lesion_sensitivity",
                   "fp_components_per_image", "lesion_dice", "lesion_hd95", "pq"):
        expected = (b.metrics["headline"]["metrics"][metric]
                    - a.metrics["headline"]["metrics"][metric])
        assert full.loc[metric, "difference"] == pytest.approx(expected)
    assert full.loc["pooled_iou", "ci95 low"] <= full.loc["pooled_iou", "ci95 high"]
    assert full.loc["mean_image_dice", "verdict"] == "b-longer better"  # 8 epochs vs 1
    # fewer false alarms is better: the verdict follows the sign of the gain, not of B - A
    fp = full.loc["fp_components_per_image"]
    if fp["ci95 high"] < 0:
        assert fp["verdict"] == "b-longer better"
    elif fp["ci95 low"] > 0:
        assert fp["verdict"] == "a-short better"
    table = summary_table([a, b])
    assert table.loc["b-longer", "test lesion Dice"] == b.metrics["headline"]["metrics"][
        "lesion_dice"]
    assert table.loc["b-longer", "epochs"] == 8 and table.loc["a-short", "epochs"] == 1
    left, right = aligned_dice(a, b)
    assert (right.dice - left.dice).mean() == pytest.approx(
        full.loc["mean_image_dice", "difference"])


def test_a_run_without_per_image_counts_is_evaluated_first(two_runs, capsys):
    table = two_runs[0] / "eval-test" / "per_image.csv"
    old = pd.read_csv(table)
    old.drop(columns=[c for c in old if c.startswith(("tp_", "fp_", "fn_"))]).to_csv(
        table, index=False)
    (result,) = load_results([two_runs[0]])
    assert "evaluating on test first" in capsys.readouterr().out
    assert result.per_image.tp_headline.tolist() == old.tp_headline.tolist()


def test_the_notebook_compares_the_runs_it_is_given(two_runs, tmp_path):
    out = tmp_path / "05.ipynb"
    papermill.execute_notebook(
        ROOT / "notebooks" / "05_compare.ipynb", out, kernel_name="python3",
        parameters={"compare": [str(r) for r in two_runs], "runs_dir": str(tmp_path)},
        cwd=str(ROOT / "notebooks"), progress_bar=False)
    text = out.read_text()
    assert "b-longer better" in text and "baseline (first): a-short" in text
    assert text.count('"image/png"') >= 2  # learning curves, per-image scatter
