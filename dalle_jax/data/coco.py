"""MS-COCO 2014 captions with Karpathy and Li's splits, through tfds's own `coco_captions` builder.

The dataset: 123,287 images of varying size, each with 5 to 7 English captions, in four splits
(`train` 82,783 from `train2014/`; `val` 5,000, `test` 5,000 and `restval` 30,504 from `val2014/`).
`CocoCaptions` is tfds's `coco_captions` builder (`tensorflow_datasets.object_detection.
coco_captions.CocoCaptions`), same name, config (`2014`), version, features and on-disk layout,
with two changes: it takes the COCO files from a local directory when they are there, and it
never fetches the 20 GB of `test2014`/`test2015` images that the parent `coco` builder asks for
but the caption splits do not use.

Preparing needs TensorFlow (the parent builder names `tf.int64` in its features), so it needs the
`[coco]` extra: `pip install 'dalle-jax[coco]'`. Reading a prepared copy does not: without
TensorFlow, `CocoCaptions(data_dir=...)` returns a read-only builder over the array_record files
(`download_and_prepare()` on it is a no-op; preparing again is a `UserError` naming the extra),
so training can run in a TensorFlow-free environment on data prepared in another.

Preparing real COCO offline
---------------------------
Get these four official files (about 20 GB) on a machine with internet access:

    http://images.cocodataset.org/zips/train2014.zip
    http://images.cocodataset.org/zips/val2014.zip
    http://images.cocodataset.org/annotations/annotations_trainval2014.zip
    https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip

and put them, as zips or extracted, in one directory (the "manual directory"):

    COCO_DIR/train2014.zip                      or  COCO_DIR/train2014/COCO_train2014_*.jpg
    COCO_DIR/val2014.zip                        or  COCO_DIR/val2014/COCO_val2014_*.jpg
    COCO_DIR/annotations_trainval2014.zip       or  COCO_DIR/annotations/instances_train2014.json
                                                    COCO_DIR/annotations/instances_val2014.json
    COCO_DIR/caption_datasets.zip               or  COCO_DIR/dataset_coco.json

(extracted folders are used in place; zips are unpacked under `DATA_DIR/downloads/extracted`).
Captions come from `dataset_coco.json`; the `instances_*.json` files give the image list and
boxes. Then prepare once:

    builder = CocoCaptions(data_dir=DATA_DIR, manual_dir=COCO_DIR)
    builder.download_and_prepare()      # writes DATA_DIR/coco_captions/2014/1.1.0/*.array_record
    source = builder.as_data_source("train")

`manual_dir` may also be given as `download_config=tfds.download.DownloadConfig(manual_dir=...)`.
With a manual directory given, every file must be in it (a missing one is a `UserError`, not a
download). Without one, files found in tfds's default `DATA_DIR/downloads/manual/` are used and
the rest are downloaded from the URLs above.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import read_only_builder as tfds_read_only_builder
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.object_detection import coco_captions as tfds_coco_captions

from dalle_jax.errors import UserError

logger = logging.getLogger(__name__)

DATASET_NAME = "coco_captions"
SPLITS = ("train", "val", "test", "restval")


@dataclasses.dataclass(frozen=True)
class _OfficialFile:
    """One official COCO download, found locally as its zip or as the folder it extracts to."""

    zip_name: str  # the last part of its URL
    extracted: tuple[str, ...]  # paths, relative to the manual directory, that the zip unpacks to


# The files the caption splits read. The parent `coco` builder also asks for test2014.zip,
# test2015.zip and their image_info zips, but `coco_captions` only uses train and val.
OFFICIAL_FILES = (
    _OfficialFile("train2014.zip", ("train2014",)),
    _OfficialFile("val2014.zip", ("val2014",)),
    _OfficialFile(
        "annotations_trainval2014.zip",
        ("annotations/instances_train2014.json", "annotations/instances_val2014.json"),
    ),
    _OfficialFile("caption_datasets.zip", ("dataset_coco.json",)),
)
_NEEDED = {f.zip_name for f in OFFICIAL_FILES}

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the official COCO 2014 files in the manual directory, each as its zip or extracted:
train2014.zip (or train2014/), val2014.zip (or val2014/), annotations_trainval2014.zip (or
annotations/instances_train2014.json and annotations/instances_val2014.json) and Karpathy's
caption_datasets.zip (or dataset_coco.json).
"""

_EXTRA_HINT = "pip install 'dalle-jax[coco]'"


def _find_local_files(
    dl_manager: Any, manual_dir: epath.Path
) -> tuple[dict[str, epath.Path], list[str]]:
    """Official zip name -> the directory it is (or was) extracted to, and the names not found."""
    found: dict[str, epath.Path] = {}
    missing: list[str] = []
    for official in OFFICIAL_FILES:
        if all((manual_dir / p).exists() for p in official.extracted):
            found[official.zip_name] = manual_dir
        elif (manual_dir / official.zip_name).exists():
            found[official.zip_name] = epath.Path(
                dl_manager.extract(manual_dir / official.zip_name)
            )
        else:
            missing.append(official.zip_name)
    return found, missing


class _CaptionFilesOnly:
    """Stands in for the download manager that the parent builders' `_split_generators` call.

    It answers `download_and_extract` from local files where it has them, downloads the other
    needed files through the real manager, and gives a never-opened placeholder for the test-set
    files that the caption splits do not read. Anything else goes to the real manager.
    """

    def __init__(self, dl_manager: Any, local: Mapping[str, epath.Path]):
        self._dl_manager = dl_manager
        self._local = dict(local)

    def download_and_extract(self, urls: Mapping[str, str]) -> dict[str, epath.Path]:
        names = {key: posixpath.basename(url) for key, url in urls.items()}
        to_fetch = {
            key: url
            for key, url in urls.items()
            if names[key] in _NEEDED and names[key] not in self._local
        }
        fetched = self._dl_manager.download_and_extract(to_fetch) if to_fetch else {}
        unused = epath.Path(self._dl_manager.download_dir) / "not-needed-for-coco-captions"
        paths = {}
        for key, name in names.items():
            if name in self._local:
                paths[key] = self._local[name]
            elif key in fetched:
                paths[key] = epath.Path(fetched[key])
            else:
                paths[key] = unused / name
        return paths

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dl_manager, name)


class CocoCaptionsBuilder(tfds_coco_captions.CocoCaptions, skip_registration=True):
    """tfds's `coco_captions` builder that reads local COCO files and skips the unused test sets.

    Same `name`, config, version and features as the parent, so what it writes is what
    `tfds.builder("coco_captions")` would write. Features per example: `image` uint8 [H, W, 3]
    (JPEG), `image/filename` str, `image/id` int64, `objects` (boxes), `captions` {`text`: str
    [N], `id`: int64 [N]}.
    """

    name = DATASET_NAME
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, manual_dir: epath.PathLike | None = None, **kwargs: Any):
        """`manual_dir`: where the official COCO files are (see the module docstring)."""
        super().__init__(**kwargs)
        self._manual_dir = epath.Path(manual_dir) if manual_dir is not None else None
        self._manual_dir_given = False
        # tfds pickles a builder as the arguments it was made with.
        self._original_state = dict(
            self._original_state,
            manual_dir=manual_dir,
            file_format=kwargs.get("file_format"),
        )

    @tfds_utils.classproperty
    @classmethod
    def _checksums_path(cls) -> epath.Path:
        # The official files' sizes and sha256, as shipped with tfds for its own builder (the
        # default would look beside this module).
        return tfds_utils.tfds_path() / "url_checksums" / f"{DATASET_NAME}.txt"

    def download_and_prepare(
        self,
        *,
        download_dir: epath.PathLike | None = None,
        download_config: tfds.download.DownloadConfig | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes the splits under `data_dir`; a no-op when they are already there."""
        config = download_config or tfds.download.DownloadConfig()
        if config.manual_dir is None and self._manual_dir is not None:
            config = dataclasses.replace(config, manual_dir=self._manual_dir)
        self._manual_dir_given = config.manual_dir is not None
        super().download_and_prepare(download_dir=download_dir, download_config=config, **kwargs)

    def _split_generators(self, dl_manager: Any):
        manual_dir = epath.Path(dl_manager._manual_dir)
        if self._manual_dir_given and not manual_dir.is_dir():
            raise UserError(
                f"COCO manual directory {manual_dir} does not exist; "
                "point manual_dir at the folder holding train2014/, val2014/, annotations/ and "
                "dataset_coco.json (or their official zips)"
            )
        local, missing = (
            _find_local_files(dl_manager, manual_dir) if manual_dir.is_dir() else ({}, [])
        )
        if missing and self._manual_dir_given:
            raise UserError(
                f"COCO manual directory {manual_dir} lacks {', '.join(missing)}; "
                "put each official file there, as its zip or extracted "
                "(see dalle_jax/data/coco.py for the layout)"
            )
        if missing:
            logger.info("COCO files not in %s, to be downloaded: %s", manual_dir, missing)
        return super()._split_generators(_CaptionFilesOnly(dl_manager, local))


class _PreparedCocoCaptions(tfds_read_only_builder.ReadOnlyBuilder, skip_registration=True):
    """A prepared copy read without TensorFlow (`builder_from_directory`); it cannot re-prepare."""

    def download_and_prepare(
        self, *, download_config: tfds.download.DownloadConfig | None = None, **kwargs: Any
    ) -> None:
        """A no-op on the prepared copy; preparing it again is a `UserError` naming the extra."""
        mode = (download_config or tfds.download.DownloadConfig()).download_mode
        if mode.overwrite_dataset:
            raise UserError(
                f"preparing {DATASET_NAME!r} again needs TensorFlow, which is not installed: "
                f"install the [coco] extra ({_EXTRA_HINT})"
            )
        super().download_and_prepare(download_config=download_config, **kwargs)


def _tensorflow_available() -> bool:
    """Whether `import tensorflow` would find a module, without importing it."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # a blocked import, or a module without a spec
        return False


def _config_name(config: str | tfds.core.BuilderConfig | None) -> str:
    names = [c.name for c in CocoCaptionsBuilder.BUILDER_CONFIGS]
    name = names[0] if config is None else getattr(config, "name", config)
    if name not in names:
        raise ValueError(f"unknown config {name!r} for {DATASET_NAME}")
    return name


def CocoCaptions(  # a class-like name: the registry calls it like a builder class
    *,
    data_dir: epath.PathLike,
    file_format: str = "array_record",
    config: str | tfds.core.BuilderConfig | None = None,
    version: str | None = None,
    manual_dir: epath.PathLike | None = None,
) -> tfds.core.DatasetBuilder:
    """The `coco_captions` builder storing its files under `data_dir`.

    With TensorFlow installed: a `CocoCaptionsBuilder`, ready to `download_and_prepare()` (from
    `manual_dir` when given) and read with `as_data_source(split)`. Without TensorFlow: a
    read-only builder over a copy already prepared under `data_dir`, else a `UserError` naming
    the `[coco]` extra.
    """
    if _tensorflow_available():
        return CocoCaptionsBuilder(
            data_dir=data_dir,
            file_format=file_format,
            config=config,
            version=version,
            manual_dir=manual_dir,
        )
    config_name = _config_name(config)
    version = version or str(CocoCaptionsBuilder.BUILDER_CONFIGS[0].version)
    prepared = epath.Path(data_dir) / DATASET_NAME / config_name / version
    if (prepared / "dataset_info.json").exists():
        return _PreparedCocoCaptions(prepared)
    raise UserError(
        f"dataset {DATASET_NAME!r} is not prepared under {prepared} and preparing it needs "
        f"TensorFlow, which is not installed: install the [coco] extra ({_EXTRA_HINT})"
    )


CocoCaptions.BUILDER_CONFIGS = CocoCaptionsBuilder.BUILDER_CONFIGS  # read by registry.builder


_MASK64 = (1 << 64) - 1


def _mix(index: int) -> int:
    """splitmix64's finaliser: a cheap, fixed scramble of a non-negative integer."""
    z = (int(index) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def normalize(example: dict, index: int) -> dict:
    """One COCO example -> `{"image": uint8 [H, W, 3], "caption": str}`.

    `example` is a record from `as_data_source(split)`: `image` uint8 [H, W, 3] (or [H, W] /
    [H, W, 1] for the few grayscale JPEGs, when not already expanded), `captions["text"]` the
    image's 5 to 7 captions (bytes or str). The caption is picked by a fixed scramble of `index`,
    so the same index always gives the same caption, and an index that advances by the dataset
    size each epoch (the position in a repeated stream) walks through all of an image's captions
    even when the dataset size is a multiple of the caption count. Passing the record index
    instead always picks the same caption for an image. Images keep their size: resizing
    happens later in the input pipeline.
    """
    image = np.asarray(example["image"])
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        # PIL hands back RGBA or CMYK JPEGs with four channels; keeping three beats failing
        # mid-epoch on one odd file.
        image = image[..., :3]
    captions = example["captions"]["text"]
    if len(captions) == 0:
        raise ValueError(f"COCO image {example.get('image/filename')!r} has no captions")
    caption = captions[_mix(index) % len(captions)]
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8")
    return {"image": image.astype(np.uint8, copy=False), "caption": str(caption)}
