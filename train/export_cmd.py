"""`train export --workdir DIR --vqvae VQDIR --tokenizer FILE --out BUNDLE [--reranker RDIR]`.

Writes the latest checkpoint of a `train dalle` run, with its vqvae and tokenizer, as one
self-describing folder that `sample --model BUNDLE` loads (see `dalle_jax.bundle`).
`--rerank-per-image K` (with `--reranker`) makes reranking the bundle's default: `sample` and
`evaluate` then draw K candidates per image kept unless told `--rerank 0`.
"""

from __future__ import annotations

import argparse

from dalle_jax.errors import UserError
from train.data_cmd import no_default

HELP = "Export a trained transformer with its vqvae and tokenizer as one bundle folder."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help=no_default("a `train dalle` workdir (its latest checkpoint) or a checkpoint folder"),
    )
    parser.add_argument(
        "--vqvae",
        required=True,
        metavar="DIR",
        help=no_default(
            "the `train vqvae` workdir (or checkpoint folder) the data was encoded with"
        ),
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="FILE",
        help=no_default("the tokenizer .model the data was encoded with"),
    )
    parser.add_argument(
        "--out", required=True, metavar="BUNDLE", help=no_default("the bundle folder to write")
    )
    parser.add_argument(
        "--reranker",
        metavar="DIR",
        help=no_default(
            "a `train reranker` workdir trained with the same tokenizer: stored in the bundle "
            "for `sample --rerank`"
        ),
    )
    parser.add_argument(
        "--weights-dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype the weights are stored in (bfloat16 halves the size; loading casts back)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a bundle already in --out"
    )
    defaults = parser.add_argument_group(
        "sampling defaults stored in the bundle (default: the run's; pick them on the "
        "validation split with `evaluate --split validation`)"
    )
    defaults.add_argument("--temperature", type=float, metavar="T", help=no_default("0 = greedy"))
    defaults.add_argument("--top-k", type=int, metavar="K", help=no_default("0 = off"))
    defaults.add_argument("--top-p", type=float, metavar="P", help=no_default("1 = off"))
    defaults.add_argument(
        "--cfg-scale", type=float, metavar="C", help=no_default("classifier-free guidance; 1 = off")
    )
    defaults.add_argument(
        "--rerank-per-image",
        type=int,
        metavar="K",
        help=no_default(
            "rerank by default: `sample` and `evaluate` draw K candidates per image kept and keep "
            "those the reranker scores best (needs --reranker; 1 = off; `--rerank 0` turns it "
            "off when sampling)"
        ),
    )
    defaults.add_argument(
        "--rerank-likelihood-weight",
        type=float,
        metavar="W",
        help=no_default(
            "when reranking, rank candidates by the standardised reranker score plus W times "
            "the standardised log-likelihood the transformer gives them (0 = the reranker "
            "alone; the shapes bundle uses 0.25)"
        ),
    )


def check_rerank_per_image(args: argparse.Namespace) -> None:
    """--rerank-per-image: an int >= 1, and above 1 only with a reranker; UserError otherwise.
    Checked before the (slow) export."""
    per_image = args.rerank_per_image
    if per_image is None:
        return
    if per_image < 1:
        raise UserError(
            f"--rerank-per-image must be at least 1 (1 = no reranking), got {per_image}"
        )
    if per_image > 1 and not args.reranker:
        raise UserError(
            f"--rerank-per-image {per_image} needs a reranker in the bundle; pass --reranker "
            "RDIR (a `train reranker` workdir) or leave --rerank-per-image out"
        )


def check_rerank_likelihood_weight(args: argparse.Namespace) -> None:
    """--rerank-likelihood-weight: a finite number >= 0; UserError otherwise."""
    from dalle_jax.sampling import check_rerank_likelihood_weight as check

    if args.rerank_likelihood_weight is not None:
        check(args.rerank_likelihood_weight, "--rerank-likelihood-weight")


def run(args: argparse.Namespace) -> int:
    check_rerank_per_image(args)
    check_rerank_likelihood_weight(args)
    from dalle_jax.training import export_workdir

    out = export_workdir(
        args.workdir,
        vqvae=args.vqvae,
        tokenizer=args.tokenizer,
        out=args.out,
        weights_dtype=args.weights_dtype,
        overwrite=args.overwrite,
        sampling={
            key: value
            # The flags' names are the bundle's sampling keys.
            for key in (
                "temperature",
                "top_k",
                "top_p",
                "cfg_scale",
                "rerank_per_image",
                "rerank_likelihood_weight",
            )
            if (value := getattr(args, key)) is not None
        },
    )
    if args.reranker:
        import jax

        from dalle_jax.bundle import add_reranker
        from dalle_jax.reranker_training import load_reranker

        if jax.process_index() == 0:  # the process that wrote the bundle
            reranker, reranker_config = load_reranker(args.reranker)
            add_reranker(out, reranker_config, reranker)
    extras = ["with its reranker"] if args.reranker else []
    if args.rerank_per_image is not None and args.rerank_per_image > 1:
        extras.append(f"reranking {args.rerank_per_image} candidates per image by default")
    print(f"bundle written to {out}" + (f" ({'; '.join(extras)})" if extras else ""))
    return 0
