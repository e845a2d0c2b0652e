"""`train vqvae --config NAME --workdir DIR`: stage 1, the image tokenizer.

Rerunning the same command resumes from the latest checkpoint in DIR. Your own images:
`--dataset image_folder --folder DIR --image-size S` (or `--config base --folder DIR`),
prepared first with `train data` and the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from train.data_cmd import (
    add_data_dir_argument,
    add_folder_arguments,
    folder_builder_kwargs,
    no_default,
)
from train.run_flags import (
    add_cadence_arguments,
    add_distributed_arguments,
    add_resume_arguments,
    start_distributed,
)

HELP = "Train the vqvae image tokenizer (stage 1); rerun the same command to resume."

CONFIG_NAMES = (
    "tiny",
    "shapes64",
    "emoji32",
    "emoji32_2048",
    "base",
)  # dalle_jax.vqvae_training.JOBS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="shapes64",
        choices=CONFIG_NAMES,
        help="job config: model, training and dataset together (tiny is for tests)",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help=no_default(
            "run directory: checkpoints/, metrics.jsonl, tb/ (TensorBoard), images/; "
            "a workdir holding checkpoints is resumed"
        ),
    )
    add_data_dir_argument(parser)
    parser.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        help=no_default("override the config's dataset, e.g. shapes_world/64"),
    )
    add_folder_arguments(parser)
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
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help=no_default("override the seed (weights, data order, noise)"),
    )
    parser.add_argument(
        "--crop-size",
        type=int,
        default=None,
        metavar="S",
        help=no_default(
            "override the random-window size of the first --crop-steps steps (a multiple of "
            "the downsampling factor below the image size; half the image size makes a step "
            "~4x cheaper)"
        ),
    )
    parser.add_argument(
        "--crop-steps",
        type=int,
        default=None,
        metavar="N",
        help=no_default(
            "override how many of the first steps train on random --crop-size windows instead "
            "of whole images (0: none)"
        ),
    )
    add_cadence_arguments(parser)
    parser.add_argument(
        "--train-decoder-only",
        action="store_true",
        help=(
            "fine-tune only the decoder of a trained vqvae (start it with --init DIR in a new "
            "workdir): the encoder and codebook stay frozen, so every image keeps its ids and "
            "data encoded with DIR stays valid"
        ),
    )
    add_resume_arguments(parser)
    add_distributed_arguments(parser)


def job_from_args(args: argparse.Namespace):
    """The named job config with the command line's overrides applied."""
    from dalle_jax.vqvae_training import get_job

    job = get_job(args.config)
    train_changes = {
        k: v
        for k, v in {
            "total_steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "crop_size": args.crop_size,
            "crop_steps": args.crop_steps,
            "train_decoder_only": args.train_decoder_only or None,
        }.items()
        if v is not None
    }
    if train_changes:
        job = job.replace(train=dataclasses.replace(job.train, **train_changes))
    job_changes = {
        k: v
        for k, v in {
            "dataset": args.dataset,
            "data_dir": args.data_dir,
            "log_every": args.log_every,
            "eval_every": args.eval_every,
            "checkpoint_every": args.checkpoint_every,
        }.items()
        if v is not None
    }
    if args.eval_examples is not None:
        job_changes["eval_max_examples"] = args.eval_examples or None
    job = job.replace(**job_changes) if job_changes else job
    dataset_kwargs = folder_builder_kwargs(args, job.dataset)
    return job.replace(builder_kwargs=tuple(sorted(dataset_kwargs.items())))


def run(args: argparse.Namespace) -> int:
    start_distributed(args)  # before anything touches a device
    import jax

    from dalle_jax.vqvae_training import train_and_evaluate

    job = job_from_args(args)
    metrics = train_and_evaluate(
        job, args.workdir, resume=args.resume, init=args.init, stop_after=args.stop_after
    )
    if metrics and jax.process_index() == 0:
        print(json.dumps({"final_eval": metrics}))
    return 0
