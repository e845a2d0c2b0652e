"""Stage-1 training job: the loop around `vqvae.train_step`, its evaluation and its checkpoints.

`train_and_evaluate(job, workdir)` is what `train vqvae` calls. The math (loss, update, metrics)
lives in the leaf package `vqvae`; this module owns the side effects: data, device placement,
checkpoints, logs, progress, image grids.

Data parallel over every device of every host: the state is replicated, the global batch is
split along a 1-D `data` mesh axis (each host feeds its own per-host slice). A checkpoint holds
`{"params": model state (weights, EMA codebook, usage counters), "opt": optimizer state}` plus
the configs and the input pipeline's position, so rerunning the same command resumes with the
same next batch and the same noise (randomness is `fold_in(seed key, step)`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dalle_jax import checkpoint as ckpt
from dalle_jax import train_state
from dalle_jax.data import pipeline
from dalle_jax.data.pipeline import read_examples
from dalle_jax.errors import UserError
from dalle_jax.images import reconstruction_grid
from dalle_jax.loop_utils import (  # noqa: F401 (pad_rows, round_up: re-exported)
    host_batch_to_global,
    pad_rows,
    round_up,
    whole_batch_to_global,
)
from dalle_jax.metrics import MetricWriter, to_host_scalars
from dalle_jax.progress import Progress
from vqvae.config import VQVAEConfig, get_config
from vqvae.metrics import codebook_perplexity, codebook_usage
from vqvae.model import VQVAE, create_model
from vqvae.train_config import TrainConfig, get_train_config
from vqvae.train_step import check_crop_size, create_optimizer, eval_step, train_step

# Configs that may change between runs of one workdir without changing what the weights mean.
RESUMABLE_KEYS = (
    "train",
    "job.log_every",
    "job.eval_every",
    "job.checkpoint_every",
    "job.eval_max_examples",
    "job.data_dir",
    "job.grid_examples",
    # Where the dataset is read from (image_folder's folder), like data_dir; absent from the
    # configs of checkpoints written before it existed.
    "job.builder_kwargs",
)


@dataclasses.dataclass(frozen=True)
class VQVAEJob:
    """A stage-1 training job as data: which model, how to train it, on what."""

    name: str
    model: VQVAEConfig
    train: TrainConfig
    dataset: str  # registry name with config, e.g. "shapes_world/64"
    train_split: str = "train"
    eval_split: str = "validation"
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 500
    eval_max_examples: int | None = 2048  # None: the whole eval split
    grid_examples: int = 16
    data_dir: str | None = None
    # The dataset builder's keyword arguments, e.g. (("folder", "/my/pictures"),) for
    # image_folder (`train vqvae --folder DIR [--image-size S]`).
    builder_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for field in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, field) < 1:
                raise UserError(f"{field} must be at least 1, got {getattr(self, field)}")
        if self.eval_max_examples is not None and self.eval_max_examples < 1:
            raise UserError(
                f"eval_max_examples must be at least 1 (or None: all), got {self.eval_max_examples}"
            )
        if self.grid_examples < 0:
            raise UserError(f"grid_examples must be >= 0, got {self.grid_examples}")

    def to_dict(self) -> dict[str, Any]:
        job = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("model", "train")}
        job["builder_kwargs"] = dict(self.builder_kwargs)
        return {"model": self.model.to_dict(), "train": self.train.to_dict(), "job": job}

    def replace(self, **changes: Any) -> VQVAEJob:
        return dataclasses.replace(self, **changes)


def _job(name: str, dataset: str, **kw: Any) -> VQVAEJob:
    return VQVAEJob(
        name=name, model=get_config(name), train=get_train_config(name), dataset=dataset, **kw
    )


JOBS: dict[str, VQVAEJob] = {
    "tiny": _job(
        "tiny",
        "shapes_world/tiny32",
        log_every=5,
        eval_every=20,
        checkpoint_every=10,
        eval_max_examples=64,
        grid_examples=8,
    ),
    "shapes64": _job("shapes64", "shapes_world/64"),
    "emoji32": _job("emoji32", "emoji/32"),
    "emoji32_2048": _job("emoji32_2048", "emoji/32"),
    "base": _job("base", "image_folder/256"),
}


def get_job(name: str) -> VQVAEJob:
    if name not in JOBS:
        raise UserError(f"unknown vqvae job config {name!r}; known: {', '.join(sorted(JOBS))}")
    return JOBS[name]


# ----------------------------------------------------------------------------- devices


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    # Auto axes: XLA's partitioner places the replicated-weights x sharded-batch ops itself.
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (weights, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the `data` axis: device i of n holds rows [i*B/n, (i+1)*B/n)."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_divides(global_batch: int, mesh: Mesh) -> None:
    """Raises `UserError` unless `global_batch` splits evenly over the mesh's devices and hosts."""
    devices, hosts = mesh.size, jax.process_count()
    if global_batch % devices or global_batch % hosts:
        raise UserError(
            f"batch size {global_batch} is not divisible by the {devices} devices "
            f"({hosts} hosts) it is split over; pick a multiple of {devices}"
        )


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This host's slice [B/hosts, ...] -> one global array [B, ...] split over `data`."""
    return host_batch_to_global(local, batch_sharding(mesh))


def shard_whole_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """A batch that every host holds whole [B, ...] -> a global array [B, ...] split over `data`.

    Each host places only the rows its own devices hold (eval, where all hosts read the same
    examples). B must be a multiple of the device count.
    """
    return whole_batch_to_global(batch, batch_sharding(mesh))


# ----------------------------------------------------------------------------- state


def _init(model_config: VQVAEConfig, train_config: TrainConfig) -> tuple[VQVAE, nnx.Optimizer]:
    model = create_model(model_config, seed=train_config.seed)
    return model, create_optimizer(model, train_config)


# ----------------------------------------------------------------------------- compiled steps
# Cached per (configs, mesh): a process that runs a job again (a time-sliced session with
# `stop_after`, tests) reuses the compiled programs instead of compiling them again.


@functools.lru_cache(maxsize=8)
def train_graphdef(model_config: VQVAEConfig, train_config: TrainConfig) -> nnx.GraphDef:
    """The graph of `(model, optimizer)`; `nnx.merge(graphdef, state)` rebuilds them.

    Cached because the optimizer's optax transformation sits in the graphdef and compares by
    identity: two graphdefs built for one config are not equal, and would not share programs.
    """
    return nnx.split(nnx.eval_shape(lambda: _init(model_config, train_config)))[0]


@functools.lru_cache(maxsize=8)
def compiled_init(model_config: VQVAEConfig, train_config: TrainConfig, mesh: Mesh) -> Callable:
    """`init() -> {"params": ..., "opt": ...}`, the fresh training state replicated on `mesh`.

    One compiled program instead of one small compile per parameter initialiser (DESIGN.md 4).
    """
    return train_state.jit_init(
        lambda: train_state.to_checkpoint(nnx.state(_init(model_config, train_config))),
        replicated(mesh),
        on_cpu=mesh.devices.flat[0].platform == "cpu",
    )


def compiled_train_step(
    model_config: VQVAEConfig, train_config: TrainConfig, mesh: Mesh, crop: bool = False
) -> Callable:
    """`step_fn(state, images, step, key) -> (state, metrics)`, jitted once, state donated.

    state: the replicated `nnx.state((model, optimizer))` (graph: `train_graphdef`); images:
    uint8 [B, S, S, 3] split over `data` (`global_batch`); step: int32 []; key: the run's PRNG
    key. The gradient's mean over the batch becomes an all-reduce over `data`; state and
    metrics come back replicated, so step 2 sees the shardings step 1 did: one compile.
    `crop`: the step of the random-window phase (`TrainConfig.crop_steps`).
    """
    # Every argument positional: lru_cache keys `f(a)` and `f(a, crop=False)` apart.
    return _compiled_train_step(model_config, train_config, mesh, crop)


@functools.lru_cache(maxsize=8)
def _compiled_train_step(
    model_config: VQVAEConfig, train_config: TrainConfig, mesh: Mesh, crop: bool
) -> Callable:
    graphdef = train_graphdef(model_config, train_config)

    def step_fn(state, images, step, key):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step(model, optimizer, images, step, key, config=train_config, crop=crop)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(replicated(mesh), replicated(mesh)))


@functools.lru_cache(maxsize=8)
def compiled_eval_step(model_config: VQVAEConfig, mesh: Mesh) -> Callable:
    """`fn(model_state, images) -> {"ids": int32 [B, h, w], "recon": float32 [B, S, S, 3],
    "psnr": float32 [B]}`, data-parallel over `mesh`, results replicated (every host gets all).

    model_state: `nnx.state(model)` of a VQVAE of `model_config`.
    """
    graphdef = nnx.split(nnx.eval_shape(lambda: create_model(model_config)))[0]

    def fn(state, images):
        out = eval_step(nnx.merge(graphdef, state), images)
        return {name: out[name] for name in ("ids", "recon", "psnr")}

    return jax.jit(fn, out_shardings=replicated(mesh))


# ----------------------------------------------------------------------------- evaluation


def _judge_requests(examples: list[dict]) -> list[list]:
    from dalle_jax.data.shapes_world.builder import scene_from_example
    from dalle_jax.data.shapes_world.spec import RequestedObject

    requests = []
    for example in examples:
        scene, _ = scene_from_example(example)
        requests.append(
            [RequestedObject(o.color, o.shape, o.size, o.position) for o in scene.objects]
        )
    return requests


def evaluate(
    model: VQVAE,
    split: pipeline.Split,
    *,
    image_size: int,
    batch_size: int,
    max_examples: int | None,
    judge: bool = False,
    grid_examples: int = 16,
    mesh: Mesh | None = None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Reconstruction metrics over (the first `max_examples` of) an eval split.

    Data-parallel over `mesh` (default: all devices); `batch_size` is rounded up to a multiple
    of its device count and the last batch is padded, so the whole split runs on one compiled
    step. Returns ({"psnr": mean per-image dB, "codebook_usage": fraction of codes used at least
    once over the split, "perplexity": exp(entropy) of that histogram, "judge_accuracy"
    (with `judge`, shapes_world only): the shapes judge on the reconstructions against the
    ground-truth labels}, a reconstruction grid uint8 of the first `grid_examples` examples).
    """
    from dalle_jax.evaluation import shapes_judge

    mesh = data_mesh() if mesh is None else mesh
    batch_size = round_up(batch_size, mesh.size)
    source = split.source
    if max_examples is not None and max_examples < len(source):
        source = _Prefix(source, max_examples)
    # Every host evaluates the same examples: eval sets are small, and this keeps the figures
    # identical whatever the host count.
    loader = pipeline.LoaderConfig.eval(batch_size)
    data = pipeline.image_text_dataset(
        source,
        split.normalize,
        loader,
        image_size=image_size,
        source_name=split.name,
        process_index=0,
        process_count=1,
    )
    state = jax.device_put(nnx.state(model), replicated(mesh))
    step = compiled_eval_step(model.config, mesh)
    histogram = np.zeros(model.config.codebook_size, np.int64)
    psnrs: list[np.ndarray] = []
    judged: list[float] = []
    grid = None
    for batch in data:
        count = len(batch["images"])
        images = shard_whole_batch(pad_rows(batch["images"], batch_size), mesh)
        out = {k: np.asarray(v)[:count] for k, v in jax.device_get(step(state, images)).items()}
        histogram += np.bincount(out["ids"].reshape(-1), minlength=model.config.codebook_size)
        psnrs.append(out["psnr"])
        recon = np.round(np.clip(out["recon"], 0.0, 1.0) * 255).astype(np.uint8)
        if grid is None and grid_examples > 0:
            grid = reconstruction_grid(batch["images"][:grid_examples], recon[:grid_examples])
        if judge:
            examples = [source[int(i)] for i in batch["index"]]
            report = shapes_judge.evaluate(recon, _judge_requests(examples))
            judged.extend([report.accuracy] * report.n_requested)
    metrics = {
        "psnr": float(np.mean(np.concatenate(psnrs))),
        "codebook_usage": float(codebook_usage(jnp.asarray(histogram))),
        "perplexity": float(codebook_perplexity(jnp.asarray(histogram))),
    }
    if judge:
        metrics["judge_accuracy"] = float(np.mean(judged))
    return metrics, grid


class _Prefix:
    """The first `n` examples of a random-access source."""

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, list | tuple):
            return [self.source[int(j)] for j in i]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.source[i]

    def __getitems__(self, keys):
        return read_examples(self.source, [int(k) for k in keys])


# ----------------------------------------------------------------------------- the loop


def _decoder_only_of(step_dir: Any) -> bool:
    saved = ckpt.read_json_item(step_dir) or {}
    return bool(saved.get("train", {}).get("train_decoder_only", False))


def check_training_phase(
    train: TrainConfig, workdir: str, *, resume: str | None, init: str | None
) -> None:
    """Raises `UserError` unless the run's state matches its phase: a decoder fine-tuning run
    needs trained weights to start from, and a workdir (or `--resume`) of one phase cannot go on
    as the other, because the two optimizers hold different state."""
    decoder_only = train.train_decoder_only
    latest = ckpt.latest_step_dir(ckpt.checkpoints_dir(workdir))
    if latest is None and resume is not None:
        latest = ckpt.find_step_dir(resume, flag="--resume")
    if latest is None:
        if decoder_only and init is None:
            raise UserError(
                "--train-decoder-only fine-tunes the decoder of a trained vqvae: pass its "
                "workdir with --init DIR"
            )
        return
    if _decoder_only_of(latest) != decoder_only:
        held = "a decoder fine-tuning run" if not decoder_only else "a full vqvae training run"
        fix = (
            "add --train-decoder-only to continue it"
            if not decoder_only
            else "fine-tune the decoder in a new --workdir with --init " + str(latest.parent.parent)
        )
        raise UserError(f"{latest} holds {held}, not this one; {fix}")


def train_and_evaluate(
    job: VQVAEJob,
    workdir: str,
    *,
    resume: str | None = None,
    init: str | None = None,
    stop_after: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, float]:
    """Trains (or resumes) `job` in `workdir` up to `job.train.total_steps`; returns the last
    eval metrics ({} when no eval ran in this invocation).

    `stop_after` ends the run after that many steps of this invocation, as if it had been
    killed (a checkpoint is written first), for tests and time-sliced sessions; rerunning the
    same job in the same workdir continues with the same next batch and the same noise.
    `devices` (default: all) are the devices the batch is split over.
    Raises `UserError` on bad input (a workdir of another model, a batch that does not split
    over the devices, ...) and `checkpoint.NonFiniteLossError` (a `UserError`) when the loss or
    the weights become NaN/inf, naming the step and the last good checkpoint, which is kept.
    """
    if stop_after is not None and stop_after < 1:
        raise UserError(f"stop_after must be at least 1, got {stop_after}")
    check_training_phase(job.train, workdir, resume=resume, init=init)
    check_crop_size(job.model, job.train)
    mesh = data_mesh(devices)
    check_batch_divides(job.train.batch_size, mesh)
    per_host_batch = job.train.batch_size // jax.process_count()
    dataset_kwargs = dict(job.builder_kwargs)
    train_split = pipeline.open_split(
        job.dataset, job.train_split, data_dir=job.data_dir, **dataset_kwargs
    )
    eval_split = pipeline.open_split(
        job.dataset, job.eval_split, data_dir=job.data_dir, **dataset_kwargs
    )
    judge = job.dataset.split("/")[0] == "shapes_world"

    graphdef = train_graphdef(job.model, job.train)
    _, abstract_state = nnx.split(nnx.eval_shape(lambda: _init(job.model, job.train)))
    checkpointer, restored = ckpt.open_run(
        workdir,
        train_state.abstract_checkpoint(abstract_state, replicated(mesh)),
        init_fn=compiled_init(job.model, job.train, mesh),
        resume=resume,
        init=init,
        config=job.to_dict(),
        save_interval_steps=job.checkpoint_every,
        ignore_keys=RESUMABLE_KEYS,
        # A checkpoint from before a config field existed resumes if the field is at its default.
        defaults=ckpt.config_defaults({"model": job.model, "train": job.train}),
    )
    start_step = restored.how.start_step
    state = train_state.step_state(graphdef, abstract_state, restored.state)

    loader = pipeline.LoaderConfig.train(per_host_batch, seed=job.train.seed)
    data = pipeline.image_text_dataset(
        train_split.source,
        train_split.normalize,
        loader,
        image_size=job.model.image_size,
        source_name=train_split.name,
    )
    data_iter = iter(data)
    # The random-window phase's step first, then the whole images' (each compiled on first use).
    step_fns = {
        crop: compiled_train_step(job.model, job.train, mesh, crop) for crop in (True, False)
    }
    key = jax.random.key(job.train.seed)
    total = job.train.total_steps
    last_eval: dict[str, float] = {}
    writer = MetricWriter(workdir)
    progress = Progress(total, initial=start_step, desc=f"vqvae {job.name}")
    step = start_step
    try:
        if restored.data_state is not None:
            # The checkpoint holds process 0's position: every process resumes it in its shard.
            data_iter.set_state_from_any_process(restored.data_state)
        progress.write(
            f"vqvae {job.name}: {restored.how}; {mesh.size} devices, batch "
            f"{job.train.batch_size}, {train_split.num_examples} training examples; "
            f"steps {start_step} -> {total}"
        )
        stop_step = total if stop_after is None else min(total, start_step + stop_after)
        last_log_step, tick = step, time.perf_counter()
        while step < stop_step:
            batch = next(data_iter)
            images = global_batch(batch["images"], mesh)
            step_fn = step_fns[step < job.train.crop_steps]
            state, metrics = step_fn(state, images, jnp.asarray(step, jnp.int32), key)
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
                    {k: scalars[k] for k in ("loss", "psnr", "codebook_usage") if k in scalars}
                )
            if step % job.eval_every == 0 or step == total:
                model, _ = nnx.merge(graphdef, state)
                last_eval, grid = evaluate(
                    model,
                    eval_split,
                    image_size=job.model.image_size,
                    batch_size=min(64, per_host_batch * 4),
                    max_examples=job.eval_max_examples,
                    judge=judge,
                    grid_examples=job.grid_examples,
                    mesh=mesh,
                )
                writer.write_scalars(step, last_eval, split=job.eval_split)
                if grid is not None:
                    writer.write_images(step, {"reconstructions": grid})
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


def load_vqvae(path: str) -> VQVAE:
    """The model of a stage-1 workdir (its latest checkpoint) or a checkpoint step directory.

    Needs no training config: the model config is read from the checkpoint itself.
    """
    step_dir = ckpt.find_step_dir(path, flag="--vqvae")
    saved = ckpt.read_json_item(step_dir)
    if not saved or "model" not in saved:
        raise UserError(f"{str(step_dir)!r} has no vqvae model config; is it a `train vqvae` run?")
    config = VQVAEConfig.from_dict(saved["model"])
    abstract = nnx.eval_shape(lambda: create_model(config))
    graphdef, abstract_state = nnx.split(abstract)
    tree = ckpt.restore_weights(step_dir, nnx.to_pure_dict(abstract_state), flag="--vqvae")
    nnx.replace_by_pure_dict(abstract_state, tree)
    return nnx.merge(graphdef, abstract_state)
