"""Training math for stage 1: optimizer, loss, a pure train step and an eval step.

Two forms of the same step:
- `train_step(model, optimizer, images, step, key, config=...) -> metrics` updates the NNX
  objects in place; wrap it in `nnx.jit(..., static_argnames="config")` for quick scripts/tests.
- `make_train_step(graphdef, config)` -> `step_fn(state, images, step, key) -> (state, metrics)`,
  a `jax.jit` of the same step on the split `(model, optimizer)` state with the state donated:
  compiled once, no NNX graph traversal per call, what a training loop should use.
Randomness comes from `jax.random.fold_in(key, step)` only, so a run is reproducible from
(seed, step) and resuming mid-run replays the same noise.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vqvae import losses
from vqvae.config import VQVAEConfig
from vqvae.errors import VQVAEInputError
from vqvae.metrics import code_histogram, codebook_perplexity, codebook_usage, psnr, psnr_per_image
from vqvae.model import VQVAE, ModelOutput, check_images, to_unit_range
from vqvae.schedules import gumbel_temperature, kl_weight
from vqvae.train_config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, cosine decay to `final_lr_fraction` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def _decay_mask(params):
    # Weight decay on kernels and embeddings only; biases and norm scales stay free.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (or Adam) on the warmup + cosine schedule."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        opt = optax.adamw(
            schedule,
            b1=config.adam_b1,
            b2=config.adam_b2,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    else:
        opt = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)


# The Params a decoder fine-tuning phase trains (`TrainConfig.train_decoder_only`).
DECODER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("decoder"))


def trained_params(config: TrainConfig) -> nnx.filterlib.Filter:
    """The filter of the Params `config` trains: all of them, or the decoder's only."""
    return DECODER_PARAMS if config.train_decoder_only else nnx.Param


def create_optimizer(model: VQVAE, config: TrainConfig) -> nnx.Optimizer:
    """An `nnx.Optimizer` over the Params the config trains (EMA codebooks and counters are
    not Params)."""
    return nnx.Optimizer(model, make_optimizer(config), wrt=trained_params(config))


def compute_loss(output: ModelOutput, images, config: TrainConfig, kl_beta):
    """The weighted loss of one forward pass.

    output: the model's ModelOutput; images: float32 [B, H, W, 3] in [0, 1]; kl_beta: float32 []
    (the Gumbel KL weight at this step). Returns (loss float32 [], terms dict of float32 []).
    """
    mse = losses.mse(output.recon, images)
    l1 = losses.l1(output.recon, images)
    recon_loss = config.mse_weight * mse + config.l1_weight * l1
    terms = {"mse": mse, "l1": l1}
    if config.logit_laplace_weight:
        nll = losses.logit_laplace_nll(
            output.decoder_output[..., :3], output.decoder_output[..., 3:], images
        )
        recon_loss = recon_loss + config.logit_laplace_weight * nll
        terms["logit_laplace_nll"] = nll
    q = output.quantizer
    quantizer_loss = (
        config.commitment_weight * q.commitment
        + config.codebook_weight * q.codebook_loss
        + kl_beta * q.kl
    )
    terms.update(
        recon_loss=recon_loss,
        quantizer_loss=quantizer_loss,
        commitment=q.commitment,
        codebook_loss=q.codebook_loss,
        kl=q.kl,
    )
    return recon_loss + quantizer_loss, terms


def check_crop_size(model_config: VQVAEConfig, config: TrainConfig) -> None:
    """Raises VQVAEInputError unless `config.crop_size` (when set) is a multiple of the
    downsampling factor below the image size: a window that covers whole codes."""
    size, factor = config.crop_size, model_config.downsample_factor
    if size and (size % factor or size >= model_config.image_size):
        raise VQVAEInputError(
            f"crop_size {size} must be a multiple of the downsampling factor {factor} below the "
            f"image size {model_config.image_size} (vqvae config {model_config.name!r})"
        )


def random_crops(images, key, size: int, align: int) -> jax.Array:
    """One random window per image: images [B, S, S, C] -> [B, size, size, C].

    Window corners are multiples of `align` (independently per image and axis), drawn from key.
    """
    batch, side = images.shape[0], images.shape[1]
    corners = align * jax.random.randint(key, (batch, 2), 0, (side - size) // align + 1)

    def crop(image, corner):
        return jax.lax.dynamic_slice(
            image, (corner[0], corner[1], 0), (size, size, image.shape[-1])
        )

    return jax.vmap(crop)(images, corners)


def train_step(
    model: VQVAE,
    optimizer: nnx.Optimizer,
    images,
    step,
    key,
    *,
    config: TrainConfig,
    crop: bool = False,
) -> dict[str, jax.Array]:
    """One update, in place: gradient step on the Params, then the quantizer's own update
    (EMA codebook, unused counters, dead-code restarts). With `config.train_decoder_only`, the
    gradient step moves the decoder only, the quantizer is not updated, and the decoder is fed
    the inference codes (hard argmax for Gumbel), so ids stay exactly what they were.

    images: float [B, H, W, 3] in [0, 1] (or uint8); step: int (the update's index, drives the
    schedules and the noise); key: the run's PRNG key. Returns float32 [] metrics: loss,
    recon_loss, mse, l1, quantizer_loss, commitment, codebook_loss, kl, kl_weight, temperature,
    psnr, codebook_usage and perplexity (of this batch's ids), grad_norm, learning_rate, and for
    VQ restarted_codes and dead_codes unless the decoder alone trains (plus logit_laplace_nll
    when weighted). `psnr` is that of the training forward pass (relaxed codes for Gumbel);
    `eval_step` gives inference PSNR. With `crop` (the first phase of `config.crop_steps`), the
    step trains on one random `config.crop_size` window per image, and its metrics are the
    windows'.
    """
    check_images(model.config, images)
    if crop:
        check_crop_size(model.config, config)
    if config.logit_laplace_weight and not model.config.logit_laplace:
        raise VQVAEInputError(
            "logit_laplace_weight > 0 needs a model config with logit_laplace=True"
        )
    images = to_unit_range(images)
    step = jnp.asarray(step, jnp.int32)
    step_key = jax.random.fold_in(key, step)
    noise_key, restart_key = jax.random.split(step_key)
    if crop:
        crop_key = jax.random.fold_in(step_key, 1)
        images = random_crops(images, crop_key, config.crop_size, model.config.downsample_factor)
    temperature = gumbel_temperature(step, config)
    beta = kl_weight(step, config)
    gumbel = model.config.quantizer == "gumbel"
    decoder_only = config.train_decoder_only

    def loss_fn(model: VQVAE):
        output = model(
            images,
            key=noise_key if gumbel and not decoder_only else None,
            temperature=temperature,
            hard=config.gumbel_straight_through,
        )
        loss, terms = compute_loss(output, images, config, beta)
        return loss, (output, terms)

    # Differentiating w.r.t. the trained Params only also prunes the encoder's backward pass.
    wrt = nnx.DiffState(0, trained_params(config))
    (loss, (output, terms)), grads = nnx.value_and_grad(loss_fn, argnums=wrt, has_aux=True)(model)
    optimizer.update(model, grads)
    quantizer_metrics = {}
    if not decoder_only:
        quantizer_metrics = model.quantizer.update(output.quantizer, restart_key)

    histogram = code_histogram(output.quantizer.ids, model.config.codebook_size)
    metrics = {
        "loss": loss,
        **terms,
        "kl_weight": beta,
        "temperature": temperature,
        "psnr": psnr(jnp.clip(output.recon, 0.0, 1.0), images),
        "codebook_usage": codebook_usage(histogram),
        "perplexity": codebook_perplexity(histogram),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate_schedule(config)(step),
        **quantizer_metrics,
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def make_train_step(
    graphdef: nnx.GraphDef, config: TrainConfig, *, donate: bool = True, crop: bool = False
) -> Callable:
    """A jitted pure step: `step_fn(state, images, step, key) -> (state, metrics)`.

    `crop` compiles the step of the random-window phase (`train_step`'s `crop`).

    `graphdef, state = nnx.split((model, optimizer))` gives the arguments; afterwards
    `model, optimizer = nnx.merge(graphdef, state)`. With `donate`, the input state's buffers
    are reused for the output, so don't touch the old `state` after a call.
    """

    def step_fn(state, images, step, key):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(model, optimizer, images, step, key, config=config, crop=crop)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step_fn, donate_argnums=(0,) if donate else ())


def eval_step(model: VQVAE, images) -> dict[str, jax.Array]:
    """Inference-path reconstruction of a batch, for split-level metrics.

    images: uint8 or float [B, H, W, 3]. Returns ids int32 [B, h, w], recon float32
    [B, H, W, 3] (decode(encode(images))), psnr float32 [B] per image and histogram int32 [K];
    sum histograms over batches and average per-image PSNRs for the split.
    """
    check_images(model.config, images)
    images = to_unit_range(images)
    ids = model.encode_ids(images)
    recon = model.decode_ids(ids)
    return {
        "ids": ids,
        "recon": recon,
        "psnr": psnr_per_image(recon, images),
        "histogram": code_histogram(ids, model.config.codebook_size),
    }
