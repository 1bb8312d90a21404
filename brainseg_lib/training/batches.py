"""Training batches: a split held on the device when it fits, else streamed from the
memory-mapped cache.

Resident: the whole split (0.26 MB an image at 256 px) sits on the training device as uint8,
so a batch is one index-gather: no DataLoader, no worker processes, no host-to-device copy
per step. Streamed: each batch is gathered from the memory-mapped arrays
(:mod:`brainseg_lib.data.arrays`) into a pinned buffer on a background thread, one batch
ahead, and copied to the GPU without blocking; the host holds a batch or two, not the split.
Both serve the same indices in the same order, so under one seed they give identical batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from brainseg_lib.config import ParamsError
from brainseg_lib.data.arrays import SplitArrays, read_rows

DEVICE_SHARE = 0.5  # a split is made resident when it takes at most this share of free memory


class _Order:
    """The batch order both kinds serve: one seeded ``randperm`` per epoch when shuffling.

    Training drops the ragged last batch, so every step has the same shape (what
    ``torch.compile`` and cuDNN's autotuner want); evaluation keeps every image. Under data
    parallelism every rank draws the same order and serves its own slice (``rank::world``)
    of each global batch of ``batch_size``: nothing is padded or repeated.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int,
                 world: int):
        if batch_size % world:
            raise ParamsError(f"batch_size {batch_size} must be divisible by the {world} "
                             "data-parallel processes")
        self.n, self.shuffle = n, shuffle
        self.batch_size = min(batch_size, n)
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.shuffle else -(-self.n // self.batch_size)

    def indices(self) -> Iterator[torch.Tensor]:
        """Each batch's indices (CPU tensors), this rank's share."""
        order = (torch.randperm(self.n, generator=self.generator) if self.shuffle
                 else torch.arange(self.n))
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]


class ResidentBatches(_Order):
    """A split held as uint8 tensors on the training device, served as index-gathered
    batches."""

    def __init__(self, arrays: SplitArrays, device: torch.device, batch_size: int,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1):
        super().__init__(len(arrays), batch_size, shuffle, seed, rank, world)
        self.images = torch.as_tensor(_writable(arrays.images), device=device)
        self.masks = torch.as_tensor(_writable(arrays.masks), device=device).unsqueeze(1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.indices():
            idx = idx.to(self.images.device)
            yield self.images[idx], self.masks[idx]


def _writable(array: np.ndarray) -> np.ndarray:
    """The array itself when torch may share it, else a copy (a read-only memory map)."""
    return array if array.flags.writeable else np.array(array)


class StreamedBatches(_Order):
    """A split read batch by batch from (memory-mapped) host arrays: gathered one batch
    ahead on a thread (numpy's copy releases the GIL), into pinned memory on CUDA, and
    copied to the device without blocking."""

    def __init__(self, arrays: SplitArrays, device: torch.device, batch_size: int,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1):
        super().__init__(len(arrays), batch_size, shuffle, seed, rank, world)
        self.arrays, self.device = arrays, device
        self.pin = device.type == "cuda"

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = idx.numpy()
        images = torch.from_numpy(read_rows(self.arrays.images, rows))  # not through the map
        masks = torch.from_numpy(read_rows(self.arrays.masks, rows))
        if self.pin:
            images, masks = images.pin_memory(), masks.pin_memory()
        return images, masks.unsqueeze(1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with ThreadPoolExecutor(1) as pool:
            batches = self.indices()
            ahead = pool.submit(self._gather, next(batches)) if len(self) else None
            while ahead is not None:
                images, masks = ahead.result()
                following = next(batches, None)
                ahead = pool.submit(self._gather, following) if following is not None else None
                yield (images.to(self.device, non_blocking=self.pin),
                       masks.to(self.device, non_blocking=self.pin))


def split_bytes(arrays: SplitArrays) -> int:
    return int(arrays.images.nbytes + arrays.masks.nbytes)


def fits_on_device(arrays: SplitArrays, device: torch.device) -> bool:
    """Whether a split can live on ``device``: CUDA's free memory, measured now (the model,
    activations and the other split need the rest). The CPU reads the memory-mapped cache
    instead of copying it."""
    if device.type != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info(device)
    return split_bytes(arrays) <= DEVICE_SHARE * free


def make_batches(arrays: SplitArrays, device: torch.device, batch_size: int,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world: int = 1,
                 ) -> ResidentBatches | StreamedBatches:
    """Resident batches where the split fits on the device, streamed ones elsewhere."""
    cls = ResidentBatches if fits_on_device(arrays, device) else StreamedBatches
    return cls(arrays, device, batch_size, shuffle, seed, rank, world)
