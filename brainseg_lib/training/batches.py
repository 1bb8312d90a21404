"""Decoded, resized splits held in memory, cached on disk, and served as torch datasets.

Decoding 640x640 JPEGs dominates data time, so each split is decoded and resized once per
image size and stored as uint8 arrays (``.npy``) under the cache directory, keyed by a hash
of the annotation file, the image files' sizes and mtimes, and the target size. A manifest
holding CRC32 checksums is written last: a missing, stale or corrupt cache is detected,
reported and rebuilt, never used.
"""

from __future__ import annotations

import torch

from brainseg_lib.data.arrays import SplitArrays


class ResidentBatches:
    """A split held as uint8 tensors on the training device, served as index-gathered batches.

    Same order as a DataLoader shuffled with the same generator (one ``randperm`` per epoch).
    Training drops the ragged last batch, so every step has the same shape (what
    ``torch.compile`` and cuDNN's autotuner want); evaluation keeps every image. Under
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

    def __iter__(self):
        if self.shuffle:
            # the same draws as a shuffled DataLoader: a base seed for its workers, then the
            # permutation, so both paths serve the same batches for the same seed
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.arange(self.n)
        order = order.to(self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size][self.rank::self.world]
            yield self.images[idx], self.masks[idx]
