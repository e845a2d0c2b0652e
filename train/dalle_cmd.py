"""`train dalle --config NAME --workdir DIR --data ENCODED`: stage 2, the transformer.

Reads the records of `train encode` (ENCODED/train, ENCODED/validation). Rerunning the same
command resumes from the latest checkpoint in DIR. With --vqvae, every evaluation writes a grid
of samples; with --vqvae and --tokenizer, the finished run writes a bundle to DIR/bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from train.data_cmd import no_default
from train.run_flags import (
    add_cadence_arguments,
    add_distributed_arguments,
    add_resume_arguments,
    start_distributed,
)

HELP = "Train the text-to-image transformer (stage 2) on encoded data; rerun to resume."

CONFIG_NAMES = ("tiny", "shapes", "shapes-90min", "emoji", "pod-1b")  # dalle_jax.training.JOBS


def _mesh(text: str):
    from dalle_jax.errors import UserError
    from dalle_jax.sharding import MeshConfig

    parts = text.split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) != 3:
        raise UserError(f"--mesh {text!r}: give three sizes DATA,FSDP,TENSOR, e.g. 2,2,2 or 1,-1,1")
    return MeshConfig(*sizes)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="shapes",
        choices=CONFIG_NAMES,
        help="job config: model, optimizer, batch and intervals together (tiny is for tests, "
        "shapes-90min the transformer of `train recipe shapes-90min`, pod-1b for TPU pods: "
        "docs/multihost.md)",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help=no_default(
            "run directory: checkpoints/, metrics.jsonl, tb/ (TensorBoard), images/, bundle/; "
            "a workdir holding checkpoints is resumed"
        ),
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help=no_default("encoded data written by `train encode` (DIR/train, DIR/validation)"),
    )
    parser.add_argument(
        "--vqvae",
        default=None,
        metavar="DIR",
        help=no_default(
            "the `train vqvae` workdir the data was encoded with: decodes the sample grids and "
            "goes into the bundle"
        ),
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help=no_default(
            "the tokenizer .model the data was encoded with: encodes the grid captions and goes "
            "into the bundle"
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
        help=no_default("override the global batch size (a multiple of the data-parallel size)"),
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
        help=no_default("override the seed (weights, data order, caption dropout)"),
    )
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="D,F,T",
        help=no_default(
            "mesh axis sizes data,fsdp,tensor; -1 fills, e.g. 2,-1,1 (default: every device on "
            "data; a leading -1 needs the = form: --mesh=-1,1,1)"
        ),
    )
    add_cadence_arguments(parser, evaluation="evaluations and sample grids")
    add_resume_arguments(parser)
    add_distributed_arguments(parser)


def job_from_args(args: argparse.Namespace):
    """The named job config with the command line's overrides applied."""
    from dalle_jax.training import get_job

    job = get_job(args.config)
    optim_changes = {
        k: v
        for k, v in {"total_steps": args.steps, "learning_rate": args.learning_rate}.items()
        if v is not None
    }
    if optim_changes:
        job = job.replace(optim=dataclasses.replace(job.optim, **optim_changes))
    changes = {
        k: v
        for k, v in {
            "data_dir": args.data,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "log_every": args.log_every,
            "eval_every": args.eval_every,
            "checkpoint_every": args.checkpoint_every,
        }.items()
        if v is not None
    }
    if args.mesh is not None:
        changes["mesh"] = _mesh(args.mesh)
    if args.eval_examples is not None:
        changes["eval_max_examples"] = args.eval_examples or None
    return job.replace(**changes)


def run(args: argparse.Namespace) -> int:
    start_distributed(args)  # before anything touches a device
    import jax

    from dalle_jax.training import train_and_evaluate

    job = job_from_args(args)
    metrics = train_and_evaluate(
        job,
        args.workdir,
        vqvae=args.vqvae,
        tokenizer=args.tokenizer,
        resume=args.resume,
        init=args.init,
        stop_after=args.stop_after,
    )
    if metrics and jax.process_index() == 0:
        print(json.dumps({"final_eval": metrics}))
    return 0
