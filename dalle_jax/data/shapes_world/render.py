"""Draws a shapes_world scene: pure PIL + numpy, deterministic.

Objects are drawn at 4x with hard edges and box-filtered down, so each output pixel is the
exact area-weighted mix of background and object color: interiors keep the palette color
exactly and edges are anti-aliased. Centers lie on a quarter-pixel grid (`CENTER_QUANTUM`),
so every edge falls on a whole pixel of the 4x canvas.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from dalle_jax.data.shapes_world.spec import BACKGROUNDS, COLORS, Scene, object_extent

SUPERSAMPLING = 4


def _outline(shape: str, left: int, top: int, side: int) -> list[tuple[int, int]] | None:
    """Polygon of a triangle or diamond in a `side`² box of the 4x canvas, else None.

    Apexes are two pixels wide so the polygon is exactly left-right symmetric on the
    pixel grid (a single apex pixel would sit half a pixel off the axis).
    """
    right, bottom = left + side - 1, top + side - 1
    mid_x, mid_y = left + side // 2, top + side // 2  # side is a multiple of 4, so even
    if shape == "triangle":  # upright isosceles, base along the bottom, width = height
        return [(left, bottom), (right, bottom), (mid_x, top), (mid_x - 1, top)]
    if shape == "diamond":  # a square rotated 45 degrees
        return [
            (mid_x - 1, top),
            (mid_x, top),
            (right, mid_y - 1),
            (right, mid_y),
            (mid_x, bottom),
            (mid_x - 1, bottom),
            (left, mid_y),
            (left, mid_y - 1),
        ]
    return None


def render_scene(scene: Scene, image_size: int | None = None) -> np.ndarray:
    """The scene as an image: uint8 [S, S, 3], S = `image_size` (default `scene.image_size`).

    Object geometry is in pixels of `scene.image_size`; passing another `image_size` is an
    error rather than a silent rescale.
    """
    size = scene.image_size if image_size is None else image_size
    if size != scene.image_size:
        raise ValueError(f"scene was sampled for {scene.image_size} px, asked to render {size}")
    canvas = Image.new("RGB", (size * SUPERSAMPLING,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        extent = object_extent(obj.size, size)
        side = extent * SUPERSAMPLING
        left = round((obj.center[0] - extent / 2) * SUPERSAMPLING)
        top = round((obj.center[1] - extent / 2) * SUPERSAMPLING)
        color = COLORS[obj.color]
        box = (left, top, left + side - 1, top + side - 1)  # PIL boxes include both ends
        if obj.shape == "circle":
            draw.ellipse(box, fill=color)
        elif obj.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            outline = _outline(obj.shape, left, top, side)
            if outline is None:
                raise ValueError(f"unknown shape {obj.shape!r}")
            draw.polygon(outline, fill=color)
    return np.asarray(canvas.reduce(SUPERSAMPLING), dtype=np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image (deterministic for a given Pillow)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=6
    )
    return buffer.getvalue()
