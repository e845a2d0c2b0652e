"""`train data`: prepare a dataset once (generate or download, write array_record files).

Training reads the prepared files with grain, without TensorFlow and without the network.
Where they go: `--data-dir`, else `$DALLE_JAX_DATA_DIR`, else tfds's `~/tensorflow_datasets`.
"""

from __future__ import annotations

import argparse
import logging

HELP = "Prepare a dataset (generate or download it, write array_record files) for training."


def no_default(help_text: str) -> str:
    """Help for a flag whose default is None: `train`'s formatter would add "(default: None)".

    A help text that mentions `%(default)` is left alone by `ArgumentDefaultsHelpFormatter`;
    `%(default).0s` mentions it and prints nothing.
    """
    return help_text + "%(default).0s"


_DATA_DIR_HELP = no_default(
    "directory holding prepared datasets (default: $DALLE_JAX_DATA_DIR, else ~/tensorflow_datasets)"
)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """`--data-dir`, shared by every subcommand that reads a prepared dataset."""
    parser.add_argument("--data-dir", default=None, metavar="DIR", help=_DATA_DIR_HELP)


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """`--folder` and `--image-size`: what names an `image_folder` dataset (prepare and read)."""
    parser.add_argument(
        "--folder",
        default=None,
        metavar="DIR",
        help=no_default("image_folder only: the folder of your images and their captions"),
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="S",
        help=no_default(
            "image_folder only: side S of the square images it is prepared at (center-cropped, "
            "resized; default: the builder's, 64)"
        ),
    )


def builder_kwargs(args: argparse.Namespace) -> dict:
    """The dataset flags the user gave, as builder keyword arguments (each takes its own)."""
    from dalle_jax.data import registry
    from dalle_jax.errors import UserError

    flags = {
        "folder": getattr(args, "folder", None),
        "image_size": getattr(args, "image_size", None),
        "manual_dir": getattr(args, "manual_dir", None),
    }
    kwargs = {key: value for key, value in flags.items() if value is not None}
    if registry.split_name(args.dataset)[0] == "image_folder" and "folder" not in kwargs:
        raise UserError("dataset 'image_folder' needs --folder DIR (the folder of your images)")
    return kwargs


def folder_builder_kwargs(
    args: argparse.Namespace, dataset: str, *, image_size_resizes: bool = False
) -> dict:
    """`--folder`/`--image-size` as builder arguments of `dataset`, for the commands that read
    a dataset named by a job config (`registry.folder_kwargs`)."""
    from dalle_jax.data import registry

    return registry.folder_kwargs(
        dataset,
        folder=args.folder,
        image_size=args.image_size,
        image_size_resizes=image_size_resizes,
    )


class _DropTfdsNoise(logging.Filter):
    """Drops tfds' absl warnings that are normal here (a first prepare, no OpenCV, ...)."""

    NOISE = (
        "Variant folder",
        "Using custom data configuration",
        "OpenCV is not installed",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def quiet_tfds_noise() -> None:
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropTfdsNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_DropTfdsNoise())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dalle_jax.data.registry import DATASETS

    known = "; ".join(f"{name}: {spec.description}" for name, spec in DATASETS.items())
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help=no_default(
            "dataset name, optionally with a config after a slash (shapes_world/64). "
            f"Known: {known}"
        ),
    )
    add_data_dir_argument(parser)
    add_folder_arguments(parser)
    parser.add_argument(
        "--manual-dir",
        default=None,
        metavar="DIR",
        help=no_default(
            "coco_captions only: folder with the COCO zips or extracted folders (see its docs)"
        ),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="prepare again even if a prepared copy exists (reuses downloaded files; use it "
        "after changing an image folder)",
    )


def run(args: argparse.Namespace) -> int:
    import tensorflow_datasets as tfds

    from dalle_jax.data import registry
    from dalle_jax.data.pipeline import default_data_dir
    from dalle_jax.errors import UserError

    quiet_tfds_noise()
    data_dir = args.data_dir or default_data_dir()
    kwargs = builder_kwargs(args)
    try:
        builder = registry.builder(args.dataset, data_dir=data_dir, **kwargs)
    except TypeError as e:  # a flag this dataset's builder does not take
        flags = ", ".join("--" + key.replace("_", "-") for key in kwargs)
        raise UserError(f"dataset {args.dataset!r} does not take {flags} ({e})") from e

    if builder.is_prepared() and not args.overwrite:
        print(f"{args.dataset} is already prepared in {builder.data_dir} (--overwrite to redo)")
    else:
        print(f"preparing {args.dataset} in {builder.data_dir} ...", flush=True)
        tfds.display_progress_bar(True)
        if args.overwrite:
            # Regenerate the dataset but keep downloaded (or manually placed) source files.
            config = tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS,
                manual_dir=args.manual_dir,
            )
            builder.download_and_prepare(download_config=config)
        else:
            builder.download_and_prepare()
    for name, split in sorted(builder.info.splits.items()):
        print(f"  {name}: {split.num_examples} examples")
    return 0
