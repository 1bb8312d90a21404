"""Score a peer's test predictions (one PNG mask per test image) with brainseg's metric code.

Runs in the project's venv. The truth is read from the COCO files with brainseg's data code,
never from the peer's folders. Scored twice:

* at model resolution (``--size``): truth = brainseg's masks at that size (what its own
  evaluation scores), the peer's mask resized there when it is another size;
* at the source resolution: truth rasterised from the annotations at full size, the peer's
  mask resized up.

Resizing a peer's binary mask follows brainseg's ``resize_mask`` rule (bilinear, then
>= 0.5); brainseg itself resizes probabilities, a peer's PNG holds none.
For each: pooled foreground IoU and Dice, mean image IoU and Dice, fg+bg mIoU, HD95, the
lesion-wise figures (sensitivity, false-positive components, lesion Dice/HD95, PQ), on the
full test split and the clean subset (test images with no near-duplicate in train or
valid, ``brainseg_lib.data.duplicates``), with bootstrap 95 % intervals. With
``--brainseg-run``: brainseg minus peer on the same images, paired bootstrap, at model
resolution (brainseg's per-image table holds that resolution's counts).

Writes ``<out>/per_image.csv`` (model-resolution columns named as in brainseg's own
``per_image.csv``: ``tp_headline`` ..., source ones ``*_source``) and ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from brainseg_lib.data.arrays import load_split_arrays, load_split_lesions
from brainseg_lib.data.coco import dataset_hash, load_split, raise_on_errors
from brainseg_lib.data.duplicates import near_duplicate_groups
from brainseg_lib.data.locate import DataSource
from brainseg_lib.errors import BrainsegError
from brainseg_lib.io import atomic_write, atomic_write_json
from brainseg_lib.metrics.functional import ConfusionCounts, dice, hd95, iou, summarise
from brainseg_lib.metrics.intervals import (
    bootstrap_ci,
    lesion_bootstrap_ci,
    paired_bootstrap,
    paired_lesion_bootstrap,
)
from brainseg_lib.metrics.lesion import FIELDS, image_lesions, lesion_table, summarise_lesions

RUN_PER_IMAGE = Path("eval-test") / "per_image.csv"  # inside a brainseg run directory
LOWER_IS_BETTER = ("fp_components_per_image", "lesion_hd95")


class PeerScoreError(BrainsegError):
    """A peer's predictions or a brainseg table that cannot be scored as asked."""


@dataclass
class Scored:
    """Per-image outcome of one resolution: confusion counts, HD95, lesion tallies."""

    counts: ConfusionCounts
    hd95: np.ndarray
    lesions: dict[str, np.ndarray]
    pred_area: np.ndarray

    def take(self, idx: np.ndarray) -> Scored:
        return Scored(
            self.counts.take(idx),
            self.hd95[idx],
            {k: v[idx] for k, v in self.lesions.items()},
            self.pred_area[idx],
        )


def prediction_paths(
    pred_dir: Path, files: list[str], case_map: dict[str, str] | None
) -> list[Path]:
    """Each test image's mask: ``<case>.png`` through the converter's case map (nnU-Net
    names its outputs by case), else ``<image stem>.png``. Every one must exist."""
    if not pred_dir.is_dir():
        raise PeerScoreError(f"{pred_dir}: no prediction folder there")
    names = (
        [case_map.get(f, "") for f in files]
        if case_map is not None
        else [Path(f).stem for f in files]
    )
    paths = [pred_dir / f"{n}.png" for n in names]
    missing = [
        (p, f) for p, f, n in zip(paths, files, names, strict=True) if not n or not p.is_file()
    ]
    if missing:
        path, file = missing[0]
        raise PeerScoreError(
            f"{pred_dir}: no prediction for {len(missing)} of {len(files)} "
            f"test images (first: {path.name}, for {file})"
        )
    return paths


def read_mask(path: Path) -> np.ndarray:
    """A binary mask PNG as bool (H, W): one channel, values {0,1} (nnU-Net's labels) or
    {0,255}; anything else is refused rather than guessed at."""
    try:
        with Image.open(path) as pil:
            pil.load()
            bands = pil.getbands()
            array = np.asarray(pil)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise PeerScoreError(f"{path}: unreadable mask ({err})") from None
    if len(bands) != 1:
        raise PeerScoreError(f"{path}: not a single-channel mask (mode {''.join(bands)})")
    values = set(np.unique(array).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        raise PeerScoreError(
            f"{path}: values {sorted(values)[:5]} are not a binary mask (0/1 or 0/255)"
        )
    return array > 0


def resize_binary(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A binary mask at ``shape`` (H, W) by brainseg's ``resize_mask`` rule: bilinear
    resampling of 0/255, then >= 128."""
    if mask.shape == tuple(shape):
        return mask
    pil = Image.fromarray(mask.astype(np.uint8) * np.uint8(255))
    pil = pil.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(pil) >= 128


def score_masks(
    preds: list[np.ndarray], truths: list[np.ndarray], lesions: list[np.ndarray]
) -> Scored:
    """Counts (``ConfusionCounts.from_masks``), HD95 and lesion tallies image by image."""
    counts = ConfusionCounts.concat(
        [ConfusionCounts.from_masks(p[None], t[None]) for p, t in zip(preds, truths, strict=True)]
    )
    dists = np.asarray([hd95(p, t) for p, t in zip(preds, truths, strict=True)])
    table = lesion_table([image_lesions(k, p) for k, p in zip(lesions, preds, strict=True)])
    return Scored(counts, dists, table, np.asarray([p.mean() for p in preds]))


def score_model_resolution(data: Path, size: int, masks: list[np.ndarray]) -> Scored:
    """Against brainseg's own test masks and lesions at ``size`` px."""
    arrays = load_split_arrays(data, "test", size)
    lesions = load_split_lesions(data, "test", size)
    preds = [resize_binary(m, (size, size)) for m in masks]
    truths = [np.asarray(arrays.masks[i], bool) for i in range(len(arrays))]
    return score_masks(preds, truths, lesions.lesions)


def score_source_resolution(data: Path, masks: list[np.ndarray]) -> Scored:
    """Against the annotations rasterised at each image's own size."""
    coco = raise_on_errors(load_split(data, "test"))
    shapes = [(int(img["height"]), int(img["width"])) for img in coco.images]
    preds = [resize_binary(m, s) for m, s in zip(masks, shapes, strict=True)]
    truths = [coco.mask(img).astype(bool) for img in coco.images]
    return score_masks(preds, truths, [coco.lesions(img) for img in coco.images])


def metric_block(s: Scored, n_boot: int, seed: int, batch_size: int) -> dict[str, Any]:
    """Every figure of one set of images, with bootstrap 95 % intervals."""
    block = {
        "images": len(s.counts),
        "metrics": summarise(s.counts, batch_size, s.hd95) | summarise_lesions(s.lesions),
    }
    if n_boot and len(s.counts) > 1:
        block["ci95"] = bootstrap_ci(s.counts, s.hd95, n_boot, seed) | lesion_bootstrap_ci(
            s.lesions, n_boot, seed
        )
    return block


def per_image_table(files: list[str], clean: np.ndarray, scored: dict[str, Scored]) -> pd.DataFrame:
    """One row per test image; ``headline`` = model resolution, ``source`` = source size."""
    table = pd.DataFrame({"file": files, "clean": clean})
    for key, s in scored.items():
        c = s.counts
        for name in ("tp", "fp", "fn", "tn"):
            table[f"{name}_{key}"] = getattr(c, name)
        table[f"iou_{key}"] = iou(c.tp, c.fp, c.fn)
        table[f"dice_{key}"] = dice(c.tp, c.fp, c.fn)
        table[f"hd95_{key}"] = s.hd95
        table[f"pred_area_fraction_{key}"] = s.pred_area
        for name in FIELDS:
            table[f"{name}_{key}"] = s.lesions[name]
    return table


def brainseg_table(path: Path) -> pd.DataFrame:
    """A brainseg run's test per-image table (a run directory, or the CSV itself)."""
    csv = path / RUN_PER_IMAGE if path.is_dir() else path
    if not csv.is_file():
        raise PeerScoreError(f"{csv}: no per-image table (evaluate the run on test first)")
    table = pd.read_csv(csv)
    need = {"file", "tp_headline", "fp_headline", "fn_headline"}
    if not need <= set(table.columns):
        raise PeerScoreError(
            f"{csv}: lacks {sorted(need - set(table.columns))} (a per-image "
            "table of brainseg's evaluation has them)"
        )
    return table


def _counts(table: pd.DataFrame) -> ConfusionCounts:
    tp, fp, fn = (table[f"{k}_headline"].to_numpy(np.int64) for k in ("tp", "fp", "fn"))
    return ConfusionCounts(tp, fp, fn, np.zeros(len(table), np.int64))


def _lesions(table: pd.DataFrame) -> dict[str, np.ndarray] | None:
    if not all(f"{k}_headline" in table for k in FIELDS):
        return None
    return {k: table[f"{k}_headline"].to_numpy(float) for k in FIELDS}


def paired_rows(
    brainseg: pd.DataFrame, peer: pd.DataFrame, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """brainseg minus peer on the test images both scored, full and clean, with paired
    bootstrap intervals and a verdict. Refuses tables whose truth differs (another size,
    other data): each image's tumour pixels (TP + FN) must agree."""
    ours, theirs = peer.set_index("file"), brainseg.set_index("file")
    common = [f for f in ours.index if f in theirs.index]
    ours, theirs = ours.loc[common], theirs.loc[common]
    truth = [(t.tp_headline + t.fn_headline).to_numpy() for t in (ours, theirs)]
    differ = int((truth[0] != truth[1]).sum())
    if not common or differ:
        raise PeerScoreError(
            f"brainseg's table and the peer's share {len(common)} test "
            f"images, {differ} with other tumour pixel counts: score the "
            "peer at the run's image_size (--size) on the same data"
        )
    rows = []
    subsets = (
        ("full", np.arange(len(common))),
        ("clean", np.flatnonzero(ours["clean"].to_numpy(bool))),
    )
    for subset, idx in subsets:
        if len(idx) < 2:
            continue
        a, b = ours.iloc[idx], theirs.iloc[idx]
        diffs = paired_bootstrap(_counts(a), _counts(b), n_boot, seed)
        if _lesions(b) is not None:
            diffs |= paired_lesion_bootstrap(_lesions(a), _lesions(b), n_boot, seed)
        rows += [_verdict(subset, len(idx), metric, *d) for metric, d in diffs.items()]
    return rows


def _verdict(
    subset: str, n: int, metric: str, diff: float, low: float, high: float
) -> dict[str, Any]:
    sign = -1 if metric in LOWER_IS_BETTER else 1
    gain_low, gain_high = sorted((sign * low, sign * high))
    verdict = (
        "brainseg better"
        if gain_low > 0
        else "peer better"
        if gain_high < 0
        else "no clear difference"
    )
    return {
        "subset": subset,
        "images": n,
        "metric": metric,
        "brainseg_minus_peer": diff,
        "ci95_low": low,
        "ci95_high": high,
        "verdict": verdict,
    }


def clean_flags(data: Path, files: list[str], bits: int) -> np.ndarray:
    """Which test images have no near-duplicate in train or valid (brainseg's clean subset)."""
    groups = near_duplicate_groups(DataSource(data, "real", "peer scoring"), bits)
    clean = set(groups["clean_test"])
    return np.array([f in clean for f in files])


def read_case_map(path: Path) -> dict[str, str]:
    """Test file -> case id, from the converter's ``case_map.json``."""
    try:
        cases = json.loads(path.read_text())["cases"]
        return {c["file"]: c["case"] for c in cases if c["split"] == "test"}
    except FileNotFoundError:
        raise PeerScoreError(f"{path}: no case map there (made by nnunet_convert.py)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise PeerScoreError(f"{path}: not a case map (expected {{'cases': [...]}})") from None


def score(args: argparse.Namespace) -> dict[str, Any]:
    """Score, write ``per_image.csv`` and ``summary.json``; returns the summary."""
    coco = raise_on_errors(load_split(args.data, "test"))
    files = [str(img["file_name"]) for img in coco.images]
    case_map = read_case_map(args.case_map) if args.case_map else None
    masks = [read_mask(p) for p in prediction_paths(args.pred, files, case_map)]
    clean = clean_flags(args.data, files, args.duplicate_bits)
    scored = {
        "headline": score_model_resolution(args.data, args.size, masks),
        "source": score_source_resolution(args.data, masks),
    }
    table = per_image_table(files, clean, scored)
    summary: dict[str, Any] = {
        "peer": args.peer,
        "predictions": str(args.pred),
        "data": {"path": str(args.data), "annotations_sha256": dataset_hash(args.data)},
        "test_images": len(files),
        "model_resolution_px": args.size,
        "clean_test": {
            "images": int(clean.sum()),
            "definition": "test images with no "
            f"near-duplicate (pHash within {args.duplicate_bits} bits, "
            "transitively) in train or valid",
        },
        "mask_resizing": "bilinear on the binary mask, then >= 0.5 (brainseg's resize_mask)",
    }
    for key, name in (("headline", "model_resolution"), ("source", "source_resolution")):
        s = scored[key]
        summary[name] = {
            "full": metric_block(s, args.bootstrap, args.seed, args.batch_size),
            "clean": metric_block(
                s.take(np.flatnonzero(clean)), args.bootstrap, args.seed, args.batch_size
            ),
        }
    if args.brainseg_run:
        summary["paired_brainseg_minus_peer"] = {
            "brainseg": str(args.brainseg_run),
            "resolution_px": args.size,
            "rows": paired_rows(
                brainseg_table(args.brainseg_run), table, args.bootstrap, args.seed
            ),
        }
    if args.timings:
        summary["timings"] = json.loads(args.timings.read_text())
    atomic_write(args.out / "per_image.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_json(args.out / "summary.json", summary)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    m = summary["model_resolution"]["full"]["metrics"]
    c = summary["model_resolution"]["clean"]["metrics"]
    return (
        f"{summary['peer']}: {summary['test_images']} test images at "
        f"{summary['model_resolution_px']} px | pooled IoU {m['pooled_iou']:.4f} | mean "
        f"image Dice {m['mean_image_dice']:.4f} | fg+bg mIoU {m['fg_bg_miou']:.4f} | "
        f"lesion sensitivity {m['lesion_sensitivity']:.3f} | FP components/image "
        f"{m['fp_components_per_image']:.3f} | clean ({summary['clean_test']['images']}): "
        f"pooled IoU {c['pooled_iou']:.4f}, image Dice {c['mean_image_dice']:.4f}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pred", required=True, type=Path, help="folder of the peer's PNG masks")
    p.add_argument("--data", required=True, type=Path, help="the COCO dataset folder")
    p.add_argument("--out", required=True, type=Path, help="where the tables go")
    p.add_argument("--size", type=int, default=128, help="model resolution to score at (px)")
    p.add_argument(
        "--case-map",
        type=Path,
        help="nnunet_convert.py's case_map.json, when masks are named by case id",
    )
    p.add_argument("--peer", default="peer", help="the peer's name in the summary")
    p.add_argument(
        "--brainseg-run",
        type=Path,
        help="a brainseg run directory (or its "
        "eval-test/per_image.csv): paired brainseg minus peer",
    )
    p.add_argument("--timings", type=Path, help="the peer's timings.json, copied in")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="batch of the batch-pooled IoU (brainseg's quick profile: 16)",
    )
    p.add_argument(
        "--duplicate-bits",
        type=int,
        default=4,
        help="pHash distance of the clean subset (brainseg's default: 4)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.size < 32:
        parser().error(f"--size {args.size}: the model resolution to score at, in px")
    if args.brainseg_run and args.bootstrap < 1:
        parser().error("--brainseg-run needs --bootstrap >= 1 (the paired intervals)")
    try:
        summary = score(args)
    except BrainsegError as err:
        print(f"score: {err}", file=sys.stderr)
        return 2
    print(summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
