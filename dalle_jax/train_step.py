"""The optimiser and the pure, jitted train step of the stage-2 transformer.

    graphdef, state = init_train_state(model, optim_config)
    train_step = make_train_step(graphdef, optim_config, seed=0)      # jitted once, state donated
    state, metrics = train_step(state, batch)

`state` is `nnx.state((model, optimizer))`: parameters, AdamW moments and the step counter, so it
is what a checkpoint saves. Randomness (caption dropout, dropout) is `fold_in(key(seed), step)`,
so a resumed run draws the same masks it would have drawn. Metrics stay on device: fetch them
only on log steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dalle_jax.errors import UserError
from dalle_jax.model.loss import loss_fn
from dalle_jax.model.transformer import DalleTransformer
from dalle_jax.sharding import LogicalRules, logical_to_mesh, param_shardings, use_rules

Batch = Mapping[str, jax.Array]
TrainStep = Callable[[nnx.State, Batch], tuple[nnx.State, dict[str, jax.Array]]]

# Parameters that get weight decay: matrices and embedding tables (not norms, biases, positions).
_DECAYED_NAMES = ("kernel", "text_embed", "image_embed")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay, global-norm clipping and gradient accumulation."""

    learning_rate: float = 3e-4
    warmup_steps: int = 500
    total_steps: int = 20_000
    final_lr_fraction: float = 0.1  # the cosine ends at learning_rate * final_lr_fraction
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.96  # DALL-E's value
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 turns clipping off
    grad_accum_steps: int = 1  # the batch is split into this many micro-batches

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.total_steps <= 0 or self.warmup_steps < 0:
            raise UserError(
                f"optimizer config: learning_rate ({self.learning_rate}) and total_steps "
                f"({self.total_steps}) must be positive, warmup_steps ({self.warmup_steps}) >= 0"
            )
        if self.grad_accum_steps < 1:
            raise UserError(
                f"optimizer config: grad_accum_steps must be >= 1, got {self.grad_accum_steps}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimConfig:
        return cls(**d)


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Learning rate per step: linear warmup from 0, then cosine decay to the final fraction."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def _decay_mask(params: Any) -> Any:
    def decayed(path: tuple, _leaf: Any) -> bool:
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        return any(n in _DECAYED_NAMES for n in names[-2:])

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay on kernels and embedding tables only)."""
    adamw = optax.adamw(
        make_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_decay_mask,
    )
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


def init_train_state(
    model: DalleTransformer, config: OptimConfig
) -> tuple[nnx.GraphDef, nnx.State]:
    """Wraps `model` in an AdamW optimiser; returns `nnx.split((model, optimizer))`."""
    optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
    return nnx.split((model, optimizer))


def train_step_fn(graphdef: nnx.GraphDef, config: OptimConfig, seed: int = 0) -> TrainStep:
    """The pure (unjitted) train step for the state layout of `init_train_state`.

    batch: {"text_ids": int32 [B, T], "image_ids": int32 [B, N]}, B divisible by
    `config.grad_accum_steps`. Metrics (float32 scalars): loss, text_loss, image_loss,
    captions_dropped (means over micro-batches), grad_norm (before clipping), learning_rate.
    """
    schedule = make_schedule(config)
    accum = config.grad_accum_steps

    def step(state: nnx.State, batch: Batch) -> tuple[nnx.State, dict[str, jax.Array]]:
        model, optimizer = nnx.merge(graphdef, state)
        model_def, params = nnx.split(model)
        step_index = optimizer.step[...]
        step_key = jax.random.fold_in(jax.random.key(seed), step_index)

        def grad_of(micro: Batch, key: jax.Array):
            def loss_of(p):
                return loss_fn(nnx.merge(model_def, p), micro, key)

            return jax.grad(loss_of, has_aux=True)(params)

        if accum == 1:
            grads, metrics = grad_of(batch, step_key)
        else:
            size = jax.tree.leaves(batch)[0].shape[0]
            if size % accum:
                raise UserError(f"batch size {size} is not divisible by grad_accum_steps {accum}")
            micro_batches = jax.tree.map(
                lambda x: x.reshape(accum, size // accum, *x.shape[1:]), dict(batch)
            )

            def body(carry, inputs):
                index, micro = inputs
                grads, metrics = grad_of(micro, jax.random.fold_in(step_key, index))
                summed = jax.tree.map(jnp.add, carry, (grads, metrics))
                return summed, None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(grad_of, jax.tree.map(lambda x: x[0], micro_batches), step_key),
            )
            (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_batches))
            grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))

        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(step_index)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), metrics

    return step


def make_train_step(
    graphdef: nnx.GraphDef,
    config: OptimConfig,
    seed: int = 0,
    *,
    state: nnx.State | None = None,
    mesh: Mesh | None = None,
    rules: LogicalRules | None = None,
) -> TrainStep:
    """`train_step_fn` jitted once with the state donated.

    With a `mesh`, pass `state` (abstract or placed) too: the step then keeps the state in the
    layout its logical annotations give (`dalle_jax.sharding.param_shardings`) and expects the
    batch split over the data axes (`dalle_jax.sharding.shard_batch`).
    """
    fn = train_step_fn(graphdef, config, seed)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    if state is None:
        raise ValueError("make_train_step with a mesh needs the state (for its shardings)")
    state_shardings = param_shardings(state, mesh, rules)
    batch_sharding = NamedSharding(
        mesh, logical_to_mesh(("batch", None), rules, mesh_axis_names=mesh.axis_names)
    )
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )

    def run(state: nnx.State, batch: Batch):
        with jax.set_mesh(mesh), use_rules(rules if rules is not None else _default_rules()):
            return jitted(state, batch)

    return run


def _default_rules() -> LogicalRules:
    from dalle_jax.sharding import current_rules

    return current_rules()
