"""Flags every resumable training command shares: where a run starts from and when it stops."""

from __future__ import annotations

import argparse

from train.data_cmd import no_default


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """`--resume PATH`, `--init PATH` and `--stop-after N` (the resume order of DESIGN.md)."""
    parser.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help=no_default(
            "full state (weights, optimizer, step, data position) of another run to continue "
            "from, when the workdir has no checkpoint yet"
        ),
    )
    parser.add_argument(
        "--init",
        default=None,
        metavar="PATH",
        help=no_default(
            "weights only of another run to start from (step 0, fresh optimizer), when the "
            "workdir has no checkpoint yet"
        ),
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help=no_default(
            "stop after N steps of this invocation (checkpointed), e.g. to split a long run "
            "over sessions; rerun the command to go on"
        ),
    )
