"""nnU-Net v2 trained for a wall-clock budget instead of a fixed number of epochs.

nnU-Net ships fixed-epoch trainers only (1000 epochs of 250 iterations); brainseg's profiles
train for a time budget (``train_minutes``), so the comparison needs nnU-Net on the same
clock. ``nnUNetTrainerBudget`` changes only the schedule and the stop:

* the budget is ``BRAINSEG_PEER_MINUTES`` (required), counted from the first training
  iteration (data loading set-up and unpacking before it are recorded apart);
* nnU-Net's poly learning rate, ``initial_lr * (1 - progress) ** 0.9``, is applied before
  every iteration with progress = the larger of the budget spent and the iterations done
  out of the epoch cap (stock: by epoch), so it reaches ~0 at the deadline;
* training stops at the first iteration boundary past the deadline; the epoch it ends
  keeps its validation, logging and best-checkpoint step, then nnU-Net's usual end
  (``checkpoint_final.pth``), so ``nnUNetv2_predict`` works unchanged;
* ``budget.json`` in the fold folder records the budget, the time spent in set-up, training
  and the final validation, epochs and iterations bought, and the plan that ran.

Only importable where nnunetv2 is installed (``make_venv.sh nnunet``); nnU-Net finds it
through ``nnUNet_extTrainer`` pointing at this folder (it imports every module here, so
this folder holds nothing else). Everything else is stock nnU-Net.
"""

from __future__ import annotations

import json
import os
import time
from os.path import join

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

BUDGET_ENV = "BRAINSEG_PEER_MINUTES"
RECORD_FILE = "budget.json"
CUDA = torch.device("cuda")  # nnU-Net's default device in every trainer's signature


def budget_seconds() -> float:
    """The training budget from ``BRAINSEG_PEER_MINUTES``; a clear error when unset or bad."""
    raw = os.environ.get(BUDGET_ENV, "")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = float("nan")
    if not minutes > 0:
        raise RuntimeError(f"{BUDGET_ENV}={raw!r}: set it to the training budget in minutes")
    return minutes * 60


class TimePolyLR:
    """nnU-Net's poly schedule over a deadline: progress is time spent over the budget, or
    iterations done over the cap, whichever is further along."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        initial_lr: float,
        budget_s: float,
        max_iterations: int,
        exponent: float = 0.9,
    ):
        self.optimizer, self.initial_lr, self.exponent = optimizer, initial_lr, exponent
        self.budget_s, self.max_iterations = budget_s, max_iterations
        self.started: float | None = None
        self.iterations = 0

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def expired(self) -> bool:
        return self.elapsed() >= self.budget_s or self.iterations >= self.max_iterations

    def progress(self) -> float:
        return min(1.0, max(self.elapsed() / self.budget_s, self.iterations / self.max_iterations))

    def step(self, current_step: int | None = None) -> None:
        """Set the learning rate for the next iteration. nnU-Net also calls this with the
        epoch at each epoch start; the epoch is not used, the clock is."""
        lr = self.initial_lr * (1 - self.progress()) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 (nnU-Net's trainer naming)
    """nnUNetTrainer on a wall-clock budget (see the module docstring)."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = CUDA,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = budget_seconds()
        self.record: dict = {"budget_minutes": self.budget_s / 60, "budget_env": BUDGET_ENV}

    def configure_optimizers(self):
        optimizer, _ = super().configure_optimizers()  # stock SGD, momentum 0.99, Nesterov
        cap = self.num_epochs * self.num_iterations_per_epoch
        return optimizer, TimePolyLR(optimizer, self.initial_lr, self.budget_s, cap)

    def run_training(self) -> None:
        setup_start = time.monotonic()
        self.on_train_start()
        self.record["setup_seconds"] = time.monotonic() - setup_start
        self.lr_scheduler.start()
        while self.current_epoch < self.num_epochs and not self.lr_scheduler.expired():
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = []
            for i in range(self.num_iterations_per_epoch):
                if i and self.lr_scheduler.expired():
                    break
                self.lr_scheduler.step()
                outputs.append(self.train_step(next(self.dataloader_train)))
                self.lr_scheduler.iterations += 1
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [
                    self.validation_step(next(self.dataloader_val))
                    for _ in range(self.num_val_iterations_per_epoch)
                ]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self._record_training()
        self.on_train_end()

    def _record_training(self) -> None:
        sched = self.lr_scheduler
        self.record |= {
            "train_seconds": sched.elapsed(),
            "epochs": self.current_epoch,
            "iterations": sched.iterations,
            "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "stopped_by": "budget" if sched.elapsed() >= sched.budget_s else "epoch cap",
            "final_lr": self.optimizer.param_groups[0]["lr"],
            "plan": {
                "configuration": self.configuration_name,
                "patch_size": list(self.configuration_manager.patch_size),
                "batch_size": self.batch_size,
                "stages": len(
                    self.configuration_manager.network_arch_init_kwargs.get(
                        "features_per_stage", []
                    )
                ),
                "deep_supervision": self.enable_deep_supervision,
            },
            "device": str(self.device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        }
        self._write_record()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation on the valid split, timed apart from the budget."""
        start = time.monotonic()
        super().perform_actual_validation(save_probabilities)
        self.record["final_validation_seconds"] = time.monotonic() - start
        self._write_record()

    def _write_record(self) -> None:
        if self.local_rank == 0:
            path = join(self.output_folder, RECORD_FILE)
            with open(path + ".tmp", "w") as f:
                json.dump(self.record, f, indent=2)
            os.replace(path + ".tmp", path)
