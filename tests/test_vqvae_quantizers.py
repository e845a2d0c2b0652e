"""Quantizer math, schedules and codebook metrics on constructed cases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae.config import get_config
from vqvae.metrics import code_histogram, codebook_perplexity, codebook_usage, psnr, psnr_per_image
from vqvae.model import create_model
from vqvae.quantizers import (
    CodebookEMA,
    VectorQuantizer,
    ema_codebook,
    gumbel_softmax,
    kl_to_uniform,
    l2_normalize,
    nearest_codes,
    restart_dead_codes,
)
from vqvae.schedules import gumbel_temperature, kl_weight
from vqvae.train_config import TrainConfig

# ---- nearest code and straight-through ----


def test_nearest_code_is_the_most_cosine_similar():
    codebook = l2_normalize(jnp.eye(4))
    features = l2_normalize(
        jnp.array([[0.1, 3.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.2], [1, 0, 0, 0.9]])
    )
    np.testing.assert_array_equal(nearest_codes(features, codebook), [1, 3, 0])


def test_vq_straight_through_passes_decoder_gradient_to_features():
    config = dataclasses.replace(get_config("tiny"), use_ema=False)
    quantizer = VectorQuantizer(config, rngs=nnx.Rngs(params=0))
    features = jax.random.normal(jax.random.key(1), (2, 4, 4, config.code_dim))
    target = jax.random.normal(jax.random.key(2), (2, 4, 4, config.code_dim))

    def decoder_loss(features):
        return jnp.sum((quantizer(features).codes - target) ** 2)

    grad = jax.jit(jax.grad(decoder_loss))(features)
    assert float(jnp.linalg.norm(grad)) > 1e-3
    # The forward value is the code itself, not the feature.
    out = quantizer(features)
    np.testing.assert_allclose(out.codes, quantizer.embed(out.ids), atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "tiny_gumbel"])
def test_reconstruction_gradient_reaches_the_encoder_through_the_quantizer(name):
    model = create_model(get_config(name))
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))

    def recon_loss(model):
        out = model(images, key=jax.random.key(1), temperature=1.0)
        return jnp.mean((out.recon - images) ** 2)  # no quantizer loss: only the decoder path

    grads = nnx.jit(nnx.grad(recon_loss))(model)
    encoder_kernel = grads.encoder.conv_in.kernel[...]
    assert float(jnp.abs(encoder_kernel).max()) > 0.0


def test_codebook_loss_trains_a_param_codebook_and_ema_codebook_is_not_a_param():
    learned = create_model(dataclasses.replace(get_config("tiny"), use_ema=False))
    assert isinstance(learned.quantizer.codebook, nnx.Param)
    ema = create_model(get_config("tiny"))
    assert isinstance(ema.quantizer.codebook, CodebookEMA)
    assert "codebook" not in nnx.state(ema.quantizer, nnx.Param)


# ---- EMA and dead-code restart ----


def test_ema_moves_assigned_codes_toward_their_features_and_leaves_others_pointing_the_same():
    codebook = l2_normalize(jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    features = l2_normalize(jnp.array([[1.0, 1.0, 0.0], [1.0, 0.8, 0.0]]))  # both assigned to 0
    ids = jnp.array([0, 0])
    updated = ema_codebook(codebook, features, ids, decay=0.9)
    target = l2_normalize(jnp.mean(features, axis=0))
    before = float(jnp.dot(l2_normalize(codebook[0]), target))
    after = float(jnp.dot(l2_normalize(updated[0]), target))
    assert after > before + 0.05
    np.testing.assert_allclose(l2_normalize(updated[1:]), codebook[1:], atol=1e-6)


def test_ema_quantizer_update_moves_the_codebook_over_steps():
    config = dataclasses.replace(get_config("tiny"), ema_decay=0.5, restart_unused_steps=0)
    quantizer = VectorQuantizer(config, rngs=nnx.Rngs(params=0))
    features = jnp.tile(l2_normalize(jnp.arange(1.0, 9.0))[None, None, None], (2, 2, 2, 1))
    out = quantizer(features)
    code = int(out.ids[0, 0, 0])
    similarity = lambda: float(jnp.dot(quantizer.normalized_codebook()[code], features[0, 0, 0]))
    start = similarity()
    for _ in range(5):
        quantizer.update(out, jax.random.key(0))
    assert similarity() > max(start, 0.99)


def test_restart_replaces_codes_unused_for_the_horizon_with_batch_features():
    codebook = l2_normalize(jax.random.normal(jax.random.key(0), (8, 4)))
    features = l2_normalize(jax.random.normal(jax.random.key(1), (16, 4)))
    counts = jnp.array([16, 0, 0, 0, 0, 0, 0, 0])  # only code 0 is used in this batch
    unused = jnp.array([0, 0, 2, 2, 5, 1, 2, 0], jnp.int32)  # codes 2,3,4,6 reach 3 now
    new_codebook, new_unused, restarted = restart_dead_codes(
        codebook, unused, counts, features, jax.random.key(2), restart_after=3
    )
    np.testing.assert_array_equal(restarted, [0, 0, 1, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(new_unused, [0, 1, 0, 0, 0, 2, 0, 1])
    for code in range(8):
        distances = jnp.linalg.norm(features - new_codebook[code], axis=1)
        if restarted[code]:
            assert float(distances.min()) < 1e-6, f"code {code} is not a batch feature"
        else:
            np.testing.assert_array_equal(new_codebook[code], codebook[code])
    # Distinct features where the batch has enough of them.
    rows = {tuple(np.asarray(new_codebook[c]).round(6)) for c in (2, 3, 4, 6)}
    assert len(rows) == 4


def test_quantizer_update_revives_dead_codes_inside_jit():
    config = dataclasses.replace(get_config("tiny"), restart_unused_steps=2, codebook_size=16)
    quantizer = VectorQuantizer(config, rngs=nnx.Rngs(params=0))
    direction = l2_normalize(jnp.arange(1.0, config.code_dim + 1.0))
    noise = jax.random.normal(jax.random.key(3), (4, 4, 4, config.code_dim))
    features = l2_normalize(direction + 0.2 * noise)
    # Code 0 points along the features, the other 15 away from them all: 15 dead codes.
    quantizer.codebook[...] = jnp.tile(-direction[None], (16, 1)).at[0].set(direction)

    @nnx.jit
    def step(quantizer, features, key):
        return quantizer.update(quantizer(features), key)

    first = step(quantizer, features, jax.random.key(0))
    assert float(first["restarted_codes"]) == 0.0
    usage_before = len(np.unique(quantizer(features).ids))
    second = step(quantizer, features, jax.random.key(1))
    assert float(second["restarted_codes"]) == 15.0
    usage_after = len(np.unique(quantizer(features).ids))
    assert usage_before == 1
    assert usage_after > 8


# ---- Gumbel ----


def test_gumbel_softmax_is_a_distribution_and_hardens_at_low_temperature():
    logits = jax.random.normal(jax.random.key(0), (64, 10))
    key = jax.random.key(1)
    soft = gumbel_softmax(logits, key, 1.0)
    np.testing.assert_allclose(jnp.sum(soft, axis=-1), 1.0, atol=1e-5)
    hard = gumbel_softmax(logits, key, 1.0 / 64)
    noisy_argmax = jnp.argmax(logits + jax.random.gumbel(key, logits.shape), axis=-1)
    np.testing.assert_array_equal(jnp.argmax(hard, axis=-1), noisy_argmax)
    assert float(jnp.mean(jnp.max(hard, axis=-1))) > 0.95
    assert float(jnp.mean(jnp.max(soft, axis=-1))) < 0.9


def test_kl_to_uniform_is_zero_for_uniform_and_log_k_for_certain():
    assert abs(float(kl_to_uniform(jnp.zeros((3, 16))))) < 1e-6
    certain = jnp.full((3, 16), -1e4).at[:, 5].set(1e4)
    assert abs(float(kl_to_uniform(certain)) - np.log(16)) < 1e-4


def test_gumbel_quantizer_is_hard_without_a_key():
    model = create_model(get_config("tiny_gumbel"))
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    out = model(images)
    np.testing.assert_allclose(out.quantizer.codes, model.quantizer.embed(out.quantizer.ids))
    relaxed = model(images, key=jax.random.key(1), temperature=1.0)
    assert not np.allclose(relaxed.quantizer.codes, out.quantizer.codes)


# ---- schedules ----


def test_temperature_anneals_from_start_to_end_monotonically():
    config = TrainConfig(temperature_anneal_steps=1000, total_steps=2000)
    steps = jnp.arange(0, 1500, 50)
    taus = jax.jit(jax.vmap(lambda s: gumbel_temperature(s, config)))(steps)
    assert abs(float(taus[0]) - 1.0) < 1e-6
    assert abs(float(gumbel_temperature(1000, config)) - 1.0 / 16) < 1e-6
    assert abs(float(gumbel_temperature(5000, config)) - 1.0 / 16) < 1e-6
    assert np.all(np.diff(np.asarray(taus)) <= 1e-7)
    assert 1.0 / 16 < float(gumbel_temperature(500, config)) < 1.0


def test_kl_weight_ramps_from_zero_to_its_max():
    config = TrainConfig(kl_weight_max=6.6, kl_warmup_steps=5000, total_steps=10000)
    betas = np.asarray([float(kl_weight(s, config)) for s in range(0, 7000, 500)])
    assert betas[0] == 0.0
    assert abs(float(kl_weight(5000, config)) - 6.6) < 1e-5
    assert abs(float(kl_weight(2500, config)) - 3.3) < 1e-5  # cosine: half-way at half-time
    assert np.all(np.diff(betas) >= 0)
    assert abs(betas[-1] - 6.6) < 1e-5


# ---- metrics ----


def test_histogram_usage_and_perplexity_on_known_ids():
    ids = jnp.array([[0, 0, 1], [3, 3, 3]])
    hist = code_histogram(ids, 5)
    np.testing.assert_array_equal(hist, [2, 1, 0, 3, 0])
    assert abs(float(codebook_usage(hist)) - 3 / 5) < 1e-6
    assert abs(float(codebook_perplexity(jnp.array([4, 4, 4, 4]))) - 4.0) < 1e-5
    assert abs(float(codebook_perplexity(jnp.array([0, 9, 0, 0]))) - 1.0) < 1e-6
    assert abs(float(codebook_usage(jnp.array([0, 9, 0, 0]))) - 0.25) < 1e-6
    # Accumulated over batches, usage counts a code used in any batch.
    total = code_histogram(jnp.array([0, 1]), 4) + code_histogram(jnp.array([2, 2]), 4)
    assert abs(float(codebook_usage(total)) - 0.75) < 1e-6
    p = np.array([1, 1, 2]) / 4
    assert abs(float(codebook_perplexity(total)) - np.exp(-(p * np.log(p)).sum())) < 1e-5


def test_psnr_of_known_errors():
    a = jnp.zeros((2, 4, 4, 3))
    b = jnp.stack([jnp.full((4, 4, 3), 0.1), jnp.full((4, 4, 3), 0.01)])
    np.testing.assert_allclose(psnr_per_image(a, b), [20.0, 40.0], atol=1e-4)
    assert abs(float(psnr(a, b)) - 30.0) < 1e-4
    assert float(psnr(a, a)) == pytest.approx(100.0)
