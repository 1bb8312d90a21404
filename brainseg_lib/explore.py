"""Dataset card material for notebook 01: per-split tables, box geometry, duplicates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from brainseg_lib.coco import SPLITS, is_rectangle, load_split, raise_on_errors
from brainseg_lib.dataset import SplitArrays


def annotation_table(root: str | Path) -> pd.DataFrame:
    """One row per annotation: split, file, box geometry as fractions of the image."""
    rows = []
    for split in SPLITS:
        coco = raise_on_errors(load_split(root, split))
        for img in coco.images:
            w, h = float(img["width"]), float(img["height"])
            for ann in coco.annotations_of(img):
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                rows.append({"split": split, "file": img["file_name"],
                             "category": str(ann.get("category_id")),
                             "rectangle": is_rectangle(ann),
                             "area_fraction": bw * bh / (w * h),
                             "width_fraction": bw / w, "height_fraction": bh / h,
                             "centre_x": (x + bw / 2) / w, "centre_y": (y + bh / 2) / h})
    return pd.DataFrame(rows)


def split_table(root: str | Path) -> pd.DataFrame:
    """Images, annotations, sizes and empty images per split."""
    rows = []
    for split in SPLITS:
        coco = raise_on_errors(load_split(root, split))
        counts = [len(coco.annotations_of(i)) for i in coco.images]
        sizes = sorted({f"{i['width']}x{i['height']}" for i in coco.images})
        rows.append({"split": split, "images": len(coco.images), "annotations": sum(counts),
                     "images without annotation": counts.count(0),
                     "images with 2+ annotations": sum(c > 1 for c in counts),
                     "image sizes": ", ".join(sizes),
                     "categories": ", ".join(f"{c['id']}:{c['name']} ({c.get('supercategory')})"
                                             for c in coco.categories)})
    return pd.DataFrame(rows).set_index("split")


def near_duplicates(arrays: dict[str, SplitArrays], max_distance: int = 4) -> pd.DataFrame:
    """Pairs of images in *different* splits whose 64-bit perceptual hashes (pHash) differ
    in at most ``max_distance`` bits: likely the same slice, a leak between splits."""
    import imagehash

    names, splits, hashes = [], [], []
    for split, a in arrays.items():
        for file, img in zip(a.files, a.images, strict=True):
            h = imagehash.phash(Image.fromarray(img[0]))
            names.append(file)
            splits.append(split)
            hashes.append(np.packbits(h.hash.ravel()))
    bits = np.unpackbits(np.stack(hashes), axis=1).astype(bool)
    split_arr = np.asarray(splits)
    rows = []
    for i in range(len(bits)):
        other = np.flatnonzero(split_arr[i + 1:] != split_arr[i]) + i + 1
        if not len(other):
            continue
        dist = (bits[other] != bits[i]).sum(1)
        for j, d in zip(other[dist <= max_distance], dist[dist <= max_distance], strict=True):
            rows.append({"split_a": splits[i], "file_a": names[i], "split_b": splits[j],
                         "file_b": names[j], "hamming": int(d)})
    return pd.DataFrame(rows, columns=["split_a", "file_a", "split_b", "file_b", "hamming"])
