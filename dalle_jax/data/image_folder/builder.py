"""The `image_folder` dataset: your own images with your own captions.

    builder = registry.builder("image_folder", data_dir=D, folder="~/my_pictures", image_size=64)
    # or: registry.builder("image_folder/64", data_dir=D, folder="~/my_pictures")
    builder.download_and_prepare()
    source = builder.as_data_source("train")     # and "validation"
    counts(builder)                              # what was written and what was skipped

The folder is a builder kwarg (`folder=`), with `image_size=` (default 64; a config name such
as "64" means the same) and `validation_fraction=` (default 0.02). Captions come from sidecar
`.txt` files, `captions.jsonl` or `captions.tsv` (see `captions.py` for the formats).

Each image is made upright, composited over white if transparent, scaled so its shorter side is
`image_size`, centre-cropped and stored as PNG. Features: `image` uint8 [S, S, 3],
`captions` (all captions of the image; `normalize` picks one by a scramble of its index),
`path` (relative to the folder).

Splits: `validation` is `validation_fraction` of the readable captioned images (at least one
when there are two or more), chosen by a hash of each image's relative path, so it is stable
and adding images moves few others; `train` is the rest. With a single image there is only
`train` (tfds cannot write an empty split).

Never fails on bad data: unreadable images, caption entries whose image is missing, images
with no caption, malformed caption lines and blank captions are skipped and counted; the counts
are logged in one line and kept with the dataset (`counts(builder)`). A folder with nothing
usable is a `UserError`.

The prepared dataset lives under `D/captioned_image_folder/<folder name>_<hash>_<size>/`, the
hash covering the folder's absolute path, the size and the validation fraction: the same
arguments read it back (the folder need not exist then). A prepared dataset is reused as is;
after changing the folder's contents, rebuild with
`download_and_prepare(download_config=tfds.download.DownloadConfig(
download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from dalle_jax.data.image_folder import captions as captions_lib
from dalle_jax.data.image_folder import imaging
from dalle_jax.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 64
DEFAULT_VALIDATION_FRACTION = 0.02


@dataclasses.dataclass(eq=False, kw_only=True)
class CaptionedImageFolderConfig(tfds.core.BuilderConfig):
    """Which folder, at which size. (Not frozen: tfds' BuilderConfig base class is mutable.)

    folder: absolute path of the source folder.
    image_size: side S of the stored square images.
    validation_fraction: share of images held out, in (0, 1).
    """

    folder: str
    image_size: int = DEFAULT_IMAGE_SIZE
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION

    @classmethod
    def for_folder(
        cls, folder: str | Path, image_size: int, validation_fraction: float
    ) -> CaptionedImageFolderConfig:
        """A config named after the folder, e.g. `my_pictures_1a2b3c4d_64`."""
        if not isinstance(image_size, int) or image_size < 1:
            raise UserError(f"image_size must be a positive integer, got {image_size!r}")
        if not 0 < validation_fraction < 1:
            raise UserError(
                f"validation_fraction must be between 0 and 1 (exclusive), "
                f"got {validation_fraction!r}"
            )
        path = Path(folder).expanduser().resolve()
        digest = hashlib.sha256(f"{path}|{image_size}|{validation_fraction}".encode())
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", path.name)[:40].strip("_") or "folder"
        return cls(
            name=f"{slug}_{digest.hexdigest()[:8]}_{image_size}",
            description=f"{path} at {image_size}x{image_size}",
            folder=str(path),
            image_size=image_size,
            validation_fraction=validation_fraction,
        )


class CaptionedImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images and captions from a folder of your own; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(
        self,
        *,
        folder: str | Path | None = None,
        image_size: int | None = None,
        validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
        config: str | CaptionedImageFolderConfig | None = None,
        **kwargs,
    ):
        """`folder` is required unless `config` is a ready `CaptionedImageFolderConfig`; a
        string `config` is an image size ("64"), as in the dataset name `image_folder/64`."""
        if not isinstance(config, CaptionedImageFolderConfig):
            if folder is None:
                raise UserError(
                    "dataset 'image_folder' needs the folder of images: pass folder=PATH"
                )
            config = CaptionedImageFolderConfig.for_folder(
                folder, _image_size(config, image_size), validation_fraction
            )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description="Captioned images from a local folder.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "path": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        config = self.builder_config
        folder = Path(config.folder)
        if not folder.is_dir():
            raise UserError(f"image folder {folder} does not exist or is not a folder")
        candidates, scan = captions_lib.find_captioned_images(folder)
        # A first decode pass, so that unreadable files are out before the split is drawn:
        # a validation split emptied by corrupt files would fail the build.
        readable = []
        for image in candidates:
            try:
                imaging.load_square_rgb(image.path, config.image_size)
            except imaging.UnreadableImageError as e:
                logger.warning("skipping unreadable image %s", e)
                continue
            readable.append(image)
        if not readable:
            raise UserError(_nothing_usable_message(folder, scan, len(candidates)))

        train, validation = split(readable, config.validation_fraction)
        counts = {
            "images": len(readable),
            "train": len(train),
            "validation": len(validation),
            "unreadable": len(candidates) - len(readable),
            **dataclasses.asdict(scan),
        }
        self.info.metadata["counts"] = counts
        logger.info("image_folder %s: %s", folder, format_counts(counts))
        generators = {"train": self._generate_examples(train)}
        if validation:
            generators["validation"] = self._generate_examples(validation)
        else:
            logger.warning("image_folder %s: a single image, so no validation split", folder)
        return generators

    def _generate_examples(
        self, images: Sequence[captions_lib.CaptionedImage]
    ) -> Iterator[tuple[str, dict]]:
        size = self.builder_config.image_size
        for image in images:
            yield (
                image.key,
                {
                    "image": imaging.load_square_rgb(image.path, size),
                    "captions": list(image.captions),
                    "path": image.key,
                },
            )


def _image_size(config: str | None, image_size: int | None) -> int:
    """The image size from a config name ("64") and/or the `image_size` kwarg."""
    if config is None:
        return DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if not str(config).isdigit():
        raise UserError(
            f"image_folder config {config!r} is not an image size; use e.g. image_folder/64"
        )
    if image_size is not None and image_size != int(config):
        raise UserError(f"image_folder/{config} conflicts with image_size={image_size}")
    return int(config)


def _nothing_usable_message(folder: Path, scan: captions_lib.ScanCounts, captioned: int) -> str:
    if scan.image_files == 0 and captioned == 0:
        found = "no image files (.jpg, .png, .webp, ...)"
    elif captioned == 0:
        found = f"{scan.image_files} image files but none with a caption"
    else:
        found = f"{captioned} captioned images but none readable"
    return (
        f"image folder {folder} has no usable captioned images: found {found}; put images "
        f"there with captions in sidecar .txt files (cat.jpg + cat.txt), "
        f"{captions_lib.JSONL_NAME} or {captions_lib.TSV_NAME}"
    )


def split(
    images: Sequence[captions_lib.CaptionedImage], validation_fraction: float
) -> tuple[list[captions_lib.CaptionedImage], list[captions_lib.CaptionedImage]]:
    """(train, validation): validation is the `round(fraction * n)` images (at least 1 when
    n >= 2, never all) with the lowest hash of their key; both keep `images`' order."""
    n = len(images)
    n_validation = 0 if n < 2 else min(n - 1, max(1, round(validation_fraction * n)))
    ranked = sorted(images, key=lambda image: hashlib.sha256(image.key.encode()).digest())
    held_out = {image.key for image in ranked[:n_validation]}
    train = [image for image in images if image.key not in held_out]
    validation = [image for image in images if image.key in held_out]
    return train, validation


def counts(builder: CaptionedImageFolder) -> dict[str, int]:
    """What the build wrote and skipped: images, train, validation, unreadable, image_files,
    missing_image, uncaptioned, malformed_lines, empty_captions. Kept with the prepared
    dataset (metadata.json), so it survives a reload."""
    return dict(builder.info.metadata["counts"])


def format_counts(counts_: dict[str, int]) -> str:
    """One line: `120 images (train 118, validation 2); skipped: unreadable 1, ...`."""
    skipped = ("unreadable", "missing_image", "uncaptioned", "malformed_lines", "empty_captions")
    return (
        f"{counts_['images']} images (train {counts_['train']}, validation "
        f"{counts_['validation']}) from {counts_['image_files']} image files; skipped: "
        + ", ".join(f"{name} {counts_[name]}" for name in skipped)
    )


def normalize(example: dict, index: int) -> dict:
    """`{"image": uint8 [S, S, 3], "caption": str}`, the caption picked from the image's
    captions by a fixed scramble of `index`: the same index always gives the same caption, and
    the pipeline's index (`epoch * len(source) + source index`) walks through all of them over
    the epochs, even when the dataset size is a multiple of the caption count."""
    texts = example["captions"]
    text = texts[_scramble(index) % len(texts)]
    return {
        "image": np.asarray(example["image"], dtype=np.uint8),
        "caption": text.decode("utf-8") if isinstance(text, bytes) else str(text),
    }


def _scramble(index: int) -> int:
    """splitmix64's finaliser: a cheap, fixed scramble of a non-negative integer."""
    z = (int(index) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)
