"""The comparison table of brainseg and its peers on the test split, from the runs' records.

    python benchmarks/peers/table.py --peers runs/peers --brainseg runs/<quick run> ...

Reads each brainseg run's ``eval-test/metrics.json`` and ``train.json`` (plus the
``predict_timings.tsv`` a timed ``brainseg predict`` wrote there, when present) and each
peer's ``score_tta/`` and ``score_notta/summary.json`` (``score.py``); prints markdown: one
row per system, run and setting with every figure and its bootstrap 95 % interval, then the
paired differences (brainseg minus peer, per image) that ``score.py --brainseg-run``
computed. Runs in the project's venv; reads only, writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainseg_lib.errors import BrainsegError
from brainseg_lib.evaluation.result import Evaluation, MetricBlock, Setting
from brainseg_lib.reporting.headline import block_figure
from brainseg_lib.rundir import METRICS_FILE, RunDir, eval_dir

FIGURES = (  # (key, header, digits)
    ("pooled_iou", "pooled fg IoU", 3),
    ("mean_image_dice", "mean image Dice", 3),
    ("fg_bg_miou", "fg+bg mIoU", 3),
    ("lesion_sensitivity", "lesion sensitivity", 3),
    ("fp_components_per_image", "FP components / image", 3),
)
PAIRED_FIGURES = ("pooled_iou", "mean_image_dice", "lesion_sensitivity", "fp_components_per_image")
PEER_RUNS = {"nnunet": "run-*", "monai": "seed-*"}
PREDICT_TIMINGS = "predict_timings.tsv"  # written beside eval-test/ by the comparison script


class TableError(BrainsegError):
    """A run or score folder that lacks what the table reads."""


@dataclass(frozen=True)
class Row:
    """One system, run and setting on the test split, at the model's resolution."""

    system: str
    run: str
    setting: str
    epochs: int
    iterations: int | None
    train_images_per_s: float | None
    predict_images_per_s: float | None
    full: dict[str, Any]  # {"metrics": {...}, "ci95": {...}}
    clean: dict[str, Any] | None
    clean_images: int


def _cell(block: dict[str, Any] | None, key: str, digits: int) -> str:
    """A figure with its interval, written as every brainseg table writes it."""
    return "-" if block is None else block_figure(block, key, digits)


def _block(block: MetricBlock) -> dict[str, Any]:
    return {"metrics": block.metrics, "ci95": block.ci95}


def _predict_seconds(run: Path) -> dict[str, float]:
    path = run / PREDICT_TIMINGS
    if not path.is_file():
        return {}
    return {
        k: float(v)
        for k, v in (line.split("\t") for line in path.read_text().split("\n") if line.strip())
    }


def _chosen_name(chosen: Setting) -> str:
    extras = [
        ", flip TTA" if chosen.tta else "",
        "" if chosen.postprocess == "none" else f", {chosen.postprocess}",
    ]
    return f"chosen on valid (thr {chosen.threshold:g}{''.join(extras)})"


def brainseg_rows(run: Path) -> list[Row]:
    """The plain setting and the one chosen on validation of one brainseg run."""
    metrics_path = eval_dir(run, "test") / METRICS_FILE
    if not metrics_path.is_file():
        raise TableError(f"{metrics_path}: missing (evaluate the run on test first)")
    evaluation = Evaluation.from_json(json.loads(metrics_path.read_text()))
    folder = RunDir(run)
    record = folder.train_record()
    if record is None:
        raise TableError(f"{run}: no train.json (training did not finish)")
    seconds = record.train_seconds_total or record.train_seconds_this_session
    train_images = folder.env().get("dataset", {}).get("images", {}).get("train")
    ips = record.epochs_run * train_images / seconds if train_images else None
    n_test, predict = evaluation.header.dataset.images, _predict_seconds(run)
    chosen, subset = evaluation.header.chosen, evaluation.header.clean_test
    rows = []
    params = folder.params()
    plain = f"plain (thr {params.threshold:g})"
    for setting, scores, tta in (
        (plain, evaluation.headline, False),
        (_chosen_name(chosen), evaluation.selected, chosen.tta),
    ):
        seconds_predict = predict.get("predict_tta" if tta else "predict_notta")
        clean = None if scores.clean is None else _block(scores.clean)
        rows.append(
            Row(
                f"brainseg {params.profile}",
                run.name,
                setting,
                record.epochs_run,
                None,
                ips,
                n_test / seconds_predict if seconds_predict else None,
                _block(scores.full),
                clean,
                subset.images if subset else 0,
            )
        )
    return rows


def _peer_training(system: str, timings: dict[str, Any]) -> tuple[int, int, float]:
    if system == "nnunet":
        budget = timings["budget"]
        batch = budget["plan"]["batch_size"]
        return (
            budget["epochs"],
            budget["iterations"],
            budget["iterations"] * batch / budget["train_seconds"],
        )
    return timings["epochs"], timings["iterations"], timings["train_images_per_s"]


Paired = tuple[str, str, dict[str, Any]]  # peer and setting, brainseg run, score.py's rows


def _peer_row(system: str, run: Path, tta: str, path: Path) -> tuple[Row, Paired | None]:
    """One scored peer run and setting (``score.py``'s summary.json) and its paired rows."""
    summary = json.loads(path.read_text())
    try:
        epochs, iterations, ips = _peer_training(system, summary["timings"])
        scores = summary["model_resolution"]
        setting = "thr 0.5, " + ("its TTA" if tta == "tta" else "no TTA")
        row = Row(
            system,
            run.name,
            setting,
            epochs,
            iterations,
            ips,
            summary["timings"].get(f"predict_{tta}_images_per_s"),
            scores["full"],
            scores["clean"],
            scores["clean"]["images"],
        )
    except KeyError as err:
        raise TableError(f"{path}: lacks {err} (score.py --timings writes it)") from None
    pair = summary.get("paired_brainseg_minus_peer")
    if pair is None:
        return row, None
    return row, (f"{system} {run.name} ({setting})", Path(pair["brainseg"]).name, pair)


def peer_rows(peers: Path) -> tuple[list[Row], list[Paired]]:
    """Every scored peer run under ``peers`` (``nnunet/run-*``, ``monai/seed-*``), and the
    paired rows each holds."""
    rows, paired = [], []
    for system, pattern in PEER_RUNS.items():
        for run in sorted((peers / system).glob(pattern)):
            for tta in ("notta", "tta"):
                path = run / f"score_{tta}" / "summary.json"
                if path.is_file():
                    row, pair = _peer_row(system, run, tta, path)
                    rows.append(row)
                    paired += [pair] if pair else []
    return rows, paired


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def figures_table(rows: list[Row], subset: str) -> str:
    head = ["system", "run", "setting", "epochs (iterations)", "train img/s", "predict img/s"] + [
        h for _, h, _ in FIGURES
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        block = r.full if subset == "full" else r.clean
        trained = f"{r.epochs}" + ("" if r.iterations is None else f" ({r.iterations})")
        cells = [
            r.system,
            r.run,
            r.setting,
            trained,
            _number(r.train_images_per_s),
            _number(r.predict_images_per_s),
        ]
        cells += [_cell(block, key, digits) for key, _, digits in FIGURES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(paired: list[Paired]) -> str:
    head = [
        "peer (setting)",
        "brainseg run (plain)",
        "subset",
        "images",
        "metric",
        "brainseg − peer (95 %)",
        "verdict",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for peer, brainseg, pair in paired:
        for row in pair["rows"]:
            if row["metric"] not in PAIRED_FIGURES:
                continue
            diff = (
                f"{row['brainseg_minus_peer']:+.3f} ({row['ci95_low']:+.3f} to "
                f"{row['ci95_high']:+.3f})"
            )
            lines.append(
                f"| {peer} | {brainseg} | {row['subset']} | {row['images']} | "
                f"{row['metric']} | {diff} | {row['verdict']} |"
            )
    return "\n".join(lines)


def render(brainseg_runs: list[Path], peers: Path) -> str:
    """The three tables, markdown: full test split, clean subset, paired differences."""
    rows = [r for run in brainseg_runs for r in brainseg_rows(run)]
    found, paired = peer_rows(peers)
    if not found:
        raise TableError(
            f"{peers}: no scored peer run (nnunet/run-*/score_*/summary.json, "
            "monai/seed-*/score_*/summary.json)"
        )
    rows += found
    clean = rows[0].clean_images
    return "\n\n".join(
        [
            "Test split, full (every figure at the model's resolution, bootstrap 95 % interval):",
            figures_table(rows, "full"),
            f"Clean test subset ({clean} images with no near-duplicate in train or valid):",
            figures_table(rows, "clean"),
            "Paired, per image (brainseg's plain setting minus the peer):",
            paired_table(paired),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, required=True, help="run_nnunet/run_monai --out parent")
    p.add_argument("--brainseg", type=Path, nargs="+", required=True, help="brainseg run folders")
    args = p.parse_args(argv)
    try:
        print(render(args.brainseg, args.peers))
    except BrainsegError as err:
        print(f"table: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
