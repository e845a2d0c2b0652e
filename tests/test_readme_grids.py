"""`docs/make_readme_grids.py` on a tiny random-init bundle: files, layout, determinism."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import IMAGE_SIZE, make_bundle
from PIL import Image

from dalle_jax.bundle import load_bundle
from dalle_jax.generate import generate_images

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "make_readme_grids.py"
NUM_IMAGES = 3
TILE_SIZE = 2 * IMAGE_SIZE  # the 16 px images are upscaled 2x


def load_script():
    spec = importlib.util.spec_from_file_location("make_readme_grids", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grids = load_script()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


def run(bundle_dir: Path, out: Path, *extra: str) -> int:
    return grids.main(
        [
            "--model",
            str(bundle_dir),
            "--prompt-set",
            "shapes",
            "--out",
            str(out),
            "--num-images",
            str(NUM_IMAGES),
            "--tile-size",
            str(TILE_SIZE),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def first_run(bundle_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grids")
    assert run(bundle_dir, out) == 0
    return out


def test_writes_a_grid_with_one_row_per_prompt_and_its_record(bundle_dir, first_run):
    png, record_path = first_run / "tiny_grid.png", first_run / "tiny_grid.json"
    rows = len(grids.SHAPES_PROMPTS)
    with Image.open(png) as image:
        assert image.mode == "RGB"
        assert image.size == (
            NUM_IMAGES * (TILE_SIZE + grids.PADDING) + grids.PADDING,
            rows * (TILE_SIZE + grids.PADDING) + grids.PADDING,
        )
    record = json.loads(record_path.read_text())
    assert record["prompts"] == list(grids.SHAPES_PROMPTS)
    # 4 in-distribution prompts, then 2 with a held-out color-shape pair.
    assert record["held_out"] == [False] * 4 + [True] * 2
    assert record["seed"] == 0 and record["num_images"] == NUM_IMAGES
    assert record["tile_size"] == TILE_SIZE and record["image_size"] == IMAGE_SIZE
    assert record["provenance"] == {"made_by": "tests/bundle_factory.py"}
    assert record["settings"]["top_k"] == 16  # the bundle's default sampling settings
    assert len(record["bundle_sha256"]) == 64


def test_the_grid_holds_the_images_drawn_in_order_upscaled(bundle_dir, first_run):
    prompts = list(grids.SHAPES_PROMPTS)
    drawn = generate_images(
        load_bundle(bundle_dir), prompts, num_images=NUM_IMAGES, seed=0, progress=False
    )
    grid = np.asarray(Image.open(first_run / "tiny_grid.png"))
    step, pad = TILE_SIZE + grids.PADDING, grids.PADDING
    for row in (0, len(prompts) - 1):
        for col in range(NUM_IMAGES):
            tile = grid[pad + row * step :, pad + col * step :][:TILE_SIZE, :TILE_SIZE]
            expected = drawn[row][col].repeat(2, axis=0).repeat(2, axis=1)
            np.testing.assert_array_equal(tile, expected)


def test_same_seed_same_png_bytes_another_seed_another_png(bundle_dir, first_run, tmp_path):
    again, other_seed = tmp_path / "again", tmp_path / "seed1"
    assert run(bundle_dir, again) == 0
    assert run(bundle_dir, other_seed, "--seed", "1") == 0
    first = (first_run / "tiny_grid.png").read_bytes()
    assert (again / "tiny_grid.png").read_bytes() == first
    assert (other_seed / "tiny_grid.png").read_bytes() != first
    assert json.loads((other_seed / "tiny_grid.json").read_text())["seed"] == 1


def test_prints_the_markdown_to_paste(bundle_dir, tmp_path, capsys):
    assert run(bundle_dir, tmp_path) == 0
    printed = capsys.readouterr().out
    assert f"![tiny samples]({tmp_path / 'tiny_grid.png'})" in printed
    assert '5. "a blue circle" *(held-out pair: never seen in training)*' in printed
    assert '1. "a small red circle at the top left"\n' in printed


def test_a_bundle_without_a_prompt_set_is_a_one_line_error(bundle_dir, tmp_path, capsys):
    code = grids.main(["--model", str(bundle_dir), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no prompt set for bundle 'tiny'") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_emoji_prompts_are_never_marked_held_out(bundle_dir, tmp_path):
    assert run(bundle_dir, tmp_path, "--prompt-set", "emoji", "--num-images", "1") == 0
    record = json.loads((tmp_path / "tiny_grid.json").read_text())
    assert record["prompts"] == list(grids.EMOJI_PROMPTS)
    assert record["held_out"] == [False] * len(grids.EMOJI_PROMPTS)
