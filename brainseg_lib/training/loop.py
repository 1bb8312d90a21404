"""Training runs: the reference recipe (BCE, Adam, early stopping on validation loss, best
checkpoint kept) and the stronger options, resumable and with every epoch recorded.

Checkpoints are written atomically each epoch (``last.pt``, at most once a minute) and on
improvement (``best.pt``), so an interrupted or diverged run keeps its last good state. The
step itself is :mod:`.trainer`; data parallelism under torchrun, :mod:`.distributed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg_lib.config import Params, ParamsError, save_params
from brainseg_lib.data.arrays import SplitArrays, load_split_arrays
from brainseg_lib.data.identity import dataset_record
from brainseg_lib.data.locate import DataSource, data_source
from brainseg_lib.io import atomic_write_json
from brainseg_lib.model.checkpoint import read_checkpoint, save_checkpoint
from brainseg_lib.model.device import select_device
from brainseg_lib.model.network import create_model
from brainseg_lib.rundir import (
    BEST_CHECKPOINT,
    ENV_FILE,
    LAST_CHECKPOINT,
    PARAMS_FILE,
    TRAIN_FILE,
    RunDir,
    TrainRecord,
    environment_info,
    target_run_dir,
)
from brainseg_lib.stores import check_tracking_uri
from brainseg_lib.tracking import Tracker, training_run
from brainseg_lib.training.batches import ResidentBatches, StreamedBatches, make_batches
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


def reuse_trained_run(params: Params) -> TrainResult | None:
    """The result of ``runs_dir/run_id`` without training it again, else None (train it).

    With ``report_model`` set, that exported model is first laid out as the run folder
    (written here; its training parameters must match the given ones); a run that has
    already finished training (say, on a GPU machine) is shown as it is.
    """
    if not params.run_id:
        return None
    run = RunDir(target_run_dir(params))
    if params.report_model:
        from brainseg_lib.model.run_folder import run_folder_from_model

        run_folder_from_model(params.resolve_path(params.report_model), run.path,
                              expected=params)
    record = run.train_record()
    if record is None:
        return None
    print(f"{run.name} has already finished training ({record.epochs_run} epochs on "
          f"{run.device()}, stopped by {record.stop_reason}): showing its record, "
          "not retraining")
    if run.env().get("trained_on"):
        print(f"note: {run.env()['trained_on']}")
    return TrainResult(run.path, run.history(), record.best_epoch, record.best_value,
                       record.stop_reason, record.train_seconds_this_session)


def train(params: Params, progress: bool = True,
          step_callback: Callable[[int, int], None] | None = None,
          resume_overrides: dict[str, Any] | None = None,
          epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
          ) -> TrainResult:
    """Train with ``params`` into ``runs_dir/run_id`` (or continue ``params.resume``).

    A resumed run keeps its saved parameters; ``resume_overrides`` (what the caller set
    explicitly) may change the resumable ones only. ``step_callback(epoch, step)`` runs after
    every optimiser step (tests use it to interrupt a run). ``epoch_callback(epoch, row)``
    runs after each epoch is saved, with its history row (validation metrics included): a
    sweep reports it to its pruner, and an exception it raises ends the run there, with
    ``last.pt`` and the history kept. Raises TrainingDivergedError on a non-finite loss.
    With ``tracking_uri`` set, the session logs to the run's MLflow run (:mod:`.tracking`).
    A new run with ``report_model`` set is refused: those parameters report on that model.
    """
    if params.report_model and not params.resume:
        raise ParamsError(f"report_model is set ({params.report_model}): these parameters "
                          "report on that model instead of training one; to train, unset it "
                          "(--set 'report_model=\"\"')")
    check_tracking_uri(params.tracking_uri)  # before minutes of loading, not after
    ctx = init_from_env(params.device)  # several processes under torchrun
    try:
        session = TrainingSession.open(params, ctx, resume_overrides or {})
        try:
            return session.run(progress, step_callback, epoch_callback)
        except BaseException as err:  # pruned, interrupted, diverged: the MLflow run says so
            if session.tracker:
                session.tracker.end("KILLED", type(err).__name__)
            raise
    finally:
        finish(ctx)


@dataclass(kw_only=True)
class TrainingSession:
    """One training session of a run: a new run, or a resumed one from its ``last.pt``;
    :meth:`open` sets it up, :meth:`run` trains it."""

    params: Params
    ctx: DistContext
    run_dir: Path
    device: torch.device
    trainer: Trainer
    stopper: EarlyStopping
    train_batches: ResidentBatches | StreamedBatches
    valid_batches: ResidentBatches | StreamedBatches
    provenance: str  # where the starting weights came from
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    first_epoch: int = 1  # after a resume, the epoch after the saved one
    parent: dict[str, Any] | None = None  # the model fine-tuned from (init_from)
    tracker: Tracker | None = None  # the run's MLflow run (rank 0, tracking_uri set)

    @classmethod
    def open(cls, params: Params, ctx: DistContext,
             overrides: dict[str, Any]) -> TrainingSession:
        """Set up the run directory, data, network, trainer and early stopping."""
        # the parent is checked before the run folder exists: a refusal leaves none behind
        parent = None if params.resume else _parent(params, ctx)
        params, run_dir, start_state = _open_run_dir(params, ctx, overrides)
        if params.num_threads:
            torch.set_num_threads(params.num_threads)
        seed_everything(params.seed, params.deterministic)
        device = device_for(ctx, select_device(params.device))
        source, data = load_training_data(params)
        model, provenance = create_model(params.arch, params.encoder,
                                         "none" if parent else params.encoder_weights,
                                         params.in_channels, params.require_pretrained,
                                         params.decoder_channels)
        if parent:
            model.load_state_dict(parent[0])
            provenance = (f"fine-tuned from {parent[1]['path']} ({parent[1]['file']}, sha256 "
                          f"{parent[1]['sha256'][:16]})")
        if ctx.enabled and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_batches = make_batches(data["train"], device, params.batch_size, shuffle=True,
                                     seed=params.seed, rank=ctx.rank, world=ctx.world)
        session = cls(
            params=params, ctx=ctx, run_dir=run_dir, device=device,
            trainer=Trainer(params, model, device, len(train_batches), ctx),
            stopper=EarlyStopping("min" if params.monitor == "val_loss" else "max",
                                  params.patience, params.min_delta),
            train_batches=train_batches,
            valid_batches=make_batches(data["valid"], device, params.batch_size),
            provenance=provenance, parent=parent[1] if parent else None)
        if start_state:
            session.restore(start_state)
        elif ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            session.record_start(source, {k: len(v) for k, v in data.items()})
        if ctx.is_main:
            session.tracker = training_run(params, run_dir)
        session.announce(source, data)
        return session

    def say(self, *args: Any, **kwargs: Any) -> None:
        if self.ctx.is_main:
            print(*args, **kwargs)

    def restore(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)
        self.stopper.load_state_dict(state["early_stopping"])
        self.history = state["history"]
        self.first_epoch = state["epoch"] + 1
        self.say(f"resuming {self.run_dir.name} after epoch {state['epoch']}")

    def record_start(self, source: DataSource, images: dict[str, int]) -> None:
        """``params.yaml`` and ``env.json``: what the run is and where it trains."""
        dtype = self.trainer.precision.autocast
        save_params(self.params, self.run_dir / PARAMS_FILE)
        atomic_write_json(self.run_dir / ENV_FILE, environment_info(self.device) | {
            "dataset": dataset_record(source, images), "weights": self.provenance,
            "autocast": str(dtype) if dtype else "fp32",
            "precision": self.trainer.precision.record(), "parent": self.parent})

    def announce(self, source: DataSource, data: dict[str, SplitArrays]) -> None:
        params, trainer = self.params, self.trainer
        budget = (f"a {params.train_minutes:g}-minute budget (at most {params.epochs} epochs)"
                  if params.train_minutes else f"{params.epochs} epochs")
        parallel = f" | {self.ctx.world} data-parallel processes" if self.ctx.enabled else ""
        self.say(f"run {self.run_dir} | {source.kind} data ({len(data['train'])} train / "
                 f"{len(data['valid'])} valid at {params.image_size}px{_patches(params)}) | "
                 f"{params.arch}/{params.encoder}, "
                 f"{self.provenance} | {self.device}, {trainer.precision.name}"
                 f"{', compiled' if trainer.compiled else ''}{', EMA' if trainer.ema else ''} "
                 f"| {budget}{parallel}", flush=True)
        if trainer.precision.probe_seconds is None:  # a probed choice has said why already
            self.say(f"precision: {trainer.precision.reason}", flush=True)

    def run(self, progress: bool, step_callback: Callable[[int, int], None] | None,
            epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
            ) -> TrainResult:
        """Epochs until early stopping, the time budget or the last epoch."""
        started = last_saved = time.perf_counter()
        stop_reason, epoch = "max epochs", self.first_epoch - 1
        for epoch in range(self.first_epoch, self.params.epochs + 1):
            if self.stopper.should_stop or self.trainer.schedule.out_of_time:
                break  # a resumed run that had already finished
            row, time_up = self.epoch(epoch, progress, step_callback)
            improved = self.stopper.step(row[self.params.monitor], epoch)
            save_last = (epoch == self.first_epoch or self.stopper.should_stop or time_up
                         or epoch == self.params.epochs
                         or time.perf_counter() - last_saved > LAST_EVERY_S)
            self.save(epoch, row, improved, save_last)
            if save_last:
                last_saved = time.perf_counter()
            self.report_epoch(epoch, row, improved)
            if self.tracker:
                self.tracker.log_epoch(epoch, row)
            if epoch_callback:
                epoch_callback(epoch, row)
            if self.stopper.should_stop:
                stop_reason = "early stopping"
                break
            if time_up:
                stop_reason = "time budget"
                break
        if self.stopper.should_stop:
            stop_reason = "early stopping"
        return self.finish(epoch, stop_reason, time.perf_counter() - started)

    def epoch(self, epoch: int, progress: bool,
              step_callback: Callable[[int, int], None] | None,
              ) -> tuple[dict[str, float], bool]:
        """Train one epoch, validate (rank 0, on the whole split); the epoch's history row
        and whether the time budget leaves no room for another."""
        params, trainer, ctx = self.params, self.trainer, self.ctx
        epoch_start = time.perf_counter()
        frozen = epoch <= params.freeze_encoder_epochs
        for weight in trainer.model.encoder.parameters():  # no gradient: the optimiser skips it
            weight.requires_grad_(not frozen)
        self.train_batches.generator.manual_seed(params.seed * 1000 + epoch)
        train_loss, seen, train_seconds = trainer.train_epoch(
            self.train_batches, epoch, progress, f" of run {self.run_dir}", step_callback)
        val_start = time.perf_counter()
        val = validate(trainer.eval_model, self.valid_batches, trainer.loss_fn, params,
                       self.device, trainer.precision) if ctx.is_main else {}
        val_seconds = time.perf_counter() - val_start
        epoch_seconds = time.perf_counter() - epoch_start
        if ctx.enabled:  # rank 0's clock and decisions are everyone's
            val, trainer.schedule.elapsed, epoch_seconds = from_main(ctx, (
                val, trainer.schedule.elapsed + train_seconds + val_seconds, epoch_seconds))
        else:
            trainer.schedule.elapsed += val_seconds
        row = {"epoch": epoch, "train_loss": train_loss, **val,
               "lr": float(trainer.optimizer.param_groups[0]["lr"]), "seconds": epoch_seconds,
               "train_img_per_s": seen * ctx.world / train_seconds}
        self.history.append(row)
        return row, trainer.schedule.next_epoch_overruns(epoch_seconds)

    def save(self, epoch: int, row: dict[str, float], improved: bool, save_last: bool) -> None:
        """``best.pt`` on improvement, ``last.pt`` when due (~4x the weights: at most once a
        minute on a fast GPU), and the history; rank 0 only."""
        if not self.ctx.is_main:
            return
        state = {"model": self.trainer.eval_model.state_dict(), "params": self.params.to_dict(),
                 "epoch": epoch, "metrics": row, "weights": self.provenance,
                 "ema": self.trainer.ema is not None}
        if improved:
            save_checkpoint(self.run_dir / BEST_CHECKPOINT, state)
        if save_last:
            save_checkpoint(self.run_dir / LAST_CHECKPOINT, state | self.trainer.state_dict() | {
                "early_stopping": self.stopper.state_dict(), "history": self.history})
        RunDir(self.run_dir).write_history(self.history)

    def report_epoch(self, epoch: int, row: dict[str, float], improved: bool) -> None:
        self.say(f"epoch {epoch:3d} | train {row['train_loss']:.4f} | val loss "
                 f"{row['val_loss']:.4f} iou {row['val_iou']:.4f} dice {row['val_dice']:.4f} | "
                 f"lr {row['lr']:.2e} | {row['seconds']:.1f}s ({row['train_img_per_s']:.0f} "
                 f"img/s){' *' if improved else ''}", flush=True)
        if epoch == self.first_epoch and not self.params.train_minutes:
            left = (self.params.epochs - epoch) * row["seconds"]
            self.say(f"expected: about {left / 60:.1f} more minutes for {self.params.epochs} "
                     "epochs", flush=True)

    def finish(self, epoch: int, stop_reason: str, seconds: float) -> TrainResult:
        """``train.json`` (rank 0), then every rank returns the finished run."""
        params, trainer, stopper = self.params, self.trainer, self.stopper
        best = float("nan") if stopper.best is None else stopper.best
        record = TrainRecord(
            best_epoch=stopper.best_epoch, monitor=params.monitor, best_value=best,
            epochs_run=len(self.history), stop_reason=stop_reason,
            train_seconds_this_session=seconds, compile_seconds=trainer.compile_seconds,
            train_seconds_total=trainer.schedule.elapsed + trainer.compile_seconds,
            ema=trainer.ema is not None, precision=trainer.precision.record())
        if self.ctx.is_main:
            RunDir(self.run_dir).write_train_record(record)
        if self.tracker:
            self.tracker.log_metrics({k: v for k, v in record.to_json().items()
                                      if isinstance(v, int | float) and not isinstance(v, bool)})
            self.tracker.log_artifact(self.run_dir / TRAIN_FILE)
            self.tracker.end()
        barrier(self.ctx)
        self.say(f"stopped after epoch {epoch} ({stop_reason}); best {params.monitor} "
                 f"{stopper.best:.4f} at epoch {stopper.best_epoch}"
                 + (f"; compile {trainer.compile_seconds:.0f} s" if trainer.compiled else ""))
        return TrainResult(self.run_dir, self.history, stopper.best_epoch, best, stop_reason,
                           seconds)


def _parent(params: Params, ctx: DistContext) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The weights and record of the model ``init_from`` names, its network checked against
    this run's; None without ``init_from``."""
    from brainseg_lib.model.parent import parent_weights

    if params.freeze_encoder_epochs and ctx.enabled:
        raise ParamsError("freeze_encoder_epochs: not under torchrun (DistributedDataParallel "
                         "cannot change which weights train); train in one process")
    if not params.init_from:
        return None
    return parent_weights(params.resolve_path(params.init_from), params)


def _patches(params: Params) -> str:
    size = params.patch_size
    return "" if size is None else (f", trained on {size}px patches, "
                                    f"{params.fg_oversample:.0%} placed on tumour")


def _open_run_dir(params: Params, ctx: DistContext, overrides: dict[str, Any],
                  ) -> tuple[Params, Path, dict[str, Any] | None]:
    """The run's parameters, directory and saved state: a resumed run's own (with the
    resumable overrides), or the path of a new one, made once the run's data and network
    are ready (a run that fails before leaves no empty folder behind)."""
    if params.resume:
        run_dir = params.resolve_path(params.resume)
        state = read_checkpoint(run_dir / LAST_CHECKPOINT)
        return RunDir(run_dir).resumed_params(overrides), run_dir, state
    run_dir = Path(from_main(ctx, str(target_run_dir(params))))  # one id for all ranks
    if (run_dir / LAST_CHECKPOINT).exists():
        raise FileExistsError(f"{run_dir} already holds a run: set resume: {run_dir} "
                              "to continue it, or choose another run_id")
    return params, run_dir, None
