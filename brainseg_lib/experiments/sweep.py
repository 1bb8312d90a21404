"""``brainseg sweep``: an Optuna study of training runs, each trial an ordinary run directory,
one of them selected on validation.

A grid file (YAML) walks fixed variants with Optuna's GridSampler::

    base: ../gpu_resnet34.yaml      # the profile every variant starts from (relative to
                                    # the grid file)
    parallel: 4                     # worker processes on this machine (default: one per GPU)
    select_on: val_iou              # validation metric of each run's best checkpoint
    common: {train_minutes: 4}      # applied to every variant
    variants:                       # named variants: overrides of the base ...
      resnet34: {}
      ema: {ema: true}
    grid: {lr: [0.001, 0.002]}      # ... and/or a grid: every combination becomes a variant
    pruner: none                    # none (grids' default) | median | hyperband

A search-space file replaces ``variants``/``grid`` with ``space`` and ``trials`` and is
sampled by TPE (pruner ``median`` by default)::

    space:
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float (int when low and high are ints)
      loss: [bce_dice, focal_dice]                 # a choice
    trials: 20                                     # finished (or pruned) trials wanted

The study lives in ``study.db`` (SQLite) in the sweep folder unless ``--storage`` gives any
SQLAlchemy URL; workers on several machines (``--worker``) share it, and running the same
command again resumes: failed or killed trials are queued again and their run directories
continue from ``last.pt``. Pruning acts on the validation metric after each epoch.

Selection reads only validation metrics; the selected run alone is then evaluated on test,
so no test figure can influence the choice.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from brainseg_lib.config import (
    PARAM_NAMES,
    ParamsError,
    load_params,
    params_from_dict,
    read_params_file,
)
from brainseg_lib.experiments.launcher import Child, run_children, visible_gpus
from brainseg_lib.io import atomic_write, atomic_write_json
from brainseg_lib.rundir import LOGS_DIR, STUDY_FILE, SWEEP_FILE, SWEEP_RECORD_FILE, RunDir
from brainseg_lib.tracking import nested_under, parent_run

SELECT_ON = ("val_iou", "val_dice", "val_loss")
PRUNERS = ("none", "median", "hyperband")
GRID_KEYS = {"base", "parallel", "select_on", "common", "variants", "grid", "pruner",
             "prune_startup", "prune_warmup"}
PARENT_ATTR = "mlflow_parent_run_id"  # the study's user attribute: the sweep's MLflow run
HEARTBEAT_S = 60  # a trial whose worker went silent this long (x3) is failed and queued again


def read_grid(path: Path) -> dict[str, Any]:
    """The grid or search-space file, checked before any training: base profile, variants
    (named and/or a product grid) or a space, the selection metric and the pruner."""
    grid = read_params_file(path, kind="grid file")
    unknown = set(grid) - GRID_KEYS - {"space", "trials"}
    if unknown:
        raise ParamsError(f"{path}: unknown key(s) {sorted(map(str, unknown))}")
    if not isinstance(grid.get("base"), str):
        raise ParamsError(f"{path}: 'base' (a parameter file) is required")
    base = Path(grid["base"])
    base = base if base.is_absolute() else (path.parent / base if (path.parent / base).exists()
                                            else base)
    try:  # the base's own errors name it; the grid's keys are blamed on the grid
        load_params(base)
    except ParamsError as err:
        raise ParamsError(f"{path}: base: {err}") from None
    common = _mapping(path, grid, "common")
    params_from_dict(read_params_file(base) | common, source=f"{path}, common (over {base})")
    select_on = grid.get("select_on", "val_iou")
    if select_on not in SELECT_ON:
        raise ParamsError(f"{path}: select_on must be one of {SELECT_ON}")
    space = grid.get("space")
    pruner = grid.get("pruner", "median" if space else "none")
    if pruner not in PRUNERS:
        raise ParamsError(f"{path}: pruner must be one of {PRUNERS}")
    checked = {"name": path.stem, "base": base,
               "parallel": _whole_number(path, grid, "parallel", 0), "select_on": select_on,
               "common": common, "pruner": pruner,
               "prune_startup": _whole_number(path, grid, "prune_startup", 2),
               "prune_warmup": _whole_number(path, grid, "prune_warmup", 1)}
    if space is not None:
        if grid.get("variants") or grid.get("grid"):
            raise ParamsError(f"{path}: give either 'space' or 'variants'/'grid', not both")
        return checked | {"space": _check_space(path, space, base, common),
                          "trials": _positive_int(path, grid.get("trials"))}
    return checked | {"variants": _variants(path, grid, base, common)}


def _mapping(path: Path, grid: dict[str, Any], key: str) -> dict[Any, Any]:
    """``grid[key]`` as a mapping ({} when absent or empty); one line naming it otherwise."""
    value = grid.get(key) or {}
    if not isinstance(value, dict):
        raise ParamsError(f"{path}: '{key}' must be a mapping (key: value), got {value!r}")
    return value


def _whole_number(path: Path, grid: dict[str, Any], key: str, default: int) -> int:
    value = grid.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ParamsError(f"{path}: '{key}' must be a whole number >= 0, got {value!r}")
    return value


def _variants(path: Path, grid: dict[str, Any], base: Path,
              common: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Named variants and the product grid's, each validated before any training; a bad key
    or value is blamed on the grid file and the variant."""
    variants = dict(_mapping(path, grid, "variants"))
    product = _mapping(path, grid, "grid")
    if not all(isinstance(v, list) and v for v in product.values()):
        raise ParamsError(f"{path}: 'grid' must map parameter names to lists of values")
    for combo in itertools.product(*product.values()) if product else []:
        values = dict(zip(product, combo, strict=True))
        variants["-".join(f"{k}={v}" for k, v in values.items())] = values
    if not variants:
        raise ParamsError(f"{path}: no variants (give 'variants' and/or 'grid', or 'space')")
    base_values = read_params_file(base)
    for name, overrides in variants.items():
        if not isinstance(name, str) or "/" in name:
            raise ParamsError(f"{path}: variant name {name!r} must be text without '/'")
        if not isinstance(overrides or {}, dict):
            raise ParamsError(f"{path}: variant {name!r} must be a mapping (key: value)")
        params_from_dict(base_values | common | (overrides or {}),
                         source=f"{path}, variant {name!r} (over {base})")
    return {k: v or {} for k, v in variants.items()}


def _positive_int(path: Path, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ParamsError(f"{path}: 'trials' (how many trials to finish) must be a positive "
                          f"integer, got {value!r}")
    return value


def _check_space(path: Path, space: Any, base: Path,
                 common: dict[str, Any]) -> dict[str, Any]:
    """Each entry a list of choices or ``{low, high[, log][, step]}``, on a known parameter;
    both ends (or every choice) must be valid values of it."""
    if not isinstance(space, dict) or not space:
        raise ParamsError(f"{path}: 'space' must map parameter names to ranges or choices")
    for key, spec in space.items():
        if key not in PARAM_NAMES:
            raise ParamsError(f"{path}: space: unknown parameter {key!r}")
        if isinstance(spec, list) and spec:
            values = spec
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) <= {
                "low", "high", "log", "step"}:
            values = [spec["low"], spec["high"]]
        else:
            raise ParamsError(f"{path}: space: {key}: expected a list of choices or "
                              "{low, high[, log][, step]}")
        for value in values:
            try:
                load_params(base, **(common | {key: value}))
            except ParamsError as err:
                raise ParamsError(f"{path}: space: {key}: {err}") from None
    return space


def storage_url(sweep_dir: Path, storage: str | None) -> str:
    """The study's database: ``storage`` (any SQLAlchemy URL) or SQLite in the sweep folder."""
    return storage or f"sqlite:///{(sweep_dir / STUDY_FILE).resolve()}"


def open_study(grid: dict[str, Any], sweep_dir: Path, storage: str | None = None) -> Any:
    """The sweep's Optuna study (created on first use, else loaded): GridSampler over the
    variant names or TPE over the space, the pruner, and heartbeats, so a trial whose worker
    died is failed and queued again (its run directory resumes)."""
    import optuna
    from optuna.storages import RDBStorage

    url = storage_url(sweep_dir, storage)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        db = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                        grace_period=3 * HEARTBEAT_S, heartbeat_stale_trial_callback=_retry())
    if "variants" in grid:
        sampler: Any = optuna.samplers.GridSampler({"variant": list(grid["variants"])}, seed=0)
    else:
        sampler = optuna.samplers.TPESampler(seed=0)
    if grid["pruner"] == "median":
        pruner: Any = optuna.pruners.MedianPruner(n_startup_trials=grid["prune_startup"],
                                                  n_warmup_steps=grid["prune_warmup"])
    elif grid["pruner"] == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=max(grid["prune_warmup"], 1))
    else:
        pruner = optuna.pruners.NopPruner()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=db, study_name=grid["name"], sampler=sampler, pruner=pruner,
        direction="minimize" if grid["select_on"] == "val_loss" else "maximize",
        load_if_exists=True)


def run_name(trial: Any) -> str:
    """A trial's run directory: its variant, or ``trial-NNN`` by the first attempt's number
    (kept in the ``run`` user attribute, which a retried trial inherits: it continues the
    same directory)."""
    if "variant" in trial.params:
        return str(trial.params["variant"])
    return trial.user_attrs.get("run", f"trial-{trial.number:03d}")


def _suggest(trial: Any, grid: dict[str, Any]) -> dict[str, Any]:
    """This trial's parameter overrides (common ones included)."""
    if "variants" in grid:
        return grid["common"] | grid["variants"][trial.suggest_categorical(
            "variant", list(grid["variants"]))]
    values = {}
    for key, spec in grid["space"].items():
        if isinstance(spec, list):
            values[key] = trial.suggest_categorical(key, spec)
        elif all(isinstance(spec[k], int) for k in ("low", "high")) and not isinstance(
                spec.get("step", 1), float):
            values[key] = trial.suggest_int(key, spec["low"], spec["high"],
                                            step=spec.get("step", 1),
                                            log=bool(spec.get("log")))
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                              step=spec.get("step"), log=bool(spec.get("log")))
    return grid["common"] | values


def _owner(study: Any, trial: Any, name: str) -> int | None:
    """The number of another trial that owns run ``name``: finished with it, or running it
    from an earlier number. GridSampler may hand a variant out twice when workers race near
    the end of the grid; the later trial then trains nothing."""
    from optuna.trial import TrialState

    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or other.user_attrs.get("duplicate_of") is not None:
            continue
        if run_name(other) == name and (
                other.state in (TrialState.COMPLETE, TrialState.PRUNED)
                or (other.state == TrialState.RUNNING and other.number < trial.number)):
            return other.number
    return None


def _train_trial(grid: dict[str, Any], run_dir: Path, overrides: dict[str, Any],
                 report: Any) -> None:
    """Train (or resume, or just read) the run directory of one trial, in this process."""
    from brainseg_lib.training.loop import train

    run = RunDir(run_dir)
    if run.is_finished:
        return
    if run.can_resume:
        params = load_params(grid["base"], **(overrides | {"resume": str(run_dir)}))
    else:
        params = load_params(grid["base"], **(overrides | {"runs_dir": str(run_dir.parent),
                                                           "run_id": run_dir.name}))
    train(params, progress=False, resume_overrides=overrides, epoch_callback=report)


def objective(grid: dict[str, Any], sweep_dir: Path) -> Any:
    """The study's objective: one trial = one run directory, its per-epoch validation metric
    reported to the pruner, its value the best checkpoint's ``select_on``."""
    import optuna

    select_on = grid["select_on"]

    def run_trial(trial: Any) -> float:
        overrides = _suggest(trial, grid)
        name = run_name(trial)
        trial.set_user_attr("run", name)
        owner = _owner(trial.study, trial, name)
        if owner is not None:
            trial.set_user_attr("duplicate_of", owner)
            raise optuna.TrialPruned(f"{name} belongs to trial {owner}")
        print(f"trial {trial.number}: {name}", flush=True)

        def report(epoch: int, row: dict[str, float]) -> None:
            trial.report(row[select_on], epoch)
            if trial.should_prune():
                print(f"trial {trial.number} ({name}) pruned after epoch {epoch}: "
                      f"{select_on} {row[select_on]:.4f}", flush=True)
                raise optuna.TrialPruned(f"epoch {epoch}")

        _train_trial(grid, sweep_dir / name, overrides, report)
        return float(run_row(sweep_dir / name, select_on)[select_on])

    return run_trial


def run_row(run_dir: Path, select_on: str) -> dict[str, Any]:
    """Validation figures of a run: its best checkpoint's epoch when it has finished, else
    its best epoch so far (a pruned or interrupted run)."""
    run = RunDir(run_dir)
    history = pd.DataFrame(run.history())
    if not len(history):
        return {}
    row: dict[str, Any] = {"epochs": len(history),
                           "img_per_s": round(float(history.train_img_per_s.median()))}
    record = run.train_record()
    if record is not None:
        best = history.loc[history.epoch == record.best_epoch].iloc[0]
        row |= {"epochs": record.epochs_run,
                "minutes": round(record.train_seconds_this_session / 60, 2),
                "compile_s": round(record.compile_seconds, 1)}
    else:
        best = history.loc[history[select_on].idxmin() if select_on == "val_loss"
                           else history[select_on].idxmax()]
    return row | {"val_iou": best.val_iou, "val_dice": best.val_dice,
                  "val_loss": best.val_loss, "best_epoch": int(best.epoch)}


_STATUS = {"COMPLETE": "finished", "PRUNED": "pruned", "RUNNING": "running",
           "WAITING": "waiting", "FAIL": "failed"}


def sweep_table(grid: dict[str, Any], sweep_dir: Path, study: Any = None) -> pd.DataFrame:
    """One row per variant (or trial): what differs, its trial's state (finished, pruned,
    ...), the validation figures of its run directory, time; ``selected`` marks the best
    finished one on ``select_on``. No test figure is read."""
    trials: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False) if study is not None else []:
        if trial.user_attrs.get("duplicate_of") is None and trial.params:
            trials[run_name(trial)] = trial  # the latest attempt of each run
    if "variants" in grid:
        differs = {name: grid["common"] | v for name, v in grid["variants"].items()}
    else:
        differs = {name: grid["common"] | t.params for name, t in trials.items()}
    rows = []
    for name, overrides in differs.items():
        trial = trials.get(name)
        status = _STATUS[trial.state.name] if trial is not None else (
            "finished" if RunDir(sweep_dir / name).is_finished else "unfinished")
        rows.append({"variant": name, "differs": json.dumps(overrides, sort_keys=True),
                     "trial": trial.number if trial is not None else None, "status": status}
                    | run_row(sweep_dir / name, grid["select_on"]))
    table = pd.DataFrame(rows)
    metric = grid["select_on"]
    table["selected"] = False
    done = table[table.status == "finished"]
    if len(done):
        pick = done[metric].idxmin() if metric == "val_loss" else done[metric].idxmax()
        table.loc[pick, "selected"] = True
    return table


def _retry() -> Any:
    """Optuna's re-queueing of a trial (same parameters, same run directory), unlimited."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=None)


def requeue_failed(study: Any) -> list[str]:
    """Queue again every run whose latest attempt failed (an error, Ctrl-C, a killed
    worker): resuming = running the same command again."""
    from optuna.trial import TrialState

    latest: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("duplicate_of") is None and trial.params:
            latest[run_name(trial)] = trial
    failed = [t for t in latest.values() if t.state == TrialState.FAIL]
    for trial in failed:
        _retry()(study, trial)
    return [run_name(t) for t in failed]


def work(grid: dict[str, Any], sweep_dir: Path, storage: str | None = None) -> None:
    """One worker: run trials of the shared study until the grid is done, or ``trials``
    have finished (pruned ones count), then return."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = open_study(grid, sweep_dir, storage)
    callbacks = [] if "variants" in grid else [
        MaxTrialsCallback(grid["trials"], states=(TrialState.COMPLETE, TrialState.PRUNED))]
    if not callbacks and _grid_done(study, grid):
        return
    if callbacks and _count(study, (TrialState.COMPLETE, TrialState.PRUNED)) >= grid["trials"]:
        return
    with nested_under(study.user_attrs.get(PARENT_ATTR)):  # a worker on another machine
        study.optimize(objective(grid, sweep_dir), callbacks=callbacks, gc_after_trial=True)


def _count(study: Any, states: tuple[Any, ...]) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _grid_done(study: Any, grid: dict[str, Any]) -> bool:
    from optuna.trial import TrialState

    done = {run_name(t) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
    return set(grid["variants"]) <= done


def _worker_command(grid_file: Path, sweep_dir: Path, storage: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "brainseg_lib.cli", "sweep", "--grid", str(grid_file),
           "--out", str(sweep_dir), "--worker", "--parallel", "1"]
    return cmd + (["--storage", storage] if storage else [])


def run_workers(grid_file: Path, grid: dict[str, Any], sweep_dir: Path, parallel: int,
                storage: str | None) -> None:
    """``parallel`` worker processes on this machine (default: the grid's ``parallel``, else
    one per GPU, each pinned to one), or this process itself when one is enough (each
    worker runs in that mode)."""
    parallel = parallel or grid["parallel"] or max(visible_gpus(), 1)
    if parallel == 1:
        work(grid, sweep_dir, storage)
        return
    run_children([Child(f"worker {i}", _worker_command(grid_file, sweep_dir, storage),
                        sweep_dir / LOGS_DIR / f"worker{i}.log") for i in range(parallel)],
                 parallel)


def _wait_for_others(study: Any) -> None:
    """Trials still running elsewhere (workers on other machines): wait for them, failing
    those whose worker has gone silent (they are queued again for the next run)."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        running = _count(study, (TrialState.RUNNING,))
        if not running:
            return
        print(f"waiting for {running} trial(s) running elsewhere", flush=True)
        time.sleep(30)


def run_sweep(grid_file: str | Path, sweep_dir: str | Path, parallel: int = 0,
              evaluate: bool = True, storage: str | None = None) -> pd.DataFrame:
    """Run the study to its end (failed trials queued again), write ``sweep.csv`` and
    ``sweep.json``; the selected run is then (and only then) evaluated on test."""
    grid_file = Path(grid_file)
    grid = read_grid(grid_file)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(grid, sweep_dir, storage)
    again = requeue_failed(study)
    if again:
        print(f"queued again (their runs resume): {', '.join(again)}", flush=True)
    # with tracking_uri, the sweep's MLflow run: its trials nest under it, wherever they run
    with parent_run(load_params(grid["base"], **grid["common"]), sweep_dir) as parent:
        if parent:
            study.set_user_attr(PARENT_ATTR, parent.run_id)
        run_workers(grid_file, grid, sweep_dir, parallel, storage)
        _wait_for_others(study)
        table = _finish(grid_file, grid, sweep_dir, study, evaluate, storage)
        if parent:
            for name in (SWEEP_FILE, SWEEP_RECORD_FILE):
                parent.log_artifact(sweep_dir / name)
    return table


def _finish(grid_file: Path, grid: dict[str, Any], sweep_dir: Path, study: Any,
            evaluate: bool, storage: str | None) -> pd.DataFrame:
    """The table, the selection on validation and the selected run's test; written out."""
    from brainseg_lib.evaluation.evaluate import evaluate_run

    table = sweep_table(grid, sweep_dir, study)
    selected = table[table.selected]
    from sqlalchemy.engine import make_url

    result: dict[str, Any] = {"grid": str(grid_file), "select_on": grid["select_on"],
                              "variants": len(table), "study": grid["name"],
                              "storage": make_url(storage_url(sweep_dir, storage))
                              .render_as_string(hide_password=True)}
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
