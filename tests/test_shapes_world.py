"""shapes_world: scene sampling, captions and their parser, the renderer, the tfds builder."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dalle_jax.data.shapes_world import spec
from dalle_jax.data.shapes_world.render import render_scene
from dalle_jax.data.shapes_world.spec import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    RequestedObject,
    Scene,
    SceneObject,
    caption_scene,
    cell_center,
    format_caption,
    object_extent,
    parse_background,
    parse_caption,
    sample_scene,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _scenes(n: int, image_size: int, heldout: bool, seed: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i]), image_size, heldout) for i in range(n)]


def _expected_request(obj: SceneObject, template) -> RequestedObject:
    color, shape, size, position = template.mentions
    return RequestedObject(
        color=obj.color if color else None,
        shape=obj.shape if shape else None,
        size=obj.size if size else None,
        position=obj.position if position else None,
    )


# --- spec: constants, sampling ---------------------------------------------------------------


def test_extents_follow_the_spec():
    assert [object_extent(s, 32) for s in SIZES] == [8, 13]
    assert [object_extent(s, 64) for s in SIZES] == [16, 27]
    assert [object_extent(s, 128) for s in SIZES] == [32, 54]


def test_in_distribution_scenes_never_use_a_heldout_pair_and_follow_the_scene_rules():
    scenes = _scenes(3000, 64, heldout=False)
    counts = collections.Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2}
    assert 0.66 < counts[1] / len(scenes) < 0.74  # 70% one object
    pairs_seen = set()
    for scene in scenes:
        assert scene.background in BACKGROUNDS
        colors = [o.color for o in scene.objects]
        cells = [o.position for o in scene.objects]
        assert len(set(colors)) == len(colors) and len(set(cells)) == len(cells)
        for obj in scene.objects:
            assert (obj.color, obj.shape) not in HELDOUT_PAIRS
            pairs_seen.add((obj.color, obj.shape))
    assert len(pairs_seen) == len(COLORS) * len(SHAPES) - len(HELDOUT_PAIRS)


def test_heldout_scenes_always_hold_a_heldout_pair():
    scenes = _scenes(1000, 64, heldout=True)
    seen = collections.Counter()
    for scene in scenes:
        held = [(o.color, o.shape) for o in scene.objects if (o.color, o.shape) in HELDOUT_PAIRS]
        assert held
        seen.update(held)
    assert set(seen) == HELDOUT_PAIRS
    # The held-out object is named first or second, not always first.
    two = [s for s in scenes if len(s.objects) == 2]
    firsts = [(s.objects[0].color, s.objects[0].shape) in HELDOUT_PAIRS for s in two]
    assert 0 < sum(firsts) < len(two)


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_centers_are_jittered_cell_centers_inside_the_canvas(image_size):
    for scene in _scenes(500, image_size, heldout=False, seed=image_size):
        for obj in scene.objects:
            extent = object_extent(obj.size, image_size)
            base = cell_center(obj.position, image_size)
            for axis in (0, 1):
                value = obj.center[axis]
                # Inside with a 1 px margin.
                assert extent / 2 + 1 <= value <= image_size - extent / 2 - 1
                # Within the jitter unless the clamp pulled it toward the middle.
                lo, hi = extent / 2 + 1, image_size - extent / 2 - 1
                clamped = min(hi, max(lo, base[axis]))
                assert abs(value - clamped) <= image_size / 32 + spec.CENTER_QUANTUM / 2
            assert spec.position_of_point(*obj.center, image_size) == obj.position


def test_two_objects_never_overlap():
    for image_size in (32, 64):
        for scene in _scenes(1500, image_size, heldout=False, seed=7):
            if len(scene.objects) == 2:
                a, b = scene.objects
                half = (object_extent(a.size, image_size) + object_extent(b.size, image_size)) / 2
                dx = abs(a.center[0] - b.center[0])
                dy = abs(a.center[1] - b.center[1])
                assert dx >= half + 2 or dy >= half + 2


def test_sampling_is_deterministic_in_the_seed():
    first = _scenes(50, 64, heldout=False, seed=3)
    assert first == _scenes(50, 64, heldout=False, seed=3)
    assert first != _scenes(50, 64, heldout=False, seed=4)


# --- spec: captions -------------------------------------------------------------------------


def test_there_are_enough_templates_including_the_required_ones():
    phrases = {t.phrase for t in CAPTION_TEMPLATES}
    assert len(CAPTION_TEMPLATES) >= 6
    assert "a {size} {color} {shape} at the {position}" in phrases
    assert "a {color} {shape} at the {position}" in phrases


@pytest.mark.parametrize("template", CAPTION_TEMPLATES, ids=lambda t: t.prefix + t.phrase)
@pytest.mark.parametrize("with_background", [False, True])
def test_parse_caption_inverts_every_template(template, with_background):
    scenes = _scenes(120, 64, heldout=False, seed=11) + _scenes(40, 64, heldout=True, seed=12)
    assert any(len(s.objects) == 2 for s in scenes)
    for scene in scenes:
        caption = format_caption(scene, template, with_background)
        assert caption == caption.lower()
        expected = [_expected_request(obj, template) for obj in scene.objects]
        assert parse_caption(caption) == expected, caption
        assert parse_background(caption) == (scene.background if with_background else None)


def test_parse_caption_covers_every_attribute_value():
    template = CAPTION_TEMPLATES[0]  # names all four attributes
    for color, shape, size, position in itertools.product(COLORS, SHAPES, SIZES, POSITIONS):
        obj = SceneObject(color, shape, size, position, (32.0, 32.0))
        caption = format_caption(Scene(64, "black", (obj,)), template, False)
        assert parse_caption(caption) == [RequestedObject(color, shape, size, position)]


def test_articles_and_loose_formatting():
    orange = SceneObject("orange", "circle", "small", "top left", (10.0, 10.0))
    caption = format_caption(Scene(64, "white", (orange,)), CAPTION_TEMPLATES[1], True)
    assert caption == "an orange circle at the top left on a white background"
    assert parse_caption("  An ORANGE circle at the  top left. ") == [
        RequestedObject("orange", "circle", None, "top left")
    ]
    assert parse_caption("a photo of a cat") == []


def test_caption_scene_states_what_it_says_it_states():
    templates_used = set()
    for i, scene in enumerate(_scenes(800, 64, heldout=False, seed=5)):
        caption, mentioned = caption_scene(scene, np.random.default_rng(i))
        parsed = parse_caption(caption)
        assert len(parsed) == len(scene.objects)
        for request, obj in zip(parsed, scene.objects, strict=True):
            for attribute in ("color", "shape", "size", "position"):
                said = getattr(request, attribute)
                assert said == (getattr(obj, attribute) if getattr(mentioned, attribute) else None)
        assert parse_background(caption) == (scene.background if mentioned.background else None)
        templates_used.add((mentioned.color, mentioned.shape, mentioned.size, mentioned.position))
    assert len(templates_used) >= 6  # attributes really are omitted, in several ways


def test_most_captions_name_color_and_shape_and_heldout_captions_always_do():
    both = 0
    scenes = _scenes(1000, 64, heldout=False, seed=9)
    for i, scene in enumerate(scenes):
        _, mentioned = caption_scene(scene, np.random.default_rng(i))
        both += mentioned.color and mentioned.shape
    assert both / len(scenes) > 0.85
    for i, scene in enumerate(_scenes(300, 64, heldout=True, seed=9)):
        caption, mentioned = caption_scene(
            scene, np.random.default_rng(i), name_color_and_shape=True
        )
        assert mentioned.color and mentioned.shape
        named = {(r.color, r.shape) for r in parse_caption(caption)}
        assert named & HELDOUT_PAIRS


# --- renderer -------------------------------------------------------------------------------


def _object_mask(image: np.ndarray, background: str) -> np.ndarray:
    return np.any(image != np.array(BACKGROUNDS[background], dtype=np.uint8), axis=-1)


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_render_colors_backgrounds_and_dtype(image_size):
    for scene in _scenes(60, image_size, heldout=False, seed=21) + _scenes(
        20, image_size, heldout=True, seed=22
    ):
        image = render_scene(scene)
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
        background = np.array(BACKGROUNDS[scene.background])
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            np.testing.assert_array_equal(corner, background)
        # The 1 px margin keeps the whole border background.
        assert not _object_mask(image[[0, -1]], scene.background).any()
        assert not _object_mask(image[:, [0, -1]], scene.background).any()
        for obj in scene.objects:
            x, y = (int(v) for v in obj.center)
            np.testing.assert_array_equal(image[y, x], COLORS[obj.color])


@pytest.mark.parametrize("image_size", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZES)
def test_render_geometry(image_size, shape, size):
    """Bounding box ≈ round(fraction·S), area as the shape says, triangle apex up."""
    extent = object_extent(size, image_size)
    rng = np.random.default_rng(image_size)
    for position in ("top left", "center", "bottom right"):
        center = spec._jittered_center(rng, position, extent, image_size)
        obj = SceneObject("blue", shape, size, position, center)
        image = render_scene(Scene(image_size, "white", (obj,)))
        rows, cols = np.nonzero(_object_mask(image, "white"))
        # Edges on quarter pixels: the touched pixels span extent or extent + 1.
        assert rows.max() - rows.min() + 1 in (extent, extent + 1)
        assert cols.max() - cols.min() + 1 in (extent, extent + 1)
        box_center = ((cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2)
        assert spec.position_of_point(*box_center, image_size) == position
        assert np.allclose(box_center, center, atol=0.5)
        white, blue = np.array(BACKGROUNDS["white"]), np.array(COLORS["blue"])
        coverage = (image.astype(float) - white) @ (blue - white) / np.sum((blue - white) ** 2)
        expected_fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5}
        assert coverage.sum() / extent**2 == pytest.approx(expected_fill[shape], rel=0.08)
        ys, xs = np.indices(coverage.shape) + 0.5
        centroid = ((coverage * xs).sum() / coverage.sum(), (coverage * ys).sum() / coverage.sum())
        # An upright triangle's centroid is extent/6 below its box center (apex up).
        drop = extent / 6 if shape == "triangle" else 0.0
        assert np.allclose(centroid, (center[0], center[1] + drop), atol=0.1 + 0.02 * extent)


def test_render_is_deterministic_and_rejects_a_size_mismatch():
    scene = _scenes(1, 64, heldout=False, seed=1)[0]
    np.testing.assert_array_equal(render_scene(scene), render_scene(scene, 64))
    with pytest.raises(ValueError, match="sampled for 64"):
        render_scene(scene, 32)


# --- builder --------------------------------------------------------------------------------


def _prepare(config: str, data_dir: Path):
    from dalle_jax.data.shapes_world.builder import ShapesWorld

    builder = ShapesWorld(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    return _prepare("tiny32", tmp_path_factory.mktemp("shapes_world_a"))


@pytest.fixture(scope="module")
def tiny32_again(tmp_path_factory):
    return _prepare("tiny32", tmp_path_factory.mktemp("shapes_world_b"))


SPLIT_SIZES = {"train": 512, "validation": 64, "test": 64, "test_heldout": 64}


def _examples(builder, split):
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_builder_configs_and_default():
    from dalle_jax.data.shapes_world.builder import ShapesWorld

    configs = {c.name: c for c in ShapesWorld.BUILDER_CONFIGS}
    assert {"32", "64", "128", "tiny32", "tiny64"} <= set(configs)
    for name in ("32", "64", "128"):
        assert configs[name].image_size == int(name)
        assert dict(configs[name].split_sizes) == {
            "train": 100_000,
            "validation": 2_000,
            "test": 2_000,
            "test_heldout": 2_000,
        }
    assert ShapesWorld.DEFAULT_BUILDER_CONFIG_NAME == "64"


def test_split_sizes_and_image_format(tiny32):
    for split, size in SPLIT_SIZES.items():
        assert tiny32.info.splits[split].num_examples == size
        source = tiny32.as_data_source(split)
        assert len(source) == size
        image = source[size - 1]["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_records_agree_with_captions_labels_and_pixels(tiny32):
    from dalle_jax.data.shapes_world.builder import normalize, scene_from_example

    for split in SPLIT_SIZES:
        for index, example in enumerate(_examples(tiny32, split)):
            scene, mentioned = scene_from_example(example)
            caption = normalize(example, index)["caption"]
            assert isinstance(caption, str)
            parsed = parse_caption(caption)
            assert len(parsed) == len(scene.objects)
            for request, obj in zip(parsed, scene.objects, strict=True):
                for attribute in ("color", "shape", "size", "position"):
                    want = getattr(obj, attribute) if getattr(mentioned, attribute) else None
                    assert getattr(request, attribute) == want, (caption, attribute)
            assert parse_background(caption) == (scene.background if mentioned.background else None)
            # The stored PNG is lossless: the labels redraw the stored pixels exactly.
            np.testing.assert_array_equal(example["image"], render_scene(scene))


def test_heldout_pairs_are_really_held_out(tiny32):
    from dalle_jax.data.shapes_world.builder import scene_from_example

    def pairs(example):
        scene, _ = scene_from_example(example)
        return {(o.color, o.shape) for o in scene.objects}

    for split in ("train", "validation", "test"):
        for example in _examples(tiny32, split):
            assert not pairs(example) & HELDOUT_PAIRS
    for example in _examples(tiny32, "test_heldout"):
        assert pairs(example) & HELDOUT_PAIRS
        named = {(r.color, r.shape) for r in parse_caption(example["caption"].decode())}
        assert named & HELDOUT_PAIRS


def test_two_builds_are_identical(tiny32, tiny32_again):
    def records(builder):
        root = Path(builder.data_dir)
        return {p.name: p.read_bytes() for p in sorted(root.glob("*.array_record*"))}

    first, second = records(tiny32), records(tiny32_again)
    assert len(first) == len(SPLIT_SIZES)
    assert first == second


def test_registry_reaches_the_builder(tmp_path):
    from dalle_jax.data import registry
    from dalle_jax.data.shapes_world.builder import ShapesWorld

    builder = registry.builder("shapes_world/tiny64", data_dir=str(tmp_path))
    assert isinstance(builder, ShapesWorld)
    assert builder.builder_config.image_size == 64
    assert registry.builder("shapes_world", data_dir=str(tmp_path)).builder_config.name == "64"
    example = {"image": np.zeros((64, 64, 3), np.uint8), "caption": b"a red circle"}
    out = registry.normalizer("shapes_world")(example, 0)
    assert out["caption"] == "a red circle" and out["image"].dtype == np.uint8


_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, json, sys

    # `sys.modules["tensorflow"] = None` would not do: etils decides "TF is loaded" from the
    # key's presence, and tfds then crashes on `tf.dtypes`. Instead every import of
    # tensorflow fails as if it were installed but broken; sys.modules stays TF-free.
    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"{spec.name} is made unimportable for this test")

        def exec_module(self, module):
            raise AssertionError("unreachable")

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return importlib.machinery.ModuleSpec(name, Refuse())
            return None

    sys.meta_path.insert(0, NoTensorFlow())
    try:
        import tensorflow  # noqa: F401
        raise AssertionError("tensorflow imported")
    except ImportError:
        pass
    import tensorflow_datasets as tfds  # noqa: F401
    from dalle_jax.data.shapes_world.builder import ShapesWorld, normalize

    builder = ShapesWorld(config="tiny64", data_dir=sys.argv[1], file_format="array_record")
    builder.download_and_prepare()
    source = builder.as_data_source("test_heldout")
    example = normalize(source[5], 5)
    print(json.dumps({
        "n": len(source),
        "shape": list(example["image"].shape),
        "dtype": str(example["image"].dtype),
        "caption": example["caption"],
        "tensorflow": "tensorflow" in sys.modules,
    }))
    """
)


def test_prepare_and_read_without_tensorflow(tmp_path):
    env = dict(os.environ, TFDS_DISABLE_GCS="1", NO_GCE_CHECK="true")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "n": 64,
        "shape": [64, 64, 3],
        "dtype": "uint8",
        "caption": summary["caption"],
        "tensorflow": False,
    }
    assert parse_caption(summary["caption"])
