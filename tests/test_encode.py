"""Encoding a dataset once into stage-2 records (`dalle_jax.encode`, `train encode`)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from dalle_jax import encode as enc
from dalle_jax import vqvae_training as vt
from dalle_jax.checkpoint import checkpoints_dir
from dalle_jax.data import pipeline, registry
from dalle_jax.tokenizer import PAD_ID, TextTokenizer, train_tokenizer
from train.cli import main
from vqvae.model import encode

DATASET = "shapes_world/tiny32"
TEXT_LENGTH = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("data"))
    registry.builder(DATASET, data_dir=directory).download_and_prepare()
    return directory


@pytest.fixture(scope="module")
def vqvae_dir(data_dir, tmp_path_factory) -> str:
    """A tiny vqvae trained for two steps (enough to be a real `train vqvae` workdir)."""
    workdir = str(tmp_path_factory.mktemp("vqvae"))
    job = vt.get_job("tiny").replace(data_dir=data_dir)
    vt.train_and_evaluate(job, workdir, stop_after=2)
    return workdir


@pytest.fixture(scope="module")
def tokenizer_file(data_dir, tmp_path_factory) -> str:
    split = pipeline.open_split(DATASET, "train", data_dir=data_dir)
    captions = [split.normalize(split.source[i], i)["caption"] for i in range(200)]
    path = tmp_path_factory.mktemp("tokenizer") / "text.model"
    path.write_bytes(train_tokenizer(captions, 120, "bpe"))
    return str(path)


def examples(split: pipeline.Split, image_size: int):
    """The split as training sees it, in order: (images uint8 [N, S, S, 3], captions)."""
    (batch,) = pipeline.image_text_dataset(
        split.source,
        split.normalize,
        pipeline.LoaderConfig.eval(split.num_examples),
        image_size=image_size,
        process_index=0,
        process_count=1,
    )
    return batch["images"], list(batch["captions"])


def read_all(out_dir) -> dict:
    (batch,) = pipeline.encoded_dataset(out_dir, pipeline.LoaderConfig.eval(10_000))
    return batch


def test_records_hold_the_tokenizer_and_vqvae_ids_of_every_example(
    data_dir, vqvae_dir, tokenizer_file, tmp_path
):
    model = vt.load_vqvae(vqvae_dir)
    tokenizer = TextTokenizer.from_file(tokenizer_file)
    split = pipeline.open_split(DATASET, "validation", data_dir=data_dir)
    mesh = vt.data_mesh()
    out = tmp_path / "validation"
    # Other tests may have compiled this config on this mesh at other batch sizes.
    enc.compiled_encode.cache_clear()
    # 64 examples in global batches of 24 over 8 devices: 24 + 24 + 16 (padded to 24).
    metadata = enc.encode_split(
        model, tokenizer, split, out, text_length=TEXT_LENGTH, batch_size=24, extra={"a": 1}
    )
    assert metadata.count == split.num_examples == 64
    assert metadata.image_grid == (8, 8) and metadata.text_length == TEXT_LENGTH
    assert metadata.image_vocab_size == 32 and metadata.text_vocab_size == tokenizer.vocab_size
    assert metadata.extra == {
        "dataset": DATASET,
        "split": "validation",
        "num_examples": 64,
        "image_size": 32,
        "vqvae_config": model.config.to_dict(),
        "text_length": TEXT_LENGTH,
        "a": 1,
    }
    assert pipeline.read_encoded_metadata(out) == metadata
    # One compiled program for all three batches, the short one included.
    assert enc.compiled_encode(model.config, mesh)._cache_size() == 1

    records = read_all(out)
    np.testing.assert_array_equal(records["index"], np.arange(64))
    images, captions = examples(split, 32)
    np.testing.assert_array_equal(records["text_ids"], tokenizer.encode(captions, TEXT_LENGTH))
    assert (records["text_ids"] != PAD_ID).any(axis=1).all()
    expected_ids = np.asarray(nnx.jit(encode)(model, images)).reshape(64, -1)
    np.testing.assert_array_equal(records["image_ids"], expected_ids)
    assert len(np.unique(expected_ids)) > 1  # not a degenerate all-one-code vqvae

    # Training reads them shuffled, batched and resumably like any other pipeline.
    loader = pipeline.LoaderConfig.train(16, seed=3)
    batch = next(iter(pipeline.encoded_dataset(out, loader)))
    assert batch["image_ids"].shape == (16, 64) and batch["text_ids"].shape == (16, TEXT_LENGTH)
    np.testing.assert_array_equal(batch["image_ids"], expected_ids[batch["index"]])


def test_train_encode_writes_one_folder_per_split(
    data_dir, vqvae_dir, tokenizer_file, tmp_path, capsys
):
    out = tmp_path / "encoded"
    argv = [
        "encode",
        "--vqvae",
        vqvae_dir,
        "--tokenizer",
        tokenizer_file,
        "--dataset",
        DATASET,
        "--out",
        str(out),
        "--data-dir",
        data_dir,
        "--splits",
        "validation,test",
        "--text-length",
        str(TEXT_LENGTH),
        "--batch-size",
        "24",
    ]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("validation: 64 records in 1 shard(s)")
    assert lines[1].startswith("test: 64 records in 1 shard(s)")
    assert sorted(p.name for p in out.iterdir()) == ["test", "validation"]
    extra = json.loads((out / "test" / "metadata.json").read_text())["extra"]
    assert extra["split"] == "test" and extra["dataset"] == DATASET
    assert extra["vqvae"] == str(Path(vqvae_dir).resolve())
    assert extra["vqvae_checkpoint"] == str(checkpoints_dir(vqvae_dir) / "2")
    assert extra["tokenizer"] == str(Path(tokenizer_file).resolve())
    with open(tokenizer_file, "rb") as f:
        assert extra["tokenizer_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert read_all(out / "test")["image_ids"].shape == (64, 64)

    # Encoding again into the same folder is refused before any work, unless asked for.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds encoded data" in err and "--overwrite" in err
    assert main([*argv, "--splits", "test", "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--vqvae": "{tmp}/missing"}, "--vqvae {tmp}/missing: no such file or directory"),
        ({"--vqvae": "{tmp}"}, "no complete checkpoint found there"),
        ({"--tokenizer": "{tmp}/missing.model"}, "tokenizer model '{tmp}/missing.model' not found"),
        ({"--splits": "validation,nope"}, "has no split 'nope'"),
        ({"--text-length": "0"}, "text length must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    change, expected, data_dir, vqvae_dir, tokenizer_file, tmp_path, capsys
):
    flags = {
        "--vqvae": vqvae_dir,
        "--tokenizer": tokenizer_file,
        "--dataset": DATASET,
        "--out": str(tmp_path / "out"),
        "--data-dir": data_dir,
        "--splits": "validation",
    }
    flags.update({k: v.replace("{tmp}", str(tmp_path)) for k, v in change.items()})
    argv = ["encode", *[item for pair in flags.items() for item in pair]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expected.replace("{tmp}", str(tmp_path)) in err
    assert not list((tmp_path / "out").glob("*/metadata.json"))
