"""Flags the training commands share: where a run starts from and when it stops, and how one
process of a multi-process run finds the others."""

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


def add_cadence_arguments(
    parser: argparse.ArgumentParser,
    *,
    evaluation: str = "evaluations",
    eval_examples: str = "examples of the eval split to evaluate on (0: all of it)",
) -> None:
    """`--log-every N --eval-every N --checkpoint-every N --eval-examples N`: how often a run
    logs, evaluates and saves (default: the job config's). `evaluation` names what an
    evaluation makes, `eval_examples` what the examples are for."""
    for flag, what in (
        ("--log-every", "steps between metric lines (metrics.jsonl, TensorBoard)"),
        ("--eval-every", f"steps between {evaluation} (one always runs at the last step)"),
        ("--checkpoint-every", "steps between checkpoints (one is always written when a run ends)"),
        ("--eval-examples", eval_examples),
    ):
        parser.add_argument(flag, type=int, default=None, metavar="N", help=no_default(what))


# Flags of a multi-process run, in the order `start_distributed` names them.
DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """`--coordinator-address HOST:PORT --num-processes N --process-id I`: one process of a
    multi-process run (several hosts, or several processes on one host). All three or none;
    on a Cloud TPU pod slice, Slurm or Open MPI none are needed (detected)."""
    group = parser.add_argument_group(
        "multi-process runs",
        "Start the same command once per process, each with its own --process-id. Not needed "
        "on a Cloud TPU pod slice, Slurm or Open MPI: there the processes find each other.",
    )
    group.add_argument(
        "--coordinator-address",
        default=None,
        metavar="HOST:PORT",
        help=no_default("address of process 0, which every process connects to"),
    )
    group.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help=no_default("how many processes take part"),
    )
    group.add_argument(
        "--process-id",
        type=int,
        default=None,
        metavar="I",
        help=no_default("this process's number, 0..N-1 (0 logs, writes images and bundles)"),
    )


def start_distributed(args: argparse.Namespace) -> str | None:
    """Joins the multi-process run the flags describe; call it before anything touches a device.

    All three flags: `sharding.initialize_distributed` with them. None: on a detected cluster
    (TPU pod slice, Slurm, Open MPI) it is called with no arguments and jax reads the rest from
    the environment; anywhere else this is a plain one-process run and nothing happens.
    Returns how the run was set up ("flags", the cluster's name, or None for one process).
    Raises `UserError` on a partial or inconsistent set of flags.
    """
    from dalle_jax.errors import UserError

    values = {name: getattr(args, name, None) for name in DISTRIBUTED_FLAGS}
    given = [name for name, value in values.items() if value is not None]
    if given and len(given) < len(DISTRIBUTED_FLAGS):
        missing = ", ".join(_flag(n) for n in DISTRIBUTED_FLAGS if n not in given)
        raise UserError(
            f"{', '.join(_flag(n) for n in given)} given without {missing}; a multi-process run "
            "needs all three (--coordinator-address HOST:PORT --num-processes N --process-id I)"
        )
    from dalle_jax.sharding import detected_cluster, initialize_distributed

    if not given:
        cluster = detected_cluster()
        if cluster is not None:
            initialize_distributed()
        return cluster
    address, count, index = (values[n] for n in DISTRIBUTED_FLAGS)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"--coordinator-address {address!r}: give HOST:PORT of process 0, e.g. 10.0.0.1:8476"
        )
    if count < 1:
        raise UserError(f"--num-processes must be at least 1, got {count}")
    if not 0 <= index < count:
        raise UserError(
            f"--process-id {index} is not in 0..{count - 1} (--num-processes {count}); number "
            "the processes 0 to N-1"
        )
    try:
        initialize_distributed(address, count, index)
    except Exception as error:  # unreachable coordinator, port in use, a timeout, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise UserError(
            f"process {index} of {count} could not join the run at {address}: {first_line}; "
            "check that every process was started with the same address and count, and that "
            "process 0 can listen on that port"
        ) from error
    return "flags"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
