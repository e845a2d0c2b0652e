"""The `image_folder` dataset: caption formats, skipped inputs and their counts, resizing,
splits, user errors, TF-free reading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_jax.data import registry
from dalle_jax.data.image_folder import builder as folder_builder
from dalle_jax.data.image_folder import captions as captions_lib
from dalle_jax.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _solid(path: Path, color=(10, 200, 30), size=(24, 18), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _records(builder, split: str) -> dict[str, dict]:
    source = builder.as_data_source(split)
    return {_text(source[i]["path"]): source[i] for i in range(len(source))}


def _prepare(src: Path, data_dir: Path, **kwargs):
    builder = registry.builder("image_folder", data_dir=str(data_dir), folder=str(src), **kwargs)
    builder.download_and_prepare()
    return builder


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Every caption format, plus one of each kind of bad input."""
    src = tmp_path / "pictures"
    # Sidecars: two lines = two captions.
    _solid(src / "cat.jpg")
    (src / "cat.txt").write_text("a cat\n\n  a   sleeping cat \n")
    # captions.jsonl: two lines for one image, one of them a list; a missing image; bad JSON.
    _solid(src / "dogs" / "dog.png")
    _solid(src / "dogs" / "puppy.webp")
    lines = [
        {"image": "dogs/dog.png", "caption": "a dog"},
        {"image": "dogs/dog.png", "caption": ["a brown dog", "a dog"]},  # duplicate dropped
        {"image": "dogs/puppy.webp", "caption": "a puppy"},
        {"image": "dogs/missing.png", "caption": "not there"},
    ]
    (src / "captions.jsonl").write_text(
        "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    )
    # captions.tsv: a header, one image, a missing image, a line without a tab, a blank caption.
    _solid(src / "birds" / "bird.bmp")
    _solid(src / "birds" / "owl.png")
    (src / "captions.tsv").write_text(
        "image\tcaption\n"
        "birds/bird.bmp\ta small bird\n"
        "birds/gone.png\ta bird that flew away\n"
        "birds/owl.png no tab here\n"
        "birds/owl.png\t   \n"
    )
    # A corrupt image with a caption, a truncated PNG with a caption, an uncaptioned image.
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    (src / "broken.txt").write_text("a broken picture")
    _solid(src / "whole.png", size=(64, 64))
    (src / "truncated.png").write_bytes((src / "whole.png").read_bytes()[:60])
    (src / "truncated.txt").write_text("half a picture")
    (src / "whole.png").unlink()
    _solid(src / "lonely.png")
    # Hidden folders are ignored entirely.
    _solid(src / ".thumbnails" / "cat.png")
    return src


def test_caption_formats_are_merged(mixed_folder):
    images, _ = captions_lib.find_captioned_images(mixed_folder)
    assert {image.key: image.captions for image in images} == {
        "birds/bird.bmp": ("a small bird",),
        "cat.jpg": ("a cat", "a sleeping cat"),
        "dogs/dog.png": ("a dog", "a brown dog"),
        "dogs/puppy.webp": ("a puppy",),
        "broken.jpg": ("a broken picture",),
        "truncated.png": ("half a picture",),
    }


def test_bad_inputs_are_skipped_and_counted(mixed_folder, tmp_path):
    builder = _prepare(mixed_folder, tmp_path / "data", image_size=16)
    counts = folder_builder.counts(builder)
    assert counts == {
        "images": 4,
        "train": 3,
        "validation": 1,
        "unreadable": 2,  # broken.jpg, truncated.png
        "image_files": 8,  # cat, dog, puppy, bird, owl, broken, truncated, lonely
        "missing_image": 2,  # dogs/missing.png, birds/gone.png
        "uncaptioned": 2,  # lonely.png; owl.png (its only caption is blank)
        "malformed_lines": 2,  # "{not json", the tsv line without a tab
        "empty_captions": 1,
    }
    records = _records(builder, "train") | _records(builder, "validation")
    assert set(records) == {"cat.jpg", "dogs/dog.png", "dogs/puppy.webp", "birds/bird.bmp"}
    # The counts are stored with the dataset, not just kept in memory.
    reloaded = registry.builder(
        "image_folder/16", data_dir=str(tmp_path / "data"), folder=str(mixed_folder)
    )
    assert folder_builder.counts(reloaded) == counts


def test_normalize_walks_through_all_captions_over_epochs(mixed_folder, tmp_path):
    builder = _prepare(mixed_folder, tmp_path / "data", image_size=16)
    record = (_records(builder, "train") | _records(builder, "validation"))["cat.jpg"]
    # The pipeline's index: epoch * len(source) + source index, here with an even source size
    # (a plain `index % 2` would give the same caption every epoch).
    source_size, source_index = 4, 2
    picks = [
        folder_builder.normalize(record, epoch * source_size + source_index)["caption"]
        for epoch in range(12)
    ]
    assert set(picks) == {"a cat", "a sleeping cat"}
    assert picks == [
        folder_builder.normalize(record, epoch * source_size + source_index)["caption"]
        for epoch in range(12)
    ]
    image = folder_builder.normalize(record, 0)["image"]
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8


def _stripes(path: Path, colors, size: tuple[int, int], vertical: bool) -> None:
    """Equal stripes of `colors` side by side (vertical=True) or stacked."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    n = len(colors)
    for i, color in enumerate(colors):
        if vertical:
            pixels[:, i * width // n : (i + 1) * width // n] = color
        else:
            pixels[i * height // n : (i + 1) * height // n] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _dominant(pixels: np.ndarray) -> np.ndarray:
    """Channel index of the strongest channel per pixel: 0 red, 1 green, 2 blue."""
    return pixels.astype(int).argmax(axis=-1)


def test_images_are_resized_and_centre_cropped(tmp_path):
    src = tmp_path / "src"
    # Wide and tall images of three stripes: the centre crop keeps only the middle stripe.
    _stripes(src / "wide.png", [RED, GREEN, BLUE], (90, 30), vertical=True)
    _stripes(src / "tall.png", [BLUE, RED, GREEN], (40, 120), vertical=False)
    # Half-transparent red: composited over white, it is pink.
    _solid(src / "clear.png", (255, 0, 0, 128), size=(20, 20), mode="RGBA")
    for name in ("wide", "tall", "clear"):
        (src / f"{name}.txt").write_text(name)
    builder = _prepare(src, tmp_path / "data", image_size=12, validation_fraction=0.4)
    records = _records(builder, "train") | _records(builder, "validation")
    for name, middle in (("wide.png", 1), ("tall.png", 0)):
        pixels = np.asarray(records[name]["image"])
        assert pixels.shape == (12, 12, 3) and pixels.dtype == np.uint8
        assert (_dominant(pixels[1:-1, 1:-1]) == middle).all(), name
        assert pixels[6, 6, middle] > 240 and (np.delete(pixels[6, 6], middle) < 15).all()
    np.testing.assert_allclose(records["clear.png"]["image"][6, 6], [255, 127, 127], atol=3)


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    # Stored 60x40 as red | blue; EXIF orientation 6 says "rotate 90 degrees clockwise to
    # view", which puts red on top and blue below.
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30], pixels[:, 30:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(src / "phone.jpg", exif=exif, quality=95)
    (src / "phone.txt").write_text("a phone photo")
    builder = _prepare(src, tmp_path / "data", image_size=8)
    image = np.asarray(builder.as_data_source("train")[0]["image"])
    assert (_dominant(image[:2]) == 0).all() and (_dominant(image[-2:]) == 2).all()


def test_split_is_deterministic_and_never_empty():
    images = [captions_lib.CaptionedImage(f"{i}.png", Path(f"{i}.png"), ("x",)) for i in range(200)]
    train, validation = folder_builder.split(images, 0.05)
    assert len(validation) == 10 and len(train) == 190
    assert folder_builder.split(list(reversed(images)), 0.05)[1] == list(reversed(validation))
    assert [len(v) for _, v in (folder_builder.split(images[:n], 0.02) for n in (1, 2, 3))] == [
        0,
        1,
        1,
    ]
    assert len(folder_builder.split(images[:2], 0.9)[0]) == 1  # train is never emptied


def test_single_image_has_only_a_train_split(tmp_path):
    src = tmp_path / "src"
    _solid(src / "only.png")
    (src / "only.txt").write_text("the only one")
    builder = _prepare(src, tmp_path / "data", image_size=8)
    assert set(builder.info.splits) == {"train"}
    assert len(builder.as_data_source("train")) == 1


def test_config_name_gives_the_image_size(mixed_folder, tmp_path):
    by_name = registry.builder("image_folder/24", data_dir=str(tmp_path), folder=mixed_folder)
    by_kwarg = registry.builder(
        "image_folder", data_dir=str(tmp_path), folder=mixed_folder, image_size=24
    )
    assert by_name.builder_config.name == by_kwarg.builder_config.name
    assert by_name.builder_config.image_size == 24
    other = registry.builder("image_folder", data_dir=str(tmp_path), folder=tmp_path)
    assert other.builder_config.name != by_name.builder_config.name
    with pytest.raises(UserError, match="conflicts"):
        registry.builder(
            "image_folder/24", data_dir=str(tmp_path), folder=mixed_folder, image_size=32
        )


@pytest.mark.parametrize(
    ("make_folder", "message"),
    [
        (lambda src: src.mkdir(), "found no image files"),
        (lambda src: _solid(src / "a.png"), "found 1 image files but none with a caption"),
        (
            lambda src: (
                src.mkdir(),
                (src / "a.png").write_bytes(b"junk"),
                (src / "a.txt").write_text("a"),
            ),
            "found 1 captioned images but none readable",
        ),
        (lambda src: None, "does not exist"),
    ],
)
def test_nothing_usable_is_a_user_error(tmp_path, make_folder, message):
    src = tmp_path / "src"
    make_folder(src)
    with pytest.raises(UserError, match=message) as error:
        _prepare(src, tmp_path / "data")
    assert "\n" not in str(error.value)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="folder=PATH"):
        registry.builder("image_folder", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="validation_fraction"):
        registry.builder(
            "image_folder", data_dir=str(tmp_path), folder=tmp_path, validation_fraction=0
        )
    with pytest.raises(UserError, match="not an image size"):
        registry.builder("image_folder/big", data_dir=str(tmp_path), folder=tmp_path)


# `sys.modules["tensorflow"] = None` would not do: etils takes any "tensorflow" key in
# sys.modules to mean TF is loaded, and tfds then fails to import. Instead every import finder
# is wrapped so that TensorFlow looks uninstalled (`find_spec` -> None), as on a machine
# without it, even where the [coco] extra installed it.
HIDE_TENSORFLOW = """
import sys
class _HideTensorFlow:
    def __init__(self, finder):
        self._finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return self._finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self._finder, attr)
sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
"""


def test_prepare_and_read_without_tensorflow(mixed_folder, tmp_path):
    script = HIDE_TENSORFLOW + textwrap.dedent(
        f"""
        import json
        from dalle_jax.data import registry
        kwargs = dict(data_dir={str(tmp_path / "data")!r}, folder={str(mixed_folder)!r})
        builder = registry.builder("image_folder/16", **kwargs)
        builder.download_and_prepare()
        source = builder.as_data_source("train")
        example = registry.normalizer("image_folder")(source[0], 0)
        assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
        print(json.dumps({{"n": len(source), "shape": list(example["image"].shape),
                          "dtype": str(example["image"].dtype),
                          "caption": example["caption"]}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    read = json.loads(result.stdout.strip().splitlines()[-1])
    assert read == {"n": 3, "shape": [16, 16, 3], "dtype": "uint8", "caption": read["caption"]}
    assert read["caption"] in {"a cat", "a dog", "a puppy", "a small bird"}
