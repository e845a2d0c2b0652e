"""The sentencepiece text tokenizer: training, fixed special ids, padding, cutting, round trips."""

import logging
import pickle
import random

import numpy as np
import pytest

from dalle_jax.errors import UserError
from dalle_jax.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TextTokenizer,
    train_tokenizer,
)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon"]
PLACES = ["left", "right", "top", "bottom", "center"]


def _captions(count=600, seed=0):
    rng = random.Random(seed)
    return [
        f"A {rng.choice(COLORS)} {rng.choice(SHAPES)} on the {rng.choice(PLACES)}"
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.from_bytes(train_tokenizer(_captions(), vocab_size=200, model_type="bpe"))


def test_special_ids_are_fixed(tokenizer):
    sp = tokenizer._sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


def test_small_corpus_stops_below_the_asked_vocab_size_instead_of_failing():
    model = train_tokenizer(["a red circle", "a blue square"] * 5, vocab_size=5000)
    assert 4 < TextTokenizer.from_bytes(model).vocab_size < 5000


def test_encode_pads_at_the_end_with_int32_and_no_bos_eos(tokenizer):
    ids = tokenizer.encode(["a red circle on the left", "a star"], text_length=16)
    assert ids.dtype == np.int32 and ids.shape == (2, 16)
    for row in ids:
        used = row[row != PAD_ID]
        assert len(used) > 0
        np.testing.assert_array_equal(row[len(used) :], PAD_ID)  # padding only at the end
        assert BOS_ID not in used and EOS_ID not in used
    assert np.all(ids < tokenizer.vocab_size) and np.all(ids >= 0)


def test_round_trip_is_lower_cased(tokenizer):
    captions = ["A Purple Hexagon on the BOTTOM", "a green triangle on the center"]
    ids = tokenizer.encode(captions, text_length=32)
    assert tokenizer.decode(ids) == [c.lower() for c in captions]
    np.testing.assert_array_equal(ids[0], tokenizer.encode([captions[0].lower()], 32)[0])


def test_whole_words_of_a_small_vocabulary_become_single_tokens(tokenizer):
    # bpe with room for every word: each of the 6 words is one id.
    assert tokenizer.count_tokens(["a purple hexagon on the bottom"])[0] == 6


def test_empty_caption_is_all_padding(tokenizer):
    ids = tokenizer.encode(["", "a red star"], text_length=8)
    np.testing.assert_array_equal(ids[0], np.zeros(8, np.int32))
    assert ids[1, 0] != PAD_ID
    assert tokenizer.decode(ids[:1]) == [""]


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer.encode(["a red ✱"], text_length=8)[0]
    assert UNK_ID in ids


def test_truncation_cuts_at_the_end_and_warns_once_per_tokenizer(caplog):
    model = train_tokenizer(_captions(), vocab_size=96, model_type="bpe")
    first, second = TextTokenizer.from_bytes(model), TextTokenizer.from_bytes(model)
    long_caption = "a red circle on the left " * 4
    full = first.encode([long_caption], text_length=64)[0]
    with caplog.at_level(logging.WARNING, logger="dalle_jax.tokenizer"):
        cut = first.encode([long_caption], text_length=5)
        first.encode([long_caption, long_caption], text_length=5)
        assert len(caplog.records) == 1
        assert "cut" in caplog.records[0].getMessage()
        second.encode([long_caption], text_length=5)
        assert len(caplog.records) == 2
        first.encode(["a star"], text_length=5)  # short captions never warn
        assert len(caplog.records) == 2
    np.testing.assert_array_equal(cut[0], full[:5])


def test_count_tokens_matches_encoded_length(tokenizer):
    captions = ["a red circle", "", "a purple hexagon on the bottom"]
    ids = tokenizer.encode(captions, text_length=40)
    np.testing.assert_array_equal(tokenizer.count_tokens(captions), (ids != PAD_ID).sum(1))


def test_file_bytes_and_pickle_round_trips(tokenizer, tmp_path):
    path = tmp_path / "text.model"
    tokenizer.save(path)
    captions = ["a blue square on the top"]
    for other in (
        TextTokenizer.from_file(path),
        TextTokenizer.from_bytes(tokenizer.to_bytes()),
        pickle.loads(pickle.dumps(tokenizer)),
    ):
        assert other.vocab_size == tokenizer.vocab_size
        np.testing.assert_array_equal(other.encode(captions, 12), tokenizer.encode(captions, 12))


def test_unigram_trains_and_round_trips():
    tokenizer = TextTokenizer.from_bytes(train_tokenizer(_captions(), 64, model_type="unigram"))
    assert tokenizer.decode(tokenizer.encode(["a red star on the top"], 40)) == [
        "a red star on the top"
    ]


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        TextTokenizer.from_file(tmp_path / "missing.model")
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        TextTokenizer.from_file(garbage)
    with pytest.raises(UserError, match="no captions"):
        train_tokenizer(["", "  "], 64)
    with pytest.raises(UserError, match="model type"):
        train_tokenizer(["a b"], 64, model_type="wordpiece")
