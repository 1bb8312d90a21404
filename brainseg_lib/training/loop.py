"""Training runs: the reference recipe (BCE, Adam, early stopping on validation loss, best
checkpoint kept) and the stronger options, resumable and with every epoch recorded.

Checkpoints are written atomically each epoch (``last.pt``, at most once a minute) and on
improvement (``best.pt``), so an interrupted or diverged run keeps its last good state. The
step itself is :mod:`.trainer`; data parallelism under torchrun, :mod:`.distributed`.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg_lib.config import MEASUREMENT_KEYS, Params, load_params, params_from_dict, save_params
from brainseg_lib.data.arrays import SplitArrays, load_split_arrays
from brainseg_lib.data.locate import DataSource, data_source, dataset_record
from brainseg_lib.io import atomic_write_json, atomic_write_text
from brainseg_lib.model.checkpoint import read_checkpoint, save_checkpoint
from brainseg_lib.model.device import autocast_dtype, select_device
from brainseg_lib.model.network import create_model
from brainseg_lib.rundir import environment_info, target_run_dir, training_record
from brainseg_lib.training.batches import ResidentBatches
from brainseg_lib.training.distributed import (
    DistContext,
    barrier,
    device_for,
    finish,
    from_main,
    init_from_env,
)
from brainseg_lib.training.trainer import EarlyStopping, Trainer, seed_everything, validate

LAST_EVERY_S = 60.0  # resumable state (last.pt) at most this often, and at the end


HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_iou", "val_dice", "lr", "seconds",
                  "train_img_per_s")


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float
    stop_reason: str
    seconds: float


def load_training_data(params: Params) -> tuple[DataSource, dict[str, SplitArrays]]:
    """Train and validation arrays: the dataset's own split, or fold ``params.fold`` of a
    cross-validation over train+valid (``folds_file``)."""
    from brainseg_lib.data.splits import fold_split

    source = data_source(params)
    data = {s: load_split_arrays(source.path, s, params.image_size, params.cache_path())
            for s in ("train", "valid")}
    if params.fold >= 0:
        data = fold_split(data, params.resolve_path(params.folds_file), params.fold)
    if params.limit_train_images and params.limit_train_images < len(data["train"]):
        rng = np.random.default_rng(params.seed)
        pick = rng.choice(len(data["train"]), params.limit_train_images, replace=False)
        data["train"] = data["train"].subset(pick)
    return source, data


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    lines = [",".join(HISTORY_FIELDS)]
    lines += [",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])
                       for k in HISTORY_FIELDS) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "history.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def finished_run(params: Params) -> TrainResult | None:
    """The record of ``runs_dir/run_id`` when that run has finished training, else None.

    With ``model_dir`` set, the exported model is laid out as that run first (its training
    parameters must match the given ones).
    """
    if not params.run_id:
        return None
    run_dir = target_run_dir(params)
    if params.model_dir:
        from brainseg_lib.model.package import materialise

        materialise(params.resolve_path(params.model_dir), run_dir, expected=params)
    record = training_record(run_dir)
    if record is None or not (run_dir / "best.pt").exists():
        return None
    history = read_history(run_dir)
    monitor = next(k for k in record if k.startswith("best_val"))
    print(f"{run_dir.name} has already finished training ({record['epochs_run']} epochs on "
          f"{record['device']}, stopped by {record['stop_reason']}): showing its record, "
          "not retraining")
    if record["trained_on"]:
        print(f"note: {record['trained_on']}")
    return TrainResult(run_dir, history, int(record["best_epoch"]), float(record[monitor]),
                       record["stop_reason"], float(record["train_seconds_this_session"]))


SAFE_ON_RESUME = ("epochs", "train_minutes", "max_train_minutes", "patience", "progress_bar",
                  "num_threads", "num_workers", "device", "compile", "runs_dir",
                  "duplicate_bits", *MEASUREMENT_KEYS)


def _resume_params(run_dir: Path, overrides: dict[str, Any]) -> Params:
    """The saved run's parameters with the caller's explicit overrides: the safe ones (more
    epochs, a larger time budget, execution settings) apply and are announced; one that
    would change what shaped the weights is refused."""
    saved = load_params(run_dir / "params.yaml").to_dict()
    changed = {k: v for k, v in overrides.items()
               if k not in ("resume", "run_id") and saved.get(k, v) != v}
    refused = sorted(k for k in changed if k not in SAFE_ON_RESUME)
    if refused:
        raise ValueError(f"resume {run_dir}: cannot change {', '.join(refused)} of a run "
                         "(its weights were shaped by them); start a new run instead")
    if changed:
        print(f"resume: applying {changed}")
    return params_from_dict(saved | changed | {"resume": str(run_dir)},
                            source=str(run_dir / "params.yaml"))


def train(params: Params, progress: bool = True,
          step_callback: Callable[[int, int], None] | None = None,
          resume_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train with ``params`` into ``runs_dir/run_id`` (or continue ``params.resume``).

    A resumed run keeps its saved parameters; ``resume_overrides`` (what the caller set
    explicitly) may change the safe ones only. ``step_callback(epoch, step)`` runs after
    every optimiser step (tests use it to interrupt a run). Raises TrainingDivergedError on
    a non-finite loss.
    """
    ctx = init_from_env(params.device)  # several processes under torchrun
    try:
        return _train(params, ctx, progress, step_callback, resume_overrides)
    finally:
        finish(ctx)


def _train(params: Params, ctx: DistContext, progress: bool,
           step_callback: Callable[[int, int], None] | None,
           resume_overrides: dict[str, Any] | None) -> TrainResult:
    say = print if ctx.is_main else (lambda *a, **k: None)
    start_state: dict[str, Any] | None = None
    if params.resume:
        run_dir = params.resolve_path(params.resume)
        start_state = read_checkpoint(run_dir / "last.pt")
        params = _resume_params(run_dir, resume_overrides or {})
    else:
        run_dir = Path(from_main(ctx, str(target_run_dir(params))))  # one id for all ranks
        if (run_dir / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run: set resume: {run_dir} "
                                  "to continue it, or choose another run_id")
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    seed_everything(params.seed, params.deterministic)
    device = device_for(ctx, select_device(params.device))
    dtype = autocast_dtype(params, device)

    source, data = load_training_data(params)
    model, provenance = create_model(params.arch, params.encoder, params.encoder_weights,
                                     params.in_channels, params.require_pretrained)
    if ctx.enabled and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_batches = ResidentBatches(data["train"], device, params.batch_size, shuffle=True,
                                    seed=params.seed, rank=ctx.rank, world=ctx.world)
    valid_batches = ResidentBatches(data["valid"], device, params.batch_size)
    trainer = Trainer(params, model, device, len(train_batches), ctx)
    stopper = EarlyStopping("min" if params.monitor == "val_loss" else "max", params.patience,
                            params.min_delta)
    history: list[dict[str, float]] = []
    first_epoch = 1
    if start_state:
        trainer.load_state_dict(start_state)
        stopper.load_state_dict(start_state["early_stopping"])
        history = start_state["history"]
        first_epoch = start_state["epoch"] + 1
        say(f"resuming {run_dir.name} after epoch {start_state['epoch']}")
    elif ctx.is_main:
        save_params(params, run_dir / "params.yaml")
        atomic_write_json(run_dir / "env.json", environment_info(device) | {
            "dataset": dataset_record(source, {k: len(v) for k, v in data.items()}),
            "weights": provenance, "autocast": str(dtype) if dtype else "fp32"})

    budget = (f"a {params.train_minutes:g}-minute budget (at most {params.epochs} epochs)"
              if params.train_minutes else f"{params.epochs} epochs")
    parallel = f" | {ctx.world} data-parallel processes" if ctx.enabled else ""
    say(f"run {run_dir} | {source.kind} data ({len(data['train'])} train / "
          f"{len(data['valid'])} valid at {params.image_size}px) | {params.arch}/"
          f"{params.encoder}, {provenance} | {device}, {dtype or 'fp32'}"
          f"{', compiled' if trainer.compiled else ''}{', EMA' if trainer.ema else ''} | "
          f"{budget}{parallel}", flush=True)
    started = last_saved = time.perf_counter()
    stop_reason = "max epochs"
    epoch = first_epoch - 1
    for epoch in range(first_epoch, params.epochs + 1):
        if stopper.should_stop or trainer.schedule.out_of_time:  # a resumed, finished run
            break
        epoch_start = time.perf_counter()
        train_batches.generator.manual_seed(params.seed * 1000 + epoch)
        train_loss, seen, train_seconds = trainer.train_epoch(
            train_batches, epoch, progress, f" of run {run_dir}", step_callback)
        val_start = time.perf_counter()
        # rank 0 validates on the whole split (nothing padded), and its clock and decisions
        # are everyone's
        val = validate(trainer.eval_model, valid_batches, trainer.loss_fn, params, device) \
            if ctx.is_main else {}
        val_seconds = time.perf_counter() - val_start
        epoch_seconds = time.perf_counter() - epoch_start
        capped = bool(params.max_train_minutes) and (
            time.perf_counter() - started > params.max_train_minutes * 60)
        if ctx.enabled:
            val, trainer.schedule.elapsed, capped, epoch_seconds = from_main(ctx, (
                val, trainer.schedule.elapsed + train_seconds + val_seconds, capped,
                epoch_seconds))
        else:
            trainer.schedule.elapsed += val_seconds
        time_up = trainer.schedule.next_epoch_overruns(epoch_seconds)
        row = {"epoch": epoch, "train_loss": train_loss, **val,
               "lr": float(trainer.optimizer.param_groups[0]["lr"]),
               "seconds": epoch_seconds,
               "train_img_per_s": seen * ctx.world / train_seconds}
        history.append(row)
        improved = stopper.step(val[params.monitor], epoch)
        state = {"model": trainer.eval_model.state_dict(), "params": params.to_dict(),
                 "epoch": epoch, "metrics": row, "weights": provenance,
                 "ema": trainer.ema is not None}
        if improved and ctx.is_main:
            save_checkpoint(run_dir / "best.pt", state)
        last_due = (epoch == first_epoch or stopper.should_stop or capped or time_up
                    or epoch == params.epochs
                    or time.perf_counter() - last_saved > LAST_EVERY_S)
        if last_due and ctx.is_main:  # ~4x the weights: at most once a minute on a fast GPU
            save_checkpoint(run_dir / "last.pt", state | trainer.state_dict() | {
                "early_stopping": stopper.state_dict(), "history": history})
            last_saved = time.perf_counter()
        if ctx.is_main:
            _write_history(run_dir / "history.csv", history)
        say(f"epoch {epoch:3d} | train {row['train_loss']:.4f} | val loss "
              f"{val['val_loss']:.4f} iou {val['val_iou']:.4f} dice {val['val_dice']:.4f} | "
              f"lr {row['lr']:.2e} | {row['seconds']:.1f}s ({row['train_img_per_s']:.0f} img/s)"
              f"{' *' if improved else ''}", flush=True)
        if epoch == first_epoch and not params.train_minutes:
            left = (params.epochs - epoch) * row["seconds"]
            say(f"expected: about {left / 60:.1f} more minutes for {params.epochs} epochs",
                  flush=True)
        if stopper.should_stop:
            break
        if time_up:
            stop_reason = "time budget"
            break
        if capped:
            stop_reason = "time limit"
            break
    if stopper.should_stop:
        stop_reason = "early stopping"
    seconds = time.perf_counter() - started
    summary = {"best_epoch": stopper.best_epoch, "best_" + params.monitor: stopper.best,
               "epochs_run": len(history), "stop_reason": stop_reason,
               "train_seconds_this_session": seconds,
               "compile_seconds": trainer.compile_seconds,
               "train_seconds_total": trainer.schedule.elapsed + trainer.compile_seconds,
               "ema": trainer.ema is not None}
    if ctx.is_main:
        atomic_write_json(run_dir / "train.json", summary)
    barrier(ctx)  # every rank returns a finished run
    say(f"stopped after epoch {epoch} ({stop_reason}); best {params.monitor} "
          f"{stopper.best:.4f} at epoch {stopper.best_epoch}"
          + (f"; compile {trainer.compile_seconds:.0f} s" if trainer.compiled else ""))
    return TrainResult(run_dir, history, stopper.best_epoch, float(stopper.best or 0.0),
                       stop_reason, seconds)
