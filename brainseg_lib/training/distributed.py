"""Data-parallel training under ``torchrun``: DistributedDataParallel on NCCL (GPUs) or gloo.

``torchrun --nproc_per_node=N -m brainseg_lib.cli train --params FILE`` (and torchrun's
usual ``--nnodes``/``--rdzv-*`` flags across machines) starts N copies of the ordinary
trainer; this module tells each copy who it is. The global batch (``batch_size``) is split
across ranks, every rank draws the same batch order and takes its own slice of each batch,
so nothing is padded or repeated; rank 0 alone validates (on the whole validation split),
decides when to stop, and writes checkpoints, history and logs.

When to prefer it: one big run that should finish sooner on several GPUs or machines. For
folds and sweeps of this small 2D net, one run per GPU (``brainseg cv``/``sweep``) keeps
every GPU busy with no gradient traffic, as nnU-Net recommends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_choice: str) -> DistContext:
    """The process group torchrun describes in the environment (a single process: none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_choice != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistContext(rank, world, local_rank)


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """Each rank's own GPU (LOCAL_RANK) on CUDA."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def from_main(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (decisions such as stopping must agree)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DDP around ``model`` (the caller converts BatchNorm to SyncBatchNorm on CUDA first)."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def finish(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
