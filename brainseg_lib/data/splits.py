"""Grouped k-fold cross-validation over train+valid.

Folds never split a near-duplicate cluster (:mod:`.duplicates`: our stand-in for patients)
and are saved as ``folds.json``, editable by hand like nnU-Net's ``splits_final.json``; a
fold's training data is checked to cover every development image exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from brainseg_lib.config import ParamsError
from brainseg_lib.data.arrays import SplitArrays

DEV_SPLITS = ("train", "valid")


def make_folds(groups: dict[str, Any], k: int, seed: int) -> dict[str, Any]:
    """k folds over train+valid with no cluster split across folds, sizes balanced greedily
    (largest clusters first, each to the currently smallest fold; ties broken by the seed)."""
    by_cluster: dict[int, list[str]] = {}
    for key, label in groups["clusters"].items():
        if key.split("/")[0] in DEV_SPLITS:
            by_cluster.setdefault(label, []).append(key)
    if k < 2 or k > len(by_cluster):
        raise ParamsError(f"folds: {k} folds need 2..{len(by_cluster)} clusters")
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
    except (json.JSONDecodeError, UnicodeDecodeError):
        folds = None
    lists = folds.get("folds") if isinstance(folds, dict) else None
    if not (isinstance(lists, list) and lists and all(
            isinstance(f, list) and all(isinstance(k, str) for k in f) for f in lists)):
        raise ParamsError(f"{path}: not a folds file (expected {{'folds': [['split/file', "
                          "...], ...]}})")
    return folds


def fold_split(data: dict[str, SplitArrays], folds_file: Path, fold: int,
               ) -> dict[str, SplitArrays]:
    """Train = train+valid minus fold ``fold``; valid = that fold. Checks the folds cover
    every development image exactly once."""
    folds = read_folds(folds_file)["folds"]
    if not 0 <= fold < len(folds):
        raise ParamsError(f"{folds_file}: fold {fold} out of range (0..{len(folds) - 1})")
    dev = SplitArrays.concat("dev", [data[s] for s in DEV_SPLITS])
    keys = dev_keys(data)
    assigned = [k for f in folds for k in f]
    if sorted(assigned) != sorted(keys):
        missing = set(keys) - set(assigned)
        extra = set(assigned) - set(keys)
        twice = len(assigned) - len(set(assigned))
        raise ParamsError(f"{folds_file}: folds do not cover the development images exactly "
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
