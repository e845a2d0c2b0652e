"""`train SUBCOMMAND ...`: one thin entry point; each subcommand lives in its own module.

A subcommand module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Heavy imports (jax, tfds) happen inside `run`, so `train --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from dalle_jax.errors import run_cli

# name -> module; the order is the order `train --help` lists them in.
SUBCOMMANDS = {
    "data": "train.data_cmd",
    "tokenizer": "train.tokenizer_cmd",
    "vqvae": "train.vqvae_cmd",
    "encode": "train.encode_cmd",
    "dalle": "train.dalle_cmd",
    "export": "train.export_cmd",
    "reranker": "train.reranker_cmd",
    "recipe": "train.recipe_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train",
        description="Train the parts of a dalle-jax model and prepare its data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def run_subcommand(argv: Sequence[str] | None) -> int:
    """Parses and runs one `train` command line; user errors propagate (see `main`)."""
    args = build_parser().parse_args(argv)
    return args._run(args)


_main = run_subcommand


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
