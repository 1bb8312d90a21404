"""Training and inference throughput of the U-Net at 256 px: the full pipeline (cached
data -> DataLoader -> device-side normalisation/augmentation -> Trainer step) next to the
bare model step on random tensors already on the device. Prints images/s.

    python benchmarks/bench_train.py                      # CPU, 2 threads, real data if found
    python benchmarks/bench_train.py --device cuda --batch-size 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from brainseg_lib.config import Params
from brainseg_lib.dataset import build_loader, load_split_arrays
from brainseg_lib.evaluate import predict_split
from brainseg_lib.locate import resolve_data
from brainseg_lib.model import create_model
from brainseg_lib.modeling.predict import LoadedModel
from brainseg_lib.modeling.train import Trainer, autocast_dtype, select_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--augment", action="store_true", help="include the augmentation")
    ap.add_argument("--data-dir", default="")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    params = Params(profile="bench", image_size=args.size, batch_size=args.batch_size,
                    encoder=args.encoder, device=device.type, augment=args.augment,
                    data_dir=args.data_dir)
    dtype = autocast_dtype(params, device)
    n_images = args.batch_size * args.steps
    gpu = f"{torch.cuda.get_device_name()}, " if device.type == "cuda" else ""
    print(f"device {device} ({gpu}{torch.get_num_threads()} threads), {params.arch}/"
          f"{params.encoder} at {args.size}px, batch {args.batch_size}, {dtype or 'fp32'}, "
          f"channels_last, {args.steps} steps")

    source = resolve_data(args.data_dir)
    arrays = load_split_arrays(source.path, "train", args.size)
    arrays = arrays.subset(np.arange(min(len(arrays), n_images)))
    print(f"data: {source.kind} ({source.path}), {len(arrays)} images")

    model, _ = create_model(params.arch, params.encoder, "none")
    trainer = Trainer(params, model, device, args.steps)

    # bare step: random normalised input already on the device
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(args.batch_size, 1, args.size, args.size, device=device) > 0.97).float()

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = trainer.model(x)
        loss = trainer.loss_fn(logits.float(), y)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    trainer.model.train()
    for _ in range(3):
        bare_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        bare_step()
    sync(device)
    bare_train = n_images / (time.perf_counter() - t0)

    loader = build_loader(arrays, args.batch_size, train=True)
    trainer.train_epoch(loader, 0)  # warm-up epoch
    _, seen, seconds = trainer.train_epoch(loader, 1)
    pipe_train = seen / seconds

    trainer.model.eval()
    with torch.no_grad():
        for _ in range(2):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                trainer.model(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                trainer.model(x)
        sync(device)
    bare_infer = n_images / (time.perf_counter() - t0)
    loaded = LoadedModel(trainer.model, params, device, 0)
    predict_split(loaded, arrays, tta=False, batch_size=args.batch_size)  # warm-up
    t0 = time.perf_counter()
    predict_split(loaded, arrays, tta=False, batch_size=args.batch_size)
    pipe_infer = len(arrays) / (time.perf_counter() - t0)

    print(f"{'':10} {'bare img/s':>11} {'pipeline img/s':>15} {'overhead':>9}")
    for name, bare, pipe in (("train", bare_train, pipe_train),
                             ("inference", bare_infer, pipe_infer)):
        print(f"{name:10} {bare:11.1f} {pipe:15.1f} {100 * (bare / pipe - 1):8.1f}%")


if __name__ == "__main__":
    main()
