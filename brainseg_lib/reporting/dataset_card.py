"""Dataset card material for notebook 01: per-split tables and the annotation boxes' geometry.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainseg_lib.data.coco import SPLITS, is_rectangle, load_split, raise_on_errors


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
