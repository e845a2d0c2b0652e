"""The two quantizers: l2-normalised VQ (LlamaGen / ViT-VQGAN) and DALL-E's Gumbel-softmax dVAE.

The math lives in pure functions (`nearest_codes`, `ema_codebook`, `restart_dead_codes`,
`gumbel_softmax`, `kl_to_uniform`); the modules hold the codebook and the state the train step
moves outside of gradients (EMA sums, per-code unused-step counters) as non-Param variables.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from vqvae.config import VQVAEConfig
from vqvae.metrics import code_histogram


class CodebookEMA(nnx.Variable):
    """A codebook moved by an exponential moving average of assigned features, not by gradients."""


class CodeUsage(nnx.Variable):
    """Per-code bookkeeping of the train step (consecutive steps each code went unused)."""


@flax.struct.dataclass
class QuantizerOutput:
    """What a quantizer hands the decoder and the loss.

    codes: float32 [B, h, w, D], what the decoder consumes (straight-through VQ codes, or the
      relaxed one-hot @ embedding while training Gumbel, the hard embedding otherwise);
    ids: int32 [B, h, w], the hard code of each cell;
    commitment, codebook_loss, kl: float32 [], unweighted loss terms (0 where they don't apply);
    features: float32 [B, h, w, D] l2-normalised encoder outputs, stop-gradient (VQ), or None.
    """

    codes: jax.Array
    ids: jax.Array
    commitment: jax.Array
    codebook_loss: jax.Array
    kl: jax.Array
    features: jax.Array | None = None


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / ||x|| along `axis` (float32); a zero vector stays (near) zero instead of NaN."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def nearest_codes(features, codebook):
    """Nearest code by cosine similarity.

    features: float [..., D] and codebook: float [K, D], both l2-normalised -> int32 [...].
    """
    similarity = jnp.einsum("...d,kd->...k", features, codebook)
    return jnp.argmax(similarity, axis=-1).astype(jnp.int32)


def ema_codebook(codebook, features, ids, decay: float):
    """One EMA step of per-code feature sums.

    codebook: float32 [K, D] (EMA of the sums of features assigned to each code; only its
    direction is used, since codes are l2-normalised at lookup); features: float [N, D];
    ids: int [N] in [0, K). Returns float32 [K, D]: decay * codebook + (1 - decay) * sums.
    """
    one_hot = jax.nn.one_hot(ids, codebook.shape[0], dtype=jnp.float32)  # [N, K]
    sums = one_hot.T @ features.astype(jnp.float32)  # [K, D]
    return decay * codebook + (1.0 - decay) * sums


def restart_dead_codes(codebook, unused_steps, counts, features, key, *, restart_after: int):
    """Re-initialises codes unused for `restart_after` consecutive steps from batch features.

    codebook: float [K, D]; unused_steps: int32 [K], steps each code has gone unused before
    this batch; counts: int [K], this batch's histogram of ids; features: float [N, D], this
    batch's (normalised) encoder outputs; key: PRNG key choosing which features replace dead codes.
    Returns (codebook [K, D], unused_steps int32 [K], restarted bool [K]). No Python branching
    on values: every code is computed both ways and `where` picks, so it jits.
    """
    num_codes = codebook.shape[0]
    unused_steps = jnp.where(counts > 0, 0, unused_steps + 1).astype(jnp.int32)
    restarted = unused_steps >= restart_after
    num_features = features.shape[0]
    # Distinct features where the batch has enough, so two dead codes don't restart identical.
    rows = jax.random.choice(key, num_features, (num_codes,), replace=num_features < num_codes)
    replacement = features[rows].astype(codebook.dtype)
    codebook = jnp.where(restarted[:, None], replacement, codebook)
    unused_steps = jnp.where(restarted, 0, unused_steps)
    return codebook, unused_steps, restarted


def gumbel_softmax(logits, key, temperature, *, hard: bool = False):
    """Relaxed one-hot sample: softmax((logits + Gumbel noise) / temperature), float32 [..., K].

    hard: the forward value is the one-hot of the sample's argmax, while gradients are those of
    the relaxed sample (straight-through Gumbel-softmax), so the decoder sees real codes early on.
    """
    noise = jax.random.gumbel(key, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits.astype(jnp.float32) + noise) / temperature, axis=-1)
    if not hard:
        return soft
    one_hot = jax.nn.one_hot(jnp.argmax(soft, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return soft + jax.lax.stop_gradient(one_hot - soft)


def kl_to_uniform(logits):
    """KL(softmax(logits) || uniform over K), averaged over cells: logits [..., K] -> float32 [].

    = log K - H(q); 0 when every code is equally likely, log K when one code is certain.
    """
    logits = logits.astype(jnp.float32)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    q = jnp.exp(log_q)
    num_codes = logits.shape[-1]
    return jnp.mean(jnp.sum(q * (log_q + jnp.log(num_codes)), axis=-1))


class VectorQuantizer(nnx.Module):
    """VQ with l2-normalised low-dimensional codes, cosine nearest code, straight-through."""

    def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
        self.codebook_size = config.codebook_size
        self.use_ema = config.use_ema
        self.ema_decay = config.ema_decay
        self.restart_unused_steps = config.restart_unused_steps
        init = l2_normalize(
            jax.random.normal(rngs.params(), (config.codebook_size, config.code_dim))
        )
        # With EMA the codebook holds EMA sums of assigned features (not trained by gradients).
        self.codebook = CodebookEMA(init) if config.use_ema else nnx.Param(init)
        self.unused_steps = CodeUsage(jnp.zeros((config.codebook_size,), jnp.int32))

    def normalized_codebook(self):
        """float32 [K, D], unit rows."""
        return l2_normalize(self.codebook[...])

    def embed(self, ids):
        """ids int [B, h, w] -> codes float32 [B, h, w, D]."""
        return jnp.take(self.normalized_codebook(), ids, axis=0, mode="clip")

    def lookup(self, encoder_features):
        """encoder_features float [B, h, w, D] -> ids int32 [B, h, w]."""
        return nearest_codes(l2_normalize(encoder_features), self.normalized_codebook())

    def __call__(self, encoder_features) -> QuantizerOutput:
        """encoder_features float [B, h, w, D] -> QuantizerOutput (straight-through codes)."""
        features = l2_normalize(encoder_features)
        codebook = self.normalized_codebook()
        ids = nearest_codes(features, codebook)
        quantized = jnp.take(codebook, ids, axis=0)
        sg = jax.lax.stop_gradient
        commitment = jnp.mean(jnp.square(features - sg(quantized)))
        codebook_loss = (
            jnp.zeros((), jnp.float32)
            if self.use_ema
            else jnp.mean(jnp.square(quantized - sg(features)))
        )
        # Straight-through: the decoder sees the code, the encoder gets the decoder's gradient.
        codes = features + sg(quantized - features)
        return QuantizerOutput(
            codes=codes,
            ids=ids,
            commitment=commitment,
            codebook_loss=codebook_loss,
            kl=jnp.zeros((), jnp.float32),
            features=sg(features),
        )

    def update(self, output: QuantizerOutput, key) -> dict:
        """The train step's non-gradient update: EMA codebook, unused counters, dead-code restart.

        output: this batch's QuantizerOutput; key: PRNG key for restarts. Returns float32 []
        metrics: `restarted_codes` (codes re-initialised now) and `dead_codes` (unused for at
        least half the restart horizon, or for any step when restarts are off).
        """
        features = output.features.reshape(-1, output.features.shape[-1])
        ids = output.ids.reshape(-1)
        counts = code_histogram(ids, self.codebook_size)
        codebook = self.codebook[...]
        if self.use_ema:
            codebook = ema_codebook(codebook, features, ids, self.ema_decay)
        if self.restart_unused_steps:
            codebook, unused, restarted = restart_dead_codes(
                codebook,
                self.unused_steps[...],
                counts,
                features,
                key,
                restart_after=self.restart_unused_steps,
            )
            dead_after = max(self.restart_unused_steps // 2, 1)
        else:
            unused = jnp.where(counts > 0, 0, self.unused_steps[...] + 1).astype(jnp.int32)
            restarted = jnp.zeros((self.codebook_size,), bool)
            dead_after = 1
        self.codebook[...] = codebook
        self.unused_steps[...] = unused
        return {
            "restarted_codes": jnp.sum(restarted).astype(jnp.float32),
            "dead_codes": jnp.sum(unused >= dead_after).astype(jnp.float32),
        }


class GumbelQuantizer(nnx.Module):
    """DALL-E dVAE: logits over K codes; Gumbel-softmax relaxation while training, argmax after."""

    def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
        self.codebook_size = config.codebook_size
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (config.codebook_size, config.code_dim))
        )

    def embed(self, ids):
        """ids int [B, h, w] -> codes float32 [B, h, w, D]."""
        return jnp.take(self.embedding[...], ids, axis=0, mode="clip")

    def lookup(self, logits):
        """logits float [B, h, w, K] -> ids int32 [B, h, w]."""
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def __call__(self, logits, *, key=None, temperature=1.0, hard=False) -> QuantizerOutput:
        """logits float [B, h, w, K] -> QuantizerOutput.

        With a key: codes = gumbel_softmax(logits, key, temperature, hard=hard) @ embedding
        (training). Without: the argmax code's embedding (what `decode` of the ids gives).
        """
        ids = self.lookup(logits)
        if key is None:
            codes = self.embed(ids)
        else:
            soft_one_hot = gumbel_softmax(logits, key, temperature, hard=hard)
            codes = soft_one_hot @ self.embedding[...]
        zero = jnp.zeros((), jnp.float32)
        return QuantizerOutput(
            codes=codes, ids=ids, commitment=zero, codebook_loss=zero, kl=kl_to_uniform(logits)
        )

    def update(self, output: QuantizerOutput, key) -> dict:
        """Nothing moves outside gradients; kept so the train step treats both quantizers alike."""
        del output, key
        return {}
