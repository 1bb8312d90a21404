"""The trainer: the reference recipe (BCE, Adam, early stopping on validation loss, best
checkpoint kept) and the stronger options, resumable and with every epoch recorded.

Checkpoints are written atomically each epoch (``last.pt``) and on improvement
(``best.pt``), so an interrupted or diverged run keeps its last good state.
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

from brainseg_lib.augment import BatchAugment, normalize
from brainseg_lib.config import Params, load_params, params_from_dict, save_params
from brainseg_lib.dataset import SplitArrays, build_loader, load_split_arrays
from brainseg_lib.io import atomic_write, atomic_write_json, atomic_write_text
from brainseg_lib.locate import DataSource, data_source
from brainseg_lib.losses import build_loss
from brainseg_lib.metrics import ConfusionCounts, pooled_dice, pooled_iou
from brainseg_lib.model import create_model
from brainseg_lib.runs import dataset_hash, environment_info, run_dir_for, training_record

NAN_CHECK_EVERY = 10  # steps between loss checks (each check waits for the GPU)
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
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def lr_lambda(params: Params, steps_per_epoch: int) -> Callable[[int], float]:
    """Per-step multiplier: linear warm-up, then constant or cosine decay to zero."""
    warmup = params.warmup_epochs * steps_per_epoch
    total = max(params.epochs * steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if params.scheduler == "cosine":
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def build_optimizer(params: Params, model: nn.Module) -> torch.optim.Optimizer:
    if params.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=params.lr,
                                 weight_decay=params.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


def load_training_data(params: Params) -> tuple[DataSource, dict[str, SplitArrays]]:
    source = data_source(params)
    data = {s: load_split_arrays(source.path, s, params.image_size, params.cache_path())
            for s in ("train", "valid")}
    if params.limit_train_images and params.limit_train_images < len(data["train"]):
        rng = np.random.default_rng(params.seed)
        pick = rng.choice(len(data["train"]), params.limit_train_images, replace=False)
        data["train"] = data["train"].subset(pick)
    return source, data


def to_model_input(images: torch.Tensor, device: torch.device,
                   channels_last: bool) -> torch.Tensor:
    x = images.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def validate(model: nn.Module, loader: torch.utils.data.DataLoader, loss_fn: nn.Module,
             params: Params, device: torch.device) -> dict[str, float]:
    """Mean loss per image and pooled IoU/Dice at threshold ``params.threshold``."""
    model.eval()
    dtype = autocast_dtype(params, device)
    total, n, counts = 0.0, 0, []
    for images, masks in loader:
        x = normalize(to_model_input(images, device, params.channels_last),
                      params.normalize_mean, params.normalize_std)
        y = masks.to(device).float()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        logits = logits.float()
        total += loss_fn(logits, y).item() * len(x)
        n += len(x)
        counts.append(ConfusionCounts.from_masks(torch.sigmoid(logits) >= params.threshold, y))
    stats = ConfusionCounts.concat(counts)
    return {"val_loss": total / n, "val_iou": pooled_iou(stats), "val_dice": pooled_dice(stats)}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


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


class Trainer:
    """Model, optimiser, schedule and loss for one run; one call trains one epoch."""

    def __init__(self, params: Params, model: nn.Module, device: torch.device,
                 steps_per_epoch: int):
        self.params, self.device = params, device
        self.dtype = autocast_dtype(params, device)
        self.model = model.to(device)
        if params.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(params.loss)
        self.optimizer = build_optimizer(params, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(params, steps_per_epoch))
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.augment = BatchAugment(params) if params.augment else None

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def train_epoch(self, loader: torch.utils.data.DataLoader, epoch: int,
                    progress: bool = False, where: str = "",
                    step_callback: Callable[[int, int], None] | None = None,
                    ) -> tuple[float, int, float]:
        """One pass over ``loader``: (mean loss per image, images seen, seconds)."""
        p, model = self.params, self.model
        model.train()
        aug_gen = torch.Generator().manual_seed(p.seed * 1000 + epoch)
        t0, seen = time.perf_counter(), 0
        running = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        bar = _progress(loader, len(loader), f"epoch {epoch}", progress)
        for step, (images, masks) in enumerate(bar, 1):
            x = to_model_input(images, self.device, False).float() / 255.0
            y = masks.to(self.device, non_blocking=True).float()
            if self.augment:
                x, y = self.augment(x, y, aug_gen)
            x = normalize(x, p.normalize_mean, p.normalize_std)
            if p.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype is not None):
                logits = model(x)
            loss = self.loss_fn(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if p.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            running += loss.detach() * len(x)
            seen += len(x)
            if step % NAN_CHECK_EVERY == 0 or step == len(loader):
                total = running.item()
                if not math.isfinite(total):
                    raise TrainingDivergedError(
                        f"non-finite loss at epoch {epoch} (by step {step}){where}; the last "
                        "good checkpoint is kept (last.pt). Lower lr, set grad_clip, or use "
                        "amp: bf16.")
                if progress and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{total / seen:.4f}",
                                    img_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if step_callback:
                step_callback(epoch, step)
        return running.item() / max(seen, 1), seen, time.perf_counter() - t0


def finished_run(params: Params) -> TrainResult | None:
    """The record of ``runs_dir/run_id`` when that run has finished training, else None."""
    if not params.run_id:
        return None
    run_dir = run_dir_for(params)
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


def train(params: Params, progress: bool = True,
          step_callback: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train with ``params`` into ``runs_dir/run_id`` (or continue ``params.resume``).

    ``step_callback(epoch, step)`` runs after every optimiser step (tests use it to
    interrupt a run). Raises TrainingDivergedError on a non-finite loss.
    """
    start_state: dict[str, Any] | None = None
    if params.resume:
        run_dir = params.resolve_path(params.resume)
        if not (run_dir / "last.pt").exists():
            raise FileNotFoundError(f"resume: {run_dir / 'last.pt'} does not exist")
        start_state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        saved = load_params(run_dir / "params.yaml")
        params = params_from_dict(saved.to_dict() | {"resume": str(run_dir)},
                                  source=str(run_dir / "params.yaml"))
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
    pin = params.pin_memory and device.type == "cuda"
    train_loader = build_loader(data["train"], params.batch_size, True, params.num_workers,
                                pin, params.seed)
    valid_loader = build_loader(data["valid"], params.batch_size, False, params.num_workers,
                                pin)
    trainer = Trainer(params, model, device, len(train_loader))
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
            "dataset": {"path": str(source.path), "kind": source.kind, "found_by": source.how,
                        "annotations_sha256": dataset_hash(source.path),
                        "images": {k: len(v) for k, v in data.items()}},
            "weights": provenance, "autocast": str(dtype) if dtype else "fp32"})

    print(f"run {run_dir} | {source.kind} data ({len(data['train'])} train / "
          f"{len(data['valid'])} valid at {params.image_size}px) | {params.arch}/"
          f"{params.encoder}, {provenance} | {device}, {dtype or 'fp32'}")
    started = time.perf_counter()
    stop_reason = "max epochs"
    epoch = first_epoch - 1
    for epoch in range(first_epoch, params.epochs + 1):
        if stopper.should_stop:  # a resumed run that had already stopped
            break
        epoch_start = time.perf_counter()
        train_loader.generator.manual_seed(params.seed * 1000 + epoch)
        train_loss, seen, train_seconds = trainer.train_epoch(
            train_loader, epoch, progress, f" of run {run_dir}", step_callback)
        val = validate(trainer.model, valid_loader, trainer.loss_fn, params, device)
        row = {"epoch": epoch, "train_loss": train_loss, **val,
               "lr": trainer.optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - epoch_start,
               "train_img_per_s": seen / train_seconds}
        history.append(row)
        improved = stopper.step(val[params.monitor], epoch)
        state = {"model": trainer.model.state_dict(), "params": params.to_dict(), "epoch": epoch,
                 "metrics": row, "weights": provenance}
        if improved:
            _save_checkpoint(run_dir / "best.pt", state)
        _save_checkpoint(run_dir / "last.pt", state | trainer.state_dict() | {
            "early_stopping": stopper.state_dict(), "history": history})
        _write_history(run_dir / "history.csv", history)
        print(f"epoch {epoch:3d} | train {row['train_loss']:.4f} | val loss "
              f"{val['val_loss']:.4f} iou {val['val_iou']:.4f} dice {val['val_dice']:.4f} | "
              f"lr {row['lr']:.2e} | {row['seconds']:.1f}s ({row['train_img_per_s']:.0f} img/s)"
              f"{' *' if improved else ''}", flush=True)
        if stopper.should_stop:
            break
        if params.max_train_minutes and (
                time.perf_counter() - started > params.max_train_minutes * 60):
            stop_reason = "time limit"
            break
    if stopper.should_stop:
        stop_reason = "early stopping"
    seconds = time.perf_counter() - started
    summary = {"best_epoch": stopper.best_epoch, "best_" + params.monitor: stopper.best,
               "epochs_run": len(history), "stop_reason": stop_reason,
               "train_seconds_this_session": seconds}
    atomic_write_json(run_dir / "train.json", summary)
    print(f"stopped after epoch {epoch} ({stop_reason}); best {params.monitor} "
          f"{stopper.best:.4f} at epoch {stopper.best_epoch}")
    return TrainResult(run_dir, history, stopper.best_epoch, float(stopper.best or 0.0),
                       stop_reason, seconds)
