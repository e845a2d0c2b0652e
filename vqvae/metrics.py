"""Evaluation metrics: PSNR and codebook usage / perplexity from id histograms.

Usage over a whole split: sum `code_histogram(ids, K)` over batches, then call
`codebook_usage(hist)` and `codebook_perplexity(hist)` once on the total.
"""

from __future__ import annotations

import jax.numpy as jnp

# An exact reconstruction would have infinite PSNR; this floor on the MSE caps it at 100 dB.
_MIN_MSE = 1e-10


def psnr_per_image(a, b, *, max_value: float = 1.0):
    """PSNR in dB of each image pair: a, b float [B, H, W, C] (range [0, max_value]) -> [B]."""
    err = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
    mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    return 10.0 * jnp.log10(max_value**2 / jnp.maximum(mse, _MIN_MSE))


def psnr(a, b, *, max_value: float = 1.0):
    """Mean over the batch of per-image PSNR in dB: a, b float [B, H, W, C] -> float32 []."""
    return jnp.mean(psnr_per_image(a, b, max_value=max_value))


def code_histogram(ids, codebook_size: int):
    """How often each code occurs: ids int [...] in [0, K) -> int32 [K]. Jittable."""
    return jnp.bincount(ids.reshape(-1).astype(jnp.int32), length=codebook_size).astype(jnp.int32)


def codebook_usage(histogram):
    """Fraction of codes used at least once: histogram int/float [K] -> float32 []."""
    return jnp.mean((jnp.asarray(histogram) > 0).astype(jnp.float32))


def codebook_perplexity(histogram):
    """exp(entropy) of the code distribution: histogram [K] -> float32 [] in [1, K].

    K when every code is equally frequent, 1 when one code takes everything.
    """
    counts = jnp.asarray(histogram, jnp.float32)
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)
