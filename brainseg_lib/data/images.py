"""Image files as the network sees them: RGB uint8, whatever Pillow mode they are stored in.

One decoder for the training data (:func:`.coco.read_image`) and ``brainseg predict``, so
both read an image alike. A 16-bit or float greyscale image (MRI exports often are) is
stretched from its own range to 0..255: Pillow's RGB conversion clips it to white. Images
over Pillow's decompression-bomb limit and files that do not decode are one reason each.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from brainseg_lib.errors import BrainsegError


class UnreadableImageError(BrainsegError):
    """An image file that cannot be decoded (or is too large to); the message says why."""


def _stretched(pil: Image.Image) -> np.ndarray:
    """A high-depth single-channel image (``I;16*``, ``I``, ``F``) as uint8, its own minimum
    to 0 and maximum to 255 (a constant image is black)."""
    values = np.nan_to_num(np.asarray(pil, dtype=np.float64), posinf=0.0, neginf=0.0)
    low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def to_rgb8(pil: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of any Pillow mode: 8-bit modes through Pillow's own conversion
    (palette, greyscale, CMYK; alpha dropped), high-depth ones by their actual range."""
    if pil.mode.startswith("I") or pil.mode == "F":
        grey = _stretched(pil)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    return np.asarray(pil if pil.mode == "RGB" else pil.convert("RGB"))


def decode_rgb8(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode an image file fully: (RGB uint8 array, the mode it was stored in).

    FileNotFoundError when absent; :class:`UnreadableImageError` with the reason for a file
    that does not decode, is truncated, or is over Pillow's decompression-bomb limit (a
    warning from Pillow there is an error here: the file is not decoded at all)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as pil:
                pil.load()
                return to_rgb8(pil), pil.mode
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImageError(f"too large to decode safely: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise UnreadableImageError(f"unreadable or truncated image: {err}") from None
