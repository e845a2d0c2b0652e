"""Meshes, logical-axis rules, sharded init and batches, on the 8 fake CPU devices of conftest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from dalle_jax.errors import UserError
from dalle_jax.model import DalleTransformer, get_config, loss_fn
from dalle_jax.sharding import (
    DEFAULT_RULES,
    MeshConfig,
    data_parallel_size,
    logical_to_mesh,
    make_mesh,
    override_rules,
    param_shardings,
    replicated_fraction,
    shard_batch,
    sharded_init,
    with_logical_constraint,
)
from dalle_jax.train_step import OptimConfig, init_train_state, make_train_step

TINY = get_config("tiny")


@pytest.fixture(scope="module")
def mesh222():
    assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def spec_of(shardings, *path):
    node = shardings
    for key in path:
        node = node[key]
    return node.get_value().spec


# ---- meshes --------------------------------------------------------------------------------------
def test_mesh_config_fills_the_free_axis_and_uses_auto_axes(mesh222):
    assert MeshConfig(data=2, fsdp=-1, tensor=1).resolve(8) == (2, 4, 1)
    assert MeshConfig(data=-1, fsdp=1, tensor=1).resolve(8) == (8, 1, 1)
    assert dict(mesh222.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh222.axis_types)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (MeshConfig(data=2, fsdp=2, tensor=4), "needs 16 devices, but 8 are available"),
        (MeshConfig(data=3, fsdp=-1, tensor=1), "use 3 devices, which does not divide the 8"),
        (MeshConfig(data=-1, fsdp=-1, tensor=1), "at most one axis may be -1"),
        (MeshConfig(data=0, fsdp=-1, tensor=1), "must be positive"),
    ],
)
def test_mesh_errors_name_the_numbers(config, message):
    with pytest.raises(UserError, match=message):
        make_mesh(config)


# ---- rules ---------------------------------------------------------------------------------------
def test_logical_to_mesh_default_rules():
    assert logical_to_mesh(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_mesh(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_mesh(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_mesh(("embed", None, "heads", "kv")) == P("fsdp", None, "tensor", None)
    # A mesh without the fsdp axis: batch keeps data only.
    assert logical_to_mesh(("batch", "embed"), mesh_axis_names=("data", "tensor")) == P(
        "data", None
    )


def test_override_rules_and_unknown_names():
    no_fsdp = override_rules({"embed": None})
    assert logical_to_mesh(("embed", "mlp"), no_fsdp) == P(None, "tensor")
    assert len(no_fsdp) == len(DEFAULT_RULES)
    with pytest.raises(UserError, match="unknown mesh axis 'model'"):
        override_rules({"mlp": "model"})
    with pytest.raises(UserError, match="logical axis 'emb' has no sharding rule"):
        logical_to_mesh(("emb",))


# ---- parameters ----------------------------------------------------------------------------------
def test_partition_specs_of_the_tiny_model_on_a_2x2x2_mesh(mesh222):
    # With biases and LayerNorm, so that every kind of parameter is present.
    config = TINY.replace(use_bias=True, norm="layernorm")
    abstract = nnx.eval_shape(lambda: DalleTransformer(config, rngs=nnx.Rngs(0)))
    shardings = param_shardings(abstract, mesh222)
    block = ("blocks", 0)
    assert spec_of(shardings, *block, "attn", "qkv", "kernel") == P("fsdp", None, "tensor", None)
    assert spec_of(shardings, *block, "attn", "qkv", "bias") == P(None, "tensor", None)
    assert spec_of(shardings, *block, "attn", "out", "kernel") == P("tensor", None, "fsdp")
    assert spec_of(shardings, *block, "mlp", "up", "kernel") == P("fsdp", "tensor")
    assert spec_of(shardings, *block, "mlp", "down", "kernel") == P("tensor", "fsdp")
    assert spec_of(shardings, *block, "attn_norm", "scale") == P("fsdp")
    assert spec_of(shardings, *block, "attn_norm", "bias") == P("fsdp")
    assert spec_of(shardings, *block, "mlp", "up", "bias") == P("tensor")
    assert spec_of(shardings, "text_embed") == P("tensor", "fsdp")
    assert spec_of(shardings, "image_head", "kernel") == P("fsdp", "tensor")
    assert spec_of(shardings, "text_pos") == P(None, "fsdp")
    # Every parameter is annotated: one sharding per parameter, none missing.
    n_params = len(jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert len(jax.tree.leaves(shardings)) == n_params


def test_sharded_init_shards_large_params_and_matches_plain_init():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    model = sharded_init(lambda: DalleTransformer(TINY, rngs=nnx.Rngs(0)), mesh)
    kernel = model.blocks[0].mlp.up.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "tensor")  # tensor has size 1 here
    assert kernel.addressable_shards[0].data.shape == (TINY.d_model // 8, TINY.mlp_dim)
    # Only small vectors (biases of sharded-out axes) stay whole on every device.
    assert replicated_fraction(model) < 0.05, replicated_fraction(model)
    plain = DalleTransformer(TINY, rngs=nnx.Rngs(0))
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(plain)), strict=True
    ):
        # Same random draws; jitted and eager scaling may round the last bit differently.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_indivisible_dimension_is_a_user_error():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    config = get_config("tiny", d_model=36, num_heads=4)
    with pytest.raises(UserError, match=r"size 36\) is not divisible by mesh axis fsdp of size 8"):
        param_shardings(nnx.eval_shape(lambda: DalleTransformer(config, rngs=nnx.Rngs(0))), mesh)


def test_unannotated_param_is_rejected(mesh222):
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((4, 4)))

    with pytest.raises(ValueError, match="no logical axis annotation"):
        param_shardings(Bare(), mesh222)


# ---- batches and activations ---------------------------------------------------------------------
def test_shard_batch_splits_over_data_axes(mesh222):
    assert data_parallel_size(mesh222) == 4
    batch = {"text_ids": np.zeros((8, 5), np.int32), "image_ids": np.zeros((8, 16), np.int32)}
    placed = shard_batch(batch, mesh222)
    assert placed["text_ids"].sharding.spec == P(("data", "fsdp"), None)
    assert placed["image_ids"].addressable_shards[0].data.shape == (2, 16)
    with pytest.raises(
        UserError, match="batch size 6 .* not divisible by the data-parallel size 4"
    ):
        shard_batch({"text_ids": np.zeros((6, 5), np.int32)}, mesh222)


def test_with_logical_constraint_is_a_no_op_outside_a_mesh(mesh222):
    x = jnp.ones((8, 4, 2))
    assert with_logical_constraint(x, ("batch", "length", "embed")) is x

    @jax.jit
    def constrained(x):
        return with_logical_constraint(x * 2, ("batch", "length", "embed"))

    with jax.set_mesh(mesh222):
        y = constrained(x)
    assert y.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh222, P(("data", "fsdp"), None, None)), 3
    )
    assert not y.sharding.is_fully_replicated
    # A batch of 1 cannot be split 4 ways: the constraint leaves it replicated, no error.
    with jax.set_mesh(mesh222):
        assert constrained(jnp.ones((1, 4, 2))).sharding.is_fully_replicated


# ---- a sharded train step ------------------------------------------------------------------------
def test_sharded_train_step_keeps_layout_and_matches_one_device(mesh222):
    config = TINY.replace(caption_dropout=0.0)
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    batch = {
        "text_ids": jax.random.randint(jax.random.key(0), (8, config.text_length), 0, 50),
        "image_ids": jax.random.randint(jax.random.key(1), (8, config.image_length), 0, 32),
    }
    # No dropout of any kind: the first step's loss is the plain loss of the initial model.
    reference_loss, _ = nnx.jit(lambda m, b: loss_fn(m, b, None, train=False))(
        DalleTransformer(config, rngs=nnx.Rngs(0)), batch
    )

    model = sharded_init(lambda: DalleTransformer(config, rngs=nnx.Rngs(0)), mesh222)
    graphdef, state = init_train_state(model, optim)
    expected = param_shardings(state, mesh222)
    state = jax.device_put(state, expected)
    train_step = make_train_step(graphdef, optim, state=state, mesh=mesh222)
    for _ in range(2):
        state, metrics = train_step(state, shard_batch(batch, mesh222))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    # First-step loss agrees with the single-device run.
    graphdef2, state2 = init_train_state(DalleTransformer(config, rngs=nnx.Rngs(0)), optim)
    state2 = jax.device_put(state2, param_shardings(state2, mesh222))
    _, first = train_step(state2, shard_batch(batch, mesh222))
    np.testing.assert_allclose(first["loss"], reference_loss, rtol=1e-5)
