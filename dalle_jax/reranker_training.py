"""The reranker's training job: the loop around the contrastive step, its evaluation, checkpoints.

`train_and_evaluate(job, workdir)` is what `train reranker` calls; the model and its pure loss
live in `dalle_jax.reranker`. Data parallel over every device like stage 1, with the very helpers
of `dalle_jax.vqvae_training` (`data_mesh`, `global_batch`, ...): weights and optimizer state
replicated, the global batch split along the `data` axis. The InfoNCE loss compares every image
of the global batch with every caption of it, so XLA gathers the embeddings (B x E floats, not
the images) across devices.

A checkpoint holds `{"params": nnx.state(model), "opt": nnx.state(optimizer)}`, the job config
(with the resolved model config: image size, vocabulary size and the tokenizer's sha256) and the
input pipeline's position; the workdir also keeps a copy of the tokenizer (`tokenizer.model`),
so a workdir is all `load_reranker` and a resumed run need.

Evaluation: retrieval on the validation split in groups of `eval_group` (100) examples: for each
image, rank the group's captions by similarity (image -> text among 100, chance 1%).
`top1`/`top5` count the image's own caption (by index). On shapes_world many captions are short
and repeated word for word ("a red circle" is written for many images), so the index measure
calls a pick of an identical twin caption wrong although nothing could tell them apart;
`top1_text`/`top5_text` count a pick right when its text equals the true caption's. (Captions
that are different but both true, "a red circle" vs "a red circle at the top", still count as
misses under either measure: both are lower bounds on the scorer's quality.)
"""

from __future__ import annotations

import dataclasses
import functools
import io
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from PIL import Image

from dalle_jax import checkpoint as ckpt
from dalle_jax import hard_negatives, train_state
from dalle_jax import reranker as rr
from dalle_jax.data import pipeline
from dalle_jax.data.shapes_world import spec as shapes_spec
from dalle_jax.errors import UserError
from dalle_jax.metrics import MetricWriter, to_host_scalars
from dalle_jax.progress import Progress
from dalle_jax.tokenizer import TextTokenizer
from dalle_jax.vqvae_training import (
    check_batch_divides,
    data_mesh,
    global_batch,
    load_vqvae,
    pad_rows,
    replicated,
    round_up,
    shard_whole_batch,
)
from vqvae.compiled import compiled_reconstruct

TOKENIZER_FILENAME = "tokenizer.model"

# Configs that may change between runs of one workdir without changing what the weights mean.
RESUMABLE_KEYS = (
    "train",
    "job.log_every",
    "job.eval_every",
    "job.checkpoint_every",
    "job.eval_max_examples",
    "job.eval_group",
    "job.data_dir",
    "job.tokenizer",  # the path; the tokenizer's identity is the model's tokenizer_sha256
    # Where the dataset is read from (image_folder's folder), like data_dir; absent from the
    # configs of checkpoints written before it existed.
    "job.builder_kwargs",
)


@dataclasses.dataclass(frozen=True)
class RerankerTrainConfig:
    """How to train a reranker: AdamW on a warmup + cosine schedule, global-norm clipping."""

    batch_size: int = 128
    total_steps: int = 1500
    seed: int = 0
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05
    weight_decay: float = 0.05
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    grad_clip_norm: float = 1.0
    # Identical captions in a batch are all positives of each other's images (see
    # `reranker.info_nce_loss`), not negatives.
    same_caption_positives: bool = True
    # Groups of interchangeable words (colors, shapes, ...): each caption also gets a copy with
    # one of them swapped, as an extra negative of the image->text loss (NegCLIP; see
    # `dalle_jax.hard_negatives`). Empty: in-batch negatives only.
    swap_word_groups: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        try:
            # Lists arrive from JSON; the dataclass is frozen (and hashed: compile caches).
            object.__setattr__(
                self, "swap_word_groups", hard_negatives.normalize_groups(self.swap_word_groups)
            )
        except ValueError as error:
            raise UserError(f"invalid reranker training config: {error}") from None
        problems = []
        for field in ("batch_size", "total_steps"):
            if getattr(self, field) < 1:
                problems.append(f"{field} must be positive, got {getattr(self, field)}")
        if self.batch_size < 2:
            problems.append("a contrastive batch needs at least 2 pairs")
        if not 0 <= self.warmup_steps < self.total_steps:
            problems.append(
                f"warmup_steps ({self.warmup_steps}) must be in [0, total_steps "
                f"({self.total_steps}))"
            )
        if self.learning_rate <= 0:
            problems.append(f"learning_rate must be positive, got {self.learning_rate}")
        if problems:
            raise UserError("invalid reranker training config: " + "; ".join(problems))


@dataclasses.dataclass(frozen=True)
class RerankerJob:
    """A reranker training job as data: which model, how to train it, on what.

    `image_size` None: the dataset's own image size. `tokenizer` None: the workdir's copy
    (a resumed run). Both are resolved by `resolve_job` before training. `vqvae`: train on
    that vqvae's reconstructions of the training images (evaluation stays on the originals).
    """

    name: str
    model: rr.RerankerConfig
    train: RerankerTrainConfig
    dataset: str
    tokenizer: str | None = None
    image_size: int | None = None
    data_dir: str | None = None
    # A `train vqvae` workdir: train on its reconstructions of the images (what the reranker
    # scores at sampling time are vqvae decodes) rather than on the originals.
    vqvae: str | None = None
    # The dataset builder's keyword arguments, e.g. (("folder", "/my/pictures"),
    # ("image_size", 64)) for image_folder (`train reranker --folder DIR --image-size S`).
    builder_kwargs: tuple[tuple[str, Any], ...] = ()
    train_split: str = "train"
    eval_split: str = "validation"
    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500
    eval_max_examples: int | None = 1000  # None: the whole eval split
    eval_group: int = 100

    def __post_init__(self) -> None:
        for field in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, field) < 1:
                raise UserError(f"{field} must be at least 1, got {getattr(self, field)}")
        if self.eval_group < 2:
            raise UserError(f"eval_group must be at least 2, got {self.eval_group}")
        if self.eval_max_examples is not None and self.eval_max_examples < 2:
            raise UserError(
                f"eval_max_examples must be at least 2 (or None: all), got {self.eval_max_examples}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "train": dataclasses.asdict(self.train),
            "job": {
                k: dict(v) if k == "builder_kwargs" else v
                for k, v in dataclasses.asdict(self).items()
                if k not in ("model", "train")
            },
        }

    def replace(self, **changes: Any) -> RerankerJob:
        return dataclasses.replace(self, **changes)


# shapes_world's attribute words: a swap gives a caption of another color, shape or size.
SHAPES_WORLD_SWAPS = (tuple(shapes_spec.COLORS), shapes_spec.SHAPES, shapes_spec.SIZES)

JOBS: dict[str, RerankerJob] = {
    "tiny": RerankerJob(
        name="tiny",
        model=rr.get_config("tiny"),
        train=RerankerTrainConfig(
            batch_size=32, total_steps=60, warmup_steps=5, swap_word_groups=SHAPES_WORLD_SWAPS
        ),
        dataset="shapes_world/tiny32",
        log_every=5,
        eval_every=30,
        checkpoint_every=30,
        eval_max_examples=64,
    ),
    "small": RerankerJob(
        name="small",
        model=rr.get_config("small"),
        # 18 minutes on 2 CPU cores shared with another training run, at 64 px. On shapes_world
        # its retrieval top-1 (among 100 captions) was still rising at 600 steps (92.5%); at 3,000
        # it is 93.5%, and as the shapes bundle's reranker it lifts the judge of the best of 16
        # from 94.3% to 95.0% on validation (94.4 -> 94.8% test, 80.2 -> 83.0% held out).
        train=RerankerTrainConfig(batch_size=128, total_steps=3000, warmup_steps=50),
        dataset="shapes_world/64",
        eval_every=200,
    ),
    # emoji/32 (11k images, all three art styles): ~7 epochs; the model runs at 32 px.
    "emoji": RerankerJob(
        name="emoji",
        model=rr.get_config("small"),
        train=RerankerTrainConfig(batch_size=128, total_steps=600, warmup_steps=50),
        dataset="emoji/32",
        eval_every=200,
        eval_max_examples=600,
    ),
}


def get_job(name: str) -> RerankerJob:
    if name not in JOBS:
        raise UserError(f"unknown reranker config {name!r}; known: {', '.join(sorted(JOBS))}")
    return JOBS[name]


# ----------------------------------------------------------------------------- resolving


def dataset_image_size(split: pipeline.Split) -> int:
    """The shorter side of the split's first image: the size the model trains at by default."""
    if split.num_examples == 0:
        raise UserError(f"{split.name} is empty; prepare the dataset again with `train data`")
    image = split.normalize(split.source[0], 0)["image"]
    if isinstance(image, bytes | bytearray | memoryview):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        return int(min(image.size))
    return int(min(np.asarray(image).shape[:2]))


def tokenizer_for(job: RerankerJob, workdir: str) -> tuple[TextTokenizer, Path]:
    """The job's tokenizer and its file: `job.tokenizer`, else the workdir's copy."""
    path = Path(job.tokenizer) if job.tokenizer else Path(workdir) / TOKENIZER_FILENAME
    if not job.tokenizer and not path.is_file():
        raise UserError(
            f"no --tokenizer given and {str(path)!r} does not exist; pass --tokenizer FILE "
            "(train one with `train tokenizer`)"
        )
    return TextTokenizer.from_file(path), path


def resolve_job(job: RerankerJob, tokenizer: TextTokenizer, image_size: int) -> RerankerJob:
    """`job` with its model config completed: image size, vocabulary size, tokenizer sha256."""
    model = job.model.replace(
        image_size=job.image_size or image_size,
        text_vocab_size=tokenizer.vocab_size,
        tokenizer_sha256=rr.tokenizer_sha256(tokenizer.to_bytes()),
    )
    return job.replace(model=model, image_size=model.image_size)


# ----------------------------------------------------------------------------- the step


def learning_rate_schedule(config: RerankerTrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, cosine decay to `final_lr_fraction` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def _decay_mask(params):
    # Weight decay on kernels and embeddings only; biases, norm scales and the temperature free.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: RerankerTrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.adam_b1,
            b2=config.adam_b2,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        ),
    )


def train_step(
    model: rr.Reranker,
    optimizer: nnx.Optimizer,
    images: jax.Array,
    text_ids: jax.Array,
    step: jax.Array,
    negatives: tuple[jax.Array, jax.Array] | None = None,
    *,
    config: RerankerTrainConfig,
) -> dict[str, jax.Array]:
    """One AdamW update in place on a batch of matching pairs.

    images: uint8 [B, S, S, 3]; text_ids: int32 [B, T]; step: int32 [] (for the logged learning
    rate); negatives: (ids int32 [B, T], valid bool [B]), caption i with a word swapped
    (`negative_batch`), or None. Returns float32 [] metrics: loss, loss_image_to_text,
    loss_text_to_image, batch_top1, logit_scale, grad_norm, learning_rate (and
    hard_negative_top1 with negatives).
    """
    positives = rr.same_caption_mask(text_ids) if config.same_caption_positives else None
    allowed = None if negatives is None else rr.negative_allowed_mask(text_ids, *negatives)

    def loss_fn(model):
        image_emb = rr.embed_images(model, images)
        text_emb = rr.embed_texts(model, text_ids)
        negative_emb = None if negatives is None else rr.embed_texts(model, negatives[0])
        return rr.info_nce_loss(
            image_emb, text_emb, rr.logit_scale(model), positives, negative_emb, allowed
        )

    (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return {
        "loss": loss,
        **terms,
        "logit_scale": rr.logit_scale(model),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": learning_rate_schedule(config)(step),
    }


def _init(model_config: rr.RerankerConfig, train_config: RerankerTrainConfig):
    model = rr.create_reranker(model_config, seed=train_config.seed)
    return model, nnx.Optimizer(model, make_optimizer(train_config), wrt=nnx.Param)


# Cached per (configs, mesh), as in stage 1: a second run in one process (tests, time-sliced
# sessions) reuses the compiled programs.


@functools.lru_cache(maxsize=8)
def train_graphdef(model_config: rr.RerankerConfig, train_config: RerankerTrainConfig):
    """The graph of `(model, optimizer)` (cached: its optax transform compares by identity)."""
    return nnx.split(nnx.eval_shape(lambda: _init(model_config, train_config)))[0]


@functools.lru_cache(maxsize=8)
def compiled_init(model_config, train_config, mesh: Mesh) -> Callable:
    """`init() -> {"params": ..., "opt": ...}`, the fresh state replicated on `mesh`."""
    return train_state.jit_init(
        lambda: train_state.to_checkpoint(nnx.state(_init(model_config, train_config))),
        replicated(mesh),
        on_cpu=mesh.devices.flat[0].platform == "cpu",
    )


@functools.lru_cache(maxsize=8)
def compiled_train_step(model_config, train_config, mesh: Mesh) -> Callable:
    """`step_fn(state, images, text_ids, step[, negatives]) -> (state, metrics)`, jitted once,
    state donated.

    images uint8 [B, S, S, 3], text_ids int32 [B, T] and negatives (`negative_batch`, when the
    config swaps words) split over `data`; state and metrics
    come back replicated, so every step sees the same shardings (one compile).
    """
    graphdef = train_graphdef(model_config, train_config)

    def step_fn(state, images, text_ids, step, negatives=None):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(
            model, optimizer, images, text_ids, step, negatives, config=train_config
        )
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(replicated(mesh), replicated(mesh)))


@functools.lru_cache(maxsize=8)
def compiled_embed(model_config: rr.RerankerConfig, mesh: Mesh) -> Callable:
    """`fn(model_state, images, text_ids) -> (image_emb [B, E], text_emb [B, E])`, data-parallel
    over `mesh`, results replicated."""
    graphdef = nnx.split(nnx.eval_shape(lambda: rr.create_reranker(model_config)))[0]

    def fn(state, images, text_ids):
        model = nnx.merge(graphdef, state)
        return rr.embed_images(model, images), rr.embed_texts(model, text_ids)

    return jax.jit(fn, out_shardings=replicated(mesh))


def reconstructor(job: RerankerJob, image_size: int, mesh: Mesh) -> Callable | None:
    """`images -> the vqvae's reconstructions` for `job.vqvae` on `mesh` (None: no vqvae).
    UserError when that vqvae works at another image size than the reranker trains at."""
    if not job.vqvae:
        return None
    model = load_vqvae(job.vqvae)
    if model.config.image_size != image_size:
        raise UserError(
            f"--vqvae {job.vqvae!r} works on {model.config.image_size}px images but the "
            f"reranker trains at {image_size}px; pass --image-size {model.config.image_size} "
            "or the vqvae of this dataset"
        )
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated(mesh))
    run = compiled_reconstruct(graphdef)
    return lambda images: run(state, images)["recon"]


def negative_batch(
    captions: Sequence[str],
    tokenizer: TextTokenizer,
    text_length: int,
    config: RerankerTrainConfig,
    step: int,
    mesh: Mesh,
) -> tuple[jax.Array, jax.Array] | None:
    """This process's captions with one word swapped each, as global arrays over `mesh`:
    (ids int32 [B, T], valid bool [B]); None when the config swaps no words.

    Drawn from a generator seeded by (seed, step, process), so a resumed run repeats them.
    """
    if not config.swap_word_groups:
        return None
    rng = np.random.default_rng([config.seed, step, jax.process_index()])
    swapped, valid = hard_negatives.negative_captions(captions, config.swap_word_groups, rng)
    ids = tokenizer.encode(swapped, text_length)
    return global_batch(ids, mesh), global_batch(valid, mesh)


def fresh_train_state(model_config, train_config, mesh: Mesh) -> nnx.State:
    """A freshly initialised `(model, optimizer)` state, replicated on `mesh`, in the very
    structure `compiled_train_step` takes and returns."""
    graphdef = train_graphdef(model_config, train_config)
    _, abstract_state = nnx.split(nnx.eval_shape(lambda: _init(model_config, train_config)))
    tree = compiled_init(model_config, train_config, mesh)()
    return train_state.step_state(graphdef, abstract_state, tree)


def model_of(state: nnx.State, model_config, train_config) -> rr.Reranker:
    """The reranker inside a train state of `compiled_train_step`."""
    return nnx.merge(train_graphdef(model_config, train_config), state)[0]


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: rr.Reranker,
    split: pipeline.Split,
    tokenizer: TextTokenizer,
    *,
    group: int = 100,
    max_examples: int | None = 1000,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Retrieval over the first `max_examples` of `split`, in groups of `group` examples.

    Within each group every image ranks the group's captions (see the module docstring). A split
    smaller than `group` is one group of all of it; a last partial group is left out, so every
    group has the same chance level. Returns the means over groups of `retrieval_metrics`
    (top1, top5, top1_text, top5_text, text_to_image_top1), plus `group` (captions per choice)
    and `examples` (images evaluated).
    """
    mesh = data_mesh() if mesh is None else mesh
    available = (
        split.num_examples if max_examples is None else min(max_examples, split.num_examples)
    )
    group = min(group, available)
    if group < 2:
        raise UserError(f"{split.name} has {available} examples; retrieval needs at least 2")
    num_groups = available // group
    padded = round_up(group, mesh.size)
    data = pipeline.image_text_dataset(
        split.source,
        split.normalize,
        pipeline.LoaderConfig.eval(group),
        image_size=model.config.image_size,
        tokenizer=tokenizer,
        text_length=model.config.text_length,
        source_name=split.name,
        process_index=0,
        process_count=1,
    )
    state = jax.device_put(nnx.state(model), replicated(mesh))
    embed = compiled_embed(model.config, mesh)
    per_group: list[dict[str, float]] = []
    iterator = iter(data)
    try:
        for _ in range(num_groups):
            batch = next(iterator)
            images = shard_whole_batch(pad_rows(batch["images"], padded), mesh)
            text_ids = shard_whole_batch(pad_rows(batch["text_ids"], padded), mesh)
            image_emb, text_emb = jax.device_get(embed(state, images, text_ids))
            per_group.append(
                rr.retrieval_metrics(
                    np.asarray(image_emb)[:group],
                    np.asarray(text_emb)[:group],
                    list(batch["captions"]),
                )
            )
    finally:
        iterator.close()
    metrics = {name: float(np.mean([m[name] for m in per_group])) for name in per_group[0]}
    metrics.update(group=group, examples=group * num_groups)
    return metrics


# ----------------------------------------------------------------------------- the loop


def _save_tokenizer_copy(source: Path, workdir: str) -> None:
    target = Path(workdir) / TOKENIZER_FILENAME
    if jax.process_index() != 0 or (target.exists() and target.samefile(source)):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def train_and_evaluate(
    job: RerankerJob,
    workdir: str,
    *,
    stop_after: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, float]:
    """Trains (or resumes) `job` in `workdir` up to `job.train.total_steps`; returns the last
    eval metrics ({} when no eval ran in this invocation).

    `stop_after` ends this invocation after that many steps (checkpointed first); rerunning the
    same job in the same workdir continues from the latest checkpoint with the same next batch.
    `devices` (default: all) are the devices the batch is split over.
    Raises `UserError` on bad input (a workdir of another model or tokenizer, a batch that does
    not split over the devices, ...) and `checkpoint.NonFiniteLossError` when the loss or the
    weights become NaN/inf, naming the step and the last good checkpoint.
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"stop_after must be at least 1, got {stop_after}")
    mesh = data_mesh(devices)
    check_batch_divides(job.train.batch_size, mesh)
    per_host_batch = job.train.batch_size // jax.process_count()
    tokenizer, tokenizer_path = tokenizer_for(job, workdir)
    train_split, eval_split = (
        pipeline.open_split(job.dataset, name, data_dir=job.data_dir, **dict(job.builder_kwargs))
        for name in (job.train_split, job.eval_split)
    )
    job = resolve_job(job, tokenizer, dataset_image_size(train_split))
    model_config, train_config = job.model, job.train
    reconstruct = reconstructor(job, model_config.image_size, mesh)

    graphdef = train_graphdef(model_config, train_config)
    _, abstract_state = nnx.split(nnx.eval_shape(lambda: _init(model_config, train_config)))
    checkpointer, restored = ckpt.open_run(
        workdir,
        train_state.abstract_checkpoint(abstract_state, replicated(mesh)),
        init_fn=compiled_init(model_config, train_config, mesh),
        config=job.to_dict(),
        save_interval_steps=job.checkpoint_every,
        ignore_keys=RESUMABLE_KEYS,
        # A checkpoint from before a config field existed resumes if the field is at its default.
        defaults=ckpt.config_defaults({"model": job.model, "train": job.train}),
    )
    _save_tokenizer_copy(tokenizer_path, workdir)
    start_step = restored.how.start_step
    state = train_state.step_state(graphdef, abstract_state, restored.state)

    data = pipeline.image_text_dataset(
        train_split.source,
        train_split.normalize,
        pipeline.LoaderConfig.train(per_host_batch, seed=train_config.seed),
        image_size=model_config.image_size,
        tokenizer=tokenizer,
        text_length=model_config.text_length,
        source_name=train_split.name,
    )
    data_iter = iter(data)
    step_fn = compiled_train_step(model_config, train_config, mesh)
    total = train_config.total_steps
    last_eval: dict[str, float] = {}
    writer = MetricWriter(workdir)
    progress = Progress(total, initial=start_step, desc=f"reranker {job.name}")
    step = start_step
    try:
        if restored.data_state is not None:
            # The checkpoint holds process 0's position: every process resumes it in its shard.
            data_iter.set_state_from_any_process(restored.data_state)
        progress.write(
            f"reranker {job.name}: {restored.how}; {mesh.size} devices, batch "
            f"{train_config.batch_size}, {train_split.num_examples} training examples at "
            f"{model_config.image_size}px; steps {start_step} -> {total}"
        )
        stop_step = total if stop_after is None else min(total, start_step + stop_after)
        last_log_step, tick = step, time.perf_counter()
        while step < stop_step:
            batch = next(data_iter)
            images = global_batch(batch["images"], mesh)
            if reconstruct is not None:
                images = reconstruct(images)
            text_ids = global_batch(batch["text_ids"], mesh)
            negatives = negative_batch(
                batch["captions"], tokenizer, model_config.text_length, train_config, step, mesh
            )
            state, metrics = step_fn(
                state, images, text_ids, jnp.asarray(step, jnp.int32), negatives
            )
            step += 1
            progress.update()
            last_step = step == stop_step
            if step % job.log_every == 0 or last_step:
                scalars = to_host_scalars(metrics)
                checkpointer.check_finite(scalars, step)
                now = time.perf_counter()
                scalars["steps_per_s"] = (step - last_log_step) / max(now - tick, 1e-9)
                last_log_step, tick = step, now
                writer.write_scalars(step, scalars, split="train")
                progress.set_metrics({k: scalars[k] for k in ("loss", "batch_top1")})
            if step % job.eval_every == 0 or step == total:
                last_eval = evaluate(
                    model_of(state, model_config, train_config),
                    eval_split,
                    tokenizer,
                    group=job.eval_group,
                    max_examples=job.eval_max_examples,
                    mesh=mesh,
                )
                writer.write_scalars(step, last_eval, split=job.eval_split)
                progress.write(
                    f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items())
                )
            if checkpointer.should_save(step) or last_step:
                checkpointer.save(
                    step,
                    train_state.to_checkpoint(state),
                    data_state=data_iter.get_state(),
                    force=last_step,
                )
    finally:
        data_iter.close()
        progress.close()
        checkpointer.close()
        writer.close()
    return last_eval


# ----------------------------------------------------------------------------- loading


def load_reranker(path: str) -> tuple[rr.Reranker, rr.RerankerConfig]:
    """The reranker of a `train reranker` workdir (its latest checkpoint) or a step folder.

    Needs no training config: the model config is read from the checkpoint itself.
    """
    step_dir = ckpt.find_step_dir(path, flag="--reranker")
    saved = ckpt.read_json_item(step_dir)
    if not saved or "model" not in saved or "image_channels" not in saved["model"]:
        raise UserError(
            f"{str(step_dir)!r} has no reranker config; is it a `train reranker` workdir?"
        )
    config = rr.RerankerConfig.from_dict(saved["model"])
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: rr.create_reranker(config)))
    tree = ckpt.restore_weights(step_dir, nnx.to_pure_dict(abstract_state), flag="--reranker")
    nnx.replace_by_pure_dict(abstract_state, tree)
    return nnx.merge(graphdef, abstract_state), config


def load_reranker_tokenizer(workdir: str) -> TextTokenizer:
    """The copy of the tokenizer a `train reranker` workdir keeps beside its checkpoints."""
    return TextTokenizer.from_file(Path(workdir) / TOKENIZER_FILENAME)
