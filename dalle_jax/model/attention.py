"""Multi-head self-attention with a fused QKV projection and a KV-cache path.

Written here rather than taken from `nnx.MultiHeadAttention`: that module cannot annotate its
biases (one `bias_init` for biases of different ranks), and decoding needs a cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.model.config import DalleConfig
from dalle_jax.model.layers import Dense

# Large and finite: a fully masked row would give NaN with -inf, and bfloat16 holds this value.
MASK_VALUE = -1e30


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | np.ndarray
) -> jax.Array:
    """Softmax attention of queries over keys.

    q: [B, Lq, H, Dh], k and v: [B, Lk, H, Dh] (compute dtype); mask: bool [Lq, Lk] (True = may
    attend). Scores and softmax statistics are float32. Returns [B, Lq, H, Dh] in q's dtype.

    Heads move next to batch once, so both products are plain batched matmuls. The softmax is
    normalised after the value product (on [.., Lq, Dh] rather than [.., Lq, Lk]), and the row
    maximum is a constant for autodiff (softmax does not depend on it), which saves passes over
    the score tensor in both directions.
    """
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    q = jnp.transpose(q * scale, (0, 2, 1, 3))  # [B, H, Lq, Dh]
    k = jnp.transpose(k, (0, 2, 1, 3))
    v = jnp.transpose(v, (0, 2, 1, 3))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, MASK_VALUE)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - row_max)
    inv_sum = 1.0 / jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v) * inv_sum.astype(v.dtype)
    return jnp.transpose(out, (0, 2, 1, 3))


class SelfAttention(nnx.Module):
    """Fused QKV projection, softmax attention under a given mask, output projection.

    Parameters: qkv kernel [D, 3, H, Dh] (embed, -, heads, kv), qkv bias [3, H, Dh],
    out kernel [H, Dh, D] (heads, kv, embed), out bias [D].
    """

    def __init__(self, config: DalleConfig, *, rngs: nnx.Rngs):
        d, h, dh = config.d_model, config.num_heads, config.head_dim
        dtype = jnp.dtype(config.dtype)
        self.qkv = Dense(
            (d,),
            (3, h, dh),
            ("embed",),
            (None, "heads", "kv"),
            rngs=rngs,
            std=config.init_std,
            dtype=dtype,
            use_bias=config.use_bias,
        )
        # GPT-2: residual projections scaled down by sqrt(2 * layers) so depth keeps the
        # residual stream's variance in check.
        self.out = Dense(
            (h, dh),
            (d,),
            ("heads", "kv"),
            ("embed",),
            rngs=rngs,
            std=config.init_std / np.sqrt(2 * config.num_layers),
            dtype=dtype,
            use_bias=config.use_bias,
        )

    def __call__(self, x: jax.Array, mask: np.ndarray) -> jax.Array:
        """x: [B, S, D] (compute dtype); mask: bool [S, S]. Returns [B, S, D]."""
        qkv = self.qkv(x)  # [B, S, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return self.out(dot_product_attention(q, k, v, mask))

    def attend_cached(
        self,
        x: jax.Array,
        start: jax.Array | int,
        cache: tuple[jax.Array, jax.Array],
        layer: int,
        mask: np.ndarray,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention for L new positions `start .. start+L-1`, reading and filling a KV cache.

        x: [B, L, D]; cache: (keys, values), each [layers, B, S, H, Dh], of which this layer's
        slice `layer` is used; mask: bool [S, S], the layer's full table (rows start..start+L-1
        are used; they are causal, so unwritten cache slots are never attended to).
        Returns (y [B, L, D], cache with the new positions written in place).
        """
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        zero = jnp.zeros((), jnp.int32)
        start = jnp.asarray(start, jnp.int32)
        index = (jnp.asarray(layer, jnp.int32), zero, start, zero, zero)
        # Updating the stacked buffer directly (not a per-layer copy) lets XLA write in place.
        keys = jax.lax.dynamic_update_slice(cache[0], k[None].astype(cache[0].dtype), index)
        values = jax.lax.dynamic_update_slice(cache[1], v[None].astype(cache[1].dtype), index)
        rows = jax.lax.dynamic_slice_in_dim(jnp.asarray(mask), start, x.shape[1], axis=0)
        y = dot_product_attention(
            q, keys[layer].astype(q.dtype), values[layer].astype(q.dtype), rows
        )
        return self.out(y), (keys, values)
