"""Data that need not fit in memory: the memory-mapped cache and streamed batches."""

import numpy as np
import torch

from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.training.batches import (
    ResidentBatches,
    StreamedBatches,
    make_batches,
)


def test_the_cache_is_memory_mapped_and_holds_the_decoded_split(synthetic_root, cache_dir):
    mapped = load_split_arrays(synthetic_root, "train", 64, cache_dir, use_memory=False)
    assert isinstance(mapped.images, np.memmap) and isinstance(mapped.masks, np.memmap)
    assert not mapped.images.flags.writeable
    in_memory = load_split_arrays(synthetic_root, "train", 64, cache_dir, use_memory=False,
                                  mmap=False)
    assert not isinstance(in_memory.images, np.memmap)
    assert np.array_equal(mapped.images, in_memory.images)
    assert np.array_equal(mapped.masks, in_memory.masks) and mapped.masks.any()
    # built without a cache file first: decoded straight into the memory-mapped files
    fresh = load_split_arrays(synthetic_root, "train", 64, cache_dir / "new", use_memory=False)
    assert np.array_equal(fresh.images, in_memory.images)


def test_streamed_and_resident_batches_are_identical_under_one_seed(synthetic_root,
                                                                    cache_dir):
    arrays = load_split_arrays(synthetic_root, "train", 64, cache_dir, use_memory=False)
    cpu = torch.device("cpu")
    for kwargs in ({"shuffle": True, "seed": 7}, {"shuffle": False},
                   {"shuffle": True, "seed": 7, "rank": 1, "world": 2}):
        resident = ResidentBatches(arrays, cpu, 6, **kwargs)
        streamed = StreamedBatches(arrays, cpu, 6, **kwargs)
        assert len(resident) == len(streamed) > 1
        for epoch in (1, 2):  # the loop re-seeds each epoch; both draw the same order
            resident.generator.manual_seed(epoch)
            streamed.generator.manual_seed(epoch)
            pairs = list(zip(resident, streamed, strict=True))
            assert len(pairs) == len(resident)
            for (ri, rm), (si, sm) in pairs:
                assert ri.dtype == si.dtype == torch.uint8 and rm.shape == sm.shape
                assert torch.equal(ri, si) and torch.equal(rm, sm)
    # the whole split is served once per epoch when nothing is dropped
    seen = torch.cat([i for i, _ in StreamedBatches(arrays, cpu, 5)])
    assert torch.equal(seen, torch.from_numpy(np.array(arrays.images)))


def test_the_cpu_streams_from_the_memory_map(synthetic_root, cache_dir):
    arrays = load_split_arrays(synthetic_root, "valid", 64, cache_dir, use_memory=False)
    assert isinstance(make_batches(arrays, torch.device("cpu"), 4), StreamedBatches)


def test_rows_read_from_the_cache_file_equal_the_mapped_rows(synthetic_root, cache_dir):
    """Batches are read with plain file reads (the map's pages would count in RSS): any
    order, runs of consecutive rows, repeats; a slice of a map falls back to indexing."""
    from brainseg_lib.data.arrays import read_rows

    mapped = load_split_arrays(synthetic_root, "train", 64, cache_dir, use_memory=False)
    for rows in ([5, 2, 3, 4, 15, 0, 1], [7, 7, 8], list(range(16)), []):
        for array in (mapped.images, mapped.masks):
            got = read_rows(array, np.asarray(rows, dtype=np.int64))
            assert not isinstance(got, np.memmap) and got.flags.writeable
            assert got.shape == (len(rows), *array.shape[1:])
            assert np.array_equal(got, np.asarray(array)[rows])
    part = mapped.images[4:12]  # a view: its rows are not at the file's own offsets
    assert np.array_equal(read_rows(part, np.array([3, 0])), np.asarray(part)[[3, 0]])
