"""``brainseg predict``: a mask and an overlay PNG for each input image, at its own size;
unreadable inputs are reported and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from brainseg_lib.data.coco import IMAGE_SUFFIXES
from brainseg_lib.inference.predictor import Backend, load_model, predict_images

PREDICT_BATCH = 16  # images per forward pass in brainseg predict


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


def predict_files(model: str | Path, inputs: list[str | Path], out_dir: str | Path,
                  threshold: float | None = None, tta: bool = False, device: str = "auto",
                  backend: Backend = "torch") -> tuple[list[Path], list[tuple[Path, str]]]:
    """Write ``<name>_mask.png`` and ``<name>_overlay.png`` per readable input, at its size.

    Unreadable inputs are reported and skipped; returns (written masks, [(file, reason)]).
    """
    loaded = load_model(model, device, backend)
    threshold = loaded.params.threshold if threshold is None else threshold
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    files = collect_inputs(inputs)
    for start in range(0, len(files), PREDICT_BATCH):
        batch: list[tuple[Path, np.ndarray]] = []
        for path in files[start:start + PREDICT_BATCH]:
            try:
                with Image.open(path) as pil:
                    batch.append((path, np.asarray(pil.convert("RGB"))))
            except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
                skipped.append((path, str(err)))
                print(f"skipped {path}: {err}", file=sys.stderr)
        if not batch:
            continue
        probs = predict_images(loaded, [rgb for _, rgb in batch], tta)
        for (path, rgb), prob in zip(batch, probs, strict=True):
            mask = (prob >= threshold).astype(np.uint8)
            Image.fromarray(mask * 255).save(out_dir / f"{path.stem}_mask.png")
            Image.fromarray(overlay(rgb, mask)).save(out_dir / f"{path.stem}_overlay.png")
            written.append(out_dir / f"{path.stem}_mask.png")
    return written, skipped
