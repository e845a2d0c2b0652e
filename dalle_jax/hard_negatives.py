"""Hard-negative captions for contrastive training: a caption with one attribute word swapped.

In-batch negatives rarely differ from a caption in one word only, so a CLIP-style model can
score "a red square" against images well without really telling a square from a triangle of
the same color. That is exactly the choice a reranker faces among samples of one prompt.
NegCLIP's remedy (Yuksekgonul et al., 2023, "When and why vision-language models behave like
bags-of-words") is to add, for each caption, a copy with a word swapped for another of its kind
("a red triangle" -> "a red circle") to the image-to-text softmax as an extra negative.

Which words may replace each other is data: `groups`, tuples of interchangeable words or
phrases (a dataset's colors, its shapes, its sizes). Swapping one word of a true caption for
another of its group gives a caption that no longer describes the image. The negatives are
drawn on the host with a numpy Generator seeded by the step, so a resumed run sees the same
ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

Groups = tuple[tuple[str, ...], ...]


def normalize_groups(groups: Sequence[Sequence[str]]) -> Groups:
    """`groups` as a hashable tuple of tuples (JSON gives lists); each group needs 2+ words
    and a word may be in one group only (ValueError otherwise)."""
    result = tuple(tuple(str(w) for w in group) for group in groups)
    seen: set[str] = set()
    for group in result:
        if len(set(group)) < 2:
            raise ValueError(f"a swap group needs at least two different words, got {group}")
        overlap = seen & set(group)
        if overlap:
            raise ValueError(f"words {sorted(overlap)} are in more than one swap group")
        seen |= set(group)
    return result


@functools.lru_cache(maxsize=8)
def _pattern(groups: Groups) -> re.Pattern[str]:
    words = sorted({w for group in groups for w in group}, key=len, reverse=True)  # longest first
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _fix_article(text: str, start: int) -> str:
    """Makes an "a"/"an" right before position `start` agree with the word that starts there."""
    match = re.search(r"\b(a|an)\s+$", text[:start], re.IGNORECASE)
    if not match:
        return text
    article = "an" if text[start : start + 1].lower() in "aeiou" else "a"
    if match.group(1)[0].isupper():
        article = article.capitalize()
    return text[: match.start(1)] + article + text[match.end(1) :]


def swap_one_word(caption: str, groups: Groups, rng: np.random.Generator) -> str | None:
    """`caption` with one occurrence of a group's word replaced by another word of that group
    (occurrence and replacement uniform), the article before it fixed ("a red" -> "an
    orange"); None when the caption holds no word of any group."""
    matches = list(_pattern(groups).finditer(caption))
    if not matches:
        return None
    match = matches[int(rng.integers(len(matches)))]
    word = match.group(1).lower()
    group = next(g for g in groups if word in (w.lower() for w in g))
    others = [w for w in group if w.lower() != word]
    replacement = others[int(rng.integers(len(others)))]
    swapped = caption[: match.start()] + replacement + caption[match.end() :]
    return _fix_article(swapped, match.start())


def negative_captions(
    captions: Sequence[str], groups: Groups, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """One swapped caption per caption: (captions' negatives [B], valid bool [B]).

    A caption with nothing to swap gets itself as a placeholder and valid False (the loss must
    ignore it).
    """
    negatives, valid = [], np.zeros(len(captions), bool)
    for i, caption in enumerate(captions):
        swapped = swap_one_word(str(caption), groups, rng)
        valid[i] = swapped is not None
        negatives.append(str(caption) if swapped is None else swapped)
    return negatives, valid
