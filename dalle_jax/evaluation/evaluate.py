"""The library behind the `evaluate` command: a bundle, a dataset, some splits -> the figures
of a model card, one column per split, in one run.

    report = evaluate_bundle("shapes", "shapes_world/64", ["test", "test_heldout"])
    print(format_table(report))
    write_report(report, "evaluation")          # evaluation/evaluation.json

Each split is evaluated on its first `num_prompts` examples (in source order, so the same
examples every run). Metric groups (`METRIC_GROUPS`):

- `judge` (shapes_world only): one image is generated per caption with the bundle's default
  sampling (`generate_images`: its settings unless overridden, and its default reranking, see
  below) and scored by the deterministic shapes judge against what the caption asks for: the
  fraction of requested objects drawn with the right color, shape and position (and size when
  the caption says it), plus each attribute's own accuracy.
- `r_precision` (needs the bundle's reranker): contrastive R-precision on images generated
  WITHOUT reranking: in groups of `R_PRECISION_GROUP` (100) prompts, the fraction of images whose
  own prompt the reranker ranks first among the group's prompts. A prompt whose text is
  identical to the true one counts as right (`r_precision`; shapes_world repeats short captions
  word for word); `r_precision_by_index` counts only the very prompt. Chance is 1/group. Images
  reranked by the same reranker would make the measure circular.
- `fd` (needs the reranker): a Fréchet distance between Gaussians fitted to the reranker's image
  embeddings of the generated (without reranking, as for R-precision) and of the real images.
  NOT comparable to Inception FID.

Reranking (`rerank`: None = the bundle's default, `rerank_per_image` in its sampling dict; 0 =
off; M = M candidates per prompt): when it is on, the judge scores the one image per prompt the
reranker picks among M candidates, and R-precision and FD use a second set generated with the
same seed and no reranking (`generate_images(rerank=0)`); the judge on that set is reported too,
as `judge_accuracy_no_rerank`. When it is off, one set serves every metric and
`judge_accuracy_no_rerank` is left out (`judge_accuracy` is that figure). The report records
the candidates per prompt as `"rerank"` (None when off).
- `loss`: the split's images encoded with the bundle's vqvae and its captions with the bundle's
  tokenizer (cut or padded to the transformer's text length), one teacher-forced forward, no
  dropout and no caption dropout: image bits per dim (nats per image token / ln 2), nats per
  text token (all T positions, pads included, as in training) and the training loss (weighted).
- `vqvae`: reconstruction PSNR (mean per-image dB), codebook usage (fraction of codes used on
  the split) and perplexity; on shapes_world with `judge` also the judge on the reconstructions
  (the ceiling the generated images can reach through this vqvae).

A metric that cannot be measured (no reranker, not shapes_world) is None in the results, with
its reason under `"absent"`: never a made-up number. Every split is sampled with the same seed;
image i of a split is drawn with key `fold_in(key(seed), i)`, whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.errors import UserError

_log = logging.getLogger(__name__)

REPORT_FORMAT = "dalle_jax.evaluation.v1"
REPORT_NAME = "evaluation.json"
METRIC_GROUPS: tuple[str, ...] = ("judge", "r_precision", "fd", "loss", "vqvae")
GENERATED_GROUPS: tuple[str, ...] = ("judge", "r_precision", "fd")  # need generated images
DEFAULT_NUM_PROMPTS = 1000
DEFAULT_BATCH_SIZE = 64
R_PRECISION_GROUP = 100
SHAPES_DATASET = "shapes_world"
FD_NOTE = (
    "reranker_fd: Frechet distance between Gaussians fitted to the reranker's image embeddings "
    "of generated (without reranking) and real images; NOT comparable to Inception FID"
)
NO_RERANKER = "the bundle has no reranker"
NOT_SHAPES = "the shapes judge scores shapes_world images only"

Warn = Callable[[str], None]


# ------------------------------------------------------------------------------ arguments


def parse_splits(splits: str | Sequence[str]) -> list[str]:
    """`"test,test_heldout"` (or a list) -> `["test", "test_heldout"]`; UserError for none or
    a repeated one."""
    items = splits.split(",") if isinstance(splits, str) else list(splits)
    names = [str(s).strip() for s in items if str(s).strip()]
    if not names:
        raise UserError("no split given; pass --split NAME or a comma list (test,test_heldout)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"split {repeated[0]!r} is given twice; name each split once")
    return names


def parse_metric_groups(
    metrics: str | Sequence[str] | None = None, *, generate: bool = True
) -> tuple[str, ...]:
    """The metric groups to run, in `METRIC_GROUPS` order. None or "all": all of them;
    `generate=False` leaves out those that need generated images (`GENERATED_GROUPS`)."""
    if metrics is None or metrics == "all":
        chosen = set(METRIC_GROUPS)
    else:
        items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
        chosen = {str(m).strip().replace("-", "_") for m in items if str(m).strip()}
        unknown = sorted(chosen - set(METRIC_GROUPS))
        if unknown:
            raise UserError(
                f"unknown metric group {unknown[0]!r}; known: {', '.join(METRIC_GROUPS)} (or all)"
            )
        if not chosen:
            raise UserError(f"no metric group given; pick from {', '.join(METRIC_GROUPS)}")
    if not generate:
        if metrics not in (None, "all") and chosen & set(GENERATED_GROUPS):
            named = ", ".join(g for g in GENERATED_GROUPS if g in chosen)
            raise UserError(
                f"--no-generate leaves out {named}, which --metrics asks for; drop one of the two"
            )
        chosen -= set(GENERATED_GROUPS)
    return tuple(g for g in METRIC_GROUPS if g in chosen)


def check_num_prompts(num_prompts: int) -> None:
    if num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, got {num_prompts}")


def is_shapes_world(dataset: str) -> bool:
    return dataset.partition("/")[0] == SHAPES_DATASET


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class SplitExamples:
    """The first examples of a split, as the models see them."""

    name: str  # "shapes_world/64:test"
    images: np.ndarray  # uint8 [n, S, S, 3], S = the vqvae's image size
    captions: list[str]  # n non-empty captions
    available: int  # examples in the whole split


def dataset_image_size(split: Any) -> int | None:
    """The fixed side of a split's images from its tfds features, None when images vary in size
    (COCO) or the source does not say."""
    info = getattr(split.source, "dataset_info", None)
    try:
        shape = info.features["image"].shape
    except (AttributeError, KeyError, TypeError):
        return None
    if shape is None or len(shape) < 2 or shape[0] is None or shape[0] != shape[1]:
        return None
    return int(shape[0])


def check_image_size(split: Any, image_size: int) -> None:
    """UserError when the split's images are of a fixed size other than the vqvae's; images of
    varying size are center-cropped and resized, as in training."""
    native = dataset_image_size(split)
    if native is not None and native != image_size:
        dataset = split.name.partition(":")[0]
        raise UserError(
            f"dataset {dataset!r} has {native} px images but the bundle's vqvae takes "
            f"{image_size} px; evaluate on a {image_size} px config of the dataset "
            f"(e.g. {dataset.partition('/')[0]}/{image_size})"
        )


def load_examples(split: Any, num_prompts: int, image_size: int) -> SplitExamples:
    """The first `num_prompts` examples of `split` (a `pipeline.Split`): images resized to
    `image_size` as in training, captions as `normalize` gives them (index = source index).
    UserError for an empty split or an example without a caption."""
    from dalle_jax.data import pipeline  # noqa: PLC0415

    available = int(split.num_examples)
    if available == 0:
        raise UserError(f"{split.name} has no examples; prepare it again with `train data`")
    count = min(num_prompts, available)
    keys = list(range(count))
    images = np.zeros((count, image_size, image_size, 3), np.uint8)
    captions = []
    for row, raw in enumerate(pipeline.read_examples(split.source, keys)):
        example = split.normalize(raw, row)
        caption = example.get("caption", "")
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        if not caption.strip():
            raise UserError(
                f"{split.name} has no captions (example {row} has none); evaluate a split "
                "with a caption for every image"
            )
        captions.append(caption.strip())
        images[row] = pipeline.prepare_image(example["image"], image_size)
    return SplitExamples(split.name, images, captions, available)


# ------------------------------------------------------------------------------ pure metrics


def bits_per_dim(nats: float) -> float:
    """Nats per token -> bits per token (per dim of the image id grid): nats / ln 2."""
    return float(nats) / math.log(2.0)


def loss_metrics(
    text_nll: np.ndarray,
    image_nll: np.ndarray,
    *,
    text_length: int,
    image_length: int,
    text_weight: float,
    image_weight: float,
) -> dict[str, float]:
    """Per-example summed negative log-likelihoods (float [n] each, nats over the T text and N
    image positions) -> {"image_bits_per_dim", "image_nats_per_token", "text_nats_per_token",
    "loss"} (the training objective: text_weight * text + image_weight * image, nats)."""
    count = len(image_nll)
    if count == 0 or len(text_nll) != count:
        raise ValueError(f"need as many text as image losses (> 0), got {len(text_nll)}, {count}")
    text = float(np.sum(np.asarray(text_nll, np.float64)) / (count * text_length))
    image = float(np.sum(np.asarray(image_nll, np.float64)) / (count * image_length))
    return {
        "image_bits_per_dim": bits_per_dim(image),
        "image_nats_per_token": image,
        "text_nats_per_token": text,
        "loss": text_weight * text + image_weight * image,
    }


def judge_metrics(images: np.ndarray, captions: Sequence[str]) -> dict[str, float | int | None]:
    """The shapes judge on images uint8 [n, S, S, 3] against what their captions ask for.

    Returns {"judge_accuracy": fraction of requested objects fully right, "judge_color_accuracy",
    "judge_shape_accuracy", "judge_size_accuracy", "judge_position_accuracy" (each over the
    objects whose caption states that attribute; None when none does), "judge_objects": objects
    requested}.
    """
    from dalle_jax.evaluation import shapes_judge  # noqa: PLC0415

    report = shapes_judge.evaluate(np.asarray(images), list(captions))
    return {
        "judge_accuracy": _finite(report.accuracy),
        "judge_color_accuracy": _finite(report.color_accuracy),
        "judge_shape_accuracy": _finite(report.shape_accuracy),
        "judge_size_accuracy": _finite(report.size_accuracy),
        "judge_position_accuracy": _finite(report.position_accuracy),
        "judge_objects": int(report.n_requested),
    }


def r_precision_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: Sequence[str],
    *,
    group: int = R_PRECISION_GROUP,
) -> dict[str, float | int]:
    """Top-1 retrieval of each image's prompt among `group` prompts, averaged over groups.

    image_emb, text_emb: float [n, E] (unit norm), image i generated from caption i. Consecutive
    groups of `group` (fewer images: one group of all n; a last partial group is left out, so
    every image has the same chance 1/group). Returns {"r_precision" (a prompt of the same text
    counts as right), "r_precision_by_index" (only prompt i), "r_precision_group",
    "r_precision_images" (images ranked)}.
    """
    from dalle_jax.reranker import retrieval_metrics  # noqa: PLC0415

    count = len(image_emb)
    group = min(group, count)
    if group < 2:
        raise ValueError(f"R-precision needs at least 2 images, got {count}")
    by_text, by_index = [], []
    for start in range(0, count - group + 1, group):
        window = slice(start, start + group)
        metrics = retrieval_metrics(image_emb[window], text_emb[window], list(captions[window]))
        by_text.append(metrics["top1_text"])
        by_index.append(metrics["top1"])
    return {
        "r_precision": float(np.mean(by_text)),
        "r_precision_by_index": float(np.mean(by_index)),
        "r_precision_group": int(group),
        "r_precision_images": int(group * len(by_text)),
    }


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets float [n, E] (n >= 2):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    from scipy import linalg  # noqa: PLC0415

    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 feature vectors per set")
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.all(np.isfinite(root)):  # singular product: nudge both away from it
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root)
    return float(max(distance, 0.0))


def _finite(value: float) -> float | None:
    """JSON has no NaN: a metric with nothing to average over is None."""
    value = float(value)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------ model passes


def _batches(count: int, batch_size: int):
    """(start, stop) of each batch; the caller pads the last one to `batch_size` (one compile)."""
    return [(s, min(s + batch_size, count)) for s in range(0, count, batch_size)]


def _bar(total: int, desc: str, enabled: bool):
    from dalle_jax.progress import Progress  # noqa: PLC0415

    return Progress(total=total, desc=desc, process_index=0, force=False) if enabled else None


def reconstruct(
    vqvae_model: Any, images: np.ndarray, *, batch_size: int, progress: bool = False, desc=""
) -> dict[str, np.ndarray]:
    """The vqvae's ids, reconstructions and PSNRs of images uint8 [n, S, S, 3]:
    {"ids": int32 [n, h, w], "recon": uint8 [n, S, S, 3], "psnr": float32 [n]}."""
    from dalle_jax.loop_utils import pad_rows  # noqa: PLC0415

    graphdef, state = nnx.split(vqvae_model)
    from vqvae.compiled import compiled_reconstruct  # noqa: PLC0415

    run = compiled_reconstruct(graphdef)
    parts: dict[str, list[np.ndarray]] = {"ids": [], "recon": [], "psnr": []}
    batch = min(batch_size, len(images))
    spans = _batches(len(images), batch)
    bar = _bar(len(spans), desc or "reconstructing", progress)
    for start, stop in spans:
        out = jax.device_get(run(state, jnp.asarray(pad_rows(images[start:stop], batch))))
        for key in parts:
            parts[key].append(np.asarray(out[key])[: stop - start])
        if bar:
            bar.update()
    if bar:
        bar.close()
    return {key: np.concatenate(value) for key, value in parts.items()}


def token_nll(
    transformer: Any,
    text_ids: np.ndarray,
    image_ids: np.ndarray,
    *,
    batch_size: int,
    progress: bool = False,
    desc: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed nats per example: text_ids int32 [n, T], image_ids int32 [n, N] ->
    (text_nll float64 [n], image_nll float64 [n]); teacher-forced, no dropout."""
    from dalle_jax.generate import compiled_token_nll  # noqa: PLC0415
    from dalle_jax.loop_utils import pad_rows  # noqa: PLC0415

    graphdef, state = nnx.split(transformer)
    run = compiled_token_nll(graphdef)
    text_parts, image_parts = [], []
    batch = min(batch_size, len(text_ids))
    spans = _batches(len(text_ids), batch)
    bar = _bar(len(spans), desc or "loss", progress)
    for start, stop in spans:
        text, image = run(
            state,
            jnp.asarray(pad_rows(text_ids[start:stop], batch), jnp.int32),
            jnp.asarray(pad_rows(image_ids[start:stop], batch), jnp.int32),
        )
        text_parts.append(np.asarray(text, np.float64)[: stop - start])
        image_parts.append(np.asarray(image, np.float64)[: stop - start])
        if bar:
            bar.update()
    if bar:
        bar.close()
    return np.concatenate(text_parts), np.concatenate(image_parts)


# ------------------------------------------------------------------------------ one split


def _once(warn: Warn) -> Warn:
    """`warn`, saying each distinct message once (generation and the loss both cut captions)."""
    seen: set[str] = set()

    def say(message: str) -> None:
        if message not in seen:
            seen.add(message)
            warn(message)

    return say


def evaluate_split(
    bundle: Any,
    examples: SplitExamples,
    *,
    groups: Sequence[str],
    shapes: bool,
    seed: int,
    batch_size: int,
    settings: Any,
    rerank: int | None = None,
    progress: bool = True,
    warn: Warn | None = None,
) -> dict[str, Any]:
    """The metrics of one split's loaded examples (see the module docstring for each group).

    settings: the resolved `SamplingSettings`. rerank: candidates drawn per prompt for the
    judge's images, the reranker keeping one (None or 0: no reranking; resolve a bundle's
    default with `dalle_jax.generate.resolve_rerank` first). Returns {"examples": n, metric:
    value or None, ..., "absent": {metric: why}, "seconds": {phase: wall seconds}}.
    """
    warn = warn or _log.warning
    split = examples.name.partition(":")[2] or examples.name
    result: dict[str, Any] = {"examples": len(examples.captions)}
    absent: dict[str, str] = {}
    seconds: dict[str, float] = {}
    reranker = getattr(bundle, "reranker", None)
    images, captions = examples.images, examples.captions

    want_judge = "judge" in groups
    if want_judge and not shapes:
        result["judge_accuracy"] = None
        absent["judge_accuracy"] = NOT_SHAPES
        want_judge = False
    want_embeddings = []
    for group, key in (("r_precision", "r_precision"), ("fd", "reranker_fd")):
        if group not in groups:
            continue
        if reranker is None:
            result[key] = None
            absent[key] = NO_RERANKER
        elif group == "r_precision" and len(captions) < 2:
            result[key] = None
            absent[key] = "R-precision needs at least 2 prompts"
        elif group == "fd" and len(captions) < 2:
            result[key] = None
            absent[key] = "the Fréchet distance needs at least 2 images"
        else:
            want_embeddings.append(group)

    def generate(candidates: int) -> np.ndarray:
        """One image per caption, uint8 [n, S, S, 3]: the best of `candidates` (0: no
        reranking)."""
        from dalle_jax.generate import generate_images  # noqa: PLC0415

        drawn = generate_images(
            bundle,
            captions,
            num_images=1,
            seed=seed,
            batch_size=batch_size,
            rerank=candidates,
            progress=progress,
            warn=warn,
            # "off" is spelled 0 / 1 here: None would mean "the bundle's value".
            temperature=settings.temperature,
            top_k=settings.top_k or 0,
            top_p=settings.top_p or 1.0,
            cfg_scale=settings.cfg_scale,
        )
        return np.stack([images_of_caption[0] for images_of_caption in drawn])

    rerank = rerank or 0
    reranked = None  # the judge's images when reranking is on
    generated = None  # images without reranking
    if want_judge and rerank:
        clock = time.perf_counter()
        reranked = generate(rerank)
        seconds["generate_reranked"] = time.perf_counter() - clock
    if want_embeddings or (want_judge and not rerank):
        clock = time.perf_counter()
        generated = generate(0)
        seconds["generate"] = time.perf_counter() - clock

    if want_judge:
        clock = time.perf_counter()
        if reranked is not None:
            result.update(judge_metrics(reranked, captions))
            if generated is not None:
                no_rerank = judge_metrics(generated, captions)["judge_accuracy"]
                result["judge_accuracy_no_rerank"] = no_rerank
        else:
            result.update(judge_metrics(generated, captions))
        seconds["judge"] = time.perf_counter() - clock
    if want_embeddings:
        from dalle_jax import reranker as rr  # noqa: PLC0415

        clock = time.perf_counter()
        model = reranker.model
        generated_emb = rr.image_embeddings(model, generated)
        if "r_precision" in want_embeddings:
            text_ids = reranker.tokenizer.encode(captions, model.config.text_length)
            text_emb = rr.text_embeddings(model, text_ids)
            result.update(r_precision_metrics(generated_emb, text_emb, captions))
        if "fd" in want_embeddings:
            real_emb = rr.image_embeddings(model, images)
            result["reranker_fd"] = frechet_distance(generated_emb, real_emb)
        seconds["reranker"] = time.perf_counter() - clock

    if "loss" in groups or "vqvae" in groups:
        clock = time.perf_counter()
        out = reconstruct(
            bundle.vqvae, images, batch_size=batch_size, progress=progress, desc=f"{split}: vqvae"
        )
        seconds["vqvae"] = time.perf_counter() - clock
        if "vqvae" in groups:
            from vqvae.metrics import codebook_perplexity, codebook_usage  # noqa: PLC0415

            codebook_size = bundle.vqvae.config.codebook_size
            histogram = np.bincount(out["ids"].reshape(-1), minlength=codebook_size)
            result["vqvae_psnr"] = float(np.mean(out["psnr"]))
            result["vqvae_codebook_usage"] = float(codebook_usage(jnp.asarray(histogram)))
            result["vqvae_codebook_perplexity"] = float(codebook_perplexity(jnp.asarray(histogram)))
            if shapes and "judge" in groups:
                clock = time.perf_counter()
                result["vqvae_judge_accuracy"] = judge_metrics(out["recon"], captions)[
                    "judge_accuracy"
                ]
                seconds["vqvae_judge"] = time.perf_counter() - clock
        if "loss" in groups:
            from dalle_jax.generate import encode_prompts  # noqa: PLC0415

            clock = time.perf_counter()
            config = bundle.transformer.config
            text_ids = encode_prompts(bundle.tokenizer, captions, config.text_length, warn=warn)
            image_ids = out["ids"].reshape(len(captions), -1)
            text_nll, image_nll = token_nll(
                bundle.transformer,
                text_ids,
                image_ids,
                batch_size=batch_size,
                progress=progress,
                desc=f"{split}: loss",
            )
            result.update(
                loss_metrics(
                    text_nll,
                    image_nll,
                    text_length=config.text_length,
                    image_length=config.image_length,
                    text_weight=config.text_loss_weight,
                    image_weight=config.image_loss_weight,
                )
            )
            seconds["loss"] = time.perf_counter() - clock

    result["absent"] = absent
    result["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    return result


def images_note(
    rerank: int | None,
    groups: Sequence[str] = GENERATED_GROUPS,
    likelihood_weight: float | None = None,
) -> str:
    """Which generated images each requested metric used, e.g. "judge: the reranker's best of
    16 per prompt; R-precision, FD, judge without reranking: one image per prompt, no
    reranking". A likelihood weight w > 0 adds "(with the transformer's likelihood, weight
    w)" to the reranker's pick."""
    if not rerank:
        return "one per prompt, no reranking"
    plain = [
        name for group, name in (("r_precision", "R-precision"), ("fd", "FD")) if group in groups
    ]
    parts = []
    if "judge" in groups:
        pick = f"judge: the reranker's best of {rerank} per prompt"
        if likelihood_weight:
            pick += f" (with the transformer's likelihood, weight {likelihood_weight:g})"
        parts.append(pick)
        if plain:
            plain.append("judge without reranking")
    if plain:
        parts.append(f"{', '.join(plain)}: one image per prompt, no reranking")
    return "; ".join(parts)


# ------------------------------------------------------------------------------ the command


def _load(bundle: Any) -> Any:
    if isinstance(bundle, str | os.PathLike):
        from dalle_jax.bundle import load_bundle  # noqa: PLC0415

        return load_bundle(bundle)
    return bundle


def evaluate_bundle(
    bundle: Any,
    dataset: str,
    splits: str | Sequence[str],
    *,
    num_prompts: int = DEFAULT_NUM_PROMPTS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float | None = None,
    rerank: int | None = None,
    metrics: str | Sequence[str] | None = None,
    data_dir: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    warn: Warn | None = None,
) -> dict[str, Any]:
    """Evaluates a bundle on each split of a prepared dataset; returns the report (a JSON-ready
    dict, see `write_report`).

    bundle: a loaded `Bundle`, a bundle folder or a shipped bundle's name. splits: names or a
    comma list. num_prompts: the first N examples of each split (all of a smaller split, with a
    warning). Sampling settings: None takes the bundle's (`resolve_settings`; top_k 0 and top_p
    1 turn a filter off). rerank: candidates per prompt for the judge's images, the reranker
    keeping one: None = the bundle's default (`dalle_jax.generate.default_rerank`), 0 = off;
    R-precision and FD always use images generated without reranking (module docstring).
    metrics: groups of `METRIC_GROUPS` (None: all). data_dir: where the dataset is prepared
    (default `$DALLE_JAX_DATA_DIR`); builder_kwargs: the dataset builder's keyword arguments
    (image_folder's folder and image_size). Bad input (unknown dataset or split, an image size the
    vqvae does not take, a split without captions, num_prompts < 1, a rerank without a
    reranker) is a `UserError`, raised before anything slow.
    """
    from dalle_jax.data import pipeline  # noqa: PLC0415
    from dalle_jax.generate import (  # noqa: PLC0415
        check_counts,
        resolve_likelihood_weight,
        resolve_rerank,
        resolve_settings,
    )

    started = time.perf_counter()
    warn = _once(warn or _log.warning)
    check_num_prompts(num_prompts)
    check_counts(1, rerank, batch_size, seed)
    split_names = parse_splits(splits)
    groups = parse_metric_groups(metrics)
    bundle = _load(bundle)
    settings = resolve_settings(
        bundle.sampling, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale
    )
    generates = any(g in groups for g in GENERATED_GROUPS)
    # Candidates per prompt for the judge (None: off); only generated images are reranked.
    candidates = resolve_rerank(bundle, 1, rerank) if generates else None
    likelihood_weight = resolve_likelihood_weight(bundle, None) if candidates else None
    image_size = bundle.vqvae.config.image_size

    # Every split is opened and read before any model runs: a bad one fails in seconds.
    loaded = []
    for name in split_names:
        split = pipeline.open_split(dataset, name, data_dir=data_dir, **dict(builder_kwargs or {}))
        check_image_size(split, image_size)
        examples = load_examples(split, num_prompts, image_size)
        if examples.available < num_prompts:
            warn(
                f"{split.name} has {examples.available} examples: evaluating all of them, not "
                f"the {num_prompts} asked for"
            )
        loaded.append(examples)

    shapes = is_shapes_world(dataset)
    results = {}
    for examples in loaded:
        results[examples.name.partition(":")[2]] = evaluate_split(
            bundle,
            examples,
            groups=groups,
            shapes=shapes,
            seed=seed,
            batch_size=batch_size,
            settings=settings,
            rerank=candidates,
            progress=progress,
            warn=warn,
        )
    notes = []
    if "fd" in groups and any(r.get("reranker_fd") is not None for r in results.values()):
        notes.append(FD_NOTE)
    if generates:
        notes.append(f"generated images: {images_note(candidates, groups, likelihood_weight)}")
    path = getattr(bundle, "path", None)
    meta = getattr(bundle, "meta", None) or {}
    return {
        "format": REPORT_FORMAT,
        "bundle": str(path) if path is not None else None,
        "bundle_provenance": meta.get("provenance", {}),
        "dataset": dataset,
        "data_dir": data_dir or pipeline.default_data_dir(),
        "splits": split_names,
        "num_prompts": num_prompts,
        "seed": seed,
        "batch_size": batch_size,
        "settings": settings.to_dict(),
        "rerank": candidates,
        "rerank_likelihood_weight": likelihood_weight,
        "metric_groups": list(groups),
        "results": results,
        "notes": notes,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }


# ------------------------------------------------------------------------------ output


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


# (result key, row label, format). Rows show when some split has the key.
TABLE_ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("examples", "examples (prompts)", str),
    ("judge_accuracy", "shapes judge: objects right", _percent),
    ("judge_color_accuracy", "  color right", _percent),
    ("judge_shape_accuracy", "  shape right", _percent),
    ("judge_size_accuracy", "  size right", _percent),
    ("judge_position_accuracy", "  position right", _percent),
    ("judge_objects", "  objects requested", str),
    ("judge_accuracy_no_rerank", "shapes judge without reranking", _percent),
    ("r_precision", "R-precision (reranker top-1)", _percent),
    ("r_precision_by_index", "  same prompt only", _percent),
    ("r_precision_group", "  captions per choice", str),
    ("reranker_fd", "reranker-feature FD (not FID)", lambda v: f"{v:.4g}"),
    ("image_bits_per_dim", "image bits/dim", lambda v: f"{v:.4f}"),
    ("text_nats_per_token", "text nats/token", lambda v: f"{v:.4f}"),
    ("loss", "loss (training objective, nats)", lambda v: f"{v:.4f}"),
    ("vqvae_psnr", "vqvae PSNR (dB)", lambda v: f"{v:.2f}"),
    ("vqvae_codebook_usage", "vqvae codebook usage", _percent),
    ("vqvae_codebook_perplexity", "vqvae codebook perplexity", lambda v: f"{v:.1f}"),
    ("vqvae_judge_accuracy", "shapes judge on reconstructions", _percent),
)


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a text table: a header, one row per metric, one column per split; absent
    metrics read `n/a` with their reasons below."""
    results: Mapping[str, Mapping[str, Any]] = report["results"]
    splits = list(results)
    settings = report.get("settings", {})
    spelled = ", ".join(
        f"{k} {'off' if v is None else v}"
        for k, v in settings.items()
        if k in ("temperature", "top_k", "top_p", "cfg_scale")
    )
    lines = [
        f"bundle {report.get('bundle')}  dataset {report.get('dataset')}  "
        f"prompts per split {report.get('num_prompts')}  seed {report.get('seed')}",
        f"sampling: {spelled}",
    ]
    groups = report.get("metric_groups", GENERATED_GROUPS)
    if any(g in groups for g in GENERATED_GROUPS):
        note = images_note(report.get("rerank"), groups, report.get("rerank_likelihood_weight"))
        lines.append(f"generated images: {note}")
    lines.append("")
    label_width = max(len(label) for _, label, _ in TABLE_ROWS)
    widths = [max(len(s), 8) for s in splits]
    lines.append(
        "metric".ljust(label_width)
        + "".join(f"  {s:>{w}}" for s, w in zip(splits, widths, strict=True))
    )
    reasons: dict[str, str] = {}
    for key, label, fmt in TABLE_ROWS:
        if not any(key in results[s] for s in splits):
            continue
        cells = []
        for split in splits:
            value = results[split].get(key)
            if value is None:
                reason = results[split].get("absent", {}).get(key)
                if reason:
                    reasons[label.strip()] = reason
                cells.append("n/a")
            else:
                cells.append(fmt(value))
        lines.append(
            label.ljust(label_width)
            + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    for label, reason in reasons.items():
        lines.append(f"n/a: {label}: {reason}")
    lines.extend(note for note in report.get("notes", []) if note not in lines)  # no repeats
    if "wall_time_s" in report:
        lines.append(f"wall time {report['wall_time_s']:.1f} s")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged model's loss) as the strings "nan", "inf", "-inf": JSON
    has no such numbers, and None would hide them."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return str(float(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Writes `out_dir/evaluation.json` (created if need be); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_NAME
    staged = out / f".{REPORT_NAME}.tmp"
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False)
    staged.write_text(text + "\n", encoding="utf-8")
    os.replace(staged, path)
    return path


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_NUM_PROMPTS",
    "METRIC_GROUPS",
    "REPORT_NAME",
    "SplitExamples",
    "bits_per_dim",
    "check_image_size",
    "evaluate_bundle",
    "evaluate_split",
    "format_table",
    "frechet_distance",
    "images_note",
    "judge_metrics",
    "load_examples",
    "loss_metrics",
    "parse_metric_groups",
    "parse_splits",
    "r_precision_metrics",
    "reconstruct",
    "token_nll",
    "write_report",
]
