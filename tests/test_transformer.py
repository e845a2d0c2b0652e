"""The stage-2 transformer: embeddings, causality, sparse masks, cache, loss, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax.errors import UserError
from dalle_jax.model import (
    DalleConfig,
    DalleTransformer,
    cross_entropy,
    drop_captions,
    get_config,
    loss_fn,
)
from dalle_jax.train_step import OptimConfig, _decay_mask, init_train_state, make_train_step

TINY = get_config("tiny")

# Jitted once per model config and shape: eager op-by-op dispatch is slower than compiling.
forward = nnx.jit(lambda model, text_ids, image_ids: model(text_ids, image_ids))
eval_loss = nnx.jit(lambda model, batch: loss_fn(model, batch, None, train=False))


def make_batch(config: DalleConfig, batch: int, seed: int = 0) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    text = jax.random.randint(k1, (batch, config.text_length), 1, config.text_vocab_size)
    # Real captions end in padding: pad the last 3 positions.
    text = text.at[:, -3:].set(config.text_pad_id)
    image = jax.random.randint(k2, (batch, config.image_length), 0, config.image_vocab_size)
    return {"text_ids": text.astype(jnp.int32), "image_ids": image.astype(jnp.int32)}


@pytest.fixture(scope="module")
def model():
    return DalleTransformer(TINY, rngs=nnx.Rngs(0))


# ---- config --------------------------------------------------------------------------------------
def test_config_round_trips_through_json():
    config = get_config("ref-small", attention_types=("row", "column", "conv"))
    restored = DalleConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.attention_types == ("row", "column", "conv")


def test_named_variants_have_the_documented_sizes():
    ref = get_config("ref-small")
    assert (ref.num_layers, ref.d_model, ref.num_heads, ref.mlp_dim) == (4, 256, 8, 1024)
    assert (ref.text_length, ref.text_vocab_size, ref.image_length, ref.image_vocab_size) == (
        32,
        1000,
        64,
        512,
    )
    base = get_config("ref-base")
    assert (base.num_layers, base.d_model, base.num_heads, base.mlp_dim) == (12, 768, 12, 3072)
    assert (base.text_length, base.image_rows, base.image_cols, base.image_vocab_size) == (
        64,
        16,
        16,
        8192,
    )


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown model config 'huge'"):
        get_config("huge")
    with pytest.raises(UserError, match="d_model 30 is not divisible by num_heads 4"):
        get_config("tiny", d_model=30)
    with pytest.raises(UserError, match="attention_types"):
        get_config("tiny", attention_types=("diagonal",))
    with pytest.raises(UserError, match="unknown field"):
        DalleConfig.from_dict({**TINY.to_dict(), "depth": 3})
    with pytest.raises(UserError, match="activation 'swish' must be one of"):
        get_config("tiny", activation="swish")


def test_configs_saved_before_the_activation_field_load_as_gelu():
    # Every bundle and checkpoint written before the field existed was trained with GELU.
    legacy = get_config("tiny", activation="relu").to_dict()
    del legacy["activation"]
    assert DalleConfig.from_dict(legacy).activation == "gelu"
    relu = get_config("tiny", activation="relu")
    assert DalleConfig.from_dict(relu.to_dict()).activation == "relu"


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_the_mlp_applies_the_configured_activation(activation):
    config = get_config("tiny", activation=activation)
    mlp = DalleTransformer(config, rngs=nnx.Rngs(0)).blocks[0].mlp
    x = jax.random.normal(jax.random.key(1), (2, 5, config.d_model))
    hidden = x @ mlp.up.kernel[...]
    act = {"gelu": jax.nn.gelu, "relu": lambda h: jnp.maximum(h, 0.0)}[activation]
    np.testing.assert_allclose(mlp(x), act(hidden) @ mlp.down.kernel[...], rtol=1e-5, atol=1e-6)
    other = {"gelu": jax.nn.relu, "relu": jax.nn.gelu}[activation]
    assert not np.allclose(mlp(x), other(hidden) @ mlp.down.kernel[...], atol=1e-4)


# ---- forward pass --------------------------------------------------------------------------------
def test_forward_shapes_and_dtypes(model):
    batch = make_batch(TINY, 3)
    text_logits, image_logits = forward(model, batch["text_ids"], batch["image_ids"])
    assert text_logits.shape == (3, TINY.text_length, TINY.text_vocab_size)
    assert image_logits.shape == (3, TINY.image_length, TINY.image_vocab_size)
    assert text_logits.dtype == image_logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_pad_embedding_depends_on_position_and_tokens_do_not(model):
    config = TINY
    pad, word = config.text_pad_id, 7
    text = jnp.full((1, config.text_length), word, jnp.int32)
    text = text.at[0, 2].set(pad).at[0, 5].set(pad)
    emb = model.embed_text(text)[0]  # [T+1, D]; text position i sits at row i+1
    pos = model.text_pos[...]
    token_part = emb - pos
    # Pads at text positions 2 and 5 get different learned embeddings...
    assert not np.allclose(token_part[3], token_part[6])
    np.testing.assert_allclose(
        token_part[3], model.text_embed[...][config.text_vocab_size + 2], atol=1e-6
    )
    # ...while the same word at positions 0 and 4 differs only by the position embedding.
    np.testing.assert_allclose(token_part[1], token_part[5], atol=1e-6)
    np.testing.assert_allclose(token_part[1], model.text_embed[...][word], atol=1e-6)


def test_outputs_are_causal_and_text_never_sees_the_image(model):
    batch = make_batch(TINY, 2)
    text_logits, image_logits = forward(model, batch["text_ids"], batch["image_ids"])
    # Changing image id 5 changes image predictions from id 6 on, and nothing before.
    changed = (
        batch["image_ids"].at[:, 5].set((batch["image_ids"][:, 5] + 1) % TINY.image_vocab_size)
    )
    text2, image2 = forward(model, batch["text_ids"], changed)
    np.testing.assert_array_equal(text2, text_logits)
    np.testing.assert_array_equal(image2[:, :6], image_logits[:, :6])
    assert not np.allclose(image2[:, 6], image_logits[:, 6])
    # Changing text id 3 leaves text predictions 0..3 alone and reaches every image prediction.
    text_changed = batch["text_ids"].at[:, 3].set(11)
    text3, image3 = forward(model, text_changed, batch["image_ids"])
    np.testing.assert_array_equal(text3[:, :4], text_logits[:, :4])
    assert not np.allclose(text3[:, 4], text_logits[:, 4])
    assert not np.allclose(image3[:, 0], image_logits[:, 0])


@pytest.mark.parametrize(
    ("kind", "changed_id", "affects"),
    [
        # 1 layer, 4x4 grid. Predicting id 6 = (1, 2) with row attention reads ids 4, 5 (and the
        # query's own input, id 5); id 2 = (0, 2) is invisible to it, visible to column attention.
        ("row", 2, False),
        ("column", 2, True),
        ("row", 4, True),
        ("column", 4, False),
        ("conv", 0, False),  # (0, 0) is two columns away from (1, 2) with a 3x3 window
        ("conv", 1, True),
    ],
)
def test_sparse_attention_limits_what_an_image_prediction_reads(kind, changed_id, affects):
    config = get_config("tiny", num_layers=1, attention_types=(kind,))
    model = DalleTransformer(config, rngs=nnx.Rngs(1))
    batch = make_batch(config, 1)
    _, before = forward(model, batch["text_ids"], batch["image_ids"])
    image = batch["image_ids"].at[:, changed_id].add(1) % config.image_vocab_size
    _, after = forward(model, batch["text_ids"], image)
    assert (not np.allclose(before[:, 6], after[:, 6])) == affects


def test_remat_and_dropout(model):
    batch = make_batch(TINY, 2)
    plain = model(batch["text_ids"], batch["image_ids"])
    remat_model = DalleTransformer(TINY.replace(remat=True), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        remat_model(batch["text_ids"], batch["image_ids"])[1], plain[1], rtol=1e-5, atol=1e-5
    )
    drop_model = DalleTransformer(TINY.replace(dropout_rate=0.3), rngs=nnx.Rngs(0))
    no_key = drop_model(batch["text_ids"], batch["image_ids"])
    np.testing.assert_allclose(no_key[1], plain[1], rtol=1e-6)  # no key: deterministic
    keyed = drop_model(batch["text_ids"], batch["image_ids"], dropout_key=jax.random.key(3))
    assert not np.allclose(keyed[1], plain[1])


# ---- cached decoding -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attention_types", "norm", "use_bias", "activation"),
    [
        (("full",), "rmsnorm", False, "relu"),
        (("row", "column", "conv"), "layernorm", True, "gelu"),
    ],
)
def test_decode_step_matches_the_full_forward_pass(attention_types, norm, use_bias, activation):
    config = get_config(
        "tiny",
        num_layers=3,
        attention_types=attention_types,
        norm=norm,
        use_bias=use_bias,
        activation=activation,
    )
    model = DalleTransformer(config, rngs=nnx.Rngs(2))
    batch = make_batch(config, 2, seed=4)
    _, image_logits = forward(model, batch["text_ids"], batch["image_ids"])

    prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))
    step = nnx.jit(lambda m, i, j, c: m.decode_step(i, j, c))
    cache = model.init_cache(2)
    assert len(cache.keys) == len(cache.values) == 3
    assert cache.keys[0].shape == (2 * config.num_heads, config.seq_length, config.head_dim)
    logits, cache = prefill(model, batch["text_ids"], cache)
    decoded = [logits]
    for j in range(config.image_length - 1):
        logits, cache = step(model, batch["image_ids"][:, j], jnp.int32(j), cache)
        decoded.append(logits)
    np.testing.assert_allclose(jnp.stack(decoded, axis=1), image_logits, rtol=1e-4, atol=1e-5)


def test_decoding_on_a_cache_grown_in_stretches_matches_the_full_forward_pass(model):
    """The sampler's schedule: prefill on a cache of T+1 positions, then grow it before each
    stretch of steps to the positions that stretch writes; attention reads only those."""
    config = TINY
    batch = make_batch(config, 2, seed=5)
    _, image_logits = forward(model, batch["text_ids"], batch["image_ids"])
    prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))
    step = nnx.jit(lambda m, i, j, c: m.decode_step(i, j, c))
    cache = model.init_cache(2, length=config.text_length + 1)
    assert cache.length == config.text_length + 1
    logits, cache = prefill(model, batch["text_ids"], cache)
    decoded = [logits]
    stretches = [(0, 5), (5, config.image_length - 1)]
    for begin, stop in stretches:
        cache = cache.grown_to(model.cache_length(stop - 1))
        assert cache.keys[0].shape[1] == config.text_length + 1 + stop
        for j in range(begin, stop):
            logits, cache = step(model, batch["image_ids"][:, j], jnp.int32(j), cache)
            decoded.append(logits)
    assert cache.length == config.seq_length
    np.testing.assert_allclose(jnp.stack(decoded, axis=1), image_logits, rtol=1e-4, atol=1e-5)


def test_cache_lengths_are_checked_where_they_are_static(model):
    t, s = TINY.text_length, TINY.seq_length
    with pytest.raises(ValueError, match="outside"):
        model.init_cache(1, length=t)  # no room for the caption
    with pytest.raises(ValueError, match="outside"):
        model.init_cache(1, length=s + 1)
    cache = model.init_cache(1, length=t + 1)
    with pytest.raises(ValueError, match="cannot shrink"):
        model.init_cache(1).grown_to(t + 1)
    with pytest.raises(ValueError, match="needs a cache of"):
        model.decode_step(jnp.zeros((1,), jnp.int32), 0, cache)  # position T+1 does not fit
    grown = cache.grown_to(t + 2)
    assert grown.length == t + 2
    assert all(float(jnp.abs(k[:, t + 1]).max()) == 0.0 for k in grown.keys + grown.values)


# ---- loss ----------------------------------------------------------------------------------------
def test_loss_is_the_weighted_sum_of_text_and_image_losses(model):
    batch = make_batch(TINY, 4)
    loss, metrics = eval_loss(model, batch)
    text_logits, image_logits = forward(model, batch["text_ids"], batch["image_ids"])

    # Reference cross-entropy from log_softmax, independent of `cross_entropy`.
    def nll(logits, ids):
        logp = jax.nn.log_softmax(logits)
        return -np.mean(np.take_along_axis(np.asarray(logp), np.asarray(ids)[..., None], -1))

    np.testing.assert_allclose(metrics["text_loss"], nll(text_logits, batch["text_ids"]), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["image_loss"], nll(image_logits, batch["image_ids"]), rtol=1e-5
    )
    expected = (
        TINY.text_loss_weight * metrics["text_loss"]
        + TINY.image_loss_weight * metrics["image_loss"]
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics["loss"] == loss

    reweighted = DalleTransformer(
        TINY.replace(text_loss_weight=0.5, image_loss_weight=2.0), rngs=nnx.Rngs(0)
    )
    loss2, m2 = eval_loss(reweighted, batch)
    np.testing.assert_allclose(loss2, 0.5 * m2["text_loss"] + 2.0 * m2["image_loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["image_loss"], metrics["image_loss"], rtol=1e-6)


def test_cross_entropy_of_a_uniform_distribution_is_log_vocab():
    logits = jnp.zeros((2, 3, 17))
    np.testing.assert_allclose(
        cross_entropy(logits, jnp.zeros((2, 3), jnp.int32)), np.log(17), rtol=1e-6
    )


def test_caption_dropout_rate_and_empty_captions():
    text = jnp.arange(1, 6, dtype=jnp.int32)[None].repeat(20_000, axis=0)
    dropped_text, dropped = drop_captions(text, jax.random.key(0), 0.1, pad_id=0)
    rate = float(jnp.mean(dropped))
    assert abs(rate - 0.1) < 0.01, rate  # 5 sigma is 0.0106
    assert np.all(np.asarray(dropped_text)[np.asarray(dropped)] == 0)
    np.testing.assert_array_equal(dropped_text[~dropped], text[~dropped])
    again, _ = drop_captions(text, jax.random.key(0), 0.1, pad_id=0)
    np.testing.assert_array_equal(again, dropped_text)  # keyed: reproducible


def test_loss_fn_drops_captions_only_in_training():
    model = DalleTransformer(TINY.replace(caption_dropout=0.5), rngs=nnx.Rngs(0))
    batch = make_batch(TINY, 64)
    train_loss = nnx.jit(lambda m, b, k: loss_fn(m, b, k))
    _, train_metrics = train_loss(model, batch, jax.random.key(5))
    assert 0.25 < float(train_metrics["captions_dropped"]) < 0.75
    _, eval_metrics = eval_loss(model, batch)
    assert float(eval_metrics["captions_dropped"]) == 0.0


def test_bfloat16_compute_runs_with_float32_params_and_logits():
    config = TINY.replace(dtype="bfloat16")
    model = DalleTransformer(config, rngs=nnx.Rngs(0))
    batch = make_batch(config, 2)
    text_logits, image_logits = forward(model, batch["text_ids"], batch["image_ids"])
    assert text_logits.dtype == image_logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    loss_bf16, _ = eval_loss(model, batch)
    loss_f32, _ = eval_loss(DalleTransformer(TINY, rngs=nnx.Rngs(0)), batch)
    assert np.isfinite(loss_bf16)
    np.testing.assert_allclose(loss_bf16, loss_f32, rtol=2e-2)
    cache = model.init_cache(2)
    assert {k.dtype for k in cache.keys + cache.values} == {jnp.dtype(jnp.bfloat16)}


# ---- training ------------------------------------------------------------------------------------
OVERFIT_OPTIM = OptimConfig(learning_rate=3e-3, warmup_steps=10, total_steps=100, weight_decay=0.0)
OVERFIT_CONFIG = TINY.replace(caption_dropout=0.0)


@pytest.fixture(scope="module")
def overfit_run():
    """100 train steps on 4 examples; returns (graphdef, state after step 1, metrics, losses)."""
    model = DalleTransformer(OVERFIT_CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = init_train_state(model, OVERFIT_OPTIM)
    train_step = make_train_step(graphdef, OVERFIT_OPTIM)
    batch = make_batch(OVERFIT_CONFIG, 4, seed=1)
    losses, first = [], None
    for _ in range(100):
        state, metrics = train_step(state, batch)
        if first is None:
            first = (jax.tree.map(np.asarray, state), jax.tree.map(float, metrics))
        losses.append(float(metrics["loss"]))
    return graphdef, first, losses, state


def test_tiny_model_overfits_a_few_examples(overfit_run):
    graphdef, _, losses, state = overfit_run
    assert losses[-1] < losses[0] / 8, (losses[0], losses[-1])
    assert int(nnx.merge(graphdef, state)[1].step[...]) == 100


def test_gradient_accumulation_matches_one_big_batch(overfit_run):
    graphdef, (state_one_batch, metrics_one_batch), _, _ = overfit_run
    optim = OVERFIT_OPTIM.__class__(**{**OVERFIT_OPTIM.to_dict(), "grad_accum_steps": 2})
    model = DalleTransformer(OVERFIT_CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = init_train_state(model, optim)
    state, metrics = make_train_step(graphdef, optim)(state, make_batch(OVERFIT_CONFIG, 4, seed=1))
    np.testing.assert_allclose(metrics["loss"], metrics_one_batch["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], metrics_one_batch["grad_norm"], rtol=1e-4)
    # Step 0 has learning rate 0 (warmup), so the comparison rests on Adam's moments:
    # mu = (1 - b1) * grad must agree leaf by leaf.
    _, optimizer = nnx.merge(graphdef, state)
    mu = jax.tree.leaves(optimizer.opt_state[1][0].mu)
    assert max(float(np.abs(m).max()) for m in mu) > 1e-4
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_one_batch), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    model = DalleTransformer(TINY.replace(use_bias=True, norm="layernorm"), rngs=nnx.Rngs(0))
    mask = _decay_mask(nnx.state(model, nnx.Param))
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(mask)}
    decayed = {k for k, v in flat.items() if v.get_value() is True}
    assert "blocks.0.attn.qkv.kernel" in decayed
    assert "text_embed" in decayed and "image_embed" in decayed
    assert "blocks.0.attn.qkv.bias" not in decayed
    assert "blocks.0.attn_norm.scale" not in decayed
    assert "blocks.0.mlp_norm.bias" not in decayed
    assert "text_head.bias" not in decayed
    assert "text_pos" not in decayed and "image_row" not in decayed


@pytest.mark.parametrize("kind", ["full", "row", "conv"])
def test_fused_attention_computes_the_einsum_attention(kind):
    # The cuDNN path's call (causal flag for plain causal masks, the table otherwise), run through
    # jax.nn.dot_product_attention's XLA implementation, which any device has.
    from dalle_jax.model.attention import dot_product_attention, fused_attention
    from dalle_jax.model.masks import attention_mask

    mask = attention_mask(kind, 4, 3, 3, conv_kernel=3)
    q, k, v = jax.random.normal(jax.random.key(7), (3, 2, mask.shape[0], 4, 8))
    expected = dot_product_attention(q, k, v, mask)
    got = fused_attention(q, k, v, mask, implementation="xla")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cudnn_attention_needs_a_half_precision_compute_dtype():
    with pytest.raises(UserError, match="attention_impl 'cudnn' needs dtype bfloat16"):
        get_config("tiny", attention_impl="cudnn")
    with pytest.raises(UserError, match="attention_impl 'flash' must be one of"):
        get_config("tiny", attention_impl="flash")
    assert get_config("tiny", attention_impl="cudnn", dtype="bfloat16").attention_impl == "cudnn"
