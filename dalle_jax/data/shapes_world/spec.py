"""The shapes_world dataset, as data: palette, shapes, sizes, grid, scene sampling and captions.

Everything that defines what a scene is and how it is described lives here, in pure Python
and numpy, so the renderer, the tfds builder and the shapes judge all read one definition.

A scene is a background filling an S×S canvas with one or two solid, anti-aliased objects.
Each object has a color (8), a shape (4), a size (2) and a cell of a 3×3 grid (9). Four
color–shape pairs (`HELDOUT_PAIRS`) never occur in `train`/`validation`: `test_heldout`
measures whether a model composes attributes it has only seen apart.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (140, 50, 200),
    "orange": (250, 130, 20),
    "cyan": (20, 200, 220),
    "pink": (245, 110, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Bounding-box side as a fraction of the canvas side S; the side is round(fraction * S).
SIZE_FRACTIONS: dict[str, float] = {"small": 0.25, "large": 0.42}
SIZES: tuple[str, ...] = tuple(SIZE_FRACTIONS)
# Row-major 3×3 grid: POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "diamond")}
)
# Sorted so that sampling is reproducible regardless of set iteration order.
HELDOUT_PAIR_LIST: tuple[tuple[str, str], ...] = tuple(sorted(HELDOUT_PAIRS))
IN_DISTRIBUTION_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS
)

PROB_ONE_OBJECT = 0.7
PROB_BACKGROUND_SUFFIX = 0.4
# Sub-pixel grid of object centers: the renderer draws at 4x, so a center on this grid puts
# every edge on a whole pixel of the 4x canvas and the box filter gives exact coverage.
CENTER_QUANTUM = 0.25


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object. `center` is (x, y) in pixels of the S×S canvas (x right, y down)."""

    color: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background name and one or two objects, on an `image_size`² canvas."""

    image_size: int
    background: str
    objects: tuple[SceneObject, ...]


@dataclasses.dataclass(frozen=True)
class Mentioned:
    """Which attributes a caption states (the same for every object in the caption)."""

    color: bool
    shape: bool
    size: bool
    position: bool
    background: bool


@dataclasses.dataclass(frozen=True)
class RequestedObject:
    """One object a caption asks for; None where the caption does not say."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None


def object_extent(size: str, image_size: int) -> int:
    """Side in pixels of the bounding box of an object of `size`: round(fraction * S)."""
    return int(math.floor(SIZE_FRACTIONS[size] * image_size + 0.5))


def cell_center(position: str, image_size: int) -> tuple[float, float]:
    """(x, y) in pixels of the center of a grid cell."""
    row, col = divmod(POSITIONS.index(position), 3)
    cell = image_size / 3
    return ((col + 0.5) * cell, (row + 0.5) * cell)


def position_of_point(x: float, y: float, image_size: int) -> str:
    """The name of the grid cell holding the point (x, y)."""
    cell = image_size / 3
    col = min(2, max(0, int(x // cell)))
    row = min(2, max(0, int(y // cell)))
    return POSITIONS[3 * row + col]


def _jittered_center(
    rng: np.random.Generator, position: str, extent: int, image_size: int
) -> tuple[float, float]:
    """Cell center + uniform ±S/32 jitter, on the quantum grid, clamped to a 1 px margin."""
    jitter = image_size / 32
    low = extent / 2 + 1
    high = image_size - extent / 2 - 1
    center = []
    for base in cell_center(position, image_size):
        value = base + rng.uniform(-jitter, jitter)
        value = round(value / CENTER_QUANTUM) * CENTER_QUANTUM
        center.append(float(min(high, max(low, value))))
    return (center[0], center[1])


def _boxes_apart(a: SceneObject, b: SceneObject, image_size: int) -> bool:
    """Whether two objects' bounding boxes are separated by a clear gap on some axis.

    Adjacent large objects would otherwise overlap (0.42·S > S/3); keeping them apart makes
    every object fully visible, which captions and the judge both assume.
    """
    gap = max(2.0, image_size / 32)
    half = (object_extent(a.size, image_size) + object_extent(b.size, image_size)) / 2
    dx = abs(a.center[0] - b.center[0])
    dy = abs(a.center[1] - b.center[1])
    return dx >= half + gap or dy >= half + gap


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, image_size: int, heldout: bool) -> Scene:
    """Draws one scene.

    One object (70%) or two (30%) in different cells with different colors and with clearly
    separated bounding boxes. In-distribution scenes (`heldout=False`) never use a pair in
    `HELDOUT_PAIRS`; held-out scenes (`heldout=True`) always contain at least one.
    """
    background = _choice(rng, tuple(BACKGROUNDS))
    n_objects = 1 if rng.random() < PROB_ONE_OBJECT else 2
    if heldout:
        pairs = [_choice(rng, HELDOUT_PAIR_LIST)]
        if n_objects == 2:
            others = [
                p for p in (*IN_DISTRIBUTION_PAIRS, *HELDOUT_PAIR_LIST) if p[0] != pairs[0][0]
            ]
            pairs.append(_choice(rng, others))
            if rng.random() < 0.5:  # the held-out object is not always named first
                pairs.reverse()
    else:
        pairs = [_choice(rng, IN_DISTRIBUTION_PAIRS)]
        if n_objects == 2:
            pairs.append(_choice(rng, [p for p in IN_DISTRIBUTION_PAIRS if p[0] != pairs[0][0]]))
    sizes = [_choice(rng, SIZES) for _ in pairs]
    while True:  # rejection: terminates fast, diagonal corners are always far enough apart
        cells = rng.choice(len(POSITIONS), size=len(pairs), replace=False)
        objects = tuple(
            SceneObject(
                color=color,
                shape=shape,
                size=size,
                position=POSITIONS[cell],
                center=_jittered_center(
                    rng, POSITIONS[cell], object_extent(size, image_size), image_size
                ),
            )
            for (color, shape), size, cell in zip(pairs, sizes, cells, strict=True)
        )
        if len(objects) == 1 or _boxes_apart(objects[0], objects[1], image_size):
            return Scene(image_size=image_size, background=background, objects=objects)


# --- captions ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaptionTemplate:
    """`prefix` once per caption, then `phrase` once per object (joined with ' and ')."""

    prefix: str
    phrase: str
    weight: float

    @property
    def mentions(self) -> tuple[bool, bool, bool, bool]:
        """(color, shape, size, position) stated by the phrase."""
        return (
            "{color}" in self.phrase,
            "{shape}" in self.phrase,
            "{size}" in self.phrase,
            "{position}" in self.phrase,
        )


# Color and shape are stated in 95% of captions: the hold-out is about color–shape pairs.
CAPTION_TEMPLATES: tuple[CaptionTemplate, ...] = (
    CaptionTemplate("", "a {size} {color} {shape} at the {position}", 0.25),
    CaptionTemplate("", "a {color} {shape} at the {position}", 0.20),
    CaptionTemplate("there is ", "a {size} {color} {shape} in the {position}", 0.15),
    CaptionTemplate("there is ", "a {color} {shape} in the {position}", 0.10),
    CaptionTemplate("", "a {size} {color} {shape}", 0.10),
    CaptionTemplate("", "a {color} {shape}", 0.10),
    CaptionTemplate("", "a {size} {shape} at the {position}", 0.05),
    CaptionTemplate("", "a {size} {color} shape at the {position}", 0.05),
)


def _with_articles(text: str) -> str:
    """'a orange' -> 'an orange' (orange is the only vowel-initial word used)."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def format_caption(scene: Scene, template: CaptionTemplate, with_background: bool) -> str:
    """The caption of `scene` in `template`, objects in scene order."""
    phrases = [
        template.phrase.format(
            color=obj.color, shape=obj.shape, size=obj.size, position=obj.position
        )
        for obj in scene.objects
    ]
    caption = template.prefix + " and ".join(phrases)
    if with_background:
        caption += f" on a {scene.background} background"
    return _with_articles(caption)


def caption_scene(
    scene: Scene, rng: np.random.Generator, *, name_color_and_shape: bool = False
) -> tuple[str, Mentioned]:
    """A lower-case English caption of `scene`, objects in scene order, and what it states.

    `name_color_and_shape=True` draws only templates that state both (used for
    `test_heldout`, whose captions must name the held-out color–shape pairs).
    """
    templates = [t for t in CAPTION_TEMPLATES if not name_color_and_shape or all(t.mentions[:2])]
    weights = np.array([t.weight for t in templates])
    template = templates[int(rng.choice(len(templates), p=weights / weights.sum()))]
    with_background = bool(rng.random() < PROB_BACKGROUND_SUFFIX)
    color, shape, size, position = template.mentions
    caption = format_caption(scene, template, with_background)
    return caption, Mentioned(color, shape, size, position, with_background)


def _alternation(words) -> str:
    # Longest first, so "top left" wins over "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_BACKGROUND_SUFFIX = re.compile(rf"\s+on an? ({_alternation(BACKGROUNDS)}) background$")
_COLOR = re.compile(rf"\b({_alternation(COLORS)})\b")
_SHAPE = re.compile(rf"\b({_alternation(SHAPES)})\b")
_SIZE = re.compile(rf"\b({_alternation(SIZES)})\b")
_POSITION = re.compile(rf"\b(?:at|in) the ({_alternation(POSITIONS)})\b")


def _clean(caption: str) -> str:
    return " ".join(caption.lower().strip().rstrip(".").split())


def parse_background(caption: str) -> str | None:
    """The background a caption names (`... on a gray background`), else None."""
    match = _BACKGROUND_SUFFIX.search(_clean(caption))
    return match.group(1) if match else None


def parse_caption(caption: str) -> list[RequestedObject]:
    """The objects a caption asks for, in order; attributes it does not state are None.

    Inverts every template of `caption_scene` exactly and tolerates case, a final period and
    extra spaces. Phrases naming no attribute at all are dropped, so an unrelated prompt
    gives [].
    """
    text = _BACKGROUND_SUFFIX.sub("", _clean(caption))
    text = re.sub(r"^there (?:is|are) ", "", text)
    requested = []
    for phrase in re.split(r"\s+and\s+", text):
        found = [pattern.search(phrase) for pattern in (_COLOR, _SHAPE, _SIZE, _POSITION)]
        color, shape, size, position = (m.group(1) if m else None for m in found)
        if any(v is not None for v in (color, shape, size, position)):
            requested.append(RequestedObject(color, shape, size, position))
    return requested
