"""Decoded, resized splits as uint8 arrays: cached on disk, memory-mapped from there.

Decoding 640x640 JPEGs dominates data time, so each split is decoded and resized once per
image size and stored as uint8 arrays (``.npy``) under the cache directory, keyed by a hash
of the annotation file, the image files' sizes and mtimes, and the target size. A manifest
holding CRC32 checksums is written last: a missing, stale or corrupt cache is detected,
reported and rebuilt, never used. The arrays are memory-mapped from the cache (decoded into
it the same way), so a dataset need not fit in memory: 100,000 slices at 512 px are ~105 GB.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from brainseg_lib.data.coco import SPLITS, CocoSplit, load_split, raise_on_errors, read_image
from brainseg_lib.io import atomic_write, atomic_write_json

CACHE_VERSION = 1


_MEMORY: dict[str, SplitArrays] = {}
_MEMORY_LESIONS: dict[str, SplitLesions] = {}


@dataclass
class SplitArrays:
    """One split at one size: images (N,3,S,S) and masks (N,S,S), both uint8 (masks 0/1)."""

    name: str
    files: list[str]
    images: np.ndarray
    masks: np.ndarray
    source_sizes: list[tuple[int, int]]  # (height, width) of each original image

    def __len__(self) -> int:
        return len(self.files)

    @classmethod
    def concat(cls, name: str, parts: list[SplitArrays]) -> SplitArrays:
        return cls(name, [f for p in parts for f in p.files],
                   np.concatenate([p.images for p in parts]),
                   np.concatenate([p.masks for p in parts]),
                   [s for p in parts for s in p.source_sizes])

    def subset(self, indices: np.ndarray) -> SplitArrays:
        idx = np.sort(np.asarray(indices))
        return SplitArrays(self.name, [self.files[i] for i in idx], self.images[idx],
                           self.masks[idx], [self.source_sizes[i] for i in idx])


def read_rows(array: np.ndarray, rows: np.ndarray | list[int]) -> np.ndarray:
    """``array[rows]`` (in that order), read from the file with plain reads when ``array``
    memory-maps a whole ``.npy`` file.

    Why: a page of a map that the process touches counts in its resident memory until the
    map goes, and the kernel maps whole cached folios (measured: 0.5 MB per 16 KB row), so
    gathering batches through the map grew peak RSS with the dataset. Read into a buffer, the
    pages stay in the page cache only. Runs of consecutive rows are read at once.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if not _whole_file_map(array):
        return np.asarray(array[rows])
    out = np.empty((len(rows), *array.shape[1:]), array.dtype)
    if not out.size:
        return out
    row_bytes = out.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    view = memoryview(out).cast("B")
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            want = view[start * row_bytes:end * row_bytes]
            offset = array.offset + int(rows[start]) * row_bytes
            while len(want):  # pread may return less than asked
                got = os.preadv(fd, [want], offset)
                if got <= 0:
                    raise OSError(f"{array.filename}: short read at byte {offset}")
                want, offset = want[got:], offset + got
            start = end
    finally:
        os.close(fd)
    return out


def _whole_file_map(array: np.ndarray) -> bool:
    """Whether ``array`` is a C-ordered memory map of a whole ``.npy`` file's data (what
    :func:`np.load` with ``mmap_mode`` returns), so its rows sit at known file offsets."""
    if not isinstance(array, np.memmap) or array.filename is None or array.ndim < 1:
        return False
    try:
        size = os.path.getsize(array.filename)
    except OSError:
        return False
    return bool(array.flags.c_contiguous and array.offset + array.nbytes == size
                and array.offset < size)


def default_cache_dir() -> Path:
    env = os.environ.get("BRAINSEG_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "brainseg"


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H,W,3) uint8 to (3,size,size) uint8; PIL's bilinear filter antialiases when shrinking."""
    pil = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary mask to ``size``: bilinear (area-like) resampling then a 0.5 threshold."""
    pil = Image.fromarray(mask * np.uint8(255)).resize((size, size), Image.Resampling.BILINEAR)
    return (np.asarray(pil) >= 128).astype(np.uint8)


def cache_key(split: CocoSplit, size: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}|{size}|".encode())
    digest.update(split.annotation_file.read_bytes())
    for img in split.images:
        stat = split.image_path(img).stat()
        digest.update(f"{img['file_name']}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _file_crc(path: Path) -> int:
    """CRC32 of an ``.npy`` file's array bytes (the array's data, header skipped), read
    in chunks: checking a memory-mapped split does not bring it into the process's memory."""
    crc = 0
    with path.open("rb") as f:
        major, _minor = np.lib.format.read_magic(f)
        if major == 1:
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _decode_into(split: CocoSplit, size: int, images: np.ndarray,
                 masks: np.ndarray) -> list[tuple[int, int]]:
    """Decode and resize every image of ``split`` into ``images``/``masks`` (arrays in memory
    or memory-mapped files); the source (height, width) of each."""
    sizes = []
    for i, img in enumerate(split.images):
        rgb, _ = read_image(split, img)
        images[i] = resize_image(rgb, size)
        masks[i] = resize_mask(split.mask(img), size)
        sizes.append((int(img["height"]), int(img["width"])))
    return sizes


def _shapes(split: CocoSplit, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = len(split.images)
    return (n, 3, size, size), (n, size, size)


def _decode_split(split: CocoSplit, size: int) -> SplitArrays:
    image_shape, mask_shape = _shapes(split, size)
    images, masks = np.empty(image_shape, np.uint8), np.empty(mask_shape, np.uint8)
    sizes = _decode_into(split, size, images, masks)
    return SplitArrays(split.name, [img["file_name"] for img in split.images], images, masks,
                       sizes)


def _part(stem: Path, part: str) -> Path:
    return stem.with_name(f"{stem.name}-{part}.npy")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(length: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) == length and all(map(_is_int, v))


_MANIFEST_CHECKS: dict[str, Callable[[Any], bool]] = {
    "key": lambda v: isinstance(v, str), "split": lambda v: isinstance(v, str),
    "files": lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v),
    "source_sizes": lambda v: isinstance(v, list) and all(map(_ints(2), v)),
    "images_shape": _ints(4), "masks_shape": _ints(3),
    "images_crc32": _is_int, "masks_crc32": _is_int,
}


@dataclass(frozen=True)
class CacheManifest:
    """A cached split's manifest, written last: the key it was built for, its files and
    their sizes, and the arrays' shapes and CRC32s. Read back field by field, so a damaged
    manifest is a rebuild that names the field, never a ``KeyError``."""

    key: str
    split: str
    files: list[str]
    source_sizes: list[list[int]]
    images_shape: list[int]
    masks_shape: list[int]
    images_crc32: int
    masks_crc32: int

    @classmethod
    def from_json(cls, data: Any) -> CacheManifest:
        """The manifest in ``data``; ValueError naming the first missing or malformed field."""
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object")
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"the manifest has no field '{f.name}'")
            if not _MANIFEST_CHECKS[f.name](data[f.name]):
                raise ValueError(f"the manifest's field '{f.name}' is malformed")
        manifest = cls(**{f.name: data[f.name] for f in fields(cls)})
        n = len(manifest.files)
        if not n == len(manifest.source_sizes) == manifest.images_shape[0] == \
                manifest.masks_shape[0]:
            raise ValueError("the manifest's files, sizes and shapes disagree in length")
        return manifest


def _read_cache(stem: Path, key: str, mmap: bool) -> tuple[SplitArrays | None, str]:
    """The cached split, or None and why not: a miss, a stale key, or a damaged manifest or
    array (naming the field or file)."""
    manifest_file = stem.with_suffix(".json")
    if not manifest_file.exists():
        return None, "miss"
    mode = "r" if mmap else None
    try:
        manifest = CacheManifest.from_json(json.loads(manifest_file.read_text()))
        if manifest.key != key:
            return None, "stale (key differs)"
        images = np.load(_part(stem, "images"), mmap_mode=mode, allow_pickle=False)
        masks = np.load(_part(stem, "masks"), mmap_mode=mode, allow_pickle=False)
        if (list(images.shape) != manifest.images_shape
                or list(masks.shape) != manifest.masks_shape):
            return None, "corrupt (array shape differs from manifest)"
        if (_file_crc(_part(stem, "images")) != manifest.images_crc32
                or _file_crc(_part(stem, "masks")) != manifest.masks_crc32):
            return None, "corrupt (checksum mismatch)"
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError included
        return None, f"corrupt ({manifest_file.name}: {err})"
    sizes = [(int(h), int(w)) for h, w in manifest.source_sizes]
    return SplitArrays(manifest.split, manifest.files, images, masks, sizes), "hit"


def _write_cache(stem: Path, key: str, split: CocoSplit, size: int) -> None:
    """Decode straight into the cache's ``.npy`` files (memory-mapped while they fill, so a
    split larger than memory can be cached), then write the manifest, last."""
    image_shape, mask_shape = _shapes(split, size)
    open_memmap = np.lib.format.open_memmap
    sizes: list[tuple[int, int]] = []

    def fill(tmp_images: Path, tmp_masks: Path) -> None:
        images = open_memmap(tmp_images, "w+", np.uint8, image_shape)
        masks = open_memmap(tmp_masks, "w+", np.uint8, mask_shape)
        sizes.extend(_decode_into(split, size, images, masks))
        images.flush()
        masks.flush()
        del images, masks

    atomic_write(_part(stem, "images"), lambda ti: atomic_write(
        _part(stem, "masks"), lambda tm: fill(ti, tm)))
    manifest = CacheManifest(
        key, split.name, [img["file_name"] for img in split.images],
        [list(s) for s in sizes], list(image_shape), list(mask_shape),
        _file_crc(_part(stem, "images")), _file_crc(_part(stem, "masks")))
    atomic_write_json(stem.with_suffix(".json"), asdict(manifest))


def load_split_arrays(data_dir: str | Path, split: str, size: int,
                      cache_dir: str | Path | None = None, use_memory: bool = True,
                      verbose: bool = False, mmap: bool = True) -> SplitArrays:
    """A split decoded and resized to ``size``: from memory, else the disk cache, else JPEGs.

    ``mmap``: the arrays are memory-mapped from the disk cache (pages are read when used,
    and the kernel may drop them again), so a dataset larger than memory can be used;
    False reads them into memory. Raises DatasetError (naming split and file) when the
    split has errors.
    """
    coco = raise_on_errors(load_split(data_dir, split))
    key = cache_key(coco, size)
    memo = f"{key}-{'mmap' if mmap else 'ram'}"
    if use_memory and memo in _MEMORY:
        return _MEMORY[memo]
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    stem = cache_dir / f"{split}-{size}-{key}"
    arrays, status = _read_cache(stem, key, mmap)
    if arrays is None:
        if status != "miss":
            warnings.warn(f"cache {stem}: {status}; rebuilding from the images", stacklevel=2)
        try:
            _write_cache(stem, key, coco, size)
            arrays, _ = _read_cache(stem, key, mmap)
        except OSError as err:
            warnings.warn(f"could not write the cache under {cache_dir}: {err}", stacklevel=2)
        if arrays is None:
            arrays = _decode_split(coco, size)
    if verbose:
        print(f"{split}: {len(arrays)} images at {size}px (cache {status}"
              f"{', memory-mapped' if mmap and isinstance(arrays.images, np.memmap) else ''})")
    if use_memory:
        _MEMORY[memo] = arrays
    return arrays


@dataclass
class SplitLesions:
    """The true lesions of a split at one size, in the order of its :class:`SplitArrays`:
    one bool (K,S,S) stack per image (K annotations), each image's annotation sub-class
    (``CocoSplit.subclass``) and summed box area in source pixels."""

    files: list[str]
    lesions: list[np.ndarray]
    subclass: list[str]
    box_area: np.ndarray


def load_split_lesions(data_dir: str | Path, split: str, size: int) -> SplitLesions:
    """A split's annotations one by one, resized like the masks (:func:`resize_mask`).

    Rasterising boxes decodes no image and takes well under a second for a split, so this
    is held in memory (keyed like the arrays) and never written to the disk cache."""
    coco = raise_on_errors(load_split(data_dir, split))
    key = f"lesions-{cache_key(coco, size)}"
    if key not in _MEMORY_LESIONS:
        lesions = [np.array([resize_mask(m.astype(np.uint8), size) > 0
                             for m in coco.lesions(img)], bool).reshape(-1, size, size)
                   for img in coco.images]
        _MEMORY_LESIONS[key] = SplitLesions(
            [img["file_name"] for img in coco.images], lesions,
            [coco.subclass(img) for img in coco.images],
            np.array([coco.box_area(img) for img in coco.images]))
    return _MEMORY_LESIONS[key]


def load_dataset(data_dir: str | Path, size: int, cache_dir: str | Path | None = None,
                 splits: tuple[str, ...] = SPLITS, mmap: bool = True,
                 ) -> dict[str, SplitArrays]:
    return {s: load_split_arrays(data_dir, s, size, cache_dir, mmap=mmap) for s in splits}
