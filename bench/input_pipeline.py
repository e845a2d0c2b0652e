"""Examples per second of the image + text input pipeline, with and without tokenization.

    python -m bench.input_pipeline [--dataset shapes_world/64] [--data-dir DIR] [--batch 16]

Reads a prepared dataset (`train data`); if `--dataset` is not prepared in the data dir, the
`--fallback` one (a smaller config of the same 64-pixel images) is prepared in a temporary
directory instead, and the output says which was measured. The tokenizer is trained on the
split's first captions (bpe, in memory). The consumer does nothing but take batches, so the
figure is the pipeline's ceiling on this machine: a training step that also needs the CPU gets
less.

Target: 20x what the reference training step consumes (about 100 examples/s at batch 16 for
ref-small), i.e. at least 2,000 examples/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import emit, print_table

TARGET_EXAMPLES_PER_S = 2_000


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="shapes_world/64")
    parser.add_argument(
        "--fallback",
        default="shapes_world/tiny64",
        help="prepared in a temp dir when --dataset is not prepared in --data-dir",
    )
    parser.add_argument("--data-dir", default=None, help="default: train data's default")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--text-length", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per case")
    parser.add_argument(
        "--read-threads",
        default="0,1",
        help="comma-separated grain read thread counts to measure (0: in the caller's thread)",
    )
    return parser.parse_args(argv)


def _open(dataset: str, fallback: str, data_dir: str | None, split: str, temp_dir: str):
    """The split to measure and what was measured: the asked dataset, or the fallback."""
    from dalle_jax.data import registry
    from dalle_jax.data.pipeline import default_data_dir, open_split

    data_dir = data_dir or default_data_dir()
    if registry.builder(dataset, data_dir=data_dir).is_prepared():
        note = f"{dataset} as prepared in {data_dir}"
        return open_split(dataset, split, data_dir=data_dir), dataset, note
    started = time.perf_counter()
    registry.builder(fallback, data_dir=temp_dir).download_and_prepare()
    took = time.perf_counter() - started
    note = f"{dataset} not prepared in {data_dir}; prepared {fallback} in {took:.0f} s"
    return open_split(fallback, split, data_dir=temp_dir), fallback, note


def _examples_per_s(dataset, batches: int, batch_size: int) -> float:
    iterator = iter(dataset)
    next(iterator)  # start-up (threads, first reads) is not throughput
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def main(argv=None) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="bench_input_pipeline_") as temp_dir:
        _run(args, temp_dir)
    return 0


def _run(args: argparse.Namespace, temp_dir: str) -> None:
    from dalle_jax.data.pipeline import LoaderConfig, image_text_dataset
    from dalle_jax.tokenizer import TextTokenizer, train_tokenizer
    from train.data_cmd import quiet_tfds_noise

    quiet_tfds_noise()
    split, measured, note = _open(args.dataset, args.fallback, args.data_dir, args.split, temp_dir)
    print(f"# {note}; {split.num_examples} examples in {split.name}")
    sample = range(min(2_000, split.num_examples))
    captions = [split.normalize(split.source[i], i)["caption"] for i in sample]
    tokenizer = TextTokenizer.from_bytes(train_tokenizer(captions, 512, model_type="bpe"))

    rows = []
    for threads in (int(t) for t in args.read_threads.split(",")):
        for tokenized in (False, True):
            loader = LoaderConfig.train(args.batch, seed=0, read_threads=threads)
            dataset = image_text_dataset(
                split.source,
                split.normalize,
                loader,
                image_size=args.image_size,
                tokenizer=tokenizer if tokenized else None,
                text_length=args.text_length,
                source_name=split.name,
                process_index=0,
                process_count=1,
            )
            rate = _examples_per_s(dataset, args.batches, args.batch)
            record = {
                "bench": "input_pipeline",
                "dataset": measured,
                "batch": args.batch,
                "image_size": args.image_size,
                "tokenized": tokenized,
                "read_threads": threads,
                "examples_per_s": round(rate, 1),
                "target_examples_per_s": TARGET_EXAMPLES_PER_S,
            }
            emit(record)
            rows.append(record)
    print_table(
        rows,
        [
            "dataset",
            "batch",
            "tokenized",
            "read_threads",
            "examples_per_s",
            "target_examples_per_s",
        ],
        title="input pipeline throughput (consumer idle)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
