"""Patch training: random patches of the training images, a fraction placed on tumour."""

import numpy as np
import pytest
import torch

from brainseg_lib.config import ParamsError
from brainseg_lib.training.augment import PatchSampler
from brainseg_lib.training.loop import train
from conftest import tiny_params

SIDE, CROP = 128, 48


def boxes(n: int, seed: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """(n,1,SIDE,SIDE) uint8 masks, each one box of 12-30 px at a random place (and the boxes);
    every fourth image has no tumour."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(n, 1, SIDE, SIDE, dtype=torch.uint8)
    placed = []
    for i in range(n):
        if i % 4 == 3:
            placed.append(None)
            continue
        h, w = rng.integers(12, 31, 2)
        top, left = rng.integers(0, SIDE - h), rng.integers(0, SIDE - w)
        masks[i, 0, top:top + h, left:left + w] = 1
        placed.append((top, left, h, w))
    return masks, placed


def natural_rate(placed: list) -> float:
    """The chance that a uniformly placed patch overlaps the box, averaged over images."""
    positions = SIDE - CROP + 1
    rates = []
    for box in placed:
        if box is None:
            rates.append(0.0)
            continue
        top, left, h, w = box
        rows = min(top + h - 1, SIDE - CROP) - max(top - CROP + 1, 0) + 1
        cols = min(left + w - 1, SIDE - CROP) - max(left - CROP + 1, 0) + 1
        rates.append(rows * cols / positions**2)
    return float(np.mean(rates))


def draw(fg: float, masks: torch.Tensor, draws: int = 1000, seed: int = 0):
    """Patch placements over ``draws`` patches: (has tumour, forced, rows, cols)."""
    sampler, gen = PatchSampler(CROP, fg), torch.Generator().manual_seed(seed)
    has, forced, rows, cols = [], [], [], []
    for _ in range(draws // len(masks)):
        r, c, f = sampler.offsets(masks, gen)
        for i in range(len(masks)):
            has.append(bool(masks[i, 0, r[i]:r[i] + CROP, c[i]:c[i] + CROP].any()))
        forced += f.tolist()
        rows += r.tolist()
        cols += c.tolist()
    return np.array(has), np.array(forced), np.array(rows), np.array(cols)


@pytest.mark.parametrize("fg", [0.0, 0.33, 0.5, 1.0])
def test_the_fraction_of_patches_with_tumour_follows_fg_oversample(fg):
    """Over 1,000 patches: a share ``fg`` of the images with a tumour get a patch placed on
    it (always containing tumour); the other patches are placed uniformly and contain tumour
    at the natural rate, worked out from the boxes' geometry."""
    masks, placed = boxes(8, seed=1)
    has, forced, rows, cols = draw(fg, masks)
    with_tumour = 6 / 8  # every fourth image has no tumour to place a patch on
    natural = natural_rate(placed)
    assert 0.05 < natural < 0.5  # uniformly placed patches often miss the tumour
    assert forced.mean() == pytest.approx(fg * with_tumour, abs=0.05)
    assert has[forced].all()
    assert has.mean() == pytest.approx(fg * with_tumour + (1 - fg) * natural, abs=0.05)
    assert rows.min() >= 0 and cols.min() >= 0  # never outside the image
    assert rows.max() <= SIDE - CROP and cols.max() <= SIDE - CROP


def test_patches_of_image_and_mask_are_the_same_window():
    masks, _ = boxes(8, seed=2)
    ys, xs = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    images = torch.stack([masks[:, 0] * 255, ys.expand(8, -1, -1) % 256,
                          xs.expand(8, -1, -1) % 256], 1).to(torch.uint8)
    sampler = PatchSampler(CROP, 0.5)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    patches, patch_masks = sampler(images, masks, gen_a)
    rows, cols, _ = sampler.offsets(masks, gen_b)  # the same draws
    assert patches.shape == (8, 3, CROP, CROP) and patch_masks.shape == (8, 1, CROP, CROP)
    for i in range(8):
        assert torch.equal(patches[i, 1, :, 0], torch.arange(rows[i], rows[i] + CROP).byte())
        assert torch.equal(patches[i, 2, 0], torch.arange(cols[i], cols[i] + CROP).byte())
        assert torch.equal(patch_masks[i, 0] * 255, patches[i, 0])  # aligned with its mask
        window = masks[i, :, rows[i]:rows[i] + CROP, cols[i]:cols[i] + CROP]
        assert torch.equal(patch_masks[i], window)


def test_patches_are_deterministic_under_a_seed():
    masks, _ = boxes(8, seed=3)
    images = masks.expand(-1, 3, -1, -1).contiguous()
    sampler = PatchSampler(CROP, 0.33)
    a = sampler(images, masks, torch.Generator().manual_seed(7))
    b = sampler(images, masks, torch.Generator().manual_seed(7))
    c = sampler(images, masks, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_patch_parameters_are_checked(tmp_path, synthetic_root):
    with pytest.raises(ParamsError, match="crop_size"):
        tiny_params(tmp_path, synthetic_root, crop_size=48)  # not a multiple of 32
    with pytest.raises(ParamsError, match="crop_size"):
        tiny_params(tmp_path, synthetic_root, crop_size=96)  # larger than image_size 64
    with pytest.raises(ParamsError, match="fg_oversample"):
        tiny_params(tmp_path, synthetic_root, fg_oversample=0.5)  # no patches to place


def test_a_run_trains_on_patches_and_validates_on_whole_images(tmp_path, synthetic_root,
                                                               capsys):
    params = tiny_params(tmp_path, synthetic_root, crop_size=32, fg_oversample=0.5,
                         epochs=2, augment=True, run_id="patches")
    result = train(params, progress=False)
    out = capsys.readouterr().out
    assert "trained on 32px patches, 50% placed on tumour" in out
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["val_loss"])
    assert 0.0 <= result.history[-1]["val_iou"] <= 1.0
