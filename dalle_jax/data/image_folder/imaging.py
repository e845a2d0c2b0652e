"""Reading a user's image file into a square RGB image of a fixed size, or saying it can't."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

# What Pillow raises on a file it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), broken chunks (SyntaxError, ValueError, EOFError), and
# absurd dimensions (DecompressionBombError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class UnreadableImageError(Exception):
    """The file is not an image Pillow can decode."""


def load_square_rgb(path: Path, size: int) -> Image.Image:
    """The image at `path`, upright (EXIF orientation applied), transparency composited over
    white, scaled so its shorter side is `size`, then centre-cropped to `size` x `size`.

    Returns an RGB PIL image of `size` x `size`; raises `UnreadableImageError` if it can't.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # JPEG: decode at a reduced scale (still >= size on both sides): much faster.
                image.draft("RGB", (size, size))
                image.load()
                image = ImageOps.exif_transpose(image)
                return resize_center_crop(to_rgb(image), size)
    except DECODE_ERRORS as e:
        raise UnreadableImageError(f"{path}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (not black, as a bare convert would)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scales `image` so its shorter side is `size` and crops the centre `size` x `size`."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
