"""Loss factory: BCE from torch, Dice and focal from smp (binary mode, on logits).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn


class PixelPlusDiceLoss(nn.Module):
    """A pixel loss + soft Dice: the pixel term (BCE or focal) gives stable per-pixel
    gradients, Dice counters the ~97 % background imbalance that makes a pixel loss alone
    under-segment small tumours."""

    def __init__(self, pixel: nn.Module) -> None:
        super().__init__()
        self.pixel = pixel
        self.dice = _dice()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.pixel(logits, target) + self.dice(logits, target)


def _dice() -> nn.Module:
    return smp.losses.DiceLoss(smp.losses.BINARY_MODE, from_logits=True)


def _focal() -> nn.Module:
    return smp.losses.FocalLoss(smp.losses.BINARY_MODE)


LOSSES = {
    "bce": nn.BCEWithLogitsLoss,
    "dice": _dice,
    "bce_dice": lambda: PixelPlusDiceLoss(nn.BCEWithLogitsLoss()),
    "focal": _focal,
    "focal_dice": lambda: PixelPlusDiceLoss(_focal()),
}


def build_loss(name: str) -> nn.Module:
    """``bce`` (the reference), ``dice``, ``bce_dice``, ``focal`` or ``focal_dice``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}': use {', '.join(LOSSES)}")
    return LOSSES[name]()


def per_image_loss(loss_fn: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of each image on its own (B,): independent of how images are batched."""
    return torch.stack([loss_fn(logits[i:i + 1], y[i:i + 1]) for i in range(len(logits))])
