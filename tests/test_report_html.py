"""The HTML reports read like a paper: the result first, code folded, parameters out of the way,
03's metrics in tables a reader can scan, links between a run's reports.

The headline box and tables are checked against a real ``metrics.json`` (the shipped model's
test evaluation); the rendering against a copy of a committed report and, in a browser
(playwright driving Debian's chromium), against the HTML of a fresh smoke ``brainseg run``.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

from brainseg_lib.metrics.functional import METRIC_DEFINITIONS
from brainseg_lib.reporting import headline
from brainseg_lib.reporting.pipeline import write_index
from brainseg_lib.reporting.rendering import render_html
from conftest import ROOT, tiny_params

CHROMIUM = shutil.which("chromium")
# a committed report: real executed notebooks (before the headline box existed); a checkout
# with reports/ pruned skips the tests that render it
COMMITTED = next((p.parent for p in sorted((ROOT / "reports").glob("*/*/summary.json"))), None)
METRICS = json.loads((ROOT / "models" / "reference" / "brainseg.json").read_text())["test_metrics"]


class _Figures(HTMLParser):
    """Every ``<td data-metric=...>`` of a box: (metric, subset) -> (exact value, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], tuple[float, str]] = {}
        self._open: tuple[str, str, float] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and "data-metric" in a:
            self._open = (a["data-metric"], a["data-subset"], float(a["data-value"]))

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            key, subset, value = self._open
            self.cells[(key, subset)] = (value, data)
            self._open = None


def box_figures(html: str) -> dict[tuple[str, str], tuple[float, str]]:
    parser = _Figures()
    parser.feed(html)
    return parser.cells


def expected_box_figures(metrics: dict) -> dict[tuple[str, str], float]:
    """What the 03 box must show, read from metrics.json by hand."""
    out = {("test_bce", "full"): metrics["loss"]["bce"]}
    for subset, block in (("full", "headline"), ("clean", "headline_clean")):
        for key in ("pooled_iou", "mean_image_dice", "fg_bg_miou") if block in metrics else ():
            out[(key, subset)] = metrics[block]["metrics"][key]
    return out


def test_evaluation_box_shows_the_metrics_json_figures_and_the_reference():
    box = headline.evaluation_headline(METRICS)
    shown = box_figures(box)
    assert {k: v for k, (v, _) in shown.items()} == expected_box_figures(METRICS)
    low, high = METRICS["headline_clean"]["ci95"]["mean_image_dice"]
    value, text = shown[("mean_image_dice", "clean")]
    assert text == f"{value:.3f} [{low:.2f}, {high:.2f}]"
    assert shown[("test_bce", "full")][1] == f"{METRICS['loss']['bce']:.4f}"
    assert "0.80568" in box and "0.07201" in box  # the published reference beside ours
    assert f'id="{headline.HEADLINE_ID}"' in box


def test_evaluation_box_without_clean_subset_or_intervals_shows_the_full_split():
    plain = {k: v for k, v in METRICS.items() if not k.endswith("_clean")}
    plain["headline"] = {k: v for k, v in plain["headline"].items() if k != "ci95"}
    shown = box_figures(headline.evaluation_headline(plain))
    assert {subset for _, subset in shown} == {"full"}
    assert shown[("pooled_iou", "full")][1] == f"{METRICS['headline']['metrics']['pooled_iou']:.3f}"


def test_training_box_says_epochs_minutes_best_score_and_why_it_stopped():
    record = {"best_epoch": 14, "best_val_iou": 0.5711517353854931, "epochs_run": 15,
              "stop_reason": "time budget", "train_seconds_this_session": 933.16,
              "compile_seconds": 0.0, "train_seconds_total": 927.51, "ema": False,
              "device": "cpu", "trained_on": ""}
    box = headline.training_headline(record)
    shown = box_figures(box)
    assert shown[("epochs_run", "train")] == (15.0, "15")
    assert shown[("minutes", "train")][1] == "15.6"
    assert shown[("best_val_iou", "train")][1] == "0.5712 (14)"
    assert "best val_iou" in box and "time budget" in box


def test_metrics_tables_have_short_names_and_a_footnote_defining_them():
    plain = headline.plain_table(METRICS)
    assert list(plain.columns) == ["full test (215)", "clean subset (166)"]
    assert plain.loc["fg IoU (pooled)", "full test (215)"].startswith(
        f"{METRICS['headline']['metrics']['pooled_iou']:.3f} [")
    assert plain.loc["test BCE", "full test (215)"] == f"{METRICS['loss']['bce']:.4f}"
    other = headline.settings_table(METRICS)
    assert len(other.columns) == 6
    assert {setting for setting, _ in other.columns} == set(headline.OTHER_SETTINGS.values())
    assert other.loc["fg IoU (pooled)", ("selected, model resolution", "clean")].startswith(
        f"{METRICS['selected_clean']['metrics']['pooled_iou']:.3f}")
    names = [*plain.columns, *(c for pair in other.columns for c in pair)]
    assert max(len(n) for n in names) <= 30  # the old headers ran to 100 characters
    notes = headline.table_notes(METRICS)
    for key, definition in METRIC_DEFINITIONS.items():
        assert f"<b>{headline.SHORT_NAMES[key]}</b>: {definition}".replace("'", "&#x27;") in notes
    for block in ("headline", "selected", "selected_original_resolution"):
        assert METRICS[block]["setting"] in notes


def test_header_names_the_data_by_name_and_hash_and_folds_its_path(synthetic_root, tmp_path):
    from brainseg_lib.data.coco import dataset_hash
    from brainseg_lib.data.locate import DataSource
    from brainseg_lib.reporting.notebook import header_html

    params = tiny_params(tmp_path, synthetic_root)
    source = DataSource(synthetic_root, "real", "the data_dir parameter")
    page = header_html("03 · Evaluate", params, source, "03_evaluate")
    shown, folded = page.split("<details>", 1)
    assert f"{synthetic_root.name} (real), annotations {dataset_hash(synthetic_root)}" in shown
    assert str(synthetic_root) not in shown
    assert f"{synthetic_root} (found by the data_dir parameter)" in folded


@pytest.fixture(scope="module")
def committed_copy(tmp_path_factory) -> Path:
    """A committed report rendered afresh, inside a reports/<day>/<run>/ layout."""
    if COMMITTED is None:
        pytest.skip(f"no committed report under {ROOT / 'reports'} (pruned checkout)")
    out = tmp_path_factory.mktemp("rendered") / "reports" / COMMITTED.parent.name / COMMITTED.name
    shutil.copytree(COMMITTED, out)
    for notebook in sorted(out.glob("*.ipynb")):
        render_html(notebook)
    write_index(out.parent.parent)
    return out


def test_rendered_report_folds_code_hides_parameters_and_links_the_run(committed_copy):
    page = (committed_copy / "03_evaluate.html").read_text()
    executed = nbformat.read(committed_copy / "03_evaluate.ipynb", as_version=4)
    tags = [t for c in executed.cells for t in c.metadata.get("tags", [])]
    assert "parameters" in tags and "injected-parameters" in tags  # the notebook stays whole
    assert "= None  # default" not in page and "# Parameters" not in page
    code_cells = [c for c in executed.cells if c.cell_type == "code"]
    assert page.count('<details class="bs-code">') == len(code_cells) - 2
    # every input editor sits inside a fold
    editor = 'class="jp-CodeMirrorEditor jp-Editor jp-InputArea-editor"'
    assert page.count(editor) == len(code_cells) - 2
    for chunk in page.split('<details class="bs-code">')[1:]:
        assert chunk.index(editor) < chunk.index("</details>")
    links = re.findall(r'<nav[^>]*class="bs-nav".*?</nav>', page, re.S)[0]
    hrefs = re.findall(r'href="([^"]+)"', links)
    for name in ("01_data_exploration", "02_train", "04_visualise"):
        assert f"{name}.html" in hrefs and (committed_copy / f"{name}.html").is_file()
    assert "03_evaluate.html" not in hrefs  # this page: named, not linked
    assert (committed_copy / "../../index.html").resolve().is_file()
    for anchor in (h[1:] for h in hrefs if h.startswith("#")):
        assert f'id="{anchor}"' in page, anchor
    assert "#Metrics" in hrefs and "#Against-the-published-reference" in hrefs


def test_the_bar_names_the_run_s_planned_reports_before_they_exist(tmp_path):
    """The pipeline renders each notebook as it finishes: the bar lists what the run will
    hold (05 only when it compares), not what is on disk yet."""
    from brainseg_lib.reporting.pipeline import COMPARE, NOTEBOOKS
    from brainseg_lib.reporting.rendering import report_links

    first = tmp_path / "01_data_exploration.ipynb"
    links = report_links(first, [*NOTEBOOKS, COMPARE])
    assert [link["href"] for link in links] == [f"{n}.html" for n in (*NOTEBOOKS, COMPARE)]
    assert [link["here"] for link in links] == [True, False, False, False, False]
    assert [link["label"] for link in report_links(first)] == ["01 data exploration"]


def test_index_links_each_runs_03_result(committed_copy):
    index = (committed_copy.parent.parent / "index.html").read_text()
    link = f"{committed_copy.parent.name}/{committed_copy.name}/03_evaluate.html#headline"
    assert f'href="{link}"' in index


def test_image_galleries_are_embedded_as_jpeg(smoke_reports):
    """04's MRI figures are photographs: as PNG they made the committed report 7–9 MB."""
    code, reports = smoke_reports
    assert code == 0
    (folder,) = (p.parent for p in reports.glob("*/*/summary.json"))
    executed = nbformat.read(folder / "04_visualise.ipynb", as_version=4)
    kinds = [kind for cell in executed.cells if cell.cell_type == "code"
             for output in cell.outputs for kind in output.get("data", {})
             if kind.startswith("image/")]
    assert len(kinds) >= 3 and set(kinds) == {"image/jpeg"}
    assert 'src="data:image/jpeg;base64,' in (folder / "04_visualise.html").read_text()


# --- in a browser ---------------------------------------------------------------------------

browser = pytest.mark.skipif(CHROMIUM is None,
                             reason="chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def page():
    api = pytest.importorskip("playwright.sync_api",
                              reason="playwright is a dev dependency: pip install -e '.[dev]'")
    with api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium.new_page(viewport={"width": 1280, "height": 900})
        chromium.close()


def check_folded_report(page, html_file: Path) -> None:
    """Open ``html_file``: no parameters cell in sight, every code input folded, one
    expanding on a click."""
    page.goto(html_file.as_uri())
    text = page.inner_text("body")
    assert "= None  # default" not in text and "# Parameters" not in text
    editors = page.locator(".jp-InputArea-editor")
    assert editors.count() > 0
    assert not any(editors.nth(i).is_visible() for i in range(editors.count()))
    page.locator("details.bs-code > summary").first.click()
    assert editors.first.is_visible()


@browser
@pytest.mark.browser
def test_committed_report_opens_folded_in_a_browser(committed_copy, page):
    check_folded_report(page, committed_copy / "03_evaluate.html")
    page.locator("nav.bs-nav a", has_text="02 train").click()
    page.wait_for_url("**/02_train.html")


@browser
@pytest.mark.browser
def test_smoke_report_opens_with_its_result_in_a_browser(smoke_reports, page, tmp_path):
    code, reports = smoke_reports
    assert code == 0
    (folder,) = (p.parent for p in reports.glob("*/*/summary.json"))
    metrics = json.loads((reports.parent / "runs" / "smoke-fixed" / "metrics.json").read_text())
    for name in ("02_train", "03_evaluate"):
        check_folded_report(page, folder / f"{name}.html")
        box = page.locator(f"#{headline.HEADLINE_ID}")
        assert box.is_visible() and box.bounding_box()["y"] < 900  # on the first screen
        page.screenshot(path=tmp_path / f"{name}.png")
    shown = box_figures(page.locator(f"#{headline.HEADLINE_ID}").evaluate("e => e.outerHTML"))
    expected = expected_box_figures(metrics)
    assert {k: v for k, (v, _) in shown.items()} == expected
    for key, (value, text) in shown.items():
        assert text.startswith(f"{value:.4f}" if key[0] == "test_bce" else f"{value:.3f}")
