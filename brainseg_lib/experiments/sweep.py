"""``brainseg sweep``: train a list or grid of parameter variants, pick one on validation.

A grid file (YAML)::

    base: ../reference.yaml         # the profile every variant starts from (relative to
                                    # the grid file)
    parallel: 4                     # runs at once (default: one per GPU)
    select_on: val_iou              # validation metric of each run's best checkpoint (max)
    common: {train_minutes: 4}      # applied to every variant
    variants:                       # named variants: overrides of the base ...
      reference: {}
      ema: {ema: true}
    grid: {lr: [0.001, 0.002]}      # ... and/or a grid: every combination becomes a variant

Selection reads only validation metrics; the selected run alone is then evaluated on test,
so no test figure can influence the choice.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd

from brainseg_lib.config import ParamsError, load_params, read_params_file
from brainseg_lib.experiments.runner import Job, run_jobs
from brainseg_lib.io import atomic_write, atomic_write_json
from brainseg_lib.rundir import HISTORY_FILE, LOGS_DIR, SWEEP_FILE, SWEEP_RECORD_FILE, TRAIN_FILE

SELECT_ON = ("val_iou", "val_dice", "val_loss")


def read_grid(path: Path) -> dict[str, Any]:
    """The grid file, checked: base profile, variants (named and/or a product grid)."""
    grid = read_params_file(path, kind="grid file")
    unknown = set(grid) - {"base", "parallel", "select_on", "common", "variants", "grid"}
    if unknown:
        raise ParamsError(f"{path}: unknown key(s) {sorted(unknown)}")
    if "base" not in grid:
        raise ParamsError(f"{path}: 'base' (a parameter file) is required")
    variants: dict[str, dict[str, Any]] = dict(grid.get("variants") or {})
    product = grid.get("grid") or {}
    for combo in itertools.product(*product.values()) if product else []:
        values = dict(zip(product, combo, strict=True))
        variants["-".join(f"{k}={v}" for k, v in values.items())] = values
    if not variants:
        raise ParamsError(f"{path}: no variants (give 'variants' and/or 'grid')")
    select_on = grid.get("select_on", "val_iou")
    if select_on not in SELECT_ON:
        raise ParamsError(f"{path}: select_on must be one of {SELECT_ON}")
    base = Path(grid["base"])
    base = base if base.is_absolute() else (path.parent / base if (path.parent / base).exists()
                                            else base)
    common = grid.get("common") or {}
    for name, overrides in variants.items():  # every variant validated before any training
        load_params(base, **(common | (overrides or {})))
        if "/" in name:
            raise ParamsError(f"{path}: variant name {name!r} may not contain '/'")
    return {"base": base, "parallel": int(grid.get("parallel", 0)), "select_on": select_on,
            "common": common, "variants": {k: v or {} for k, v in variants.items()}}


def sweep_jobs(grid: dict[str, Any], sweep_dir: Path) -> list[Job]:
    return [Job(name, sweep_dir / name, grid["base"], grid["common"] | overrides)
            for name, overrides in grid["variants"].items()]


def sweep_table(grid: dict[str, Any], sweep_dir: Path) -> pd.DataFrame:
    """One row per variant: what differs, validation score of its best checkpoint, time."""
    rows = []
    for job in sweep_jobs(grid, sweep_dir):
        row: dict[str, Any] = {"variant": job.name,
                               "differs": json.dumps(job.overrides, sort_keys=True)}
        record_file = job.run_dir / TRAIN_FILE
        history_file = job.run_dir / HISTORY_FILE
        if record_file.exists() and history_file.exists():
            record = json.loads(record_file.read_text())
            history = pd.read_csv(history_file)
            best = history.loc[history.epoch == record["best_epoch"]].iloc[0]
            row |= {"status": "finished", "val_iou": best.val_iou, "val_dice": best.val_dice,
                    "val_loss": best.val_loss, "best_epoch": int(record["best_epoch"]),
                    "epochs": int(record["epochs_run"]),
                    "minutes": round(record["train_seconds_this_session"] / 60, 2),
                    "compile_s": round(record.get("compile_seconds", 0.0), 1),
                    "img_per_s": round(float(history.train_img_per_s.median()))}
        else:
            row["status"] = "unfinished"
        rows.append(row)
    table = pd.DataFrame(rows)
    metric = grid["select_on"]
    table["selected"] = False
    done = table[table.status == "finished"]
    if len(done):
        pick = done[metric].idxmin() if metric == "val_loss" else done[metric].idxmax()
        table.loc[pick, "selected"] = True
    return table


def run_sweep(grid_file: str | Path, sweep_dir: str | Path, parallel: int = 0,
              evaluate: bool = True) -> pd.DataFrame:
    """Train every unfinished variant, write ``sweep.csv``/``sweep.json``; the selected
    variant is then (and only then) evaluated on test."""
    from brainseg_lib.evaluation.evaluate import evaluate_run

    grid = read_grid(Path(grid_file))
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    codes = run_jobs(sweep_jobs(grid, sweep_dir), parallel or grid["parallel"],
                     sweep_dir / LOGS_DIR)
    table = sweep_table(grid, sweep_dir)
    table["exit_code"] = table.variant.map(codes)
    selected = table[table.selected]
    result: dict[str, Any] = {"grid": str(grid_file), "select_on": grid["select_on"],
                              "variants": len(table)}
    if evaluate and len(selected):
        name = selected.variant.iloc[0]
        metrics = evaluate_run(sweep_dir / name, "test", verbose=True)
        result["selected"] = name
        result["selected_test"] = {k: metrics[k]["metrics"] | {"ci95": metrics[k].get("ci95")}
                                   for k in ("headline", "headline_clean", "selected",
                                             "selected_clean") if k in metrics}
    atomic_write(sweep_dir / SWEEP_FILE, lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_json(sweep_dir / SWEEP_RECORD_FILE, result | {"table": table.to_dict("records")})
    return table
