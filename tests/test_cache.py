"""Decoded-image cache: miss, hit, stale and corrupt caches."""

import json
import shutil
import warnings

import numpy as np
import pytest

from brainseg_lib.data.arrays import load_split_arrays
from brainseg_lib.data.coco import ANNOTATION_FILE


@pytest.fixture
def root(synthetic_root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(synthetic_root, copy)
    return copy


def load(root, cache_dir, capsys):
    arrays = load_split_arrays(root, "valid", 32, cache_dir, use_memory=False, verbose=True)
    return arrays, capsys.readouterr().out


def test_miss_then_hit_gives_identical_arrays(root, cache_dir, capsys):
    first, out = load(root, cache_dir, capsys)
    assert "cache miss" in out
    second, out = load(root, cache_dir, capsys)
    assert "cache hit" in out
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.files == second.files


def test_changed_annotations_make_a_new_key(root, cache_dir, capsys):
    load(root, cache_dir, capsys)
    ann_file = root / "valid" / ANNOTATION_FILE
    data = json.loads(ann_file.read_text())
    data["annotations"] = []
    ann_file.write_text(json.dumps(data))
    arrays, out = load(root, cache_dir, capsys)
    assert "cache miss" in out and arrays.masks.sum() == 0


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "manifest"])
def test_corrupt_cache_is_rebuilt_with_a_warning(root, cache_dir, capsys, damage):
    good, _ = load(root, cache_dir, capsys)
    good_images = np.array(good.images)  # a copy: the damage below rewrites the mapped file
    images = next(cache_dir.glob("valid-32-*-images.npy"))
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "flip_bytes":
        data = bytearray(images.read_bytes())
        data[-50:] = bytes(255 - b for b in data[-50:])
        images.write_bytes(bytes(data))
    else:
        next(cache_dir.glob("valid-32-*.json")).write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt, out = load(root, cache_dir, capsys)
    assert any("rebuilding" in str(w.message) for w in caught)
    np.testing.assert_array_equal(rebuilt.images, good_images)
    _, out = load(root, cache_dir, capsys)
    assert "cache hit" in out


