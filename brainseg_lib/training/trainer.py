"""One training step and everything it needs: optimiser, schedule, early stopping, weight
EMA, compile, validation.

The split lives on the training device as uint8 when it fits (else it is streamed from the
memory-mapped cache, :mod:`.batches`) and batches are augmented there: no DataLoader and no
host sync inside an epoch (the loss is checked once per epoch). On CUDA the step is
compiled (``compile``); it runs in the precision resolved once for the run (bf16 on CUDA;
on the CPU, bf16 only where the CPU has native bf16 and a probe of this network finds it
faster: :mod:`brainseg_lib.model.device`), and validation through the predictor in the
same; under torchrun it is wrapped in DistributedDataParallel (:mod:`.distributed`).
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from brainseg_lib.config import Params
from brainseg_lib.errors import BrainsegError
from brainseg_lib.inference.predictor import LoadedModel, predict_logits
from brainseg_lib.metrics.functional import ConfusionCounts, pooled_dice, pooled_iou
from brainseg_lib.model.device import (
    Precision,
    Probe,
    resolve_precision,
    time_precisions,
)
from brainseg_lib.model.forward import ForwardPass, place_model, probe_batch
from brainseg_lib.training.augment import BatchAugment, PatchSampler
from brainseg_lib.training.batches import ResidentBatches, StreamedBatches
from brainseg_lib.training.distributed import DistContext, from_main, wrap
from brainseg_lib.training.losses import build_loss, per_image_loss


class TrainingDivergedError(BrainsegError, RuntimeError):
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

    def next_epoch_overruns(self, epoch_seconds: float) -> bool:
        """Another epoch of ``epoch_seconds`` would end more than half an epoch past the
        budget (always true once the budget is spent): stop now, so a run ends within half
        an epoch of its budget (on a slow CPU an epoch can be minutes)."""
        return bool(self.budget) and self.elapsed + 0.5 * epoch_seconds > self.budget

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


@torch.no_grad()
def validate(model: nn.Module, batches: ResidentBatches | StreamedBatches, loss_fn: nn.Module,
             params: Params, device: torch.device, precision: Precision | None = None,
             ) -> dict[str, float]:
    """Mean loss per image (the loss of each image on its own, as at test time) and pooled
    IoU/Dice at threshold ``params.threshold``, in fp32.

    The logits come from the predictor (as nnU-Net validates through its predictor), so
    validation scores exactly what inference will compute, in the training's precision."""
    model.eval()
    loaded = LoadedModel([model], params, device, 0, "validation", precision=precision)
    total = torch.zeros((), device=device)
    counts = []
    for images, masks in batches:
        logits = predict_logits(loaded, images)
        y = masks.float()
        total += per_image_loss(loss_fn, logits, y).sum()
        counts.append(ConfusionCounts.from_masks(torch.sigmoid(logits) >= params.threshold, y))
    stats = ConfusionCounts.concat(counts)
    return {"val_loss": total.item() / len(stats), "val_iou": pooled_iou(stats),
            "val_dice": pooled_dice(stats)}


def training_probe(model: nn.Module, params: Params, device: torch.device,
                   loss_fn: nn.Module) -> Probe:
    """Seconds per forward + backward step in fp32 and bf16 of a copy of the network (its
    weights, BatchNorm statistics and the random generators untouched) on a batch of the
    training's shape (patches where it trains on patches), at most ``PROBE_BATCH`` images."""
    def measure() -> dict[str, float]:
        net = copy.deepcopy(model).train()
        x = probe_batch(params, device, params.patch_size or params.image_size,
                        params.batch_size)
        y = (x[:, :1] > x[:, :1].median()).float()  # half foreground, whatever the normalisation

        def step(dtype: torch.dtype | None) -> None:
            with Precision(dtype).context(device):
                logits = net(x)
            loss_fn(logits.float(), y).backward()
            net.zero_grad(set_to_none=True)

        return time_precisions(step)

    return measure


def _progress(iterable: Any, total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=1.0,
                file=sys.stderr)


def use_compile(params: Params, device: torch.device) -> bool:
    """``compile`` auto = on CUDA only; asked for on the CPU it is ignored with a message.
    On a small CPU the compile time costs more of a short budget than inductor gains (the
    figures: ``benchmarks/README.md``, ``bench_cpu_compile.py``)."""
    if params.compile == "auto":
        return device.type == "cuda"
    if params.compile and device.type != "cuda":
        print("note: compile: true is ignored on the CPU (eager mode is used: compiling costs "
              "more than it saves there)", file=sys.stderr)
        return False
    return bool(params.compile)


class Trainer:
    """Model, optimiser, schedule, loss and optional weight EMA for one run; one call trains
    one epoch."""

    def __init__(self, params: Params, model: nn.Module, device: torch.device,
                 steps_per_epoch: int, ctx: DistContext | None = None):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.params, self.device = params, device
        self.ctx = ctx or DistContext()
        self.model = place_model(model, device, params.channels_last)
        self.loss_fn = build_loss(params.loss)
        self.precision = from_main(self.ctx, resolve_precision(  # one choice for all ranks
            params, device, training_probe(self.model, params, device, self.loss_fn)))
        self.forward_pass = ForwardPass.build(params, device, self.precision)
        # EMA of the plain (uncompiled) module, buffers included (BatchNorm statistics)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(
            params.ema_decay), use_buffers=True) if params.ema else None
        self.compiled = use_compile(params, device)
        self.wrapped = wrap(self.model, self.ctx, device)  # DDP under torchrun
        self.forward = torch.compile(self.wrapped) if self.compiled else self.wrapped
        self.compile_seconds = 0.0
        self.optimizer = build_optimizer(params, self.model, device)
        self.schedule = Schedule(params, steps_per_epoch)
        self.scaler = torch.amp.GradScaler(enabled=self.precision.autocast == torch.float16)
        self.augment = BatchAugment(params) if params.augment else None
        self.patches = PatchSampler(params.patch_size, params.fg_oversample) \
            if params.patch_size else None

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
        if self.patches:
            images, masks = self.patches(images, masks, aug_gen)
        x, y = images.float() / 255.0, masks.float()
        if self.augment:
            x, y = self.augment(x, y, aug_gen)
        logits = self.forward_pass.logits(self.forward, self.forward_pass.prepare(x))
        loss = self.loss_fn(logits, y)
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
            self.compiled, self.forward = False, self.wrapped
            loss = self._step(images, masks, aug_gen)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - t0 if self.compiled else 0.0
        return loss

    def train_epoch(self, batches: ResidentBatches | StreamedBatches, epoch: int,
                    progress: bool = False, where: str = "",
                    step_callback: Callable[[int, int], None] | None = None,
                    ) -> tuple[float, int, float]:
        """One pass over ``batches``: (mean loss per image, images timed, seconds); a
        compiling first step is neither timed nor counted in the throughput.

        Nothing here waits for the GPU: the loss is summed on the device and read (and
        checked for NaN) once, at the end of the epoch.
        """
        self.model.train()
        aug_gen = torch.Generator(self.device).manual_seed(
            self.params.seed * 1000 + epoch + 104729 * self.ctx.rank)  # its own per rank
        live_clock = not self.ctx.enabled  # under DDP the clock advances per epoch, from rank 0
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
            if live_clock:
                self.schedule.elapsed = base + time.perf_counter() - t0
            if step_callback:
                step_callback(epoch, step)
        total = running.item()
        if not math.isfinite(total):
            raise TrainingDivergedError(
                f"non-finite loss in epoch {epoch}{where}; the last good checkpoint is kept "
                "(last.pt). Lower lr, set grad_clip, or use amp: bf16.")
        return total / max(seen, 1), timed, max(time.perf_counter() - t0, 1e-9)
