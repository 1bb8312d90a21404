"""Training batches served from the device: a split held there as uint8 tensors.

The whole split (0.26 MB an image at 256 px) sits on the training device, so a batch is one
index-gather: no DataLoader, no worker processes, no host-to-device copy per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from brainseg_lib.data.arrays import SplitArrays


class ResidentBatches:
    """A split held as uint8 tensors on the training device, served as index-gathered batches.

    One seeded ``randperm`` per epoch when shuffling. Training drops the ragged last batch,
    so every step has the same shape (what ``torch.compile`` and cuDNN's autotuner want);
    evaluation keeps every image. Under
    data parallelism every rank draws the same order and serves its own slice
    (``rank::world``) of each global batch of ``batch_size``: nothing is padded or repeated.
    """

    def __init__(self, arrays: SplitArrays, device: torch.device, batch_size: int,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {world} "
                             "data-parallel processes")
        self.images = torch.from_numpy(arrays.images).to(device)
        self.masks = torch.from_numpy(arrays.masks).unsqueeze(1).to(device)
        self.n, self.shuffle = len(arrays), shuffle
        self.batch_size = min(batch_size, self.n)
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.shuffle else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.arange(self.n)
        order = order.to(self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]
            yield self.images[idx], self.masks[idx]
