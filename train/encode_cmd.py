"""`train encode`: encode a prepared dataset once into stage-2 records (text ids + image ids).

Writes `OUT/<split>/encoded-*.array_record` and `OUT/<split>/metadata.json` for each split;
the transformer's training reads them with `dalle_jax.data.pipeline.encoded_dataset`.
"""

from __future__ import annotations

import argparse

from train.data_cmd import add_data_dir_argument, add_folder_arguments, no_default
from train.run_flags import add_distributed_arguments, start_distributed

HELP = "Encode a prepared dataset once into stage-2 records: caption ids + vqvae image ids."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vqvae",
        required=True,
        metavar="DIR",
        help=no_default("a `train vqvae` workdir (its latest checkpoint) or a checkpoint folder"),
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="FILE",
        help=no_default("the sentencepiece .model file written by `train tokenizer`"),
    )
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help=no_default("a dataset prepared with `train data`, e.g. shapes_world/64"),
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help=no_default("output folder: one subfolder of records per split"),
    )
    parser.add_argument(
        "--splits",
        default="train,validation",
        metavar="A,B",
        help="comma-separated splits to encode",
    )
    parser.add_argument(
        "--text-length",
        type=int,
        default=32,
        metavar="T",
        help="caption ids per record (longer captions are cut, shorter ones padded)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        metavar="B",
        help="images per encoding step, over all devices (rounded up to a multiple of the "
        "device count)",
    )
    add_data_dir_argument(parser)
    add_folder_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace records already in the output folders",
    )
    add_distributed_arguments(parser)


def run(args: argparse.Namespace) -> int:
    start_distributed(args)  # before anything touches a device
    import jax

    from dalle_jax.encode import encode_dataset
    from train.data_cmd import builder_kwargs, quiet_tfds_noise

    quiet_tfds_noise()
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    written = encode_dataset(
        args.vqvae,
        args.tokenizer,
        args.dataset,
        args.out,
        splits=splits,
        text_length=args.text_length,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        builder_kwargs=builder_kwargs(args),
        overwrite=args.overwrite,
    )
    for split, metadata in written.items() if jax.process_index() == 0 else ():
        h, w = metadata.image_grid
        print(
            f"{split}: {metadata.count} records in {len(metadata.shards)} shard(s) -> "
            f"{args.out}/{split} (text {metadata.text_length} ids of {metadata.text_vocab_size}, "
            f"image {h}x{w} ids of {metadata.image_vocab_size})"
        )
    return 0
