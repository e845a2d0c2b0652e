"""`train --help`, `train data` and `train tokenizer`, end to end on a tiny registered dataset."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dalle_jax.data import registry
from dalle_jax.data.pipeline import DATA_DIR_ENV, LoaderConfig, default_data_dir, open_split
from dalle_jax.errors import UserError
from dalle_jax.tokenizer import TextTokenizer
from train.cli import main

# A real tfds builder, written to a package of its own (tfds needs builder modules in packages).
TINY_BUILDER = """
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

WORDS = ["red", "green", "blue", "circle", "square", "star"]


class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(6, 8, 3)), "caption": tfds.features.Text()}
            )
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "validation": self._generate_examples(4)}

    def _generate_examples(self, count):
        for i in range(count):
            pixels = np.full((6, 8, 3), 10 * i, np.uint8)
            caption = f"a {WORDS[i % 3]} {WORDS[3 + i % 3]} number {i}"
            yield i, {"image": Image.fromarray(pixels), "caption": caption}


def normalize(example, index):
    return {"image": example["image"], "caption": example["caption"].decode()}
"""


@pytest.fixture
def tiny_dataset(tmp_path_factory, monkeypatch):
    """Registers `tiny_test`, a 12 + 4 example dataset; returns a data dir to prepare it in."""
    root = tmp_path_factory.mktemp("tiny_pkg")
    package = root / "tiny_captions_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "builder.py").write_text(textwrap.dedent(TINY_BUILDER))
    monkeypatch.syspath_prepend(str(root))
    spec = registry.DatasetSpec("tiny_test", "tiny_captions_pkg.builder", "TinyCaptions", "tiny")
    monkeypatch.setitem(registry.DATASETS, "tiny_test", spec)
    return str(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"], ["tokenizer", "--help"]])
def test_help_exits_zero_and_explains_the_flags(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: train" in out
    assert "(default: None)" not in out
    if argv[0] == "data":
        assert "--data-dir" in out and "DALLE_JAX_DATA_DIR" in out and "shapes_world" in out
    if argv[0] == "tokenizer":
        assert "--vocab-size" in out and "--max-captions" in out


def test_train_help_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "tokenizer" in result.stdout and "data" in result.stdout


def test_data_then_tokenizer_end_to_end(tiny_dataset, tmp_path, capsys):
    assert main(["data", "--dataset", "tiny_test", "--data-dir", tiny_dataset]) == 0
    out = capsys.readouterr().out
    assert "train: 12 examples" in out and "validation: 4 examples" in out
    assert main(["data", "--dataset", "tiny_test", "--data-dir", tiny_dataset]) == 0
    assert "already prepared" in capsys.readouterr().out

    model = tmp_path / "text.model"
    argv = ["tokenizer", "--dataset", "tiny_test", "--data-dir", tiny_dataset, "--out", str(model)]
    assert main([*argv, "--vocab-size", "60", "--model-type", "bpe", "--text-length", "4"]) == 0
    out = capsys.readouterr().out
    tokenizer = TextTokenizer.from_file(model)
    assert f"vocab size: {tokenizer.vocab_size}" in out
    assert "captions: 12" in out and "longer than --text-length 4" in out
    split = open_split("tiny_test", "train", data_dir=tiny_dataset)
    captions = [split.normalize(split.source[i], i)["caption"] for i in range(12)]
    assert tokenizer.decode(tokenizer.encode(captions, 16)) == captions

    # The prepared split feeds the pipeline: images resized, captions tokenized.
    from dalle_jax.data.pipeline import image_text_dataset

    loader = LoaderConfig.eval(batch_size=5)
    batches = list(
        image_text_dataset(
            split.source,
            split.normalize,
            loader,
            image_size=4,
            tokenizer=tokenizer,
            text_length=8,
            process_index=0,
            process_count=1,
        )
    )
    assert [b["images"].shape for b in batches] == [(5, 4, 4, 3)] * 2 + [(2, 4, 4, 3)]
    images = np.concatenate([b["images"] for b in batches])
    texts = np.concatenate([b["captions"] for b in batches])
    for image, caption in zip(images, texts, strict=True):
        assert np.all(image == 10 * int(caption.split()[-1]))  # each image with its own caption


def test_max_captions_limits_the_corpus(tiny_dataset, tmp_path, capsys):
    main(["data", "--dataset", "tiny_test", "--data-dir", tiny_dataset])
    capsys.readouterr()
    model = tmp_path / "text.model"
    argv = ["tokenizer", "--dataset", "tiny_test", "--data-dir", tiny_dataset, "--out", str(model)]
    assert main([*argv, "--vocab-size", "40", "--max-captions", "3", "--split", "validation"]) == 0
    assert "captions: 3," in capsys.readouterr().out


def test_user_errors_are_one_line_messages(tiny_dataset, tmp_path, capsys):
    out = str(tmp_path / "t.model")
    assert main(["data", "--dataset", "mnist", "--data-dir", tiny_dataset]) == 2
    assert "known datasets:" in capsys.readouterr().err

    argv = ["tokenizer", "--dataset", "tiny_test", "--vocab-size", "40", "--out", out]
    assert main([*argv, "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not prepared" in err and "train data --dataset tiny_test" in err

    main(["data", "--dataset", "tiny_test", "--data-dir", tiny_dataset])
    capsys.readouterr()
    assert main([*argv, "--data-dir", tiny_dataset, "--split", "test"]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    assert (
        main(["data", "--dataset", "tiny_test", "--data-dir", tiny_dataset, "--folder", "x"]) == 2
    )
    assert "does not take --folder" in capsys.readouterr().err
    assert main(["data", "--dataset", "image_folder", "--data-dir", tiny_dataset]) == 2
    assert "needs --folder DIR" in capsys.readouterr().err
    bad_out = str(tmp_path / "no" / "such" / "t.model")
    assert main([*argv[:-1], bad_out, "--data-dir", tiny_dataset]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    monkeypatch.delenv(DATA_DIR_ENV)
    assert default_data_dir().endswith("tensorflow_datasets")


def test_open_split_needs_a_prepared_dataset(tiny_dataset):
    with pytest.raises(UserError, match="run `train data"):
        open_split("tiny_test", "train", data_dir=tiny_dataset)
