"""A split's predictions with labels: probabilities at the model's resolution (with and without
flip TTA) and each image's own loss, the same definition as the trainer's validation loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from brainseg_lib.data.arrays import SplitArrays, read_rows
from brainseg_lib.inference.predictor import LoadedModel, predict_both, predict_logits
from brainseg_lib.training.losses import build_loss


@dataclass
class SplitPrediction:
    """Probabilities at the model's resolution for one split, with and without TTA."""

    arrays: SplitArrays
    probs: np.ndarray  # (N,H,W) float32
    probs_tta: np.ndarray | None
    loss: float  # the run's own loss, mean per image
    bce: float  # BCE, mean per image (the reference's loss, comparable across runs)


def predict_split(loaded: LoadedModel, arrays: SplitArrays, tta: bool,
                  batch_size: int = 32) -> SplitPrediction:
    """Probabilities for a split; losses per image, as the trainer's validation loss."""
    from brainseg_lib.training.losses import per_image_loss

    loss_fn, bce_fn = build_loss(loaded.params.loss), torch.nn.BCEWithLogitsLoss()
    probs, probs_tta = [], []
    loss = torch.zeros((), device=loaded.device)
    bce = torch.zeros((), device=loaded.device)
    for i in range(0, len(arrays), batch_size):
        rows = np.arange(i, min(i + batch_size, len(arrays)))  # plain reads, not the map
        x = torch.from_numpy(read_rows(arrays.images, rows))
        y = torch.from_numpy(read_rows(arrays.masks, rows)).to(loaded.device)
        y = y.unsqueeze(1).float()
        if tta:
            logits, logits_tta = predict_both(loaded, x)
            probs_tta.append(torch.sigmoid(logits_tta)[:, 0].cpu().numpy())
        else:
            logits = predict_logits(loaded, x)
        loss += per_image_loss(loss_fn, logits, y).sum()
        bce += per_image_loss(bce_fn, logits, y).sum()
        probs.append(torch.sigmoid(logits)[:, 0].cpu().numpy())
    n = len(arrays)
    return SplitPrediction(arrays, np.concatenate(probs),
                           np.concatenate(probs_tta) if tta else None, loss.item() / n,
                           bce.item() / n)
