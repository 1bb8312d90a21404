"""``brainseg data check``: a full report on a COCO dataset, problems grouped by split and kind
so that a flood of one kind never hides another.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainseg_lib.data.coco import (
    SPLITS,
    DatasetError,
    Issue,
    detect_layout,
    is_rectangle,
    load_split,
    read_image,
)

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
