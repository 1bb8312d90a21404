"""Dataset tools behind ``brainseg data``: a full check report, and a resized copy."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from brainseg_lib.coco import (
    ANNOTATION_FILE,
    SPLITS,
    DatasetError,
    Issue,
    detect_layout,
    image_key,
    is_rectangle,
    load_split,
    read_image,
    read_json_text,
)
from brainseg_lib.runs import dataset_hash

POLICY = """\
Errors make a split unusable: missing split folder or annotation file, malformed JSON, JSON
that is not COCO, image listed but missing, unreadable or truncated image, annotation for
an unknown image id, image size different from the JSON.
Warnings are handled: degenerate polygons (bbox used, or skipped), annotations of a
non-tumour category (ignored), images on disk not listed in the JSON (ignored).
Handled silently and counted: images without annotations (empty mask), grey or RGBA
images (converted to RGB)."""


@dataclass
class SplitReport:
    name: str
    images: int = 0
    annotations: int = 0
    rectangles: int = 0
    kinds: Counter = field(default_factory=Counter)  # polygon / rle / bbox-only
    categories: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    without_annotation: int = 0
    multi_annotation: int = 0
    area_fractions: list[float] = field(default_factory=list)


@dataclass
class CheckReport:
    root: Path
    splits: dict[str, SplitReport]
    issues: list[Issue]
    layout: str = "roboflow"

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    def grouped_issues(self, per_group: int = 3) -> list[str]:
        """Issues grouped by split, severity and kind of problem: a count and the first few
        files of each, so a flood of one kind never hides another."""
        groups: dict[tuple[str, str, str], list[Issue]] = {}
        for issue in self.issues:
            kind = issue.problem.split(":")[0].split(" (")[0]
            groups.setdefault((issue.split, issue.severity, kind), []).append(issue)
        lines = []
        for (split, severity, kind), items in sorted(groups.items(),
                                                     key=lambda g: (g[0][1], g[0][0])):
            lines.append(f"  [{severity}] {split}: {kind} — {len(items)} file(s)")
            for issue in items[:per_group]:
                lines.append(f"      {issue.file}: {issue.problem}")
            if len(items) > per_group:
                lines.append(f"      ... and {len(items) - per_group} more of this kind")
        return lines

    def format(self, max_issues: int = 3) -> str:
        lines = [f"dataset {self.root}", ""]
        head = (f"{'split':6} {'images':>7} {'annots':>7} {'rects':>7} {'no-ann':>7} "
                f"{'multi':>6} {'area% mean':>10} {'median':>7}  sizes / modes / kinds")
        lines.append(head)
        for r in self.splits.values():
            fr = np.asarray(r.area_fractions) * 100
            mean = f"{fr.mean():.2f}" if len(fr) else "-"
            med = f"{np.median(fr):.2f}" if len(fr) else "-"
            sizes = ",".join(f"{k}:{v}" for k, v in r.sizes.most_common(3))
            modes = ",".join(f"{k}:{v}" for k, v in r.modes.items())
            kinds = ",".join(f"{k}:{v}" for k, v in r.kinds.items())
            lines.append(f"{r.name:6} {r.images:7d} {r.annotations:7d} {r.rectangles:7d} "
                         f"{r.without_annotation:7d} {r.multi_annotation:6d} {mean:>10} "
                         f"{med:>7}  {sizes} / {modes} / {kinds}")
        total = sum(r.annotations for r in self.splits.values())
        rects = sum(r.rectangles for r in self.splits.values())
        cats = Counter()
        for r in self.splits.values():
            cats.update(r.categories)
        lines += ["", f"layout: {self.layout}",
                  f"annotations: {total}, of which axis-aligned rectangles: {rects}"
                  + (" (all: the masks are boxes, not outlines)" if total and rects == total
                     else ""),
                  f"tumour categories used: {dict(sorted(cats.items()))}",
                  f"images without annotation: "
                  f"{sum(r.without_annotation for r in self.splits.values())}",
                  "", f"errors: {len(self.errors)}, warnings: {len(self.warnings)}"]
        lines += self.grouped_issues(max_issues)
        lines += ["", "policy:", POLICY]
        return "\n".join(lines)


def _kind(ann: dict[str, Any]) -> str:
    segm = ann.get("segmentation")
    if isinstance(segm, dict):
        return "rle"
    return "polygon" if segm else "bbox-only"


def check_dataset(root: str | Path, decode: bool = True) -> CheckReport:
    """Validate every split; decodes every image when ``decode`` (finds truncated files)."""
    root = Path(root)
    reports, issues = {}, []
    for name in SPLITS:
        split = load_split(root, name)
        issues += split.issues
        rep = SplitReport(name, images=len(split.images))
        missing = {i.file for i in split.issues if "missing on disk" in i.problem}
        for img in split.images:
            anns = split.annotations_of(img)
            rep.annotations += len(anns)
            rep.rectangles += sum(is_rectangle(a) for a in anns)
            rep.kinds.update(_kind(a) for a in anns)
            rep.categories.update(str(a.get("category_id")) for a in anns)
            rep.sizes[f"{img['width']}x{img['height']}"] += 1
            rep.without_annotation += not anns
            rep.multi_annotation += len(anns) > 1
            rep.area_fractions.append(float(split.mask(img).mean()) if anns else 0.0)
            if decode and str(split.image_path(img)) not in missing:
                try:
                    _, mode = read_image(split, img)
                    rep.modes[mode] += 1
                except DatasetError as err:
                    issues += err.issues
        reports[name] = rep
    try:
        layout = detect_layout(root)
    except FileNotFoundError as err:
        layout = f"none complete ({err})"
    return CheckReport(root, reports, issues, layout)


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

    from brainseg_lib.coco import annotation_mask
    from brainseg_lib.dataset import resize_mask

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
        (dst / name / ANNOTATION_FILE).write_text(json.dumps(data))
    (dst / "provenance.json").write_text(json.dumps({
        "source": str(src.resolve()), "source_annotations_sha256": dataset_hash(src),
        "size": size, "grey": grey, "jpeg_quality": quality}, indent=2))
    return dst
