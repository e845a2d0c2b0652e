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


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: np.ndarray, implementation: str = "cudnn"
) -> jax.Array:
    """`dot_product_attention` through `jax.nn.dot_product_attention`'s fused kernel.

    Same shapes and result. A plain causal `mask` (every "full" layer) is passed as
    `is_causal`, which the kernel applies without reading a mask; any other mask goes in as a
    [1, 1, S, S] table. `implementation="xla"` runs the same call on any device (tests).
    """
    mask = np.asarray(mask)
    causal = mask.shape[0] == mask.shape[1] and np.array_equal(mask, np.tril(np.ones_like(mask)))
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if causal else jnp.asarray(mask)[None, None],
        is_causal=causal,
        implementation=implementation,
    )


def cached_attention(
    q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array | np.ndarray
) -> jax.Array:
    """Softmax attention of new queries over a KV cache, one row per (example, head) pair.

    q: [N, Lq, Dh] (compute dtype), keys and values: [N, C, Dh] (cache dtype), N = B * H rows in
    the cache's order; mask: bool [Lq, C]. Scores and softmax statistics are float32, as in
    `dot_product_attention`. Returns [N, Lq, Dh] in q's dtype.

    The cache is read as it lies: one batch dimension that is never 1 in practice, so XLA
    neither transposes nor reshapes it (a reshape between the in-place cache update and this
    read makes XLA copy the cache every step).
    """
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    scores = jnp.einsum("nqd,nkd->nqk", q * scale, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, MASK_VALUE)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - row_max)
    inv_sum = 1.0 / jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("nqk,nkd->nqd", weights.astype(values.dtype), values)
    return out * inv_sum.astype(values.dtype)


class SelfAttention(nnx.Module):
    """Fused QKV projection, softmax attention under a given mask, output projection.

    Parameters: qkv kernel [D, 3, H, Dh] (embed, -, heads, kv), qkv bias [3, H, Dh],
    out kernel [H, Dh, D] (heads, kv, embed), out bias [D].
    """

    def __init__(self, config: DalleConfig, *, rngs: nnx.Rngs):
        d, h, dh = config.d_model, config.num_heads, config.head_dim
        dtype = jnp.dtype(config.dtype)
        self.implementation = config.attention_impl
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
        if self.implementation == "cudnn":
            return self.out(fused_attention(q, k, v, mask))
        return self.out(dot_product_attention(q, k, v, mask))

    def attend_cached(
        self,
        x: jax.Array,
        start: jax.Array | int,
        cache: tuple[jax.Array, jax.Array],
        mask: np.ndarray,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention for L new positions `start .. start+L-1`, reading and filling a KV cache.

        x: [B, L, D]; cache: this layer's (keys, values), each [B*H, C, Dh] (row b*H + h holds
        example b, head h) with room for the new positions (start + L <= C <= S); mask: bool
        [S, S], the layer's full table (rows start..start+L-1, columns 0..C-1 are used; they
        are causal, so unwritten cache slots are never attended to).
        Returns (y [B, L, D], cache with the new positions written in place).
        """
        batch, steps = x.shape[0], x.shape[1]
        length = cache[0].shape[1]
        if isinstance(start, int) and start + steps > length:
            raise ValueError(
                f"positions {start}..{start + steps - 1} do not fit a cache of {length}"
            )
        qkv = self.qkv(x)  # [B, L, 3, H, Dh]

        def cache_rows(t: jax.Array) -> jax.Array:
            # [B, L, H, Dh] -> [B*H, L, Dh]: only the L new positions move, never the cache.
            return jnp.transpose(t, (0, 2, 1, 3)).reshape(-1, steps, t.shape[-1])

        q, k, v = (cache_rows(qkv[:, :, i]) for i in range(3))
        zero = jnp.zeros((), jnp.int32)
        index = (zero, jnp.asarray(start, jnp.int32), zero)
        keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), index)
        values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), index)
        rows = jax.lax.dynamic_slice_in_dim(jnp.asarray(mask[:, :length]), start, steps, 0)
        y = cached_attention(q, keys, values, rows)  # [B*H, L, Dh]
        y = jnp.transpose(y.reshape(batch, -1, steps, y.shape[-1]), (0, 2, 1, 3))
        return self.out(y), (keys, values)
