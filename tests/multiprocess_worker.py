"""One process of a multi-process tiny training run, and the helpers the tests share with it.

    python tests/multiprocess_worker.py --port P --num-processes 2 --process-id I \
        --mode train --workdir W --out OUT

Run by `tests/test_multiprocess.py` (two of these on 127.0.0.1, each with 2 fake CPU devices
from XLA_FLAGS). Modes:
  train    train `--steps` steps on a (data=1, fsdp=2, tensor=2) mesh over all devices, each
           process feeding only its rows of the global batch; save a checkpoint into --workdir;
           process 0 writes `OUT/losses.json` and the final parameters `OUT/params.npz`.
  restore  restore the checkpoint in --workdir onto that mesh; process 0 writes the parameters
           to `OUT/params.npz`.
  die      process 1 raises right after joining; process 0 goes on to train and must exit
           with an error once the coordination service notices (never hang).

Imported (without `main`) by the tests, which run the same steps in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dalle_jax.checkpoint import Checkpointer
from dalle_jax.model import DalleTransformer, get_config
from dalle_jax.sharding import (
    DEFAULT_RULES,
    host_local_batch_to_global,
    param_shardings,
    process_batch_rows,
    use_rules,
)
from dalle_jax.train_step import OptimConfig, init_train_state, make_train_step

CONFIG = get_config("tiny")
# A large learning rate so a few steps move the loss visibly: equal trajectories mean something.
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
GLOBAL_BATCH = 8
SEED = 0


def global_batch(step: int, size: int = GLOBAL_BATCH) -> dict[str, np.ndarray]:
    """The global batch of `step`: {"text_ids": int32 [size, T], "image_ids": int32 [size, N]}."""
    rng = np.random.default_rng(1000 + step)
    return {
        "text_ids": rng.integers(0, CONFIG.text_vocab_size, (size, CONFIG.text_length), np.int32),
        "image_ids": rng.integers(
            0, CONFIG.image_vocab_size, (size, CONFIG.image_length), np.int32
        ),
    }


def _fresh_state() -> nnx.State:
    model = DalleTransformer(CONFIG, rngs=nnx.Rngs(params=SEED))
    return init_train_state(model, OPTIM)[1]


def abstract_state() -> nnx.State:
    return nnx.eval_shape(_fresh_state)


def graphdef() -> nnx.GraphDef:
    return init_train_state(
        nnx.eval_shape(lambda: DalleTransformer(CONFIG, rngs=nnx.Rngs(0))), OPTIM
    )[0]


def to_checkpoint(state: nnx.State) -> dict[str, Any]:
    """`nnx.state((model, optimizer))` -> `{"params": ..., "opt": ...}` pure dicts."""
    return {"params": nnx.to_pure_dict(state[0]), "opt": nnx.to_pure_dict(state[1])}


def from_checkpoint(tree: Mapping[str, Any]) -> nnx.State:
    template = abstract_state()
    model_state, opt_state = template[0], template[1]
    nnx.replace_by_pure_dict(model_state, tree["params"])
    nnx.replace_by_pure_dict(opt_state, tree["opt"])
    return nnx.State({0: model_state, 1: opt_state})


def abstract_checkpoint(mesh: Mesh) -> dict[str, Any]:
    """The checkpoint tree as `jax.ShapeDtypeStruct`s carrying `mesh`'s shardings."""
    shapes = to_checkpoint(abstract_state())
    shardings = to_checkpoint(param_shardings(abstract_state(), mesh, DEFAULT_RULES))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def sharded_train_state(mesh: Mesh) -> nnx.State:
    """The fresh train state, each shard made on its own device."""
    shardings = param_shardings(abstract_state(), mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh), use_rules(DEFAULT_RULES):
        # It runs once: LLVM's optimisations of the random-number kernels cost more compile
        # time than they save on CPU.
        on_cpu = mesh.devices.flat[0].platform == "cpu"
        options = {"xla_backend_optimization_level": 0} if on_cpu else None
        return jax.jit(_fresh_state, out_shardings=shardings, compiler_options=options)()


def train(mesh: Mesh, steps: int, state: nnx.State | None = None) -> tuple[nnx.State, list[float]]:
    """`steps` train steps on `mesh`; each process loads only its rows of every global batch.

    Returns the final state and the loss of each step (Python floats).
    """
    state = sharded_train_state(mesh) if state is None else state
    step_fn: Callable = make_train_step(
        graphdef(), OPTIM, SEED, state=abstract_state(), mesh=mesh, rules=DEFAULT_RULES
    )
    rows = process_batch_rows(GLOBAL_BATCH, mesh, DEFAULT_RULES)
    losses = []
    for step in range(steps):
        local = {k: v[rows] for k, v in global_batch(step).items()}
        batch = host_local_batch_to_global(local, mesh, GLOBAL_BATCH, DEFAULT_RULES)
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def save(workdir: str, step: int, state: nnx.State) -> None:
    with Checkpointer(workdir, config=CONFIG.to_dict(), async_save=False) as ckpt:
        assert ckpt.save(step, to_checkpoint(state), force=True)


def restore(workdir: str, mesh: Mesh) -> dict[str, Any]:
    """The checkpoint tree of the latest step in `workdir`, placed on `mesh`."""
    with Checkpointer(workdir, config=CONFIG.to_dict()) as ckpt:
        restored = ckpt.restore_or_init(abstract_checkpoint(mesh), init_fn=_no_checkpoint)
    if restored.how.kind != "workdir":
        raise RuntimeError(f"expected a restore from the workdir, got {restored.how}")
    return restored.state


def _no_checkpoint():
    raise RuntimeError("no checkpoint to restore")


def flat_arrays(tree: Any) -> dict[str, np.ndarray]:
    """`{path: numpy array}` of every leaf, gathered whole from all processes."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--mode", choices=("train", "restore", "die"), required=True)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--heartbeat-timeout", type=int, default=10)
    p.add_argument("--hard", action="store_true", help="die mode: os._exit, like a killed process")
    args = p.parse_args(argv)

    from dalle_jax.sharding import MeshConfig, initialize_distributed, make_mesh

    initialize_distributed(
        f"127.0.0.1:{args.port}",
        args.num_processes,
        args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        initialization_timeout=60,
    )
    jax.devices()  # joins the backend's topology exchange: "after init" means after this
    if args.mode == "die" and args.process_id == 1:
        if args.hard:
            os._exit(3)  # no atexit, no jax.distributed.shutdown: a crash or a kill
        raise RuntimeError("process 1 fails on purpose right after joining")
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    if args.mode in ("train", "die"):
        state, losses = train(mesh, args.steps)
        if args.workdir:
            save(args.workdir, args.steps, state)
        params = flat_arrays(to_checkpoint(state)["params"])
        if jax.process_index() == 0 and args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "losses.json"), "w") as f:
                json.dump(losses, f)
            np.savez(os.path.join(args.out, "params.npz"), **params)
    else:
        params = flat_arrays(restore(args.workdir, mesh)["params"])
        if jax.process_index() == 0:
            os.makedirs(args.out, exist_ok=True)
            np.savez(os.path.join(args.out, "params.npz"), **params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
