"""Decoded-image cache: miss, hit, stale and corrupt caches."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from brainseg_lib.coco import ANNOTATION_FILE
from brainseg_lib.dataset import (
    SegmentationDataset,
    build_loaders,
    load_dataset,
    load_split_arrays,
)


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
    np.testing.assert_array_equal(rebuilt.images, good.images)
    _, out = load(root, cache_dir, capsys)
    assert "cache hit" in out


def test_dataset_returns_normalised_float_tensors(root, cache_dir):
    arrays = load_split_arrays(root, "train", 32, cache_dir)
    ds = SegmentationDataset(arrays, [0.5] * 3, [0.25] * 3)
    image, mask = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
    expected = (arrays.images[0, 0, 0, 0] / 255 - 0.5) / 0.25
    assert image[0, 0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_loaders_shuffle_only_train(root, cache_dir):
    data = load_dataset(root, 32, cache_dir)
    loaders = build_loaders(data, batch_size=4, seed=1)
    assert isinstance(loaders["train"].sampler, torch.utils.data.RandomSampler)
    for split in ("valid", "test"):
        assert isinstance(loaders[split].sampler, torch.utils.data.SequentialSampler)
    images, masks = next(iter(loaders["valid"]))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
