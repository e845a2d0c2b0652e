"""Image grids for looking at a model: float images to uint8, grids with padding, PNG files.

Pure numpy on the host; callers pass device arrays only when they log (they are copied here).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from PIL import Image


def to_uint8(images: Any, *, value_range: tuple[float, float]) -> np.ndarray:
    """Maps float images whose values lie in `value_range` (e.g. `(0, 1)` or `(-1, 1)`) to uint8.

    images: float [..., H, W, C] (numpy or jax). Values outside the range are clipped (decoders
    overshoot); `low` maps to 0 and `high` to 255, rounded to nearest. Returns uint8, same shape.
    """
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    images = np.asarray(images, dtype=np.float32)
    scaled = (np.clip(images, low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def _check_uint8_images(images: np.ndarray, name: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{name} must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}"
        )


def make_grid(images: Any, cols: int, *, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Lays out images in rows of `cols`, with `padding` pixels between and around them.

    images: uint8 [N, H, W, C]. The grid has `min(cols, N)` columns and `ceil(N / cols)` rows,
    filled row by row; cells past the last image and the padding are `pad_value`.
    Returns uint8 [rows * (H + padding) + padding, cols * (W + padding) + padding, C].
    """
    images = np.asarray(images)
    _check_uint8_images(images, "images")
    count, height, width, channels = images.shape
    if count == 0:
        raise ValueError("make_grid needs at least one image")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = min(cols, count)
    rows = math.ceil(count / cols)
    grid = np.full(
        (rows * (height + padding) + padding, cols * (width + padding) + padding, channels),
        pad_value,
        dtype=np.uint8,
    )
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def reconstruction_grid(
    originals: Any, reconstructions: Any, *, cols: int = 8, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """A grid with each row of originals directly above the row of their reconstructions.

    originals, reconstructions: uint8 [N, H, W, C], same shape. Grid rows alternate: originals
    0..cols-1, their reconstructions, originals cols..2*cols-1, their reconstructions, ...
    Returns uint8 [2 * ceil(N / cols) * (H + padding) + padding, ..., C] (see `make_grid`).
    """
    originals, reconstructions = np.asarray(originals), np.asarray(reconstructions)
    _check_uint8_images(originals, "originals")
    _check_uint8_images(reconstructions, "reconstructions")
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {list(originals.shape)} and reconstructions "
            f"{list(reconstructions.shape)} must have the same shape"
        )
    count = originals.shape[0]
    cols = min(cols, count)
    rows = math.ceil(count / cols)
    blank = np.full((rows * cols - count, *originals.shape[1:]), pad_value, dtype=np.uint8)
    pairs = np.stack(
        [
            np.concatenate([originals, blank]).reshape(rows, cols, *originals.shape[1:]),
            np.concatenate([reconstructions, blank]).reshape(rows, cols, *originals.shape[1:]),
        ],
        axis=1,
    )  # [rows, 2, cols, H, W, C]: each original row followed by its reconstructions
    cells = pairs.reshape(rows * 2 * cols, *originals.shape[1:])
    return make_grid(cells, cols, padding=padding, pad_value=pad_value)


def save_png(path: str | os.PathLike, image: Any) -> None:
    """Writes one uint8 [H, W, 3] (or [H, W, 1], [H, W]) image as a PNG, creating folders."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"save_png needs uint8 [H, W, C], got {image.dtype} {list(image.shape)}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
