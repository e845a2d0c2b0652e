"""Convolutional ResNet encoder and decoder (GroupNorm + swish residual blocks).

Level `i` runs at `image_size / 2**i` with `config.level_channels[i]` channels. The encoder goes
down one level per downsampling (strided conv or average pooling); the decoder goes up with
nearest-neighbour upsampling followed by a 3x3 conv. Activations are NHWC.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from vqvae.config import VQVAEConfig


class ResBlock(nnx.Module):
    """Pre-activation residual block: x + conv(swish(norm(conv(swish(norm(x)))))).

    x: float [B, H, W, in_channels] -> [B, H, W, out_channels].
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int, dtype, rngs):
        self.norm1 = nnx.GroupNorm(in_channels, num_groups=num_groups, rngs=rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
        self.norm2 = nnx.GroupNorm(out_channels, num_groups=num_groups, rngs=rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
        # A 1x1 projection only where the width changes; otherwise the identity.
        self.skip = (
            nnx.Conv(in_channels, out_channels, (1, 1), dtype=dtype, rngs=rngs)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x):
        h = self.conv1(nnx.swish(self.norm1(x)))
        h = self.conv2(nnx.swish(self.norm2(h)))
        shortcut = x if self.skip is None else self.skip(x)
        return shortcut + h


class Downsample(nnx.Module):
    """Halves H and W: x float [B, H, W, C] -> [B, H/2, W/2, C]."""

    def __init__(self, channels: int, *, mode: str, dtype, rngs):
        self.mode = mode
        self.conv = (
            nnx.Conv(channels, channels, (3, 3), strides=2, dtype=dtype, rngs=rngs)
            if mode == "conv"
            else None
        )

    def __call__(self, x):
        if self.conv is not None:
            return self.conv(x)
        return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class Upsample(nnx.Module):
    """Doubles H and W (nearest neighbour, then a 3x3 conv): [B, H, W, Cin] -> [B, 2H, 2W, Cout]."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype, rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Encoder(nnx.Module):
    """images float [B, H, W, 3] in [-1, 1] -> features float32 [B, h, w, out_features]."""

    def __init__(self, config: VQVAEConfig, out_features: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        channels = config.level_channels
        self.conv_in = nnx.Conv(3, channels[0], (3, 3), dtype=dtype, rngs=rngs)
        layers = []
        prev = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(config.num_res_blocks):
                layers.append(
                    ResBlock(prev, ch, num_groups=config.num_groups, dtype=dtype, rngs=rngs)
                )
                prev = ch
            if level < config.num_downsamples:
                layers.append(Downsample(ch, mode=config.downsample_mode, dtype=dtype, rngs=rngs))
        self.layers = nnx.List(layers)
        self.norm_out = nnx.GroupNorm(prev, num_groups=config.num_groups, rngs=rngs)
        # 1x1: the projection to the quantizer's space (code_dim for VQ, K logits for Gumbel).
        self.conv_out = nnx.Conv(prev, out_features, (1, 1), rngs=rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for layer in self.layers:
            h = layer(h)
        return self.conv_out(nnx.swish(self.norm_out(h))).astype(jnp.float32)


class Decoder(nnx.Module):
    """codes float [B, h, w, code_dim] -> float32 [B, H, W, config.output_channels]."""

    def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        channels = config.level_channels
        self.conv_in = nnx.Conv(config.code_dim, channels[-1], (3, 3), dtype=dtype, rngs=rngs)
        layers = []
        prev = channels[-1]
        for level in reversed(range(len(channels))):
            ch = channels[level]
            if level < config.num_downsamples:
                layers.append(Upsample(prev, ch, dtype=dtype, rngs=rngs))
                prev = ch
            for _ in range(config.num_res_blocks):
                layers.append(
                    ResBlock(prev, ch, num_groups=config.num_groups, dtype=dtype, rngs=rngs)
                )
                prev = ch
        self.layers = nnx.List(layers)
        self.norm_out = nnx.GroupNorm(prev, num_groups=config.num_groups, rngs=rngs)
        self.conv_out = nnx.Conv(prev, config.output_channels, (3, 3), rngs=rngs)

    def __call__(self, codes):
        h = self.conv_in(codes)
        for layer in self.layers:
            h = layer(h)
        return self.conv_out(nnx.swish(self.norm_out(h))).astype(jnp.float32)
