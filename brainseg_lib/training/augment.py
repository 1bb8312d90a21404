"""Batch augmentation on the training device.

Augmenting whole uint8 batches on the GPU with tensor ops (one ``affine_grid`` /
``grid_sample`` per batch) keeps up with ~1,700 img/s on an H100, where per-sample CPU
augmentation (albumentations) would starve the model; on the CPU it costs a few percent of
a training step. The image and its mask go through the same random transform.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from brainseg_lib.config import Params


class BatchAugment:
    """Random flips, rotation/scale/shift and brightness/contrast for (image, mask) batches."""

    def __init__(self, params: Params):
        self.p = params

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` in [0,1] float (B,3,H,W), ``masks`` float (B,1,H,W) in {0,1}.

        ``generator`` lives on the images' device, so drawing the random numbers needs no
        host-to-device copy.
        """
        p, b, dev = self.p, images.shape[0], images.device
        draws = iter(torch.rand(8, b, generator=generator, device=dev))

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * next(draws)

        hflip = next(draws) < p.aug_hflip
        vflip = next(draws) < p.aug_vflip
        angle = uniform(-p.aug_rotate_deg, p.aug_rotate_deg) * math.pi / 180
        scale = uniform(1 - p.aug_scale, 1 + p.aug_scale)
        shift = torch.stack([uniform(-p.aug_shift, p.aug_shift) * 2,
                             uniform(-p.aug_shift, p.aug_shift) * 2], 1)
        sx = torch.where(hflip, -1.0, 1.0)
        sy = torch.where(vflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sy, shift[:, 0]], 1),
            torch.stack([sin * sx, cos * sy, shift[:, 1]], 1),
        ], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
        masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False) >= 0.5).float()
        contrast = uniform(1 - p.aug_contrast, 1 + p.aug_contrast).view(b, 1, 1, 1)
        brightness = uniform(-p.aug_brightness, p.aug_brightness).view(b, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = ((images - mean) * contrast + mean + brightness).clamp(0, 1)
        return images, masks
