"""The MONAI peer: the plain 2D network a MONAI user would write in an afternoon, on
brainseg's arrays and training budget.

MONAI's ``BasicUNet`` (2D, one grey input channel, one output logit, its default features),
``DiceCELoss`` (sigmoid), Adam at 1e-3 with a cosine decay over the wall-clock budget,
MONAI's own transforms at the magnitudes of brainseg's ``quick`` profile (horizontal flip
0.5, rotation 10 degrees, scale 0.1, shift 0.05, intensity 0.1), batch 16; the weights
of the best validation IoU are kept (brainseg's ``monitor: val_iou``). Validation runs
once per epoch inside the budget.

Runs in ``.venv-monai`` (``make_venv.sh monai``) with the repository on PYTHONPATH for
brainseg's data reading (``load_split_arrays``: the exact decoded and resized arrays brainseg
trains on). Writes into ``--out``: ``pred_notta/`` and ``pred_tta/`` (horizontal-flip
averaging; brainseg's TTA uses flips too), one PNG mask {0,1} per test image named
``<image stem>.png``; ``model.pt`` (a state dict); ``timings.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import set_determinism
from PIL import Image

from brainseg_lib.data.arrays import SplitArrays, load_split_arrays
from brainseg_lib.errors import BrainsegError


def samples(arrays: SplitArrays) -> list[dict[str, np.ndarray]]:
    """One dict per image: grey image in [0, 1] and its mask, each (1, S, S) float32."""
    return [
        {
            "image": np.asarray(arrays.images[i][:1], np.float32) / 255.0,
            "label": np.asarray(arrays.masks[i][None], np.float32),
        }
        for i in range(len(arrays))
    ]


def augmentation(size: int) -> Compose:
    """MONAI's transforms at the quick profile's magnitudes."""
    keys = ["image", "label"]
    return Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandAffined(
                keys,
                prob=1.0,
                rotate_range=math.radians(10),
                scale_range=0.1,
                translate_range=0.05 * size,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd("image", factors=0.1, prob=1.0),
            RandShiftIntensityd("image", offsets=0.1, prob=1.0),
        ]
    )


def iou_of(model: torch.nn.Module, loader: DataLoader) -> float:
    """Pooled foreground IoU at threshold 0.5 (the validation figure brainseg monitors)."""
    model.eval()
    tp = fp = fn = 0
    with torch.no_grad():
        for batch in loader:
            pred = model(batch["image"]) >= 0
            truth = batch["label"] > 0.5
            tp += int((pred & truth).sum())
            fp += int((pred & ~truth).sum())
            fn += int((~pred & truth).sum())
    model.train()
    return tp / (tp + fp + fn) if tp + fp + fn else 1.0


def train(
    model: torch.nn.Module, train_loader: DataLoader, valid_loader: DataLoader, budget_s: float
) -> dict:
    """Epochs until the budget is spent; the learning rate follows a cosine over the
    clock; the best validation IoU's weights are loaded back at the end."""
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start, best, epochs, iterations, images = time.monotonic(), (-1.0, 0, None), 0, 0, 0
    while time.monotonic() - start < budget_s:
        for batch in train_loader:
            spent = min(1.0, (time.monotonic() - start) / budget_s)
            if spent >= 1.0:
                break
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * spent))
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch["image"]), batch["label"]).backward()
            optimizer.step()
            iterations += 1
            images += len(batch["image"])
        epochs += 1
        score = iou_of(model, valid_loader)
        if score > best[0]:
            best = (score, epochs, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return {
        "train_seconds": time.monotonic() - start,
        "epochs": epochs,
        "iterations": iterations,
        "train_images": images,
        "best_valid_iou": best[0],
        "best_epoch": best[1],
    }


def predict(model: torch.nn.Module, arrays: SplitArrays, out: Path) -> dict[str, float]:
    """Write each test image's mask without and with flip TTA; seconds taken by each."""
    model.eval()
    seconds = {}
    for name, tta in (("notta", False), ("tta", True)):
        folder = out / f"pred_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with torch.no_grad():
            for item, file in zip(samples(arrays), arrays.files, strict=True):
                x = torch.from_numpy(item["image"])[None]
                prob = torch.sigmoid(model(x))
                if tta:
                    prob = (prob + torch.sigmoid(model(x.flip(-1))).flip(-1)) / 2
                mask = (prob[0, 0] >= 0.5).numpy().astype(np.uint8)
                Image.fromarray(mask).save(folder / f"{Path(file).stem}.png")
        seconds[f"predict_{name}"] = time.monotonic() - start
    return seconds


def run(args: argparse.Namespace) -> dict:
    """Load, train for the budget, predict, record; returns the timings record."""
    set_determinism(args.seed)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    data = {s: load_split_arrays(args.data, s, args.size) for s in ("train", "valid", "test")}
    loaders = (
        DataLoader(
            Dataset(samples(data["train"]), augmentation(args.size)),
            batch_size=16,
            shuffle=True,
            num_workers=0,
        ),
        DataLoader(Dataset(samples(data["valid"])), batch_size=32, num_workers=0),
    )
    load_s = time.monotonic() - start
    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1)
    record = train(model, *loaders, args.minutes * 60)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "model.pt")
    seconds = {"load_data": load_s, "train": record.pop("train_seconds")}
    seconds |= predict(model, data["test"], args.out)
    n_test = len(data["test"])
    return {
        "peer": "monai",
        "network": "BasicUNet(spatial_dims=2, in_channels=1, out_channels=1)",
        "size": args.size,
        "seed": args.seed,
        "budget_minutes": args.minutes,
        "threads": args.threads,
        "seconds": seconds,
        **record,
        "train_images_per_s": record["train_images"] / seconds["train"],
        "test_images": n_test,
        "predict_notta_images_per_s": n_test / seconds["predict_notta"],
        "predict_tta_images_per_s": n_test / seconds["predict_tta"],
        "versions": {p: md.version(p) for p in ("monai", "torch", "numpy")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="the COCO dataset folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=15.0, help="training budget")
    p.add_argument("--size", type=int, default=128, help="brainseg's arrays at this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    try:
        record = run(args)
    except BrainsegError as err:
        print(f"monai_unet: {err}", file=sys.stderr)
        return 2
    (args.out / "timings.json").write_text(json.dumps(record, indent=2))
    print(
        f"monai: {record['epochs']} epochs, {record['iterations']} iterations in "
        f"{record['seconds']['train']:.0f} s; best valid IoU {record['best_valid_iou']:.4f}"
        f" (epoch {record['best_epoch']}); masks under {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
