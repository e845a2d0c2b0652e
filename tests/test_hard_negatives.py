"""Hard-negative captions (one attribute word swapped) and their place in the InfoNCE loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import hard_negatives as hn
from dalle_jax import reranker as rr
from dalle_jax.errors import UserError
from dalle_jax.reranker_training import SHAPES_WORLD_SWAPS, RerankerTrainConfig

GROUPS = hn.normalize_groups([["red", "blue", "orange"], ["circle", "square"], ["top left", "top"]])


def test_a_swap_changes_one_word_for_another_of_its_group():
    caption = "a red circle and a blue square"
    seen = set()
    for seed in range(40):
        swapped = hn.swap_one_word(caption, GROUPS, np.random.default_rng(seed))
        assert swapped != caption
        before, after = caption.split(), swapped.split()
        changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
        # One word changed (its article may follow it: "a" -> "an" before "orange").
        words = [(b, a) for b, a in changed if b not in ("a", "an")]
        assert len(words) == 1, swapped
        old, new = words[0]
        assert any(old in group and new in group for group in GROUPS), (old, new)
        seen.add(swapped)
    # Every occurrence and every replacement gets drawn: 4 words x 1-2 others each.
    assert len(seen) == 6, seen


def test_articles_follow_the_swapped_word_and_phrases_swap_whole():
    rng = np.random.default_rng(0)
    assert hn.swap_one_word("a red square", (("red", "orange"),), rng) == "an orange square"
    assert hn.swap_one_word("An orange square", (("red", "orange"),), rng) == "A red square"
    # The longest phrase wins: "top left" is one unit, not "top" + "left".
    swapped = hn.swap_one_word("a circle at the top left", (("top left", "top"),), rng)
    assert swapped == "a circle at the top"
    assert hn.swap_one_word("a green diamond", GROUPS, rng) is None
    # Whole words only: "reddish" holds no "red".
    assert hn.swap_one_word("a reddish thing", GROUPS, rng) is None


def test_negatives_are_reproducible_and_mark_what_had_nothing_to_swap():
    captions = ["a red circle", "a green diamond", "a blue square at the top"]
    first = hn.negative_captions(captions, GROUPS, np.random.default_rng([0, 7]))
    again = hn.negative_captions(captions, GROUPS, np.random.default_rng([0, 7]))
    assert first[0] == again[0]
    np.testing.assert_array_equal(first[1], [True, False, True])
    assert first[0][1] == "a green diamond"  # the placeholder: itself, ignored by the loss


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="at least two"):
        hn.normalize_groups([["red"]])
    with pytest.raises(ValueError, match="more than one"):
        hn.normalize_groups([["red", "blue"], ["blue", "green"]])
    with pytest.raises(UserError, match="swap group"):
        RerankerTrainConfig(swap_word_groups=(("red", "red"),))
    # JSON gives lists; the config keeps hashable tuples (it keys compile caches).
    config = RerankerTrainConfig(swap_word_groups=[list(g) for g in SHAPES_WORLD_SWAPS])
    assert config == RerankerTrainConfig(swap_word_groups=SHAPES_WORLD_SWAPS)
    hash(config)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_a_negative_close_to_its_image_raises_the_loss_and_masked_ones_do_nothing():
    rng = np.random.default_rng(0)
    image_emb = _unit(rng.normal(size=(6, 8))).astype(np.float32)
    text_emb = _unit(image_emb + 0.1 * rng.normal(size=(6, 8))).astype(np.float32)
    near = _unit(image_emb + 0.3 * rng.normal(size=(6, 8))).astype(np.float32)
    far = -near
    plain, _ = rr.info_nce_loss(jnp.asarray(image_emb), jnp.asarray(text_emb), 10.0)
    with_far, far_terms = rr.info_nce_loss(image_emb, text_emb, 10.0, None, far)
    with_near, near_terms = rr.info_nce_loss(image_emb, text_emb, 10.0, None, near)
    assert float(plain) < float(with_far) < float(with_near)
    # Only the image->text direction sees the negatives.
    assert float(near_terms["loss_text_to_image"]) == pytest.approx(
        float(far_terms["loss_text_to_image"])
    )
    assert float(far_terms["hard_negative_top1"]) == 1.0
    # Every negative masked out: exactly the loss without negatives, and finite gradients.
    none_allowed = jnp.zeros((6, 6), bool)
    masked, _ = rr.info_nce_loss(image_emb, text_emb, 10.0, None, near, none_allowed)
    assert float(masked) == pytest.approx(float(plain), rel=1e-6)
    grads = jax.grad(
        lambda emb: rr.info_nce_loss(emb, text_emb, 10.0, None, near, none_allowed)[0]
    )(jnp.asarray(image_emb))
    assert np.all(np.isfinite(grads)) and np.any(grads != 0)


def test_hard_negative_top1_counts_images_that_prefer_their_own_caption():
    image_emb = np.eye(4, dtype=np.float32)
    text_emb = np.eye(4, dtype=np.float32)
    negatives = 0.5 * np.eye(4, dtype=np.float32)  # below the true caption ...
    negatives[1] = [0, 2, 0, 0]  # ... except for image 1
    _, terms = rr.info_nce_loss(image_emb, text_emb, 1.0, None, negatives)
    assert float(terms["hard_negative_top1"]) == 0.75
    # Row 1 not counted (a placeholder): the three others all win.
    allowed = jnp.asarray(np.ones((4, 4), bool) & np.array([True, False, True, True]))
    _, terms = rr.info_nce_loss(image_emb, text_emb, 1.0, None, negatives, allowed)
    assert float(terms["hard_negative_top1"]) == 1.0


def test_a_swap_that_writes_another_images_caption_is_not_its_negative():
    text_ids = jnp.asarray([[3, 4, 0], [5, 4, 0], [3, 6, 0]], jnp.int32)
    # Negative 0 (swapped from caption 0) is caption 1 word for word; negative 2 is a placeholder.
    negative_ids = jnp.asarray([[5, 4, 0], [5, 6, 0], [3, 6, 0]], jnp.int32)
    valid = jnp.asarray([True, True, False])
    allowed = np.asarray(rr.negative_allowed_mask(text_ids, negative_ids, valid))
    expected = np.array([[True, True, False], [False, True, False], [True, True, False]])
    np.testing.assert_array_equal(allowed, expected)


def test_the_cli_turns_hard_negatives_on_and_off():
    from train.cli import build_parser
    from train.reranker_cmd import job_from_args

    def groups(*flags):
        args = build_parser().parse_args(["reranker", "--workdir", "w", *flags])
        return job_from_args(args).train.swap_word_groups

    assert groups() == ()  # small: off by default
    assert groups("--hard-negatives") == SHAPES_WORLD_SWAPS
    assert groups("--config", "tiny") == SHAPES_WORLD_SWAPS
    assert groups("--config", "tiny", "--no-hard-negatives") == ()
