"""The tfds builder of shapes_world, written as array_record and read without TensorFlow.

    builder = ShapesWorld(config="64", data_dir=D, file_format="array_record")
    builder.download_and_prepare()
    source = builder.as_data_source("train")  # random access; source[i] is a dict

Nothing is downloaded: every example is generated from a seed made of (split, index), so
a config always yields the same dataset, byte for byte (given the same Pillow), and
example i of a split is the same scene in every config of the same image size (the tiny
configs are prefixes of the full ones). Records keep generation order (no shuffling):
`source[i]` is example i.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from dalle_jax.data.shapes_world.render import encode_png, render_scene
from dalle_jax.data.shapes_world.spec import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Mentioned,
    Scene,
    SceneObject,
    caption_scene,
    sample_scene,
)

# Changing the seed, the spec or the renderer changes the data: bump VERSION with it.
DATASET_SEED = 20_240_601
SPLITS: tuple[str, ...] = ("train", "validation", "test", "test_heldout")
HELDOUT_SPLITS = frozenset({"test_heldout"})
MENTION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Mentioned))


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """A canvas size and how many examples each split holds."""

    image_size: int = 64
    split_sizes: tuple[tuple[str, int], ...] = ()


def _config(name: str, image_size: int, train: int, others: int, description: str):
    return ShapesWorldConfig(
        name=name,
        description=description,
        image_size=image_size,
        split_sizes=tuple((split, train if split == "train" else others) for split in SPLITS),
    )


def example_seed(split: str, index: int) -> list[int]:
    """The seed of example `index` of `split`; it does not depend on the config."""
    return [DATASET_SEED, SPLITS.index(split), index]


def generate_example(split: str, index: int, image_size: int) -> tuple[Scene, str, Mentioned]:
    """Scene, caption and mention flags of one example (what the builder stores)."""
    rng = np.random.default_rng(example_seed(split, index))
    heldout = split in HELDOUT_SPLITS
    scene = sample_scene(rng, image_size, heldout=heldout)
    caption, mentioned = caption_scene(scene, rng, name_color_and_shape=heldout)
    return scene, caption, mentioned


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Colored shapes on a plain background, captioned, with a compositional hold-out."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        _config("32", 32, 100_000, 2_000, "32x32 images"),
        _config("64", 64, 100_000, 2_000, "64x64 images"),
        _config("128", 128, 100_000, 2_000, "128x128 images"),
        _config("tiny32", 32, 512, 64, "32x32, a few hundred examples, for tests"),
        _config("tiny64", 64, 512, 64, "64x64, a few hundred examples, for tests"),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "64"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        label = lambda names: tfds.features.ClassLabel(names=list(names))
        return self.dataset_info_from_configs(
            description=(
                "Procedural scenes of one or two colored shapes (circle, square, triangle, "
                "diamond; 8 colors, 2 sizes, 3x3 grid positions) on a black, white or gray "
                "background, with template captions. The color-shape pairs red triangle, "
                "blue circle, yellow square and purple diamond appear only in test_heldout."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "background": label(BACKGROUNDS),
                    "objects": tfds.features.Sequence(
                        {
                            "color": label(COLORS),
                            "shape": label(SHAPES),
                            "size": label(SIZES),
                            "position": label(POSITIONS),
                            "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                        }
                    ),
                    "mentions": tfds.features.FeaturesDict(
                        {field: tfds.features.Scalar(dtype=np.bool_) for field in MENTION_FIELDS}
                    ),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated
        return {
            split: self._generate_examples(split, count)
            for split, count in self.builder_config.split_sizes
        }

    def _generate_examples(self, split: str, count: int):
        size = self.builder_config.image_size
        for index in range(count):
            scene, caption, mentioned = generate_example(split, index, size)
            yield (
                index,
                {
                    "image": encode_png(render_scene(scene)),
                    "caption": caption,
                    "background": scene.background,
                    "objects": [
                        {
                            "color": obj.color,
                            "shape": obj.shape,
                            "size": obj.size,
                            "position": obj.position,
                            "center": np.asarray(obj.center, dtype=np.float32),
                        }
                        for obj in scene.objects
                    ],
                    "mentions": dataclasses.asdict(mentioned),
                },
            )


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def normalize(example: dict, index: int) -> dict:
    """`{"image": uint8 [S, S, 3], "caption": str}` from a decoded record (see registry.py)."""
    del index  # one caption per image: nothing to choose
    return {
        "image": np.asarray(example["image"], dtype=np.uint8),
        "caption": _text(example["caption"]),
    }


def scene_from_example(example: dict, image_size: int | None = None) -> tuple[Scene, Mentioned]:
    """The ground-truth scene and mention flags of a decoded record (labels -> names)."""
    image_size = image_size or int(np.asarray(example["image"]).shape[0])
    objects = example["objects"]
    scene = Scene(
        image_size=image_size,
        background=tuple(BACKGROUNDS)[int(example["background"])],
        objects=tuple(
            SceneObject(
                color=tuple(COLORS)[int(color)],
                shape=SHAPES[int(shape)],
                size=SIZES[int(size)],
                position=POSITIONS[int(position)],
                center=(float(center[0]), float(center[1])),
            )
            for color, shape, size, position, center in zip(
                objects["color"],
                objects["shape"],
                objects["size"],
                objects["position"],
                objects["center"],
                strict=True,
            )
        ),
    )
    mentions = example["mentions"]
    return scene, Mentioned(**{field: bool(mentions[field]) for field in MENTION_FIELDS})
