"""Regenerates the README's example grids from the shipped bundles: fixed prompts, a fixed seed,
every image drawn kept (nothing hand-picked).

    python docs/make_readme_grids.py                      # both shipped bundles -> docs/images
    python docs/make_readme_grids.py --model shapes --num-images 8
    python docs/make_readme_grids.py --model path/to/bundle --prompt-set emoji --out /tmp/grids

For each bundle NAME (a shipped bundle's name, or a bundle folder's name) it writes

    OUT/NAME_grid.png    one row per prompt, NUM_IMAGES columns, each image upscaled
                         (nearest neighbour) to TILE_SIZE pixels, PADDING pixels between
    OUT/NAME_grid.json   prompts, seed, settings, layout, the bundle's sha256 and provenance

and prints the Markdown to paste into the README. Same bundle, seed and flags: the same PNG,
byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python docs/make_readme_grids.py` from a checkout
    sys.path.insert(0, str(REPO))

from dalle_jax.errors import UserError, run_cli  # noqa: E402

DEFAULT_MODELS = ("shapes", "emoji")
DEFAULT_OUT = "docs/images"
DEFAULT_SEED = 0
DEFAULT_NUM_IMAGES = 6
DEFAULT_TILE_SIZE = 128
PADDING = 4

# shapes_world: four captions like the training data, then two that use held-out color-shape
# pairs (never in training: zero-shot composition).
SHAPES_PROMPTS = (
    "a small red circle at the top left",
    "a large green square at the bottom right on a white background",
    "a blue square in the center",
    "a small orange triangle at the top right and a large cyan diamond at the bottom left",
    "a blue circle",
    "a red triangle at the center on a black background",
)
# emoji: CLDR names of emoji in the training split (as the dataset captions them: the bare
# name, "NAME emoji", or "NAME, STYLE style" with STYLE noto, twemoji or openmoji).
EMOJI_PROMPTS = (
    "grinning face",
    "thumbs up",
    "cat face",
    "rocket",
    "fire, twemoji style",
    "pizza, openmoji style",
)
PROMPT_SETS: dict[str, tuple[str, ...]] = {"shapes": SHAPES_PROMPTS, "emoji": EMOJI_PROMPTS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_readme_grids",
        description="Regenerate the README's example grids (docs/images/NAME_grid.png + .json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="BUNDLE",
        default=None,
        help="shipped bundle name or bundle folder; repeatable "
        f"(default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument(
        "--prompt-set",
        choices=sorted(PROMPT_SETS),
        default=None,
        help="prompts to draw (default: the set named like the bundle)",
    )
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", metavar="S", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--num-images", metavar="N", type=int, default=DEFAULT_NUM_IMAGES, help="images per prompt"
    )
    parser.add_argument(
        "--tile-size",
        metavar="PX",
        type=int,
        default=DEFAULT_TILE_SIZE,
        help="on-page size of each image; upscaled by the whole factor TILE_SIZE // image size",
    )
    parser.add_argument("--batch-size", metavar="B", type=int, default=8)
    return parser


def prompt_set_for(name: str, requested: str | None) -> str:
    """The prompt set to use for bundle `name`: `requested`, else the set called `name`."""
    if requested is not None:
        return requested
    if name in PROMPT_SETS:
        return name
    raise UserError(
        f"no prompt set for bundle {name!r}; pass --prompt-set ({', '.join(sorted(PROMPT_SETS))})"
    )


def held_out_prompts(prompts: Sequence[str]) -> list[bool]:
    """For each prompt: whether it asks for a shapes_world color-shape pair never trained on."""
    from dalle_jax.data.shapes_world.spec import HELDOUT_PAIRS, parse_caption

    return [any((o.color, o.shape) in HELDOUT_PAIRS for o in parse_caption(p)) for p in prompts]


def bundle_sha256(path: Path) -> str:
    """sha256 over every file of a bundle folder (relative path and bytes, in sorted order)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def grid_image(images: Sequence[Sequence[Any]], scale: int) -> Any:
    """images: P lists of N uint8 [S, S, 3] -> uint8 [P * (T + PADDING) + PADDING,
    N * (T + PADDING) + PADDING, 3], one row per prompt, T = S * scale (nearest neighbour)."""
    import numpy as np

    from dalle_jax.images import make_grid

    stacked = np.stack([np.stack(row) for row in images])  # [P, N, S, S, 3]
    rows, cols = stacked.shape[:2]
    tiles = stacked.repeat(scale, axis=2).repeat(scale, axis=3)  # NEAREST upscaling
    return make_grid(tiles.reshape(rows * cols, *tiles.shape[2:]), cols, padding=PADDING)


def make_grid_files(
    model: str,
    out: Path,
    *,
    prompt_set: str | None = None,
    seed: int = DEFAULT_SEED,
    num_images: int = DEFAULT_NUM_IMAGES,
    tile_size: int = DEFAULT_TILE_SIZE,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Draws the grid of one bundle; writes OUT/NAME_grid.png and .json; returns the json."""
    from dalle_jax.bundle import load_bundle, resolve_bundle_path
    from dalle_jax.generate import generate_images, resolve_rerank, resolve_settings
    from dalle_jax.images import save_png

    path = resolve_bundle_path(model)
    name = path.name
    prompt_set = prompt_set_for(name, prompt_set)
    prompts = list(PROMPT_SETS[prompt_set])
    bundle = load_bundle(path)
    image_size = bundle.vqvae_config.image_size
    scale = max(1, tile_size // image_size)
    images = generate_images(
        bundle,
        prompts,
        num_images=num_images,
        seed=seed,
        batch_size=batch_size,
        progress=False,
        warn=lambda message: print(f"warning: {message}", file=sys.stderr),
    )
    # Candidates drawn per prompt when the bundle reranks by default (None: no reranking).
    rerank = resolve_rerank(bundle, num_images, None)
    png_name, json_name = f"{name}_grid.png", f"{name}_grid.json"
    save_png(out / png_name, grid_image(images, scale))
    record = {
        "bundle": name,
        "bundle_sha256": bundle_sha256(path),
        "provenance": bundle.meta.get("provenance") or {},
        "prompt_set": prompt_set,
        "prompts": prompts,
        # Only shapes_world has held-out pairs (an emoji is even called "blue circle").
        "held_out": held_out_prompts(prompts) if prompt_set == "shapes" else [False] * len(prompts),
        "seed": seed,
        "num_images": num_images,
        "settings": resolve_settings(bundle.sampling).to_dict(),
        "rerank": rerank,
        "image_size": image_size,
        "tile_size": image_size * scale,
        "padding": PADDING,
        "layout": "one row per prompt, num_images columns, "
        + ("the best first by the bundle's reranking" if rerank else "in the order drawn"),
        "grid": png_name,
    }
    (out / json_name).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def markdown(record: dict[str, Any], png_path: str) -> str:
    """The README snippet for one grid: the image and its prompts, top row first."""
    held_out_note = " *(held-out pair: never seen in training)*"
    lines = [
        f"![{record['bundle']} samples]({png_path})",
        "",
        f"Rows, top to bottom ({record['num_images']} images each, seed {record['seed']}, "
        "the bundle's default sampling settings"
        + (
            f" (the best {record['num_images']} of {record['rerank']} by its reranking)"
            if record.get("rerank")
            else ""
        )
        + ", not hand-picked; "
        "regenerate with `python docs/make_readme_grids.py`):",
        "",
    ]
    for number, (prompt, held) in enumerate(
        zip(record["prompts"], record["held_out"], strict=True), start=1
    ):
        lines.append(f'{number}. "{prompt}"' + (held_out_note if held else ""))
    return "\n".join(lines)


def _relative_to_repo(path: Path) -> str:
    resolved = path.resolve()
    return resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else str(path)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from dalle_jax.generate import check_counts

    check_counts(args.num_images, None, args.batch_size, args.seed)
    if args.tile_size < 1:
        raise UserError(f"--tile-size must be at least 1, got {args.tile_size}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {args.out!r} ({e.strerror}); pick another") from e
    snippets = []
    for model in args.model or DEFAULT_MODELS:
        record = make_grid_files(
            model,
            out,
            prompt_set=args.prompt_set,
            seed=args.seed,
            num_images=args.num_images,
            tile_size=args.tile_size,
            batch_size=args.batch_size,
        )
        png_path = _relative_to_repo(out / record["grid"])
        print(f"wrote {png_path} and {record['grid'].removesuffix('.png')}.json", file=sys.stderr)
        snippets.append(markdown(record, png_path))
    print("\n\n".join(snippets))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
