"""Image helpers: uint8 conversion, grid layout and padding, reconstruction grids, PNG files."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle_jax.images import make_grid, reconstruction_grid, save_png, to_uint8


def constant_images(values, height=2, width=3, channels=3) -> np.ndarray:
    """uint8 [N, H, W, C], image i filled with values[i] (so cells are easy to tell apart)."""
    return np.stack([np.full((height, width, channels), v, dtype=np.uint8) for v in values]).astype(
        np.uint8
    )


def cell(grid, row, col, *, height=2, width=3, padding=1) -> np.ndarray:
    top, left = padding + row * (height + padding), padding + col * (width + padding)
    return grid[top : top + height, left : left + width]


def test_to_uint8_maps_both_value_ranges_and_clips():
    unit = np.array([0.0, 0.25, 1.0, 1.3, -0.2], np.float32)
    assert to_uint8(unit, value_range=(0, 1)).tolist() == [0, 64, 255, 255, 0]
    signed = jnp.array([-1.0, -0.5, 1.0, 2.0], jnp.float32)
    out = to_uint8(signed, value_range=(-1, 1))
    assert out.dtype == np.uint8 and out.tolist() == [0, 64, 255, 255]
    images = np.zeros((2, 4, 5, 3), np.float32)
    assert to_uint8(images, value_range=(0, 1)).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="high > low"):
        to_uint8(unit, value_range=(1, 0))


def test_make_grid_layout_shape_and_padding():
    images = constant_images([10, 20, 30, 40, 50])
    grid = make_grid(images, cols=3, padding=1, pad_value=255)
    # 2 rows of 3 columns: (2 * (2 + 1) + 1, 3 * (3 + 1) + 1)
    assert grid.shape == (7, 13, 3) and grid.dtype == np.uint8
    for index, value in enumerate([10, 20, 30, 40, 50]):
        row, col = divmod(index, 3)
        assert (cell(grid, row, col) == value).all(), (row, col)
    assert (cell(grid, 1, 2) == 255).all()  # the empty sixth cell
    # Everything outside the five cells is padding.
    assert (grid != 255).sum() == 5 * 2 * 3 * 3
    assert (grid[0] == 255).all() and (grid[-1] == 255).all()
    assert (grid[:, 0] == 255).all() and (grid[:, -1] == 255).all()


def test_make_grid_without_padding_is_a_block_layout():
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 2, 3), dtype=np.uint8)
    grid = make_grid(images, cols=2, padding=0)
    top = np.concatenate([images[0], images[1]], axis=1)
    bottom = np.concatenate([images[2], images[3]], axis=1)
    expected = np.concatenate([top, bottom], axis=0)
    np.testing.assert_array_equal(grid, expected)


def test_make_grid_uses_fewer_columns_for_fewer_images_and_checks_input():
    grid = make_grid(constant_images([1, 2]), cols=8, padding=2, pad_value=0)
    assert grid.shape == (2 + 2 + 2, 2 * (3 + 2) + 2, 3)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, C\]"):
        make_grid(np.zeros((2, 2, 3, 3), np.float32), cols=2)
    with pytest.raises(ValueError, match="at least one image"):
        make_grid(np.zeros((0, 2, 3, 3), np.uint8), cols=2)


def test_reconstruction_grid_puts_each_row_of_originals_above_its_reconstructions():
    originals = constant_images([1, 2, 3, 4, 5])
    reconstructions = constant_images([101, 102, 103, 104, 105])
    grid = reconstruction_grid(originals, reconstructions, cols=3, padding=1, pad_value=255)
    assert grid.shape == (4 * 3 + 1, 3 * 4 + 1, 3)
    expected_rows = [[1, 2, 3], [101, 102, 103], [4, 5, 255], [104, 105, 255]]
    for row, values in enumerate(expected_rows):
        for col, value in enumerate(values):
            assert (cell(grid, row, col) == value).all(), (row, col)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_grid(originals, reconstructions[:4])


def test_save_png_round_trip(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "nested" / "grid.png"
    save_png(path, image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "bad.png", image.astype(np.float32))
