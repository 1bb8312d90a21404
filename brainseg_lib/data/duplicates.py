"""Near-duplicate groups and grouped k-fold cross-validation.

The dataset has no patient IDs, and near-identical slices sit in different splits. We group
every image of every split into near-duplicate clusters (connected components of the graph
whose edges join images with perceptual hashes at most ``duplicate_bits`` apart) and use the
clusters as patients: folds never split a cluster, and the *clean* test subset holds the
test images with no near-duplicate in train or valid. Folds are saved as ``folds.json``
(editable by hand, like nnU-Net's ``splits_final.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from brainseg_lib.data.arrays import SplitArrays, default_cache_dir
from brainseg_lib.data.locate import DataSource
from brainseg_lib.io import atomic_write_json

HASH_SIZE = 256  # images are hashed at this size whatever the model's resolution


def phash_bits(arrays: SplitArrays) -> np.ndarray:
    """(N, 64) bool perceptual hashes (imagehash's pHash of the first channel)."""
    import imagehash
    from PIL import Image

    return np.stack([imagehash.phash(Image.fromarray(img[0])).hash.ravel()
                     for img in arrays.images])


def duplicate_clusters(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """Cluster label per image: connected components of 'Hamming distance <= max_bits'."""
    packed = np.packbits(hashes, axis=1).view(np.uint64)[:, 0]
    n = len(packed)
    rows, cols = [], []
    for i in range(0, n, 512):  # chunked: 2,000 images make 4 M pairs
        dist = np.bitwise_count(packed[i:i + 512, None] ^ packed[None, :])
        r, c = np.nonzero(dist <= max_bits)
        rows.append(r + i)
        cols.append(c)
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), bool), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def duplicate_groups(arrays: dict[str, SplitArrays], max_bits: int, data_hash: str,
                     cache_dir: Path | None = None) -> dict[str, Any]:
    """Clusters over all splits, cached as JSON keyed by the data's hash and the threshold.

    Returns ``{"clusters": {"split/file": label}, "clean_test": [...], ...}``.
    """
    cached = cached_groups(data_hash, max_bits, cache_dir)
    if cached is not None:
        return cached
    keys, hashes = [], []
    for split, a in arrays.items():
        keys += [f"{split}/{f}" for f in a.files]
        hashes.append(phash_bits(a))
    labels = duplicate_clusters(np.concatenate(hashes), max_bits)
    clusters = {k: int(v) for k, v in zip(keys, labels, strict=True)}
    groups = summarise_groups(clusters)
    groups |= {"data_hash": data_hash, "max_bits": max_bits, "clusters": clusters}
    atomic_write_json(_groups_file(data_hash, max_bits, cache_dir), groups)
    return groups


def _groups_file(data_hash: str, max_bits: int, cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / f"duplicates-{data_hash}-{max_bits}bits.json"


def cached_groups(data_hash: str, max_bits: int, cache_dir: Path | None = None,
                  ) -> dict[str, Any] | None:
    """The saved grouping of this data at this threshold, or None (then it must be hashed)."""
    path = _groups_file(data_hash, max_bits, cache_dir)
    if not path.exists():
        return None
    cached = json.loads(path.read_text())
    ok = cached.get("data_hash") == data_hash and cached.get("max_bits") == max_bits
    return cached if ok else None


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
    """Near-duplicate groups of the dataset (cached): which test images are clean. Hashed
    at one fixed size, so every profile sees the same groups."""
    from brainseg_lib.data.arrays import load_dataset
    from brainseg_lib.data.coco import dataset_hash
    from brainseg_lib.data.duplicates import HASH_SIZE, cached_groups, duplicate_groups

    data_hash = dataset_hash(source.path)
    cached = cached_groups(data_hash, bits, cache_dir)  # no image is read then
    if cached is not None:
        return cached
    arrays = load_dataset(source.path, HASH_SIZE, cache_dir)
    return duplicate_groups(arrays, bits, data_hash, cache_dir)


def cross_split_pairs(arrays: dict[str, SplitArrays], max_distance: int = 4) -> pd.DataFrame:
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
