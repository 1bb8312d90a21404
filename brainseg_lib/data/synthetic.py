"""A small synthetic COCO dataset with the real one's layout, for tests and the offline demo.

Grey, MRI-like slices (a textured head ellipse inside a bright skull ring) with bright
elliptical "tumours"; each tumour's annotation is its exact bounding rectangle written as a
closed 5-point polygon, as in the Roboflow export of the real data. Seeded and vectorised:
a few hundred 128x128 images take about a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from brainseg_lib.data.coco import ANNOTATION_FILE, SPLITS

CATEGORIES = [
    {"id": 0, "name": "Tumor", "supercategory": "none"},
    {"id": 1, "name": "0", "supercategory": "Tumor"},
    {"id": 2, "name": "1", "supercategory": "Tumor"},
]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = (rng.random((cells, cells)) * 255).astype(np.uint8)
    pil = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(pil, np.float32) / 255.0


def synthetic_slice(rng: np.random.Generator, size: int,
                    n_tumours: int) -> tuple[np.ndarray, list[list[int]]]:
    """One grey uint8 slice and the [x0, y0, x1, y1] boxes (exclusive ends) of its tumours."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.normal(0, size * 0.03, 2)
    ry, rx = size * rng.uniform(0.36, 0.44), size * rng.uniform(0.30, 0.38)
    radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    brain = radius < 0.93
    skull = (radius >= 0.93) & (radius < 1.0)
    img = 0.03 + 0.02 * rng.standard_normal((size, size)).astype(np.float32)
    texture = 0.25 + 0.2 * _smooth_noise(rng, size, 8) + 0.08 * _smooth_noise(rng, size, 24)
    img[brain] += texture[brain]
    img[skull] += 0.7
    boxes = []
    for _ in range(n_tumours):
        ty = cy + rng.uniform(-0.5, 0.5) * ry
        tx = cx + rng.uniform(-0.5, 0.5) * rx
        a, b = size * rng.uniform(0.05, 0.12), size * rng.uniform(0.05, 0.12)
        blob = ((yy - ty) / a) ** 2 + ((xx - tx) / b) ** 2 <= 1.0
        img[blob] += rng.uniform(0.35, 0.5)
        rows, cols = np.nonzero(blob)
        boxes.append([int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1])
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), boxes


def _rectangle_annotation(ann_id: int, image_id: int, box: list[int]) -> dict:
    x0, y0, x1, y1 = box
    return {
        "id": ann_id, "image_id": image_id, "category_id": 1 + ann_id % 2, "iscrowd": 0,
        "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
        "segmentation": [[x1, y0, x0, y0, x0, y1, x1, y1, x1, y0]],
    }


def write_synthetic_coco(out_dir: str | Path, counts: tuple[int, int, int] = (96, 24, 24),
                         size: int = 128, seed: int = 0) -> Path:
    """Write train/valid/test splits of MRI-like slices with exact box annotations."""
    out_dir = Path(out_dir)
    for split_index, (split, count) in enumerate(zip(SPLITS, counts, strict=True)):
        rng = np.random.default_rng([seed, split_index])
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            n_tumours = int(rng.choice([0, 1, 2], p=[0.05, 0.9, 0.05]))
            grey, boxes = synthetic_slice(rng, size, n_tumours)
            name = f"synthetic_{split}_{i:04d}.jpg"
            Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(folder / name,
                                                                         quality=95)
            images.append({"id": i, "file_name": name, "width": size, "height": size})
            for box in boxes:
                annotations.append(_rectangle_annotation(len(annotations), i, box))
        coco = {"info": {"description": "brainseg synthetic demo data"},
                "categories": CATEGORIES, "images": images, "annotations": annotations}
        (folder / ANNOTATION_FILE).write_text(json.dumps(coco))
    return out_dir


def ensure_synthetic_coco(out_dir: str | Path, counts: tuple[int, int, int] = (96, 24, 24),
                          size: int = 128, seed: int = 0) -> Path:
    """Generate once per (counts, size, seed) into ``out_dir``; complete or absent, never half.

    Safe when several processes (a sweep's runs) ask at once: each writes its own temporary
    folder, the first rename wins and the others discard theirs.
    """
    import tempfile

    out_dir = Path(out_dir)
    if (out_dir / ".complete").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write_synthetic_coco(tmp, counts, size, seed)
        (tmp / ".complete").touch()
        tmp.chmod(0o755)
        if out_dir.exists() and not (out_dir / ".complete").exists():
            shutil.rmtree(out_dir, ignore_errors=True)  # a half-written folder of old code
        try:
            tmp.rename(out_dir)
        except OSError:  # another process finished first
            if not (out_dir / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
