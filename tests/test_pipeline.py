"""The grain input pipelines: order, sharding, resume, image preparation, encoded shards."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from dalle_jax.data.pipeline import (
    LoaderConfig,
    describe_batch,
    encoded_dataset,
    image_text_dataset,
    prepare_image,
    read_encoded_metadata,
    scale_images,
    state_for_process,
    write_encoded_shards,
)
from dalle_jax.errors import UserError
from dalle_jax.tokenizer import PAD_ID, TextTokenizer, train_tokenizer

NUM_EXAMPLES = 23  # odd and prime: no batch size or host count divides it


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _source(count=NUM_EXAMPLES, height=10, width=12):
    """In-memory random-access examples: PNG bytes whose pixels all equal the index."""
    return [
        {"png": _png(np.full((height, width, 3), i, np.uint8)), "text": f"shape {i}".encode()}
        for i in range(count)
    ]


def normalize(example, index):
    return {"image": example["png"], "caption": example["text"]}


def _dataset(loader, source=None, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return image_text_dataset(
        source if source is not None else _source(), normalize, loader, image_size=8, **kwargs
    )


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _indices(batches):
    return [b["index"].tolist() for b in batches]


# --------------------------------------------------------------------------- batches


def test_batches_have_the_documented_shapes_and_match_their_examples():
    loader = LoaderConfig.train(batch_size=4, seed=3)
    batch = next(iter(_dataset(loader)))
    assert batch["images"].dtype == np.uint8 and batch["images"].shape == (4, 8, 8, 3)
    assert batch["index"].dtype == np.int64 and batch["index"].shape == (4,)
    assert batch["captions"].shape == (4,)
    summary = describe_batch(batch)
    assert summary.startswith("images: uint8[4, 8, 8, 3], captions: <U")
    assert summary.endswith("index: int64[4]")
    for image, index, caption in zip(
        batch["images"], batch["index"], batch["captions"], strict=True
    ):
        assert np.all(image == index)  # the image really is example `index`
        assert caption == f"shape {index}"


def test_scaled_images_are_float32_in_minus_one_to_one():
    loader = LoaderConfig.eval(batch_size=NUM_EXAMPLES)
    batch = next(iter(_dataset(loader, scale=True)))
    assert batch["images"].dtype == np.float32
    np.testing.assert_allclose(batch["images"][:, 0, 0, 0], batch["index"] / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(scale_images(np.array([0, 255], np.uint8)), [-1.0, 1.0])


def test_text_ids_are_the_tokenized_captions():
    captions = [f"shape {i}" for i in range(NUM_EXAMPLES)]
    tokenizer = TextTokenizer.from_bytes(train_tokenizer(captions, 64, model_type="bpe"))
    batch = next(iter(_dataset(LoaderConfig.train(5), tokenizer=tokenizer, text_length=6)))
    assert batch["text_ids"].dtype == np.int32 and batch["text_ids"].shape == (5, 6)
    np.testing.assert_array_equal(
        batch["text_ids"], tokenizer.encode(list(batch["captions"]), text_length=6)
    )
    assert np.all(batch["text_ids"][:, 0] != PAD_ID)
    with pytest.raises(UserError, match="text_length"):
        _dataset(LoaderConfig.train(5), tokenizer=tokenizer)


def test_a_split_smaller_than_one_batch_is_a_user_error():
    with pytest.raises(UserError, match="fewer than one batch"):
        _dataset(LoaderConfig.train(batch_size=NUM_EXAMPLES + 1))


# --------------------------------------------------------------------------- order


def test_same_seed_gives_the_same_batches_and_another_seed_another_order():
    first = _take(iter(_dataset(LoaderConfig.train(4, seed=7))), 8)
    again = _take(iter(_dataset(LoaderConfig.train(4, seed=7))), 8)
    other = _take(iter(_dataset(LoaderConfig.train(4, seed=8))), 8)
    assert _indices(first) == _indices(again)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
    assert _indices(first) != _indices(other)


def test_each_epoch_is_a_new_permutation_of_the_whole_split():
    source = _source(count=24)
    batches = _take(iter(_dataset(LoaderConfig.train(4, seed=1), source=source)), 12)
    epochs = [sum(_indices(batches[:6]), []), sum(_indices(batches[6:]), [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))
    assert epochs[0] != epochs[1]
    assert epochs[0] != list(range(24))


def test_drop_remainder_drops_the_short_batch_of_each_epoch_and_finite_epochs_end():
    loader = LoaderConfig(batch_size=5, seed=0, num_epochs=2, drop_remainder=True)
    batches = list(iter(_dataset(loader)))
    assert len(batches) == 2 * (NUM_EXAMPLES // 5)
    assert all(len(b["index"]) == 5 for b in batches)
    assert len(set(sum(_indices(batches[:4]), []))) == 20  # no repeats within an epoch


def test_eval_order_sees_every_example_once_in_order():
    batches = list(iter(_dataset(LoaderConfig.eval(batch_size=5))))
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 3]
    assert sum(_indices(batches), []) == list(range(NUM_EXAMPLES))


def test_normalize_index_moves_on_by_the_split_size_each_epoch():
    seen = []

    def recording_normalize(example, index):
        seen.append(index)
        return normalize(example, index)

    loader = LoaderConfig(batch_size=1, shuffle=False, num_epochs=2, read_threads=0)
    dataset = image_text_dataset(
        _source(count=3),
        recording_normalize,
        loader,
        image_size=8,
        process_index=0,
        process_count=1,
    )
    batches = list(iter(dataset))
    assert seen == [0, 1, 2, 3, 4, 5]
    assert sum(_indices(batches), []) == [0, 1, 2, 0, 1, 2]  # the batch index is the source index


# --------------------------------------------------------------------------- hosts


def test_two_hosts_read_disjoint_halves_that_cover_the_split():
    per_host = [
        sum(
            _indices(
                iter(_dataset(LoaderConfig.eval(batch_size=4), process_index=p, process_count=2))
            ),
            [],
        )
        for p in range(2)
    ]
    assert not set(per_host[0]) & set(per_host[1])
    assert sorted(per_host[0] + per_host[1]) == list(range(NUM_EXAMPLES))


def test_training_hosts_get_equal_shards_so_they_step_together():
    loader = LoaderConfig(batch_size=2, seed=5, num_epochs=1)
    per_host = [list(iter(_dataset(loader, process_index=p, process_count=2))) for p in range(2)]
    assert len(per_host[0]) == len(per_host[1]) == 5  # 22 of 23 examples, 11 per host
    seen = [set(sum(_indices(batches), [])) for batches in per_host]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 20


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("read_threads", [0, 2])
@pytest.mark.parametrize("steps", [3, 7])  # 7 crosses the epoch boundary (5 batches per epoch)
def test_restored_state_gives_exactly_the_next_batch(read_threads, steps):
    loader = LoaderConfig.train(batch_size=4, seed=11, read_threads=read_threads)
    iterator = iter(_dataset(loader))
    _take(iterator, steps)
    state = json.loads(json.dumps(iterator.get_state()))  # survives JSON
    expected = _take(iterator, 2)

    resumed = iter(_dataset(loader))
    resumed.set_state(state)
    got = _take(resumed, 2)
    assert _indices(got) == _indices(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])


def test_a_state_from_another_pipeline_is_refused():
    iterator = iter(_dataset(LoaderConfig.train(batch_size=4, seed=1)))
    next(iterator)
    state = iterator.get_state()
    other = iter(_dataset(LoaderConfig.train(batch_size=2, seed=1)))
    with pytest.raises(UserError, match="batch_size: saved 4, now 2"):
        other.set_state(state)


@pytest.mark.parametrize("read_threads", [0, 2])
def test_every_process_resumes_from_process_0s_state_in_its_own_shard(read_threads):
    # A training checkpoint holds process 0's state only; each process must go on with the
    # next batch of its own shard (epoch boundary crossed: 5 batches of 2 per host and epoch).
    loader = LoaderConfig.train(batch_size=2, seed=7, read_threads=read_threads)
    hosts = [iter(_dataset(loader, process_index=p, process_count=2)) for p in range(2)]
    for _ in range(6):
        [next(it) for it in hosts]
    saved = json.loads(json.dumps(hosts[0].get_state()))
    expected = [_indices(_take(it, 2)) for it in hosts]
    assert not set(sum(expected[0], [])) & set(sum(expected[1], []))  # really other examples

    for process, want in enumerate(expected):
        resumed = iter(_dataset(loader, process_index=process, process_count=2))
        resumed.set_state_from_any_process(saved)
        assert _indices(_take(resumed, 2)) == want, process
    # Plain `set_state` stays strict: process 1 refuses process 0's state as it is.
    strict = iter(_dataset(loader, process_index=1, process_count=2))
    with pytest.raises(UserError, match="process_index: saved 0, now 1"):
        strict.set_state(saved)


def test_a_state_of_another_process_count_or_pipeline_is_still_refused():
    loader = LoaderConfig.train(batch_size=2, seed=7)
    saved = iter(_dataset(loader, process_index=0, process_count=2)).get_state()
    assert state_for_process(saved, 0, 1) is saved  # left alone, refused below
    with pytest.raises(UserError, match="process_count: saved 2, now 1"):
        iter(_dataset(loader)).set_state_from_any_process(saved)
    other_loader = LoaderConfig.train(batch_size=2, seed=8)
    other_seed = iter(_dataset(other_loader, process_index=1, process_count=2))
    with pytest.raises(UserError, match="seed: saved 7, now 8"):
        other_seed.set_state_from_any_process(saved)
    assert state_for_process(None, 1, 2) is None


def test_one_process_state_is_unchanged_by_the_any_process_restore():
    # A one-process run saves and restores exactly as before: the state is the same dict.
    loader = LoaderConfig.train(batch_size=4, seed=3)
    iterator = iter(_dataset(loader))
    _take(iterator, 2)
    saved = iterator.get_state()
    assert state_for_process(saved, 0, 1) == saved
    assert saved["pipeline"]["process_index"] == 0 and saved["pipeline"]["process_count"] == 1


def test_state_saves_and_restores_through_orbax_with_grains_handler(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    loader = LoaderConfig.train(batch_size=4, seed=2)
    iterator = iter(_dataset(loader))
    _take(iterator, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = next(iterator)
        resumed = iter(_dataset(loader))
        manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed))
        )
    assert next(resumed)["index"].tolist() == expected["index"].tolist()


# --------------------------------------------------------------------------- images


def _stripes(height, width, axis):
    """Three bands along `axis`: red quarter, green half, blue quarter."""
    image = np.zeros((height, width, 3), np.uint8)
    length = image.shape[axis]
    bands = [(0, length // 4, 0), (length // 4, 3 * length // 4, 1), (3 * length // 4, length, 2)]
    for start, stop, channel in bands:
        index = [slice(None)] * 2
        index[axis] = slice(start, stop)
        image[tuple(index) + (channel,)] = 255
    return image


@pytest.mark.parametrize("shape,axis", [((40, 80), 1), ((80, 40), 0)])
def test_non_square_images_are_center_cropped_not_squashed(shape, axis):
    image = _stripes(*shape, axis=axis)
    out = prepare_image(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # The centered square is the green half only; squashing would bring red and blue in.
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([0, 255, 0], np.uint8), out.shape))


def test_crop_keeps_the_center_and_resize_keeps_orientation():
    image = np.zeros((30, 60, 3), np.uint8)
    image[:15, 15:45, 0] = 255  # top half of the centered square is red
    out = prepare_image(image, 10)
    assert out[:4, :, 0].min() > 200 and out[6:, :, 0].max() < 50


def test_image_inputs_of_every_accepted_kind_agree():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(prepare_image(rgb, 12), rgb)  # right size: untouched
    np.testing.assert_array_equal(prepare_image(_png(rgb), 12), rgb)
    np.testing.assert_array_equal(prepare_image(Image.fromarray(rgb), 12), rgb)
    gray = rgb[..., 0]
    np.testing.assert_array_equal(prepare_image(gray[..., None], 12), np.stack([gray] * 3, -1))
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(rgb.astype(np.float32), 12)


# --------------------------------------------------------------------------- encoded shards

TEXT_LENGTH, GRID, TEXT_VOCAB, IMAGE_VOCAB = 5, (2, 3), 50, 300


def _records(count):
    rng = np.random.default_rng(0)
    return [
        {
            "text_ids": rng.integers(0, TEXT_VOCAB, TEXT_LENGTH),
            "image_ids": rng.integers(0, IMAGE_VOCAB, GRID),  # [h, w] is flattened
        }
        for _ in range(count)
    ]


def _write(out_dir, records, **kwargs):
    return write_encoded_shards(
        out_dir,
        records,
        text_length=TEXT_LENGTH,
        image_grid=GRID,
        text_vocab_size=TEXT_VOCAB,
        image_vocab_size=IMAGE_VOCAB,
        **kwargs,
    )


def test_encoded_shards_round_trip_with_metadata(tmp_path):
    records = _records(NUM_EXAMPLES)
    written = _write(tmp_path / "enc", iter(records), records_per_shard=7, extra={"split": "train"})
    metadata = read_encoded_metadata(tmp_path / "enc")
    assert metadata == written
    assert metadata.count == NUM_EXAMPLES and len(metadata.shards) == 4  # 7 + 7 + 7 + 2
    assert metadata.image_grid == GRID and metadata.extra == {"split": "train"}

    loader = LoaderConfig.eval(batch_size=4)
    batches = list(
        iter(encoded_dataset(tmp_path / "enc", loader, process_index=0, process_count=1))
    )
    text_ids = np.concatenate([b["text_ids"] for b in batches])
    image_ids = np.concatenate([b["image_ids"] for b in batches])
    assert text_ids.dtype == image_ids.dtype == np.int32
    assert image_ids.shape == (NUM_EXAMPLES, 6)
    np.testing.assert_array_equal(text_ids, [r["text_ids"] for r in records])
    np.testing.assert_array_equal(image_ids, [r["image_ids"].reshape(-1) for r in records])


def test_encoded_metadata_check_names_every_mismatch(tmp_path):
    metadata = _write(tmp_path / "enc", _records(3))
    metadata.check(text_length=TEXT_LENGTH, image_grid=[2, 3], text_vocab_size=TEXT_VOCAB)
    with pytest.raises(UserError, match="text_length: config 6, data 5.*image_vocab_size"):
        metadata.check(text_length=6, image_vocab_size=IMAGE_VOCAB + 1)


def test_encoded_writer_refuses_bad_records_and_existing_data(tmp_path):
    bad_shape = [{"text_ids": np.zeros(TEXT_LENGTH + 1), "image_ids": np.zeros(6)}]
    with pytest.raises(ValueError, match="text_ids has 6 ids"):
        _write(tmp_path / "a", bad_shape)
    bad_id = [{"text_ids": np.zeros(TEXT_LENGTH), "image_ids": np.full(6, IMAGE_VOCAB)}]
    with pytest.raises(ValueError, match="outside"):
        _write(tmp_path / "b", bad_id)
    _write(tmp_path / "c", _records(3))
    with pytest.raises(UserError, match="already holds"):
        _write(tmp_path / "c", _records(2))
    assert _write(tmp_path / "c", _records(2), overwrite=True).count == 2
    assert (
        len(
            list(
                encoded_dataset(
                    tmp_path / "c", LoaderConfig.eval(2), process_index=0, process_count=1
                )
            )
        )
        == 1
    )
    with pytest.raises(UserError, match="train encode"):
        read_encoded_metadata(tmp_path / "a-missing")


def test_encoded_pipeline_shards_shuffles_and_resumes(tmp_path):
    _write(tmp_path / "enc", _records(NUM_EXAMPLES), records_per_shard=10)
    halves = [
        sum(
            _indices(
                iter(
                    encoded_dataset(
                        tmp_path / "enc", LoaderConfig.eval(3), process_index=p, process_count=2
                    )
                )
            ),
            [],
        )
        for p in range(2)
    ]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == list(range(NUM_EXAMPLES))

    loader = LoaderConfig.train(batch_size=4, seed=9)
    dataset = encoded_dataset(tmp_path / "enc", loader, process_index=0, process_count=1)
    iterator = iter(dataset)
    _take(iterator, 6)
    state = iterator.get_state()
    expected = next(iterator)
    resumed = iter(encoded_dataset(tmp_path / "enc", loader, process_index=0, process_count=1))
    resumed.set_state(state)
    got = next(resumed)
    np.testing.assert_array_equal(got["image_ids"], expected["image_ids"])
    assert got["index"].tolist() == expected["index"].tolist()
    first_epoch = sum(_indices(_take(iter(dataset), 5)), [])
    assert first_epoch != sorted(first_epoch)  # shuffled


# --------------------------------------------------------------------------- a real dataset


@pytest.fixture(scope="module")
def shapes_world_tiny(tmp_path_factory):
    """shapes_world/tiny32 (512 train, 64 validation examples), prepared once for this module."""
    from dalle_jax.data import registry

    data_dir = str(tmp_path_factory.mktemp("shapes_world"))
    registry.builder("shapes_world/tiny32", data_dir=data_dir).download_and_prepare()
    return data_dir


def test_shapes_world_batches_resize_and_tokenize(shapes_world_tiny):
    from dalle_jax.data.pipeline import open_split

    split = open_split("shapes_world/tiny32", "train", data_dir=shapes_world_tiny)
    assert split.num_examples == 512
    captions = [split.normalize(split.source[i], i)["caption"] for i in range(split.num_examples)]
    tokenizer = TextTokenizer.from_bytes(train_tokenizer(captions, 256, model_type="bpe"))
    loader = LoaderConfig.train(batch_size=8, seed=0)
    dataset = image_text_dataset(
        split.source,
        split.normalize,
        loader,
        image_size=16,
        tokenizer=tokenizer,
        text_length=32,
        source_name=split.name,
        process_index=0,
        process_count=1,
    )
    batch = next(iter(dataset))
    assert batch["images"].shape == (8, 16, 16, 3) and batch["images"].dtype == np.uint8
    assert batch["images"].std() > 0  # real pictures, not a constant
    expected = [captions[i] for i in batch["index"]]
    assert list(batch["captions"]) == expected
    assert tokenizer.decode(batch["text_ids"]) == [c.lower() for c in expected]
    # The 32 px source resized to 16 px: a 2x2 box filter would be close to it.
    full = split.normalize(split.source[int(batch["index"][0])], 0)["image"].astype(np.float32)
    boxed = full.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
    assert np.abs(batch["images"][0].astype(np.float32) - boxed).mean() < 12


def test_shapes_world_hosts_cover_the_split_and_resume(shapes_world_tiny):
    from dalle_jax.data.pipeline import open_split

    split = open_split("shapes_world/tiny32", "validation", data_dir=shapes_world_tiny)

    def dataset(loader, process_index=0, process_count=1):
        return image_text_dataset(
            split.source,
            split.normalize,
            loader,
            image_size=32,
            source_name=split.name,
            process_index=process_index,
            process_count=process_count,
        )

    halves = [sum(_indices(dataset(LoaderConfig.eval(10), p, 2)), []) for p in range(2)]
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == list(range(64))

    loader = LoaderConfig.train(batch_size=8, seed=4)
    iterator = iter(dataset(loader))
    _take(iterator, 9)  # past the first epoch of 8 batches
    state = iterator.get_state()
    expected = next(iterator)
    resumed = iter(dataset(loader))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["images"], expected["images"])


# --------------------------------------------------------------------------- split names


class _PreparedBuilder:
    """Stands in for a prepared tfds builder with the given splits (sources: lists)."""

    def __init__(self, splits: dict[str, int]):
        self.info = type("Info", (), {"splits": splits})()

    def is_prepared(self) -> bool:
        return True

    def as_data_source(self, split):
        # tfds's syntax: "a+b" is split a, then split b
        start = {
            name: sum(list(self.info.splits.values())[:i])
            for i, name in enumerate(self.info.splits)
        }
        return [start[part] + i for part in split.split("+") for i in range(self.info.splits[part])]


@pytest.fixture
def fake_datasets(monkeypatch):
    """Every dataset opens as a builder with COCO's four splits (no TensorFlow needed)."""
    from dalle_jax.data import registry

    coco_splits = {"train": 6, "val": 3, "test": 2, "restval": 4}
    monkeypatch.setattr(registry, "builder", lambda name, **kw: _PreparedBuilder(coco_splits))
    monkeypatch.setattr(registry, "normalizer", lambda name: normalize)


def test_validation_opens_cocos_val_split(fake_datasets):
    from dalle_jax.data.pipeline import open_split

    split = open_split("coco_captions", "validation", data_dir="unused")
    assert split.name == "coco_captions:val" and split.num_examples == 3


def test_cocos_train_reads_karpathys_train_and_restval_together(fake_datasets):
    from dalle_jax.data.pipeline import open_split

    train = open_split("coco_captions", "train", data_dir="unused")
    assert train.name == "coco_captions:train+restval"
    assert train.num_examples == 6 + 4
    assert list(train.source) == list(range(6)) + list(range(11, 15))  # train, then restval
    # A dataset that declares no union reads its train split alone.
    assert open_split("image_folder", "train", data_dir="unused").num_examples == 6


def test_splits_joined_by_plus_read_together_and_each_must_exist(fake_datasets):
    from dalle_jax.data.pipeline import open_split

    assert open_split("image_folder", "train+test", data_dir="unused").num_examples == 8
    with pytest.raises(UserError, match="has no split 'dev'; its splits: restval, test"):
        open_split("image_folder", "train+dev", data_dir="unused")


def test_a_dataset_without_the_alias_still_names_its_splits(fake_datasets):
    from dalle_jax.data.pipeline import open_split

    # Only COCO declares the alias; another dataset missing "validation" is a user error.
    with pytest.raises(UserError, match="has no split 'validation'; its splits: restval, test"):
        open_split("image_folder", "validation", data_dir="unused")
    with pytest.raises(UserError, match="has no split 'dev'"):
        open_split("coco_captions", "dev", data_dir="unused")


def test_resolve_split_prefers_a_split_the_dataset_has():
    from dalle_jax.data import registry

    assert registry.resolve_split("coco_captions", "validation", {"train", "val"}) == "val"
    assert registry.resolve_split("coco_captions", "val", {"train", "val"}) == "val"
    # A dataset with a real "validation" split reads that one, alias or not.
    assert (
        registry.resolve_split("coco_captions", "validation", {"validation", "val"}) == "validation"
    )
    assert registry.resolve_split("shapes_world/64", "validation", {"train"}) == "validation"
    # COCO's union needs every part: without restval, train is train alone.
    assert registry.resolve_split("coco_captions", "train", {"train", "restval"}) == (
        "train+restval"
    )
    assert registry.resolve_split("coco_captions", "train", {"train", "val"}) == "train"
    assert registry.resolve_split("shapes_world/64", "train", {"train", "restval"}) == "train"
