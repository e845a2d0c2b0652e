"""The text tokenizer: a sentencepiece model trained on the dataset's own captions.

Fixed special ids, the same in every model this module trains:
`PAD_ID = 0`, `UNK_ID = 1`, `BOS_ID = 2`, `EOS_ID = 3`.

Text is lower-cased before training and before encoding (the model's normalizer also case-folds,
so the `.model` file behaves the same when used on its own).

`encode` adds NO bos/eos: a caption becomes a fixed-length block of `text_length` ids, padded at
the end with `PAD_ID`. The block's end is marked by the padding itself, and the transformer owns
the layout of the full sequence (it may put its own separator before the image tokens). So an
empty caption encodes to all padding, which is the unconditional input classifier-free
guidance needs.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from dalle_jax.errors import UserError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

MODEL_TYPES = ("unigram", "bpe", "char", "word")

_log = logging.getLogger(__name__)


def _lower(captions: Iterable[str]) -> Iterator[str]:
    for caption in captions:
        caption = caption.strip().lower()
        if caption:  # sentencepiece's trainer rejects empty sentences
            yield caption


def train_tokenizer(
    captions: Iterable[str],
    vocab_size: int,
    model_type: str = "unigram",
    *,
    max_sentence_length: int = 4096,
) -> bytes:
    """Trains a sentencepiece model in memory on `captions`; returns the serialized model.

    `vocab_size` is an upper bound: on a corpus too small for it (synthetic captions have only
    a few dozen distinct words) sentencepiece stops early instead of failing
    (`hard_vocab_limit=False`). Read `TextTokenizer.from_bytes(b).vocab_size` for the real size.
    """
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown tokenizer model type {model_type!r}; use one of {MODEL_TYPES}")
    if vocab_size < 8:
        raise UserError(f"vocab size {vocab_size} is too small; use at least 8")
    sentences = list(_lower(captions))
    if not sentences:
        raise UserError("no captions to train the tokenizer on; is the dataset split empty?")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        # Captions are English-like: keep every character seen rather than mapping rare ones
        # to <unk>, and case-fold inside the model too.
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc_cf",
        max_sentence_length=max_sentence_length,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


class TextTokenizer:
    """Captions <-> int32 ids [B, T] with a sentencepiece model (see the module docstring)."""

    def __init__(self, model_proto: bytes):
        self._model_proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto)
        if self._sp.pad_id() != PAD_ID:
            raise UserError(
                f"tokenizer model has pad id {self._sp.pad_id()}, expected {PAD_ID}; "
                "retrain it with `train tokenizer`"
            )
        self._warned_truncation = False

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> TextTokenizer:
        """A tokenizer from a serialized sentencepiece model (what `train_tokenizer` returns)."""
        return cls(model_proto)

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """A tokenizer from a `.model` file written by `train tokenizer`."""
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"tokenizer model {str(path)!r} not found; create it with `train tokenizer`"
            )
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:  # sentencepiece's parse error
            raise UserError(f"{str(path)!r} is not a sentencepiece model ({e})") from e

    def to_bytes(self) -> bytes:
        """The serialized sentencepiece model; `from_bytes(t.to_bytes())` is an equal tokenizer."""
        return self._model_proto

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._model_proto)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids included: every id is in `[0, vocab_size)`."""
        return self._sp.get_piece_size()

    def encode(self, captions: Sequence[str], text_length: int) -> np.ndarray:
        """`captions` -> int32 [B, text_length], lower-cased, no bos/eos, padded with `PAD_ID`.

        Captions longer than `text_length` ids are cut at the end; the first cut logs one
        warning per tokenizer (a cut caption every step would otherwise flood the log).
        """
        pieces = self._sp.encode([caption.lower() for caption in captions], out_type=int)
        ids = np.full((len(pieces), text_length), PAD_ID, dtype=np.int32)
        for row, caption_ids in enumerate(pieces):
            if len(caption_ids) > text_length and not self._warned_truncation:
                self._warned_truncation = True
                _log.warning(
                    "caption cut from %d to %d tokens (raise text_length to keep it whole; "
                    "this warning is shown once): %r",
                    len(caption_ids),
                    text_length,
                    captions[row],
                )
            caption_ids = caption_ids[:text_length]
            ids[row, : len(caption_ids)] = caption_ids
        return ids

    def count_tokens(self, captions: Sequence[str]) -> np.ndarray:
        """int64 [B]: how many ids each caption takes before any cutting or padding."""
        pieces = self._sp.encode([caption.lower() for caption in captions], out_type=int)
        return np.asarray([len(ids) for ids in pieces], dtype=np.int64)

    def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
        """int [B, T] ids -> B captions; padding and special ids are dropped."""
        rows = np.asarray(ids)
        if rows.ndim == 1:
            rows = rows[None]
        special = (PAD_ID, BOS_ID, EOS_ID)
        return [self._sp.decode([int(i) for i in row if i not in special]) for row in rows]

    def __getstate__(self) -> dict:
        # SentencePieceProcessor does not pickle; grain's worker processes need to.
        return {"model_proto": self._model_proto, "warned": self._warned_truncation}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])
        self._warned_truncation = state["warned"]
