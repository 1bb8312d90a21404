"""Post-processing of binary masks: drop small components, keep the largest, or fill each
component's bounding box (the labels here are boxes). Chosen on validation, never on test.
Components are those of the lesion metric (:func:`.lesion.label_components`, 8-connected).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from brainseg_lib.metrics.lesion import label_components

POSTPROCESSING = {
    "none": "no post-processing",
    "drop_small": "drop components smaller than min_component_px",
    "keep_largest": "keep the largest component only",
    "fill_box": "drop small components, fill each remaining one's bounding box",
}


def postprocess(mask: np.ndarray, method: str, min_px: int = 20) -> np.ndarray:
    """Clean one binary mask; the ground truth masks here are filled boxes."""
    if method == "none" or not mask.any():
        return mask
    labels, n = label_components(mask)
    sizes = np.bincount(labels.ravel())[1:]
    if method == "keep_largest":
        return labels == (np.argmax(sizes) + 1)
    keep = np.flatnonzero(sizes >= min_px) + 1
    if method == "drop_small":
        return np.isin(labels, keep)
    if method == "fill_box":
        out = np.zeros_like(mask, dtype=bool)
        for sl, label in zip(ndimage.find_objects(labels), range(1, n + 1), strict=True):
            if label in keep:
                out[sl] = True
        return out
    raise ValueError(f"unknown post-processing '{method}': use {', '.join(POSTPROCESSING)}")


def binarise(probs: np.ndarray, threshold: float, method: str, min_px: int) -> np.ndarray:
    masks = probs >= threshold
    if method != "none":
        masks = np.stack([postprocess(m, method, min_px) for m in masks])
    return masks
