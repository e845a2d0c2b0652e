"""The vqvae's inference passes as compiled functions, for every caller outside its training loop.

Each takes a module's graph definition (`nnx.split(model)[0]`, hashable) and returns a jitted
`fn(state, x)`: the state stays an argument, so one compiled program serves every model of that
architecture, and the cache keeps one program per architecture for the process (sampling,
training grids, evaluation and the reranker's reconstructions all share them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from vqvae.model import decode, encode, to_uint8
from vqvae.train_step import eval_step


@functools.lru_cache(maxsize=8)
def compiled_encode(graphdef: nnx.GraphDef) -> Callable:
    """`fn(state, images uint8 [B, H, W, 3]) -> ids int32 [B, h, w]`."""
    return jax.jit(lambda state, images: encode(nnx.merge(graphdef, state), images))


@functools.lru_cache(maxsize=8)
def compiled_decode(graphdef: nnx.GraphDef) -> Callable:
    """`fn(state, ids int32 [B, h, w]) -> images uint8 [B, H, W, 3]`, rounded to 8 bits as
    images are saved."""
    return jax.jit(lambda state, ids: to_uint8(decode(nnx.merge(graphdef, state), ids)))


@functools.lru_cache(maxsize=8)
def compiled_reconstruct(graphdef: nnx.GraphDef) -> Callable:
    """`fn(state, images uint8 [B, S, S, 3]) -> {"ids": int32 [B, h, w], "recon": uint8
    [B, S, S, 3], "psnr": float32 [B]}`: decode(encode(images)) rounded to 8 bits, with the
    PSNR of the float reconstruction (as training reports it)."""

    def run(state, images):
        out = eval_step(nnx.merge(graphdef, state), images)
        return {"ids": out["ids"], "recon": to_uint8(out["recon"]), "psnr": out["psnr"]}

    return jax.jit(run)
