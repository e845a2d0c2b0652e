"""The `emoji` dataset: every emoji in three art styles (Noto, Twemoji, OpenMoji), captioned
with its CLDR name, rendered offline from fonts and PNGs installed on this machine.

    builder = registry.builder("emoji/32", data_dir=D)   # configs: 32, 64, tiny32
    builder.download_and_prepare()
    source = builder.as_data_source("train")              # random access, no TensorFlow

Features: `image` uint8 [S, S, 3] (PNG; the glyph cropped, scaled to fit inside a 1/16 margin,
composited over white), `caption` (the CLDR name, with the art style named in about half the
captions: "cold face, twemoji style"), `name` (CLDR name, natural case), `style` (ClassLabel
noto/twemoji/openmoji), `emoji` (the emoji itself).

Splits: `validation` holds about 5% of emoji, chosen by a hash of the emoji without skin tones,
so every style and tone of a validation emoji is held out and its name is never seen in
training. `train` holds the rest.

Sources are found automatically and can be overridden by builder kwargs or environment
variables: `noto_font=` / DALLE_JAX_NOTO_FONT, `twemoji_dir=` / DALLE_JAX_TWEMOJI_DIR,
`openmoji_font=` / DALLE_JAX_OPENMOJI_FONT. A missing source is a `UserError` naming the
package to install. Emoji a source cannot draw are skipped and counted per style and reason;
the counts are logged on one line and kept in `counts(builder)`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dalle_jax.data.emoji import render, sources

logger = logging.getLogger(__name__)

_CAPTION_TEMPLATES = ("{name}", "{name}, {style} style", "{name} emoji", "{name}, {style} emoji")


@dataclasses.dataclass(eq=False, kw_only=True)
class EmojiConfig(tfds.core.BuilderConfig):
    """One variant of the dataset. (Not frozen: tfds' BuilderConfig base class is mutable.)

    image_size: side S of the square images.
    max_emoji: keep only this many emoji (the same ones in every style), for quick tests.
    validation_fraction: share of emoji (grouped over skin tones) held out for validation.
    margin: white border, as a fraction of S, left around the scaled glyph.
    """

    image_size: int = 64
    max_emoji: int | None = None
    validation_fraction: float = 0.05
    margin: float = 1 / 16

    @property
    def margin_pixels(self) -> int:
        return max(1, round(self.margin * self.image_size))


class Emoji(tfds.core.GeneratorBasedBuilder):
    """Noto, Twemoji and OpenMoji emoji with CLDR names; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        EmojiConfig(name="32", description="all emoji at 32x32", image_size=32),
        EmojiConfig(name="64", description="all emoji at 64x64", image_size=64),
        EmojiConfig(
            name="tiny32",
            description="32 emoji at 32x32, for tests",
            image_size=32,
            max_emoji=32,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "64"

    def __init__(
        self,
        *,
        noto_font: str | None = None,
        twemoji_dir: str | None = None,
        openmoji_font: str | None = None,
        **kwargs,
    ):
        """`noto_font`, `twemoji_dir`, `openmoji_font` override where the sources are found."""
        self._source_paths = sources.SourcePaths(noto_font, twemoji_dir, openmoji_font)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "name": tfds.features.Text(),
                    "style": tfds.features.ClassLabel(names=sources.STYLES),
                    "emoji": tfds.features.Text(),
                }
            ),
            homepage="https://unicode.org/emoji/charts/full-emoji-list.html",
            metadata=tfds.core.MetadataDict(),
        )

    def _rasterizers(self) -> dict[str, render.FontRasterizer | render.PngRasterizer]:
        paths = self._source_paths
        openmoji_size = max(128, 2 * self.builder_config.image_size)
        return {
            "noto": render.FontRasterizer(
                sources.noto_font_path(paths.noto_font), render.NOTO_BITMAP_SIZE
            ),
            "twemoji": render.PngRasterizer(sources.twemoji_png_dir(paths.twemoji_dir)),
            "openmoji": render.FontRasterizer(
                sources.openmoji_font_path(paths.openmoji_font), openmoji_size
            ),
        }

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        config = self.builder_config
        rasterizers = self._rasterizers()
        entries = sources.limited(sources.all_emoji(config.validation_fraction), config.max_emoji)
        counts = {
            style: {"images": 0} | {r.value: 0 for r in render.SkipReason} for style in rasterizers
        }
        self.info.metadata["emoji"] = len(entries)
        self.info.metadata["counts"] = counts
        return {
            "train": self._generate_examples(
                [e for e in entries if not e.is_validation], rasterizers, counts
            ),
            "validation": self._generate_examples(
                [e for e in entries if e.is_validation], rasterizers, counts
            ),
        }

    def _generate_examples(
        self,
        entries: Sequence[sources.EmojiEntry],
        rasterizers: dict[str, render.FontRasterizer | render.PngRasterizer],
        counts: dict[str, dict[str, int]],
    ) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        for entry in entries:
            for style, rasterize in rasterizers.items():
                glyph = rasterize(entry.emoji)
                if isinstance(glyph, render.SkipReason):
                    counts[style][glyph.value] += 1
                    continue
                pixels = render.fit_on_white(glyph, config.image_size, config.margin_pixels)
                counts[style]["images"] += 1
                key = f"{style}:{'-'.join(f'{ord(c):x}' for c in entry.emoji)}"
                yield (
                    key,
                    {
                        "image": Image.fromarray(pixels),
                        "caption": caption(entry, style),
                        "name": entry.name,
                        "style": style,
                        "emoji": entry.emoji,
                    },
                )

    def download_and_prepare(self, **kwargs) -> None:
        """Renders and writes the dataset (if not already there), then logs the counts."""
        super().download_and_prepare(**kwargs)
        logger.info("emoji/%s: %s", self.builder_config.name, format_counts(counts(self)))


def caption(entry: sources.EmojiEntry, style: str) -> str:
    """The caption of one example: its CLDR name, the style named in about half of them;
    the template is picked by a hash of (style, emoji), so rebuilding gives the same text."""
    pick = int(sources.unit_hash(f"{style}:{entry.emoji}", "caption") * len(_CAPTION_TEMPLATES))
    return _CAPTION_TEMPLATES[pick].format(name=entry.name, style=style)


def counts(builder: Emoji) -> dict[str, dict[str, int]]:
    """Per style: `images` written and emoji skipped by reason (not_in_source, split_sequence,
    empty). Stored with the prepared dataset (metadata.json), so it survives a reload."""
    return {style: dict(c) for style, c in builder.info.metadata["counts"].items()}


def format_counts(style_counts: dict[str, dict[str, int]]) -> str:
    """One line: `noto 3789 images (skipped: not_in_source 23, ...); twemoji ...`."""
    parts = []
    for style, c in style_counts.items():
        skipped = ", ".join(f"{reason} {n}" for reason, n in c.items() if reason != "images")
        parts.append(f"{style} {c['images']} images (skipped: {skipped})")
    return "; ".join(parts)


def normalize(example: dict, index: int) -> dict:
    """`{"image": uint8 [S, S, 3], "caption": str}` from one record of `as_data_source`."""
    del index  # one caption per example
    text = example["caption"]
    return {
        "image": np.asarray(example["image"], dtype=np.uint8),
        "caption": text.decode("utf-8") if isinstance(text, bytes) else str(text),
    }
