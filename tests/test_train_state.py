"""The (model, optimizer) pair as a checkpoint tree, and a run's start through `open_run`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from dalle_jax import checkpoint as ckpt
from dalle_jax import train_state
from dalle_jax.checkpoint import ResumeSource
from dalle_jax.errors import UserError


def _pair(seed: int = 0) -> tuple[nnx.Linear, nnx.Optimizer]:
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def _graphdef_and_template():
    return nnx.split(nnx.eval_shape(_pair))


def _train_step(graphdef):
    @jax.jit
    def step(state, x):
        model, optimizer = nnx.merge(graphdef, state)
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer))

    return step


def test_checkpoint_tree_round_trips_weights_and_optimizer_state():
    state = nnx.state(_pair(seed=1))
    tree = train_state.to_checkpoint(state)
    assert set(tree) == {"params", "opt"}
    _, template = _graphdef_and_template()
    back = train_state.to_checkpoint(train_state.from_checkpoint(template, tree))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the weights are the model's, the optimizer's step counter is in "opt"
    np.testing.assert_array_equal(tree["params"]["kernel"], state[0]["kernel"][...])
    assert "step" in tree["opt"]


def test_step_state_is_what_the_step_returns_so_it_compiles_once():
    graphdef, template = _graphdef_and_template()
    tree = train_state.to_checkpoint(nnx.state(_pair(seed=2)))
    step = _train_step(graphdef)
    state = train_state.step_state(graphdef, template, tree)
    x = jnp.ones((2, 4))
    state = step(step(state, x), x)
    assert step._cache_size() == 1
    # the plain `from_checkpoint` nesting is another pytree: the step would compile again
    _, template = _graphdef_and_template()
    step(train_state.from_checkpoint(template, tree), x)
    assert step._cache_size() == 2


def test_abstract_checkpoint_carries_one_sharding_or_a_tree_of_them():
    _, template = _graphdef_and_template()
    device = jax.devices()[0]
    single = SingleDeviceSharding(device)
    abstract = train_state.abstract_checkpoint(template, single)
    leaves = jax.tree.leaves(abstract)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.sharding == single for x in leaves)
    assert abstract["params"]["kernel"].shape == (4, 3)

    mesh = jax.sharding.Mesh(np.array([device]), ("data",))
    replicated = NamedSharding(mesh, P())
    _, template = _graphdef_and_template()
    shardings = jax.tree.map(lambda _: replicated, train_state.to_checkpoint(template))
    shardings["params"]["kernel"] = NamedSharding(mesh, P("data"))
    _, template = _graphdef_and_template()
    abstract = train_state.abstract_checkpoint(template, shardings)
    assert abstract["params"]["kernel"].sharding.spec == P("data")
    assert abstract["params"]["bias"].sharding == replicated


def test_jit_init_makes_the_fresh_tree_with_the_given_sharding():
    sharding = SingleDeviceSharding(jax.devices()[0])
    init = train_state.jit_init(
        lambda: train_state.to_checkpoint(nnx.state(_pair(seed=3))), sharding, on_cpu=True
    )
    tree = init()
    expected = train_state.to_checkpoint(nnx.state(_pair(seed=3)))
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected), strict=True):
        assert a.sharding == sharding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "step", "start"),
    [("workdir", 20, 20), ("resume", 30, 30), ("init", 30, 0), ("scratch", None, 0)],
)
def test_a_run_continues_from_its_own_or_resumed_step_never_an_init_step(kind, step, start):
    assert ResumeSource(kind, step=step).start_step == start


def test_open_run_starts_saves_and_resumes(tmp_path):
    _, template = _graphdef_and_template()
    sharding = SingleDeviceSharding(jax.devices()[0])
    abstract = train_state.abstract_checkpoint(template, sharding)
    fresh = train_state.to_checkpoint(nnx.state(_pair(seed=4)))
    config = {"model": {"features": 3}}
    checkpointer, restored = ckpt.open_run(
        tmp_path, abstract, init_fn=lambda: fresh, config=config, save_interval_steps=1
    )
    assert restored.how.kind == "scratch" and restored.how.start_step == 0
    with checkpointer:
        assert checkpointer.save(7, restored.state, force=True)
    checkpointer, restored = ckpt.open_run(tmp_path, abstract, init_fn=lambda: fresh, config=config)
    checkpointer.close()
    assert (restored.how.kind, restored.how.start_step) == ("workdir", 7)


def test_open_run_closes_its_checkpointer_when_the_checkpoint_refuses(tmp_path, monkeypatch):
    _, template = _graphdef_and_template()
    abstract = train_state.abstract_checkpoint(template, SingleDeviceSharding(jax.devices()[0]))
    fresh = train_state.to_checkpoint(nnx.state(_pair()))
    with ckpt.Checkpointer(tmp_path, config={"model": {"features": 3}}) as checkpointer:
        checkpointer.save(1, fresh, force=True)
    closed = []
    original_close = ckpt.Checkpointer.close
    monkeypatch.setattr(
        ckpt.Checkpointer, "close", lambda self: (closed.append(self), original_close(self))
    )
    with pytest.raises(UserError, match="features"):
        ckpt.open_run(tmp_path, abstract, init_fn=lambda: fresh, config={"model": {"features": 5}})
    assert len(closed) == 1
