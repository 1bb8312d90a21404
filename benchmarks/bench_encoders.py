"""Networks sized for the machine: training and inference speed of smp encoders (and timm's
through smp's ``tu-`` names), decoder widths and input sizes, on this machine's CPU threads.

What is faster per step is not always better per minute of training: this table says what
each costs; `brainseg sweep` decides what is worth it. Prints a markdown table, each row
with the CPU's native-bf16 flags (``avx512_bf16``, ``amx_bf16``: without them bf16 is
emulated); ``--bf16`` adds the same step in bf16 autocast beside fp32.

    python benchmarks/bench_encoders.py [--threads 2] [--steps 4] [--bf16]
        [--encoders resnet34 ...] [--half-decoder] [--sizes 128 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from brainseg_lib.model.device import Precision, cpu_bf16_flags
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


def speeds(model: torch.nn.Module, batch: int, size: int, steps: int,
           precision: Precision) -> tuple[float, float]:
    """Images per second of a full training step (forward, BCE + Dice, backward, AdamW) and
    of inference, channels_last, in ``precision`` (the loss in fp32, as the trainer does)."""
    cpu = torch.device("cpu")
    loss_fn, opt = build_loss("bce_dice"), torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, size, size) > 0.97).float()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with precision.context(cpu):
            logits = model(x)
        loss_fn(logits.float(), y).backward()
        opt.step()

    model.train()
    step()  # warm-up: oneDNN picks its kernels
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train = batch * steps / (time.perf_counter() - t0)
    model.eval()
    with torch.inference_mode(), precision.context(cpu):
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        infer = batch * steps / (time.perf_counter() - t0)
    return train, infer


def measure(encoder: str, widths: list[int] | None, size: int, batch: int, steps: int,
            bf16: bool) -> dict[str, float]:
    """fp32 (and with ``bf16`` also bf16 autocast) training and inference images/s."""
    model = build_network("Unet", encoder, 3, None, widths).to(memory_format=torch.channels_last)
    train, infer = speeds(model, batch, size, steps, Precision(None))
    row = {"encoder": encoder, "decoder": "half" if widths else "default", "size": size,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "train_img_s": train, "infer_img_s": infer}
    if bf16:
        row["train_img_s_bf16"], row["infer_img_s_bf16"] = speeds(
            model, batch, size, steps, Precision(torch.bfloat16))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    ap.add_argument("--encoders", nargs="*", help="only these encoders (default: all)")
    ap.add_argument("--half-decoder", choices=("yes", "no"),
                    help="only the half-width (yes) or smp's default decoder (no)")
    ap.add_argument("--sizes", nargs="*", type=int,
                    help="these input sizes instead of each network's own list")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    flags = " ".join(cpu_bf16_flags()) or "none"
    print(f"CPU threads {args.threads}, batch {args.batch}, {args.steps} timed steps, "
          f"channels_last; native bf16 flags: {flags}; torch", torch.__version__)
    bf16_head = " train img/s bf16 | inference img/s bf16 |" if args.bf16 else ""
    print(f"| CPU bf16 flags | encoder | decoder | px | M params | train img/s fp32 | "
          f"inference img/s fp32 |{bf16_head} 1,502-image epoch fp32 (s) |")
    print("|---" * (8 + 2 * args.bf16) + "|")
    rows = []
    for encoder, widths, sizes in CONFIGS:
        if args.encoders and encoder not in args.encoders:
            continue
        if args.half_decoder and (widths is not None) != (args.half_decoder == "yes"):
            continue
        for size in args.sizes or sizes:
            r = measure(encoder, widths, size, args.batch, args.steps, args.bf16)
            rows.append(r | {"cpu_bf16_flags": flags})
            bf16 = (f" {r['train_img_s_bf16']:.1f} | {r['infer_img_s_bf16']:.1f} |"
                    if args.bf16 else "")
            print(f"| {flags} | {encoder} | {r['decoder']} | {size} | {r['params_m']:.1f} | "
                  f"{r['train_img_s']:.1f} | {r['infer_img_s']:.1f} |{bf16} "
                  f"{1502 / r['train_img_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
