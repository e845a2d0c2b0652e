"""The bundles shipped inside the package: README command 1 works, and `pip install .` carries them.

These run the real shipped models (no stand-ins): they are what a user gets after install.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_jax.bundle import SHIPPED_BUNDLES_DIR, load_bundle, resolve_bundle_path, shipped_bundles
from sample.cli import DEFAULT_MODEL, main

REPO = Path(__file__).resolve().parents[1]
MAX_BUNDLE_BYTES = 30 * 2**20  # issue 7: each shipped bundle under 30 MB


def test_the_default_bundle_ships():
    assert DEFAULT_MODEL in shipped_bundles(), f"{SHIPPED_BUNDLES_DIR / DEFAULT_MODEL} is missing"


@pytest.mark.parametrize("name", shipped_bundles())
def test_each_shipped_bundle_is_small_loads_and_has_a_model_card(name):
    folder = SHIPPED_BUNDLES_DIR / name
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < MAX_BUNDLE_BYTES, f"{name}: {size / 2**20:.1f} MB"
    bundle = load_bundle(name)
    assert bundle.meta["weights_dtype"] == "bfloat16"
    assert bundle.reranker is not None  # `sample --rerank` works on every shipped model
    card = (folder / "MODEL_CARD.md").read_text()
    assert "evaluate --model" in card  # the card says how its figures were measured


def test_readme_command_one_draws_the_prompt(tmp_path, capsys):
    # `sample "a small red circle at the top left"`, as the README has it (plus --out).
    prompt = "a small red circle at the top left"
    assert main([prompt, "--out", str(tmp_path), "--num-images", "4"]) == 0
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())
    assert entry["prompt"] == prompt and len(entry["images"]) == 4
    assert str(tmp_path / entry["grid"]) in capsys.readouterr().out
    images = np.stack([np.asarray(Image.open(tmp_path / p)) for p in entry["images"]])
    assert images.shape == (4, 64, 64, 3)
    # A trained model draws something red on every canvas (an untrained one draws noise).
    red = (images[..., 0] > 180) & (images[..., 1] < 90) & (images[..., 2] < 90)
    assert (red.reshape(4, -1).mean(axis=1) > 0.01).all()


def test_the_wheel_carries_every_shipped_file(tmp_path):
    subprocess.run(
        # Built the way `pip install .` builds it (isolated, setuptools from the index).
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        str(f.relative_to(REPO))
        for f in SHIPPED_BUNDLES_DIR.rglob("*")
        if f.is_file() and "__pycache__" not in f.parts
    }
    assert shipped and shipped <= packaged, sorted(shipped - packaged)[:5]


def test_a_shipped_name_wins_over_a_folder_of_that_name_that_is_no_bundle(tmp_path, monkeypatch):
    # `sample --out shapes ...` leaves ./shapes behind; `--model shapes` must still work there.
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_MODEL).mkdir()
    assert resolve_bundle_path(DEFAULT_MODEL) == SHIPPED_BUNDLES_DIR / DEFAULT_MODEL
    # A real bundle folder of that name is still taken as the path it is.
    (tmp_path / DEFAULT_MODEL / "bundle.json").write_text("{}")
    assert resolve_bundle_path(DEFAULT_MODEL) == Path(DEFAULT_MODEL)


def test_the_emoji_bundle_draws_a_yellow_face(tmp_path):
    assert "emoji" in shipped_bundles()
    args = ["grinning face", "--model", "emoji", "--out", str(tmp_path), "--num-images", "4"]
    assert main(args) == 0
    (entry,) = json.loads((tmp_path / "manifest.json").read_text())
    images = np.stack([np.asarray(Image.open(tmp_path / p)) for p in entry["images"]])
    assert images.shape == (4, 32, 32, 3)
    # Every emoji style draws this face yellow on white; an untrained model draws noise.
    r, g, b = (images[..., c].astype(int) for c in range(3))
    yellow = (r > 180) & (g > 140) & (b < 110)
    assert (yellow.reshape(4, -1).mean(axis=1) > 0.2).all(), yellow.reshape(4, -1).mean(axis=1)
