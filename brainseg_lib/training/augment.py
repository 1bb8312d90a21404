"""Batch augmentation on the training device: patches and their placement, then the
random geometric and intensity transforms.

Augmenting whole uint8 batches on the GPU with tensor ops (one ``affine_grid`` /
``grid_sample`` per batch) keeps up with a fast GPU, where per-sample CPU augmentation
(albumentations) would starve the model; ``benchmarks/README.md`` has the figures. The
image and its mask go through the same random transform.
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


class PatchSampler:
    """Random ``crop_size`` patches of a batch, a fraction ``fg_oversample`` of them placed to
    contain tumour: nnU-Net's foreground oversampling (MONAI's ``RandCropByPosNegLabeld``).

    On a machine short of compute, a step on a patch of a higher-resolution image costs what
    a step on a whole downscaled frame costs, and the forced patches stop the ~97 % background
    from dominating. A forced patch is placed uniformly among the positions that contain one
    tumour pixel drawn at random (an image without tumour gets a free patch); the others are
    placed uniformly. Every draw comes from ``generator`` on the images' device.
    """

    def __init__(self, crop_size: int, fg_oversample: float):
        self.size, self.fg = crop_size, fg_oversample

    def offsets(self, masks: torch.Tensor, generator: torch.Generator,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-left corners (rows, columns) of each patch, and which were placed on tumour."""
        b, h, w = masks.shape[0], masks.shape[-2], masks.shape[-1]
        dev = masks.device
        u = torch.rand(5, b, generator=generator, device=dev)
        flat = masks.reshape(b, -1).float()
        forced = (u[0] < self.fg) & (flat.amax(1) > 0)
        # a tumour pixel to place a patch on: drawn only when patches are placed on tumour (a
        # multinomial over every pixel of the batch is not free on a CPU step)
        pixel = torch.multinomial(flat + 1e-12, 1, generator=generator)[:, 0] if self.fg \
            else torch.zeros(b, dtype=torch.long, device=dev)
        rows = self._place(u[1], u[2], pixel // w, h, forced)
        cols = self._place(u[3], u[4], pixel % w, w, forced)
        return rows, cols, forced

    def _place(self, u_free: torch.Tensor, u_forced: torch.Tensor, on: torch.Tensor,
               side: int, forced: torch.Tensor) -> torch.Tensor:
        c = self.size
        free = (u_free * (side - c + 1)).long().clamp(max=side - c)
        low, high = (on - c + 1).clamp(min=0), on.clamp(max=side - c)
        placed = low + (u_forced * (high - low + 1)).long().clamp(max=high - low)
        return torch.where(forced, placed, free)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches of (B,C,H,W) images and (B,1,H,W) masks, the same window for both."""
        rows, cols, _ = self.offsets(masks, generator)
        span = torch.arange(self.size, device=images.device)
        r = (rows[:, None] + span)[:, :, None]  # (B, c, 1)
        k = (cols[:, None] + span)[:, None, :]  # (B, 1, c)
        batch = torch.arange(len(images), device=images.device)[:, None, None]
        return (images[batch, :, r, k].permute(0, 3, 1, 2).contiguous(),
                masks[batch, :, r, k].permute(0, 3, 1, 2).contiguous())
