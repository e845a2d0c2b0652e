"""Attention masks: causal, text never sees image, and the sparse patterns on a 3x3 grid."""

import numpy as np
import pytest

from dalle_jax.model import attention_mask, get_config, layer_mask

T, ROWS, COLS = 2, 3, 3  # positions: 0 start, 1..2 text, 3..10 image ids 0..7
S = T + ROWS * COLS


def visible(kind: str, query: int, kernel: int = 3) -> set[int]:
    row = attention_mask(kind, T, ROWS, COLS, kernel)[query]
    return set(np.flatnonzero(row).tolist())


@pytest.mark.parametrize("kind", ["full", "row", "column", "conv"])
def test_every_mask_is_causal_and_text_never_sees_image(kind):
    mask = attention_mask(kind, T, ROWS, COLS, 3)
    assert mask.shape == (S, S) and mask.dtype == bool
    assert not np.any(np.triu(mask, k=1)), "a query sees a later position"
    # Positions 0..T hold the start token and the text: none of them may see an image id.
    assert not np.any(mask[: T + 1, T + 1 :])
    # Text keys are always visible, and every query sees itself.
    assert np.all(mask[:, : T + 1][np.tril(np.ones((S, T + 1), bool))])
    assert np.all(np.diag(mask))


def test_full_mask_is_lower_triangular():
    np.testing.assert_array_equal(
        attention_mask("full", T, ROWS, COLS), np.tril(np.ones((S, S), bool))
    )


TEXT = {0, 1, 2}


@pytest.mark.parametrize(
    ("kind", "query", "image_keys"),
    [
        # Query at position 6 predicts image id 4 = (1, 1); position 6 holds id 3 = (1, 0).
        ("row", 6, {6}),  # same row, earlier: id 3 (position 6)
        ("column", 6, {4, 6}),  # same column, above: id 1 (position 4); itself
        ("conv", 6, {3, 4, 5, 6}),  # 3x3 window, earlier: ids 0, 1, 2, 3
        # Query at position 10 predicts image id 8 = (2, 2); position 10 holds id 7.
        ("row", 10, {9, 10}),  # ids 6, 7
        ("column", 10, {5, 8, 10}),  # ids 2, 5; itself
        ("conv", 10, {7, 8, 10}),  # ids 4 (1,1), 5 (1,2), 7 (2,1); id 6 (2,0) is outside
        # Query at position 4 predicts id 1 = (0, 1): row sees id 0; column sees only itself.
        ("row", 4, {3, 4}),
        ("column", 4, {4}),
        ("full", 10, {3, 4, 5, 6, 7, 8, 9, 10}),
    ],
)
def test_sparse_patterns_match_hand_computed_sets(kind, query, image_keys):
    assert visible(kind, query) == TEXT | image_keys


def test_query_predicting_first_image_id_sees_only_text():
    for kind in ("full", "row", "column", "conv"):
        assert visible(kind, T) == TEXT


def test_conv_kernel_size_widens_the_window():
    # Predicting id 8 = (2, 2) with a 5x5 window: every earlier id is within 2 rows/cols.
    assert visible("conv", 10, kernel=5) == TEXT | set(range(3, 11))


def test_layer_mask_cycles_attention_types():
    config = get_config("tiny", num_layers=3, attention_types=("row", "column"))
    kinds = ["row", "column", "row"]
    for layer, kind in enumerate(kinds):
        expected = attention_mask(
            kind, config.text_length, config.image_rows, config.image_cols, config.conv_kernel
        )
        np.testing.assert_array_equal(layer_mask(config, layer), expected)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown attention kind"):
        attention_mask("diagonal", T, ROWS, COLS)
