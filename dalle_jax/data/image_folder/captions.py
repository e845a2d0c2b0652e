"""Finding the images in a folder and the captions that go with them.

Three ways to caption an image, all read and merged (an image may have several captions):
- a sidecar text file beside the image with the same stem: `cat.jpg` + `cat.txt`; each
  non-empty line is one caption;
- `captions.jsonl` at the folder's root: one `{"image": "rel/path.jpg", "caption": "..."}`
  per line (several lines per image allowed; `"caption"` may also be a list of strings);
- `captions.tsv` at the folder's root: `rel/path.jpg<TAB>caption` per line (an optional
  header line `image<TAB>caption` or `path<TAB>caption` is ignored).

Paths in the caption files are relative to the folder. Hidden files and folders (`.name`) are
ignored. Nothing here raises on bad entries: they are skipped and counted in `ScanCounts`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
JSONL_NAME = "captions.jsonl"
TSV_NAME = "captions.tsv"
_TSV_HEADERS = frozenset({"image", "path", "file", "filename", "file_name"})
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One image and its captions. `key`: path relative to the folder ('/'-separated)."""

    key: str
    path: Path
    captions: tuple[str, ...]


@dataclasses.dataclass
class ScanCounts:
    """What the scan found and what it had to skip."""

    image_files: int = 0  # files with an image suffix
    missing_image: int = 0  # caption entries naming a file that does not exist
    uncaptioned: int = 0  # image files with no caption from any source
    malformed_lines: int = 0  # jsonl/tsv lines that could not be parsed
    empty_captions: int = 0  # blank captions in captions.jsonl / captions.tsv


def find_captioned_images(folder: Path) -> tuple[list[CaptionedImage], ScanCounts]:
    """The images under `folder` (an absolute, resolved path) that have at least one caption,
    sorted by key."""
    counts = ScanCounts()
    images = sorted(_image_files(folder))
    counts.image_files = len(images)
    captions: dict[Path, list[str]] = {path: [] for path in images}

    for path in images:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            # Blank lines only separate captions here; they are not blank captions.
            captions[path].extend(line for line in _read_text(sidecar).splitlines() if line.strip())

    entries = [*_jsonl_entries(folder / JSONL_NAME, counts), *_tsv_entries(folder, counts)]
    for relative, caption in entries:
        path = Path(os.path.normpath(folder / relative))
        if not path.is_file():
            counts.missing_image += 1
            continue
        # Caption files may name an image the folder scan left out (an odd suffix, a
        # hidden folder): the user named it explicitly, so it is used.
        captions.setdefault(path, []).append(caption)

    result = []
    for path, texts in captions.items():
        cleaned = [_WHITESPACE.sub(" ", text).strip() for text in texts]
        counts.empty_captions += sum(1 for text in cleaned if not text)
        unique = tuple(dict.fromkeys(text for text in cleaned if text))
        if not unique:
            counts.uncaptioned += 1
            continue
        result.append(CaptionedImage(_key(folder, path), path, unique))
    return sorted(result, key=lambda image: image.key), counts


def _image_files(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield path


def _key(folder: Path, path: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:  # named by a caption file but outside the folder
        return path.resolve().as_posix()


def _read_text(path: Path) -> str:
    # errors="replace": a stray non-UTF-8 byte should cost one character, not the caption.
    return path.read_text(encoding="utf-8", errors="replace")


def _jsonl_entries(path: Path, counts: ScanCounts) -> Iterator[tuple[str, str]]:
    if not path.is_file():
        return
    for line in _read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image, caption = record["image"], record["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            counts.malformed_lines += 1
            continue
        texts = caption if isinstance(caption, list) else [caption]
        if not isinstance(image, str) or not all(isinstance(t, str) for t in texts):
            counts.malformed_lines += 1
            continue
        for text in texts:
            yield image, text


def _tsv_entries(folder: Path, counts: ScanCounts) -> Iterator[tuple[str, str]]:
    path = folder / TSV_NAME
    if not path.is_file():
        return
    for number, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        image, tab, caption = line.partition("\t")
        if not tab:
            counts.malformed_lines += 1
            continue
        is_header = number == 0 and image.strip().lower() in _TSV_HEADERS
        if is_header and not (folder / image.strip()).is_file():
            continue
        yield image.strip(), caption
