"""Near-duplicate slices: perceptual hashes, the pairs that cross splits, and clusters.

The dataset has no patient IDs, and near-identical slices sit in different splits. Every
image of every split is hashed once (imagehash's 64-bit pHash, at one fixed size); images
whose hashes differ in at most ``duplicate_bits`` bits are near-duplicates, and the
connected components of that graph are the clusters we use as patients: folds never split a
cluster (:mod:`.splits`), and the *clean* test subset holds the test images whose cluster
has no member in train or valid. Hashes and clusters are cached as JSON keyed by the
annotations' hash and the threshold, so evaluation reads no image once they exist.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from brainseg_lib.data.arrays import SplitArrays, default_cache_dir, load_dataset, read_rows
from brainseg_lib.data.coco import dataset_hash
from brainseg_lib.data.locate import DataSource
from brainseg_lib.io import atomic_write_json

HASH_SIZE = 256  # images are hashed at this size whatever the model's resolution
PAIR_COLUMNS = ["split_a", "file_a", "split_b", "file_b", "hamming"]


def phash(arrays: SplitArrays) -> np.ndarray:
    """(N,) uint64 perceptual hashes (imagehash's pHash of the first channel)."""
    import imagehash
    from PIL import Image

    def chunks(size: int = 256) -> Iterator[np.ndarray]:  # plain reads, not the map's pages
        for start in range(0, len(arrays), size):
            yield read_rows(arrays.images, np.arange(start, min(start + size, len(arrays))))

    bits = np.stack([imagehash.phash(Image.fromarray(img[0])).hash.ravel()
                     for chunk in chunks() for img in chunk])
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def close_pairs(hashes: np.ndarray, max_bits: int) -> Iterator[tuple[np.ndarray, ...]]:
    """(i, j, distance) arrays of every pair i < j whose hashes differ in <= ``max_bits``
    bits, in chunks (2,000 images make 4 M pairs)."""
    for start in range(0, len(hashes), 512):
        dist = np.bitwise_count(hashes[start:start + 512, None] ^ hashes[None, :])
        i, j = np.nonzero(dist <= max_bits)
        i += start
        keep = i < j
        yield i[keep], j[keep], dist[i[keep] - start, j[keep]]


def duplicate_clusters(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """Cluster label per image: connected components of 'Hamming distance <= max_bits'."""
    pairs = [(i, j) for i, j, _ in close_pairs(hashes, max_bits)]
    i = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, int)
    j = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, int)
    graph = coo_matrix((np.ones(len(i), bool), (i, j)), shape=(len(hashes),) * 2)
    return connected_components(graph, directed=False)[1]


def duplicate_groups(arrays: dict[str, SplitArrays], max_bits: int, data_hash: str,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """Hashes and clusters over all splits, cached as JSON keyed by the data's hash and the
    threshold. Returns ``{"clusters": {"split/file": label}, "hashes": {...},
    "clean_test": [...], ...}``."""
    cached = cached_groups(data_hash, max_bits, cache_dir)
    return cached if cached is not None else _hash_groups(arrays, max_bits, data_hash,
                                                          cache_dir)


def _hash_groups(arrays: dict[str, SplitArrays], max_bits: int, data_hash: str,
                 cache_dir: Path | None) -> dict[str, Any]:
    """Hash every image, cluster, and write the grouping's JSON."""
    keys = [f"{split}/{f}" for split, a in arrays.items() for f in a.files]
    hashes = np.concatenate([phash(a) for a in arrays.values()])
    labels = duplicate_clusters(hashes, max_bits)
    clusters = {k: int(v) for k, v in zip(keys, labels, strict=True)}
    groups = summarise_groups(clusters) | {
        "data_hash": data_hash, "max_bits": max_bits, "clusters": clusters,
        "hashes": {k: f"{int(h):016x}" for k, h in zip(keys, hashes, strict=True)}}
    atomic_write_json(_groups_file(data_hash, max_bits, cache_dir), groups)
    return groups


def _groups_file(data_hash: str, max_bits: int, cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / f"duplicates-{data_hash}-{max_bits}bits.json"


def cached_groups(data_hash: str, max_bits: int, cache_dir: Path | None = None,
                  ) -> dict[str, Any] | None:
    """The saved grouping of this data at this threshold, or None (then it must be hashed).

    The file is derived, so it is checked, never trusted: one that does not hold a grouping
    of this data (unreadable, a field missing, its summary not that of its clusters) is
    reported in one warning naming it, and rebuilt by the caller."""
    path = _groups_file(data_hash, max_bits, cache_dir)
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
        problem = _groups_problem(cached, data_hash, max_bits)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError included
        problem = f"not JSON ({err})"
    if problem:
        warnings.warn(f"near-duplicate groups {path}: {problem}; rebuilding from the images",
                      stacklevel=2)
        return None
    return cached


_HEX64 = re.compile(r"[0-9a-f]{16}")


def _groups_problem(cached: Any, data_hash: str, max_bits: int) -> str:
    """What keeps ``cached`` from being the grouping of this data at ``max_bits`` ('' when
    nothing): each field is checked, and the summary must be the one of its clusters."""
    if not isinstance(cached, dict):
        return "not a JSON object"
    if cached.get("data_hash") != data_hash or cached.get("max_bits") != max_bits:
        return "made for other data or another threshold"
    clusters, hashes = cached.get("clusters"), cached.get("hashes")
    if not isinstance(clusters, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in clusters.values()):
        return "field 'clusters' missing or malformed"
    if not isinstance(hashes, dict) or hashes.keys() != clusters.keys() or not all(
            isinstance(h, str) and _HEX64.fullmatch(h) for h in hashes.values()):
        return "field 'hashes' missing or malformed"
    summary = json.loads(json.dumps(summarise_groups(clusters)))  # int keys as JSON has them
    wrong = [k for k, v in summary.items() if cached.get(k) != v]
    return f"field '{wrong[0]}' disagrees with the clusters" if wrong else ""


def summarise_groups(clusters: dict[str, int]) -> dict[str, Any]:
    """Cluster counts and sizes, and the clean test images (no near-duplicate outside test)."""
    members: dict[int, list[str]] = {}
    for key, label in clusters.items():
        members.setdefault(label, []).append(key)
    sizes = np.bincount([len(m) for m in members.values()])
    clean = sorted(k.split("/", 1)[1] for k, label in clusters.items()
                   if k.startswith("test/") and all(
                       m.startswith("test/") for m in members[label]))
    crossing = sum(len({m.split("/")[0] for m in ms}) > 1 for ms in members.values())
    return {"n_images": len(clusters), "n_clusters": len(members),
            "cluster_sizes": {int(s): int(c) for s, c in enumerate(sizes) if c},
            "clusters_across_splits": int(crossing),
            "n_test": sum(k.startswith("test/") for k in clusters), "clean_test": clean}


def near_duplicate_groups(source: DataSource, bits: int,
                          cache_dir: Path | None = None) -> dict[str, Any]:
    """Near-duplicate groups of a dataset (cached: no image is read once they exist). Hashed
    at one fixed size, so every profile sees the same groups."""
    data_hash = dataset_hash(source.path)
    cached = cached_groups(data_hash, bits, cache_dir)
    if cached is not None:
        return cached
    arrays = load_dataset(source.path, HASH_SIZE, cache_dir)
    return _hash_groups(arrays, bits, data_hash, cache_dir)


def cross_split_pairs(groups: dict[str, Any], max_bits: int | None = None) -> pd.DataFrame:
    """Pairs of images in *different* splits whose pHashes differ in at most ``max_bits``
    bits (default: the groups' threshold): likely the same slice, a leak between splits."""
    keys = list(groups["hashes"])
    hashes = np.array([int(groups["hashes"][k], 16) for k in keys], np.uint64)
    split, file = zip(*(k.split("/", 1) for k in keys), strict=True) if keys else ((), ())
    rows = [(split[a], file[a], split[b], file[b], int(d))
            for i, j, dist in close_pairs(hashes, groups["max_bits"] if max_bits is None
                                          else max_bits)
            for a, b, d in zip(i, j, dist, strict=True) if split[a] != split[b]]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)
