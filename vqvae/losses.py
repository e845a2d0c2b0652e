"""Reconstruction losses on images in [0, 1], and the logit-Laplace pixel mapping of DALL-E.

All losses are means over batch, pixels and channels (float32 []), so weights do not depend on
the image size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# DALL-E squeezes pixels into (eps, 1 - eps) so their logit stays finite.
LOGIT_LAPLACE_EPS = 0.1


def mse(recon, images):
    """Mean squared error: recon, images float [B, H, W, 3] -> float32 []."""
    return jnp.mean(jnp.square(recon.astype(jnp.float32) - images.astype(jnp.float32)))


def l1(recon, images):
    """Mean absolute error: recon, images float [B, H, W, 3] -> float32 []."""
    return jnp.mean(jnp.abs(recon.astype(jnp.float32) - images.astype(jnp.float32)))


def map_pixels(images, eps: float = LOGIT_LAPLACE_EPS):
    """[0, 1] -> [eps, 1 - eps], the support the logit-Laplace density is evaluated on."""
    return (1.0 - 2.0 * eps) * images + eps


def unmap_pixels(mapped, eps: float = LOGIT_LAPLACE_EPS):
    """The inverse of `map_pixels`, clipped to [0, 1]."""
    return jnp.clip((mapped - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def logit_laplace_nll(mu, log_scale, images, eps: float = LOGIT_LAPLACE_EPS):
    """Negative log-likelihood of `images` under DALL-E's logit-Laplace, per value, averaged.

    mu, log_scale: float [B, H, W, 3] (location and log scale in logit space);
    images: float [B, H, W, 3] in [0, 1]. Returns float32 [] (nats per value).
    -log p(x) = log(2 b x (1 - x)) + |logit(x) - mu| / b, x = map_pixels(images).
    """
    x = map_pixels(images.astype(jnp.float32), eps)
    mu = mu.astype(jnp.float32)
    log_scale = log_scale.astype(jnp.float32)
    logit_x = jnp.log(x) - jnp.log1p(-x)
    nll = (
        jnp.log(2.0)
        + log_scale
        + jnp.log(x)
        + jnp.log1p(-x)
        + jnp.abs(logit_x - mu) * jnp.exp(-log_scale)
    )
    return jnp.mean(nll)


def logit_laplace_mean_image(mu):
    """The image a logit-Laplace decoder shows: float [B, H, W, 3] logits -> [0, 1]."""
    return unmap_pixels(jax.nn.sigmoid(mu.astype(jnp.float32)))
