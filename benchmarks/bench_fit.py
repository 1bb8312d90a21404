"""Non-square inputs: squash to the model's square vs pad to a square, on real test crops.

The dataset's images are all 640x640, so both ways agree on it; users bring other shapes.
This cuts one non-square window from every image of a split (landscape and portrait in turn,
short side 320-480 px, seeded, the tumour box inside), predicts it both ways with a model,
resizes the probabilities back onto the crop and scores them there (threshold 0.5, no TTA):
pooled foreground IoU and mean per-image Dice, with bootstrap 95 % intervals and the paired
difference. The choice is made on valid (the default split), test is reported beside it;
``brainseg predict`` pads, the better one.

    BRAINSEG_DATA=../shared/data/brain-tumor-coco python benchmarks/bench_fit.py \
        [--model models/reference] [--split valid|test] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from brainseg_lib.data.arrays import resize_image
from brainseg_lib.data.coco import load_split, read_image
from brainseg_lib.inference.predictor import LoadedModel, load_model, predict_images, predict_logits
from brainseg_lib.metrics.functional import ConfusionCounts, per_image_dice, pooled_iou
from brainseg_lib.metrics.intervals import bootstrap_ci, paired_bootstrap


def crops(data_dir: str, split_name: str, limit: int, seed: int = 0):
    """(crop RGB, crop mask) per image: a window holding the whole tumour box."""
    rng = np.random.default_rng(seed)
    split = load_split(data_dir, split_name)
    for n, img in enumerate(split.images[:limit or None]):
        rgb, _ = read_image(split, img)
        mask = split.mask(img)
        h, w = mask.shape
        short = int(rng.choice([320, 400, 480]))
        ch, cw = (short, w) if n % 2 == 0 else (h, short)
        ys, xs = np.nonzero(mask)
        y0 = _offset(rng, h, ch, ys)
        x0 = _offset(rng, w, cw, xs)
        yield rgb[y0:y0 + ch, x0:x0 + cw], mask[y0:y0 + ch, x0:x0 + cw]


def _offset(rng: np.random.Generator, full: int, size: int, coords: np.ndarray) -> int:
    if len(coords) == 0 or coords.max() - coords.min() + 1 > size:
        return int(rng.integers(0, full - size + 1))
    low, high = max(0, coords.max() + 1 - size), min(coords.min(), full - size)
    return int(rng.integers(low, high + 1))


def squash(loaded: LoadedModel, rgb: np.ndarray) -> np.ndarray:
    """The alternative: resize the image to the model's square, then back."""
    x = torch.from_numpy(resize_image(rgb, loaded.params.image_size))[None]
    prob = torch.sigmoid(predict_logits(loaded, x))
    return F.interpolate(prob, size=rgb.shape[:2], mode="bilinear",
                         align_corners=False)[0, 0].cpu().numpy()


def pad(loaded: LoadedModel, rgb: np.ndarray) -> np.ndarray:
    """What ``brainseg predict`` does (pad to a centred black square)."""
    return predict_images(loaded, [rgb])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/reference")
    ap.add_argument("--data", default=os.environ.get("BRAINSEG_DATA", ""))
    ap.add_argument("--split", default="valid", help="choose on valid; test is reported")
    ap.add_argument("--limit", type=int, default=0, help="first N images (0 = all)")
    args = ap.parse_args()
    if not args.data:
        raise SystemExit("set BRAINSEG_DATA or --data to the real dataset")
    loaded = load_model(args.model, "auto")
    counts: dict[str, list[ConfusionCounts]] = {"squash": [], "pad": []}
    t0, shapes = time.perf_counter(), set()
    for rgb, mask in crops(args.data, args.split, args.limit):
        shapes.add("landscape" if rgb.shape[1] > rgb.shape[0] else "portrait")
        for name, fit in (("squash", squash), ("pad", pad)):
            pred = fit(loaded, rgb) >= 0.5
            counts[name].append(ConfusionCounts.from_masks(pred[None], mask[None]))
    n = len(counts["squash"])
    print(f"{n} non-square {args.split} crops ({', '.join(sorted(shapes))}), model {args.model} "
          f"({loaded.params.image_size} px), {loaded.device}, {time.perf_counter() - t0:.0f} s")
    joined = {k: ConfusionCounts.concat(v) for k, v in counts.items()}
    for name, c in joined.items():
        ci = bootstrap_ci(c, n_resamples=1000)
        print(f"  {name:6s} pooled IoU {pooled_iou(c):.4f} [{ci['pooled_iou'][0]:.3f}, "
              f"{ci['pooled_iou'][1]:.3f}]  mean image Dice {per_image_dice(c).mean():.4f} "
              f"[{ci['mean_image_dice'][0]:.3f}, {ci['mean_image_dice'][1]:.3f}]")
    for metric, (diff, low, high) in paired_bootstrap(joined["squash"], joined["pad"]).items():
        print(f"  pad - squash, {metric}: {diff:+.4f} [{low:+.4f}, {high:+.4f}] (paired)")


if __name__ == "__main__":
    main()
