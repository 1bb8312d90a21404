"""Where training time goes: the bare model step next to the full trainer step.

*Bare*: random normalised tensors already on the device, forward + loss + backward +
optimiser step (same batch, dtype, channels_last and compile as the trainer). *Trainer*:
``Trainer.train_epoch`` over the device-resident split (index gather, augmentation,
normalisation, schedule, EMA if asked). With ``--streamed``, the trainer step again over
batches streamed from host memory (pinned, one batch ahead: what a split too large for
the device gets) instead of the device-resident split. Inference: bare forward vs
``predict_split`` (host arrays in, probabilities out). Prints one table; ``--json`` writes
it too.

    python benchmarks/bench_train.py --steps 10                         # CPU, 2 threads
    python benchmarks/bench_train.py --device cuda --batches 16 32 64 --compile-batch 32
    python benchmarks/bench_train.py --device cuda --batches 64 --streamed
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from brainseg_lib.config import Params
from brainseg_lib.data.arrays import SplitArrays, load_split_arrays
from brainseg_lib.data.locate import resolve_data
from brainseg_lib.evaluation.predictions import predict_split
from brainseg_lib.inference.predictor import LoadedModel
from brainseg_lib.model.device import select_device
from brainseg_lib.model.network import build_network
from brainseg_lib.training.batches import ResidentBatches, StreamedBatches
from brainseg_lib.training.trainer import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def repeat_to(arrays: SplitArrays, n: int) -> SplitArrays:
    idx = np.arange(n) % len(arrays)
    return SplitArrays(arrays.name, [arrays.files[i] for i in idx], arrays.images[idx],
                       arrays.masks[idx], [arrays.source_sizes[i] for i in idx])


def bench_one(arrays: SplitArrays, device: torch.device, batch: int, steps: int, size: int,
              encoder: str, compiled: bool, augment: bool, ema: bool,
              streamed: bool = False) -> dict[str, float]:
    params = Params(profile="bench", image_size=size, batch_size=batch, encoder=encoder,
                    device=device.type, augment=augment, compile=compiled, ema=ema,
                    loss="bce_dice", optimizer="adamw", scheduler="cosine", epochs=100)
    data = repeat_to(arrays, batch * steps)
    batches = ResidentBatches(data, device, batch, shuffle=True)
    trainer = Trainer(params, build_network("Unet", encoder), device, len(batches))
    run = trainer.forward_pass  # the trainer's own precision and memory format
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.97).float()

    def bare_step() -> None:
        loss = trainer.loss_fn(run.logits(trainer.forward, x), y)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    trainer.model.train()
    t0 = time.perf_counter()
    bare_step()  # compiles when compiled
    sync(device)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        bare_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        bare_step()
    sync(device)
    bare_train = batch * steps / (time.perf_counter() - t0)

    trainer.schedule.step_count = 1  # the graph is compiled: no first-step handling
    trainer.train_epoch(batches, 0)  # warm-up (augmentation kernels, allocator)
    _, seen, seconds = trainer.train_epoch(batches, 1)
    trainer_train = seen / seconds
    trainer_streamed = float("nan")
    if streamed:
        stream = StreamedBatches(data, device, batch, shuffle=True)
        trainer.train_epoch(stream, 2)  # warm-up: pinned buffers, the gather thread
        _, seen, seconds = trainer.train_epoch(stream, 3)
        trainer_streamed = seen / seconds

    model = trainer.model.eval()
    with torch.no_grad():
        for _ in range(2):
            run.logits(model, x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            run.logits(model, x)
        sync(device)
    bare_infer = batch * steps / (time.perf_counter() - t0)
    loaded = LoadedModel([model], params, device, 0, precision=trainer.precision)
    predict_split(loaded, data, tta=False, batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    predict_split(loaded, data, tta=False, batch_size=batch)
    pipe_infer = len(data) / (time.perf_counter() - t0)
    return {"batch": batch, "compiled": compiled, "compile_s": compile_s if compiled else 0.0,
            "bare_train": bare_train, "trainer_train": trainer_train,
            "train_ratio": trainer_train / bare_train, "trainer_streamed": trainer_streamed,
            "bare_infer": bare_infer,
            "pipeline_infer": pipe_infer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[16])
    ap.add_argument("--compile-batch", type=int, nargs="*", default=[],
                    help="batch sizes also measured with torch.compile (CUDA)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--no-augment", action="store_true", help="trainer without augmentation")
    ap.add_argument("--ema", action="store_true", help="trainer with weight EMA")
    ap.add_argument("--streamed", action="store_true",
                    help="also time the trainer on batches streamed from host memory")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    torch.backends.cudnn.benchmark = True
    gpu = f"{torch.cuda.get_device_name()}, " if device.type == "cuda" else ""
    source = resolve_data(args.data_dir)
    arrays = load_split_arrays(source.path, "train", args.size)
    print(f"device {device} ({gpu}{torch.get_num_threads()} threads), Unet/{args.encoder} at "
          f"{args.size}px, {'bf16' if device.type == 'cuda' else 'fp32'}, channels_last, "
          f"{args.steps} steps; data: {source.kind}, augmentation "
          f"{'off' if args.no_augment else 'on'}, EMA {'on' if args.ema else 'off'}",
          flush=True)
    rows = []
    plan = [(b, False) for b in args.batches] + [(b, True) for b in args.compile_batch]
    for batch, compiled in plan:
        rows.append(bench_one(arrays, device, batch, args.steps, args.size, args.encoder,
                              compiled, not args.no_augment, args.ema, args.streamed))
        r = rows[-1]
        print(f"  batch {batch} {'compiled' if compiled else 'eager'}: train bare "
              f"{r['bare_train']:.0f}, trainer {r['trainer_train']:.0f} img/s", flush=True)
    print(f"{'batch':>5} {'mode':>8} {'compile s':>9} {'train bare':>10} {'trainer':>8} "
          f"{'ratio':>6} {'streamed':>8} {'infer bare':>10} {'pipeline':>8}")
    for r in rows:
        print(f"{r['batch']:5d} {'compiled' if r['compiled'] else 'eager':>8} "
              f"{r['compile_s']:9.1f} {r['bare_train']:10.1f} {r['trainer_train']:8.1f} "
              f"{r['train_ratio']:6.2f} {r['trainer_streamed']:8.1f} {r['bare_infer']:10.1f} "
              f"{r['pipeline_infer']:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "gpu": gpu.strip(", "), "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
