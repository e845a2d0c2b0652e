"""The datasets this project knows, by user-facing name, and how to build and read each one.

Every dataset is a tfds builder prepared with `file_format="array_record"`, so it is read
through `builder.as_data_source(split)` (random access, no TensorFlow) and fed to grain.

A name may carry a builder config after a slash: `shapes_world/64`, `emoji/32`.
Each builder module exposes `normalize(example: dict, index: int) -> {"image": uint8 [H, W, 3],
"caption": str}` so the input pipeline treats every dataset alike (COCO has five captions
per image and variable-size images; synthetic sets have one caption and a fixed size).

The commands ask for the splits `train` and `validation`; a dataset that names its held-out
split otherwise declares an alias (COCO: `validation` reads Karpathy's `val`), and one whose
training set spans several splits declares their union (COCO: `train` reads `train+restval`),
see `resolve_split`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Collection
from typing import Any

from dalle_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to reach one dataset: `module` defines `builder_class` and `normalize`."""

    name: str
    module: str
    builder_class: str
    description: str
    extra: str | None = None  # the pip extra it needs, if any
    # (name the commands ask for, the dataset's own name): the commands evaluate on
    # "validation" and `train dalle` reads DATA/validation, whatever a dataset calls that split.
    split_aliases: tuple[tuple[str, str], ...] = ()
    # (name the commands ask for, the splits it reads together): COCO's "train" is Karpathy's
    # 113,287 training images, his `train` and `restval` splits read as one.
    split_unions: tuple[tuple[str, tuple[str, ...]], ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "shapes_world",
            "dalle_jax.data.shapes_world.builder",
            "ShapesWorld",
            "procedural colored shapes with compositional hold-out (configs 32, 64, 128)",
        ),
        DatasetSpec(
            "emoji",
            "dalle_jax.data.emoji.builder",
            "Emoji",
            "Noto, Twemoji and OpenMoji emoji with CLDR names (configs 32, 64)",
        ),
        DatasetSpec(
            "image_folder",
            "dalle_jax.data.image_folder.builder",
            "CaptionedImageFolder",
            "your own images with captions in .txt sidecars or captions.jsonl/.tsv",
        ),
        DatasetSpec(
            "coco_captions",
            "dalle_jax.data.coco",
            "CocoCaptions",
            "MS-COCO 2014 captions, Karpathy splits (needs the [coco] extra: TensorFlow)",
            extra="coco",
            split_aliases=(("validation", "val"),),
            split_unions=(("train", ("train", "restval")),),
        ),
    ]
}


def split_name(name: str) -> tuple[str, str | None]:
    """`"shapes_world/64"` -> `("shapes_world", "64")`; a bare name has no config."""
    base, _, config = name.partition("/")
    return base, (config or None)


def spec(name: str) -> DatasetSpec:
    """The spec of a dataset name (config suffix allowed); unknown names list the known ones."""
    base, _ = split_name(name)
    if base not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise UserError(f"unknown dataset {base!r}; known datasets: {known}")
    return DATASETS[base]


def resolve_split(name: str, split: str, available: Collection[str]) -> str:
    """The split of dataset `name` that a request for `split` reads, in tfds's split syntax:
    the splits the dataset reads together for it when it declares them and has them all
    (COCO's "train+restval" for "train"), else `split` itself when the dataset has it, else the
    dataset's own name for it (COCO's "val" for "validation"), else `split` unchanged (the
    caller reports it missing)."""
    union = dict(spec(name).split_unions).get(split)
    if union and all(part in available for part in union):
        return "+".join(union)
    if split in available:
        return split
    own = dict(spec(name).split_aliases).get(split)
    return own if own in available else split


def folder_kwargs(
    name: str, *, folder: str | None, image_size: int | None, image_size_resizes: bool = False
) -> dict[str, Any]:
    """The `--folder DIR --image-size S` flags of a command reading dataset `name`, as builder
    keyword arguments. They name an image_folder dataset, which needs the folder; given for
    another dataset they are a `UserError`, except the image size where the command itself
    resizes other datasets' images (`image_size_resizes`: it is then not a builder argument)."""
    is_folder = split_name(name)[0] == "image_folder"
    if image_size_resizes and not is_folder:
        image_size = None
    given = {"folder": folder, "image_size": image_size}
    kwargs = {key: value for key, value in given.items() if value is not None}
    if not is_folder and kwargs:
        flags = ", ".join("--" + key.replace("_", "-") for key in kwargs)
        raise UserError(f"{flags}: image_folder only, but the dataset is {name!r}")
    if is_folder and "folder" not in kwargs:
        raise UserError("dataset 'image_folder' needs --folder DIR (the folder of your images)")
    return kwargs


def module(name: str) -> Any:
    """Imports the module behind a dataset, naming the extra to install when it is missing."""
    dataset = spec(name)
    try:
        return importlib.import_module(dataset.module)
    except ModuleNotFoundError as e:
        if dataset.extra:
            raise UserError(
                f"dataset {dataset.name!r} needs the [{dataset.extra}] extra "
                f"(missing module {e.name!r}): pip install 'dalle-jax[{dataset.extra}]'"
            ) from e
        raise


def builder(name: str, *, data_dir: str, **builder_kwargs: Any):
    """The tfds builder for `name` (`base/config`), storing array_record files under `data_dir`."""
    _, config = split_name(name)
    cls = getattr(module(name), spec(name).builder_class)
    if config is not None:
        builder_kwargs.setdefault("config", config)
    try:
        return cls(data_dir=data_dir, file_format="array_record", **builder_kwargs)
    except ValueError as e:
        if "config" in str(e).lower():
            configs = ", ".join(c.name for c in getattr(cls, "BUILDER_CONFIGS", []))
            raise UserError(f"dataset {name!r}: {e} (configs: {configs})") from e
        raise


def normalizer(name: str) -> Callable[[dict, int], dict]:
    """`normalize(example, index) -> {"image": uint8 [H, W, 3], "caption": str}` for `name`."""
    return module(name).normalize
