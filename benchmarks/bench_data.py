"""Data-layer speed on the real dataset: cold load (decode + resize + cache write), warm
load (from the disk cache), and one epoch of training batches with no model. Prints figures.

    BRAINSEG_DATA=../shared/data/brain-tumor-coco python benchmarks/bench_data.py [--size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from brainseg_lib.config import Params
from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.coco import SPLITS
from brainseg_lib.data.locate import resolve_data
from brainseg_lib.model.network import Normalizer
from brainseg_lib.training.augment import BatchAugment
from brainseg_lib.training.batches import ResidentBatches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-img-per-s", type=float, default=4.5,
                    help="model training speed to compare an epoch of batches against")
    args = ap.parse_args()
    source = resolve_data()
    print(f"data: {source.kind} ({source.path}) at {args.size}px")
    with tempfile.TemporaryDirectory() as cache:
        total, t0 = 0, time.perf_counter()
        for split in SPLITS:
            total += len(load_split_arrays(source.path, split, args.size, cache,
                                           use_memory=False))
        cold = time.perf_counter() - t0
        print(f"cold load : {total} images in {cold:6.2f} s = {total / cold:7.1f} img/s "
              "(decode + resize + cache write)")
        t0 = time.perf_counter()
        for split in SPLITS:
            load_split_arrays(source.path, split, args.size, cache, use_memory=False)
        warm = time.perf_counter() - t0
        print(f"warm load : {total} images in {warm:6.2f} s = {total / warm:7.1f} img/s "
              "(disk cache, checksums verified)")
        t0 = time.perf_counter()
        train = load_split_arrays(source.path, "train", args.size, cache, use_memory=False)
        print(f"warm load of the train split ({len(train)} images): "
              f"{time.perf_counter() - t0:.2f} s")

    params = Params(augment=True)
    augment = BatchAugment(params)
    import torch

    cpu = torch.device("cpu")
    normalize = Normalizer(params.normalize_mean, params.normalize_std, cpu)
    for with_aug in (False, True):
        batches = ResidentBatches(train, cpu, args.batch_size, shuffle=True)
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for images, masks in batches:
            x = images.float() / 255
            if with_aug:
                x, _ = augment(x, masks.float(), gen)
            normalize(x)
        seconds = time.perf_counter() - t0
        epoch_training = len(train) / args.train_img_per_s
        print(f"one epoch of batches{' + augmentation' if with_aug else ''}: {seconds:.2f} s "
              f"= {100 * seconds / epoch_training:.2f} % of an epoch's training at "
              f"{args.train_img_per_s} img/s ({epoch_training:.0f} s)")


if __name__ == "__main__":
    main()
