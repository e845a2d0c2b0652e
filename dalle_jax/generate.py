"""Prompts in, images out: the library behind the `sample` command (and later `evaluate`).

    images = generate_images(bundle, ["a red circle"], num_images=4, seed=0)
    images[0][3]   # uint8 [H, W, 3]: the 4th image of the first prompt

`bundle` is anything with the fields of `dalle_jax.bundle.Bundle` this module reads:
`transformer` (DalleTransformer), `vqvae` (vqvae VQVAE), `tokenizer` (TextTokenizer),
`reranker` (a `Reranker` or None) and `sampling` (the bundle's default settings, a dict).

Every image is drawn with its own key, `fold_in(key(seed), g)`, where g is its global index
(prompt p, image k: g = p * M + k, M images drawn per prompt). Images are sampled in batches of a
fixed size (the last one padded, so one program compiles), and the sampler draws each row from
its own key only, so the same seed, settings and bundle give the same images whatever the batch
size.

Reranking: with `rerank=M` the sampler draws M candidates per prompt, the bundle's reranker
scores each against its prompt, and the N best (highest score first) are kept. A bundle can make
reranking its default: `"rerank_per_image": K` in its sampling dict (bundle.json) means
`rerank=None` draws K * N candidates per prompt (`default_rerank`), when the bundle has a
reranker; `rerank=0` turns reranking off. The key is not a `SamplingSettings` field (those say
how tokens are drawn and key the compiled sampler): `resolve_settings` leaves it out.

The transformer can help pick: with `likelihood_weight` w > 0 (a bundle's default:
`"rerank_likelihood_weight"` in its sampling dict) the candidates of a prompt are ranked by
`z(reranker score) + w * z(log p(ids of the image | prompt))`, each standardised over that
prompt's candidates (so w does not depend on either score's scale). The log-likelihood is the
transformer's own, teacher-forced without guidance, on the ids the vqvae reads back from the
decoded image rather than on the ids drawn: the drawn ids are likely under the model by
construction, wrong shape or not, while a malformed image reads back as ids the model finds
unlikely (on the shapes bundle the drawn ids lowered the judge, the read-back ones raised it:
model card). It costs one vqvae encode and one forward pass per candidate, little beside
drawing it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.errors import UserError
from dalle_jax.sampling import (
    RERANK_KEYS,
    RERANK_LIKELIHOOD_WEIGHT,
    RERANK_PER_IMAGE,
    SamplingSettings,
    check_rerank_likelihood_weight,
    check_rerank_per_image,
    jit_sampler,
)

_log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1


@runtime_checkable
class Reranker(Protocol):
    """What `generate_images(rerank=M)` needs of `bundle.reranker`."""

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """images: uint8 [M, H, W, 3]; prompts: M strings (image i's prompt is prompts[i]).
        Returns float [M]: how well each image matches its prompt (higher is better)."""
        ...


def score(reranker: Reranker, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """The reranking hook: `reranker.score(images, prompts)`, checked to be float [M]."""
    scores = np.asarray(reranker.score(images, prompts), dtype=np.float64)
    if scores.shape != (len(images),):
        raise ValueError(
            f"reranker returned scores of shape {scores.shape} for {len(images)} images"
        )
    return scores


def resolve_settings(
    bundle_sampling: dict[str, Any] | None,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
) -> SamplingSettings:
    """The bundle's default settings with the given ones on top. None = the bundle's value;
    top_k 0 and top_p 1 turn that filter off (whatever the bundle says)."""
    given = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "cfg_scale": cfg_scale,
    }
    # Reranking is about which drawn images are kept, not how tokens are drawn.
    token_settings = {k: v for k, v in (bundle_sampling or {}).items() if k not in RERANK_KEYS}
    base = SamplingSettings.from_dict(token_settings)
    return base.replace(**{k: v for k, v in given.items() if v is not None})


def default_rerank(bundle: Any, num_images: int) -> int | None:
    """The bundle's default candidates per prompt: K * num_images when its sampling dict sets
    `rerank_per_image` K > 1 and it has a reranker, else None (no reranking)."""
    path = getattr(bundle, "path", None)
    where = str(Path(path) / "bundle.json") if path is not None else "bundle"
    per_image = check_rerank_per_image((bundle.sampling or {}).get(RERANK_PER_IMAGE), where)
    if per_image <= 1 or bundle.reranker is None:
        return None
    return per_image * num_images


def resolve_likelihood_weight(bundle: Any, likelihood_weight: float | None) -> float:
    """The weight of the transformer's log-likelihood in reranking: the given one, else the
    bundle's `rerank_likelihood_weight` (absent: 0). UserError when negative or not finite."""
    if likelihood_weight is not None:
        return check_rerank_likelihood_weight(likelihood_weight, "likelihood_weight")
    path = getattr(bundle, "path", None)
    where = str(Path(path) / "bundle.json") if path is not None else "bundle"
    return check_rerank_likelihood_weight(
        (bundle.sampling or {}).get(RERANK_LIKELIHOOD_WEIGHT), where
    )


def standardized(scores: np.ndarray) -> np.ndarray:
    """scores float [M] -> (scores - mean) / std; all zeros when they are all equal."""
    scores = np.asarray(scores, np.float64)
    spread = scores.std()
    return np.zeros_like(scores) if spread == 0 else (scores - scores.mean()) / spread


def rerank_scores(
    reranker_scores: np.ndarray, log_likelihoods: np.ndarray | None, likelihood_weight: float
) -> np.ndarray:
    """The ranking score of one prompt's M candidates: the reranker's scores float [M], plus
    (w > 0) w times the standardised log-likelihoods float [M], on the standardised scores."""
    if likelihood_weight == 0 or log_likelihoods is None:
        return np.asarray(reranker_scores, np.float64)
    return standardized(reranker_scores) + likelihood_weight * standardized(log_likelihoods)


@functools.lru_cache(maxsize=4)
def compiled_token_nll(graphdef: nnx.GraphDef) -> Callable:
    """`fn(state, text_ids int32 [B, T], image_ids int32 [B, N]) -> (text_nll float32 [B],
    image_nll float32 [B])`: each example's summed nats, no dropout, captions as given (also
    evaluation's loss pass)."""
    from dalle_jax.model.loss import cross_entropy  # noqa: PLC0415

    @jax.jit
    def run(state, text_ids, image_ids):
        text_logits, image_logits = nnx.merge(graphdef, state)(text_ids, image_ids)
        return (
            jnp.sum(cross_entropy(text_logits, text_ids), axis=1),
            jnp.sum(cross_entropy(image_logits, image_ids), axis=1),
        )

    return run


def image_log_likelihood(
    transformer: nnx.Module, text_ids: np.ndarray, image_ids: np.ndarray, batch_size: int
) -> np.ndarray:
    """log p(image ids | text) under `transformer`, teacher-forced, no guidance: text_ids int32
    [n, T], image_ids int32 [n, N] -> float64 [n] (nats), in batches of `batch_size` rows
    (the last one padded: one compile)."""
    graphdef, state = nnx.split(transformer)
    run = compiled_token_nll(graphdef)
    out = []
    for start in range(0, len(text_ids), batch_size):
        index = np.minimum(np.arange(start, start + batch_size), len(text_ids) - 1)
        _, image_nll = run(state, jnp.asarray(text_ids[index]), jnp.asarray(image_ids[index]))
        out.append(-np.asarray(image_nll, np.float64)[: len(text_ids) - start])
    return np.concatenate(out)


def resolve_rerank(bundle: Any, num_images: int, rerank: int | None) -> int | None:
    """What `generate_images(rerank=...)` does: the candidates drawn per prompt, or None when
    nothing is reranked. rerank None: the bundle's default (`default_rerank`); 0: off; M: M
    (UserError when the bundle has no reranker, or for M < num_images)."""
    if rerank is None:
        return default_rerank(bundle, num_images)
    _check_rerank(num_images, rerank)
    if rerank == 0:
        return None
    if bundle.reranker is None:
        raise UserError(
            "this bundle has no reranker; sample without rerank (0), or add one to the bundle "
            "(dalle_jax.bundle.add_reranker)"
        )
    return rerank


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Raises UserError for no prompts or an empty one; returns the prompts, stripped."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not prompts:
        raise UserError("no prompts given; pass one or more text prompts")
    stripped = [str(p).strip() for p in prompts]
    for number, prompt in enumerate(stripped, start=1):
        if not prompt:
            raise UserError(f"prompt {number} is empty; give every prompt some text")
    return stripped


@contextlib.contextmanager
def _quiet_tokenizer() -> Iterator[None]:
    # The tokenizer's own truncation warning speaks of training captions; `encode_prompts`
    # warns in terms of prompts instead.
    tokenizer_log = logging.getLogger("dalle_jax.tokenizer")
    previous = tokenizer_log.disabled
    tokenizer_log.disabled = True
    try:
        yield
    finally:
        tokenizer_log.disabled = previous


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    text_length: int,
    *,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Prompts -> int32 [P, text_length]. Prompts longer than the model reads are cut at the end,
    with one warning (through `warn`, default the logger) for all of them."""
    prompts = check_prompts(prompts)
    lengths = tokenizer.count_tokens(prompts)
    too_long = [i for i, n in enumerate(lengths) if n > text_length]
    if too_long:
        first = too_long[0]
        shown = prompts[first] if len(prompts[first]) <= 60 else prompts[first][:57] + "..."
        message = (
            f"{len(too_long)} prompt(s) longer than the {text_length} tokens this model reads "
            f"were cut (e.g. {shown!r}: {int(lengths[first])} tokens); shorten them to keep "
            "every word"
        )
        (warn or _log.warning)(message)
    with _quiet_tokenizer():
        return np.asarray(tokenizer.encode(prompts, text_length), dtype=np.int32)


def check_counts(num_images: int, rerank: int | None, batch_size: int, seed: int) -> None:
    """UserError for numbers out of range. rerank: None (the bundle's default), 0 (off) or the
    candidates per prompt (at least num_images)."""
    if num_images < 1:
        raise UserError(f"number of images must be at least 1, got {num_images}")
    _check_rerank(num_images, rerank)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed must be in [0, {MAX_SEED}], got {seed}")


def _check_rerank(num_images: int, rerank: int | None) -> None:
    if rerank is not None and rerank < 0:
        raise UserError(
            f"rerank {rerank} is negative; pass 0 for no reranking or at least {num_images} "
            "candidates per prompt"
        )
    if rerank and rerank < num_images:
        raise UserError(
            f"rerank {rerank} is fewer candidates than the {num_images} images to keep; "
            f"pass a rerank of at least {num_images} (or 0 for no reranking)"
        )


def _check_bundle(bundle: Any) -> None:
    config = bundle.transformer.config
    grid = bundle.vqvae.config.grid_size
    if (config.image_rows, config.image_cols) != (grid, grid):
        raise UserError(
            f"bundle mismatch: the transformer draws {config.image_rows}x{config.image_cols} "
            f"image ids but the vqvae decodes {grid}x{grid}; re-export the bundle"
        )


# Rows per vqvae call in `generate_images`, whatever its sampling batch size. XLA picks kernels
# by shape, and kernels of another batch size round differently in the last bit: enough to move
# a decoded pixel across a rounding boundary of its 8-bit value (seen on a Xeon: 1 level, a few
# pixels per image). Decoding every image in chunks of one shape keeps the same seed's images
# byte-identical whatever `batch_size` is.
VQVAE_CHUNK = 8


def _in_chunks(fn: Callable[[jax.Array], jax.Array]) -> Callable[[np.ndarray], np.ndarray]:
    """`fn` over rows [B, ...] in calls of exactly `VQVAE_CHUNK` rows (the last one padded with
    copies of the last row, which are dropped); returns numpy [B, ...]."""

    def run(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = []
        for start in range(0, len(rows), VQVAE_CHUNK):
            index = np.minimum(np.arange(start, start + VQVAE_CHUNK), len(rows) - 1)
            out.append(np.asarray(fn(jnp.asarray(rows[index])))[: len(rows) - start])
        return np.concatenate(out)

    return run


def _decoder(vqvae_model: nnx.Module) -> Callable[[np.ndarray], np.ndarray]:
    """`ids int32 [B, h, w] -> images uint8 [B, H, W, 3]` for the bundle's vqvae, compiled
    for `VQVAE_CHUNK` rows."""
    from vqvae.compiled import compiled_decode  # noqa: PLC0415 - the leaf package, with the model

    graphdef, state = nnx.split(vqvae_model)
    return _in_chunks(functools.partial(compiled_decode(graphdef), state))


def _encoder(vqvae_model: nnx.Module) -> Callable[[np.ndarray], np.ndarray]:
    """`images uint8 [B, H, W, 3] -> ids int32 [B, h, w]` for the bundle's vqvae, compiled
    for `VQVAE_CHUNK` rows."""
    from vqvae.compiled import compiled_encode  # noqa: PLC0415 - the leaf package, with the model

    graphdef, state = nnx.split(vqvae_model)
    return _in_chunks(functools.partial(compiled_encode(graphdef), state))


def generate_images(
    bundle: Any,
    prompts: Sequence[str],
    *,
    num_images: int = 4,
    seed: int = 0,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    batch_size: int = 8,
    rerank: int | None = None,
    likelihood_weight: float | None = None,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> list[list[np.ndarray]]:
    """Draws `num_images` images for each prompt.

    prompts: P non-empty strings (UserError otherwise; too long ones are cut, with one warning
    through `warn`). Sampling settings: None takes the bundle's default (`resolve_settings`).
    batch_size: images sampled per compiled call. rerank: M draws M candidates per prompt and
    keeps the `num_images` the bundle's reranker scores best (UserError without a reranker);
    0 turns reranking off; None (default) is the bundle's default (`default_rerank`: K *
    num_images candidates when its sampling dict sets `rerank_per_image` K and it has a
    reranker, else none). likelihood_weight: how much the transformer's log-likelihood of a
    candidate counts in reranking (None: the bundle's `rerank_likelihood_weight`, absent = 0;
    see the module docstring). progress: a bar over batches (on a terminal only).
    Returns P lists of `num_images` uint8 [H, W, 3] images (reranked: best first).
    """
    check_counts(num_images, rerank, batch_size, seed)
    settings = resolve_settings(
        bundle.sampling, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale
    )
    rerank = resolve_rerank(bundle, num_images, rerank)
    likelihood_weight = resolve_likelihood_weight(bundle, likelihood_weight)
    _check_bundle(bundle)
    config = bundle.transformer.config
    text_ids = encode_prompts(bundle.tokenizer, prompts, config.text_length, warn=warn)
    prompts = check_prompts(prompts)

    per_prompt = rerank or num_images
    total = len(prompts) * per_prompt
    batch = min(batch_size, total)
    num_batches = math.ceil(total / batch)
    sampler = jit_sampler(bundle.transformer, settings)
    decode, encode = _decoder(bundle.vqvae), _encoder(bundle.vqvae)
    base_key = jax.random.key(seed)

    images, drawn_ids = [], []
    with _progress_bar(num_batches, progress) as bar:
        for start in range(0, num_batches * batch, batch):
            # Rows past `total` pad the last batch to the compiled shape; they are dropped.
            index = np.arange(start, start + batch)
            rows = text_ids[np.minimum(index, total - 1) // per_prompt]
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, jnp.asarray(index))
            ids = sampler(jnp.asarray(rows), keys)
            ids = np.asarray(ids).reshape(batch, config.image_rows, config.image_cols)
            decoded = decode(ids[: total - start])
            images.append(decoded)
            if likelihood_weight > 0 and rerank is not None:
                # The image as rendered, read back by the vqvae: see `rendered_ids`.
                drawn_ids.append(encode(decoded))
            bar.update()
    candidates = np.concatenate(images).reshape(len(prompts), per_prompt, *images[0].shape[1:])

    log_likelihoods = None
    if rerank is not None and likelihood_weight > 0:
        log_likelihoods = image_log_likelihood(
            bundle.transformer,
            np.repeat(text_ids, per_prompt, axis=0),
            np.concatenate(drawn_ids).reshape(total, -1),
            batch,
        ).reshape(len(prompts), per_prompt)
    results = []
    for p, (prompt, drawn) in enumerate(zip(prompts, candidates, strict=True)):
        if rerank is not None:
            ranking = rerank_scores(
                score(bundle.reranker, drawn, [prompt] * len(drawn)),
                None if log_likelihoods is None else log_likelihoods[p],
                likelihood_weight,
            )
            order = np.argsort(-ranking, kind="stable")
            drawn = drawn[order[:num_images]]
        results.append(list(drawn))
    return results


class _NoBar:
    def update(self, steps: int = 1) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield _NoBar()
        return
    from dalle_jax.progress import Progress  # noqa: PLC0415 - tqdm only when asked for

    with Progress(total=total, desc="sampling batches") as bar:
        yield bar


__all__ = [
    "RERANK_LIKELIHOOD_WEIGHT",
    "RERANK_PER_IMAGE",
    "Reranker",
    "check_counts",
    "check_prompts",
    "check_rerank_per_image",
    "compiled_token_nll",
    "default_rerank",
    "encode_prompts",
    "generate_images",
    "image_log_likelihood",
    "rerank_scores",
    "resolve_likelihood_weight",
    "resolve_rerank",
    "resolve_settings",
    "score",
]
