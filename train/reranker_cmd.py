"""`train reranker --config NAME --workdir DIR --tokenizer FILE`: the contrastive reranker.

The reranker scores how well an image fits a caption; `sample --rerank M` keeps the best of M
candidates by it, and evaluation reports its retrieval accuracy. Rerunning the same command
resumes from the latest checkpoint in DIR (the tokenizer then defaults to DIR's copy). Your own
images: `--dataset image_folder --folder DIR --image-size S`, prepared first with `train data`
and the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from train.data_cmd import add_data_dir_argument, folder_builder_kwargs, no_default
from train.run_flags import add_cadence_arguments, add_distributed_arguments, start_distributed

HELP = "Train the contrastive text-image reranker (CLIP-style); rerun the same command to resume."

CONFIG_NAMES = ("tiny", "small", "emoji")  # dalle_jax.reranker_training.JOBS (kept import-light)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="small",
        choices=CONFIG_NAMES,
        help="job config: model size, training and default dataset (tiny is for tests)",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help=no_default(
            "run directory: checkpoints/, metrics.jsonl, tb/, a copy of the tokenizer; a "
            "workdir holding checkpoints is resumed"
        ),
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help=no_default(
            "sentencepiece model from `train tokenizer` (default: the workdir's copy, when "
            "resuming); the sampler's bundle must use the same one"
        ),
    )
    parser.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        help=no_default("override the config's dataset, e.g. shapes_world/64 or emoji/32"),
    )
    add_data_dir_argument(parser)
    parser.add_argument(
        "--vqvae",
        default=None,
        metavar="DIR",
        help=no_default(
            "a `train vqvae` workdir: train on its reconstructions of the images, which is "
            "what the reranker scores at sampling time (evaluation stays on the originals)"
        ),
    )
    parser.add_argument(
        "--folder",
        default=None,
        metavar="DIR",
        help=no_default(
            "image_folder only: the folder of your images and their captions (prepared first "
            "with `train data --dataset image_folder --folder DIR --image-size S`)"
        ),
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="S",
        help=no_default(
            "side the images are resized to (default: the dataset's own); for image_folder, "
            "the side it was prepared at (default: the builder's, 64)"
        ),
    )
    parser.add_argument(
        "--steps", type=int, default=None, metavar="N", help=no_default("override total steps")
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help=no_default("override the global batch size (a multiple of the device count)"),
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        metavar="LR",
        help=no_default("override the peak learning rate"),
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        metavar="N",
        help=no_default("override the learning-rate warmup"),
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help=no_default("override the seed (weights, data order)"),
    )
    parser.add_argument(
        "--hard-negatives",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=no_default(
            "add a copy of each caption with one shapes_world color, shape or size word "
            "swapped, as an extra negative (NegCLIP); default: the config's (tiny: on, small: "
            "off, it did not raise the shapes judge)"
        ),
    )
    add_cadence_arguments(
        parser, eval_examples="validation examples to evaluate retrieval on (0: all of them)"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help=no_default(
            "stop after N steps of this invocation (checkpointed); rerun the command to go on"
        ),
    )
    add_distributed_arguments(parser)


def job_from_args(args: argparse.Namespace):
    """The named job config with the command line's overrides applied."""
    from dalle_jax.reranker_training import get_job

    job = get_job(args.config)
    train_changes = {
        k: v
        for k, v in {
            "total_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "warmup_steps": args.warmup_steps,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    if args.hard_negatives is not None:
        from dalle_jax.reranker_training import SHAPES_WORLD_SWAPS

        train_changes["swap_word_groups"] = SHAPES_WORLD_SWAPS if args.hard_negatives else ()
    if train_changes:
        job = job.replace(train=dataclasses.replace(job.train, **train_changes))
    job_changes = {
        k: v
        for k, v in {
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "vqvae": args.vqvae,
            "tokenizer": args.tokenizer,
            "image_size": args.image_size,
            "log_every": args.log_every,
            "eval_every": args.eval_every,
            "checkpoint_every": args.checkpoint_every,
        }.items()
        if v is not None
    }
    if args.eval_examples is not None:
        job_changes["eval_max_examples"] = args.eval_examples or None
    job = job.replace(**job_changes) if job_changes else job
    dataset_kwargs = folder_builder_kwargs(args, job.dataset, image_size_resizes=True)
    return job.replace(builder_kwargs=tuple(sorted(dataset_kwargs.items())))


def run(args: argparse.Namespace) -> int:
    start_distributed(args)  # before anything touches a device
    import time

    import jax

    from dalle_jax.reranker_training import train_and_evaluate

    job = job_from_args(args)
    start = time.perf_counter()
    metrics = train_and_evaluate(job, args.workdir, stop_after=args.stop_after)
    if metrics and jax.process_index() == 0:
        print(
            f"validation retrieval (image -> text among {metrics['group']} captions): "
            f"top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f}; same text: top-1 "
            f"{metrics['top1_text']:.3f}, top-5 {metrics['top5_text']:.3f} "
            f"({time.perf_counter() - start:.0f} s)"
        )
        print(json.dumps({"final_eval": metrics}))
    return 0
