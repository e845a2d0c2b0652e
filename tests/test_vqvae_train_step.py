"""The pure train step: optimizer schedule, loss going down, determinism, both step forms."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae.config import get_config
from vqvae.errors import VQVAEInputError
from vqvae.model import create_model
from vqvae.train_config import TrainConfig, get_train_config
from vqvae.train_step import (
    create_optimizer,
    eval_step,
    learning_rate_schedule,
    make_train_step,
    random_crops,
    train_step,
)


def synthetic_images(n: int = 8, size: int = 32) -> np.ndarray:
    """uint8 [n, size, size, 3]: one coloured rectangle on a plain background per image."""
    rng = np.random.default_rng(0)
    palette = np.array(
        [[230, 30, 30], [30, 200, 60], [40, 60, 220], [240, 220, 40], [250, 250, 250], [20, 20, 20]]
    )
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        back, front = rng.choice(len(palette), 2, replace=False)
        images[i] = palette[back]
        top, left = rng.integers(0, size // 2, 2)
        height, width = rng.integers(size // 4, size // 2, 2)
        images[i, top : top + height, left : left + width] = palette[front]
    return images


@functools.cache
def _compiled_step(name: str):
    """One jitted step per named config, shared by every run of it in this module."""
    train_config = get_train_config(name)
    model = create_model(get_config(name))
    graphdef, _ = nnx.split((model, create_optimizer(model, train_config)))
    return train_config, make_train_step(graphdef, train_config)


def _run(name: str, steps: int, *, seed: int = 0, key_seed: int = 0):
    """Trains `name` for `steps` with the functional step; returns (model, list of metrics)."""
    train_config, step_fn = _compiled_step(name)
    model = create_model(get_config(name), seed=seed)
    optimizer = create_optimizer(model, train_config)
    graphdef, state = nnx.split((model, optimizer))
    images = synthetic_images()
    key = jax.random.key(key_seed)
    history = []
    for step in range(steps):
        state, metrics = step_fn(state, images, step, key)
        history.append(jax.device_get(metrics))
    model, _ = nnx.merge(graphdef, state)
    return model, history


@pytest.fixture(scope="module")
def tiny_run():
    return _run("tiny", 60)


@pytest.fixture(scope="module")
def tiny_gumbel_run():
    return _run("tiny_gumbel", 80)


def test_learning_rate_warms_up_then_decays_by_cosine():
    config = TrainConfig(
        learning_rate=1e-3, warmup_steps=10, total_steps=110, final_lr_fraction=0.1
    )
    schedule = learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(0.55e-3, rel=1e-3)
    assert float(schedule(110)) == pytest.approx(1e-4)


@pytest.mark.parametrize("run,ratio", [("tiny_run", 0.2), ("tiny_gumbel_run", 0.4)])
def test_a_short_run_lowers_the_loss_clearly(run, ratio, request):
    _, history = request.getfixturevalue(run)
    first = np.mean([h["recon_loss"] for h in history[:3]])
    last = np.mean([h["recon_loss"] for h in history[-5:]])
    assert last < ratio * first, (first, last)
    assert history[-1]["psnr"] > history[0]["psnr"] + 4.0
    for h in history:
        assert all(np.isfinite(v) for v in h.values())


def test_training_with_the_same_seed_is_bit_identical_and_a_new_key_differs(tiny_gumbel_run):
    _, reference = tiny_gumbel_run
    _, again = _run("tiny_gumbel", 4)
    _, other_key = _run("tiny_gumbel", 4, key_seed=1)
    for x, y in zip(reference[:4], again, strict=True):
        assert x == y
    assert reference[3]["loss"] != other_key[3]["loss"]


def test_functional_step_matches_the_in_place_nnx_step(tiny_run):
    config, train_config = get_config("tiny"), get_train_config("tiny")
    images = synthetic_images()
    key = jax.random.key(0)
    model = create_model(config)
    optimizer = create_optimizer(model, train_config)
    jitted = nnx.jit(train_step, static_argnames="config")
    in_place = [jitted(model, optimizer, images, s, key, config=train_config) for s in range(3)]
    _, functional = tiny_run
    for x, y in zip(in_place, functional[:3], strict=True):
        np.testing.assert_allclose(float(x["loss"]), float(y["loss"]), rtol=1e-5)


def test_vq_train_step_restarts_dead_codes_and_keeps_usage_up(tiny_run):
    _, history = tiny_run
    # tiny restarts codes unused for 20 steps; eight small images leave many codes idle.
    assert sum(h["restarted_codes"] for h in history) > 0
    assert history[-1]["codebook_usage"] > 0.3


def test_ema_codebook_is_moved_by_the_step_not_by_the_optimizer(tiny_run):
    model, _ = tiny_run
    fresh = create_model(get_config("tiny"))
    assert not isinstance(model.quantizer.codebook, nnx.Param)
    assert not np.allclose(model.quantizer.codebook[...], fresh.quantizer.codebook[...])


def test_eval_step_reports_per_image_psnr_and_a_full_histogram():
    model = create_model(get_config("tiny"))
    out = nnx.jit(eval_step)(model, synthetic_images())
    assert out["ids"].shape == (8, 8, 8)
    assert out["recon"].shape == (8, 32, 32, 3)
    assert out["psnr"].shape == (8,)
    assert int(out["histogram"].sum()) == 8 * 8 * 8


def test_logit_laplace_loss_needs_a_logit_laplace_model():
    model = create_model(get_config("tiny"))
    train_config = dataclasses.replace(get_train_config("tiny"), logit_laplace_weight=1.0)
    optimizer = create_optimizer(model, train_config)
    with pytest.raises(VQVAEInputError, match="logit_laplace=True"):
        train_step(model, optimizer, synthetic_images(), 0, jax.random.key(0), config=train_config)


def test_logit_laplace_model_trains():
    config = dataclasses.replace(get_config("tiny_gumbel"), logit_laplace=True)
    train_config = dataclasses.replace(
        get_train_config("tiny_gumbel"), mse_weight=0.0, logit_laplace_weight=1.0
    )
    model = create_model(config)
    optimizer = create_optimizer(model, train_config)
    step = nnx.jit(train_step, static_argnames="config")
    images = jnp.asarray(synthetic_images())
    metrics = [
        step(model, optimizer, images, s, jax.random.key(0), config=train_config) for s in range(10)
    ]
    assert float(metrics[-1]["logit_laplace_nll"]) < float(metrics[0]["logit_laplace_nll"])


def test_weight_decay_shrinks_kernels_but_not_biases_or_norm_scales():
    train_config = dataclasses.replace(
        get_train_config("tiny"), weight_decay=0.5, learning_rate=0.1, warmup_steps=1
    )
    model = create_model(get_config("tiny"))
    optimizer = create_optimizer(model, train_config)
    kernel = jnp.abs(model.encoder.conv_in.kernel[...]).sum()
    scale = model.encoder.norm_out.scale[...]
    model.encoder.conv_in.bias[...] = jnp.ones_like(model.encoder.conv_in.bias[...])
    zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    update = nnx.jit(lambda optimizer, model, grads: optimizer.update(model, grads))
    for _ in range(3):
        update(optimizer, model, zero_grads)
    assert float(jnp.abs(model.encoder.conv_in.kernel[...]).sum()) < 0.95 * float(kernel)
    np.testing.assert_array_equal(model.encoder.conv_in.bias[...], 1.0)
    np.testing.assert_array_equal(model.encoder.norm_out.scale[...], scale)


@pytest.mark.parametrize("name", ["tiny", "tiny_gumbel"])
def test_decoder_fine_tuning_moves_the_decoder_only_and_keeps_every_id(name, request):
    # Start from the trained run, as `--train-decoder-only --init DIR` does.
    trained, _ = request.getfixturevalue("tiny_run" if name == "tiny" else "tiny_gumbel_run")
    images = synthetic_images()
    ids_before = np.asarray(nnx.jit(lambda m, x: m.encode_ids(x))(trained, images / 255.0))
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(trained)))
    mse_before = float(eval_step(trained, images)["psnr"].mean())

    config = dataclasses.replace(get_train_config(name), train_decoder_only=True)
    model = nnx.clone(trained)
    optimizer = create_optimizer(model, config)
    # Adam moments for the decoder's Params only (step counters aside).
    opt_floats = sum(
        leaf.size
        for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState))
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    )
    assert opt_floats == 2 * sum(
        p.size for p in jax.tree.leaves(nnx.state(model.decoder, nnx.Param))
    )
    jitted = nnx.jit(train_step, static_argnames="config")
    history = [
        jitted(model, optimizer, images, s, jax.random.key(0), config=config) for s in range(30)
    ]
    assert "restarted_codes" not in history[-1]
    after = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    for part in ("encoder", "quantizer"):
        jax.tree.map(np.testing.assert_array_equal, after[part], before[part])
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), after["decoder"], before["decoder"]
    )
    assert all(jax.tree.leaves(changed))
    ids_after = np.asarray(nnx.jit(lambda m, x: m.encode_ids(x))(model, images / 255.0))
    np.testing.assert_array_equal(ids_after, ids_before)
    # Trained on the inference codes, the decoder reconstructs these images better.
    assert float(eval_step(model, images)["psnr"].mean()) > mse_before + 0.5


def test_random_crops_are_code_aligned_windows_drawn_per_image_from_the_key():
    # Every pixel value unique, so a window's first pixel says where it was cut.
    images = np.arange(200 * 32 * 32 * 3, dtype=np.int32).reshape(200, 32, 32, 3)
    crops = np.asarray(random_crops(jnp.asarray(images), jax.random.key(0), 16, 4))
    assert crops.shape == (200, 16, 16, 3)
    corners = []
    for image, crop in zip(images, crops, strict=True):
        y, x = (int(v) for v in np.argwhere(image[..., 0] == crop[0, 0, 0])[0])
        np.testing.assert_array_equal(crop, image[y : y + 16, x : x + 16])
        corners.append((y, x))
    # Every corner on the 4-pixel code grid that keeps the window inside, on both axes.
    assert {y for y, _ in corners} == {x for _, x in corners} == {0, 4, 8, 12, 16}
    again = random_crops(jnp.asarray(images), jax.random.key(0), 16, 4)
    np.testing.assert_array_equal(np.asarray(again), crops)
    other = random_crops(jnp.asarray(images), jax.random.key(1), 16, 4)
    assert not np.array_equal(np.asarray(other), crops)


def test_training_on_windows_teaches_whole_image_reconstruction():
    config = dataclasses.replace(get_train_config("tiny"), crop_size=16, crop_steps=60)
    model = create_model(get_config("tiny"))
    optimizer = create_optimizer(model, config)
    images = synthetic_images()
    psnr_before = float(eval_step(model, images)["psnr"].mean())
    jitted = nnx.jit(train_step, static_argnames=("config", "crop"))
    history = [
        jitted(model, optimizer, images, s, jax.random.key(0), config=config, crop=True)
        for s in range(60)
    ]
    assert float(history[-1]["loss"]) < 0.5 * float(history[0]["loss"])
    # Evaluated on whole 32 px images, never seen whole in training.
    assert float(eval_step(model, images)["psnr"].mean()) > psnr_before + 3.0


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"crop_size": 14, "crop_steps": 5}, "crop_size 14 must be a multiple of the downsampling"),
        ({"crop_size": 32, "crop_steps": 5}, "below the image size 32"),
    ],
)
def test_a_crop_off_the_code_grid_is_refused(changes, expected):
    config = dataclasses.replace(get_train_config("tiny"), **changes)
    model = create_model(get_config("tiny"))
    optimizer = create_optimizer(model, config)
    with pytest.raises(VQVAEInputError, match=expected):
        train_step(
            model, optimizer, synthetic_images(), 0, jax.random.key(0), config=config, crop=True
        )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"crop_steps": 5}, "crop_steps (5) needs a crop_size"),
        ({"crop_size": -8}, "crop_size must be >= 0"),
        (
            {"crop_size": 16, "crop_steps": 5, "train_decoder_only": True},
            "decoder fine-tuning sees whole images",
        ),
    ],
)
def test_inconsistent_crop_settings_are_refused(changes, expected):
    with pytest.raises(VQVAEInputError, match=re.escape(expected)):
        dataclasses.replace(get_train_config("tiny"), **changes)
