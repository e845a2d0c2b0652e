"""`train tokenizer`: train the sentencepiece text tokenizer on a prepared dataset's captions."""

from __future__ import annotations

import argparse

from train.data_cmd import (
    add_data_dir_argument,
    add_folder_arguments,
    builder_kwargs,
    no_default,
    quiet_tfds_noise,
)

HELP = "Train the sentencepiece text tokenizer on a prepared dataset's captions."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help=no_default(
            "a dataset prepared with `train data` (name[/config], e.g. shapes_world/64)"
        ),
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help=no_default(
            "largest vocabulary to learn, special ids included; small caption sets stop early"
        ),
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=no_default("where to write the sentencepiece .model file"),
    )
    add_data_dir_argument(parser)
    add_folder_arguments(parser)
    parser.add_argument("--split", default="train", help="split whose captions to learn from")
    parser.add_argument(
        "--max-captions",
        type=int,
        default=None,
        metavar="N",
        help=no_default(
            "learn from the first N examples' captions only (default: all of the split)"
        ),
    )
    parser.add_argument(
        "--model-type",
        default="unigram",
        choices=["unigram", "bpe"],
        help="sentencepiece algorithm; bpe learns whole words better on small synthetic "
        "vocabularies (shapes_world), unigram suits natural captions",
    )
    parser.add_argument(
        "--text-length",
        type=int,
        default=32,
        metavar="T",
        help="text length to report caption lengths against (how many captions would be cut)",
    )


def _captions(split, max_captions: int | None, chunk: int = 256):
    """The split's captions, in index order, through the dataset's own normalize()."""
    from dalle_jax.data.pipeline import read_examples

    count = split.num_examples if max_captions is None else min(max_captions, split.num_examples)
    for start in range(0, count, chunk):
        keys = list(range(start, min(start + chunk, count)))
        for index, example in zip(keys, read_examples(split.source, keys), strict=True):
            caption = split.normalize(example, index)["caption"]
            yield caption.decode("utf-8") if isinstance(caption, bytes) else caption


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    from dalle_jax.data.pipeline import open_split
    from dalle_jax.errors import UserError
    from dalle_jax.tokenizer import PAD_ID, TextTokenizer, train_tokenizer

    if args.max_captions is not None and args.max_captions < 1:
        raise UserError(f"--max-captions must be at least 1, got {args.max_captions}")
    if args.text_length < 1:
        raise UserError(f"--text-length must be at least 1, got {args.text_length}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"folder {str(out.parent)!r} for --out does not exist; create it first")

    quiet_tfds_noise()
    split = open_split(args.dataset, args.split, data_dir=args.data_dir, **builder_kwargs(args))
    total = min(args.max_captions or split.num_examples, split.num_examples)
    captions = list(
        tqdm(_captions(split, args.max_captions), total=total, desc="reading captions", unit="ex")
    )
    model = train_tokenizer(captions, args.vocab_size, args.model_type)
    out.write_bytes(model)

    tokenizer = TextTokenizer.from_bytes(model)
    lengths = tokenizer.count_tokens(captions)
    over = int((lengths > args.text_length).sum())
    sample = captions[0]
    sample_ids = tokenizer.encode([sample], args.text_length)[0]
    used = sample_ids[sample_ids != PAD_ID]
    print(f"wrote {out} ({len(model)} bytes)")
    print(f"vocab size: {tokenizer.vocab_size} (asked for at most {args.vocab_size})")
    print(
        f"captions: {len(captions)}, tokens per caption: mean {lengths.mean():.1f}, "
        f"max {lengths.max()}; {over} ({100 * over / len(captions):.2f}%) longer than "
        f"--text-length {args.text_length}"
    )
    print(f"sample: {sample!r} -> {np.array2string(used, separator=' ')}")
    print(f"decoded: {tokenizer.decode(sample_ids[None])[0]!r}")
    if args.model_type == "unigram" and tokenizer.vocab_size < args.vocab_size // 2:
        # sentencepiece 0.2's unigram seeding misses whole words on small template vocabularies
        # (shapes_world: 61 pieces, mostly characters, where bpe learns 272 whole words).
        print(
            f"note: unigram stopped at {tokenizer.vocab_size} pieces, far below "
            f"{args.vocab_size}; if captions split into characters, try --model-type bpe"
        )
    return 0
