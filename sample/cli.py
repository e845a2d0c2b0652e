"""`sample PROMPT ...`: turns prompts into image grids with a trained bundle.

Thin: parse flags, check them, load the bundle, call `dalle_jax.generate.generate_images`, write
PNGs and a manifest. Output layout, for prompt number i (from 0):

    OUT/manifest.json                 [{"prompt", "grid", "images", "seed", "settings"}, ...]
                                      (settings["rerank"]: the candidates drawn per prompt,
                                      None when not reranked)
    OUT/<iii>-<slug>/grid.png         the prompt's images in one grid
    OUT/<iii>-<slug>/image-<kk>.png   each image on its own

Paths in the manifest are relative to OUT. Files of an earlier run into the same OUT are
overwritten when they have the same names; the manifest lists this run only.
Heavy imports (jax, the model) happen after the flags are checked, so `sample --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dalle_jax.errors import UserError, run_cli

DEFAULT_MODEL = "shapes"
DEFAULT_OUT = "samples"
MANIFEST_NAME = "manifest.json"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: ...)` unless the help already says its default or the flag is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or "(default:" in text:
            return text
        return super()._get_help_string(action)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --cfg-scale: each None unless given (the bundle's)."""
    bundle_default = "the bundle's default"
    parser.add_argument(
        "--temperature",
        metavar="T",
        type=float,
        default=None,
        help=f"softmax temperature, 0 = greedy (default: {bundle_default})",
    )
    parser.add_argument(
        "--top-k",
        metavar="K",
        type=int,
        default=None,
        help=f"draw only among the K most likely image tokens, 0 = off (default: {bundle_default})",
    )
    parser.add_argument(
        "--top-p",
        metavar="P",
        type=float,
        default=None,
        help=f"nucleus sampling: the smallest set of tokens with probability mass P, 1 = off "
        f"(default: {bundle_default})",
    )
    parser.add_argument(
        "--cfg-scale",
        metavar="C",
        type=float,
        default=None,
        help=f"classifier-free guidance scale, 1 = none (default: {bundle_default})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sample",
        description=(
            "Generate images for text prompts with a trained dalle-jax bundle. Writes one PNG "
            "grid per prompt, each image on its own, and OUT/manifest.json."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts", default=[])
    parser.add_argument(
        "--prompts-file",
        metavar="FILE",
        default=None,
        help=(
            "a text file with one prompt per line (blank lines are skipped), after any PROMPTs "
            "(default: none)"
        ),
    )
    parser.add_argument(
        "--model",
        metavar="BUNDLE",
        default=None,
        help=f"bundle directory, or the name of a shipped bundle (default: {DEFAULT_MODEL!r})",
    )
    parser.add_argument("--num-images", metavar="N", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", metavar="S", type=int, default=0, help="random seed")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help="output directory")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--rerank",
        metavar="M",
        type=int,
        default=None,
        help="draw M >= N candidates per prompt and keep the N the bundle's reranker scores "
        "best; 0 = no reranking (default: the bundle's: K*N candidates when its bundle.json "
        "sets sampling rerank_per_image K and it has a reranker, else no reranking)",
    )
    parser.add_argument(
        "--batch-size", metavar="B", type=int, default=8, help="images sampled per batch"
    )
    parser.add_argument(
        "--grid-cols",
        metavar="N",
        type=int,
        default=None,
        help="columns of each grid (default: about square, ceil(sqrt(num images)))",
    )
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The PROMPTs, then the lines of --prompts-file; UserError for none or an empty one."""
    from dalle_jax.generate import check_prompts  # noqa: PLC0415 - jax-free only after --help

    prompts = list(args.prompts)
    for number, prompt in enumerate(prompts, start=1):
        if not prompt.strip():
            raise UserError(f"prompt {number} is empty; give every prompt some text")
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(
                f"cannot read --prompts-file {str(path)!r} ({type(e).__name__}); "
                "give a UTF-8 text file with one prompt per line"
            ) from e
        prompts += [line for line in lines if line.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {str(path)!r} has no prompts; write one per line")
    if not prompts:
        raise UserError(
            'no prompts given; pass PROMPT ... (e.g. sample "a red circle") or --prompts-file'
        )
    return check_prompts(prompts)


def check_flags(args: argparse.Namespace) -> None:
    """Numbers out of range -> UserError, before anything slow happens."""
    from dalle_jax.generate import check_counts  # noqa: PLC0415
    from dalle_jax.sampling import SamplingSettings  # noqa: PLC0415

    check_counts(args.num_images, args.rerank, args.batch_size, args.seed)
    if args.grid_cols is not None and args.grid_cols < 1:
        raise UserError(f"--grid-cols must be at least 1, got {args.grid_cols}")
    given = {
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "cfg_scale": args.cfg_scale,
    }
    SamplingSettings(**{k: v for k, v in given.items() if v is not None})


def prepare_out_dir(out: str) -> Path:
    """Creates `out` and checks a file can be written there; UserError otherwise."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write to --out {out!r} ({e.strerror or type(e).__name__}); "
            "pick a directory you can write to"
        ) from e
    return path


def load_bundle(model: str | None) -> Any:
    """The bundle `--model` names, else the shipped default; errors are one-line UserErrors."""
    from dalle_jax import bundle as bundle_lib  # noqa: PLC0415

    if model is not None:
        return bundle_lib.load_bundle(model)
    # The shipped folder itself, not the name: a folder called "shapes" in the working
    # directory must not stand in for the default model.
    shipped = bundle_lib.SHIPPED_BUNDLES_DIR / DEFAULT_MODEL
    if not shipped.is_dir():
        raise UserError(
            f"no default model: the shipped bundle {DEFAULT_MODEL!r} is not in this install yet; "
            "pass --model DIR with a bundle written by `train export`"
        )
    return bundle_lib.load_bundle(shipped)


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe short form of a prompt: `"A red circle!"` -> `"a-red-circle"`."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "prompt"


def write_outputs(
    out: Path,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    *,
    grid_cols: int,
    seed: int,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """Writes each prompt's grid and images and `manifest.json`; returns the manifest entries."""
    import numpy as np  # noqa: PLC0415

    from dalle_jax.images import make_grid, save_png  # noqa: PLC0415

    manifest = []
    for number, (prompt, prompt_images) in enumerate(zip(prompts, images, strict=True)):
        folder = f"{number:03d}-{slug(prompt)}"
        image_paths = []
        for k, image in enumerate(prompt_images):
            relative = f"{folder}/image-{k:02d}.png"
            save_png(out / relative, image)
            image_paths.append(relative)
        grid_path = f"{folder}/grid.png"
        save_png(out / grid_path, make_grid(np.stack(prompt_images), grid_cols))
        manifest.append(
            {
                "prompt": prompt,
                "grid": grid_path,
                "images": image_paths,
                "seed": seed,
                "settings": settings,
            }
        )
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args)
    check_flags(args)
    out = prepare_out_dir(args.out)
    bundle = load_bundle(args.model)

    from dalle_jax.generate import (  # noqa: PLC0415
        generate_images,
        resolve_rerank,
        resolve_settings,
    )

    # None (the flag left out) is the bundle's default; the manifest records what was done.
    rerank = resolve_rerank(bundle, args.num_images, args.rerank)
    settings = resolve_settings(
        bundle.sampling,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg_scale,
    )
    images = generate_images(
        bundle,
        prompts,
        num_images=args.num_images,
        seed=args.seed,
        batch_size=args.batch_size,
        rerank=rerank or 0,
        progress=True,
        warn=_warn,
        # top_k / top_p "off" is spelled 0 / 1 here: None would mean "the bundle's value".
        temperature=settings.temperature,
        top_k=settings.top_k or 0,
        top_p=settings.top_p or 1.0,
        cfg_scale=settings.cfg_scale,
    )
    grid_cols = args.grid_cols or math.ceil(math.sqrt(args.num_images))
    manifest = write_outputs(
        out,
        prompts,
        images,
        grid_cols=grid_cols,
        seed=args.seed,
        settings={
            **settings.to_dict(),
            "num_images": args.num_images,
            "rerank": rerank,
            "model": str(getattr(bundle, "path", args.model or DEFAULT_MODEL)),
        },
    )
    if rerank:
        source = "the bundle's default" if args.rerank is None else "--rerank"
        print(
            f"reranked: kept the {args.num_images} best of {rerank} candidates per prompt "
            f"({source}; --rerank 0 turns it off)"
        )
    for entry in manifest:
        print(f"{entry['prompt']!r}: {out / entry['grid']}")
    print(f"manifest: {out / MANIFEST_NAME}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)
