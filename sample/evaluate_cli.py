"""`evaluate --model BUNDLE --dataset NAME --split SPLIT[,SPLIT...]`: a bundle's figures.

Thin: parse and check the flags, load the bundle, call
`dalle_jax.evaluation.evaluate.evaluate_bundle`, print its table and write OUT/evaluation.json.
One run evaluates every split named, so a model card's figures come from one command, e.g.

    evaluate --model shapes --dataset shapes_world/64 --split test,test_heldout

Heavy imports (jax, the models) happen after the flags are checked, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dalle_jax.errors import UserError, run_cli
from sample.cli import HelpFormatter, add_sampling_arguments

DEFAULT_OUT = "evaluation"
# Mirrors dalle_jax.evaluation.evaluate (kept here so --help needs no jax import).
METRIC_GROUPS = ("judge", "r_precision", "fd", "loss", "vqvae")
DEFAULT_NUM_PROMPTS = 1000
DEFAULT_BATCH_SIZE = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate",
        description=(
            "Evaluate a trained dalle-jax bundle on splits of a prepared dataset: prints one "
            "table with a column per split and writes OUT/evaluation.json. Metric groups: "
            "judge (shapes_world only: generated images scored by the deterministic shapes "
            "judge, with the bundle's default sampling, its default reranking included; see "
            "--rerank), r_precision (the reranker's top-1 among 100 prompts of the split, on "
            "images generated without reranking), fd (Frechet distance on the reranker's image "
            "features of images generated without reranking; not Inception FID), loss (image "
            "bits/dim, text nats/token), vqvae (reconstruction PSNR, codebook usage). Metrics "
            "that cannot be measured (no reranker, not shapes_world) are reported as n/a with "
            "the reason."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--model",
        metavar="BUNDLE",
        default=None,
        help="bundle directory, or the name of a shipped bundle (default: 'shapes')",
    )
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        required=True,
        help="a prepared dataset with its config, e.g. shapes_world/64 or emoji/32 (required)",
    )
    parser.add_argument(
        "--split",
        metavar="SPLIT[,SPLIT...]",
        default="test",
        help="split(s) to evaluate, comma-separated: each gets a column (e.g. test,test_heldout)",
    )
    parser.add_argument(
        "--num-prompts",
        metavar="N",
        type=int,
        default=DEFAULT_NUM_PROMPTS,
        help="evaluate the first N examples of each split (all of a smaller split)",
    )
    parser.add_argument("--seed", metavar="S", type=int, default=0, help="sampling seed")
    parser.add_argument(
        "--batch-size",
        metavar="B",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="images per compiled batch (sampling, vqvae and loss passes)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help="output directory; the report is DIR/evaluation.json",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help="where the dataset is prepared (default: $DALLE_JAX_DATA_DIR, else "
        "~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--folder",
        metavar="DIR",
        default=None,
        help="image_folder only: the folder of your images and their captions, as given to "
        "`train data --dataset image_folder`",
    )
    parser.add_argument(
        "--image-size",
        metavar="S",
        type=int,
        default=None,
        help="image_folder only: the side it was prepared at (default: the builder's, 64)",
    )
    parser.add_argument(
        "--metrics",
        metavar="GROUPS",
        default="all",
        help=f"comma-separated metric groups to run: {', '.join(METRIC_GROUPS)}, or all",
    )
    parser.add_argument(
        "--no-generate",
        action="store_true",
        help="generate no images: skip judge, r_precision and fd (loss and vqvae only)",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--rerank",
        metavar="M",
        type=int,
        default=None,
        help="judge images: draw M candidates per prompt and keep the one the bundle's reranker "
        "scores best; 0 = no reranking. R-precision and FD always use images generated without "
        "reranking (with reranking on, the judge on those images is reported too) (default: "
        "the bundle's: its bundle.json sampling rerank_per_image K when it has a reranker, "
        "else no reranking)",
    )
    return parser


def check_flags(args: argparse.Namespace) -> tuple[list[str], tuple[str, ...], dict]:
    """Everything that can be checked before loading anything: (splits, metric groups, the
    dataset builder's keyword arguments)."""
    from dalle_jax.data import registry  # noqa: PLC0415
    from dalle_jax.evaluation.evaluate import (  # noqa: PLC0415
        check_num_prompts,
        parse_metric_groups,
        parse_splits,
    )
    from dalle_jax.generate import check_counts  # noqa: PLC0415
    from dalle_jax.sampling import SamplingSettings  # noqa: PLC0415

    check_num_prompts(args.num_prompts)
    check_counts(1, args.rerank, args.batch_size, args.seed)
    splits = parse_splits(args.split)
    groups = parse_metric_groups(args.metrics, generate=not args.no_generate)
    given = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "cfg_scale": args.cfg_scale,
    }
    SamplingSettings(**{k: v for k, v in given.items() if v is not None})
    if not args.dataset.strip():
        raise UserError("--dataset is empty; name a prepared dataset, e.g. shapes_world/64")
    registry.spec(args.dataset.strip())  # an unknown name fails before the bundle loads
    builder_kwargs = registry.folder_kwargs(
        args.dataset.strip(), folder=args.folder, image_size=args.image_size
    )
    return splits, groups, builder_kwargs


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    splits, groups, builder_kwargs = check_flags(args)
    from sample.cli import load_bundle, prepare_out_dir  # noqa: PLC0415

    out = prepare_out_dir(args.out)
    bundle = load_bundle(args.model)

    from dalle_jax.evaluation.evaluate import (  # noqa: PLC0415
        evaluate_bundle,
        format_table,
        write_report,
    )

    report = evaluate_bundle(
        bundle,
        args.dataset.strip(),
        splits,
        num_prompts=args.num_prompts,
        seed=args.seed,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg_scale,
        rerank=args.rerank,
        metrics=groups,
        data_dir=args.data_dir,
        builder_kwargs=builder_kwargs,
        progress=True,
        warn=_warn,
    )
    path = write_report(report, out)
    print(format_table(report))
    print(f"report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
