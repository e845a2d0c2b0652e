"""Attention masks over the DALL-E sequence, as static boolean tables.

Sequence layout (S = T + N, N = h * w image ids in row-major order; see `transformer.py`):

    position   0         1 .. T-1         T            T+1 .. S-1
    input      start     text 0..T-2      text T-1     image 0..N-2
    predicts   text 0    text 1..T-1      image 0      image 1..N-1

so the query at position q >= T predicts image id j = q - T, and the key at position k >= T+1 holds
image id m = k - T - 1. Every mask is causal (k <= q), so text never sees an image position.
Text keys (k <= T) are always visible. Image-to-image attention is restricted by the layer's kind,
stated on the image grid between the id a query predicts, j = (r, c), and the id a key holds,
m = (r', c') with m < j:

    full     every earlier image id
    row      r' == r              (the earlier ids of the same row)
    column   c' == c              (the ids above, in the same column)
    conv     |r' - r| <= K // 2 and |c' - c| <= K // 2   (the causal part of a K x K window)

A query always sees its own position (it holds image id j - 1), as in DALL-E's masks, so no row of
the table is empty. The tables are numpy constants built once per trace: they are never
recomputed per step.
"""

from __future__ import annotations

import functools

import numpy as np

from dalle_jax.model.config import ATTENTION_TYPES, DalleConfig


@functools.lru_cache(maxsize=32)
def attention_mask(
    kind: str, text_length: int, image_rows: int, image_cols: int, conv_kernel: int = 11
) -> np.ndarray:
    """The mask of one attention kind: bool [S, S], True where query row q may attend to key k."""
    if kind not in ATTENTION_TYPES:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_TYPES}")
    t = text_length
    s = t + image_rows * image_cols
    q = np.arange(s)[:, None]
    k = np.arange(s)[None, :]
    causal = k <= q
    if kind == "full":
        causal.setflags(write=False)
        return causal
    # Grid coordinates: of the id a query predicts (q - T), of the id a key holds (k - T - 1).
    j = q - t
    m = k - t - 1
    rq, cq = np.divmod(j, image_cols)
    rk, ck = np.divmod(m, image_cols)
    if kind == "row":
        pattern = rk == rq
    elif kind == "column":
        pattern = ck == cq
    else:
        half = conv_kernel // 2
        pattern = (np.abs(rk - rq) <= half) & (np.abs(ck - cq) <= half)
    image_to_image = (q > t) & (k > t)
    allowed = np.where(image_to_image, pattern | (k == q), True) & causal
    allowed.setflags(write=False)
    return allowed


def layer_mask(config: DalleConfig, layer: int) -> np.ndarray:
    """The mask of layer `layer` of `config`: bool [S, S]."""
    return attention_mask(
        config.layer_attention(layer),
        config.text_length,
        config.image_rows,
        config.image_cols,
        config.conv_kernel,
    )
