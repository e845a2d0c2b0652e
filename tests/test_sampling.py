"""The pure sampler: exact tokens from fake deterministic logits, filters, guidance, and the
transformer's KV cache against its teacher-forced forward pass."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax.errors import UserError
from dalle_jax.model import DalleTransformer, get_config
from dalle_jax.sampling import (
    SamplingSettings,
    _ordered_bits,
    choose_tokens,
    draw_from_logits,
    filter_logits,
    generate_image_ids,
    generate_image_ids_naive,
    guide,
    jit_sampler,
    sample,
    segment_bounds,
)

PAD = 0
VOCAB = 11
PEAK = 10.0  # logit margin of the intended token: far beyond float noise


def peaked(targets: jax.Array) -> jax.Array:
    """float32 [B, VOCAB] logits whose argmax is targets[b], with a margin of PEAK."""
    return PEAK * jax.nn.one_hot(targets, VOCAB, dtype=jnp.float32)


def counting_model():
    """A fake `(prefill, step)`: image id 0 is `text_ids[:, 0] % V`; every next id is
    `(3 * previous + index + 1) % V`. Empty captions (all PAD) make the fake predict 0 always.
    Records the batch sizes it sees."""
    seen = []

    def prefill(text_ids):
        seen.append(text_ids)
        uncond = jnp.all(text_ids == PAD, axis=1)
        first = jnp.where(uncond, 0, text_ids[:, 0] % VOCAB)
        return peaked(first), uncond

    def step(tokens, index, uncond):
        nxt = jnp.where(uncond, 0, (3 * tokens + index + 1) % VOCAB)
        return peaked(nxt), uncond

    return prefill, step, seen


def expected_counting(first_ids, num_tokens):
    rows = []
    for token in first_ids:
        row = [int(token) % VOCAB]
        for index in range(num_tokens - 1):
            row.append((3 * row[-1] + index + 1) % VOCAB)
        rows.append(row)
    return np.asarray(rows)


def test_greedy_follows_the_fake_model_exactly():
    prefill, step, seen = counting_model()
    text = jnp.asarray([[4, 1, 1], [7, 2, 0], [15, 3, 3]], jnp.int32)
    ids = jax.jit(
        lambda t, k: sample(prefill, step, t, k, num_tokens=9, pad_id=PAD, temperature=0.0)
    )(text, jax.random.key(0))
    assert ids.dtype == jnp.int32 and ids.shape == (3, 9)
    np.testing.assert_array_equal(ids, expected_counting([4, 7, 15], 9))
    assert seen[0].shape == (3, 3)  # no guidance: the unconditional half is not run


def test_sampling_from_peaked_logits_is_the_argmax():
    # At temperature 1 a margin of 10 logits leaves ~1e-4 probability elsewhere per draw; with
    # 3 x 9 draws, a wrong token from a correct sampler would be a 1-in-300 event per seed.
    prefill, step, _ = counting_model()
    text = jnp.asarray([[4], [7], [15]], jnp.int32)
    ids = sample(prefill, step, text, jax.random.key(1), num_tokens=9, pad_id=PAD, top_k=3)
    np.testing.assert_array_equal(ids, expected_counting([4, 7, 15], 9))


def fixed_table_model(table: jax.Array):
    """A fake whose logits at image position i are table[i] for every row."""

    def prefill(text_ids):
        return jnp.broadcast_to(table[0], (text_ids.shape[0], table.shape[1])), None

    def step(tokens, index, state):
        return jnp.broadcast_to(table[index + 1], (tokens.shape[0], table.shape[1])), state

    return prefill, step


def test_top_k_never_draws_outside_the_k_largest():
    positions, vocab, k = 6, 50, 4
    table = jax.random.normal(jax.random.key(0), (positions, vocab)) * 2.0
    prefill, step = fixed_table_model(table)
    text = jnp.ones((256, 2), jnp.int32)
    ids = np.asarray(
        sample(prefill, step, text, jax.random.key(3), num_tokens=positions, pad_id=PAD, top_k=k)
    )
    allowed = np.argsort(-np.asarray(table), axis=1)[:, :k]
    for position in range(positions):
        drawn = set(ids[:, position].tolist())
        assert drawn <= set(allowed[position].tolist())
        assert len(drawn) > 1  # really sampling, not the argmax
    # And without top-k the same draws leave the k largest (so the check above can fail).
    free = np.asarray(
        sample(prefill, step, text, jax.random.key(3), num_tokens=positions, pad_id=PAD)
    )
    assert any(not set(free[:, p]) <= set(allowed[p]) for p in range(positions))


def test_filter_logits_top_k_keeps_exactly_k():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2)))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]])
    # Off: None, 0, or k >= V.
    for top_k in (None, 0, 5, 9):
        assert np.all(np.isfinite(np.asarray(filter_logits(logits, top_k=top_k))))


def test_filter_logits_top_p_keeps_the_smallest_nucleus():
    probs = np.asarray([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = jnp.asarray(np.log(probs))[None]

    def kept(p):
        return np.flatnonzero(np.isfinite(np.asarray(filter_logits(logits, top_p=p))[0])).tolist()

    assert kept(0.45) == [1]  # the top token alone has mass 0.5 >= 0.45
    assert kept(0.7) == [1, 3]  # 0.5 < 0.7 <= 0.8
    assert kept(0.9) == [1, 2, 3]  # 0.8 < 0.9 <= 0.95
    assert kept(0.99) == [0, 1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]  # off


def test_filter_logits_top_p_nucleus_property_on_random_logits():
    logits = jax.random.normal(jax.random.key(5), (64, 100)) * 3.0
    top_p = 0.8
    filtered = np.asarray(filter_logits(logits, top_p=top_p))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for row_probs, row_filtered in zip(probs, filtered, strict=True):
        kept = np.isfinite(row_filtered)
        order = np.argsort(-row_probs)
        count = kept.sum()
        assert kept[order[:count]].all()  # the kept set is the most likely tokens
        mass = row_probs[order[:count]].sum()
        assert mass >= top_p - 1e-6  # enough mass ...
        assert mass - row_probs[order[count - 1]] < top_p  # ... and no token more than needed


def test_top_k_then_top_p_both_apply():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
    # top-k 3 leaves 0.4, 0.3, 0.2 (renormalised 0.44, 0.33, 0.22); top-p 0.7 then keeps two.
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=3, top_p=0.7)))
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0]])


def test_ordered_bits_keep_the_order_of_floats():
    values = np.asarray(
        [
            -np.inf,
            -3e38,
            -2.5,
            -1.0,
            -1e-30,
            -1e-45,
            0.0,
            1e-45,
            1e-30,
            0.5,
            1.0,
            7.0,
            3e38,
            np.inf,
        ],
        np.float32,
    )
    bits = np.asarray(_ordered_bits(jnp.asarray(values))).astype(np.int64)
    assert (np.diff(bits) > 0).all()


def reference_filter(logits: np.ndarray, top_k, top_p) -> np.ndarray:
    """The textbook version: sort, cut at k, cumulative softmax mass, cut at p."""
    out = logits.astype(np.float64).copy()
    for row in out:
        if top_k:
            row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
        if top_p is not None:
            order = np.argsort(-row, kind="stable")
            probs = np.exp(row[order] - row[order[0]])
            probs /= probs.sum()
            before = np.cumsum(probs) - probs
            row[order[before >= top_p]] = -np.inf
    return out


@pytest.mark.parametrize("top_k, top_p", [(7, None), (None, 0.6), (40, 0.9), (1, None)])
def test_filter_logits_matches_a_sorting_reference(top_k, top_p):
    logits = np.array(jax.random.normal(jax.random.key(3), (16, 300)) * 2.5)
    logits[:, 5] = logits[:, 6]  # a tie somewhere
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p)))
    want = np.isfinite(reference_filter(logits, top_k, top_p))
    np.testing.assert_array_equal(got, want)


def test_draw_from_logits_follows_the_probabilities_exactly():
    probs = np.asarray([0.0, 0.1, 0.4, 0.0, 0.2, 0.3])
    logits = jnp.asarray(np.log(np.where(probs > 0, probs, 1.0)) + np.where(probs > 0, 0, -np.inf))
    count = 1000
    # A grid of uniforms instead of random ones: each token must get its share of them, +-1.
    uniforms = (jnp.arange(count, dtype=jnp.float32) + 0.5) / count
    tokens = draw_from_logits(jnp.broadcast_to(logits, (count, 6)), uniforms)
    counts = np.bincount(np.asarray(tokens), minlength=6)
    assert np.abs(counts - count * probs).max() <= 1, counts
    # The ends of (0, 1]: the smallest uniform skips the leading zero-probability token, the
    # largest gives the last token that has probability.
    ends = draw_from_logits(jnp.stack([logits, logits]), jnp.asarray([1e-9, 1.0]))
    np.testing.assert_array_equal(ends, [1, 5])


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (8, 30))
    uniforms = jax.random.uniform(jax.random.key(1), (8,))
    tokens = choose_tokens(logits, uniforms, temperature=0.0, top_k=None, top_p=None)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=1))


def test_guide_formula():
    cond = jax.random.normal(jax.random.key(0), (4, 9))
    uncond = jax.random.normal(jax.random.key(1), (4, 9))
    np.testing.assert_allclose(guide(cond, uncond, 1.0), cond, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(guide(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(guide(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond), rtol=1e-6)


def guided_fake():
    """Conditional rows prefer token 0 slightly over 1; unconditional rows prefer 0 strongly.
    Guidance with C = 3 gives 1 + 3 * (0.9 - 0) = 2.7 for token 1 against 1 for token 0."""
    cond = jnp.asarray([1.0, 0.9, 0.0, 0.0])
    uncond = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    seen = []

    def logits_for(is_uncond):
        return jnp.where(is_uncond[:, None], uncond, cond)

    def prefill(text_ids):
        seen.append(np.asarray(text_ids))  # called eagerly: sample() is not jitted here
        is_uncond = jnp.all(text_ids == PAD, axis=1)
        return logits_for(is_uncond), is_uncond

    def step(tokens, index, is_uncond):
        return logits_for(is_uncond), is_uncond

    return prefill, step, seen


def test_guidance_at_scale_one_equals_the_conditional():
    prefill, step, seen = guided_fake()
    text = jnp.asarray([[5, 6], [7, 0]], jnp.int32)
    ids = sample(
        prefill,
        step,
        text,
        jax.random.key(0),
        num_tokens=4,
        pad_id=PAD,
        temperature=0.0,
        cfg_scale=1.0,
    )
    np.testing.assert_array_equal(ids, np.zeros((2, 4)))  # the conditional argmax
    assert seen[0].shape == (2, 2)


def test_guidance_batches_cond_and_uncond_together():
    prefill, step, seen = guided_fake()
    text = jnp.asarray([[5, 6], [7, 0]], jnp.int32)
    ids = sample(
        prefill,
        step,
        text,
        jax.random.key(0),
        num_tokens=4,
        pad_id=PAD,
        temperature=0.0,
        cfg_scale=3.0,
    )
    np.testing.assert_array_equal(ids, np.ones((2, 4)))  # guidance flips the choice
    batch = seen[0]
    assert batch.shape == (4, 2)  # one pass of 2B rows: [cond; uncond]
    np.testing.assert_array_equal(batch[:2], text)
    np.testing.assert_array_equal(batch[2:], np.full((2, 2), PAD))


def test_settings_validation():
    with pytest.raises(UserError, match="temperature"):
        SamplingSettings(temperature=-1.0)
    with pytest.raises(UserError, match="top-p"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(UserError, match="top-k"):
        SamplingSettings(top_k=-2)
    with pytest.raises(UserError, match="cfg-scale"):
        SamplingSettings(cfg_scale=float("nan"))
    with pytest.raises(UserError, match="unknown key"):
        SamplingSettings.from_dict({"temprature": 1.0})
    assert SamplingSettings(top_k=0, top_p=1.0) == SamplingSettings()  # "off" spelled once


def test_a_bundles_rerank_default_is_not_a_token_setting():
    from dalle_jax.generate import resolve_settings

    bundle_sampling = {"temperature": 0.5, "top_k": 16, "rerank_per_image": 16}
    # SamplingSettings (which keys the compiled sampler) knows nothing of reranking ...
    with pytest.raises(UserError, match="rerank_per_image"):
        SamplingSettings.from_dict(bundle_sampling)
    # ... so the bundle's settings are resolved without it.
    settings = resolve_settings(bundle_sampling, cfg_scale=2.0)
    assert settings == SamplingSettings(temperature=0.5, top_k=16, cfg_scale=2.0)
    assert "rerank_per_image" not in settings.to_dict()


# ---- segments ------------------------------------------------------------------------------------
def test_segment_bounds_cover_every_step_once_in_order():
    for num_steps in (0, 1, 5, 63, 255):
        for segments in (1, 2, 4, 7):
            bounds = segment_bounds(num_steps, segments)
            steps = [i for begin, stop in bounds for i in range(begin, stop)]
            assert steps == list(range(num_steps))
            assert len(bounds) == min(segments, num_steps)
            sizes = [stop - begin for begin, stop in bounds]
            assert (
                all(size > 0 for size in sizes)
                and max(sizes, default=0) - min(sizes, default=0) <= 1
            )
    assert segment_bounds(63, 4) == [(0, 16), (16, 32), (32, 48), (48, 63)]
    with pytest.raises(ValueError, match="segments"):
        segment_bounds(10, 0)


def test_segments_draw_the_same_tokens_and_grow_before_each_stretch():
    prefill, step, _ = counting_model()
    grown = []

    def grow(state, last_index):
        grown.append(last_index)  # at trace time: one call per segment
        return state

    text = jnp.asarray([[1, 5], [2, 5], [7, 5]], jnp.int32)
    key = jax.random.key(4)
    whole = sample(prefill, step, text, key, num_tokens=9, pad_id=PAD, top_k=3)
    split = sample(
        prefill, step, text, key, num_tokens=9, pad_id=PAD, top_k=3, segments=3, grow=grow
    )
    np.testing.assert_array_equal(split, whole)
    assert grown == [2, 5, 7]  # the last step index of each stretch of 8 steps
    greedy = sample(
        prefill, step, text, key, num_tokens=9, pad_id=PAD, temperature=0.0, segments=4, grow=grow
    )
    np.testing.assert_array_equal(greedy, expected_counting(text[:, 0], 9))


# ---- the tiny transformer ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    config = get_config("tiny")
    model = DalleTransformer(config, rngs=nnx.Rngs(0))
    text = jax.random.randint(jax.random.key(1), (3, config.text_length), 0, config.text_vocab_size)
    text = text.at[:, 5:].set(config.text_pad_id)  # captions end in padding, as real ones do
    return config, model, text


def test_cached_decode_logits_equal_teacher_forced_logits(tiny):
    config, model, text = tiny
    image_ids = jax.random.randint(
        jax.random.key(2), (text.shape[0], config.image_length), 0, config.image_vocab_size
    )
    _, forced = model(text, image_ids)  # [B, N, V]

    @nnx.jit
    def cached(model, text, image_ids):
        first, cache = model.prefill(text, model.init_cache(text.shape[0]))

        def feed(cache, index):
            logits, cache = model.decode_step(image_ids[:, index], index, cache)
            return cache, logits

        _, rest = jax.lax.scan(feed, cache, jnp.arange(config.image_length - 1))
        return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

    np.testing.assert_allclose(cached(model, text, image_ids), forced, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("settings", "segments"),
    [
        (SamplingSettings(temperature=0.0), None),
        (SamplingSettings(temperature=0.0, cfg_scale=3.0), None),
        (SamplingSettings(temperature=1.0, top_k=8, cfg_scale=2.0), None),
        (SamplingSettings(temperature=1.0, top_k=8, cfg_scale=2.0), 3),
    ],
    ids=["greedy", "greedy-guided", "topk-guided", "topk-guided-3-segments"],
)
def test_cached_generation_equals_naive_generation(tiny, settings, segments):
    config, model, text = tiny
    key = jax.random.key(7)
    cached = jit_sampler(model, settings, segments=segments)(text, key)
    naive = jit_sampler(model, settings, naive=True)(text, key)
    assert cached.shape == (3, config.image_length) and cached.dtype == jnp.int32
    assert int(cached.min()) >= 0 and int(cached.max()) < config.image_vocab_size
    np.testing.assert_array_equal(cached, naive)


def loop_bodies(hlo: str) -> list[str]:
    """The text of every while-loop body computation in compiled HLO text."""
    names = set(re.findall(r"\bbody=(%[\w.-]+)", hlo))
    blocks = [m.group(0) for m in re.finditer(r"^%[\w.-]+ \(.*?^\}", hlo, re.M | re.S)]
    return [block for block in blocks if block.split(" ", 1)[0] in names]


def cache_writers(body: str, hlo: str, batch: int, config) -> list[str]:
    """The opcode of each instruction in `body` that makes a new array shaped like a layer's
    cache (f32 [B*H, C, Dh], C > T), or like one laid out [B, H, C, Dh] (any B); reading a
    tuple element or a bitcast is no new array. A fusion counts as the opcode of its fused
    computation's root."""
    found = []
    h, dh = config.num_heads, config.head_dim
    shape = rf"f32\[(?:{batch * h}|\d+,{h}),(\d+),{dh}\]"
    pattern = rf"^\s*(?:ROOT )?%\S+ = {shape}\{{[^}}]*\}} ([\w-]+)\((.*)$"
    for length, opcode, rest in re.findall(pattern, body, re.M):
        if int(length) <= config.text_length:  # e.g. the new position's keys [B, H, 1, Dh]
            continue
        if opcode in ("parameter", "get-tuple-element", "bitcast", "tuple"):
            continue
        if opcode == "fusion":
            called = re.search(r"calls=(%[\w.-]+)", rest).group(1)
            fused = re.search(rf"^{re.escape(called)} .*?^\}}", hlo, re.M | re.S).group(0)
            opcode = re.search(r"ROOT %\S+ = \S+ ([\w-]+)\(", fused).group(1)
        found.append(opcode)
    return found


@pytest.mark.parametrize(("batch", "segments"), [(1, 1), (3, 2)])
def test_sampling_loop_writes_the_cache_in_place(tiny, batch, segments):
    """The compiled decoding loop never copies or transposes a layer's cache: each step only
    writes its position (dynamic-update-slice, which XLA does in place, or it would have to
    insert a copy here), and attention reads the buffer as it lies. Batch 1 is where a cache
    laid out [B, H, C, Dh] was copied every step (see `KVCache`)."""
    config, model, text = tiny
    graphdef, state = nnx.split(model)

    def run(state, text, key):
        return generate_image_ids(nnx.merge(graphdef, state), text, key, segments=segments)

    hlo = jax.jit(run).lower(state, text[:batch], jax.random.key(0)).compile().as_text()
    writers = [cache_writers(body, hlo, batch, config) for body in loop_bodies(hlo)]
    decoding = [ops for ops in writers if ops]
    assert len(decoding) == segments  # one decoding loop per segment
    for ops in decoding:
        # Keys and values of every layer, each written once per step, and nothing else.
        assert ops == ["dynamic-update-slice"] * (2 * config.num_layers), ops


def test_generate_image_ids_under_nnx_jit(tiny):
    config, model, text = tiny
    run = nnx.jit(
        generate_image_ids, static_argnames=("temperature", "top_k", "top_p", "cfg_scale")
    )
    ids = run(model, text, jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(
        ids, jit_sampler(model, SamplingSettings(0.0))(text, jax.random.key(0))
    )
    short = generate_image_ids_naive(model, text, jax.random.key(0), temperature=0.0, num_tokens=5)
    np.testing.assert_array_equal(short, ids[:, :5])


def test_rows_depend_only_on_their_own_key_and_caption(tiny):
    config, model, text = tiny
    keys = jax.random.split(jax.random.key(11), 3)
    sampler = jit_sampler(model, SamplingSettings(temperature=1.0, cfg_scale=2.0))
    full = np.asarray(sampler(text, keys))
    # The same rows in another batch (another size, another order) come out the same.
    pair = np.asarray(sampler(text[jnp.asarray([2, 0])], keys[jnp.asarray([2, 0])]))
    np.testing.assert_array_equal(pair, full[[2, 0]])
    single = jit_sampler(model, SamplingSettings(temperature=1.0))
    np.testing.assert_array_equal(single(text[1:2], keys[1:2]), single(text, keys)[1:2])
    # And another key gives another image (so the check above can fail).
    other = np.asarray(sampler(text, jax.random.split(jax.random.key(12), 3)))
    assert (other != full).any()
