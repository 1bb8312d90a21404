"""The real dataset, when BRAINSEG_DATA points at it (skipped otherwise)."""

import numpy as np

from brainseg_lib.cli import main
from brainseg_lib.data.arrays import load_split_arrays


def test_data_check_report(real_root, capsys):
    assert main(["data", "check", str(real_root), "--no-decode"]) == 0
    out = capsys.readouterr().out
    for line in ("train     1502    1502    1502       1      1",
                 "valid      429     429     429       0      0",
                 "test       215     215     215       0      0"):
        assert line in out
    assert "annotations: 2146, of which axis-aligned rectangles: 2146" in out
    assert "images without annotation: 1" in out and "errors: 0" in out


def test_sizes_and_mask_area(real_root, tmp_path):
    arrays = load_split_arrays(real_root, "test", 128, tmp_path / "cache")
    assert arrays.images.shape == (215, 3, 128, 128)
    assert set(arrays.source_sizes) == {(640, 640)}
    assert 0.03 <= arrays.masks.mean() <= 0.04
    # grey MRI stored as RGB: the three channels are equal
    assert np.array_equal(arrays.images[:, 0], arrays.images[:, 1])
