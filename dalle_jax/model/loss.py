"""The training objective: caption dropout, then text and image cross-entropy, weighted.

`loss_fn(model, batch, key) -> (loss, metrics)` is pure, so a train step can wrap it in
`nnx.value_and_grad(..., has_aux=True)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dalle_jax.model.transformer import DalleTransformer


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats.

    logits: float32 [..., V]; targets: int32 [...]. Returns float32 [...].
    """
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit[..., 0]


def drop_captions(
    text_ids: jax.Array, key: jax.Array, rate: float, pad_id: int
) -> tuple[jax.Array, jax.Array]:
    """Replaces each caption by the empty caption (all `pad_id`) with probability `rate`.

    Trains the unconditional model that classifier-free guidance needs at sampling time.
    text_ids: int32 [B, T]. Returns (int32 [B, T], dropped: bool [B]).
    """
    dropped = jax.random.bernoulli(key, rate, (text_ids.shape[0],))
    return jnp.where(dropped[:, None], jnp.asarray(pad_id, text_ids.dtype), text_ids), dropped


def combine_losses(
    text_loss: jax.Array, image_loss: jax.Array, text_weight: float, image_weight: float
) -> jax.Array:
    """DALL-E's objective: `text_weight * text_loss + image_weight * image_loss` (1/8 and 7/8)."""
    return text_weight * text_loss + image_weight * image_loss


def loss_fn(
    model: DalleTransformer,
    batch: Mapping[str, jax.Array],
    key: jax.Array | None,
    *,
    train: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted cross-entropy of one batch.

    batch: {"text_ids": int32 [B, T], "image_ids": int32 [B, N]}.
    key: randomness for caption dropout and dropout (used only when `train`).
    The text loss covers all T text positions, pads included (each pad position has its own
    embedding and is cheap to predict, as in DALL-E); both losses are means in nats per token.
    Returns (loss float32 scalar, metrics {loss, text_loss, image_loss, captions_dropped}).
    """
    config = model.config
    text_ids = batch["text_ids"].astype(jnp.int32)
    image_ids = batch["image_ids"].astype(jnp.int32)
    dropout_key = None
    dropped = jnp.zeros((text_ids.shape[0],), bool)
    if train and key is not None:
        caption_key, dropout_key = jax.random.split(key)
        if config.caption_dropout > 0:
            text_ids, dropped = drop_captions(
                text_ids, caption_key, config.caption_dropout, config.text_pad_id
            )
        if config.dropout_rate == 0:
            dropout_key = None
    text_logits, image_logits = model(text_ids, image_ids, dropout_key=dropout_key)
    text_loss = jnp.mean(cross_entropy(text_logits, text_ids))
    image_loss = jnp.mean(cross_entropy(image_logits, image_ids))
    loss = combine_losses(text_loss, image_loss, config.text_loss_weight, config.image_loss_weight)
    metrics = {
        "loss": loss,
        "text_loss": text_loss,
        "image_loss": image_loss,
        "captions_dropped": jnp.mean(dropped.astype(jnp.float32)),
    }
    return loss, metrics
