"""`generate_images` and the `sample` command on a tiny random-init bundle exported to disk."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import IMAGE_SIZE, make_bundle
from PIL import Image

from dalle_jax.bundle import add_reranker, load_bundle
from dalle_jax.errors import UserError
from dalle_jax.generate import check_rerank_per_image, default_rerank, generate_images
from dalle_jax.tokenizer import TextTokenizer
from sample.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


# ---- generate_images -------------------------------------------------------------------------
def as_array(images) -> np.ndarray:
    return np.stack([np.stack(per_prompt) for per_prompt in images])


def test_generate_images_same_seed_same_images_whatever_the_batch_size(bundle):
    prompts = ["a red circle", "a blue square above a green star"]
    run = lambda **kw: as_array(  # noqa: E731
        generate_images(bundle, prompts, num_images=3, progress=False, **kw)
    )
    first = run(seed=5, batch_size=4)  # 6 images: a full batch and a padded one
    assert first.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(run(seed=5, batch_size=4), first)
    np.testing.assert_array_equal(run(seed=5, batch_size=1), first)
    assert (run(seed=6, batch_size=4) != first).any()
    # The images within a prompt differ too (each has its own key).
    assert (first[0, 0] != first[0, 1]).any()


def test_generate_images_settings_default_to_the_bundle(bundle):
    prompts = ["a red circle"]
    from_bundle = generate_images(bundle, prompts, num_images=2, seed=3, progress=False)
    explicit = generate_images(
        bundle,
        prompts,
        num_images=2,
        seed=3,
        progress=False,
        temperature=1.0,
        top_k=16,
        top_p=1.0,
        cfg_scale=2.0,
    )
    np.testing.assert_array_equal(as_array(from_bundle), as_array(explicit))
    greedy = generate_images(bundle, prompts, num_images=2, seed=3, progress=False, temperature=0)
    # Greedy ignores the keys: both images are the same, and unlike the sampled ones.
    np.testing.assert_array_equal(greedy[0][0], greedy[0][1])
    assert (as_array(greedy) != as_array(from_bundle)).any()


class BrightnessReranker:
    """A stand-in reranker: brighter images score higher."""

    def __init__(self):
        self.calls = []

    def score(self, images, prompts):
        self.calls.append((images.shape, list(prompts)))
        return images.reshape(len(images), -1).mean(axis=1)


def test_generate_images_rerank_keeps_the_best_candidates(bundle):
    reranker = BrightnessReranker()
    with_reranker = dataclasses.replace(bundle, reranker=reranker)
    prompts = ["a red circle", "a green star"]
    kept = generate_images(
        with_reranker, prompts, num_images=2, rerank=5, seed=9, batch_size=4, progress=False
    )
    # The candidates are what sampling 5 images per prompt with the same seed gives.
    candidates = generate_images(bundle, prompts, num_images=5, seed=9, progress=False)
    for prompt_kept, prompt_candidates in zip(kept, candidates, strict=True):
        brightness = [float(image.mean()) for image in prompt_candidates]
        best = np.argsort(brightness)[::-1][:2]
        np.testing.assert_array_equal(np.stack(prompt_kept), np.stack(prompt_candidates)[best])
    assert reranker.calls == [
        ((5, IMAGE_SIZE, IMAGE_SIZE, 3), ["a red circle"] * 5),
        ((5, IMAGE_SIZE, IMAGE_SIZE, 3), ["a green star"] * 5),
    ]


def with_rerank_default(bundle, per_image, reranker):
    """The bundle with `rerank_per_image` in its sampling dict and the given reranker."""
    sampling = {**bundle.sampling, "rerank_per_image": per_image}
    return dataclasses.replace(bundle, sampling=sampling, reranker=reranker)


def test_generate_images_reranks_by_the_bundles_default(bundle):
    prompts = ["a red circle", "a green star"]
    reranker = BrightnessReranker()
    defaulted = with_rerank_default(bundle, 3, reranker)
    run = lambda b, **kw: as_array(  # noqa: E731
        generate_images(b, prompts, num_images=2, seed=4, batch_size=4, progress=False, **kw)
    )
    kept = run(defaulted)  # rerank=None: the bundle's default, 3 candidates per image kept
    assert [shape for shape, _ in reranker.calls] == [(6, IMAGE_SIZE, IMAGE_SIZE, 3)] * 2
    np.testing.assert_array_equal(
        kept, run(dataclasses.replace(bundle, reranker=reranker), rerank=6)
    )
    plain = run(bundle)
    assert (kept != plain).any()
    # rerank=0 turns the default off: the images of a bundle without one.
    calls = len(reranker.calls)
    np.testing.assert_array_equal(run(defaulted, rerank=0), plain)
    assert len(reranker.calls) == calls
    # An explicit rerank wins over the default: 4 candidates per prompt, not 6.
    run(defaulted, rerank=4)
    assert [shape[0] for shape, _ in reranker.calls[calls:]] == [4, 4]
    # A default on a bundle without a reranker: N images drawn, none reranked.
    np.testing.assert_array_equal(run(with_rerank_default(bundle, 3, None)), plain)


def test_default_rerank_is_k_times_n_with_a_reranker_and_k_above_1(bundle):
    reranker = BrightnessReranker()
    assert default_rerank(with_rerank_default(bundle, 16, reranker), 4) == 64
    assert default_rerank(with_rerank_default(bundle, 16, None), 4) is None
    assert default_rerank(with_rerank_default(bundle, 1, reranker), 4) is None
    assert default_rerank(dataclasses.replace(bundle, reranker=reranker), 4) is None  # no key
    for bad in (0, -3, "x", 2.5, True):
        with pytest.raises(UserError, match="'rerank_per_image' must be a whole number") as error:
            default_rerank(with_rerank_default(bundle, bad, reranker), 4)
        assert "\n" not in str(error.value) and "bundle.json" in str(error.value)
    assert check_rerank_per_image(None) == 1 and check_rerank_per_image(np.int64(8)) == 8


def test_generate_images_bad_input(bundle):
    with pytest.raises(UserError, match="no reranker"):
        generate_images(bundle, ["a red circle"], num_images=2, rerank=4, progress=False)
    with pytest.raises(UserError, match="empty"):
        generate_images(bundle, ["a red circle", "  "], progress=False)
    with pytest.raises(UserError, match="no prompts"):
        generate_images(bundle, [], progress=False)
    with pytest.raises(UserError, match="at least 1"):
        generate_images(bundle, ["a red circle"], num_images=0, progress=False)
    with pytest.raises(UserError, match="rerank 2"):
        generate_images(bundle, ["a red circle"], num_images=3, rerank=2, progress=False)
    with pytest.raises(UserError, match="rerank -1 is negative"):
        generate_images(bundle, ["a red circle"], num_images=3, rerank=-1, progress=False)


def test_generate_images_warns_once_about_long_prompts(bundle):
    warnings = []
    long_prompt = " ".join(["a red circle above a blue square"] * 4)
    images = generate_images(
        bundle,
        [long_prompt, long_prompt + " star", "a star"],
        num_images=1,
        progress=False,
        warn=warnings.append,
    )
    assert len(images) == 3
    assert len(warnings) == 1 and "2 prompt(s) longer than the 8 tokens" in warnings[0]


# ---- the command -----------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.png"))}


CLI_PROMPTS = ["a red circle", "a blue star above a green square"]


@pytest.fixture(scope="module")
def first_run(bundle_dir, tmp_path_factory):
    """One `sample` run (module fixtures cannot use capsys): (exit code, stdout, stderr, out)."""
    out = tmp_path_factory.mktemp("run") / "samples"
    argv = [
        *CLI_PROMPTS,
        "--model",
        bundle_dir,
        "--num-images",
        "3",
        "--seed",
        "11",
        "--out",
        out,
        "--batch-size",
        "4",
        "--top-k",
        "0",
    ]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_cli_writes_grids_images_and_manifest(first_run, bundle_dir):
    code, out_text, err_text, out = first_run
    assert code == 0, err_text
    manifest = json.loads((out / "manifest.json").read_text())
    assert [entry["prompt"] for entry in manifest] == CLI_PROMPTS
    for entry in manifest:
        assert set(entry) == {"prompt", "grid", "images", "seed", "settings"}
        assert entry["seed"] == 11
        settings = entry["settings"]
        # --top-k 0 turned the bundle's top-k off; the rest are the bundle's defaults.
        assert settings["top_k"] is None and settings["top_p"] is None
        assert settings["temperature"] == 1.0 and settings["cfg_scale"] == 2.0
        assert settings["num_images"] == 3 and settings["rerank"] is None
        assert Path(settings["model"]) == Path(bundle_dir)
        assert not Path(entry["grid"]).is_absolute()
        assert len(entry["images"]) == 3
        for relative in entry["images"]:
            with Image.open(out / relative) as image:
                assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        with Image.open(out / entry["grid"]) as grid:
            # 3 images in ceil(sqrt(3)) = 2 columns, 2 rows, 2 px of padding around each.
            side = 2 * (IMAGE_SIZE + 2) + 2
            assert grid.size == (side, side)
            grid_pixels = np.asarray(grid)
        with Image.open(out / entry["images"][1]) as image:
            second = np.asarray(image)
        np.testing.assert_array_equal(
            grid_pixels[2 : 2 + IMAGE_SIZE, 4 + IMAGE_SIZE : 4 + 2 * IMAGE_SIZE], second
        )
        assert str(out / entry["grid"]) in out_text  # where the grids are
    assert len(png_bytes(out)) == 2 * (3 + 1)


def test_cli_same_seed_same_png_bytes(first_run, bundle_dir, tmp_path, capsys):
    _, _, _, out = first_run
    argv = [
        *CLI_PROMPTS,
        "--model",
        bundle_dir,
        "--num-images",
        "3",
        "--out",
        tmp_path / "again",
        "--top-k",
        "0",
    ]
    code, _, err = run_cli(capsys, *argv, "--seed", "11", "--batch-size", "2")
    assert code == 0, err
    assert png_bytes(tmp_path / "again") == png_bytes(out)
    code, _, err = run_cli(
        capsys,
        *argv[:-4],
        "--out",
        tmp_path / "other",
        "--top-k",
        "0",
        "--seed",
        "12",
        "--batch-size",
        "4",
    )
    assert code == 0, err
    assert png_bytes(tmp_path / "other") != png_bytes(out)


def test_cli_long_prompt_is_cut_with_one_warning(bundle_dir, tmp_path, capsys):
    long_prompt = " ".join(["a purple triangle above an orange star"] * 3)
    code, _, err = run_cli(
        capsys,
        long_prompt,
        long_prompt + " again",
        "--model",
        bundle_dir,
        "--num-images",
        "1",
        "--out",
        tmp_path,
    )
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "cut" in lines[0]
    assert len(json.loads((tmp_path / "manifest.json").read_text())) == 2


def test_cli_prompts_file(bundle_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n\n  a green star  \n")
    code, _, err = run_cli(
        capsys,
        "a blue square",
        "--prompts-file",
        prompts_file,
        "--model",
        bundle_dir,
        "--num-images",
        "1",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e["prompt"] for e in manifest] == ["a blue square", "a red circle", "a green star"]


@pytest.mark.slow  # compiles the reranker too (~10 s); the selection is tested above
def test_cli_rerank_with_the_bundles_reranker(bundle_dir, tmp_path, capsys):
    from dalle_jax import reranker as reranker_lib

    with_reranker = tmp_path / "bundle"
    shutil.copytree(bundle_dir, with_reranker)
    tokenizer = TextTokenizer.from_file(with_reranker / "tokenizer.model")
    config = reranker_lib.get_config(
        "tiny",
        image_size=IMAGE_SIZE,
        text_vocab_size=tokenizer.vocab_size,
        tokenizer_sha256=reranker_lib.tokenizer_sha256(tokenizer.to_bytes()),
    )
    add_reranker(with_reranker, config, reranker_lib.create_reranker(config))
    code, _, err = run_cli(
        capsys,
        "a red circle",
        "--model",
        with_reranker,
        "--num-images",
        "2",
        "--rerank",
        "3",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(entry["images"]) == 2 and entry["settings"]["rerank"] == 3


def read_images(out: Path, entry: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(out / relative)) for relative in entry["images"]])


def test_cli_reranks_by_the_bundles_default_and_rerank_0_turns_it_off(
    bundle, tmp_path, capsys, monkeypatch
):
    import sample.cli as sample_cli

    defaulted = with_rerank_default(bundle, 2, BrightnessReranker())
    monkeypatch.setattr(sample_cli, "load_bundle", lambda model: defaulted)
    argv = ["a red circle", "--num-images", "2", "--seed", "3", "--batch-size", "4"]
    drawn = lambda b, **kw: np.stack(  # noqa: E731
        generate_images(b, ["a red circle"], num_images=2, seed=3, progress=False, **kw)[0]
    )

    code, out_text, err = run_cli(capsys, *argv, "--out", tmp_path / "default")
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert entry["settings"]["rerank"] == 4  # 2 candidates per image kept, 2 images
    assert "best of 4 candidates per prompt (the bundle's default" in out_text
    np.testing.assert_array_equal(read_images(tmp_path / "default", entry), drawn(defaulted))

    code, out_text, err = run_cli(capsys, *argv, "--rerank", "0", "--out", tmp_path / "off")
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "off" / "manifest.json").read_text())
    assert entry["settings"]["rerank"] is None and "reranked" not in out_text
    np.testing.assert_array_equal(read_images(tmp_path / "off", entry), drawn(bundle))


def corrupt_json(bundle_copy: Path) -> None:
    (bundle_copy / "bundle.json").write_text("{not json")


def drop_weights(bundle_copy: Path) -> None:
    shutil.rmtree(bundle_copy / "transformer")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["", "--model", "{bundle}"], "empty"),
        (["a red circle", "  ", "--model", "{bundle}"], "prompt 2 is empty"),
        (["--model", "{bundle}"], "no prompts"),
        (["--prompts-file", "{tmp}/missing.txt", "--model", "{bundle}"], "cannot read"),
        (["a red circle", "--num-images", "0", "--model", "{bundle}"], "at least 1"),
        (["a red circle", "--num-images", "4", "--rerank", "2", "--model", "{bundle}"], "rerank 2"),
        (["a red circle", "--rerank", "-1", "--model", "{bundle}"], "rerank -1 is negative"),
        (
            ["a red circle", "--rerank", "4", "--model", "{bundle}", "--out", "{tmp}/o"],
            "no reranker",
        ),
        (["a red circle", "--out", "{tmp}/a_file/sub", "--model", "{bundle}"], "cannot write"),
        (["a red circle", "--top-p", "0", "--model", "{bundle}"], "top-p"),
        (["a red circle", "--temperature", "-1", "--model", "{bundle}"], "temperature"),
        (["a red circle", "--model", "{tmp}/no_such_bundle"], "not found"),
        (["a red circle", "--model", "{corrupt_json}", "--out", "{tmp}/o"], "not valid JSON"),
        (["a red circle", "--model", "{no_weights}", "--out", "{tmp}/o"], "transformer"),
    ],
    ids=[
        "empty-prompt",
        "one-empty-prompt",
        "no-prompts",
        "missing-prompts-file",
        "zero-images",
        "rerank-below-n",
        "negative-rerank",
        "rerank-without-reranker",
        "unwritable-out",
        "bad-top-p",
        "bad-temperature",
        "missing-bundle",
        "corrupt-bundle-json",
        "missing-weights",
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, expected, bundle_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("a file, not a folder")
    places = {"bundle": str(bundle_dir), "tmp": str(tmp_path)}
    for name, damage in (("corrupt_json", corrupt_json), ("no_weights", drop_weights)):
        if any("{" + name + "}" in a for a in argv):
            copy = tmp_path / name
            shutil.copytree(bundle_dir, copy)
            damage(copy)
            places[name] = str(copy)
    code, out, err = run_cli(capsys, *(a.format(**places) for a in argv))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert out == ""


def test_cli_without_model_names_the_missing_default(tmp_path, capsys, monkeypatch):
    from dalle_jax import bundle as bundle_lib

    # An install without the shipped model (e.g. a source tree whose bundle was deleted).
    monkeypatch.setattr(bundle_lib, "SHIPPED_BUNDLES_DIR", tmp_path / "no_bundles")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()  # a local folder of that name is not the shipped model
    code, _, err = run_cli(capsys, "a red circle")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "shipped bundle 'shapes'" in line and "--model" in line


def test_cli_in_a_fresh_process_help_and_error_without_traceback():
    completed = subprocess.run(
        [sys.executable, "-m", "sample", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert completed.returncode == 0
    for flag in (
        "--prompts-file",
        "--model",
        "--num-images",
        "--seed",
        "--out",
        "--temperature",
        "--top-k",
        "--top-p",
        "--cfg-scale",
        "--rerank",
        "--batch-size",
        "--grid-cols",
    ):
        assert flag in completed.stdout
    assert "(default: 4)" in completed.stdout and "(default: samples)" in completed.stdout
    help_text = " ".join(completed.stdout.split())
    assert "0 = no reranking (default: the bundle's" in help_text
    completed = subprocess.run(
        [sys.executable, "-m", "sample", "a red circle", "--num-images", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1


# ---- reranking with the transformer's likelihood ----------------------------------------------
class ConstantReranker:
    """A reranker with no opinion: every candidate scores the same."""

    def score(self, images, prompts):
        return np.zeros(len(images))


def test_rerank_scores_standardise_and_weight_the_likelihood():
    from dalle_jax.generate import rerank_scores

    reranker = np.array([0.30, 0.31, 0.29, 0.30])  # cosines: tiny spread
    log_likelihood = np.array([-120.0, -160.0, -100.0, -130.0])  # nats: large spread
    assert np.argmax(rerank_scores(reranker, log_likelihood, 0.0)) == 1  # the reranker alone
    assert np.argmax(rerank_scores(reranker, log_likelihood, 0.25)) == 1  # a small nudge
    assert np.argmax(rerank_scores(reranker, log_likelihood, 4.0)) == 2  # the likelihood rules
    # Equal scores standardise to zeros, not NaN: the other score decides alone.
    flat = rerank_scores(np.zeros(4), log_likelihood, 1.0)
    assert np.all(np.isfinite(flat)) and np.argmax(flat) == 2


def test_a_likelihood_weight_keeps_the_candidate_the_transformer_finds_likeliest(bundle):
    from dalle_jax.evaluation.evaluate import reconstruct, token_nll
    from dalle_jax.generate import resolve_likelihood_weight

    prompts = ["a red circle", "a green star"]
    undecided = dataclasses.replace(bundle, reranker=ConstantReranker())
    kept = generate_images(
        undecided, prompts, num_images=1, rerank=6, likelihood_weight=1.0, seed=2,
        batch_size=4, progress=False,
    )  # fmt: skip
    candidates = as_array(generate_images(bundle, prompts, num_images=6, seed=2, progress=False))
    config = bundle.transformer.config
    for p, prompt in enumerate(prompts):
        # Scored by evaluation's own code: the ids the vqvae reads back, teacher-forced NLL.
        ids = reconstruct(bundle.vqvae, candidates[p], batch_size=6)["ids"].reshape(6, -1)
        text = np.repeat(bundle.tokenizer.encode([prompt], config.text_length), 6, axis=0)
        _, nll = token_nll(bundle.transformer, text, ids, batch_size=6)
        np.testing.assert_array_equal(kept[p][0], candidates[p][np.argmin(nll)])
    # Without the weight the constant reranker keeps the first candidate (a stable sort).
    first = generate_images(
        undecided, prompts, num_images=1, rerank=6, seed=2, batch_size=4, progress=False
    )
    for p in range(2):
        np.testing.assert_array_equal(first[p][0], candidates[p][0])

    # The weight defaults to the bundle's; an explicit one wins; a bad one is a UserError.
    weighted = dataclasses.replace(
        undecided, sampling={**bundle.sampling, "rerank_likelihood_weight": 1.0}
    )
    assert resolve_likelihood_weight(weighted, None) == 1.0
    assert resolve_likelihood_weight(weighted, 0) == 0.0
    assert resolve_likelihood_weight(bundle, None) == 0.0
    by_default = generate_images(weighted, prompts, num_images=1, rerank=6, seed=2, progress=False)
    np.testing.assert_array_equal(as_array(by_default), as_array(kept))
    with pytest.raises(UserError, match="must be a number >= 0"):
        generate_images(weighted, prompts, rerank=6, likelihood_weight=-1.0, progress=False)
