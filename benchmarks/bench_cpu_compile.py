"""Does anything beat eager PyTorch on a small CPU? torch.compile (inductor) and oneDNN options.

On the ResNet-34 U-Net (random init) at the quick profile's 128 px, batch 16, fp32: the
training step (forward + BCE+Dice + backward + AdamW) and inference, each as

* eager, channels_last (what the trainer does on CPU),
* eager, contiguous (NCHW),
* ``torch.compile`` (inductor, default mode), channels_last; compile time reported apart,
* eager with oneDNN (mkldnn) turned off, to show what it already contributes.

Prints images/s per row; run it alone (nothing else using the cores).

    python benchmarks/bench_cpu_compile.py [--size 128] [--batch 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from brainseg_lib.model.network import build_network
from brainseg_lib.training.losses import build_loss


def timed(fn, steps: int) -> float:
    fn()  # warm-up (and, when compiled, the compilation)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def measure(name: str, size: int, batch: int, steps: int, compiled: bool = False,
            channels_last: bool = True, mkldnn: bool = True) -> None:
    torch.manual_seed(0)
    torch.backends.mkldnn.enabled = mkldnn
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_network("Unet", "resnet34").to(memory_format=fmt)
    run = torch.compile(model) if compiled else model
    loss_fn = build_loss("bce_dice")
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 1, size, size) > 0.97).float()

    def train_step() -> None:
        model.train()
        loss = loss_fn(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer() -> None:
        model.eval()
        run(x)

    t0 = time.perf_counter()
    train_step()
    first_train = time.perf_counter() - t0
    train = timed(train_step, steps)
    t0 = time.perf_counter()
    infer()
    first_infer = time.perf_counter() - t0
    inference = timed(infer, steps)
    extra = (f"  (first calls, incl. compile: train {first_train:.0f} s, inference "
             f"{first_infer:.0f} s)" if compiled else "")
    print(f"{name:34s} train {batch / train:6.2f} img/s   inference {batch / inference:6.2f} "
          f"img/s{extra}", flush=True)
    torch.backends.mkldnn.enabled = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch "
          f"{torch.__version__}, {args.size} px, batch {args.batch}, fp32, {args.steps} steps")
    common = (args.size, args.batch, args.steps)
    measure("eager, channels_last (trainer)", *common)
    measure("eager, contiguous", *common, channels_last=False)
    measure("eager, oneDNN off", *common, mkldnn=False)
    measure("torch.compile (inductor)", *common, compiled=True)


if __name__ == "__main__":
    main()
