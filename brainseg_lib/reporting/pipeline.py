"""``brainseg run``: notebooks 01–04 (and 05_compare when asked) executed with papermill
into a dated report.

Layout: ``reports/<YYYY-MM-DD>/<run-id>/NN_name.ipynb`` and ``.html``, ``summary.json``,
and ``reports/index.html`` listing every run. Parameters are validated before anything
runs; a failing notebook keeps its partial executed copy and marks the run failed.
"""

from __future__ import annotations

import html
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from brainseg_lib.config import Params, load_params, project_root
from brainseg_lib.evaluation.result import Evaluation
from brainseg_lib.io import atomic_write_json, atomic_write_text
from brainseg_lib.reporting.headline import HEADLINE_ID
from brainseg_lib.reporting.notebook_params import NOTEBOOK_PARAMETERS
from brainseg_lib.reporting.rendering import render_html
from brainseg_lib.rundir import (
    METRICS_FILE,
    REPORT_SUMMARY_FILE,
    RunDir,
    eval_dir,
    new_run_id,
    read_env,
    target_run_dir,
)
from brainseg_lib.tracking import log_report

NOTEBOOKS = ("01_data_exploration", "02_train", "03_evaluate", "04_visualise")
COMPARE = "05_compare"  # runs after the four when ``compare`` names runs to set this one beside
KERNEL = "python3"
HEADLINE_KEYS = ("pooled_iou", "mean_image_dice", "fg_bg_miou")
LESION_KEYS = ("lesion_sensitivity", "fp_components_per_image", "lesion_dice", "pq")


def notebooks_dir() -> Path:
    return project_root() / "notebooks"


def default_reports_dir() -> Path:
    return project_root() / "reports"


def newest_report_runs(runs_dir: Path, reports_dir: Path | None = None) -> list[Path]:
    """The run folders under ``runs_dir`` of the reports of the newest day under
    ``reports_dir`` (05_compare's default), in report order; [] when there is none."""
    days = sorted(day for day in (reports_dir or default_reports_dir()).glob("????-??-??")
                  if day.is_dir())
    summaries = sorted(days[-1].glob(f"*/{REPORT_SUMMARY_FILE}")) if days else []
    return [runs_dir / json.loads(summary.read_text())["run_id"] for summary in summaries]


def _unique_report_dir(reports_dir: Path, run_id: str) -> Path:
    day = reports_dir / f"{datetime.now():%Y-%m-%d}"
    report_dir, n = day / run_id, 2
    while report_dir.exists():
        report_dir, n = day / f"{run_id}-{n}", n + 1
    report_dir.mkdir(parents=True)
    return report_dir


def _headline(params: Params, since: float) -> dict[str, Any]:
    """Test metrics written by this report's 03 notebook; nothing older (a failed 03 must
    not show the numbers of an earlier evaluation)."""
    metrics_file = eval_dir(target_run_dir(params), "test") / METRICS_FILE
    if not metrics_file.exists() or metrics_file.stat().st_mtime < since:
        return {}
    record = Evaluation.from_json(json.loads(metrics_file.read_text()))
    full, clean = record.headline.full.metrics, record.headline.clean
    selected = record.selected.full
    head: dict[str, Any] = {k: full[k] for k in HEADLINE_KEYS}
    if clean is not None:
        head["clean"] = {k: clean.metrics[k] for k in HEADLINE_KEYS}
        head["clean_images"] = record.header.clean_test.images
    head["test_bce"] = record.header.loss.bce
    head["selected"] = {k: selected.metrics[k] for k in HEADLINE_KEYS}
    head["selected_setting"] = selected.setting
    if "lesion_dice" in full:  # evaluations before lesion-wise metrics lack it
        head["lesion"] = {k: full[k] for k in LESION_KEYS}
        if clean is not None:
            head["clean"]["lesion"] = {k: clean.metrics[k] for k in LESION_KEYS}
        head["ece"] = record.calibration.raw.metrics["ece"]
    return head


def _training(params: Params) -> dict[str, Any]:
    """Where and how long the run's model trained (it may predate this report)."""
    run = RunDir(target_run_dir(params))
    record = run.train_record()
    if record is None:
        return {}
    return {"epochs": record.epochs_run, "stop_reason": record.stop_reason,
            "minutes": round(record.train_seconds_this_session / 60, 1),
            "device": run.device()}


def _dataset(params: Params) -> dict[str, Any]:
    env = read_env(target_run_dir(params))
    if env:
        return env.get("dataset", {})
    return {"kind": "synthetic" if params.synthetic else "unknown"}


def _report_params(params_file: str | Path, name: str | None,
                   overrides: dict[str, Any] | None) -> tuple[Params, str]:
    """The run's parameters, checked before anything runs, with its run id fixed."""
    params = load_params(params_file, **(overrides or {}))  # errors before anything runs
    run_id = params.run_id or new_run_id(name or params.profile)
    params = load_params(params_file, **((overrides or {}) | {"run_id": run_id,
                                                              "progress_bar": False}))
    return params, run_id


def _execute_notebook(nb: str, out_dir: Path, injected: dict[str, Any],
                      planned: list[str]) -> dict[str, Any]:
    """Run one notebook into ``out_dir`` and render its HTML (linking the ``planned``
    notebooks of the run); its summary entry says how it went (a failure is recorded, not
    raised)."""
    import papermill

    executed = out_dir / f"{nb}.ipynb"
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"name": nb, "notebook": executed.name, "status": "succeeded"}
    print(f"  {nb} ...", end=" ", flush=True)
    try:
        papermill.execute_notebook(
            notebooks_dir() / f"{nb}.ipynb", executed, kernel_name=KERNEL,
            # each notebook gets the parameters its parameters cell declares
            parameters={k: injected[k] for k in ("profile", *NOTEBOOK_PARAMETERS[nb])},
            cwd=str(notebooks_dir()), progress_bar=False, log_output=False,
            # the kernel's own start-up warnings (e.g. "running over TCP") are noise here
            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except Exception as err:  # papermill raises PapermillExecutionError, kernels others
        entry["status"] = "failed"
        entry["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:500]}"
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    if executed.exists():
        entry["html"] = render_html(executed, planned).name
    print(f"{entry['status']} ({entry['seconds']} s)", flush=True)
    return entry


def _execute_notebooks(params: Params, out_dir: Path,
                       injected: dict[str, Any]) -> list[dict[str, Any]]:
    """Notebooks 01–04 (and 05_compare when asked) in order, stopping at the first
    failure, whose partial notebook is kept."""
    entries = []
    planned = [*NOTEBOOKS, *((COMPARE,) if params.compare else ())]
    for nb in planned:
        entry = _execute_notebook(nb, out_dir, injected, planned)
        entries.append(entry)
        if entry["status"] == "failed":
            print(f"  failed: {entry['error']}\n  partial notebook: {out_dir / entry['notebook']}",
                  file=sys.stderr)
            _relink(out_dir, entries)
            break
    return entries


def _relink(out_dir: Path, entries: list[dict[str, Any]]) -> None:
    """After a failure, re-render the reports that exist so that their bar links only each
    other, not the planned reports that never came."""
    rendered = [e["name"] for e in entries if "html" in e]
    for name in rendered:
        render_html(out_dir / f"{name}.ipynb", rendered)


def _outcome(params: Params, notebooks: list[dict[str, Any]], started: float,
             started_wall: float) -> dict[str, Any]:
    """The summary's closing fields: status, duration, data, test metrics and training."""
    failed = any(e["status"] == "failed" for e in notebooks)
    return {
        "status": "failed" if failed else "succeeded",
        "seconds": round(time.perf_counter() - started, 1),
        "finished": datetime.now().isoformat(timespec="seconds"),
        "dataset": _dataset(params),
        "headline": {} if failed else _headline(params, started_wall),
        "training": _training(params),
    }


def run_pipeline(params_file: str | Path, name: str | None = None,
                 reports_dir: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute the notebooks in order; returns (and writes) the run's summary."""
    params, run_id = _report_params(params_file, name, overrides)
    reports_dir = Path(reports_dir) if reports_dir else default_reports_dir()
    out_dir = _unique_report_dir(reports_dir, run_id)
    injected = params.to_dict()
    if params.compare:  # 05_compare sets this run beside the ones named
        injected["compare"] = [*params.compare, run_id]
    summary: dict[str, Any] = {
        "run_id": run_id, "name": name or params.profile, "profile": params.profile,
        "params_file": str(params_file), "started": datetime.now().isoformat(timespec="seconds"),
        "status": "running", "notebooks": [], "params": injected,
    }
    print(f"brainseg run {run_id}: reports in {out_dir}")
    started, started_wall = time.perf_counter(), time.time()
    summary["notebooks"] = _execute_notebooks(params, out_dir, injected)
    summary.update(_outcome(params, summary["notebooks"], started, started_wall))
    atomic_write_json(out_dir / REPORT_SUMMARY_FILE, summary)
    log_report(target_run_dir(params), params, out_dir)  # MLflow, when tracking_uri is set
    write_index(reports_dir)
    print(f"{summary['status']} in {summary['seconds']} s; index: {reports_dir / 'index.html'}")
    return summary


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def _notebook_links(rel: str, notebooks: list[dict[str, Any]]) -> str:
    """Links to each rendered notebook, labelled by its number (01, 02, ...)."""
    return " ".join(
        f'<a href="{html.escape(rel)}/{html.escape(nb["html"])}">{nb["name"][:2]}</a>'
        for nb in notebooks if nb.get("html"))


def _headline_link(rel: str, notebooks: list[dict[str, Any]], text: str) -> str:
    """``text`` linked to the headline box of the run's rendered 03 (as is without one)."""
    evaluated = next((nb["html"] for nb in notebooks
                      if nb["name"] == "03_evaluate" and nb.get("html")), None)
    if evaluated is None or text == "-":
        return text
    return (f'<a href="{html.escape(rel)}/{html.escape(evaluated)}#{HEADLINE_ID}" '
            f'title="the result in 03">{text}</a>')


def _training_cell(trained: dict[str, Any]) -> str:
    if not trained:
        return "-"
    return (f'{trained["epochs"]} ep, {trained["minutes"]} min on '
            f'{html.escape(str(trained["device"]))}')


def _index_row(s: dict[str, Any], rel: str) -> str:
    """One ``<tr>`` of the index for the summary ``s`` of the report folder ``rel``."""
    head = s.get("headline", {})
    clean = head.get("clean", {})
    lesion = head.get("lesion", {})
    kind = s.get("dataset", {}).get("kind", "unknown")
    status = s.get("status", "?")
    return (
        f'<tr class="{status}"><td>{html.escape(s.get("started", "")[:16].replace("T", " "))}'
        f'</td><td>{html.escape(s.get("name", ""))}</td>'
        f'<td>{html.escape(s.get("profile", ""))}</td>'
        f'<td class="{kind}">{html.escape(kind)}</td>'
        f'<td>{_headline_link(rel, s.get("notebooks", []), _fmt(head.get("pooled_iou")))}</td>'
        f'<td>{_fmt(head.get("mean_image_dice"))}</td>'
        f'<td>{_fmt(clean.get("pooled_iou"))}</td>'
        f'<td>{_fmt(clean.get("mean_image_dice"))}</td>'
        f'<td>{_fmt(head.get("fg_bg_miou"))}</td><td>{_fmt(head.get("test_bce"))}</td>'
        f'<td>{_fmt(lesion.get("lesion_sensitivity"))}</td>'
        f'<td>{_fmt(lesion.get("fp_components_per_image"))}</td>'
        f'<td>{_fmt(head.get("selected", {}).get("pooled_iou"))}</td>'
        f'<td>{_training_cell(s.get("training", {}))}</td>'
        f'<td>{s.get("seconds", 0) / 60:.1f} min</td>'
        f'<td>{html.escape(status)}</td>'
        f"<td>{_notebook_links(rel, s.get('notebooks', []))}</td></tr>")


def _index_page(rows: list[str]) -> str:
    """The whole ``index.html``: styles, what the columns mean, the table of ``rows``."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>brainseg reports</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse}} th,td{{padding:6px 10px;border-bottom:1px solid #ddd}}
th{{background:#f3f3f3;text-align:left}} tr.failed{{background:#fde2e2}}
td.synthetic{{color:#a15c00;font-weight:bold}} a{{margin-right:6px}}
</style></head><body>
<h1>brainseg reports</h1>
<p>One row per <code>brainseg run</code>. Test-split metrics of the plain setting (model
resolution, threshold 0.5, no TTA, no post-processing): foreground IoU pooled over the split,
mean per-image Dice (full test split, comparable with the published reference; then the same
two on the <em>clean</em> test subset: test images with no near-duplicate in train or valid),
mean of foreground and background IoU, and BCE; lesion sensitivity (detected annotated tumours
/ all) and false-positive components per image, by the BraTS 2023 lesion-wise rule (see
docs/reference/metrics.md); the fg IoU links the run's result in its 03 report. "Selected IoU"
uses the
threshold / TTA / post-processing chosen on the validation split. "Training" says where and how
long the model trained (a report can be made later, elsewhere); "report time" is the notebooks'
execution. The published reference
(Test Loss 0.07201, Test IoU 0.80568) is comparable to the BCE and fg+bg mIoU columns.</p>
<table id="runs"><thead><tr><th>date</th><th>name</th><th>profile</th><th>dataset</th>
<th>fg IoU</th><th>image Dice</th><th>clean fg IoU</th><th>clean image Dice</th>
<th>fg+bg mIoU</th><th>test BCE</th><th>lesion sens.</th><th>FP / image</th>
<th>selected IoU</th>
<th>training</th><th>report time</th><th>status</th><th>notebooks</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p><small>Regenerated {datetime.now():%Y-%m-%d %H:%M}. Data: Brain Tumor Image DataSet: Semantic
Segmentation (Kaggle pkdarabi, Roboflow export), CC BY 4.0.</small></p>
</body></html>
"""


def write_index(reports_dir: str | Path) -> Path:
    """``index.html``: one row per run found under ``reports_dir``, newest first."""
    reports_dir = Path(reports_dir)
    summaries = sorted(reports_dir.glob("*/*/summary.json"),
                       key=lambda path: json.loads(path.read_text()).get("started", ""),
                       reverse=True)
    rows = [_index_row(json.loads(path.read_text()),
                       path.parent.relative_to(reports_dir).as_posix()) for path in summaries]
    return atomic_write_text(reports_dir / "index.html", _index_page(rows))
