"""The result first: the headline box that opens reports 02 and 03, and 03's metrics as two
tables a reader can scan (short names, definitions in a footnote).

Everything is built from the run's own ``train.json`` / ``metrics.json``, the same records the
other tables read. No torch here: the renderer and the tests use it without a model.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from brainseg_lib.evaluation.result import CalibrationBlock, Evaluation, MetricBlock
from brainseg_lib.metrics.functional import METRIC_DEFINITIONS

HEADLINE_ID = "headline"  # the box's HTML id: the index links each run's 03 to it
# short names for the tables' rows; the definitions stay in METRIC_DEFINITIONS
SHORT_NAMES = {
    "pooled_iou": "fg IoU (pooled)", "pooled_dice": "fg Dice (pooled)",
    "mean_image_iou": "image IoU (mean)", "mean_image_dice": "image Dice (mean)",
    "fg_bg_miou": "fg+bg mIoU", "batch_pooled_iou": "fg IoU (per batch)",
    "precision": "precision", "recall": "recall", "hd95": "HD95 (px)",
}
# the figures of the 03 box (test BCE follows them)
BOX_METRICS = ("pooled_iou", "mean_image_dice", "fg_bg_miou")
_REF_IOU = "reference_test_iou (as published; closest to fg+bg mIoU)"
_REF_LOSS = "reference_test_loss (BCE)"
# an evaluation's record and one of its blocks, typed or as metrics.json holds them
Record = Evaluation | dict[str, Any]
Block = MetricBlock | CalibrationBlock | dict[str, Any]
# 03's settings beyond the plain one, each with the short name its table column gets
OTHER_SETTINGS = {
    "headline_original_resolution": "plain, source resolution",
    "selected": "selected, model resolution",
    "selected_original_resolution": "selected, source resolution",
}
_BOX_STYLE = ("border:1px solid #9bb7d4;border-left:6px solid #2a6fb0;background:#f4f8fc;"
              "padding:10px 14px;margin:10px 0;max-width:58em")
_CELL = "padding:3px 10px;text-align:right"
_NONE = "\u2013"  # a dash: the reference published no such figure


def _figure(value: float, ci: list[float] | None, digits: int = 3) -> str:
    """``value [low, high]``; the interval one digit shorter (it is itself uncertain)."""
    low = max(digits - 1, 1)
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{low}f}, {ci[1]:.{low}f}]" if ci else "")


def as_evaluation(record: Record) -> Evaluation:
    """The typed record of an evaluation, or of its ``metrics.json`` mapping."""
    return record if isinstance(record, Evaluation) else Evaluation.from_json(record)


def block_figure(block: Block, key: str,
                 digits: int = 3) -> str:
    """One figure of a metrics or calibration block (typed, or its JSON) with its interval,
    or "-" where the block lacks it."""
    if isinstance(block, dict):
        metrics, ci95 = block["metrics"], block.get("ci95")
    else:
        metrics, ci95 = block.metrics, block.ci95
    if metrics.get(key) is None:
        return "-"
    return _figure(metrics[key], (ci95 or {}).get(key), digits)


def _cell(text: str, key: str = "", subset: str = "", value: float | None = None) -> str:
    """One figure of a box; ``data-*`` carry the exact value so a check can compare it."""
    data = (f' data-metric="{key}" data-subset="{subset}" data-value="{float(value)!r}"'
            if value is not None else "")
    return f"<td style='{_CELL}'{data}>{html.escape(text)}</td>"


def _box(title: str, sentence: str, table: str) -> str:
    return (f'<div id="{HEADLINE_ID}" class="brainseg-headline" style="{_BOX_STYLE}">'
            f"<strong>{html.escape(title)}</strong><p style='margin:4px 0 8px'>{sentence}</p>"
            f"{table}</div>")


def pending_headline() -> str:
    """The box before the result exists (it stays so in the report of a failed run)."""
    return _box("Result", "Not available yet: it appears here when the notebook has run "
                "to the end.", "")


def training_headline(record: dict[str, Any]) -> str:
    """02's box from :func:`brainseg_lib.rundir.training_record`: epochs, minutes, the best
    validation score and why training stopped."""
    monitor = next(k for k in record if k.startswith("best_val"))
    minutes = record["train_seconds_this_session"] / 60
    head = "".join(f"<th style='{_CELL}'>{h}</th>" for h in (
        "epochs", "minutes", f"best {html.escape(monitor[5:])} (epoch)", "stopped because"))
    row = (_cell(str(record["epochs_run"]), "epochs_run", "train", record["epochs_run"])
           + _cell(f"{minutes:.1f}", "minutes", "train", minutes)
           + _cell(f"{record[monitor]:.4f} ({record['best_epoch']})", monitor, "train",
                   record[monitor])
           + _cell(str(record["stop_reason"])))
    sentence = (f"Trained on {html.escape(str(record['device']))}; the checkpoint of the best "
                "epoch on the validation split is the model the next reports evaluate.")
    return _box("Result: training", sentence, f"<table><tr>{head}</tr><tr>{row}</tr></table>")


def _subsets(record: Evaluation) -> list[tuple[str, str, MetricBlock]]:
    """(key, column name, block) of the plain setting: the full test split, then the clean
    subset when the evaluation has one."""
    head, clean = record.headline, record.header.clean_test
    out = [("full", f"full test ({record.header.dataset.images})", head.full)]
    if head.clean is not None and clean is not None:
        out.append(("clean", f"clean subset ({clean.images})", head.clean))
    return out


def evaluation_headline(metrics: Record) -> str:
    """03's box: pooled fg IoU, image Dice, fg+bg mIoU and test BCE of the plain setting,
    full and clean with their intervals, beside the published reference's two numbers."""
    record = as_evaluation(metrics)
    subsets = _subsets(record)
    ref = record.reference_comparison or {}
    reference = {"fg_bg_miou": f"{ref[_REF_IOU]} (its 'Test IoU')",
                 "test_bce": f"{ref[_REF_LOSS]} (its Test Loss)"}
    head = "".join(f"<th style='{_CELL}'>{html.escape(h)}</th>"
                   for h in ("", *(name for _, name, _ in subsets), "published reference"))
    rows = []
    for key in BOX_METRICS:
        cells = "".join(_cell(_figure(b.metrics[key], (b.ci95 or {}).get(key)), key, s,
                              b.metrics[key]) for s, _, b in subsets)
        rows.append(f"<tr><th style='text-align:left'>{SHORT_NAMES[key]}</th>{cells}"
                    f"{_cell(reference.get(key, _NONE))}</tr>")
    bce = record.header.loss.bce
    rows.append("<tr><th style='text-align:left'>test BCE</th>"
                + _cell(f"{bce:.4f}", "test_bce", "full", bce)
                + "".join(_cell("") for _ in subsets[1:])
                + f"{_cell(reference['test_bce'])}</tr>")
    selected = record.selected.full
    clean = (" and on its clean subset (no near-duplicate in train or valid)"
             if len(subsets) > 1 else "")
    sentence = (
        f"Plain setting ({html.escape(record.headline.full.setting)}) on the test "
        f"split{clean}; brackets: bootstrap 95 % intervals. With the setting chosen on the "
        "validation split "
        f"({html.escape(selected.setting)}): fg IoU (pooled) "
        f"{selected.metrics['pooled_iou']:.3f}.")
    return _box("Result: test split", sentence,
                f"<table><tr>{head}</tr>{''.join(rows)}</table>")


def _column(block: MetricBlock) -> list[str]:
    return [block_figure(block, k, 1 if k == "hd95" else 3) for k in METRIC_DEFINITIONS]


def plain_table(metrics: Record) -> pd.DataFrame:
    """The plain setting: rows are metrics, columns the full test split and its clean subset;
    the test loss (full split) below."""
    record = as_evaluation(metrics)
    subsets = _subsets(record)
    table = pd.DataFrame({name: _column(block) for _, name, block in subsets},
                         index=pd.Index([SHORT_NAMES[k] for k in METRIC_DEFINITIONS],
                                        name="metric"))
    loss = record.header.loss
    blank = [""] * (len(subsets) - 1)
    table.loc[f"test loss ({loss.name})"] = [f"{loss.value:.4f}", *blank]
    table.loc["test BCE"] = [f"{loss.bce:.4f}", *blank]
    return table


def settings_table(metrics: Record) -> pd.DataFrame:
    """The other settings (source resolution, the one selected on validation), full and
    clean: columns are (setting, subset), named short; :func:`table_notes` defines them."""
    scores, columns = as_evaluation(metrics).scores, {}
    for key, name in OTHER_SETTINGS.items():
        if key not in scores:
            continue
        for block, subset in ((scores[key].full, "full"), (scores[key].clean, "clean")):
            if block is not None:
                columns[(name, subset)] = _column(block)
    table = pd.DataFrame(columns, index=pd.Index([SHORT_NAMES[k] for k in METRIC_DEFINITIONS],
                                                 name="metric"))
    table.columns.names = ["setting", "test images"]
    return table


def table_notes(metrics: Record) -> str:
    """The footnote of both tables: each short name and each setting, in full."""
    record = as_evaluation(metrics)
    settings = {"plain, model resolution": record.headline.full.setting} | {
        name: record.scores[key].full.setting for key, name in OTHER_SETTINGS.items()
        if key in record.scores}
    items = [f"<b>{html.escape(n)}</b>: {html.escape(s)}" for n, s in settings.items()]
    if record.header.clean_test is not None:
        items.append(f"<b>clean</b>: {html.escape(record.header.clean_test.definition)}")
    items += [f"<b>{html.escape(SHORT_NAMES[k])}</b>: {html.escape(d)}"
              for k, d in METRIC_DEFINITIONS.items()]
    items.append("<b>[a, b]</b>: bootstrap 95 % interval over test images")
    return ("<p style='font-size:90%;max-width:58em'><small>" + "; ".join(items)
            + ".</small></p>")
