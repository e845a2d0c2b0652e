"""Gumbel-softmax schedules as pure functions of the train step (jittable, `step` may be traced).

DALL-E anneals the relaxation temperature from 1 to 1/16 and raises the KL weight from 0 to its
maximum, both with cosine curves; after their horizon both stay at their final value.
"""

from __future__ import annotations

import jax.numpy as jnp

from vqvae.train_config import TrainConfig


def _cosine_progress(step, horizon: int):
    """0 at step 0, rising along half a cosine to 1 at `horizon` and after: float32 []."""
    if horizon <= 0:
        return jnp.ones((), jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / horizon, 0.0, 1.0)
    return 0.5 * (1.0 - jnp.cos(jnp.pi * t))


def gumbel_temperature(step, config: TrainConfig):
    """Relaxation temperature tau at `step`: float32 [], start -> end over the anneal steps."""
    p = _cosine_progress(step, config.temperature_anneal_steps)
    return config.temperature_start + (config.temperature_end - config.temperature_start) * p


def kl_weight(step, config: TrainConfig):
    """Weight beta of the KL-to-uniform term at `step`: float32 [], 0 -> max over warmup steps."""
    return config.kl_weight_max * _cosine_progress(step, config.kl_warmup_steps)
