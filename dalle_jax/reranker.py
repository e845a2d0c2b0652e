"""The contrastive text–image reranker (CLIP-style): a model, its config and pure functions.

Two small encoders map into one embedding space:
- images uint8 [B, S, S, 3] -> a strided-conv stack -> flatten -> l2-normalised float32 [B, E].
  The final feature map is flattened rather than average-pooled, so where an object sits
  ("at the top left") survives into the embedding.
- text ids int32 [B, T] (sentencepiece, `dalle_jax.tokenizer`, pad id 0) -> token + position
  embeddings -> `text_layers` pre-LN transformer blocks (0: none, a bag of positioned words)
  -> mean over the non-pad tokens -> l2-normalised float32 [B, E].
Their cosine similarity is the score. Training uses the symmetric InfoNCE loss with a learned
temperature (`logit_scale`, clamped at `logit_scale_max` as in CLIP).

Uses: `sample --rerank M` draws M candidates per prompt and keeps the best N by `score`
(`rerank`); evaluation reports `r_precision` (top-1 accuracy of picking the true caption among
k); the training job (`dalle_jax.reranker_training`) reports `retrieval_metrics`.

The model is small (about a million weights) and trained data-parallel only, with replicated
weights; so unlike the transformer its parameters carry no logical sharding names.

A reranker only understands ids of the tokenizer it was trained with: its config records that
tokenizer's sha256 (`tokenizer_sha256`), and `check_tokenizer` refuses another one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.errors import UserError
from dalle_jax.tokenizer import PAD_ID

# --------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class RerankerConfig:
    """The shape of a reranker: everything needed to rebuild it before loading its weights.

    `image_size` S must be divisible by 2**len(image_channels) (each stage halves the side).
    `text_vocab_size` and `tokenizer_sha256` come from the tokenizer at training time.
    """

    name: str = "custom"
    image_size: int = 64
    image_channels: tuple[int, ...] = (16, 32, 64, 128)  # one stride-2 stage each
    text_vocab_size: int = 512
    text_length: int = 32  # T: longer id blocks are cut, shorter ones padded
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 128  # E
    logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
    logit_scale_max: float = math.log(100.0)
    tokenizer_sha256: str = ""  # "" : unknown (no check)

    def __post_init__(self) -> None:
        # Lists arrive from JSON; the dataclass is frozen, so fix the type in place once.
        object.__setattr__(self, "image_channels", tuple(int(c) for c in self.image_channels))
        problems = self._problems()
        if problems:
            raise UserError(f"invalid reranker config {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for field in ("image_size", "text_vocab_size", "text_length", "text_width", "embed_dim"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if not self.image_channels or min(self.image_channels) < 1:
            problems.append(f"image_channels must be positive widths, got {self.image_channels}")
        elif self.image_size % self.downsampling:
            problems.append(
                f"image_size {self.image_size} must be divisible by {self.downsampling} "
                f"(2**{len(self.image_channels)} stages); pick another image size"
            )
        if self.text_layers < 0:
            problems.append(f"text_layers must be >= 0, got {self.text_layers}")
        if self.text_heads < 1 or self.text_width % self.text_heads:
            problems.append(
                f"text_width {self.text_width} must be divisible by text_heads {self.text_heads}"
            )
        if self.logit_scale_init > self.logit_scale_max:
            problems.append("logit_scale_init must not exceed logit_scale_max")
        return problems

    @property
    def downsampling(self) -> int:
        return 2 ** len(self.image_channels)

    @property
    def feature_grid(self) -> int:
        """Side of the image encoder's last feature map."""
        return self.image_size // self.downsampling

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_channels"] = list(self.image_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RerankerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"reranker config has unknown keys {unknown}; it was written by another version"
            )
        return cls(**dict(d))

    def replace(self, **changes: Any) -> RerankerConfig:
        return dataclasses.replace(self, **changes)


CONFIGS: dict[str, RerankerConfig] = {
    # For tests: compiles and trains in seconds.
    "tiny": RerankerConfig(
        name="tiny",
        image_size=32,
        image_channels=(8, 16, 32),
        text_length=24,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=32,
    ),
    # shapes_world/64 or emoji/32 on a CPU in minutes.
    "small": RerankerConfig(
        name="small",
        image_size=64,
        image_channels=(16, 32, 64, 128),
        text_length=32,
        text_width=128,
        text_layers=2,
        text_heads=4,
        embed_dim=128,
    ),
}


def get_config(name: str, **overrides: Any) -> RerankerConfig:
    """The named variant (`tiny`, `small`) with `overrides` applied."""
    if name not in CONFIGS:
        raise UserError(f"unknown reranker config {name!r}; known: {', '.join(sorted(CONFIGS))}")
    return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]


def tokenizer_sha256(tokenizer_bytes: bytes) -> str:
    """The fingerprint a config records of its tokenizer (`TextTokenizer.to_bytes()`)."""
    return hashlib.sha256(tokenizer_bytes).hexdigest()


def check_tokenizer(config: RerankerConfig, tokenizer: Any) -> None:
    """Raises `UserError` unless `tokenizer` (a `TextTokenizer`) is the one `config` was trained
    with (by sha256; a config without a recorded sha256 passes on the vocabulary size alone)."""
    if tokenizer.vocab_size != config.text_vocab_size:
        raise UserError(
            f"the reranker expects a tokenizer of {config.text_vocab_size} ids, this one has "
            f"{tokenizer.vocab_size}; use the tokenizer the reranker was trained with"
        )
    if config.tokenizer_sha256 and tokenizer_sha256(tokenizer.to_bytes()) != (
        config.tokenizer_sha256
    ):
        raise UserError(
            "the reranker was trained with another tokenizer (sha256 differs); use that "
            "tokenizer or retrain the reranker with `train reranker --tokenizer FILE`"
        )


# --------------------------------------------------------------------------------------------
# Model


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x float [..., E] -> float32 [..., E] of unit norm (a zero vector stays ~zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class ImageEncoder(nnx.Module):
    """images uint8 [B, S, S, 3] -> unnormalised float32 [B, E].

    Per stage: a stride-2 3x3 conv, then a residual 3x3 conv; GroupNorm-free (the net is
    shallow, and AdamW trains it fine). The last [S/2**n, S/2**n, C] map is flattened.
    """

    def __init__(self, config: RerankerConfig, *, rngs: nnx.Rngs):
        self.config = config
        downs, convs = [], []
        previous = 3
        for channels in config.image_channels:
            downs.append(nnx.Conv(previous, channels, (3, 3), strides=2, rngs=rngs))
            convs.append(nnx.Conv(channels, channels, (3, 3), rngs=rngs))
            previous = channels
        self.downs = nnx.List(downs)
        self.convs = nnx.List(convs)
        flat = config.feature_grid**2 * previous
        self.norm = nnx.LayerNorm(flat, rngs=rngs)
        self.proj = nnx.Linear(flat, config.embed_dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = prepare_images(images, self.config.image_size)
        for down, conv in zip(self.downs, self.convs, strict=True):
            x = nnx.gelu(down(x))
            x = x + nnx.gelu(conv(x))
        x = x.reshape(x.shape[0], -1)
        return self.proj(self.norm(x))


def prepare_images(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 [B, H, W, 3] (or float in [0, 255]) -> float32 [B, S, S, 3] in [-1, 1].

    Images of another size are resized (antialiased), so a reranker trained at 64 px can still
    score 32 px samples, if less well.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"the reranker takes images [B, H, W, 3], got shape {list(images.shape)}")
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if images.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "linear", antialias=True)
    return x


class SelfAttention(nnx.Module):
    """Multi-head self-attention over [B, T, D] with a key padding mask [B, T] (True: a token)."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.out = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.heads
        q, k, v = jnp.split(self.qkv(x).reshape(batch, length, 3, self.heads, head_dim), 3, 2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, T, H, Dh]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        # A large finite negative, not -inf: an all-padding caption then attends uniformly
        # instead of producing NaN.
        logits = jnp.where(mask[:, None, None, :], logits, -1e9)
        weights = jax.nn.softmax(logits, axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return self.out(attended)


class TextBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)). [B, T, D] -> [B, T, D]."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attention = SelfAttention(width, heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x), mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class TextEncoder(nnx.Module):
    """text ids int32 [B, T] (pad id 0) -> unnormalised float32 [B, E]."""

    def __init__(self, config: RerankerConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(
            config.text_vocab_size, config.text_width, embedding_init=init, rngs=rngs
        )
        self.position_embed = nnx.Param(
            init(rngs.params(), (config.text_length, config.text_width))
        )
        self.blocks = nnx.List(
            [
                TextBlock(config.text_width, config.text_heads, rngs=rngs)
                for _ in range(config.text_layers)
            ]
        )
        self.norm = nnx.LayerNorm(config.text_width, rngs=rngs)
        self.proj = nnx.Linear(config.text_width, config.embed_dim, rngs=rngs)

    def __call__(self, text_ids: jax.Array) -> jax.Array:
        ids = fit_text_length(text_ids, self.config.text_length)
        # Out-of-vocabulary ids (another tokenizer) would silently read garbage rows.
        ids = jnp.clip(ids, 0, self.config.text_vocab_size - 1)
        mask = ids != PAD_ID
        x = self.token_embed(ids) + self.position_embed[...][None]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        weights = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return self.proj(pooled)


def fit_text_length(text_ids: jax.Array, text_length: int) -> jax.Array:
    """int [B, T] -> int32 [B, text_length]: cut at the end or padded with `PAD_ID`.

    The sampler's id blocks may be longer (padding) or shorter than the reranker's.
    """
    text_ids = jnp.asarray(text_ids, jnp.int32)
    if text_ids.ndim != 2:
        raise UserError(f"text ids must be int [B, T], got shape {list(text_ids.shape)}")
    length = text_ids.shape[1]
    if length >= text_length:
        return text_ids[:, :text_length]
    return jnp.pad(text_ids, ((0, 0), (0, text_length - length)), constant_values=PAD_ID)


class Reranker(nnx.Module):
    """The two encoders and the learned temperature (`logit_scale`, a log)."""

    def __init__(self, config: RerankerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.image_encoder = ImageEncoder(config, rngs=rngs)
        self.text_encoder = TextEncoder(config, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init, jnp.float32))


def create_reranker(config: RerankerConfig, seed: int = 0) -> Reranker:
    return Reranker(config, rngs=nnx.Rngs(seed))


def reranker_from_state(config: RerankerConfig, state: Mapping[str, Any]) -> Reranker:
    """A reranker of `config` holding `state`, a pure dict of `nnx.state(model)` (what a
    checkpoint or a bundle stores). Leaves are cast to float32; shapes must match."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_reranker(config)))
    expected = nnx.to_pure_dict(abstract)
    flat_expected = dict(_flat(expected))
    flat_given = dict(_flat(state))
    if flat_expected.keys() != flat_given.keys():
        missing = sorted(flat_expected.keys() - flat_given.keys())[:3]
        extra = sorted(flat_given.keys() - flat_expected.keys())[:3]
        raise UserError(
            f"reranker weights do not fit its config (missing {missing}, unexpected {extra}); "
            "the weights belong to another model"
        )
    for path, leaf in flat_expected.items():
        if tuple(np.shape(flat_given[path])) != tuple(leaf.shape):
            raise UserError(
                f"reranker weight {path} has shape {list(np.shape(flat_given[path]))}, its config "
                f"says {list(leaf.shape)}; the weights belong to another model"
            )
    cast = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(state))
    nnx.replace_by_pure_dict(abstract, cast)
    return nnx.merge(graphdef, abstract)


def _flat(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


# --------------------------------------------------------------------------------------------
# Pure functions (jit-able in the model)


def embed_images(model: Reranker, images: jax.Array) -> jax.Array:
    """images uint8 [B, H, W, 3] -> unit-norm float32 [B, E]."""
    return l2_normalize(model.image_encoder(images))


def embed_texts(model: Reranker, text_ids: jax.Array) -> jax.Array:
    """text ids int32 [B, T] (pad 0; any T, fitted to the config's) -> unit-norm float32 [B, E]."""
    return l2_normalize(model.text_encoder(text_ids))


def logit_scale(model: Reranker) -> jax.Array:
    """The multiplier of cosine similarities in the loss: float32 [], exp(clamped log)."""
    return jnp.exp(jnp.minimum(model.logit_scale[...], model.config.logit_scale_max))


def same_caption_mask(text_ids: jax.Array) -> jax.Array:
    """text ids int [B, T] -> bool [B, B]: True where rows i and j are the same caption."""
    return jnp.all(text_ids[:, None, :] == text_ids[None, :, :], axis=-1)


def negative_allowed_mask(
    text_ids: jax.Array, negative_ids: jax.Array, valid: jax.Array
) -> jax.Array:
    """Which negatives count against which image: bool [B, N].

    text_ids int [B, T] (image i's caption), negative_ids int [N, T], valid bool [N] (False: a
    placeholder). A swapped caption can be word for word another image's true caption ("a red
    circle" -> "a blue circle"): it is never a negative of that image.
    """
    is_true_caption = jnp.all(text_ids[:, None, :] == negative_ids[None, :, :], axis=-1)
    return valid[None, :] & ~is_true_caption


def info_nce_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array | float,
    positives: jax.Array | None = None,
    negative_text_emb: jax.Array | None = None,
    negative_allowed: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The symmetric InfoNCE (CLIP) loss of a batch of matching pairs.

    image_emb, text_emb: float32 [B, E] (unit norm), pair i matching; scale: float32 [];
    positives: bool [B, B], which (image, text) pairs count as matches (default: the diagonal).
    With captions repeated in a batch (shapes_world's "a red circle"), the identical captions
    of image i are all its positives (`same_caption_mask`), rather than negatives it is pushed
    away from; the target is then uniform over them.
    negative_text_emb: float32 [N, E], extra captions that match no image (hard negatives,
    `dalle_jax.hard_negatives`), added to the image->text softmax only (as in NegCLIP);
    negative_allowed: bool [B, N], which of them count against image i (False: ignored, e.g.
    a placeholder, or a "negative" that is word for word a true caption of image i).
    Returns (loss float32 [], {"loss_image_to_text", "loss_text_to_image", "batch_top1"}), where
    batch_top1 is the image->text accuracy, counting any positive as right; with N == B
    negatives (row i made from caption i) also "hard_negative_top1", the fraction of images
    that score their caption above its negative.
    """
    batch = image_emb.shape[0]
    if positives is None:
        positives = jnp.eye(batch, dtype=bool)
    logits = scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T  # [B, B]
    targets = positives.astype(jnp.float32)
    image_logits, image_targets = logits, targets
    if negative_text_emb is not None:
        extra = scale * image_emb.astype(jnp.float32) @ negative_text_emb.astype(jnp.float32).T
        if negative_allowed is not None:
            # A large finite value, not -inf: it meets a zero target, and 0 * -inf is NaN.
            extra = jnp.where(negative_allowed, extra, -1e9)
        image_logits = jnp.concatenate([logits, extra], axis=1)  # [B, B + N]
        image_targets = jnp.concatenate([targets, jnp.zeros_like(extra)], axis=1)
    image_to_text = -jnp.sum(
        image_targets
        / jnp.sum(image_targets, 1, keepdims=True)
        * jax.nn.log_softmax(image_logits, 1),
        1,
    )
    text_to_image = -jnp.sum(
        targets / jnp.sum(targets, 0, keepdims=True) * jax.nn.log_softmax(logits, 0), 0
    )
    loss_i2t, loss_t2i = jnp.mean(image_to_text), jnp.mean(text_to_image)
    chosen = jnp.argmax(logits, axis=1)
    batch_top1 = jnp.mean(positives[jnp.arange(batch), chosen].astype(jnp.float32))
    terms = {
        "loss_image_to_text": loss_i2t,
        "loss_text_to_image": loss_t2i,
        "batch_top1": batch_top1,
    }
    if negative_text_emb is not None and negative_text_emb.shape[0] == batch:
        # Negative i made from caption i: how often image i prefers its caption to it.
        counted = jnp.ones(batch) if negative_allowed is None else jnp.diagonal(negative_allowed)
        wins = (jnp.diagonal(logits) > jnp.diagonal(extra)).astype(jnp.float32)
        terms["hard_negative_top1"] = jnp.sum(wins * counted) / jnp.maximum(jnp.sum(counted), 1)
    return 0.5 * (loss_i2t + loss_t2i), terms


def pair_scores(model: Reranker, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    """Cosine similarity of each (image, text) pair: float32 [M]; text_ids [M, T] or [1, T]."""
    image_emb = embed_images(model, images)
    text_emb = embed_texts(model, text_ids)
    return jnp.sum(image_emb * text_emb, axis=-1)


# --------------------------------------------------------------------------------------------
# Host-side helpers: jitted, chunked, numpy out


@nnx.jit
def _embed_images_jit(model: Reranker, images: jax.Array) -> jax.Array:
    return embed_images(model, images)


@nnx.jit
def _embed_texts_jit(model: Reranker, text_ids: jax.Array) -> jax.Array:
    return embed_texts(model, text_ids)


def _chunked(fn, model: Reranker, rows: np.ndarray, chunk: int) -> np.ndarray:
    """`fn(model, rows)` in chunks of `chunk` rows, the last one padded (one compile)."""
    rows = np.asarray(rows)
    outputs = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        count = len(part)
        if count < chunk and len(rows) > chunk:
            part = np.concatenate([part, np.repeat(part[-1:], chunk - count, axis=0)])
        outputs.append(np.asarray(fn(model, jnp.asarray(part)))[:count])
    return np.concatenate(outputs) if outputs else np.zeros((0, model.config.embed_dim), np.float32)


def image_embeddings(model: Reranker, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """`embed_images`, jitted and in chunks: uint8 [N, H, W, 3] -> float32 [N, E] (numpy)."""
    return _chunked(_embed_images_jit, model, images, chunk)


def text_embeddings(model: Reranker, text_ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """`embed_texts`, jitted and in chunks: int32 [N, T] -> float32 [N, E] (numpy)."""
    return _chunked(_embed_texts_jit, model, np.asarray(text_ids, np.int32), chunk)


def score(model: Reranker, images: np.ndarray, text_ids: np.ndarray) -> np.ndarray:
    """How well each image fits its text: cosine similarity, float32 [M] in [-1, 1].

    images: uint8 [M, S, S, 3]; text_ids: int32 [M, T] (one caption per image) or [1, T] (one
    prompt for all M). Higher is better. This is the `score` hook of `sample --rerank`.
    """
    images = np.asarray(images)
    text_ids = np.asarray(text_ids)
    if text_ids.ndim != 2 or text_ids.shape[0] not in (1, len(images)):
        raise UserError(
            f"score needs text ids [M, T] or [1, T] for {len(images)} images, got "
            f"shape {list(text_ids.shape)}"
        )
    image_emb = image_embeddings(model, images)
    text_emb = text_embeddings(model, text_ids)
    return np.sum(image_emb * text_emb, axis=-1).astype(np.float32)


def rerank(model: Reranker, images: np.ndarray, text_ids_of_prompt: np.ndarray, keep: int):
    """Indices int64 [keep] of the `keep` images that best fit one prompt, best first.

    images: uint8 [M, S, S, 3]; text_ids_of_prompt: int32 [T] or [1, T]. Ties keep the draw
    order (a stable sort), so the result is deterministic.
    """
    if not 1 <= keep <= len(images):
        raise UserError(f"cannot keep {keep} of {len(images)} candidates; keep 1..{len(images)}")
    prompt = np.asarray(text_ids_of_prompt).reshape(1, -1)
    scores = score(model, images, prompt)
    return np.argsort(-scores, kind="stable")[:keep].astype(np.int64)


def _caption_keys(captions: Sequence[str] | np.ndarray) -> list:
    if isinstance(captions, np.ndarray) and captions.ndim == 2:
        return [tuple(row.tolist()) for row in captions]  # text ids: one row per caption
    return [str(c) for c in captions]


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: Sequence[str] | np.ndarray | None = None,
) -> dict[str, float]:
    """Image -> text retrieval among the N given captions; caption i belongs to image i.

    image_emb, text_emb: float [N, E]. For each image the captions are ranked by similarity
    (ties: the lower index first, so a duplicate caption listed earlier wins the tie);
    `top1`/`top5` are the fractions of images whose own caption (by index) is first / in the
    first five. With `captions` (strings, or text ids int [N, T]) also `top1_text`/`top5_text`:
    right when a caption of the same text as the true one is there. Where many captions are
    identical (shapes_world's "a red circle" fits many images and is written for several),
    picking the twin is as right as picking the original, which the index measure calls wrong.
    Also `text_to_image_top1` (caption -> image, by index).
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    count = len(image_emb)
    if len(text_emb) != count or count == 0:
        raise ValueError(f"need as many captions as images (> 0), got {count} and {len(text_emb)}")
    similarity = image_emb @ text_emb.T  # [N images, N captions]
    ranked = np.argsort(-similarity, axis=1, kind="stable")  # caption indices, best first
    own = np.arange(count)
    k = min(5, count)
    metrics = {
        "top1": float(np.mean(ranked[:, 0] == own)),
        "top5": float(np.mean(np.any(ranked[:, :k] == own[:, None], axis=1))),
        "text_to_image_top1": float(
            np.mean(np.argsort(-similarity, axis=0, kind="stable")[0] == own)
        ),
    }
    if captions is not None:
        keys = _caption_keys(captions)
        if len(keys) != count:
            raise ValueError(f"need {count} captions, got {len(keys)}")
        numbering: dict = {}
        key_ids = np.asarray([numbering.setdefault(key, len(numbering)) for key in keys])
        same_text = key_ids[ranked] == key_ids[:, None]  # [N, N]: ranked caption has own text
        metrics["top1_text"] = float(np.mean(same_text[:, 0]))
        metrics["top5_text"] = float(np.mean(np.any(same_text[:, :k], axis=1)))
    return metrics


def r_precision(
    model: Reranker,
    images: np.ndarray,
    true_caption_ids: np.ndarray,
    distractor_ids: np.ndarray,
    k: int = 100,
    *,
    seed: int = 0,
) -> float:
    """Contrastive R-precision: the fraction of images whose true caption scores above k-1
    distractors drawn for it.

    images: uint8 [N, S, S, 3]; true_caption_ids: int32 [N, T], caption i of image i;
    distractor_ids: int32 [P, T], a pool of other captions; for each image k-1 of them are drawn
    without replacement (seeded), skipping those whose ids equal its true caption's. A tie with
    a distractor counts as a miss.
    """
    images = np.asarray(images)
    true_caption_ids = np.asarray(true_caption_ids, np.int32)
    distractor_ids = np.asarray(distractor_ids, np.int32)
    if len(true_caption_ids) != len(images):
        raise ValueError(f"{len(images)} images but {len(true_caption_ids)} true captions")
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    image_emb = image_embeddings(model, images)
    true_emb = text_embeddings(model, true_caption_ids)
    pool_emb = text_embeddings(model, distractor_ids)
    rng = np.random.default_rng(seed)
    hits = []
    for i in range(len(images)):
        same = _same_ids(distractor_ids, true_caption_ids[i])
        eligible = np.flatnonzero(~same)
        if len(eligible) < k - 1:
            raise UserError(
                f"r-precision at k={k} needs {k - 1} distractors per image, but only "
                f"{len(eligible)} captions of the pool differ from image {i}'s; use a bigger pool"
            )
        chosen = rng.choice(eligible, size=k - 1, replace=False)
        true_score = float(image_emb[i] @ true_emb[i])
        best_distractor = float(np.max(pool_emb[chosen] @ image_emb[i]))
        hits.append(true_score > best_distractor)
    return float(np.mean(hits)) if hits else float("nan")


def _same_ids(pool: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool [P]: which rows of `pool` int [P, T1] are the caption `ids` int [T2] (padding aside)."""
    length = max(pool.shape[1], len(ids))
    pool = np.pad(pool, ((0, 0), (0, length - pool.shape[1])), constant_values=PAD_ID)
    ids = np.pad(ids, (0, length - len(ids)), constant_values=PAD_ID)
    return np.all(pool == ids[None], axis=1)
