"""Networks sized for the machine: training and inference speed of smp encoders (and timm's
through smp's ``tu-`` names), decoder widths and input sizes, on this machine's CPU threads.

What is faster per step is not always better per minute of training: this table says what
each costs; `brainseg sweep` decides what is worth it. Prints a markdown table.

    python benchmarks/bench_encoders.py [--threads 2] [--steps 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from brainseg_lib.model.network import build_network
from brainseg_lib.training.losses import build_loss

CONFIGS = [  # (encoder, decoder widths or None for smp's default, input sizes)
    ("resnet34", None, (96, 128, 160, 192)),
    ("resnet34", [128, 64, 32, 16, 8], (128, 192)),
    ("resnet18", None, (96, 128, 160, 192)),
    ("resnet18", [128, 64, 32, 16, 8], (128, 192)),
    ("tu-mobilenetv3_large_100", None, (128, 192)),
    ("tu-mobilenetv3_large_100", [128, 64, 32, 16, 8], (128,)),
    ("tu-efficientnet_lite0", None, (128, 192)),
    ("tu-regnety_004", None, (128, 192)),
]


def measure(encoder: str, widths: list[int] | None, size: int, batch: int, steps: int,
            ) -> dict[str, float]:
    """Images per second of a full training step (forward, BCE + Dice, backward, AdamW) and
    of inference, channels_last in fp32 as the trainer runs on a CPU."""
    model = build_network("Unet", encoder, 3, None, widths).to(memory_format=torch.channels_last)
    loss_fn, opt = build_loss("bce_dice"), torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size) > 0.97).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    model.train()
    step()  # warm-up: oneDNN picks its kernels
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train = batch * steps / (time.perf_counter() - t0)
    model.eval()
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        infer = batch * steps / (time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"encoder": encoder, "decoder": "half" if widths else "default", "size": size,
            "params_m": params, "train_img_s": train, "infer_img_s": infer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU threads {args.threads}, batch {args.batch}, {args.steps} timed steps, fp32, "
          "channels_last; torch", torch.__version__)
    print("| encoder | decoder | px | M params | train img/s | inference img/s | "
          "1,502-image epoch (s) |\n|---|---|---|---|---|---|---|")
    rows = []
    for encoder, widths, sizes in CONFIGS:
        for size in sizes:
            r = measure(encoder, widths, size, args.batch, args.steps)
            rows.append(r)
            print(f"| {encoder} | {r['decoder']} | {size} | {r['params_m']:.1f} | "
                  f"{r['train_img_s']:.1f} | {r['infer_img_s']:.1f} | "
                  f"{1502 / r['train_img_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
