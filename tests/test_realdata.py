"""The real dataset, when BRAINSEG_DATA points at it (skipped otherwise)."""

import re

import numpy as np

from brainseg_lib.cli import main
from brainseg_lib.data.arrays import load_split_arrays


def _check_table(out):
    """``brainseg data check``'s per-split table as numbers: {split: {column: count}}."""
    lines = out.splitlines()
    columns = next(line.split() for line in lines if line.startswith("split "))[1:6]
    return {words[0]: dict(zip(columns, map(int, words[1:6]), strict=True))
            for words in map(str.split, lines)
            if words[:1] in (["train"], ["valid"], ["test"]) and len(words) > 5}


def test_data_check_report(real_root, capsys):
    assert main(["data", "check", str(real_root), "--no-decode"]) == 0
    out = capsys.readouterr().out
    columns = ("images", "annots", "rects", "no-ann", "multi")
    expected = {"train": (1502, 1502, 1502, 1, 1), "valid": (429, 429, 429, 0, 0),
                "test": (215, 215, 215, 0, 0)}
    assert _check_table(out) == {split: dict(zip(columns, row, strict=True))
                                 for split, row in expected.items()}
    assert re.search(r"annotations: (\d+), of which axis-aligned rectangles: (\d+)",
                     out).groups() == ("2146", "2146")
    assert re.search(r"images without annotation: (\d+)", out).group(1) == "1"
    assert re.search(r"errors: (\d+), warnings: (\d+)", out).groups() == ("0", "0")


def test_sizes_and_mask_area(real_root, tmp_path):
    arrays = load_split_arrays(real_root, "test", 128, tmp_path / "cache")
    assert arrays.images.shape == (215, 3, 128, 128)
    assert set(arrays.source_sizes) == {(640, 640)}
    assert 0.03 <= arrays.masks.mean() <= 0.04
    # grey MRI stored as RGB: the three channels are equal
    assert np.array_equal(arrays.images[:, 0], arrays.images[:, 1])


def test_every_test_image_has_one_lesion_and_one_named_subclass(real_root):
    """The real test split: one annotated tumour per image, and the sub-classes "0" / "1"
    cover every image exactly once (what the by-sub-class figures split on)."""
    from brainseg_lib.data.arrays import load_split_lesions

    lesions = load_split_lesions(real_root, "test", 256)
    assert len(lesions.files) == 215
    assert all(len(stack) == 1 for stack in lesions.lesions)
    assert set(lesions.subclass) == {"0", "1"}
    assert sum(s == "0" for s in lesions.subclass) + sum(
        s == "1" for s in lesions.subclass) == 215
    assert (lesions.box_area > 0).all()
