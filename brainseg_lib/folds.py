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
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from brainseg_lib.dataset import SplitArrays, default_cache_dir
from brainseg_lib.io import atomic_write_json

DEV_SPLITS = ("train", "valid")
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


def make_folds(groups: dict[str, Any], k: int, seed: int) -> dict[str, Any]:
    """k folds over train+valid with no cluster split across folds, sizes balanced greedily
    (largest clusters first, each to the currently smallest fold; ties broken by the seed)."""
    by_cluster: dict[int, list[str]] = {}
    for key, label in groups["clusters"].items():
        if key.split("/")[0] in DEV_SPLITS:
            by_cluster.setdefault(label, []).append(key)
    if k < 2 or k > len(by_cluster):
        raise ValueError(f"folds: {k} folds need 2..{len(by_cluster)} clusters")
    rng = np.random.default_rng(seed)
    clusters = list(by_cluster.values())
    order = rng.permutation(len(clusters))
    order = sorted(order, key=lambda i: -len(clusters[i]))  # stable: seeded among equals
    folds: list[list[str]] = [[] for _ in range(k)]
    for i in order:
        min(folds, key=len).extend(sorted(clusters[i]))
    return {"k": k, "seed": seed, "max_bits": groups["max_bits"],
            "data_hash": groups["data_hash"],
            "note": "each fold: 'split/file' of train+valid held out together; edit freely, "
                    "every development image must appear in exactly one fold",
            "folds": [sorted(f) for f in folds]}


def read_folds(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"folds_file {path} does not exist (made by brainseg cv)")
    try:
        folds = json.loads(path.read_text())
        assert isinstance(folds["folds"], list) and folds["folds"]
    except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
        raise ValueError(f"{path}: not a folds file (expected {{'folds': [[...], ...]}})") \
            from None
    return folds


def fold_split(data: dict[str, SplitArrays], folds_file: Path, fold: int,
               ) -> dict[str, SplitArrays]:
    """Train = train+valid minus fold ``fold``; valid = that fold. Checks the folds cover
    every development image exactly once."""
    folds = read_folds(folds_file)["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"{folds_file}: fold {fold} out of range (0..{len(folds) - 1})")
    dev = SplitArrays.concat("dev", [data[s] for s in DEV_SPLITS])
    keys = dev_keys(data)
    assigned = [k for f in folds for k in f]
    if sorted(assigned) != sorted(keys):
        missing = set(keys) - set(assigned)
        extra = set(assigned) - set(keys)
        twice = len(assigned) - len(set(assigned))
        raise ValueError(f"{folds_file}: folds do not cover the development images exactly "
                         f"once ({len(missing)} missing, {len(extra)} unknown, {twice} "
                         "repeated)")
    held = set(folds[fold])
    is_held = np.array([k in held for k in keys])
    return {"train": dev.subset(np.flatnonzero(~is_held)),
            "valid": dev.subset(np.flatnonzero(is_held))}


def dev_keys(data: dict[str, SplitArrays]) -> list[str]:
    """``split/file`` of every development image, in the order of train+valid concatenated."""
    return [f"{s}/{f}" for s in DEV_SPLITS for f in data[s].files]


def fold_indices(keys: list[str], folds: list[list[str]]) -> list[np.ndarray]:
    """Each fold's positions in ``keys`` (sorted, as ``SplitArrays.subset`` orders them)."""
    position = {k: i for i, k in enumerate(keys)}
    return [np.sort([position[k] for k in fold]) for fold in folds]
