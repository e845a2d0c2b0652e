"""The VQ-VAE / dVAE module and the stage-1 contract `encode(model, images)` / `decode(model, ids)`.

Image range: the model takes images in [0, 1] (uint8 input is divided by 255 inside `encode`)
and `decode` returns float32 images in [0, 1]. Internally the encoder sees [-1, 1].
Both functions are pure in the model and jit-able (`nnx.jit(encode)(model, images)`); shape
checks happen at trace time and raise `VQVAEInputError` naming the expected shape.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.config import VQVAEConfig
from vqvae.errors import VQVAEInputError
from vqvae.losses import logit_laplace_mean_image
from vqvae.networks import Decoder, Encoder
from vqvae.quantizers import GumbelQuantizer, QuantizerOutput, VectorQuantizer


@flax.struct.dataclass
class ModelOutput:
    """A forward pass: recon float32 [B, H, W, 3] in about [0, 1] (not clipped, so the loss
    keeps its gradient); decoder_output float32 [B, H, W, 3 or 6] (raw; logit-Laplace mu and
    log-scale when the config asks for it); quantizer: the QuantizerOutput."""

    recon: jax.Array
    decoder_output: jax.Array
    quantizer: QuantizerOutput


class VQVAE(nnx.Module):
    """Encoder -> quantizer (VQ or Gumbel, by `config.quantizer`) -> decoder."""

    def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        if config.quantizer == "gumbel":
            self.encoder = Encoder(config, config.codebook_size, rngs=rngs)
            self.quantizer = GumbelQuantizer(config, rngs=rngs)
        else:
            self.encoder = Encoder(config, config.code_dim, rngs=rngs)
            self.quantizer = VectorQuantizer(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    def encoder_output(self, images):
        """images float [B, H, W, 3] in [0, 1] -> VQ features [.., D] or Gumbel logits [.., K]."""
        return self.encoder(images.astype(jnp.float32) * 2.0 - 1.0)

    def output_image(self, decoder_output):
        """Raw decoder output [B, H, W, 3 or 6] -> image float32 [B, H, W, 3], about [0, 1]."""
        if self.config.logit_laplace:
            return logit_laplace_mean_image(decoder_output[..., :3])
        # Centred on mid-grey, so a freshly initialised decoder starts near the data mean.
        return decoder_output * 0.5 + 0.5

    def __call__(self, images, *, key=None, temperature=1.0, hard=False) -> ModelOutput:
        """The training forward pass: images float [B, H, W, 3] in [0, 1] -> ModelOutput.

        key/temperature/hard: Gumbel-softmax noise, relaxation and straight-through (Gumbel
        quantizer only; without a key it takes the argmax code, as at inference). VQ ignores them.
        """
        features = self.encoder_output(images)
        if self.config.quantizer == "gumbel":
            quantized = self.quantizer(features, key=key, temperature=temperature, hard=hard)
        else:
            quantized = self.quantizer(features)
        decoder_output = self.decoder(quantized.codes)
        return ModelOutput(
            recon=self.output_image(decoder_output),
            decoder_output=decoder_output,
            quantizer=quantized,
        )

    def encode_ids(self, images):
        """images float [B, H, W, 3] in [0, 1] -> ids int32 [B, h, w] (no shape checks)."""
        return self.quantizer.lookup(self.encoder_output(images))

    def decode_ids(self, ids):
        """ids int [B, h, w] -> images float32 [B, H, W, 3] in [0, 1] (no shape checks)."""
        image = self.output_image(self.decoder(self.quantizer.embed(ids)))
        return jnp.clip(image, 0.0, 1.0)


def create_model(config: VQVAEConfig, seed: int = 0) -> VQVAE:
    """A freshly initialised model; the same seed gives the same weights."""
    return VQVAE(config, rngs=nnx.Rngs(params=seed))


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_images(config: VQVAEConfig, images) -> None:
    """Raises VQVAEInputError unless images are uint8/float [B, S, S, 3] with S = image_size."""
    s = config.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
        raise VQVAEInputError(
            f"expected images [B, {s}, {s}, 3], got {_shape(images.shape)}; "
            f"resize to {s}x{s} RGB for vqvae config {config.name!r}"
        )
    dtype = jnp.dtype(images.dtype)
    if dtype != jnp.uint8 and not jnp.issubdtype(dtype, jnp.floating):
        raise VQVAEInputError(
            f"expected uint8 images in [0, 255] or float images in [0, 1], got dtype {dtype}"
        )


def check_ids(config: VQVAEConfig, ids) -> None:
    """Raises VQVAEInputError unless ids are integers [B, g, g] with g = grid_size."""
    g = config.grid_size
    if ids.ndim != 3 or tuple(ids.shape[1:]) != (g, g):
        raise VQVAEInputError(
            f"expected ids [B, {g}, {g}], got {_shape(ids.shape)} "
            f"(vqvae config {config.name!r}: {config.image_size} px / {config.downsample_factor})"
        )
    if not jnp.issubdtype(jnp.dtype(ids.dtype), jnp.integer):
        raise VQVAEInputError(f"expected integer ids, got dtype {jnp.dtype(ids.dtype)}")


def to_unit_range(images):
    """uint8 [..] in [0, 255] -> float32 / 255; float images are taken to be in [0, 1] already."""
    if jnp.dtype(images.dtype) == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def to_uint8(images) -> jax.Array:
    """float [..] in [0, 1] (clipped) -> uint8 [..] in [0, 255], rounded: how decoded images are
    rendered, the inverse of `to_unit_range`."""
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def encode(model: VQVAE, images) -> jax.Array:
    """images uint8 [B, H, W, 3] (0..255) or float [B, H, W, 3] (0..1) -> ids int32 [B, h, w]."""
    check_images(model.config, images)
    return model.encode_ids(to_unit_range(jnp.asarray(images)))


def decode(model: VQVAE, ids) -> jax.Array:
    """ids int [B, h, w] in [0, K) -> images float32 [B, H, W, 3] in [0, 1].

    Ids outside [0, K) are clipped to the nearest valid code.
    """
    check_ids(model.config, ids)
    return model.decode_ids(jnp.asarray(ids))
