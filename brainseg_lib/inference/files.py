"""``brainseg predict``: a mask and an overlay PNG for each input image, at its own size.

Inputs are decoded as the training data is (:func:`.data.images.decode_rgb8`: 16-bit and
float images by their own range); unreadable or oversized ones are reported with their reason
and skipped. The PNGs are written to a temporary name and renamed, so concurrent or
interrupted runs into one folder leave only complete files, each from one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from brainseg_lib.data.coco import IMAGE_SUFFIXES, DatasetError
from brainseg_lib.data.images import UnreadableImageError, decode_rgb8
from brainseg_lib.inference.predictor import Backend, load_model, predict_images
from brainseg_lib.io import atomic_write

PREDICT_BATCH = 16  # images per forward pass in brainseg predict


def overlay(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 60, 60),
            alpha: float = 0.45) -> np.ndarray:
    """The image with the mask blended in ``color``."""
    out = rgb.astype(np.float32).copy()
    out[mask > 0] = (1 - alpha) * out[mask > 0] + alpha * np.asarray(color, np.float32)
    return out.astype(np.uint8)


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """The image files named, and those (by suffix) in the folders named; DatasetError when
    that is none at all."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    if not files:
        raise DatasetError(f"predict {' '.join(map(str, inputs))}: no images there (files "
                           f"ending {', '.join(IMAGE_SUFFIXES)})")
    return files


def save_png(array: np.ndarray, path: Path) -> None:
    """A PNG written to a temporary name in its folder and renamed over ``path``."""
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _decoded(paths: list[Path], skipped: list[tuple[Path, str]]
             ) -> list[tuple[Path, np.ndarray]]:
    """The readable ones of ``paths`` as RGB uint8; the others added to ``skipped`` with
    their reason (and said on stderr)."""
    batch = []
    for path in paths:
        try:
            batch.append((path, decode_rgb8(path)[0]))
        except (FileNotFoundError, UnreadableImageError) as err:
            reason = "no such file" if isinstance(err, FileNotFoundError) else str(err)
            skipped.append((path, reason))
            print(f"skipped {path}: {reason}", file=sys.stderr)
    return batch


def predict_files(model: str | Path, inputs: list[str | Path], out_dir: str | Path,
                  threshold: float | None = None, tta: bool = False, device: str = "auto",
                  backend: Backend = "torch") -> tuple[list[Path], list[tuple[Path, str]]]:
    """Write ``<name>_mask.png`` and ``<name>_overlay.png`` per readable input, at its size.

    Unreadable inputs are reported and skipped; returns (written masks, [(file, reason)]).
    """
    files = collect_inputs(inputs)  # before the model: no input, no loading and no probing
    loaded = load_model(model, device, backend)
    threshold = loaded.params.threshold if threshold is None else threshold
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for start in range(0, len(files), PREDICT_BATCH):
        batch = _decoded(files[start:start + PREDICT_BATCH], skipped)
        if not batch:
            continue
        probs = predict_images(loaded, [rgb for _, rgb in batch], tta)
        for (path, rgb), prob in zip(batch, probs, strict=True):
            mask = (prob >= threshold).astype(np.uint8)
            save_png(mask * 255, out_dir / f"{path.stem}_mask.png")
            save_png(overlay(rgb, mask), out_dir / f"{path.stem}_overlay.png")
            written.append(out_dir / f"{path.stem}_mask.png")
    return written, skipped
