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
# Logical axes of each layer's buffer in `KVCache.keys` / `.values`: [batch * heads, length, kv].
# The rows are example-major, so sharding them like the batch gives each device whole examples
# (all their heads); the heads are not sharded separately in the cache.
KV_CACHE_AXES = ("batch", "length", "kv")


@flax.struct.dataclass
class KVCache:
    """Keys and values of positions 0..C-1, one buffer per layer: `keys[l]`, `values[l]` are
    [B*H, C, Dh] in the compute dtype, row b*H + h for example b, head h. C (`length`, static)
    is at most S.

    The layout is what attention reads (`cached_attention`): (example, head) rows, then
    positions, so no step transposes or reshapes the cache; one buffer per layer, so reading a
    layer is no slice copy of a stacked array; and every step writes its new position into the
    buffers in place (`dynamic_update_slice`). Merging batch and heads into one dimension keeps
    a batch of one from becoming a size-1 dimension, which XLA squeezes out of the attention
    matmuls with a reshape that made it copy the cache every step.
    Attention reads all C positions, so a cache only as long as the positions decoded so far
    (`grown_to` between stretches of steps) saves reading the part not written yet.
    Positions not written yet hold zeros; masks are causal, so they are never attended to.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @property
    def length(self) -> int:
        """C: the positions the cache has room for."""
        return self.keys[0].shape[1]

    def grown_to(self, length: int) -> KVCache:
        """The same cache with room for `length` >= C positions (zeros appended; a copy)."""
        if length < self.length:
            raise ValueError(f"cannot shrink a KV cache of {self.length} positions to {length}")
        pad = ((0, 0), (0, length - self.length), (0, 0))
        return KVCache(
            tuple(jnp.pad(k, pad) for k in self.keys),
            tuple(jnp.pad(v, pad) for v in self.values),
        )


ACTIVATION_FNS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu}


class MLP(nnx.Module):
    """down(activation(up(x))): [.., D] -> [.., F] -> [.., D]."""

    def __init__(self, config: DalleConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.activation = config.activation
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
        return self.down(ACTIVATION_FNS[self.activation](self.up(x)))


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
        """x: [B, L, D] for positions start..start+L-1; cache: this layer's (keys, values),
        each [B*H, C, Dh]. Returns (x [B, L, D], the cache with the L positions written)."""
        y, cache = self.attn.attend_cached(self.attn_norm(x), start, cache, self.mask())
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
    def init_cache(self, batch_size: int, length: int | None = None) -> KVCache:
        """An empty cache for `batch_size` sequences: per layer, keys/values zeros
        [B*H, length, Dh]. length: positions it has room for, T+1 (the caption) to S (default).
        """
        c = self.config
        length = c.seq_length if length is None else length
        if not c.text_length + 1 <= length <= c.seq_length:
            raise ValueError(
                f"cache length {length} is outside [T+1, S] = [{c.text_length + 1}, {c.seq_length}]"
            )
        shape = (batch_size * c.num_heads, length, c.head_dim)
        layers = range(c.num_layers)
        return KVCache(
            tuple(jnp.zeros(shape, self.dtype) for _ in layers),
            tuple(jnp.zeros(shape, self.dtype) for _ in layers),
        )

    def _run_cached(self, x: jax.Array, start, cache: KVCache) -> tuple[jax.Array, KVCache]:
        keys, values = [], []
        for block, k, v in zip(self.blocks, cache.keys, cache.values, strict=True):
            x, (k, v) = block.decode(x, start, (k, v))
            keys.append(with_logical_constraint(k, KV_CACHE_AXES))
            values.append(with_logical_constraint(v, KV_CACHE_AXES))
        return x, KVCache(tuple(keys), tuple(values))

    def prefill(self, text_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Runs the caption through the model (positions 0..T), filling the cache.

        text_ids: int32 [B, T]. Returns (float32 [B, image_vocab] logits of image id 0, cache).
        """
        x = self.embed_text(text_ids).astype(self.dtype)
        x, cache = self._run_cached(x, 0, cache)
        return self.logits(x[:, -1:], "image")[:, 0], cache

    def cache_length(self, last_index: int) -> int:
        """The cache length decode steps up to image id number `last_index` need: T+2+last_index."""
        return self.config.text_length + 2 + last_index

    def decode_step(
        self, image_id: jax.Array, index: jax.Array | int, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Feeds image id number `index` (0 <= index < N-1) and returns the logits of id index+1.

        image_id: int32 [B]; index: int32 scalar (may be traced, e.g. a `fori_loop` counter).
        The cache must have room for position T+1+index (`cache.length >=
        cache_length(index)`): a traced index cannot be checked, and a write past the end would
        land on the last slot (`dynamic_update_slice` clamps).
        Returns (float32 [B, image_vocab], cache with position T+1+index written).
        """
        if isinstance(index, int) and cache.length < self.cache_length(index):
            raise ValueError(
                f"image id {index} needs a cache of {self.cache_length(index)} positions, "
                f"this one has {cache.length}"
            )
        x = self.embed_image(image_id[:, None], index).astype(self.dtype)
        start = self.config.text_length + 1 + jnp.asarray(index, jnp.int32)
        x, cache = self._run_cached(x, start, cache)
        return self.logits(x, "image")[:, 0], cache
