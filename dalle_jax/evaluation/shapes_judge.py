"""The deterministic shapes judge: what objects does a shapes_world-style image show?

numpy only, no learning, so its verdicts never drift. It scores generated images and vqvae
reconstructions against captions: the fraction of requested objects drawn with the right
color, shape and position (and size when the caption says it).

How it sees (`detect_objects`):
1. Background: the per-channel median of the border pixels (objects keep a 1 px margin).
2. Every pixel is unmixed against each palette color c as `background + alpha * (c - background)`:
   anti-aliased or blurred edges are such mixes, so each pixel gets the color whose mixing
   line passes closest (residual), and a coverage `alpha` in [0, 1]. Pixels with
   alpha >= 0.5 and a small residual are foreground.
3. Foreground pixels of one color form objects by 8-connected components; specks are dropped.
4. Each object is measured by its coverage over its pixels plus a fringe a few pixels wide,
   with unclipped coverage so that noise averages out: its area and centroid, which blur
   (a symmetric convolution that keeps mass) leaves unchanged.
5. Shape by least squares against templates: for each shape, the area fixes the side
   (square e^2, circle pi/4 e^2, triangle and diamond e^2/2) and the centroid fixes the
   place (a triangle's centroid sits e/6 below its box center); the template is that shape's
   exact coverage (4x4 supersampled, as the renderer draws), Gaussian-blurred at a few
   strengths, since images to judge are blurred by unknown amounts. The best fit wins.
6. Size from that side against the midpoint of the two sizes; position from the box center's
   3x3 cell.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from dalle_jax.data.shapes_world.spec import (
    COLORS,
    SIZE_FRACTIONS,
    RequestedObject,
    parse_caption,
    position_of_point,
)

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # [K, 3]

# Thresholds, chosen from the geometry above and checked on renders with and without
# blur + noise (see tests/test_shapes_judge.py and the measurements in its docstring).
MIN_COVERAGE = 0.5  # a pixel at least half covered by an object is foreground
MAX_RESIDUAL = 60.0  # RGB distance from the nearest mixing line; noise sigma 8 stays < 40
MIN_COLOR_CONTRAST = 40.0  # palette colors this close to the background cannot be seen
# Area over bounding-box area, to turn the (blur-proof) area back into a side length.
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "diamond": 0.5}
SMALL_MAX_EXTENT = (SIZE_FRACTIONS["small"] + SIZE_FRACTIONS["large"]) / 2  # of S
MIN_AREA_FRACTION = 0.3  # of the smallest object's area, (S/4)^2 / 2
MIN_FRINGE = 3  # px of edge around the core that still carries partial coverage (S/32 if more)
TEMPLATE_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # Gaussian sigmas in px
TEMPLATE_SUPERSAMPLING = 4
MAX_SCORED_DETECTIONS = 8


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One object seen in an image; lengths in pixels, `center` = (x, y), x right, y down."""

    color: str
    shape: str
    size: str
    position: str
    center: tuple[float, float]
    extent: float  # bounding-box side implied by the area and the shape
    area: float  # coverage-weighted, px^2
    blur: float  # sigma in px of the best-fitting template
    fit_error: float  # RMS misfit over RMS coverage: ~0.001 clean, ~0.07 blur 1 + noise 8


@dataclasses.dataclass(frozen=True)
class ObjectVerdict:
    """How one requested object was drawn. Attribute checks are None when not requested."""

    requested: RequestedObject
    detected: DetectedObject | None
    color_ok: bool | None
    shape_ok: bool | None
    size_ok: bool | None
    position_ok: bool | None

    @property
    def correct(self) -> bool:
        """Every requested attribute matches one detected object."""
        checks = (self.color_ok, self.shape_ok, self.size_ok, self.position_ok)
        return self.detected is not None and all(c is not False for c in checks)


@dataclasses.dataclass(frozen=True)
class JudgeReport:
    """Scores over many images. Attribute accuracies count only objects requesting them."""

    accuracy: float  # fraction of requested objects drawn fully right
    color_accuracy: float
    shape_accuracy: float
    size_accuracy: float
    position_accuracy: float
    n_images: int
    n_requested: int


def detect_background(image: np.ndarray) -> np.ndarray:
    """Background color, float32 [3]: per-channel median of the border pixels."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border.astype(np.float32), axis=0)


def _unmix(image: np.ndarray, background: np.ndarray):
    """Per pixel: nearest palette index int [H, W], its coverage and residual float [H, W],
    and the unclipped coverage of every palette color float [H, W, K].

    Colors within MIN_COLOR_CONTRAST of the background are never chosen. The unclipped
    coverage keeps zero-mean noise zero-mean, so sums over an object's fringe stay unbiased.
    """
    offsets = image.astype(np.float32) - background  # [H, W, 3]
    directions = _PALETTE - background  # [K, 3]
    norms = np.maximum(np.sum(directions**2, axis=1), 1e-6)
    dots = offsets @ directions.T  # [H, W, K]
    raw_alpha = dots / norms
    alpha = np.clip(raw_alpha, 0.0, 1.0)
    # |offset - alpha * direction|^2, expanded to avoid a [H, W, K, 3] temporary.
    squared = np.sum(offsets**2, axis=-1, keepdims=True) - 2 * alpha * dots + alpha**2 * norms
    residual = np.sqrt(np.maximum(squared, 0.0))
    residual[..., np.sqrt(norms) < MIN_COLOR_CONTRAST] = np.inf
    index = np.argmin(residual, axis=-1)
    pick = lambda a: np.take_along_axis(a, index[..., None], axis=-1)[..., 0]
    return index, pick(alpha), pick(residual), np.clip(raw_alpha, -1.0, 2.0)


_NEIGHBORS_8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def connected_components(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative class: int [H, W], -1 where class < 0.

    Each component is labelled by the smallest flat index of its pixels. Min-label
    propagation with pointer jumping, so it takes a few dozen numpy passes, not a Python
    loop over pixels.
    """
    height, width = classes.shape
    valid = classes >= 0
    big = height * width
    labels = np.where(valid, np.arange(big).reshape(height, width), big)
    padded_classes = np.pad(classes, 1, constant_values=-1)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        new = labels.copy()
        for dy, dx in _NEIGHBORS_8:
            window = (slice(1 + dy, 1 + dy + height), slice(1 + dx, 1 + dx + width))
            same = valid & (padded_classes[window] == classes)
            new = np.where(same, np.minimum(new, padded[window]), new)
        flat = new.ravel()
        for _ in range(4):  # pointer jumping: follow labels to their own labels
            flat = np.where(flat < big, np.append(flat, big)[np.minimum(flat, big)], big)
        new = flat.reshape(height, width)
        if np.array_equal(new, labels):
            return np.where(valid, labels, -1)
        labels = new


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    height, width = mask.shape
    for _ in range(steps):
        padded = np.pad(mask, 1)
        grown = mask.copy()
        for dy, dx in _NEIGHBORS_8:
            grown |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        mask = grown
    return mask


def _shape_coverage(
    shape: str, center: tuple[float, float], extent: float, origin: tuple[int, int], hw
) -> np.ndarray:
    """Exact-ish coverage float64 [h, w] of a shape drawn like the renderer draws it.

    `center` (x, y) is the bounding-box center and `origin` (y0, x0) the patch's top-left
    pixel, both in image pixels.
    """
    steps = (np.arange(TEMPLATE_SUPERSAMPLING) + 0.5) / TEMPLATE_SUPERSAMPLING
    (y0, x0), (height, width) = origin, hw
    dx = ((x0 + np.arange(width))[:, None] + steps).ravel()[None, :] - center[0]
    dy = ((y0 + np.arange(height))[:, None] + steps).ravel()[:, None] - center[1]
    half = extent / 2
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= half
    else:  # upright triangle: width = height, so the half-width at depth d below the apex is d/2
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    n = TEMPLATE_SUPERSAMPLING
    return inside.reshape(height, n, width, n).mean(axis=(1, 3))


def _blur_matrix(length: int, sigma: float) -> np.ndarray:
    """float [length, length]: left-multiplying blurs along that axis, zero padding."""
    offsets = np.arange(length)[:, None] - np.arange(length)[None, :]
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    return np.where(np.abs(offsets) <= radius, kernel[np.clip(offsets + radius, 0, 2 * radius)], 0)


def _gaussian_blur(patch: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float [h, w] with zero padding (mass leaving is lost)."""
    if sigma <= 0:
        return patch
    height, width = patch.shape
    return _blur_matrix(height, sigma) @ patch @ _blur_matrix(width, sigma).T


def _measure(
    coverage: np.ndarray, origin: tuple[int, int], color: str, image_size: int
) -> DetectedObject:
    """Measures one object from its coverage float [h, w] in a patch at `origin` (y0, x0)
    (zero outside the object's region)."""
    area = max(float(coverage.sum()), 1e-6)
    ys, xs = np.indices(coverage.shape, dtype=np.float64) + 0.5  # pixel centers
    cx = origin[1] + float((coverage * xs).sum() / area)
    cy = origin[0] + float((coverage * ys).sum() / area)
    region = coverage != 0
    scale = float(np.sum(coverage**2))
    best = None
    for shape, fill in FILL.items():
        extent = float(np.sqrt(area / fill))
        # A triangle's centroid sits extent/6 below its bounding-box center.
        center = (cx, cy - extent / 6) if shape == "triangle" else (cx, cy)
        sharp = _shape_coverage(shape, center, extent, origin, coverage.shape)
        for sigma in TEMPLATE_BLURS:
            misfit = float(np.sum((_gaussian_blur(sharp, sigma) * region - coverage) ** 2))
            if best is None or misfit < best[0]:
                best = (misfit, shape, extent, center, sigma)
    misfit, shape, extent, center, sigma = best
    return DetectedObject(
        color=color,
        shape=shape,
        size="small" if extent < SMALL_MAX_EXTENT * image_size else "large",
        position=position_of_point(center[0], center[1], image_size),
        center=center,
        extent=extent,
        area=area,
        blur=sigma,
        fit_error=float(np.sqrt(misfit / max(scale, 1e-6))),
    )


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square uint8 [S, S, 3] image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    return image


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """The objects in `image` (uint8 [S, S, 3]), largest first."""
    image = _check_image(image)
    image_size = image.shape[0]
    index, coverage, residual, all_coverage = _unmix(image, detect_background(image))
    foreground = (coverage >= MIN_COVERAGE) & (residual <= MAX_RESIDUAL)
    components = connected_components(np.where(foreground, index, -1))
    min_area = MIN_AREA_FRACTION * (SIZE_FRACTIONS["small"] * image_size) ** 2 / 2
    ids, counts = np.unique(components[components >= 0], return_counts=True)
    cores = [components == i for i, n in zip(ids, counts, strict=True) if n >= min_area]
    fringe = max(MIN_FRINGE, round(image_size / 32))
    objects = []
    for core in cores:
        color_index = int(index[core][0])
        # The fringe holds the partly covered edge pixels; other objects' pixels stay out.
        region = _dilate(core, fringe) & ~(foreground & ~core)
        rows, cols = np.nonzero(region)
        window = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        object_coverage = np.where(region[window], all_coverage[window + (color_index,)], 0.0)
        origin = (int(rows.min()), int(cols.min()))
        objects.append(_measure(object_coverage, origin, _COLOR_NAMES[color_index], image_size))
    return sorted(objects, key=lambda o: -o.area)


def _verdict(requested: RequestedObject, detected: DetectedObject | None) -> ObjectVerdict:
    def check(want, attribute):
        if want is None:
            return None
        return detected is not None and getattr(detected, attribute) == want

    return ObjectVerdict(
        requested=requested,
        detected=detected,
        color_ok=check(requested.color, "color"),
        shape_ok=check(requested.shape, "shape"),
        size_ok=check(requested.size, "size"),
        position_ok=check(requested.position, "position"),
    )


def _assignment_value(verdicts: Sequence[ObjectVerdict]) -> tuple[int, int]:
    """(objects fully right, attributes right): the best matching maximizes this."""
    attributes = sum(
        c is True for v in verdicts for c in (v.color_ok, v.shape_ok, v.size_ok, v.position_ok)
    )
    return (sum(v.correct for v in verdicts), attributes)


def score_image(image: np.ndarray, requested: Sequence[RequestedObject]) -> list[ObjectVerdict]:
    """One verdict per requested object, each matched to a distinct detected object.

    The matching maximizes the number of fully right objects, then of right attributes, so
    a two-object caption is not penalized for the order its objects are named in.
    """
    detected = detect_objects(image)[:MAX_SCORED_DETECTIONS]
    slots: list[DetectedObject | None] = [*detected, *([None] * len(requested))]
    best: list[ObjectVerdict] | None = None
    if len(requested) > 4:  # permutations explode; match greedily in caption order
        remaining = list(detected)
        best = []
        for want in requested:
            options = [_verdict(want, d) for d in remaining] or [_verdict(want, None)]
            verdict = max(options, key=lambda v: _assignment_value([v]))
            best.append(verdict)
            if verdict.detected is not None:
                remaining.remove(verdict.detected)
        return best
    for chosen in itertools.permutations(range(len(slots)), len(requested)):
        verdicts = [_verdict(want, slots[i]) for want, i in zip(requested, chosen, strict=True)]
        if best is None or _assignment_value(verdicts) > _assignment_value(best):
            best = verdicts
    return best or []


def _requests(item: str | Sequence[RequestedObject]) -> list[RequestedObject]:
    return parse_caption(item) if isinstance(item, str) else list(item)


def evaluate(
    images: Sequence[np.ndarray] | np.ndarray,
    captions_or_requests: Sequence[str | Sequence[RequestedObject]],
) -> JudgeReport:
    """Scores `images` (uint8 [B, S, S, 3] or a list) against captions or parsed requests."""
    if len(images) != len(captions_or_requests):
        raise ValueError(f"{len(images)} images but {len(captions_or_requests)} captions")
    verdicts = [
        v
        for image, item in zip(images, captions_or_requests, strict=True)
        for v in score_image(image, _requests(item))
    ]

    def rate(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    return JudgeReport(
        accuracy=rate([v.correct for v in verdicts]),
        color_accuracy=rate([v.color_ok for v in verdicts]),
        shape_accuracy=rate([v.shape_ok for v in verdicts]),
        size_accuracy=rate([v.size_ok for v in verdicts]),
        position_accuracy=rate([v.position_ok for v in verdicts]),
        n_images=len(images),
        n_requested=len(verdicts),
    )


def score(
    images: Sequence[np.ndarray] | np.ndarray,
    captions_or_requests: Sequence[str | Sequence[RequestedObject]],
) -> float:
    """Fraction of requested objects drawn with the right color, shape and position (and
    size when requested). Images: uint8 [B, S, S, 3]; items: captions or RequestedObjects.
    NaN when nothing is requested."""
    return evaluate(images, captions_or_requests).accuracy
