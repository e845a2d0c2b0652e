"""COCO captions through tfds's real `coco_captions` builder, prepared on small fake COCO files.

Needs the [coco] extra (TensorFlow) to prepare; the module is skipped where TensorFlow is missing.
The TensorFlow-free paths (reading a prepared copy, the error naming the extra) run in
subprocesses that block the `tensorflow` import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tensorflow")

import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.object_detection import coco_captions as tfds_coco_captions  # noqa: E402

from dalle_jax.data import coco, registry  # noqa: E402
from dalle_jax.errors import UserError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import coco_fixtures  # noqa: E402

pytestmark = pytest.mark.coco

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory) -> Path:
    """Fake COCO in the extracted official layout."""
    return coco_fixtures.write_fake_coco(tmp_path_factory.mktemp("coco_manual"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, manual_dir):
    """The registry's `coco_captions` builder, prepared from `manual_dir` as array_record."""
    data_dir = tmp_path_factory.mktemp("coco_data")
    builder = registry.builder("coco_captions", data_dir=str(data_dir), manual_dir=manual_dir)
    builder.download_and_prepare()
    return builder


def _records(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def _expected_by_filename(split: str) -> dict[str, coco_fixtures.FakeImage]:
    return {im.file_name: im for im in coco_fixtures.fake_images() if im.karpathy_split == split}


def _texts(record: dict) -> tuple[str, ...]:
    return tuple(t.decode() for t in record["captions"]["text"])


def test_builder_is_tfds_coco_captions_with_its_layout_and_features(prepared, tmp_path):
    assert isinstance(prepared, tfds_coco_captions.CocoCaptions)
    assert prepared.name == "coco_captions"
    assert Path(prepared.data_dir).relative_to(Path(prepared.data_dir).parents[2]) == Path(
        "coco_captions/2014/1.1.0"
    )
    assert prepared.info.file_format.value == "array_record"
    upstream = tfds_coco_captions.CocoCaptions(data_dir=str(tmp_path))
    assert prepared.info.features.to_json() == upstream.info.features.to_json()
    # Real downloads are checked against the sizes and sha256 that tfds ships.
    assert "http://images.cocodataset.org/zips/train2014.zip" in prepared.url_infos


def test_split_sizes(prepared):
    expected = coco_fixtures.split_sizes()
    assert sorted(prepared.info.splits) == sorted(coco.SPLITS)
    assert {s: prepared.info.splits[s].num_examples for s in coco.SPLITS} == expected
    assert {s: len(prepared.as_data_source(s)) for s in coco.SPLITS} == expected


@pytest.mark.parametrize("split", coco.SPLITS)
def test_captions_and_ids_round_trip(prepared, split):
    expected = _expected_by_filename(split)
    records = _records(prepared, split)
    got = {r["image/filename"].decode(): _texts(r) for r in records}
    assert got == {name: im.captions for name, im in expected.items()}
    assert {r["image/id"] for r in records} == {im.image_id for im in expected.values()}


def test_images_round_trip_at_their_own_size(prepared, manual_dir):
    for split in coco.SPLITS:
        expected = _expected_by_filename(split)
        for record in _records(prepared, split):
            fake = expected[record["image/filename"].decode()]
            source = np.asarray(
                Image.open(coco_fixtures.image_path(manual_dir, fake)).convert("RGB")
            )
            assert record["image"].dtype == np.uint8
            assert record["image"].shape == (fake.height, fake.width, 3)
            np.testing.assert_array_equal(record["image"], source)


def test_normalize_gives_uint8_image_and_one_of_its_captions(prepared):
    for split in coco.SPLITS:
        expected = _expected_by_filename(split)
        for index, record in enumerate(_records(prepared, split)):
            fake = expected[record["image/filename"].decode()]
            out = coco.normalize(record, index)
            assert set(out) == {"image", "caption"}
            assert out["image"].dtype == np.uint8
            assert out["image"].shape == (fake.height, fake.width, 3)
            assert isinstance(out["caption"], str)
            assert out["caption"] in fake.captions
            if fake.grayscale:
                assert np.array_equal(out["image"][..., 0], out["image"][..., 2])


def test_normalize_is_deterministic_and_reaches_every_caption(prepared):
    record = next(r for r in _records(prepared, "train") if len(r["captions"]["text"]) == 7)
    picks = [coco.normalize(record, i)["caption"] for i in range(300)]
    assert picks == [coco.normalize(record, i)["caption"] for i in range(300)]
    assert set(picks) == set(_texts(record))


def test_normalize_walks_captions_across_epochs_when_size_is_a_multiple():
    # 5 captions, 10 images: `index % 5` would give an image the same caption every epoch.
    captions = [f"caption {k}".encode() for k in range(5)]
    example = {"image": np.zeros((4, 6, 3), np.uint8), "captions": {"text": captions}}
    dataset_size, record = 10, 3
    picks = {coco.normalize(example, record + e * dataset_size)["caption"] for e in range(40)}
    assert picks == {c.decode() for c in captions}


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1)])
def test_normalize_expands_grayscale(shape):
    gray = np.arange(35, dtype=np.uint8).reshape(shape)
    out = coco.normalize({"image": gray, "captions": {"text": ["a", "b"]}}, 0)
    assert out["image"].shape == (5, 7, 3)
    assert out["image"].dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out["image"][..., c], gray.reshape(5, 7))
    assert out["caption"] in {"a", "b"}


def test_zipped_files_in_the_default_manual_dir(tmp_path):
    data_dir = tmp_path / "data"
    coco_fixtures.write_fake_coco(data_dir / "downloads" / "manual", zipped=True)
    builder = coco.CocoCaptions(data_dir=data_dir)
    builder.download_and_prepare()
    assert {s: len(builder.as_data_source(s)) for s in coco.SPLITS} == (coco_fixtures.split_sizes())
    got = {r["image/filename"].decode(): _texts(r) for r in _records(builder, "val")}
    assert got == {name: im.captions for name, im in _expected_by_filename("val").items()}
    # The zips were unpacked under tfds's extract dir, not next to the user's files.
    assert any((data_dir / "downloads" / "extracted").rglob("dataset_coco.json"))
    assert not (data_dir / "downloads" / "manual" / "train2014").exists()


def test_manual_dir_through_download_config(tmp_path, manual_dir):
    builder = coco.CocoCaptions(data_dir=tmp_path)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    assert len(builder.as_data_source("restval")) == coco_fixtures.split_sizes()["restval"]


def test_incomplete_manual_dir_is_a_user_error(tmp_path):
    manual = coco_fixtures.write_fake_coco(tmp_path / "manual")
    (manual / "dataset_coco.json").unlink()
    builder = coco.CocoCaptions(data_dir=tmp_path / "data", manual_dir=manual)
    with pytest.raises(UserError, match="caption_datasets.zip"):
        builder.download_and_prepare()


def test_missing_manual_dir_is_a_user_error(tmp_path):
    builder = coco.CocoCaptions(data_dir=tmp_path / "data", manual_dir=tmp_path / "nope")
    with pytest.raises(UserError, match="does not exist"):
        builder.download_and_prepare()


def test_downloads_only_the_files_captions_need(tmp_path, manual_dir, monkeypatch):
    """With no local files the builder downloads; it must not ask for the 20 GB of test images."""
    requested: list[str] = []
    extracted = {
        "train2014.zip": manual_dir,
        "val2014.zip": manual_dir,
        "annotations_trainval2014.zip": manual_dir,
        "caption_datasets.zip": manual_dir,
    }

    def fake_download_and_extract(self, urls):
        requested.extend(urls.values())
        return {key: extracted[url.rsplit("/", 1)[-1]] for key, url in urls.items()}

    monkeypatch.setattr(
        tfds.download.DownloadManager, "download_and_extract", fake_download_and_extract
    )
    builder = coco.CocoCaptions(data_dir=tmp_path)
    builder.download_and_prepare()
    assert sorted({url.rsplit("/", 1)[-1] for url in requested}) == sorted(extracted)
    assert len(builder.as_data_source("train")) == coco_fixtures.split_sizes()["train"]


def test_unknown_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="2014"):
        registry.builder("coco_captions/2017", data_dir=str(tmp_path))


# Hides TensorFlow the way a TensorFlow-free install does: `find_spec("tensorflow")` is None and
# `import tensorflow` raises ModuleNotFoundError. (`sys.modules["tensorflow"] = None` instead makes
# tfds believe TensorFlow is loaded, so tfds itself fails to import.)
_HIDE_TENSORFLOW = """
import importlib.machinery, sys
class _PathFinderWithoutTensorFlow:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()
sys.meta_path = [
    _PathFinderWithoutTensorFlow if f is importlib.machinery.PathFinder else f
    for f in sys.meta_path
]
"""


def _run_python(code: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_tensorflow_the_registry_names_the_extra(tmp_path):
    # The brief's simulation: `None` in sys.modules. tfds then fails at import, inside the registry.
    out = _run_python(
        f"""
        import json, sys
        sys.modules["tensorflow"] = None
        from dalle_jax.data import registry
        from dalle_jax.errors import UserError
        try:
            registry.builder("coco_captions", data_dir={str(tmp_path)!r})
            print(json.dumps({{"error": None}}))
        except UserError as e:
            print(json.dumps({{"error": str(e)}}))
        """
    )
    assert out["error"] is not None
    assert "[coco]" in out["error"]


def test_without_tensorflow_unprepared_is_a_user_error_naming_the_extra(tmp_path):
    out = _run_python(
        _HIDE_TENSORFLOW
        + f"""
import json
from dalle_jax.data import registry
from dalle_jax.errors import UserError
try:
    registry.builder("coco_captions", data_dir={str(tmp_path)!r})
    error = None
except UserError as e:
    error = str(e)
print(json.dumps({{"error": error, "tensorflow_loaded": "tensorflow" in sys.modules}}))
"""
    )
    assert out["error"] is not None
    assert "[coco]" in out["error"]
    assert "not prepared" in out["error"]
    assert not out["tensorflow_loaded"]


def test_without_tensorflow_a_prepared_copy_reads(prepared):
    data_dir = str(Path(prepared.data_dir).parents[2])
    out = _run_python(
        _HIDE_TENSORFLOW
        + f"""
import json
from dalle_jax.data import registry
import tensorflow_datasets as tfds
from dalle_jax.errors import UserError
builder = registry.builder("coco_captions", data_dir={data_dir!r})
builder.download_and_prepare()  # already prepared: nothing to do, no TensorFlow needed
again = tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
try:
    builder.download_and_prepare(download_config=again)
    prepare_again_error = None
except UserError as e:
    prepare_again_error = str(e)
normalize = registry.normalizer("coco_captions")
source = builder.as_data_source("restval")
rows = []
for i in range(len(source)):
    record = source[i]
    out = normalize(record, i)
    rows.append({{
        "filename": record["image/filename"].decode(),
        "shape": list(out["image"].shape),
        "dtype": str(out["image"].dtype),
        "caption": out["caption"],
    }})
print(json.dumps({{
    "rows": rows,
    "prepare_again_error": prepare_again_error,
    "tensorflow_loaded": "tensorflow" in sys.modules,
}}))
"""
    )
    assert not out["tensorflow_loaded"]
    assert "[coco]" in out["prepare_again_error"]
    expected = _expected_by_filename("restval")
    assert sorted(r["filename"] for r in out["rows"]) == sorted(expected)
    for row in out["rows"]:
        fake = expected[row["filename"]]
        assert row["shape"] == [fake.height, fake.width, 3]
        assert row["dtype"] == "uint8"
        assert row["caption"] in fake.captions
