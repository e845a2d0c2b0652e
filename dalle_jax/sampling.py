"""The pure sampler: text ids in, image ids out, one compiled program per shape.

DESIGN.md convention 7. The core, `sample`, knows nothing about the transformer: it drives two
functions over an opaque decoding state (for the transformer, a preallocated KV cache):

    prefill(text_ids int32 [B', T]) -> (logits float32 [B', V] of image id 0, state)
    step(image_id int32 [B'], index int32 [], state)
        -> (logits float32 [B', V] of image id index+1, state)

and runs `step` N-1 times inside `lax.scan`, so nothing is retraced per token and the state
never leaves the device. Optionally the N-1 steps run as a few consecutive scans (`segments`),
with `grow(state, last_index) -> state` called before each: the transformer grows its KV cache
there to the last position that stretch writes, so attention reads less of the cache that is
not written yet (reading the cache is the per-token cost that grows with batch and length).
Each token is chosen from the logits by a pure pipeline:

    classifier-free guidance   logits = uncond + C * (cond - uncond)   (C = cfg_scale)
    temperature                logits / temperature                    (0 = greedy argmax)
    filtering                  top-k, then top-p (nucleus): others get -inf
    draw                       inverse-CDF: the first token whose cumulative probability
                               reaches the row's uniform number for this position

With guidance (C != 1) the conditional and the unconditional pass (the empty caption: every text
id is the pad id) run together as one batch of 2B rows, [cond; uncond]; at C = 1 the mixture is
the conditional logits, so the unconditional half is not run at all.

Randomness is per row: `keys` holds one key per batch row; row b's N uniform numbers (one per
image position) come from `keys[b]` alone and are drawn before the loop. A row's image therefore
depends only on its own key and caption, never on the batch it was sampled in
(`dalle_jax.generate` relies on that).

`generate_image_ids` runs the core on the transformer's KV cache; `generate_image_ids_naive` on a
full teacher-forced forward per token (no cache), the baseline the benchmark and tests compare to.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.errors import UserError

PrefillFn = Callable[[jax.Array], tuple[jax.Array, Any]]
StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
GrowFn = Callable[[Any, int], Any]


# ---- settings -------------------------------------------------------------------------------
# A bundle's sampling dict may also make reranking the default: K candidates drawn per image
# kept. It is not a SamplingSettings field: it decides how many images are drawn, not how each
# token is, and so must not key the compiled sampler.
RERANK_PER_IMAGE = "rerank_per_image"


def check_rerank_per_image(value: Any, where: str = "bundle") -> int:
    """A bundle's `rerank_per_image` (None = absent) -> K, an int >= 1 (1 = no reranking).
    Anything else (0, "x", 2.5, true) is a one-line UserError naming `where` and the key."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise UserError(
            f"{where}: sampling {RERANK_PER_IMAGE!r} must be a whole number >= 1 (candidates "
            f"drawn per image kept; 1 = no reranking), got {value!r}; fix it in bundle.json or "
            "export again with `train export --rerank-per-image K`"
        )
    return int(value)


# Also not a SamplingSettings field: how much the transformer's own log-likelihood of each
# candidate counts beside the reranker's score when candidates are reranked (0 = not at all).
RERANK_LIKELIHOOD_WEIGHT = "rerank_likelihood_weight"
# The sampling-dict keys that are about reranking, not about drawing tokens.
RERANK_KEYS = (RERANK_PER_IMAGE, RERANK_LIKELIHOOD_WEIGHT)


def check_rerank_likelihood_weight(value: Any, where: str = "bundle") -> float:
    """A bundle's `rerank_likelihood_weight` (None = absent) -> w, a finite float >= 0 (0: the
    reranker alone). Anything else is a one-line UserError naming `where` and the key."""
    if value is None:
        return 0.0
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.integer | np.floating)
        or not np.isfinite(value)
        or value < 0
    ):
        raise UserError(
            f"{where}: sampling {RERANK_LIKELIHOOD_WEIGHT!r} must be a number >= 0 (0 = rerank "
            f"by the reranker alone), got {value!r}; fix it in bundle.json or export again with "
            "`train export --rerank-likelihood-weight W`"
        )
    return float(value)


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn. `top_k` None/0 and `top_p` None/1.0 mean "no filtering";
    `temperature` 0 means greedy (argmax); `cfg_scale` 1 means no guidance."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        # One spelling for "off", so equal settings compile to the same program.
        if self.top_k is not None:
            object.__setattr__(self, "top_k", int(self.top_k) or None)
        if self.top_p is not None and float(self.top_p) >= 1.0:
            object.__setattr__(self, "top_p", None)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "cfg_scale", float(self.cfg_scale))
        if self.top_p is not None:
            object.__setattr__(self, "top_p", float(self.top_p))
        self.validate()

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}; "
                "try 1.0 or the bundle's default"
            )
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise UserError(
                f"cfg-scale must be >= 0 (1 = no guidance), got {self.cfg_scale}; try 1 to 5"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SamplingSettings:
        """From a bundle's `sampling` dict: unknown keys are an error, missing ones default."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"sampling settings: unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> SamplingSettings:
        return dataclasses.replace(self, **changes)


# ---- the token-choosing pipeline (pure) -------------------------------------------------------
def guide(cond_logits: jax.Array, uncond_logits: jax.Array, cfg_scale: float) -> jax.Array:
    """Classifier-free guidance: `uncond + cfg_scale * (cond - uncond)`, float32 [B, V]."""
    return uncond_logits + cfg_scale * (cond_logits - uncond_logits)


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (for every non-NaN value, infinities included)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    # Negative floats order backwards by their bits: flip them all; positives go above them.
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_passing(ordered: jax.Array, passes: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Per row, the largest threshold t (in `_ordered_bits` units) with `passes(t)` true.

    ordered: uint32 [B, V]; passes: uint32 [B, 1] -> bool [B, 1], true at the row minimum and
    monotone (true below some t*, false above). 32 bisection steps pin t* exactly. Returns
    uint32 [B, 1].

    Why not `lax.top_k` / `sort`: on CPU they take 50-60 ms for [32, 8192] logits, per token;
    32 fused compare-and-reduce passes take a few ms.
    """
    low = jnp.min(ordered, axis=-1, keepdims=True)
    high = jnp.max(ordered, axis=-1, keepdims=True)

    def bisect(_, bounds):
        low, high = bounds
        gap = high - low
        middle = low + gap // 2 + (gap & 1)  # ceil((low + high) / 2), no uint32 overflow
        ok = passes(middle)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle - 1)

    low, _ = jax.lax.fori_loop(0, 32, bisect, (low, high))
    return low


def filter_logits(
    logits: jax.Array, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf.

    logits: float [B, V]. top_k: keep the k largest per row (ties with the k-th value are kept
    too); None or 0 = off. top_p: keep the smallest set of largest-probability tokens whose
    softmax mass reaches top_p (the top token always stays; ties at the edge are kept);
    None or >= 1 = off. top-k is applied first, and top-p measures mass on what top-k left.
    Returns float [B, V]. Both find their threshold by bisection (`_largest_passing`).
    """
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k and top_k < logits.shape[-1]:
        ordered = _ordered_bits(logits)

        def at_least_k_kept(t):
            return jnp.sum(ordered >= t, axis=-1, keepdims=True) >= top_k

        logits = jnp.where(ordered >= _largest_passing(ordered, at_least_k_kept), logits, neg_inf)
    if top_p is not None and top_p < 1.0:
        ordered = _ordered_bits(logits)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        def mass_reached(t):
            return jnp.sum(jnp.where(ordered >= t, probs, 0.0), axis=-1, keepdims=True) >= top_p

        logits = jnp.where(ordered >= _largest_passing(ordered, mass_reached), logits, neg_inf)
    return logits


def draw_from_logits(logits: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Inverse-CDF sampling: one token per row of softmax(logits).

    logits: float32 [B, V] (-inf = never drawn); uniforms: float32 [B] in (0, 1]. Token b is the
    first index whose cumulative probability reaches uniforms[b]; a token of zero probability is
    never the first (the target is > 0). Returns int32 [B].

    One uniform per row instead of V Gumbel draws: the random numbers for a whole image are
    drawn before the decoding loop, so the loop itself generates none (on CPU, per-token
    threefry over [32, 8192] costs ~4 ms against < 1 ms for this).
    """
    logits = logits.astype(jnp.float32)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cdf = jnp.cumsum(weights, axis=-1)
    target = uniforms[:, None].astype(jnp.float32) * cdf[:, -1:]
    return jnp.sum(cdf < target, axis=-1).astype(jnp.int32)


def choose_tokens(
    logits: jax.Array,
    uniforms: jax.Array,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> jax.Array:
    """One token per row. logits: float32 [B, V]; uniforms: float32 [B] in (0, 1].

    temperature 0: the argmax (uniforms unused). Otherwise a draw from
    `softmax(filter_logits(logits / temperature))` (`draw_from_logits`). Returns int32 [B].
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return draw_from_logits(logits, uniforms)


def draw_uniforms(keys: jax.Array, num_tokens: int) -> jax.Array:
    """float32 [B, num_tokens] in (0, 1]: row b from keys[b] alone, column i for image id i."""
    return jax.vmap(lambda key: 1.0 - jax.random.uniform(key, (num_tokens,)))(keys)


def row_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """`key` as one key per row: a single key is split into `batch_size`; a [B] array is kept."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == 0 or (not typed and key.ndim == 1):
        return jax.random.split(key, batch_size)
    if key.shape[0] != batch_size:
        raise ValueError(f"got {key.shape[0]} keys for a batch of {batch_size} rows")
    return key


# ---- the core --------------------------------------------------------------------------------
def sample(
    prefill: PrefillFn,
    step: StepFn,
    text_ids: jax.Array,
    keys: jax.Array,
    *,
    num_tokens: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    segments: int = 1,
    grow: GrowFn | None = None,
) -> jax.Array:
    """Draws `num_tokens` image ids per caption; see the module docstring for `prefill`/`step`.

    text_ids: int32 [B, T]; keys: a key or [B] keys (one per row). With guidance (cfg_scale != 1)
    `prefill` and `step` see 2B rows: the B captions, then B empty captions (all `pad_id`).
    segments: the num_tokens-1 steps run as this many scans of consecutive step indices
    (`segment_bounds`); before the one ending at index `last`, `grow(state, last)` resizes the
    state (None: left as it is). Settings are static (Python numbers).
    Returns int32 [B, num_tokens].
    """
    settings = SamplingSettings(temperature, top_k, top_p, cfg_scale)
    batch = text_ids.shape[0]
    keys = row_keys(keys, batch)
    guided = settings.cfg_scale != 1.0
    if guided:
        empty = jnp.full_like(text_ids, pad_id)
        text_ids = jnp.concatenate([text_ids, empty], axis=0)

    def choose(logits: jax.Array, uniforms: jax.Array) -> jax.Array:
        if guided:
            logits = guide(logits[:batch], logits[batch:], settings.cfg_scale)
        return choose_tokens(
            logits,
            uniforms,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
        )

    def feed(tokens: jax.Array) -> jax.Array:
        return jnp.concatenate([tokens, tokens]) if guided else tokens

    uniforms = draw_uniforms(keys, num_tokens)  # [B, N]: all the randomness, drawn up front
    logits, state = prefill(text_ids)
    first = choose(logits, uniforms[:, 0])

    def body(carry, inputs):
        tokens, state = carry
        index, step_uniforms = inputs
        logits, state = step(feed(tokens), index, state)
        next_tokens = choose(logits, step_uniforms)
        return (next_tokens, state), next_tokens

    tokens, drawn = first, [first[:, None]]
    for begin, stop in segment_bounds(num_tokens - 1, segments):
        if grow is not None:
            state = grow(state, stop - 1)
        indices = jnp.arange(begin, stop, dtype=jnp.int32)
        step_uniforms = uniforms[:, 1 + begin : 1 + stop].T  # [steps, B]: step i draws id i+1
        (tokens, state), rest = jax.lax.scan(body, (tokens, state), (indices, step_uniforms))
        drawn.append(rest.T)
    return jnp.concatenate(drawn, axis=1)


def segment_bounds(num_steps: int, segments: int) -> list[tuple[int, int]]:
    """Step indices 0..num_steps-1 cut into at most `segments` runs of near-equal length:
    [(begin, stop), ...], consecutive, longer runs first, none empty."""
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    count = min(segments, num_steps)
    bounds, begin = [], 0
    for i in range(count):
        stop = begin + num_steps // count + (1 if i < num_steps % count else 0)
        bounds.append((begin, stop))
        begin = stop
    return bounds


# ---- the transformer, cached and naive -------------------------------------------------------
def generate_image_ids(
    model: nnx.Module,
    text_ids: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    num_tokens: int | None = None,
    segments: int | None = None,
) -> jax.Array:
    """Samples image ids from a `DalleTransformer` on its preallocated KV cache.

    text_ids: int32 [B, T]; key: one key, or [B] keys (one per row, see the module docstring).
    num_tokens: how many ids to draw (default all N = image_rows * image_cols; fewer only for
    benchmarks). segments: decoding runs as this many scans (default `decode_segments`); the
    cache starts with room for the caption only and grows before each scan to the positions
    it writes. Jittable with the settings static: `jit_sampler` does that. Returns int32 [B, n].
    """
    config = model.config

    def prefill(ids):
        cache = model.init_cache(ids.shape[0], length=config.text_length + 1)
        return model.prefill(ids, cache)

    def grow(cache, last_index):
        return cache.grown_to(model.cache_length(last_index))

    return sample(
        prefill,
        model.decode_step,
        jnp.asarray(text_ids, jnp.int32),
        key,
        num_tokens=num_tokens or config.image_length,
        pad_id=config.text_pad_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cfg_scale=cfg_scale,
        segments=segments or decode_segments(config),
        grow=grow,
    )


def decode_segments(config) -> int:
    """How many scans the cached sampler splits decoding into for a model `config`.

    Each scan attends over a cache only as long as the positions written by its end, so more
    scans read less of the cache, but each compiles its own copy of the decoding step. Measured
    on the 2-core CPU: an 8x8 grid (ref-small, batch 8 and 32) gains nothing measurable from 2
    or 4 while each extra scan adds ~0.45 s of compile; a 16x16 grid (ref-base, batch 8) is
    ~6% faster per token with 4, where the cache is a larger share of the bytes a step reads.
    """
    return 1 if config.image_length <= 64 else 4


def generate_image_ids_naive(
    model: nnx.Module,
    text_ids: jax.Array,
    key: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    num_tokens: int | None = None,
) -> jax.Array:
    """The same draws as `generate_image_ids`, but every token re-runs the teacher-forced forward
    over the full sequence (no cache): the baseline. Same arguments and result."""
    config = model.config

    def image_logits(ids, image_ids, position):
        return jax.lax.dynamic_index_in_dim(model(ids, image_ids)[1], position, 1, keepdims=False)

    def prefill(ids):
        # Ids past the ones drawn so far never reach a position that predicts them (causal mask).
        image_ids = jnp.zeros((ids.shape[0], config.image_length), jnp.int32)
        return image_logits(ids, image_ids, 0), (ids, image_ids)

    def step(tokens, index, state):
        ids, image_ids = state
        image_ids = jax.lax.dynamic_update_index_in_dim(image_ids, tokens, index, axis=1)
        return image_logits(ids, image_ids, index + 1), (ids, image_ids)

    return sample(
        prefill,
        step,
        jnp.asarray(text_ids, jnp.int32),
        key,
        num_tokens=num_tokens or config.image_length,
        pad_id=config.text_pad_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cfg_scale=cfg_scale,
    )


def jit_sampler(
    model: nnx.Module,
    settings: SamplingSettings | None = None,
    *,
    naive: bool = False,
    num_tokens: int | None = None,
    segments: int | None = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A compiled `fn(text_ids int32 [B, T], keys) -> image ids int32 [B, n]` for `model`.

    The weights are jit arguments (not baked-in constants) and the settings are static, so each
    batch shape compiles once; models of one structure share the compiled programs. `naive`
    picks the no-cache baseline; `segments` is passed to `generate_image_ids` (cached only).
    """
    settings = settings or SamplingSettings()
    graphdef, state = nnx.split(model)
    run = _compiled_sampler(graphdef, settings, naive, num_tokens, None if naive else segments)
    return functools.partial(run, state)


@functools.lru_cache(maxsize=16)
def _compiled_sampler(
    graphdef, settings: SamplingSettings, naive: bool, num_tokens: int | None, segments: int | None
):
    options = dict(settings.to_dict(), num_tokens=num_tokens)
    if naive:
        generate = generate_image_ids_naive
    else:
        generate = functools.partial(generate_image_ids, segments=segments)

    @jax.jit
    def run(state, text_ids, keys):
        return generate(nnx.merge(graphdef, state), text_ids, keys, **options)

    return run
