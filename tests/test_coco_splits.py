"""COCO's held-out split is `val`, the commands ask for `validation`: the registry's alias.

`train vqvae` and `train reranker` evaluate on `validation`, `train encode` writes
`OUT/validation` by default and `train dalle` reads `DATA/validation`. On COCO (Karpathy splits
train/val/test/restval) a request for `validation` reads `val`, and `train` reads
`train+restval` (Karpathy's 113,287 training images). Needs the [coco] extra
(TensorFlow) to prepare the small fake COCO of `coco_fixtures`; skipped without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")

from flax import nnx  # noqa: E402

from dalle_jax import checkpoint as ckpt  # noqa: E402
from dalle_jax.data import pipeline, registry  # noqa: E402
from dalle_jax.errors import UserError  # noqa: E402
from dalle_jax.tokenizer import train_tokenizer  # noqa: E402
from train.cli import main  # noqa: E402
from vqvae.config import get_config as get_vqvae_config  # noqa: E402
from vqvae.model import create_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import coco_fixtures  # noqa: E402

pytestmark = pytest.mark.coco


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    manual_dir = coco_fixtures.write_fake_coco(tmp_path_factory.mktemp("coco_manual"))
    directory = str(tmp_path_factory.mktemp("coco_data"))
    builder = registry.builder("coco_captions", data_dir=directory, manual_dir=manual_dir)
    builder.download_and_prepare()
    return directory


def _captions(split: pipeline.Split) -> list[str]:
    return [split.normalize(split.source[i], i)["caption"] for i in range(split.num_examples)]


def test_validation_reads_karpathys_val_split(data_dir):
    validation = pipeline.open_split("coco_captions", "validation", data_dir=data_dir)
    val = pipeline.open_split("coco_captions", "val", data_dir=data_dir)
    assert validation.name == val.name == "coco_captions:val"
    assert validation.num_examples == coco_fixtures.split_sizes()["val"]
    assert _captions(validation) == _captions(val)
    # The other Karpathy splits are still there under their own names; no invented ones.
    restval = pipeline.open_split("coco_captions", "restval", data_dir=data_dir)
    assert restval.num_examples == coco_fixtures.split_sizes()["restval"] == 2


def test_train_reads_karpathys_train_and_restval(data_dir):
    train = pipeline.open_split("coco_captions", "train", data_dir=data_dir)
    assert train.name == "coco_captions:train+restval"
    sizes = coco_fixtures.split_sizes()
    assert train.num_examples == sizes["train"] + sizes["restval"]
    builder = registry.builder("coco_captions", data_dir=data_dir)
    expected = [
        source[i]["image/filename"]
        for source in (builder.as_data_source("train"), builder.as_data_source("restval"))
        for i in range(len(source))
    ]
    # Karpathy's train, then restval
    assert [train.source[i]["image/filename"] for i in range(train.num_examples)] == expected
    with pytest.raises(UserError, match="has no split 'dev'; its splits: restval, test"):
        pipeline.open_split("coco_captions", "dev", data_dir=data_dir)


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory) -> str:
    """A `train vqvae`-style workdir with random initial weights."""
    config = get_vqvae_config("tiny")
    weights = nnx.to_pure_dict(nnx.state(create_model(config, seed=1)))
    workdir = tmp_path_factory.mktemp("vqvae")
    with ckpt.Checkpointer(workdir, config={"model": config.to_dict()}) as checkpointer:
        checkpointer.save(1, {"params": weights}, force=True)
    return str(workdir)


def test_train_encode_writes_cocos_splits_under_the_names_dalle_reads(
    data_dir, vqvae_dir, tmp_path
):
    train = pipeline.open_split("coco_captions", "train", data_dir=data_dir)
    tokenizer = tmp_path / "text.model"
    tokenizer.write_bytes(train_tokenizer(_captions(train), 64, "bpe"))
    out = tmp_path / "encoded"
    argv = [
        "encode", "--vqvae", vqvae_dir, "--tokenizer", str(tokenizer),
        "--dataset", "coco_captions", "--data-dir", data_dir, "--out", str(out),
        "--text-length", "8", "--batch-size", "8",
    ]  # fmt: skip
    assert main(argv) == 0  # the default --splits train,validation
    sizes = coco_fixtures.split_sizes()
    for split, own_names in (("train", ("train", "restval")), ("validation", ("val",))):
        metadata = pipeline.read_encoded_metadata(out / split)
        assert metadata.count == sum(sizes[name] for name in own_names), split
        assert metadata.extra["split"] == "+".join(own_names)  # which COCO splits it holds
    # What `train dalle --data OUT` opens for its evaluation.
    (batch,) = pipeline.encoded_dataset(
        out / "validation", pipeline.LoaderConfig.eval(8), process_index=0, process_count=1
    )
    assert batch["image_ids"].shape == (sizes["val"], 8 * 8)
