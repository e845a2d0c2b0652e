"""`train recipe NAME --workdir DIR`: every command that makes a shipped bundle, in order.

The steps are `train.recipes.RECIPES[NAME]`. Each finished step is recorded in
`DIR/recipe.json` with its command and wall time; running the same command again skips what is
recorded as done (with the same argv) and resumes the rest, so a recipe that a session's end or
a kill cut short is finished by rerunning it. The bundle ends up in `DIR/bundle`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

from dalle_jax.errors import UserError
from train.data_cmd import no_default
from train.recipes import RECIPES

HELP = "Run every step that produces a shipped bundle (data to bundle); rerun to resume."
STATE_FILE = "recipe.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(RECIPES), help="which bundle to make")
    parser.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help=no_default("where every step writes (DIR/vqvae, DIR/dalle, ..., DIR/bundle)"),
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help=no_default(
            "directory for prepared datasets (default: $DALLE_JAX_DATA_DIR, else "
            "~/tensorflow_datasets)"
        ),
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and what is done; run nothing"
    )
    parser.add_argument(
        "--redo", action="store_true", help="run every step again, even those recorded as done"
    )


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {"steps": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e}); delete it to start the recipe over") from None
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
        raise UserError(f"{path} is not a recipe record; delete it to start the recipe over")
    return state


def _write_state(path: Path, state: dict) -> None:
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(staged, path)


def run(args: argparse.Namespace) -> int:
    from train.cli import run_subcommand

    workdir = Path(args.workdir)
    steps = RECIPES[args.name](workdir, args.data_dir)
    state_path = workdir / STATE_FILE
    state = _read_state(state_path)
    if state.get("recipe", args.name) != args.name:
        raise UserError(
            f"{workdir} holds recipe {state['recipe']!r}, not {args.name!r}; use another --workdir"
        )
    done = state["steps"]
    for number, step in enumerate(steps, 1):
        record = done.get(step.name)
        is_done = not args.redo and record is not None and record.get("argv") == list(step.argv)
        line = f"[{number}/{len(steps)}] {step.name}: train {shlex.join(step.argv)}"
        if args.dry_run:
            print(line + ("  (done)" if is_done else ""))
            continue
        if is_done:
            took = f"{record['seconds']:.0f} s"
            print(f"{line}\n    done before (took {took}); skipped", file=sys.stderr)
            continue
        print(line, file=sys.stderr, flush=True)
        start = time.monotonic()
        code = run_subcommand(list(step.argv))
        if code != 0:
            print(f"recipe {args.name}: step {step.name!r} failed (exit {code})", file=sys.stderr)
            return code
        workdir.mkdir(parents=True, exist_ok=True)
        done[step.name] = {
            "argv": list(step.argv),
            "seconds": round(time.monotonic() - start, 1),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        _write_state(state_path, {"recipe": args.name, "steps": done})
    if not args.dry_run:
        total = sum(r["seconds"] for r in done.values())
        print(
            f"recipe {args.name}: bundle in {workdir / 'bundle'}; steps took {total / 60:.1f} min "
            f"in all (see {state_path})"
        )
    return 0
