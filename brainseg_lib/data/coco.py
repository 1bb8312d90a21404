"""COCO annotation files: validation and one binary tumour mask per image.

Problems are collected as :class:`Issue` records instead of raised one by one, so
``brainseg data check`` can list every problem of a dataset in one pass; loading code
raises :class:`DatasetError` carrying all of them.

Policy (also printed by ``data check``):

* errors (the split cannot be used): missing split folder or annotation file, malformed
  JSON, JSON that is not COCO, an image listed but missing on disk, an unreadable or
  truncated image, an annotation pointing to an unknown image id, an image whose size
  differs from the JSON;
* warnings (handled, reported): degenerate polygons (fewer than 3 points or zero area;
  the annotation falls back to its bbox when that has an area, else it is skipped),
  annotations of a non-tumour category (ignored), images on disk not listed in the JSON
  (ignored);
* handled silently (counted): images without annotations (empty mask), grey or RGBA
  images (converted to RGB).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils

from brainseg_lib.data.images import UnreadableImageError, decode_rgb8
from brainseg_lib.errors import BrainsegError

SPLITS = ("train", "valid", "test")
ANNOTATION_FILE = "_annotations.coco.json"  # Roboflow: one per split folder
SPLIT_ALIASES = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Issue:
    severity: Literal["error", "warning"]
    split: str
    file: str
    problem: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.split}: {self.file}: {self.problem}"


class DatasetError(BrainsegError):
    """The dataset cannot be used; carries every error found, each naming split and file (or
    one message naming the folder, for a problem of the dataset as a whole)."""

    def __init__(self, issues: list[Issue] | str):
        if isinstance(issues, str):
            self.issues: list[Issue] = []
            super().__init__(issues)
            return
        self.issues = issues
        head = str(issues[0]) if issues else "dataset error"
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        super().__init__(head + more)


@dataclass(frozen=True)
class SplitFiles:
    """Where one split's annotation file and images are, in whichever layout was found."""

    annotation_file: Path
    image_dir: Path
    layout: str  # "roboflow" or "coco"


def _coco_layout_split(root: Path, split: str) -> SplitFiles | None:
    """Standard COCO: ``annotations/instances_<split>.json`` (``val`` for valid) and the
    images in ``<split>/``, ``images/<split>/`` or ``<split>2017/``."""
    for name in SPLIT_ALIASES[split]:
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.is_file():
            for image_dir in (root / name, root / "images" / name, root / f"{name}2017",
                              root / "images"):
                if image_dir.is_dir():
                    return SplitFiles(ann, image_dir, "coco")
            return SplitFiles(ann, root / name, "coco")
    return None


def detect_layout(root: str | Path) -> str:
    """``roboflow`` (``<split>/_annotations.coco.json``) or ``coco``
    (``annotations/instances_<split>.json``); FileNotFoundError says what is missing."""
    root = Path(root)
    if all((root / s / ANNOTATION_FILE).is_file() for s in SPLITS):
        return "roboflow"
    if all(_coco_layout_split(root, s) for s in SPLITS):
        return "coco"
    roboflow = [f"{s}/{ANNOTATION_FILE}" for s in SPLITS
                if not (root / s / ANNOTATION_FILE).is_file()]
    coco = [f"annotations/instances_{s}.json" for s in SPLITS
            if not _coco_layout_split(root, s)]
    raise FileNotFoundError(
        f"no COCO dataset layout found: Roboflow's needs {', '.join(roboflow)}; the standard "
        f"one needs {', '.join(coco)}")


def split_files(root: str | Path, split: str) -> SplitFiles:
    """The annotation file and image folder of ``split`` (Roboflow's layout first)."""
    root = Path(root)
    if (root / split / ANNOTATION_FILE).is_file() or not (root / "annotations").is_dir():
        return SplitFiles(root / split / ANNOTATION_FILE, root / split, "roboflow")
    return _coco_layout_split(root, split) or SplitFiles(
        root / "annotations" / f"instances_{split}.json", root / split, "coco")


def read_json_text(path: Path) -> Any:
    """JSON as tools and editors write it: UTF-8 with or without a BOM, or UTF-16."""
    import codecs

    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = raw.decode("utf-16")
    else:
        text = raw.decode("utf-8-sig")
    return json.loads(text)


def image_key(value: Any) -> str:
    """Image ids as keys: ints, and the strings some exporters write, compare alike."""
    return str(value).strip()


@dataclass
class CocoSplit:
    """One split's parsed annotation file, keyed the way masks are built."""

    name: str
    root: Path  # the image folder
    images: list[dict[str, Any]]
    annotations: dict[str, list[dict[str, Any]]]  # by image_key(image id)
    tumour_category_ids: set[int]
    categories: list[dict[str, Any]]
    issues: list[Issue] = field(default_factory=list)
    annotation_path: Path | None = None
    layout: str = "roboflow"

    @property
    def annotation_file(self) -> Path:
        return self.annotation_path or self.root / ANNOTATION_FILE

    def annotations_of(self, image: dict[str, Any]) -> list[dict[str, Any]]:
        return self.annotations.get(image_key(image["id"]), [])

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def image_path(self, image: dict[str, Any]) -> Path:
        """``file_name`` relative to the image folder; exporters that write paths relative
        to the dataset root (``images/x.jpg``) or to elsewhere are found by name."""
        name = str(image["file_name"]).replace("\\", "/")
        for candidate in (self.root / name, self.root.parent / name,
                          self.root / Path(name).name):
            if candidate.is_file():
                return candidate
        return self.root / name

    def mask(self, image: dict[str, Any]) -> np.ndarray:
        """Union of the image's tumour annotations at the size the JSON gives, uint8 {0,1}."""
        height, width = int(image["height"]), int(image["width"])
        out = np.zeros((height, width), dtype=np.uint8)
        for ann in self.annotations_of(image):
            out |= annotation_mask(ann, height, width)
        return out

    def lesions(self, image: dict[str, Any]) -> np.ndarray:
        """One mask per tumour annotation (the true lesions of lesion-wise metrics), bool
        (K, H, W) at the size the JSON gives; K = 0 for an image without annotations."""
        height, width = int(image["height"]), int(image["width"])
        masks = [annotation_mask(ann, height, width) > 0 for ann in self.annotations_of(image)]
        return np.array(masks, bool).reshape(-1, height, width)

    def subclass(self, image: dict[str, Any]) -> str:
        """The category name of the image's annotations, as the dataset names it ("0" or "1"
        under "Tumor" here); "mixed" when they differ, "none" without annotations."""
        by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in self.categories}
        names = {by_id.get(int(a.get("category_id", -1)), str(a.get("category_id")))
                 for a in self.annotations_of(image)}
        return names.pop() if len(names) == 1 else ("mixed" if names else "none")

    def box_area(self, image: dict[str, Any]) -> float:
        """The summed area of the image's annotation boxes, in source pixels."""
        return float(sum(float(a["bbox"][2]) * float(a["bbox"][3])
                         for a in self.annotations_of(image) if a.get("bbox")))


def tumour_categories(categories: list[dict[str, Any]]) -> set[int]:
    """Ids of the categories counted as tumour: every non-root category, else all of them.

    Roboflow exports put a root category (supercategory 'none') above the real classes;
    those classes ('0', '1' under 'Tumor' here) are what annotations use.
    """
    roots = {None, "", "none"}
    children = {int(c["id"]) for c in categories if c.get("supercategory") not in roots}
    return children or {int(c["id"]) for c in categories}


def _polygon_ok(poly: list[float]) -> bool:
    if len(poly) < 6:
        return False
    xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
    area = 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))
    return area > 0


def _bbox_polygon(bbox: list[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Rasterise one annotation: polygons, RLE (compressed or not), or its bbox alone."""
    segm = ann.get("segmentation")
    if isinstance(segm, dict):  # RLE
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(
            segm.get("counts"), list) else segm
        return mask_utils.decode(rle).astype(np.uint8)
    polygons = [p for p in (segm or []) if _polygon_ok(p)]
    if not polygons:
        bbox = ann.get("bbox")
        if not bbox or bbox[2] <= 0 or bbox[3] <= 0:
            return np.zeros((height, width), np.uint8)
        polygons = [_bbox_polygon(bbox)]
    rles = mask_utils.frPyObjects(polygons, height, width)
    return (mask_utils.decode(mask_utils.merge(rles)) > 0).astype(np.uint8)


def is_rectangle(ann: dict[str, Any], tolerance: float = 0.5) -> bool:
    """True when the annotation is one polygon tracing an axis-aligned box (or bbox-only)."""
    segm = ann.get("segmentation")
    if isinstance(segm, dict):
        return False
    if not segm:
        return True
    if len(segm) != 1:
        return False
    pts = np.asarray(segm[0], float).reshape(-1, 2)
    if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(pts) != 4:
        return False
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    on_x = np.minimum(abs(pts[:, 0] - x0), abs(pts[:, 0] - x1)) <= tolerance
    on_y = np.minimum(abs(pts[:, 1] - y0), abs(pts[:, 1] - y1)) <= tolerance
    corners = {(bool(abs(px - x0) <= tolerance), bool(abs(py - y0) <= tolerance))
               for px, py in pts}
    return bool(on_x.all() and on_y.all() and len(corners) == 4)


class _UnusableSplit(Exception):
    """The one error that stops a split from being parsed at all."""

    def __init__(self, file: Path, problem: str):
        super().__init__(problem)
        self.file, self.problem = file, problem


def _require_split_files(files: SplitFiles) -> None:
    """Raise _UnusableSplit for a missing split folder, annotation file or image folder."""
    root, ann_file = files.image_dir, files.annotation_file
    if files.layout == "roboflow" and not root.is_dir():
        raise _UnusableSplit(root, "split folder is missing")
    if not ann_file.is_file():
        raise _UnusableSplit(ann_file, f"annotation file {ann_file.name} is missing")
    if not root.is_dir():
        raise _UnusableSplit(root, "image folder is missing")


def _read_coco_json(ann_file: Path) -> dict[str, Any]:
    """The annotation file as a dict with ``images`` and ``annotations`` lists; anything
    else (undecodable text, malformed JSON, not COCO) raises _UnusableSplit."""
    try:
        data = read_json_text(ann_file)
    except UnicodeDecodeError as err:
        raise _UnusableSplit(ann_file, f"not UTF-8 or UTF-16 text ({err.reason} at byte "
                                       f"{err.start}): save it as UTF-8") from None
    except json.JSONDecodeError as err:
        hint = (" (a trailing comma?)" if err.msg.startswith("Expecting property name") or
                err.msg.startswith("Expecting value") else "")
        raise _UnusableSplit(ann_file, f"malformed JSON at line {err.lineno} column "
                                       f"{err.colno}: {err.msg}{hint}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations")
    ):
        raise _UnusableSplit(ann_file, "not a COCO file: needs 'images' and 'annotations' "
                                       "lists")
    return data


def _complete_images(entries: list[Any], split: str,
                     ann_file: Path) -> tuple[list[dict[str, Any]], list[Issue]]:
    """The image records that have every field a mask needs; an error for each other one."""
    images: list[dict[str, Any]] = []
    issues: list[Issue] = []
    for n, img in enumerate(entries):
        if not isinstance(img, dict) or not {"id", "file_name", "width", "height"} <= img.keys():
            issues.append(Issue("error", split, str(ann_file),
                                f"images[{n}] lacks id/file_name/width/height"))
            continue
        images.append(img)
    return images, issues


def _annotation_location(ann_file: Path, n: int, ann: Any) -> str:
    if isinstance(ann, dict):
        return f"{ann_file} annotations[{n}] (id {ann.get('id')})"
    return f"{ann_file} annotations[{n}]"


def _rejection(ann: Any, image_ids: set[str],
               tumour_ids: set[int]) -> tuple[Literal["error", "warning"], str] | None:
    """Why an annotation is not used (severity, problem), or None when it is."""
    if not isinstance(ann, dict) or "image_id" not in ann:
        return "error", "annotation lacks image_id"
    if image_key(ann["image_id"]) not in image_ids:
        return "error", f"points to unknown image id {ann['image_id']}"
    if tumour_ids and ann.get("category_id") not in tumour_ids:
        return "warning", (f"category {ann.get('category_id')} is not a tumour category: "
                           "ignored")
    return None


def _degenerate_polygons(ann: dict[str, Any]) -> str | None:
    """The warning for polygons too small to rasterise, saying what replaces them."""
    segm = ann.get("segmentation")
    if not isinstance(segm, list) or not segm:
        return None
    bad = [p for p in segm if not _polygon_ok(p)]
    if not bad:
        return None
    bbox = ann.get("bbox") or [0, 0, 0, 0]
    fallback = "its bbox is used" if bbox[2] > 0 and bbox[3] > 0 else "skipped"
    return (f"{len(bad)} degenerate polygon(s) (fewer than 3 points or zero area): "
            f"{fallback}")


def _index_annotations(entries: list[Any], image_ids: set[str], tumour_ids: set[int],
                       split: str, ann_file: Path,
                       ) -> tuple[dict[str, list[dict[str, Any]]], list[Issue]]:
    """The usable tumour annotations by image key, and an issue for each one left out
    or repaired."""
    annotations: dict[str, list[dict[str, Any]]] = {}
    issues: list[Issue] = []
    for n, ann in enumerate(entries):
        where = _annotation_location(ann_file, n, ann)
        rejection = _rejection(ann, image_ids, tumour_ids)
        if rejection:
            issues.append(Issue(rejection[0], split, where, rejection[1]))
            continue
        degenerate = _degenerate_polygons(ann)
        if degenerate:
            issues.append(Issue("warning", split, where, degenerate))
        annotations.setdefault(image_key(ann["image_id"]), []).append(ann)
    return annotations, issues


def _disk_issues(coco: CocoSplit) -> list[Issue]:
    """Images on disk the JSON does not list (warnings), then listed ones missing (errors)."""
    paths = {img["file_name"]: coco.image_path(img) for img in coco.images}
    listed = {p.name for p in paths.values()}
    unlisted = [Issue("warning", coco.name, str(path),
                      "image on disk is not listed in the JSON: ignored")
                for path in sorted(coco.root.iterdir())
                if path.suffix.lower() in IMAGE_SUFFIXES and path.name not in listed]
    missing = [Issue("error", coco.name, str(path),
                     "image listed in the JSON is missing on disk")
               for path in paths.values() if not path.is_file()]
    return unlisted + missing


def load_split(data_dir: str | Path, split: str) -> CocoSplit:
    """Parse and validate one split's annotation file (no image is decoded here).

    Either layout (``detect_layout``); UTF-8 with or without BOM, UTF-16, pretty-printed
    or not; string or integer ids; polygons, RLE (crowd too) or bbox-only annotations.
    """
    files = split_files(data_dir, split)
    root, ann_file = files.image_dir, files.annotation_file
    try:
        _require_split_files(files)
        data = _read_coco_json(ann_file)
    except _UnusableSplit as err:
        return CocoSplit(split, root, [], {}, set(), [],
                         [Issue("error", split, str(err.file), err.problem)], ann_file,
                         files.layout)
    images, issues = _complete_images(data["images"], split, ann_file)
    categories = [c for c in data.get("categories", []) if isinstance(c, dict) and "id" in c]
    tumour_ids = tumour_categories(categories) if categories else set()
    annotations, annotation_issues = _index_annotations(
        data["annotations"], {image_key(img["id"]) for img in images}, tumour_ids, split,
        ann_file)
    coco = CocoSplit(split, root, images, annotations, tumour_ids, categories,
                     issues + annotation_issues, ann_file, files.layout)
    coco.issues += _disk_issues(coco)
    return coco


def read_image(split: CocoSplit, image: dict[str, Any]) -> tuple[np.ndarray, str]:
    """Decode one image fully as RGB uint8 (H, W, 3) (:func:`.images.to_rgb8`: 16-bit and
    float images by their own range) and say which mode it was converted from.

    Raises DatasetError (naming split and file) for a missing, unreadable, truncated or
    wrongly sized image.
    """
    path = split.image_path(image)

    def error(problem: str) -> DatasetError:
        return DatasetError([Issue("error", split.name, str(path), problem)])

    try:
        rgb, mode = decode_rgb8(path)
    except FileNotFoundError:
        raise error("image listed in the JSON is missing on disk") from None
    except UnreadableImageError as err:
        raise error(str(err)) from None
    height, width = rgb.shape[:2]
    if (width, height) != (int(image["width"]), int(image["height"])):
        raise error(f"image is {width}x{height} but the JSON says "
                    f"{image['width']}x{image['height']}")
    return rgb, mode


def raise_on_errors(split: CocoSplit) -> CocoSplit:
    if split.errors:
        raise DatasetError(split.errors)
    return split


def dataset_hash(data_dir: Path) -> str:
    """SHA-256 of the three annotation files: identifies the labels a run saw."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(split_files(data_dir, split).annotation_file.read_bytes())
    return digest.hexdigest()[:16]
