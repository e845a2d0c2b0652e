"""The stage-2 DALL-E transformer: text ids and image ids in, text and image logits out.

Sequence layout (S = T + N positions; T text ids, N = h * w image ids in row-major order):

    position   0         1 .. T-1         T            T+1 .. S-1
    input      start     text 0..T-2      text T-1     image 0..N-2
    predicts   text 0    text 1..T-1      image 0      image 1..N-1

Inputs are the targets shifted right by one behind a learned start token, as in any
autoregressive model. The start of the image is explicit in the layout: position T (holding the
last text id, usually a pad) is where image id 0 is predicted, so image id j is always predicted
from the whole caption and image ids < j. The text head reads positions 0..T-1, the image head
positions T..S-1. Sampling: `prefill` runs positions 0..T and returns the logits of image id 0;
each `decode_step` feeds image id j at position T+1+j and returns the logits of id j+1.

Embeddings: text ids share a table with one learned pad embedding per text position (a pad at
text position i is looked up as row `text_vocab_size + i`) and the start token; learned text
position embeddings (T+1); image ids have their own table plus learned row and column
embeddings. Text and image have separate output heads.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.model.attention import SelfAttention
from dalle_jax.model.config import DalleConfig
from dalle_jax.model.layers import Dense, Norm, dropout, gradient_barrier, param
from dalle_jax.model.masks import layer_mask
from dalle_jax.sharding import with_logical_constraint

ACTIVATION_AXES = ("batch", "length", "embed")
# Logical axes of `KVCache.keys` / `.values`: [layers, batch, length, heads, head_dim].
KV_CACHE_AXES = (None, "batch", "length", "heads", "kv")


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for all S positions: [L, B, S, H, Dh] in the compute dtype.

    Positions not written yet hold zeros; masks are causal, so they are never attended to.
    """

    keys: jax.Array
    values: jax.Array


class MLP(nnx.Module):
    def __init__(self, config: DalleConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        d, f = config.d_model, config.mlp_dim
        self.up = Dense(
            (d,),
            (f,),
            ("embed",),
            ("mlp",),
            rngs=rngs,
            std=config.init_std,
            dtype=dtype,
            use_bias=config.use_bias,
        )
        self.down = Dense(
            (f,),
            (d,),
            ("mlp",),
            ("embed",),
            rngs=rngs,
            std=config.init_std / np.sqrt(2 * config.num_layers),
            dtype=dtype,
            use_bias=config.use_bias,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DalleConfig, layer: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.config = config
        self.layer = layer
        self.attn_norm = Norm(config.d_model, config.norm, rngs=rngs, dtype=dtype)
        self.attn = SelfAttention(config, rngs=rngs)
        self.mlp_norm = Norm(config.d_model, config.norm, rngs=rngs, dtype=dtype)
        self.mlp = MLP(config, rngs=rngs)

    def mask(self) -> np.ndarray:
        return layer_mask(self.config, self.layer)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [B, S, D] compute dtype -> [B, S, D]."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        rate = self.config.dropout_rate
        x = gradient_barrier(x)
        x = x + dropout(self.attn(self.attn_norm(x), self.mask()), rate, keys[0])
        x = x + dropout(self.mlp(self.mlp_norm(x)), rate, keys[1])
        return with_logical_constraint(x, ACTIVATION_AXES)

    def decode(self, x: jax.Array, start, cache: tuple[jax.Array, jax.Array]):
        """x: [B, L, D] for positions start..start+L-1; cache: the stacked (keys, values)."""
        y, cache = self.attn.attend_cached(self.attn_norm(x), start, cache, self.layer, self.mask())
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


def _run_block(block: Block, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    return block(x, dropout_key)


class DalleTransformer(nnx.Module):
    """Decoder-only transformer over `[text ids (T); image ids (N)]`; see the module docstring."""

    def __init__(self, config: DalleConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        d = c.d_model
        std = c.init_std
        self.dtype = jnp.dtype(c.dtype)
        normal = nnx.initializers.normal(std)
        self.text_embed = param(rngs, normal, (c.text_table_rows, d), ("vocab", "embed"))
        self.text_pos = param(rngs, normal, (c.text_length + 1, d), ("length", "embed"))
        self.image_embed = param(rngs, normal, (c.image_vocab_size, d), ("vocab", "embed"))
        self.image_row = param(rngs, normal, (c.image_rows, d), ("length", "embed"))
        self.image_col = param(rngs, normal, (c.image_cols, d), ("length", "embed"))
        self.blocks = nnx.List([Block(c, i, rngs=rngs) for i in range(c.num_layers)])
        self.final_norm = Norm(d, c.norm, rngs=rngs, dtype=self.dtype)
        self.text_head = Dense(
            (d,), (c.text_vocab_size,), ("embed",), ("vocab",), rngs=rngs, std=std, dtype=self.dtype
        )
        self.image_head = Dense(
            (d,),
            (c.image_vocab_size,),
            ("embed",),
            ("vocab",),
            rngs=rngs,
            std=std,
            dtype=self.dtype,
        )

    # ---- embeddings ----------------------------------------------------------------------------
    def embed_text(self, text_ids: jax.Array) -> jax.Array:
        """text_ids: int32 [B, T] -> float32 [B, T+1, D] for positions 0..T (start + text)."""
        c = self.config
        position = jnp.arange(c.text_length, dtype=jnp.int32)
        # A pad at text position i has its own embedding: row text_vocab_size + i.
        rows = jnp.where(text_ids == c.text_pad_id, c.text_vocab_size + position, text_ids)
        start = jnp.full((text_ids.shape[0], 1), c.text_start_id, jnp.int32)
        rows = jnp.concatenate([start, rows.astype(jnp.int32)], axis=1)
        return jnp.take(self.text_embed[...], rows, axis=0) + self.text_pos[...]

    def embed_image(self, image_ids: jax.Array, first_index: jax.Array | int = 0) -> jax.Array:
        """image_ids: int32 [B, L], grid ids first_index..first_index+L-1 -> float32 [B, L, D]."""
        index = first_index + jnp.arange(image_ids.shape[1], dtype=jnp.int32)
        row, col = jnp.divmod(index, self.config.image_cols)
        pos = jnp.take(self.image_row[...], row, axis=0) + jnp.take(
            self.image_col[...], col, axis=0
        )
        return jnp.take(self.image_embed[...], image_ids, axis=0) + pos

    def logits(self, h: jax.Array, head: str) -> jax.Array:
        """h: [B, L, D] block output -> float32 logits [B, L, V] of the "text" or "image" head."""
        dense = self.text_head if head == "text" else self.image_head
        return dense(self.final_norm(h), out_dtype=jnp.float32)

    # ---- training forward ----------------------------------------------------------------------
    def __call__(
        self, text_ids: jax.Array, image_ids: jax.Array, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced forward pass.

        text_ids: int32 [B, T] (pads = text_pad_id); image_ids: int32 [B, N];
        dropout_key: enables dropout (config.dropout_rate) when given.
        Returns (text_logits float32 [B, T, text_vocab], image_logits float32 [B, N, image_vocab]):
        text_logits[:, i] predicts text_ids[:, i], image_logits[:, j] predicts image_ids[:, j].
        """
        c = self.config
        x = jnp.concatenate(
            [self.embed_text(text_ids), self.embed_image(image_ids[:, :-1])], axis=1
        ).astype(self.dtype)
        keys = [None] * (c.num_layers + 1)
        if dropout_key is not None:
            keys = list(jax.random.split(dropout_key, c.num_layers + 1))
        x = dropout(x, c.dropout_rate, keys[-1])
        x = with_logical_constraint(x, ACTIVATION_AXES)
        # Remat recomputes each block's activations in the backward pass instead of storing them.
        run_block = nnx.remat(_run_block) if c.remat else _run_block
        for block, key in zip(self.blocks, keys[:-1], strict=True):
            x = run_block(block, x, key)
        t = c.text_length
        return self.logits(x[:, :t], "text"), self.logits(x[:, t:], "image")

    # ---- cached decoding -----------------------------------------------------------------------
    def init_cache(self, batch_size: int) -> KVCache:
        """An empty cache for `batch_size` sequences: keys/values zeros [L, B, S, H, Dh]."""
        c = self.config
        shape = (c.num_layers, batch_size, c.seq_length, c.num_heads, c.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def _run_cached(self, x: jax.Array, start, cache: KVCache) -> tuple[jax.Array, KVCache]:
        kv = (cache.keys, cache.values)
        for block in self.blocks:
            x, kv = block.decode(x, start, kv)
        keys, values = kv
        keys = with_logical_constraint(keys, KV_CACHE_AXES)
        values = with_logical_constraint(values, KV_CACHE_AXES)
        return x, KVCache(keys, values)

    def prefill(self, text_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Runs the caption through the model (positions 0..T), filling the cache.

        text_ids: int32 [B, T]. Returns (float32 [B, image_vocab] logits of image id 0, cache).
        """
        x = self.embed_text(text_ids).astype(self.dtype)
        x, cache = self._run_cached(x, 0, cache)
        return self.logits(x[:, -1:], "image")[:, 0], cache

    def decode_step(
        self, image_id: jax.Array, index: jax.Array | int, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Feeds image id number `index` (0 <= index < N-1) and returns the logits of id index+1.

        image_id: int32 [B]; index: int32 scalar (may be traced, e.g. a `fori_loop` counter).
        Returns (float32 [B, image_vocab], cache with position T+1+index written).
        """
        x = self.embed_image(image_id[:, None], index).astype(self.dtype)
        start = self.config.text_length + 1 + jnp.asarray(index, jnp.int32)
        x, cache = self._run_cached(x, start, cache)
        return self.logits(x, "image")[:, 0], cache
