"""Per-device memory of a training run, sized from shapes and the sharding rules alone.

    python -m bench.memory --config 1b --mesh 1,64,4 --batch 256

Nothing is allocated and no device is needed: `nnx.eval_shape` gives every parameter's and
optimizer variable's shape and logical axes, `dalle_jax.sharding.logical_to_mesh` maps the axes
onto a `jax.sharding.AbstractMesh` of the requested (data, fsdp, tensor) sizes, and a shard's
bytes are its shape divided by the sizes of the mesh axes that split it. So a 256-chip mesh is
sized on a laptop.

Columns (bytes per device):
  params       model parameters (float32)
  grads        gradients, laid out like the parameters
  optimizer    optimizer state: AdamW's two moments (like the parameters) and its step counter;
               `--optimizer sgd` counts none
  activations  an estimate of what the forward pass keeps for the backward pass, see below
  total        their sum (XLA's temporaries, fragmentation and the input batch not counted)

Activation estimate. b = global batch / (data x fsdp) examples per device, S = sequence length,
d = d_model, f = mlp_dim, H = heads; `/t` = divided by the tensor axis (heads and mlp are
split over it; the residual stream is not). c = bytes of the compute dtype, 4 for float32.
Per layer, without remat, the backward pass needs:
  residual stream   4 b S d c       block input, the two norm outputs, the residual after attention
  attention         4 b S d c /t    q, k, v and the attention output before its projection
  scores            b H S S (4 + c) /t   float32 scores and the softmax weights in compute dtype
                    (attention patterns are masks over the dense S x S square in this model)
  MLP hidden        2 b S f c /t    before and after the activation
With remat (the config's `remat`, or `--remat`), each layer keeps only its block input
(b S d c), and one layer's full set above is live again while its backward pass runs.
Outside the layers: the embeddings' output (b S d c) and the logits with their softmax,
2 x 4 b (T V_text + N V_image) /t bytes (float32, vocab split over tensor).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="model config name, e.g. tiny, 350m, 1b")
    p.add_argument("--mesh", required=True, help="data,fsdp,tensor sizes, e.g. 1,64,4")
    p.add_argument(
        "--batch", type=int, default=None, help="global batch (default: data x fsdp, one each)"
    )
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    remat = p.add_mutually_exclusive_group()
    remat.add_argument("--remat", dest="remat", action="store_true", default=None)
    remat.add_argument("--no-remat", dest="remat", action="store_false")
    return p.parse_args(argv)


def parse_mesh(text: str) -> tuple[int, int, int]:
    from dalle_jax.errors import UserError

    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(s < 1 for s in sizes):
        raise UserError(f"--mesh {text!r}: give three positive sizes data,fsdp,tensor, e.g. 1,64,4")
    return sizes  # type: ignore[return-value]


def abstract_mesh(sizes: tuple[int, int, int]):
    """A `jax.sharding.AbstractMesh` (data, fsdp, tensor): no devices behind it."""
    from jax.sharding import AbstractMesh, AxisType

    from dalle_jax.sharding import MESH_AXES

    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def shard_bytes(state: Any, mesh, rules) -> tuple[int, int, float]:
    """(per-device bytes, total bytes, replicated fraction of the bytes) of an abstract nnx state.

    A variable without logical axes (a step counter) is replicated.
    """
    import jax
    from flax import nnx

    from dalle_jax.errors import UserError
    from dalle_jax.sharding import logical_to_mesh

    per_device = total = replicated = 0
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    for path, variable in leaves:
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        shape, itemsize = tuple(value.shape), value.dtype.itemsize
        names = None
        if isinstance(variable, nnx.Variable):
            names = variable.get_metadata().get("out_sharding")
        spec = (
            logical_to_mesh(tuple(names), rules, mesh_axis_names=mesh.axis_names)
            if names
            else (None,) * len(shape)
        )
        shard = []
        for dim, (size, axes) in enumerate(zip(shape, spec, strict=True)):
            axes_t = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
            ways = math.prod(mesh.shape[a] for a in axes_t)
            if size % ways:
                raise UserError(
                    f"{jax.tree_util.keystr(path)} {shape}: dimension {dim} (size {size}) is not "
                    f"divisible by mesh axes {axes} of size {ways}; change the mesh shape"
                )
            shard.append(size // ways)
        nbytes = math.prod(shape) * itemsize
        total += nbytes
        per_device += math.prod(shard) * itemsize
        if shard == list(shape):
            replicated += nbytes
    return per_device, total, (replicated / total if total else 0.0)


def activation_bytes(config, per_device_batch: int, tensor: int, remat: bool) -> int:
    """Per-device activation bytes kept for the backward pass; see the module docstring."""
    c = 2 if config.dtype == "bfloat16" else 4
    b, s, d, f, h = (
        per_device_batch,
        config.seq_length,
        config.d_model,
        config.mlp_dim,
        config.num_heads,
    )
    residual = 4 * b * s * d * c
    attention = 4 * b * s * d * c / tensor
    scores = b * h * s * s * (4 + c) / tensor
    hidden = 2 * b * s * f * c / tensor
    one_layer = residual + attention + scores + hidden
    if remat:
        layers = config.num_layers * b * s * d * c + one_layer
    else:
        layers = config.num_layers * one_layer
    vocab_positions = (
        config.text_length * config.text_vocab_size + config.image_length * config.image_vocab_size
    )
    outside = b * s * d * c + 2 * 4 * b * vocab_positions / tensor
    return int(layers + outside)


def measure(
    config_name: str,
    mesh_sizes: tuple[int, int, int],
    batch: int | None = None,
    optimizer: str = "adamw",
    remat: bool | None = None,
) -> dict[str, Any]:
    """The record `main` prints: per-device bytes of each part, and the sizes behind them."""
    import optax
    from flax import nnx

    from dalle_jax.errors import UserError
    from dalle_jax.model import DalleTransformer, get_config
    from dalle_jax.sharding import DEFAULT_RULES, data_parallel_size
    from dalle_jax.train_step import OptimConfig, make_optimizer

    config = get_config(config_name)
    mesh = abstract_mesh(mesh_sizes)
    rules = DEFAULT_RULES
    ways = data_parallel_size(mesh, rules)
    batch = ways if batch is None else batch
    if batch % ways:
        raise UserError(
            f"--batch {batch} is not divisible by the data-parallel size {ways} (data x fsdp); "
            f"use a multiple of {ways}"
        )
    remat = config.remat if remat is None else remat
    tx = make_optimizer(OptimConfig()) if optimizer == "adamw" else optax.sgd(1e-3)

    def train_state():
        model = DalleTransformer(config, rngs=nnx.Rngs(params=0))
        return nnx.state((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

    state = nnx.eval_shape(train_state)
    params, params_total, replicated = shard_bytes(state[0], mesh, rules)
    opt, opt_total, _ = shard_bytes(state[1], mesh, rules)
    activations = activation_bytes(config, batch // ways, mesh.shape["tensor"], remat)
    return {
        "config": config_name,
        "mesh": "x".join(str(s) for s in mesh_sizes),
        "devices": math.prod(mesh_sizes),
        "batch": batch,
        "per_device_batch": batch // ways,
        "optimizer": optimizer,
        "remat": remat,
        "param_count": params_total // 4,
        "params_total_bytes": params_total,
        "optimizer_total_bytes": opt_total,
        "params_bytes": params,
        "grads_bytes": params,
        "optimizer_bytes": opt,
        "activations_bytes": activations,
        "total_bytes": 2 * params + opt + activations,
        "replicated_fraction": replicated,
    }


def main(argv=None) -> int:
    from bench.common import emit, print_table
    from dalle_jax.errors import UserError

    args = parse_args(argv)
    try:
        record = measure(args.config, parse_mesh(args.mesh), args.batch, args.optimizer, args.remat)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emit(record)
    gib = 2**30
    row = {
        "config": record["config"],
        "mesh": record["mesh"],
        "batch/dev": record["per_device_batch"],
        "remat": record["remat"],
        **{
            f"{part} GiB": record[f"{part}_bytes"] / gib
            for part in ("params", "grads", "optimizer", "activations", "total")
        },
    }
    print_table([row], title="per-device memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
