"""``brainseg run``: notebooks 01–04 (05 when asked) into a dated report, the index, failures."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from brainseg_lib.cli import main
from brainseg_lib.config import load_params
from brainseg_lib.reporting.pipeline import COMPARE, NOTEBOOKS
from brainseg_lib.training.loop import reuse_trained_run
from conftest import ROOT

CHROMIUM = shutil.which("chromium")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"]


def test_smoke_pipeline_writes_a_full_report(smoke_reports):
    code, reports = smoke_reports
    assert code == 0
    (summary_file,) = reports.glob("*/*/summary.json")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", summary_file.parent.parent.name)
    run_dir = summary_file.parent
    for nb in (*NOTEBOOKS, COMPARE):
        assert (run_dir / f"{nb}.ipynb").exists() and (run_dir / f"{nb}.html").exists()
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "succeeded" and summary["dataset"]["kind"] == "synthetic"
    assert summary["run_id"] == run_dir.name == "smoke-fixed"
    assert summary["training"]["epochs"] == 10 and summary["training"]["device"] == "cpu"
    # the summary carries the run's own evaluation, and ten epochs on the demo data learn
    run_metrics = json.loads((reports.parent / "runs" / "smoke-fixed" / "eval-test"
                              / "metrics.json").read_text())
    assert summary["headline"]["pooled_iou"] == run_metrics["headline"]["metrics"]["pooled_iou"]
    assert summary["headline"]["pooled_iou"] > 0.5
    lesion = run_metrics["headline"]["metrics"]
    assert summary["headline"]["lesion"] == {k: lesion[k] for k in (
        "lesion_sensitivity", "fp_components_per_image", "lesion_dice", "pq")}
    assert summary["headline"]["ece"] == run_metrics["calibration"]["raw"]["metrics"]["ece"]
    # ... computed at the threshold given on the command line (the per-image table says so)
    per_image = (reports.parent / "runs" / "smoke-fixed" / "eval-test" / "per_image.csv")
    assert set(pd.read_csv(per_image).threshold_headline) == {0.3}
    assert run_metrics["headline"]["setting"].startswith("64px (model resolution), threshold 0.30")
    assert [n["name"] for n in summary["notebooks"]] == [*NOTEBOOKS, COMPARE]
    assert [n["status"] for n in summary["notebooks"]] == ["succeeded"] * 5
    executed = json.loads((run_dir / "03_evaluate.ipynb").read_text())
    injected = "".join(next(c["source"] for c in executed["cells"]
                            if "injected-parameters" in c["metadata"].get("tags", [])))
    assert "threshold = 0.3" in injected and "\nlr = " not in injected  # only what 03 takes
    text = json.dumps(executed)
    assert "SYNTHETIC DEMO DATA" in text and "0.80568" in text
    index = (reports / "index.html").read_text()
    assert summary["run_id"] in index and "synthetic" in index
    assert f"<td>{lesion['lesion_sensitivity']:.3f}</td>" in index and "FP / image" in index


def test_unknown_parameter_is_rejected_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "params" / "smoke.yaml").read_text() + "learning_rate: 0.1\n")
    reports = tmp_path / "reports"
    assert main(["run", "--params", str(bad), "--reports-dir", str(reports)]) == 2
    assert "unknown parameter 'learning_rate'" in capsys.readouterr().err
    assert not reports.exists()


def test_a_failing_notebook_marks_the_run_failed_and_keeps_it(tmp_path):
    reports = tmp_path / "reports"
    code = main(["run", "--params", str(ROOT / "params" / "smoke.yaml"), "--no-download",
                 "--reports-dir", str(reports), "--set", "synthetic=false",
                 "--set", f"data_dir={tmp_path / 'no-such-dataset'}",
                 "--set", f"runs_dir={tmp_path / 'runs'}"])
    assert code == 1
    (summary_file,) = reports.glob("*/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "failed"
    first = summary["notebooks"][0]
    assert first["status"] == "failed" and "no-such-dataset" in first["error"]
    partial = json.loads((summary_file.parent / "01_data_exploration.ipynb").read_text())
    errors = [o for c in partial["cells"] for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors and "does not exist" in errors[0]["evalue"]
    assert not (summary_file.parent / "02_train.ipynb").exists()
    assert 'class="failed"' in (reports / "index.html").read_text()
    page = (summary_file.parent / "01_data_exploration.html").read_text()
    bar = re.findall(r'<nav[^>]*class="bs-nav".*?</nav>', page, re.S)[0]
    assert "02_train.html" not in bar  # no link to a report that never came


def test_runs_never_overwrite_each_other(smoke_reports, tmp_path):
    """A second ``brainseg run`` with the same run id (here one that fails at once) gets a
    report folder of its own; the first report stays as it was, and the index lists both."""
    _, reports = smoke_reports
    shared = tmp_path / "reports"
    shutil.copytree(reports, shared)  # the module's reports stay as the other tests expect
    (first,) = shared.glob("*/smoke-fixed")
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    code = main(["run", "--params", str(ROOT / "params" / "smoke.yaml"), "--no-download",
                 "--reports-dir", str(shared), "--set", "run_id=smoke-fixed",
                 "--set", "synthetic=false", "--set", f"data_dir={tmp_path / 'no-data'}",
                 "--set", f"runs_dir={tmp_path / 'runs'}"])
    assert code == 1
    folders = sorted(p.parent for p in shared.glob("*/*/summary.json"))
    assert len(folders) == 2 and first in folders
    (second,) = (f for f in folders if f != first)
    summary = json.loads((second / "summary.json").read_text())
    assert summary["run_id"] == "smoke-fixed" and summary["status"] == "failed"
    after = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert after.keys() == before.keys() and after == before
    rows = re.findall(r'<tr class="(\w+)">', (shared / "index.html").read_text())
    assert sorted(rows) == ["failed", "succeeded"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_index_renders_in_a_real_browser(smoke_reports, tmp_path):
    _, reports = smoke_reports
    url = (reports / "index.html").as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *CHROME_FLAGS, *profile, "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    rows = re.findall(r"<tr class=\"(\w+)\">", dom)
    assert rows == ["succeeded"]
    links = re.findall(r'href="([^"]+)"', dom)
    assert len(links) == 6  # the five reports, and the fg IoU linking 03's result
    assert sum(link.endswith("/03_evaluate.html#headline") for link in links) == 1
    for link in links:
        assert (reports / link.split("#")[0]).is_file(), link
    shot = tmp_path / "index.png"
    subprocess.run([CHROMIUM, *CHROME_FLAGS, *profile, "--window-size=1400,700",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_reports_hide_both_parameters_cells(tmp_path):
    import nbformat

    from brainseg_lib.reporting.pipeline import render_html

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("VISIBLE_MARKER = 1"),
                nbformat.v4.new_code_cell("DECLARED_MARKER = None",
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("INJECTED_MARKER = 2",
                                          metadata={"tags": ["injected-parameters"]})]
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    html = render_html(path).read_text()
    assert "VISIBLE_MARKER" in html
    assert "DECLARED_MARKER" not in html and "INJECTED_MARKER" not in html
    assert "DECLARED_MARKER" in path.read_text()  # the notebook itself stays complete


def test_run_with_compare_adds_05_beside_the_named_runs(smoke_reports):
    """The smoke run names itself in ``compare``: 05 runs after the four, sets the run beside
    itself, and the difference is exactly nothing."""
    _, reports = smoke_reports
    (summary_file,) = reports.glob("*/*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["params"]["compare"] == ["smoke-fixed", "smoke-fixed"]
    compared = (summary_file.parent / "05_compare.ipynb").read_text()
    assert "no clear difference" in compared and "smoke-fixed better" not in compared


def test_a_finished_run_is_shown_not_trained_again(smoke_reports, capsys):
    """What 02 does when ``brainseg run`` names a run that has finished training (say, on a
    GPU machine): its record, read back, and no new epoch."""
    _, reports = smoke_reports
    run_dir = reports.parent / "runs" / "smoke-fixed"
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    params = load_params(ROOT / "params" / "smoke.yaml", runs_dir=str(run_dir.parent),
                         run_id="smoke-fixed")
    result = reuse_trained_run(params)
    assert result is not None and result.run_dir == run_dir
    assert len(result.history) == 10 and result.stop_reason
    assert "has already finished training (10 epochs on cpu" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert reuse_trained_run(load_params(ROOT / "params" / "smoke.yaml",
                                         runs_dir=str(run_dir.parent), run_id="new")) is None
