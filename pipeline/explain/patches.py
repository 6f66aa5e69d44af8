"""Image regions of a pixel attribution: the vision encoder's patch grid and the processor's crop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]  # left, top, right, bottom in image pixels


def patch_grid(attribution: np.ndarray, patch_size: int) -> np.ndarray:
    """Signed attribution summed over channels and pixels of each ``patch_size`` square: rows x cols.

    ``attribution`` is ``(channels, height, width)``. A vision encoder's patch embedding drops
    pixels past the last whole patch, so they have zero attribution and the grid ignores them.
    """
    if attribution.ndim != 3:
        raise ValueError(f"pixel attribution must be (channels, height, width), got shape {attribution.shape}")
    if patch_size < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    channels, height, width = attribution.shape
    rows, cols = height // patch_size, width // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"a {height} x {width} image has no whole {patch_size}-pixel patch")
    whole = attribution[:, : rows * patch_size, : cols * patch_size].astype(np.float64)
    return whole.reshape(channels, rows, patch_size, cols, patch_size).sum(axis=(0, 2, 4))


def patch_boxes(grid: tuple[int, int], region: Box) -> list[list[Box]]:
    """Each patch's box in original-image pixels, the grid laid evenly over ``region``.

    Exact when the processed image is a whole number of patches, as CLIP-style processors make it.
    """
    rows, cols = grid
    left, top, right, bottom = region
    width, height = (right - left) / cols, (bottom - top) / rows
    return [
        [(left + c * width, top + r * height, left + (c + 1) * width, top + (r + 1) * height) for c in range(cols)]
        for r in range(rows)
    ]


def top_indices(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` largest scores by magnitude, largest first; ties keep reading order."""
    return sorted(range(len(scores)), key=lambda i: (-abs(scores[i]), i))[:k]


def crop_region(image_processor: Any, size: tuple[int, int]) -> Box:
    """The part of the original image the processor's pixels cover, in original pixels.

    CLIP-style processors resize the shortest edge and centre-crop, so the saliency map covers a
    centred square, not the whole picture; processors that resize to a fixed size cover it all.
    """
    width, height = size
    resize = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    if not (getattr(image_processor, "do_center_crop", False) and "shortest_edge" in resize and crop):
        return (0.0, 0.0, float(width), float(height))
    scale = resize["shortest_edge"] / min(width, height)
    crop_w, crop_h = crop["width"] / scale, crop["height"] / scale
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)
