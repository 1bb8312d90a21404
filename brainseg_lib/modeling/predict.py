"""Inference: load a checkpoint, predict probabilities, and write masks for new images."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from brainseg_lib.augment import normalize
from brainseg_lib.coco import IMAGE_SUFFIXES
from brainseg_lib.config import Params, params_from_dict
from brainseg_lib.dataset import resize_image
from brainseg_lib.model import create_model
from brainseg_lib.modeling.train import autocast_dtype, select_device


@dataclass
class LoadedModel:
    model: nn.Module
    params: Params
    device: torch.device
    epoch: int


def load_checkpoint(path: str | Path, device: str = "auto") -> LoadedModel:
    """Rebuild the network a checkpoint was trained with and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        params = params_from_dict(state["params"], source=str(path))
    except (KeyError, RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a brainseg checkpoint ({err})") from None
    model, _ = create_model(params.arch, params.encoder, "none", params.in_channels)
    model.load_state_dict(state["model"])
    dev = select_device(device if device != "auto" else params.device)
    model = model.to(dev).eval()
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedModel(model, params, dev, int(state.get("epoch", 0)))


@torch.no_grad()
def predict_logits(loaded: LoadedModel, images_u8: torch.Tensor, tta: bool = False,
                   ) -> torch.Tensor:
    """Logits (B,1,H,W) in float32 for a uint8 batch (B,3,H,W); ``tta`` averages the
    logits of the image and its horizontal mirror."""
    p = loaded.params
    x = normalize(images_u8.to(loaded.device), p.normalize_mean, p.normalize_std)
    if p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(p, loaded.device)
    with torch.autocast(loaded.device.type, dtype=dtype, enabled=dtype is not None):
        logits = loaded.model(x).float()
        if tta:
            logits = (logits + loaded.model(x.flip(-1)).float().flip(-1)) / 2
    return logits


def predict_image(loaded: LoadedModel, rgb: np.ndarray, tta: bool = False) -> np.ndarray:
    """Tumour probability (H,W) float32 for one RGB uint8 image of any size."""
    size = loaded.params.image_size
    x = torch.from_numpy(resize_image(rgb, size)).unsqueeze(0)
    probs = torch.sigmoid(predict_logits(loaded, x, tta))
    probs = F.interpolate(probs, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return probs[0, 0].cpu().numpy()


def overlay(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 60, 60),
            alpha: float = 0.45) -> np.ndarray:
    """The image with the mask blended in ``color``."""
    out = rgb.astype(np.float32).copy()
    out[mask > 0] = (1 - alpha) * out[mask > 0] + alpha * np.asarray(color, np.float32)
    return out.astype(np.uint8)


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files


def predict_files(checkpoint: str | Path, inputs: list[str | Path], out_dir: str | Path,
                  threshold: float | None = None, tta: bool = False, device: str = "auto",
                  ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Write ``<name>_mask.png`` and ``<name>_overlay.png`` per readable input, at its size.

    Unreadable inputs are reported and skipped; returns (written masks, [(file, reason)]).
    """
    loaded = load_checkpoint(checkpoint, device)
    threshold = loaded.params.threshold if threshold is None else threshold
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for path in collect_inputs(inputs):
        try:
            with Image.open(path) as pil:
                rgb = np.asarray(pil.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            skipped.append((path, str(err)))
            print(f"skipped {path}: {err}", file=sys.stderr)
            continue
        mask = (predict_image(loaded, rgb, tta) >= threshold).astype(np.uint8)
        Image.fromarray(mask * 255).save(out_dir / f"{path.stem}_mask.png")
        Image.fromarray(overlay(rgb, mask)).save(out_dir / f"{path.stem}_overlay.png")
        written.append(out_dir / f"{path.stem}_mask.png")
    return written, skipped
