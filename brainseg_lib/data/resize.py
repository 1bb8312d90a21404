"""``brainseg data resize``: a resized copy of a COCO dataset (either layout), with its
provenance, e.g. to carry a small copy to a GPU machine. Never commit the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from brainseg_lib.data.coco import (
    ANNOTATION_FILE,
    SPLITS,
    DatasetError,
    dataset_hash,
    image_key,
    load_split,
    read_image,
    read_json_text,
)
from brainseg_lib.io import atomic_write_text
from brainseg_lib.rundir import PROVENANCE_FILE


def _scale_annotation(ann: dict[str, Any], fx: float, fy: float) -> dict[str, Any]:
    out = dict(ann)
    if "bbox" in ann:
        x, y, w, h = ann["bbox"]
        out["bbox"] = [round(x * fx, 3), round(y * fy, 3), round(w * fx, 3), round(h * fy, 3)]
    if "area" in ann:
        out["area"] = ann["area"] * fx * fy
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        out["segmentation"] = [[round(v * (fx if i % 2 == 0 else fy), 3)
                                for i, v in enumerate(poly)] for poly in segm]
    return out


def _resize_rle(ann: dict[str, Any], height: int, width: int, size: int) -> dict[str, Any]:
    """An RLE annotation re-rasterised at ``size`` (mask resampled by area, 0.5 threshold)."""
    from pycocotools import mask as mask_utils

    from brainseg_lib.data.arrays import resize_mask
    from brainseg_lib.data.coco import annotation_mask

    small = resize_mask(annotation_mask(ann, height, width), size)
    rle = mask_utils.encode(np.asfortranarray(small))
    out = dict(ann, segmentation={"size": [size, size], "counts": rle["counts"].decode()})
    out["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    out["area"] = float(small.sum())
    return out


def resize_dataset(src: str | Path, dst: str | Path, size: int, grey: bool = False,
                   quality: int = 92) -> Path:
    """Write a copy of a COCO dataset (either layout) with every image resized to
    ``size`` x ``size`` px and its annotations scaled, in Roboflow's layout, plus
    ``provenance.json`` naming the source dataset's hash (runs trained on the copy record it).

    Used to carry a small copy of the data to a GPU machine; never commit the result.
    """
    src, dst = Path(src), Path(dst)
    for name in SPLITS:
        split = load_split(src, name)
        if split.errors:
            raise DatasetError(split.errors)
        (dst / name).mkdir(parents=True, exist_ok=True)
        data = read_json_text(split.annotation_file)
        scale, sizes = {}, {}
        for img in data["images"]:
            rgb, _ = read_image(split, img)
            pil = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
            img["file_name"] = Path(str(img["file_name"]).replace("\\", "/")).name
            (pil.convert("L") if grey else pil).save(dst / name / img["file_name"],
                                                     quality=quality)
            scale[image_key(img["id"])] = (size / int(img["width"]), size / int(img["height"]))
            sizes[image_key(img["id"])] = (int(img["height"]), int(img["width"]))
            img["width"], img["height"] = size, size
        data["annotations"] = [
            _resize_rle(a, *sizes[image_key(a["image_id"])], size)
            if isinstance(a.get("segmentation"), dict)
            else _scale_annotation(a, *scale[image_key(a["image_id"])])
            for a in data["annotations"]]
        atomic_write_text(dst / name / ANNOTATION_FILE, json.dumps(data))  # after its images
    atomic_write_text(dst / PROVENANCE_FILE, json.dumps({
        "source": str(src.resolve()), "source_annotations_sha256": dataset_hash(src),
        "size": size, "grey": grey, "jpeg_quality": quality}, indent=2))
    return dst
