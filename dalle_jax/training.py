"""Stage-2 training job: the loop around `dalle_jax.train_step`, its evaluation, sample grids,
checkpoints and the bundle written at the end.

`train_and_evaluate(job, workdir, ...)` is what `train dalle` calls; `export_workdir(...)` is
what `train export` calls. The math (loss, update) lives in `dalle_jax.model` and
`dalle_jax.train_step`; this module owns the side effects: data, device placement, checkpoints,
logs, progress, image grids.

The data is the pre-encoded dataset (`train encode`): `DATA/train` and `DATA/validation`, read
with `pipeline.encoded_dataset` (each host its own shard); the vqvae never runs in the train
step, only to decode sample grids. The model config must agree with the data (text length,
image grid, vocabularies) and with the vqvae and tokenizer given: a mismatch stops before
anything is compiled. The text vocabulary is taken from the data by default, because
sentencepiece stops below the asked size on a small caption set.

Sharding: the state is created directly in its sharded layout (jit with `out_shardings` from
the parameters' logical axes, `dalle_jax.sharding`), on a mesh `data x fsdp x tensor` (default:
every device on `data`); each host feeds its per-host slice of the global batch. A checkpoint
holds `{"params": transformer weights, "opt": optimizer state (with the step)}`, the configs and
the input pipeline's position, so rerunning the same command resumes with the same next batch
and the same randomness (`fold_in(key(seed), step)`): the next loss is bit-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dalle_jax import checkpoint as ckpt
from dalle_jax import train_state
from dalle_jax.bundle import check_compatible, export_bundle
from dalle_jax.data import pipeline
from dalle_jax.errors import UserError
from dalle_jax.images import make_grid, reconstruction_grid
from dalle_jax.loop_utils import pad_rows, round_up, whole_batch_to_global
from dalle_jax.metrics import MetricWriter, to_host_scalars
from dalle_jax.model.config import DalleConfig, get_config
from dalle_jax.model.loss import cross_entropy
from dalle_jax.model.transformer import DalleTransformer
from dalle_jax.progress import Progress
from dalle_jax.sampling import RERANK_KEYS, SamplingSettings, jit_sampler
from dalle_jax.sharding import (
    DEFAULT_RULES,
    LogicalRules,
    MeshConfig,
    data_parallel_size,
    host_local_batch_to_global,
    logical_to_mesh,
    make_mesh,
    override_rules,
    param_shardings,
    process_batch_rows,
    use_rules,
)
from dalle_jax.tokenizer import TextTokenizer
from dalle_jax.train_step import OptimConfig, init_train_state, make_train_step
from vqvae.compiled import compiled_decode

TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"
BUNDLE_DIRNAME = "bundle"
SAMPLES_IMAGE = "samples"

# Job settings that may change between runs of one workdir without changing what the weights
# mean. The data pipeline's own fingerprint catches a changed batch size or seed.
RESUMABLE_KEYS = (
    "optim",
    "job.name",
    "job.batch_size",
    "job.seed",
    "job.mesh",
    "job.rules",
    "job.log_every",
    "job.eval_every",
    "job.checkpoint_every",
    "job.eval_max_examples",
    "job.eval_batch_size",
    "job.sample_captions",
    "job.grid_examples",
    "job.sampling",
    "job.text_vocab_from_data",
    "job.data_dir",
)

DATA_PARALLEL = MeshConfig(data=-1, fsdp=1, tensor=1)


@dataclasses.dataclass(frozen=True)
class DalleJob:
    """A stage-2 training job as data: which model, how to train it, how to look at it."""

    name: str
    model: DalleConfig
    optim: OptimConfig
    batch_size: int = 32  # global: over all devices of all hosts
    seed: int = 0  # weights, data order, caption dropout, sample grids
    mesh: MeshConfig = DATA_PARALLEL
    # Overrides of `sharding.DEFAULT_RULES`: ((logical name, mesh axes), ...).
    rules: tuple[tuple[str, Any], ...] = ()
    # Take `model.text_vocab_size` from the encoded data (the tokenizer's real size).
    text_vocab_from_data: bool = True
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 500
    eval_max_examples: int | None = 2048  # None: the whole eval split
    eval_batch_size: int | None = None  # None: batch_size
    # Captions of the sample grid (needs --tokenizer); without them, or without a tokenizer,
    # the first `grid_examples` captions of the eval split are used, their images above.
    sample_captions: tuple[str, ...] = ()
    grid_examples: int = 8
    sampling: SamplingSettings = SamplingSettings()  # for the grids, and the bundle's default
    data_dir: str | None = None  # the `train encode` output: DATA/train, DATA/validation

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_captions", tuple(self.sample_captions))
        object.__setattr__(self, "rules", tuple((str(k), v) for k, v in self.rules))
        for field in ("batch_size", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, field) < 1:
                raise UserError(f"{field} must be at least 1, got {getattr(self, field)}")
        for field in ("eval_max_examples", "eval_batch_size"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise UserError(f"{field} must be at least 1 (or None), got {value}")
        if self.grid_examples < 0:
            raise UserError(f"grid_examples must be >= 0, got {self.grid_examples}")

    def to_dict(self) -> dict[str, Any]:
        job = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("model", "optim")
        }
        job["mesh"] = dataclasses.asdict(self.mesh)
        job["rules"] = [[name, axes] for name, axes in self.rules]
        job["sample_captions"] = list(self.sample_captions)
        job["sampling"] = self.sampling.to_dict()
        return {"model": self.model.to_dict(), "optim": self.optim.to_dict(), "job": job}

    def replace(self, **changes: Any) -> DalleJob:
        return dataclasses.replace(self, **changes)


SHAPES_CAPTIONS = (
    "a red circle",
    "a large blue square at the top left",
    "a small green triangle in the center",
    "a yellow diamond at the bottom right on a black background",
    "a purple circle and an orange square",
    "there is a large cyan triangle at the top",
    "a small pink square at the bottom left on a white background",
    "a gray diamond at the left",
)

JOBS: dict[str, DalleJob] = {
    # Tests: shapes_world/tiny32 through the tiny vqvae (8x8 ids of 32 codes), 16 caption ids.
    "tiny": DalleJob(
        name="tiny",
        model=get_config("tiny", image_rows=8, image_cols=8, text_length=16),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, total_steps=40),
        batch_size=16,
        log_every=5,
        eval_every=20,
        checkpoint_every=10,
        eval_max_examples=64,
        sample_captions=SHAPES_CAPTIONS[:4],
        grid_examples=4,
    ),
    # The CPU demo: shapes_world/64 encoded with the shapes64 vqvae (8x8 ids of 512 codes) and
    # `train encode`'s default 32 caption ids. ~4,000-5,000 tokens/s on 2 idle cores, so 4,000
    # steps (128k examples, 1.3 epochs) take 40-50 minutes. GELU, as the shipped `shapes`
    # bundle was trained (its recipe reproduces it); new models default to ReLU.
    "shapes": DalleJob(
        name="shapes",
        model=get_config("small", activation="gelu"),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=200, total_steps=4000),
        batch_size=32,
        log_every=50,
        eval_every=500,
        checkpoint_every=250,
        eval_max_examples=1024,
        sample_captions=SHAPES_CAPTIONS,
        grid_examples=8,
    ),
    # The 90-minute recipe's transformer (`train recipe shapes-90min`): shapes_world/64 encoded
    # with 24 caption ids (`train encode --text-length 24`; the longest caption has 23). The
    # `mini` model (ReLU) at batch 16 runs ~9 steps/s on 2 idle EPYC cores, so 22,000 steps
    # (352k examples, 3.5 epochs) take ~42 minutes; at equal wall time batch 16 judged better
    # than 32 (91.7% vs 90.4% test) and 8 (89.7%): runs/README.md, "shapes/batch16".
    "shapes-90min": DalleJob(
        name="shapes-90min",
        model=get_config("mini"),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=100, total_steps=22000),
        batch_size=16,
        log_every=50,
        eval_every=3000,
        checkpoint_every=250,
        eval_max_examples=1024,
        sample_captions=SHAPES_CAPTIONS,
        grid_examples=8,
    ),
    # emoji/32 encoded with the emoji32 vqvae (8x8 ids of 512 codes): 11k training images, so
    # 2,500 steps are ~7 epochs (~42 minutes on 2 idle Xeon cores). GELU, as the shipped
    # `emoji` bundle was trained.
    "emoji": DalleJob(
        name="emoji",
        model=get_config("small", activation="gelu"),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=200, total_steps=2500),
        batch_size=32,
        log_every=50,
        eval_every=500,
        checkpoint_every=250,
        eval_max_examples=512,
        grid_examples=8,
    ),
}

# A TPU pod job (docs/multihost.md): the ~1.1B-parameter `1b` transformer (bfloat16 compute,
# remat, DALL-E's sparse attention) on 32x32 ids of the `base` vqvae (8192 codes) and 128
# caption ids (`train encode --text-length 128`), every chip on the fsdp axis. Sized with
# `python -m bench.memory --config 1b --mesh 1,N,1 --batch 512`: about 7.4 GiB per chip on a
# v4-64 (32 chips of 32 GiB) and 3.7 GiB on a v5litepod-64 (64 chips of 16 GiB), activations
# included, XLA's temporaries not. 50k steps of 512 is 26M examples: set --steps for your data.
JOBS["pod-1b"] = DalleJob(
    name="pod-1b",
    model=get_config("1b"),
    optim=OptimConfig(learning_rate=3e-4, warmup_steps=2000, total_steps=50_000),
    batch_size=512,
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    log_every=100,
    eval_every=5000,
    checkpoint_every=1000,
    eval_max_examples=4096,
    eval_batch_size=256,
    grid_examples=8,
)


def get_job(name: str) -> DalleJob:
    if name not in JOBS:
        raise UserError(f"unknown dalle job config {name!r}; known: {', '.join(sorted(JOBS))}")
    return JOBS[name]


# ----------------------------------------------------------------------------- checks


def fit_model_to_data(job: DalleJob, metadata: pipeline.EncodedMetadata) -> DalleConfig:
    """The job's model config with the data's text vocabulary (if `text_vocab_from_data`),
    checked against the data. Raises `UserError` naming both values of every mismatch."""
    model = job.model
    if job.text_vocab_from_data and model.text_vocab_size != metadata.text_vocab_size:
        model = model.replace(text_vocab_size=metadata.text_vocab_size)
    metadata.check(
        text_length=model.text_length,
        image_grid=(model.image_rows, model.image_cols),
        text_vocab_size=model.text_vocab_size,
        image_vocab_size=model.image_vocab_size,
    )
    return model


def check_vqvae(vqvae_config: Any, metadata: pipeline.EncodedMetadata, where: str) -> None:
    """Raises `UserError` unless the data was encoded with a vqvae of `vqvae_config`."""
    encoded_with = metadata.extra.get("vqvae_config")
    if not isinstance(encoded_with, Mapping):
        return  # data written by hand (tests, other tools): only the shapes can be checked
    ours = vqvae_config.to_dict()
    for key in sorted(set(ours) | set(encoded_with)):
        if ours.get(key) != encoded_with.get(key):
            raise UserError(
                f"{where}: its vqvae has {key} {ours.get(key)!r} but the data was encoded with "
                f"{key} {encoded_with.get(key)!r}; pass the vqvae the data was encoded with, or "
                "re-encode the data (`train encode`)"
            )


def check_tokenizer(tokenizer: TextTokenizer, metadata: pipeline.EncodedMetadata, where: str):
    """Raises `UserError` unless the data's captions were encoded with `tokenizer`."""
    if tokenizer.vocab_size != metadata.text_vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the data was encoded "
            f"with {metadata.text_vocab_size}; pass the tokenizer the data was encoded with"
        )
    recorded = metadata.extra.get("tokenizer_sha256")
    sha256 = hashlib.sha256(tokenizer.to_bytes()).hexdigest()
    if recorded and recorded != sha256:
        raise UserError(
            f"{where}: tokenizer sha256 {sha256[:12]}... but the data was encoded with "
            f"{recorded[:12]}...; pass the tokenizer the data was encoded with"
        )


def check_batch(batch_size: int, mesh: Mesh, rules: LogicalRules) -> None:
    ways, hosts = data_parallel_size(mesh, rules), jax.process_count()
    if batch_size % ways or batch_size % hosts:
        raise UserError(
            f"batch size {batch_size} is not divisible by the {ways}-way data parallelism "
            f"({hosts} hosts) it is split over; pick a multiple of {math.lcm(ways, hosts)}"
        )


@dataclasses.dataclass(frozen=True)
class HostShard:
    """What this process feeds of every global batch: `rows` consecutive rows of it, read from
    shard `index` of `count` equal shards of the training data.

    The rows are those this process's devices hold under the batch sharding
    (`sharding.process_batch_rows`). Processes whose devices hold the same rows (a mesh that
    does not split the batch across them, e.g. a tensor axis spanning hosts) get the same
    shard, so they read identical examples; with the batch split over every process, shard
    `index` is this process's block of rows and `count` the number of processes.
    """

    rows: int
    index: int
    count: int


def host_shard(batch_size: int, mesh: Mesh, rules: LogicalRules) -> HostShard:
    rows = process_batch_rows(batch_size, mesh, rules)
    per_host = rows.stop - rows.start
    return HostShard(rows=per_host, index=rows.start // per_host, count=batch_size // per_host)


# ----------------------------------------------------------------------------- state


def resolve_rules(overrides: tuple[tuple[str, Any], ...]) -> LogicalRules:
    return override_rules(dict(overrides)) if overrides else DEFAULT_RULES


def _new_model(config: DalleConfig, seed: int) -> DalleTransformer:
    return DalleTransformer(config, rngs=nnx.Rngs(params=seed))


def _new_train_state(config: DalleConfig, optim: OptimConfig, seed: int) -> nnx.State:
    return init_train_state(_new_model(config, seed), optim)[1]


def abstract_train_state(config: DalleConfig, optim: OptimConfig) -> nnx.State:
    """The train state's structure (`jax.ShapeDtypeStruct` values), fresh on every call."""
    return nnx.eval_shape(lambda: _new_train_state(config, optim, 0))


@contextlib.contextmanager
def on_mesh(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Traces in here see the mesh and the rules (the model's activation constraints)."""
    with jax.set_mesh(mesh), use_rules(rules):
        yield


# ----------------------------------------------------------------------------- compiled programs
# Cached per (configs, mesh, rules): a process that runs a job again (`stop_after`, tests)
# reuses the compiled programs instead of compiling them again.


@functools.lru_cache(maxsize=8)
def train_graphdef(config: DalleConfig, optim: OptimConfig) -> nnx.GraphDef:
    """The graph of `(model, optimizer)`. Cached: the optimizer's optax transformation sits in
    it and compares by identity, so two graphdefs of one config would not share programs."""
    model = nnx.eval_shape(lambda: _new_model(config, 0))
    return init_train_state(model, optim)[0]


@functools.lru_cache(maxsize=8)
def checkpoint_shardings(
    config: DalleConfig, optim: OptimConfig, mesh: Mesh, rules: LogicalRules
) -> dict[str, Any]:
    """`NamedSharding`s of the checkpoint tree `{"params", "opt"}` from the logical axes."""
    return train_state.to_checkpoint(
        param_shardings(abstract_train_state(config, optim), mesh, rules)
    )


def abstract_checkpoint(
    config: DalleConfig, optim: OptimConfig, mesh: Mesh, rules: LogicalRules
) -> dict[str, Any]:
    """The checkpoint tree as `jax.ShapeDtypeStruct`s carrying the mesh's shardings: what a
    checkpoint of any mesh shape is restored onto."""
    return train_state.abstract_checkpoint(
        abstract_train_state(config, optim), checkpoint_shardings(config, optim, mesh, rules)
    )


@functools.lru_cache(maxsize=8)
def compiled_init(
    config: DalleConfig, optim: OptimConfig, seed: int, mesh: Mesh, rules: LogicalRules
) -> Callable[[], dict[str, Any]]:
    """`init() -> {"params", "opt"}`: the fresh state, each shard made on its own device."""
    jitted = train_state.jit_init(
        lambda: train_state.to_checkpoint(_new_train_state(config, optim, seed)),
        checkpoint_shardings(config, optim, mesh, rules),
        on_cpu=mesh.devices.flat[0].platform == "cpu",
    )

    def init() -> dict[str, Any]:
        with on_mesh(mesh, rules):
            return jitted()

    return init


@functools.lru_cache(maxsize=8)
def compiled_train_step(
    config: DalleConfig, optim: OptimConfig, seed: int, mesh: Mesh, rules: LogicalRules
) -> Callable:
    """`step(state, batch) -> (state, metrics)`, jitted once with the state donated.

    state: `nnx.state((model, optimizer))` laid out by `param_shardings`; batch:
    {"text_ids": int32 [B, T], "image_ids": int32 [B, N]} laid out by `batch_sharding`.
    """
    graphdef = train_graphdef(config, optim)
    return make_train_step(
        graphdef, optim, seed, state=abstract_train_state(config, optim), mesh=mesh, rules=rules
    )


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Rows split over the data axes the rules give `batch` (data and fsdp by default)."""
    spec = logical_to_mesh(("batch", None), rules, mesh_axis_names=mesh.axis_names)
    return NamedSharding(mesh, spec)


@functools.lru_cache(maxsize=8)
def model_graphdef(config: DalleConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: _new_model(config, 0)))[0]


@functools.lru_cache(maxsize=8)
def compiled_eval_step(config: DalleConfig, mesh: Mesh, rules: LogicalRules) -> Callable:
    """`fn(model_state, text_ids, image_ids) -> (text_nll float32 [B], image_nll float32 [B])`:
    each example's summed negative log-likelihood in nats over its T text and N image
    positions (no caption dropout), replicated on every device."""
    graphdef = model_graphdef(config)

    def fn(state, text_ids, image_ids):
        text_logits, image_logits = nnx.merge(graphdef, state)(text_ids, image_ids)
        return (
            jnp.sum(cross_entropy(text_logits, text_ids), axis=1),
            jnp.sum(cross_entropy(image_logits, image_ids), axis=1),
        )

    jitted = jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def run(state, text_ids, image_ids):
        with on_mesh(mesh, rules):
            return jitted(state, text_ids, image_ids)

    return run


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model_state: nnx.State,
    eval_dir: str | Path,
    *,
    config: DalleConfig,
    batch_size: int,
    max_examples: int | None,
    mesh: Mesh,
    rules: LogicalRules,
) -> dict[str, float]:
    """Validation losses over (the first `max_examples` of) an encoded split.

    model_state: `nnx.state(model)` on `mesh`. Every host reads the same examples; the batch
    (rounded up to a multiple of the data-parallel size) is split over the data axes and the
    last batch is padded, so one program runs the whole split. Returns nats per token:
    {"loss" (weighted as in training), "text_loss", "image_loss", "image_bits_per_dim"
    (image_loss / ln 2)}.
    """
    batch_size = round_up(batch_size, data_parallel_size(mesh, rules))
    batches = iter(
        pipeline.encoded_dataset(
            eval_dir, pipeline.LoaderConfig.eval(batch_size), process_index=0, process_count=1
        )
    )
    step = compiled_eval_step(config, mesh, rules)
    sharding = batch_sharding(mesh, rules)
    text_nll, image_nll = [], []
    seen = 0
    try:
        for batch in batches:
            count = len(batch["text_ids"])
            if max_examples is not None:
                count = min(count, max_examples - seen)
            text, image = step(
                model_state,
                whole_batch_to_global(pad_rows(batch["text_ids"], batch_size), sharding),
                whole_batch_to_global(pad_rows(batch["image_ids"], batch_size), sharding),
            )
            text_nll.append(np.asarray(text, np.float64)[:count])
            image_nll.append(np.asarray(image, np.float64)[:count])
            seen += count
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        batches.close()
    text_loss = float(np.sum(np.concatenate(text_nll)) / (seen * config.text_length))
    image_loss = float(np.sum(np.concatenate(image_nll)) / (seen * config.image_length))
    return {
        "loss": config.text_loss_weight * text_loss + config.image_loss_weight * image_loss,
        "text_loss": text_loss,
        "image_loss": image_loss,
        "image_bits_per_dim": image_loss / math.log(2.0),
    }


@dataclasses.dataclass(frozen=True)
class GridPrompts:
    """What the sample grid shows: text ids int32 [K, T], and the true image ids int32 [K, N]
    when the captions come from the eval split (drawn above the samples)."""

    text_ids: np.ndarray
    true_image_ids: np.ndarray | None
    captions: tuple[str, ...]


def grid_prompts(
    job: DalleJob, eval_dir: str | Path, tokenizer: TextTokenizer | None
) -> GridPrompts | None:
    """The job's sample captions (with a tokenizer), else its first eval captions."""
    config = job.model
    if job.sample_captions and tokenizer is not None:
        captions = job.sample_captions
        text_ids = np.asarray(tokenizer.encode(list(captions), config.text_length), np.int32)
        return GridPrompts(text_ids, None, tuple(captions))
    if job.grid_examples == 0:
        return None
    data = pipeline.encoded_dataset(
        eval_dir, pipeline.LoaderConfig.eval(job.grid_examples), process_index=0, process_count=1
    )
    iterator = iter(data)
    try:
        batch = next(iterator)
    finally:
        iterator.close()
    text_ids = np.asarray(batch["text_ids"], np.int32)
    captions = tuple(tokenizer.decode(text_ids)) if tokenizer is not None else ()
    return GridPrompts(text_ids, np.asarray(batch["image_ids"], np.int32), captions)


def sample_grid(
    model_state: nnx.State,
    vqvae: Any,
    prompts: GridPrompts,
    key: jax.Array,
    *,
    config: DalleConfig,
    settings: SamplingSettings,
    mesh: Mesh,
    rules: LogicalRules,
) -> np.ndarray:
    """One sampled image per prompt, decoded with the vqvae: uint8 grid [H', W', 3] (true images
    of eval captions in the row above their samples)."""
    model = nnx.merge(model_graphdef(config), model_state)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Host values go onto the mesh as numpy: a jax.Array made on this process's own device
    # cannot be placed on devices of other processes (multi-host). Every host holds the same.
    key_data = jax.device_put(np.asarray(jax.random.key_data(key)), replicated)
    keys = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key))
    with on_mesh(mesh, rules):
        sampler = jit_sampler(model, settings)
        ids = sampler(jax.device_put(np.asarray(prompts.text_ids), replicated), keys)
    ids = _to_host(ids).reshape(-1, config.image_rows, config.image_cols)
    vqvae_graphdef, vqvae_state = nnx.split(vqvae)
    decode = compiled_decode(vqvae_graphdef)
    samples = np.asarray(decode(vqvae_state, ids))
    count = len(samples)
    if prompts.true_image_ids is None:
        return make_grid(samples, cols=count)
    truth = prompts.true_image_ids.reshape(-1, config.image_rows, config.image_cols)
    return reconstruction_grid(np.asarray(decode(vqvae_state, truth)), samples, cols=count)


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ----------------------------------------------------------------------------- the loop


def _split_dir(job: DalleJob, split: str) -> Path:
    if not job.data_dir:
        raise UserError("no encoded data given; pass --data DIR (the output of `train encode`)")
    return Path(job.data_dir) / split


def train_and_evaluate(
    job: DalleJob,
    workdir: str,
    *,
    vqvae: str | None = None,
    tokenizer: str | None = None,
    resume: str | None = None,
    init: str | None = None,
    stop_after: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, float]:
    """Trains (or resumes) `job` in `workdir` up to `job.optim.total_steps`; returns the last
    eval metrics ({} when no eval ran in this invocation).

    vqvae: a `train vqvae` workdir or step folder, to decode sample grids (and for the bundle);
    tokenizer: the `.model` file, to encode `job.sample_captions` (and for the bundle). With
    both, a run that reaches its last step writes a bundle to `WORKDIR/bundle`.
    resume / init: see `checkpoint.restore_or_init` (used only while the workdir holds no
    checkpoint). `stop_after` ends this invocation after that many steps, as if killed (a
    checkpoint is written first). `devices` (default: all) are the mesh's devices.
    Raises `UserError` on bad input (config and data disagree, a workdir of another model, a
    batch that does not split over the mesh, ...) and `checkpoint.NonFiniteLossError` when the
    loss or the weights become NaN/inf, naming the step and the last good checkpoint (kept).
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"stop_after must be at least 1, got {stop_after}")
    train_dir, eval_dir = _split_dir(job, TRAIN_SPLIT), _split_dir(job, EVAL_SPLIT)
    metadata = pipeline.read_encoded_metadata(train_dir)
    asked_vocab = job.model.text_vocab_size
    job = job.replace(model=fit_model_to_data(job, metadata))
    fit_model_to_data(job, pipeline.read_encoded_metadata(eval_dir))
    config = job.model
    notes = []
    if config.text_vocab_size != asked_vocab:
        notes.append(
            f"text vocabulary {config.text_vocab_size} from the data (config: {asked_vocab})"
        )

    vqvae_model = tokenizer_model = None
    if vqvae is not None:
        from dalle_jax.vqvae_training import load_vqvae

        vqvae_model = load_vqvae(vqvae)
        check_compatible(config, vqvae_model.config, where=f"--vqvae {vqvae}")
        check_vqvae(vqvae_model.config, metadata, f"--vqvae {vqvae}")
    if tokenizer is not None:
        tokenizer_model = TextTokenizer.from_file(tokenizer)
        check_tokenizer(tokenizer_model, metadata, f"--tokenizer {tokenizer}")

    rules = resolve_rules(job.rules)
    mesh = make_mesh(job.mesh, devices)
    check_batch(job.batch_size, mesh, rules)
    shard = host_shard(job.batch_size, mesh, rules)
    eval_batch = job.eval_batch_size or job.batch_size
    optim, seed = job.optim, job.seed
    graphdef = train_graphdef(config, optim)
    abstract_tree = abstract_checkpoint(config, optim, mesh, rules)
    init_fn = compiled_init(config, optim, seed, mesh, rules)

    # Everything that can refuse the input runs before the first file is written.
    loader = pipeline.LoaderConfig.train(shard.rows, seed=seed)
    train_data = pipeline.encoded_dataset(
        train_dir, loader, process_index=shard.index, process_count=shard.count
    )
    prompts = grid_prompts(job, eval_dir, tokenizer_model) if vqvae_model is not None else None
    step_fn = compiled_train_step(config, optim, seed, mesh, rules)
    total = optim.total_steps

    checkpointer, restored = ckpt.open_run(
        workdir,
        abstract_tree,
        init_fn=init_fn,
        resume=resume,
        init=init,
        config=job.to_dict(),
        save_interval_steps=job.checkpoint_every,
        ignore_keys=RESUMABLE_KEYS,
        # A checkpoint from before a config field existed resumes if the field is at its default.
        defaults=ckpt.config_defaults({"model": job.model, "optim": job.optim}),
    )
    start_step = restored.how.start_step
    state = train_state.step_state(graphdef, abstract_train_state(config, optim), restored.state)
    data_iter = iter(train_data)
    last_eval: dict[str, float] = {}
    last_eval_step: int | None = None
    writer = MetricWriter(workdir)
    progress = Progress(total, initial=start_step, desc=f"dalle {job.name}")
    step = start_step
    try:
        if restored.data_state is not None:
            data_iter.set_state_from_any_process(restored.data_state)
        shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
        progress.write(
            f"dalle {job.name}: {restored.how}; mesh {shape}, batch {job.batch_size}, "
            f"{metadata.count} training examples; steps {start_step} -> {total}"
            + (f"; {', '.join(notes)}" if notes else "")
        )
        if vqvae_model is None:
            progress.write("no --vqvae given: evaluations write no sample grids")
        elif prompts is not None:
            source = "eval split, true images above" if prompts.true_image_ids is not None else ""
            columns = "; ".join(prompts.captions) if prompts.captions else "(no --tokenizer)"
            progress.write(
                f"sample grids ({SAMPLES_IMAGE}_*.png{', ' + source if source else ''}), "
                f"one column per caption: {columns}"
            )
        stop_step = total if stop_after is None else min(total, start_step + stop_after)
        last_log_step, tick = step, time.perf_counter()
        while step < stop_step:
            batch = next(data_iter)
            placed = host_local_batch_to_global(
                {"text_ids": batch["text_ids"], "image_ids": batch["image_ids"]},
                mesh,
                job.batch_size,
                rules,
            )
            state, metrics = step_fn(state, placed)
            step += 1
            progress.update()
            last_step = step == stop_step
            if step % job.log_every == 0 or last_step:
                scalars = to_host_scalars(metrics)
                checkpointer.check_finite(scalars, step)
                now = time.perf_counter()
                # Wall time since the previous log line: evals and saves in between count too.
                scalars["steps_per_s"] = (step - last_log_step) / max(now - tick, 1e-9)
                last_log_step, tick = step, now
                writer.write_scalars(step, scalars, split="train")
                progress.set_metrics(
                    {k: scalars[k] for k in ("loss", "text_loss", "image_loss") if k in scalars}
                )
            if step % job.eval_every == 0 or step == total:
                last_eval = evaluate(
                    state[0],
                    eval_dir,
                    config=config,
                    batch_size=eval_batch,
                    max_examples=job.eval_max_examples,
                    mesh=mesh,
                    rules=rules,
                )
                last_eval_step = step
                writer.write_scalars(step, last_eval, split=EVAL_SPLIT)
                progress.write(
                    f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items())
                )
                if prompts is not None:
                    key = jax.random.fold_in(jax.random.key(seed), step)
                    grid = sample_grid(
                        state[0],
                        vqvae_model,
                        prompts,
                        key,
                        config=config,
                        settings=job.sampling,
                        mesh=mesh,
                        rules=rules,
                    )
                    writer.write_images(step, {SAMPLES_IMAGE: grid})
            if checkpointer.should_save(step) or last_step:
                extra = {"last_eval": last_eval, "last_eval_step": last_eval_step}
                checkpointer.save(
                    step,
                    train_state.to_checkpoint(state),
                    data_state=data_iter.get_state(),
                    extra=extra if last_eval_step is not None else None,
                    force=last_step,
                )
    finally:
        data_iter.close()
        progress.close()
        checkpointer.close()
        writer.close()
    if step == total:
        if vqvae_model is not None and tokenizer_model is not None:
            out = export_workdir(
                workdir,
                vqvae=vqvae,
                tokenizer=tokenizer,
                out=str(Path(workdir) / BUNDLE_DIRNAME),
                overwrite=True,
                vqvae_model=vqvae_model,
            )
            if jax.process_index() == 0:
                print(f"bundle written to {out}", flush=True)
        elif jax.process_index() == 0:
            print(
                "no bundle written: pass --vqvae and --tokenizer, or run `train export`",
                flush=True,
            )
    return last_eval


# ----------------------------------------------------------------------------- export


def read_run_config(step_dir: Any, flag: str) -> dict[str, Any]:
    """The saved job config of a `train dalle` checkpoint; UserError for anything else."""
    saved = ckpt.read_json_item(step_dir)
    if not saved or "optim" not in saved or "model" not in saved:
        raise UserError(
            f"{flag} {step_dir}: not a checkpoint of `train dalle` (no transformer config); "
            "pass the workdir of a `train dalle` run"
        )
    return saved


def load_transformer(path: str, *, flag: str = "--workdir") -> tuple[DalleTransformer, Any]:
    """The transformer of a `train dalle` workdir (its latest checkpoint) or step folder, and
    that step folder. Needs no training config: the model config is read from the checkpoint."""
    step_dir = ckpt.find_step_dir(path, flag=flag)
    saved = read_run_config(step_dir, flag)
    config = DalleConfig.from_dict(saved["model"])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _new_model(config, 0)))
    tree = ckpt.restore_weights(step_dir, nnx.to_pure_dict(abstract), flag=flag)
    nnx.replace_by_pure_dict(abstract, tree)
    return nnx.merge(graphdef, abstract), step_dir


def export_workdir(
    workdir: str,
    *,
    vqvae: str,
    tokenizer: str,
    out: str,
    weights_dtype: str = "float32",
    overwrite: bool = False,
    vqvae_model: Any | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> Path:
    """`train export`: the latest checkpoint of a `train dalle` workdir (or a step folder), the
    vqvae and the tokenizer as one bundle in `out` (see `dalle_jax.bundle`). The sampling
    defaults are the run's, updated with `sampling` (e.g. settings chosen on validation; it
    may also set `rerank_per_image`, the default reranking, which applies once the bundle has a
    reranker); provenance records the paths, step, date and last eval metrics.
    Every process calls it in a multi-host run; process 0 writes."""
    from dalle_jax.vqvae_training import load_vqvae

    transformer, step_dir = load_transformer(workdir)
    saved = read_run_config(step_dir, "--workdir")
    job = saved.get("job", {})
    if vqvae_model is None:
        vqvae_model = load_vqvae(vqvae)
    tokenizer_model = TextTokenizer.from_file(tokenizer)
    check_compatible(
        transformer.config,
        vqvae_model.config,
        tokenizer_model.vocab_size,
        where=f"export of {step_dir}",
    )
    extra = ckpt.read_json_item(step_dir, ckpt.EXTRA_ITEM) or {}
    provenance = {
        "job": job.get("name"),
        "data": job.get("data_dir"),
        "workdir": str(Path(workdir).resolve()),
        "checkpoint": str(Path(step_dir).resolve()),
        "step": int(Path(step_dir).name) if Path(step_dir).name.isdigit() else None,
        "vqvae": str(Path(vqvae).resolve()),
        "tokenizer": str(Path(tokenizer).resolve()),
        "tokenizer_sha256": hashlib.sha256(tokenizer_model.to_bytes()).hexdigest(),
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "eval": extra.get("last_eval"),
        "eval_step": extra.get("last_eval_step"),
    }
    out_path = Path(out)
    sampling = dict(sampling or {})
    # Not token-drawing settings (SamplingSettings): how candidates are reranked.
    rerank = {key: sampling.pop(key, None) for key in RERANK_KEYS}
    rerank = {key: value for key, value in rerank.items() if value is not None}
    settings = SamplingSettings.from_dict({**(job.get("sampling") or {}), **sampling}).to_dict()
    settings.update(rerank)
    if jax.process_index() == 0:
        export_bundle(
            out_path,
            transformer_config=transformer.config,
            transformer_state=nnx.state(transformer, nnx.Param),
            vqvae_config=vqvae_model.config,
            vqvae_state=nnx.state(vqvae_model),
            tokenizer_bytes=tokenizer_model.to_bytes(),
            sampling=settings,
            provenance=provenance,
            weights_dtype=weights_dtype,
            overwrite=overwrite,
        )
    return out_path
