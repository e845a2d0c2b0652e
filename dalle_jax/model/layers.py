"""Small building blocks with logical axis names on every parameter.

Parameters are float32; `dtype` is the compute dtype the inputs and kernels are cast to.
Variables are created with `eager_sharding=False`: the annotations are read by
`dalle_jax.sharding` (rules table, sharded init), so building a model needs no mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int], axes: Axes) -> nnx.Param:
    """A float32 `nnx.Param` of `shape` annotated with logical `axes` (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    init = nnx.with_partitioning(init, axes, eager_sharding=False)
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32))


class Dense(nnx.Module):
    """`y = x @ kernel + bias` over the last `len(in_shape)` dims of x, producing `out_shape` dims.

    kernel: float32 [*in_shape, *out_shape] named `in_axes + out_axes`; bias float32 [*out_shape].
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Axes,
        out_axes: Axes,
        *,
        rngs: nnx.Rngs,
        std: float,
        dtype: jnp.dtype = jnp.float32,
        use_bias: bool = True,
    ):
        self.in_rank = len(in_shape)
        self.dtype = dtype
        self.kernel = param(
            rngs, nnx.initializers.normal(std), (*in_shape, *out_shape), (*in_axes, *out_axes)
        )
        self.bias = (
            param(rngs, nnx.initializers.zeros, tuple(out_shape), tuple(out_axes))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        in_shape = kernel.shape[: self.in_rank]
        out_shape = kernel.shape[self.in_rank :]
        lead = x.shape[: x.ndim - self.in_rank]
        # One row-major [M, K] x [K, N] matmul: the reshapes are free, and the CPU matmul
        # kernels then need no transposed copies of activations in either pass.
        k, n = math.prod(in_shape), math.prod(out_shape)
        y = jnp.dot(
            x.astype(self.dtype).reshape(-1, k),
            kernel.reshape(k, n),
            preferred_element_type=out_dtype or self.dtype,
        )
        if self.bias is not None:
            y = y + self.bias[...].reshape(n).astype(y.dtype)
        return y.reshape(*lead, *out_shape)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last dim, computed in float32, returned in `dtype`."""

    def __init__(self, dim: int, kind: str, *, rngs: nnx.Rngs, dtype: jnp.dtype, eps: float = 1e-5):
        self.kind = kind
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",))
        self.bias = (
            param(rngs, nnx.initializers.zeros, (dim,), ("embed",)) if kind == "layernorm" else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """The identity; in the backward pass its cotangent is materialised before use.

    XLA otherwise fuses the residual stream's running sum of gradients into every consumer and
    recomputes the whole chain in each (quadratic in depth); one barrier per block stops that.
    """
    return x


def _barrier_fwd(x):
    return x, None


def _barrier_bwd(_, g):
    return (jax.lax.optimization_barrier(g),)


gradient_barrier.defvjp(_barrier_fwd, _barrier_bwd)
