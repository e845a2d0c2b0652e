"""`sample PROMPT ...`: turns prompts into image grids with a trained bundle.

Not built yet: the transformer, the bundle format and the shipped model come in later issues.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from dalle_jax.errors import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample",
        description="Generate images for text prompts with a trained dalle-jax bundle.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts")
    parser.add_argument("--model", default=None, help="bundle directory or shipped name")
    return parser


def _main(argv: Sequence[str] | None) -> int:
    build_parser().parse_args(argv)
    raise UserError(
        "no trained model ships with this version yet: sampling arrives with the transformer "
        "and bundle issues; see README.md for what works today"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
