"""The trainer: the reference recipe (BCE, Adam, early stopping on validation loss, best
checkpoint kept) and the stronger options, resumable and with every epoch recorded.

Checkpoints are written atomically each epoch (``last.pt``) and on improvement
(``best.pt``), so an interrupted or diverged run keeps its last good state. Each split lives
on the training device as uint8 and batches are index-gathered and augmented there: no
DataLoader, no host copy and no host sync inside an epoch (the loss is checked once per
epoch). On CUDA the training step is compiled (``compile``) and runs in bf16.
"""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg_lib.augment import BatchAugment, Normalizer
from brainseg_lib.config import Params, load_params, params_from_dict, save_params
from brainseg_lib.dataset import ResidentBatches, SplitArrays, load_split_arrays
from brainseg_lib.io import atomic_write_json, atomic_write_text
from brainseg_lib.locate import DataSource, data_source
from brainseg_lib.losses import build_loss
from brainseg_lib.metrics import ConfusionCounts, pooled_dice, pooled_iou
from brainseg_lib.model import create_model
from brainseg_lib.modeling.artifacts import read_checkpoint, save_checkpoint
from brainseg_lib.runs import dataset_record, environment_info, run_dir_for, training_record

LAST_EVERY_S = 60.0  # resumable state (last.pt) at most this often, and at the end
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_iou", "val_dice", "lr", "seconds",
                  "train_img_per_s")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class EarlyStopping:
    """Stop when the monitored value has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, mode: str, patience: int, min_delta: float):
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best: float | None = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it is the new best."""
        if self.best is None or (
            (self.best - value) if self.mode == "min" else (value - self.best)
        ) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float
    stop_reason: str
    seconds: float


def select_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def autocast_dtype(params: Params, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default; fp32 on the CPU, where bf16 autocast is slower."""
    if device.type != "cuda" or params.amp == "none":
        return None
    return torch.float16 if params.amp == "fp16" else torch.bfloat16


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every generator; ``deterministic`` also makes torch pick deterministic kernels
    (cuDNN, cuBLAS workspace, ``use_deterministic_algorithms``; ops without a deterministic
    version, such as ``grid_sample``'s CUDA backward, warn instead of failing)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class Schedule:
    """Learning-rate multiplier per step: linear warm-up, then constant or cosine to zero.

    With a time budget (``train_minutes``) the cosine runs over the budget's wall-clock
    time (or the epochs, whichever ends first), so a run cut by time still ends at a low
    learning rate whatever the machine's speed.
    """

    def __init__(self, params: Params, steps_per_epoch: int):
        self.params = params
        self.warmup = params.warmup_epochs * steps_per_epoch
        self.total = max(params.epochs * steps_per_epoch, 1)
        self.budget = params.train_minutes * 60
        self.step_count, self.elapsed = 0, 0.0

    def progress(self) -> float:
        by_steps = (self.step_count - self.warmup) / max(self.total - self.warmup, 1)
        by_time = self.elapsed / self.budget if self.budget else 0.0
        return min(max(by_steps, by_time, 0.0), 1.0)

    def factor(self) -> float:
        if self.step_count < self.warmup:
            return (self.step_count + 1) / self.warmup
        if self.params.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * self.progress()))
        return 1.0

    @property
    def out_of_time(self) -> bool:
        return bool(self.budget) and self.elapsed >= self.budget

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "elapsed": self.elapsed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.elapsed = int(state["step_count"]), float(state["elapsed"])


def build_optimizer(params: Params, model: nn.Module, device: torch.device,
                    ) -> torch.optim.Optimizer:
    """Adam or AdamW; the fused CUDA kernel on the GPU (one launch for all parameters)."""
    cls = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=params.lr, weight_decay=params.weight_decay,
               fused=device.type == "cuda")


def load_training_data(params: Params) -> tuple[DataSource, dict[str, SplitArrays]]:
    """Train and validation arrays: the dataset's own split, or fold ``params.fold`` of a
    cross-validation over train+valid (``folds_file``)."""
    from brainseg_lib.folds import fold_split

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


@torch.no_grad()
def validate(model: nn.Module, batches: ResidentBatches, loss_fn: nn.Module,
             params: Params, device: torch.device) -> dict[str, float]:
    """Mean loss per image (the loss of each image on its own, as at test time) and pooled
    IoU/Dice at threshold ``params.threshold``."""
    model.eval()
    dtype = autocast_dtype(params, device)
    norm = Normalizer(params.normalize_mean, params.normalize_std, device)
    total = torch.zeros((), device=device)
    counts = []
    for images, masks in batches:
        x = norm(images)
        if params.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = masks.float()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        logits = logits.float()
        total += per_image_loss(loss_fn, logits, y).sum()
        counts.append(ConfusionCounts.from_masks(torch.sigmoid(logits) >= params.threshold, y))
    stats = ConfusionCounts.concat(counts)
    return {"val_loss": total.item() / len(stats), "val_iou": pooled_iou(stats),
            "val_dice": pooled_dice(stats)}


def per_image_loss(loss_fn: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of each image on its own (B,): independent of how images are batched."""
    return torch.stack([loss_fn(logits[i:i + 1], y[i:i + 1]) for i in range(len(logits))])


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    lines = [",".join(HISTORY_FIELDS)]
    lines += [",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])
                       for k in HISTORY_FIELDS) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "history.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0,
                file=sys.stderr)


def use_compile(params: Params, device: torch.device) -> bool:
    """``compile`` auto = on CUDA only; asked for on the CPU it is ignored with a message
    (inductor's CPU code was not faster here: see benchmarks/bench_train.py)."""
    if params.compile == "auto":
        return device.type == "cuda"
    if params.compile and device.type != "cuda":
        print("note: compile: true is ignored on the CPU (eager mode is used)", file=sys.stderr)
        return False
    return bool(params.compile)


class Trainer:
    """Model, optimiser, schedule, loss and optional weight EMA for one run; one call trains
    one epoch."""

    def __init__(self, params: Params, model: nn.Module, device: torch.device,
                 steps_per_epoch: int):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.params, self.device = params, device
        self.dtype = autocast_dtype(params, device)
        self.model = model.to(device)
        if params.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # EMA of the plain (uncompiled) module, buffers included (BatchNorm statistics)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(
            params.ema_decay), use_buffers=True) if params.ema else None
        self.compiled = use_compile(params, device)
        self.forward = torch.compile(self.model) if self.compiled else self.model
        self.compile_seconds = 0.0
        self.loss_fn = build_loss(params.loss)
        self.optimizer = build_optimizer(params, self.model, device)
        self.schedule = Schedule(params, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.augment = BatchAugment(params) if params.augment else None
        self.normalize = Normalizer(params.normalize_mean, params.normalize_std, device)

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                 "raw_model": self.model.state_dict()}
        if self.ema is not None:
            state["ema_steps"] = self.ema.n_averaged.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["raw_model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["model"])
            self.ema.n_averaged.copy_(state["ema_steps"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])

    def _set_lr(self) -> None:
        lr = self.params.lr * self.schedule.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _step(self, images: torch.Tensor, masks: torch.Tensor,
              aug_gen: torch.Generator) -> torch.Tensor:
        p = self.params
        x, y = images.float() / 255.0, masks.float()
        if self.augment:
            x, y = self.augment(x, y, aug_gen)
        x = self.normalize(x)
        if p.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = self.forward(x)
        loss = self.loss_fn(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if p.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), p.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss.detach()

    def _first_step(self, images: torch.Tensor, masks: torch.Tensor,
                    aug_gen: torch.Generator) -> torch.Tensor:
        """The first step compiles; its time is reported apart, and a compile failure falls
        back to eager mode instead of ending the run."""
        t0 = time.perf_counter()
        try:
            loss = self._step(images, masks, aug_gen)
        except Exception as err:  # inductor/triton raise many types
            if not self.compiled:
                raise
            print(f"warning: torch.compile failed ({type(err).__name__}: "
                  f"{str(err).splitlines()[0][:200]}); training in eager mode", file=sys.stderr)
            self.compiled, self.forward = False, self.model
            loss = self._step(images, masks, aug_gen)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - t0 if self.compiled else 0.0
        return loss

    def train_epoch(self, batches: ResidentBatches, epoch: int,
                    progress: bool = False, where: str = "",
                    step_callback: Callable[[int, int], None] | None = None,
                    ) -> tuple[float, int, float]:
        """One pass over ``batches``: (mean loss per image, images timed, seconds); a
        compiling first step is neither timed nor counted in the throughput.

        Nothing here waits for the GPU: the loss is summed on the device and read (and
        checked for NaN) once, at the end of the epoch.
        """
        self.model.train()
        aug_gen = torch.Generator(self.device).manual_seed(self.params.seed * 1000 + epoch)
        t0, seen, timed = time.perf_counter(), 0, 0
        running = torch.zeros((), device=self.device)
        bar = _progress(batches, len(batches), f"epoch {epoch}", progress)
        base = self.schedule.elapsed
        for step, (images, masks) in enumerate(bar, 1):
            self._set_lr()
            if self.schedule.step_count == 0:
                loss = self._first_step(images, masks, aug_gen)
                t0 = time.perf_counter()  # compile time is reported apart
            else:
                loss = self._step(images, masks, aug_gen)
                timed += len(images)
            running += loss * len(images)
            seen += len(images)
            self.schedule.step_count += 1
            self.schedule.elapsed = base + time.perf_counter() - t0
            if step_callback:
                step_callback(epoch, step)
        total = running.item()
        if not math.isfinite(total):
            raise TrainingDivergedError(
                f"non-finite loss in epoch {epoch}{where}; the last good checkpoint is kept "
                "(last.pt). Lower lr, set grad_clip, or use amp: bf16.")
        return total / max(seen, 1), timed, max(time.perf_counter() - t0, 1e-9)


def finished_run(params: Params) -> TrainResult | None:
    """The record of ``runs_dir/run_id`` when that run has finished training, else None.

    With ``model_dir`` set, the exported model is laid out as that run first (its training
    parameters must match the given ones).
    """
    if not params.run_id:
        return None
    run_dir = run_dir_for(params)
    if params.model_dir:
        from brainseg_lib.modeling.artifacts import materialise

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
                  # evaluation settings: they shape measurements, not weights
                  "threshold", "tune_threshold", "eval_original_size", "tta", "bootstrap",
                  "min_component_px", "n_examples", "duplicate_bits")


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
    start_state: dict[str, Any] | None = None
    if params.resume:
        run_dir = params.resolve_path(params.resume)
        start_state = read_checkpoint(run_dir / "last.pt")
        params = _resume_params(run_dir, resume_overrides or {})
    else:
        run_dir = run_dir_for(params)
        if (run_dir / "last.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run: set resume: {run_dir} "
                                  "to continue it, or choose another run_id")
        run_dir.mkdir(parents=True, exist_ok=True)
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    seed_everything(params.seed, params.deterministic)
    device = select_device(params.device)
    dtype = autocast_dtype(params, device)

    source, data = load_training_data(params)
    model, provenance = create_model(params.arch, params.encoder, params.encoder_weights,
                                     params.in_channels, params.require_pretrained)
    train_batches = ResidentBatches(data["train"], device, params.batch_size, shuffle=True,
                                    seed=params.seed)
    valid_batches = ResidentBatches(data["valid"], device, params.batch_size)
    trainer = Trainer(params, model, device, len(train_batches))
    stopper = EarlyStopping("min" if params.monitor == "val_loss" else "max", params.patience,
                            params.min_delta)
    history: list[dict[str, float]] = []
    first_epoch = 1
    if start_state:
        trainer.load_state_dict(start_state)
        stopper.load_state_dict(start_state["early_stopping"])
        history = start_state["history"]
        first_epoch = start_state["epoch"] + 1
        print(f"resuming {run_dir.name} after epoch {start_state['epoch']}")
    else:
        save_params(params, run_dir / "params.yaml")
        atomic_write_json(run_dir / "env.json", environment_info(device) | {
            "dataset": dataset_record(source, {k: len(v) for k, v in data.items()}),
            "weights": provenance, "autocast": str(dtype) if dtype else "fp32"})

    budget = (f"a {params.train_minutes:g}-minute budget (at most {params.epochs} epochs)"
              if params.train_minutes else f"{params.epochs} epochs")
    print(f"run {run_dir} | {source.kind} data ({len(data['train'])} train / "
          f"{len(data['valid'])} valid at {params.image_size}px) | {params.arch}/"
          f"{params.encoder}, {provenance} | {device}, {dtype or 'fp32'}"
          f"{', compiled' if trainer.compiled else ''}{', EMA' if trainer.ema else ''} | "
          f"{budget}", flush=True)
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
        val = validate(trainer.eval_model, valid_batches, trainer.loss_fn, params, device)
        trainer.schedule.elapsed += time.perf_counter() - val_start
        row = {"epoch": epoch, "train_loss": train_loss, **val,
               "lr": float(trainer.optimizer.param_groups[0]["lr"]),
               "seconds": time.perf_counter() - epoch_start,
               "train_img_per_s": seen / train_seconds}
        history.append(row)
        improved = stopper.step(val[params.monitor], epoch)
        state = {"model": trainer.eval_model.state_dict(), "params": params.to_dict(),
                 "epoch": epoch, "metrics": row, "weights": provenance,
                 "ema": trainer.ema is not None}
        if improved:
            save_checkpoint(run_dir / "best.pt", state)
        capped = bool(params.max_train_minutes) and (
            time.perf_counter() - started > params.max_train_minutes * 60)
        last_due = (epoch == first_epoch or stopper.should_stop or capped
                    or trainer.schedule.out_of_time or epoch == params.epochs
                    or time.perf_counter() - last_saved > LAST_EVERY_S)
        if last_due:  # ~4x the weights: written at most once a minute on a fast GPU
            save_checkpoint(run_dir / "last.pt", state | trainer.state_dict() | {
                "early_stopping": stopper.state_dict(), "history": history})
            last_saved = time.perf_counter()
        _write_history(run_dir / "history.csv", history)
        print(f"epoch {epoch:3d} | train {row['train_loss']:.4f} | val loss "
              f"{val['val_loss']:.4f} iou {val['val_iou']:.4f} dice {val['val_dice']:.4f} | "
              f"lr {row['lr']:.2e} | {row['seconds']:.1f}s ({row['train_img_per_s']:.0f} img/s)"
              f"{' *' if improved else ''}", flush=True)
        if epoch == first_epoch and not params.train_minutes:
            left = (params.epochs - epoch) * row["seconds"]
            print(f"expected: about {left / 60:.1f} more minutes for {params.epochs} epochs",
                  flush=True)
        if stopper.should_stop:
            break
        if trainer.schedule.out_of_time:
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
    atomic_write_json(run_dir / "train.json", summary)
    print(f"stopped after epoch {epoch} ({stop_reason}); best {params.monitor} "
          f"{stopper.best:.4f} at epoch {stopper.best_epoch}"
          + (f"; compile {trainer.compile_seconds:.0f} s" if trainer.compiled else ""))
    return TrainResult(run_dir, history, stopper.best_epoch, float(stopper.best or 0.0),
                       stop_reason, seconds)
