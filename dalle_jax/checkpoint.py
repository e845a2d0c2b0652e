"""Training checkpoints: orbax save/restore, the resume order, a config check and a NaN guard.

One checkpoint is one step folder `WORKDIR/checkpoints/<step>/` with these orbax items:
  state   the training-state pytree of arrays (model weights, optimizer state, step, rng key)
  config  JSON: the configs that shaped the model (so loading never needs the training config)
  data    JSON: the input pipeline's iterator state (optional)
  extra   JSON: anything else the loop wants kept beside the weights (optional)

The training state is a mapping whose `weights_key` entry ("params" by default) holds the model
weights, e.g. `{"params": nnx.state(model), "opt": nnx.state(optimizer), "rng": key}`; `--init`
takes only that entry.

Resume order (DESIGN.md convention 6), see `restore_or_init`: the latest complete checkpoint in
the workdir, else `--resume PATH` (full state of another run), else `--init PATH` (weights only),
else scratch. Restoring goes against an abstract target (`jax.ShapeDtypeStruct` leaves carrying
shardings), so a checkpoint written on one mesh shape loads onto another.

Orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete (local
disks; on GCS it marks completion with `commit_success.txt`), and its step listing skips
unfinished ones: a save killed half-way leaves a tmp folder that is ignored here and removed
(orbax's `cleanup_tmp_directories`) before the next run's first save.

Multi-host: every process calls `save`, `restore_or_init` and `wait_until_finished` with the same
arguments; orbax coordinates the processes, and each one writes only its own shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dalle_jax.errors import UserError

CHECKPOINTS_DIRNAME = "checkpoints"
STATE_ITEM, CONFIG_ITEM, DATA_ITEM, EXTRA_ITEM = "state", "config", "data", "extra"

PathLike = str | epath.PathLike

# Failures of reading a checkpoint's files: missing (OSError), truncated or garbled (tensorstore
# raises ValueError, json raises JSONDecodeError, a ValueError), or of another layout (orbax
# raises ValueError/KeyError on a tree that does not match the target).
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError)


class NonFiniteLossError(UserError):
    """A metric or the weights became NaN/inf; training stopped before saving bad weights."""


# --------------------------------------------------------------------------------------------
# Configs as JSON and the check that a checkpoint belongs to the configured model.


def config_to_json(config: Any) -> dict[str, Any]:
    """Returns `config` (a dataclass or a mapping, possibly nested) as plain JSON data.

    The result went through a JSON round trip, so tuples became lists, exactly as the saved
    copy will read back; comparing it with a restored config is then like with like.
    """

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    data = plain(config)
    if not isinstance(data, dict):
        raise TypeError(f"a config must be a dataclass or a mapping, got {type(config).__name__}")
    return json.loads(json.dumps(data))


def config_defaults(config: Any) -> dict[str, Any]:
    """Dotted key -> declared default (as JSON data) of every field that has one, in the
    dataclasses of a config (a dataclass, or a mapping holding some, possibly nested). A
    checkpoint written before a field existed behaved as its default, so `check_config` lets
    it pass as that."""
    defaults: dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")
            return
        if not dataclasses.is_dataclass(value) or isinstance(value, type):
            return
        for f in dataclasses.fields(value):
            key = f"{prefix}{f.name}"
            if f.default is not dataclasses.MISSING:
                defaults[key] = json.loads(json.dumps(config_to_json({"v": f.default})["v"]))
            elif f.default_factory is not dataclasses.MISSING:
                defaults[key] = config_to_json({"v": f.default_factory()})["v"]
            walk(getattr(value, f.name), f"{key}.")

    walk(config, "")
    return defaults


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_ignored(dotted_key: str, ignore_keys: Iterable[str]) -> bool:
    parts = dotted_key.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return any(k in prefixes or k == parts[-1] for k in ignore_keys)


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()  # marks a config key that one side of a comparison lacks


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, ignore_keys: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """Returns `(dotted_key, saved_value, current_value)` for every differing leaf.

    Nested mappings compare leaf by leaf under dotted keys (`model.d_model`). A key missing on
    one side shows as `ABSENT` there. A key is skipped when `ignore_keys` names it, one of its
    dotted prefixes (`"train"` skips all of `train.*`) or its last part (`"total_steps"`).
    """
    ignore_keys = tuple(ignore_keys)
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(flat_saved.keys() | flat_current.keys()):
        if _is_ignored(key, ignore_keys):
            continue
        before, after = flat_saved.get(key, ABSENT), flat_current.get(key, ABSENT)
        if before != after:
            differences.append((key, before, after))
    return differences


def _show(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value)


def check_config(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    ignore_keys: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    holder: str,
    what_to_do: str,
) -> None:
    """Raises `UserError` when `saved` and `current` differ outside `ignore_keys`.

    A key the checkpoint lacks passes when the current value is its entry in `defaults`
    (`config_defaults`): a field added to the config since the checkpoint was written.
    The message reads "{holder} holds a checkpoint of a different model: d_model 256
    (checkpoint) vs 512 (config); {what_to_do}".
    """
    defaults = defaults or {}
    differences = [
        (key, before, after)
        for key, before, after in config_differences(saved, current, ignore_keys=ignore_keys)
        if not (before is ABSENT and key in defaults and defaults[key] == after)
    ]
    if differences:
        listed = ", ".join(
            f"{key} {_show(before)} (checkpoint) vs {_show(after)} (config)"
            for key, before, after in differences
        )
        raise UserError(f"{holder} holds a checkpoint of a different model: {listed}; {what_to_do}")


# --------------------------------------------------------------------------------------------
# Finding checkpoints on disk.

_NAME_FORMAT = ocp.step.standard_name_format()


def absolute(path: PathLike) -> epath.Path:
    """`path` made absolute when it is local: orbax refuses relative checkpoint paths, and users
    type `--workdir runs/x`. Remote paths (`gs://...`) are returned as they are."""
    text = str(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def checkpoints_dir(workdir: PathLike) -> epath.Path:
    """The folder holding a run's step folders: `WORKDIR/checkpoints` (absolute)."""
    return absolute(workdir) / CHECKPOINTS_DIRNAME


def complete_steps(directory: PathLike) -> list[int]:
    """Steps of the complete checkpoints in `directory` (a checkpoints folder), ascending.

    Orbax's listing skips unfinished saves (`<step>.orbax-checkpoint-tmp` folders).
    """
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(m.step for m in _NAME_FORMAT.find_all(directory))


def latest_step_dir(directory: PathLike) -> epath.Path | None:
    """The step folder of the latest complete checkpoint in a checkpoints folder, or None."""
    steps = complete_steps(directory)
    return epath.Path(directory) / _NAME_FORMAT.build_name(steps[-1]) if steps else None


def _is_step_dir(path: epath.Path) -> bool:
    return (path / STATE_ITEM).is_dir()


def _step_of(step_dir: epath.Path) -> int | None:
    try:
        return ocp.step.step_from_checkpoint_name(step_dir.name)
    except ValueError:
        return None


def find_step_dir(path: PathLike, *, flag: str) -> epath.Path:
    """Resolves a user-given checkpoint path to one step folder.

    `path` may be a run's workdir, its `checkpoints` folder (the latest complete step is taken)
    or one step folder. `flag` ("--resume", "--init") names the option in error messages.
    Raises `UserError` when nothing complete is found there.
    """
    path = absolute(path)
    hint = "pass a workdir, its checkpoints/ folder or one step folder inside it"
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file or directory; {hint}")
    if not path.is_dir():
        raise UserError(f"{flag} {path}: not a directory; {hint}")
    if ocp.step.TMP_DIR_SUFFIX in path.name:
        raise UserError(
            f"{flag} {path}: this is an unfinished save (the run was killed while writing it); "
            f"pass a complete step folder beside it"
        )
    if _is_step_dir(path):
        return path
    for directory in (path / CHECKPOINTS_DIRNAME, path):
        step_dir = latest_step_dir(directory)
        if step_dir is not None:
            return step_dir
    raise UserError(f"{flag} {path}: no complete checkpoint found there; {hint}")


# --------------------------------------------------------------------------------------------
# Reading.


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or "no details"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}"


def _ignore_callbacks_into_closed_event_loops() -> None:
    """Keeps a failed restore's leftovers from printing tracebacks around its one-line error.

    When a restore fails half-way, tensorstore reads still in flight complete later and try
    to wake orbax's asyncio loop, which may be closed by then; Python reports each as an
    "unraisable" `RuntimeError('Event loop is closed')` traceback on stderr. Only that exact
    error is dropped; every other unraisable exception reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_event_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_event_loop_callbacks = True
    sys.unraisablehook = hook


def _read(step_dir: epath.Path, items: Mapping[str, Any]) -> dict[str, Any]:
    """Restores the named items of one step folder (orbax `Composite` args by item name)."""
    _ignore_callbacks_into_closed_event_loops()
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(step_dir, args=ocp.args.Composite(**items))
    return {name: restored[name] for name in items}


def read_json_item(step_dir: PathLike, item: str = CONFIG_ITEM) -> dict[str, Any] | None:
    """Reads one JSON item ("config", "data", "extra") of a step folder; None if absent.

    Raises `UserError` naming the path when the item is there but unreadable.
    """
    step_dir = epath.Path(step_dir)
    if not (step_dir / item).exists():
        return None
    try:
        return _read(step_dir, {item: ocp.args.JsonRestore()})[item]
    except _READ_ERRORS as e:
        raise UserError(
            f"checkpoint {step_dir}: its {item} cannot be read ({_one_line(e)}); "
            f"the checkpoint is damaged: use another one"
        ) from e


def abstract_of(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves (keeping each leaf's sharding) for a tree of arrays.

    To restore onto a mesh, build the target from the mesh instead: `jax.eval_shape` of the
    jitted sharded init (its `out_shardings` stay on the structs) or `nnx.eval_shape` plus the
    mesh's `NamedSharding`s.
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


@dataclasses.dataclass(frozen=True)
class ResumeSource:
    """Where a run's starting state came from; `str()` is the log line."""

    kind: Literal["workdir", "resume", "init", "scratch"]
    step_dir: epath.Path | None = None
    step: int | None = None

    @property
    def start_step(self) -> int:
        """The step a run continues from: the checkpoint's when it resumed (its workdir or
        --resume), else 0 (--init takes weights only; their step number is the other run's)."""
        return (self.step or 0) if self.kind in ("workdir", "resume") else 0

    def __str__(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        if self.kind == "workdir":
            return f"resumed from the latest checkpoint {self.step_dir}{at}"
        if self.kind == "resume":
            return f"resumed from --resume {self.step_dir}{at}"
        if self.kind == "init":
            return f"weights from --init {self.step_dir}{at}; fresh optimizer, step 0"
        return "started from scratch"


class Restored(NamedTuple):
    """What `restore_or_init` returns; unpacks as `state, data_state, how = ...`."""

    state: Any
    data_state: dict[str, Any] | None
    how: ResumeSource


def _check_config_of(
    step_dir: epath.Path,
    current: Mapping[str, Any],
    *,
    ignore_keys: Iterable[str],
    defaults: Mapping[str, Any] | None = None,
    holder: str,
    what_to_do: str,
) -> None:
    saved = read_json_item(step_dir, CONFIG_ITEM)
    if saved is None:
        raise UserError(
            f"checkpoint {step_dir} has no saved config (missing {step_dir / CONFIG_ITEM}); "
            f"it is damaged or was not written by this program: {what_to_do}"
        )
    check_config(
        saved,
        current,
        ignore_keys=ignore_keys,
        defaults=defaults,
        holder=holder,
        what_to_do=what_to_do,
    )


def _restore_full(
    step_dir: epath.Path, abstract_state: Any, *, on_error: str
) -> tuple[Any, dict[str, Any] | None]:
    items: dict[str, Any] = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    if (step_dir / DATA_ITEM).exists():
        items[DATA_ITEM] = ocp.args.JsonRestore()
    try:
        restored = _read(step_dir, items)
    except _READ_ERRORS as e:
        raise UserError(
            f"checkpoint {step_dir} cannot be read ({_one_line(e)}): its files are damaged or "
            f"it holds another training state; {on_error}"
        ) from e
    return restored[STATE_ITEM], restored.get(DATA_ITEM)


def _restore_weights(step_dir: epath.Path, abstract_weights: Any, weights_key: str, flag: str):
    target = {weights_key: abstract_weights}
    # A partial restore reads only the weights subtree, whatever optimizer the other run used.
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    try:
        return _read(step_dir, {STATE_ITEM: args})[STATE_ITEM][weights_key]
    except _READ_ERRORS as e:
        raise UserError(
            f"{flag} {step_dir}: its weights cannot be read ({_one_line(e)}); the checkpoint is "
            "damaged or of another model: pass another checkpoint"
        ) from e


def restore_weights(
    path: PathLike, abstract_weights: Any, *, weights_key: str = "params", flag: str = "--model"
) -> Any:
    """Only the weights (`state[weights_key]`) of a checkpoint: a workdir, its checkpoints folder
    or a step folder. For inference and export, where no optimizer state is wanted."""
    step_dir = find_step_dir(path, flag=flag)
    return _restore_weights(step_dir, abstract_weights, weights_key, flag)


def restore_or_init(
    workdir: PathLike,
    abstract_state: Any,
    *,
    config: Any,
    init_fn: Callable[[], Any],
    resume: PathLike | None = None,
    init: PathLike | None = None,
    ignore_keys: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    weights_key: str = "params",
) -> Restored:
    """Loads the starting training state in the resume order; returns `(state, data_state, how)`.

    1. the latest complete checkpoint in `WORKDIR/checkpoints` (a restarted run continues);
    2. else `resume`: a workdir, checkpoints folder or step folder of another run: full state
       (weights, optimizer, step, rng) and its data-pipeline state;
    3. else `init`: the same kinds of path, but only `state[weights_key]` is taken; the rest
       (optimizer, step 0, rng) comes from `init_fn()`; the data pipeline starts afresh;
    4. else `init_fn()`.

    `abstract_state`: the state's tree with `jax.ShapeDtypeStruct` leaves that carry the target
    shardings; restored arrays land on those shardings, whatever mesh wrote them. `init_fn()`
    returns a fresh state of the same structure (a mutable mapping when `init` is used).
    `config` (dataclass or mapping) is compared with the checkpoint's saved config first; keys
    in `ignore_keys` (see `config_differences`) may differ, for example `("train",)` when only
    the model must match. `data_state` is None unless a checkpoint supplied it.
    Raises `UserError` on a config mismatch or an unreadable checkpoint, naming the path.
    """
    current = config_to_json(config)
    # Keys a checkpoint may lack (fields added since), with the value it then stands for.
    defaults = {**config_defaults(config), **(defaults or {})}
    ignore_keys = tuple(ignore_keys)
    own_dir = checkpoints_dir(workdir)
    steps = complete_steps(own_dir)
    if steps:
        step_dir = own_dir / _NAME_FORMAT.build_name(steps[-1])
        _check_config_of(
            step_dir,
            current,
            ignore_keys=ignore_keys,
            defaults=defaults,
            holder=f"workdir {workdir}",
            what_to_do="use another --workdir or the matching config",
        )
        previous = (
            f"resume from the previous checkpoint (step {steps[-2]})"
            if len(steps) > 1
            else "start over"
        )
        on_error = (
            f"if its files are damaged, delete {step_dir} to {previous}; if the training code "
            "changed, use another --workdir"
        )
        state, data_state = _restore_full(step_dir, abstract_state, on_error=on_error)
        return Restored(state, data_state, ResumeSource("workdir", step_dir, steps[-1]))

    if resume is not None:
        step_dir = find_step_dir(resume, flag="--resume")
        _check_config_of(
            step_dir,
            current,
            ignore_keys=ignore_keys,
            defaults=defaults,
            holder=f"--resume {step_dir}",
            what_to_do="pass a checkpoint of this model or the matching config",
        )
        state, data_state = _restore_full(
            step_dir, abstract_state, on_error="pass another checkpoint to --resume"
        )
        return Restored(state, data_state, ResumeSource("resume", step_dir, _step_of(step_dir)))

    if init is not None:
        step_dir = find_step_dir(init, flag="--init")
        _check_config_of(
            step_dir,
            current,
            ignore_keys=ignore_keys,
            defaults=defaults,
            holder=f"--init {step_dir}",
            what_to_do="pass a checkpoint of this model or the matching config",
        )
        state = init_fn()
        if not isinstance(state, MutableMapping) or weights_key not in state:
            raise TypeError(f"init_fn() must return a mutable mapping with a {weights_key!r} entry")
        # Leaves of the target without a sharding take the fresh weights' own.
        target = jax.tree.map(
            lambda abstract, fresh: (
                abstract
                if getattr(abstract, "sharding", None) is not None
                else jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=fresh.sharding)
            ),
            abstract_state[weights_key],
            state[weights_key],
        )
        state[weights_key] = _restore_weights(step_dir, target, weights_key, "--init")
        return Restored(state, None, ResumeSource("init", step_dir, _step_of(step_dir)))

    return Restored(init_fn(), None, ResumeSource("scratch"))


# --------------------------------------------------------------------------------------------
# The NaN guard.


def _non_finite(value: Any) -> str | None:
    """`"nan"` or `"inf"` when a numeric value holds one, else None (strings etc. pass)."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.inexact):
        return None
    if np.isnan(array).any():
        return "nan"
    if np.isinf(array).any():
        return "inf"
    return None


def _stopped_message(
    what: str, step: int, last_good_step: int | None, checkpoint_dir: PathLike | None
) -> str:
    fix = "lower the learning rate (or add warmup or gradient clipping)"
    if last_good_step is None:
        return f"{what} at step {step}; stopped. No checkpoint was saved before it; {fix} and rerun"
    where = f" in {checkpoint_dir}" if checkpoint_dir is not None else ""
    return (
        f"{what} at step {step}; stopped. The last good checkpoint (step {last_good_step}) is "
        f"kept{where}; {fix} and rerun the same command to resume from it"
    )


def check_finite(
    metrics: Mapping[str, Any],
    step: int,
    *,
    last_good_step: int | None = None,
    checkpoint_dir: PathLike | None = None,
) -> None:
    """Raises `NonFiniteLossError` when any metric is NaN or inf.

    `metrics`: name -> scalar or array (jax arrays are pulled to the host here, so call it only
    on log steps). The message names the metric ("loss" first), the step, the last good
    checkpoint and what to do.
    """
    values = jax.device_get(dict(metrics))
    bad = {name: kind for name, value in values.items() if (kind := _non_finite(value))}
    if not bad:
        return
    name = "loss" if "loss" in bad else next(iter(bad))
    others = [n for n in bad if n != name]
    also = f" (also non-finite: {', '.join(others)})" if others else ""
    raise NonFiniteLossError(
        _stopped_message(f"{name} became {bad[name]}{also}", step, last_good_step, checkpoint_dir)
    )


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def tree_is_finite(tree: Any) -> bool:
    """Whether every floating leaf of `tree` is finite (one jitted reduction, one host sync)."""
    leaves = [
        leaf
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return not leaves or bool(_all_finite(leaves))


# --------------------------------------------------------------------------------------------
# Saving.


class Checkpointer:
    """Saves a run's checkpoints into `WORKDIR/checkpoints` and keeps bad weights out of them.

    ```
    with Checkpointer(workdir, config=configs, save_interval_steps=1000) as ckpt:
        state, data_state, how = ckpt.restore_or_init(abstract, init_fn=..., resume=..., init=...)
        for step in ...:
            state, metrics = train_step(state, batch)
            if log_step: ckpt.check_finite(metrics, step)   # raises NonFiniteLossError
            ckpt.save(step, state, data_state=iterator_state)  # orbax decides by the interval
        ckpt.save(last_step, state, data_state=..., force=True)
    # leaving the block waits for the last (async) save to be written
    ```
    `save` refuses after `check_finite` failed, and checks the weights themselves for NaN/inf
    before writing, so no checkpoint ever holds non-finite weights even when a save step is not
    a log step. Async saves copy the arrays before `save` returns, so the train step may donate
    the state right after.
    """

    def __init__(
        self,
        workdir: PathLike,
        *,
        config: Any,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1000,
        async_save: bool = True,
        ignore_keys: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
    ):
        self.workdir = absolute(workdir)
        self.config = config_to_json(config)
        self.ignore_keys = tuple(ignore_keys)
        # Read before `config` becomes JSON, which keeps no dataclass defaults.
        self.defaults = {**config_defaults(config), **(defaults or {})}
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Interval saves plus orbax's preemption save; no forced save of the first step.
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_interval_steps),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(max_to_keep),  # None keeps all
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(checkpoints_dir(workdir), options=options)
        self._non_finite_step: int | None = None

    @property
    def directory(self) -> epath.Path:
        """`WORKDIR/checkpoints`."""
        return self._manager.directory

    def latest_step(self) -> int | None:
        """The latest saved step (a save still being written counts), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def restore_or_init(
        self,
        abstract_state: Any,
        *,
        init_fn: Callable[[], Any],
        resume: PathLike | None = None,
        init: PathLike | None = None,
        weights_key: str = "params",
    ) -> Restored:
        """`restore_or_init` for this workdir, config and `ignore_keys`."""
        return restore_or_init(
            self.workdir,
            abstract_state,
            config=self.config,
            init_fn=init_fn,
            resume=resume,
            init=init,
            ignore_keys=self.ignore_keys,
            defaults=self.defaults,
            weights_key=weights_key,
        )

    def check_finite(self, metrics: Mapping[str, Any], step: int) -> None:
        """`check_finite` naming this run's last good checkpoint; on failure, saving stops."""
        try:
            check_finite(
                metrics, step, last_good_step=self.latest_step(), checkpoint_dir=self.directory
            )
        except NonFiniteLossError:
            self._non_finite_step = step
            raise

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (+ config, data state, extra) at `step` if due, or always with `force`.

        Returns whether a save started. Raises `NonFiniteLossError` instead of saving after
        `check_finite` failed or when `state` holds NaN/inf.
        """
        if self._non_finite_step is not None:
            raise NonFiniteLossError(
                f"not saving step {step}: metrics became non-finite at step "
                f"{self._non_finite_step}; the checkpoints in {self.directory} are kept as they are"
            )
        if step in self._manager.all_steps():
            return False  # e.g. the final forced save on a step the interval already saved
        if not force and not self._manager.should_save(step):
            return False
        if not tree_is_finite(state):
            self._non_finite_step = step
            raise NonFiniteLossError(
                _stopped_message(
                    "the weights became nan or inf (not saved)",
                    step,
                    self.latest_step(),
                    self.directory,
                )
            )
        items: dict[str, Any] = {
            STATE_ITEM: ocp.args.StandardSave(state),
            CONFIG_ITEM: ocp.args.JsonSave(self.config),
        }
        if data_state is not None:
            items[DATA_ITEM] = ocp.args.JsonSave(dict(data_state))
        if extra is not None:
            items[EXTRA_ITEM] = ocp.args.JsonSave(dict(extra))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def wait_until_finished(self) -> None:
        """Blocks until the last async save is written (call before the process exits)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_run(
    workdir: PathLike,
    abstract_state: Any,
    *,
    init_fn: Callable[[], Any],
    resume: PathLike | None = None,
    init: PathLike | None = None,
    **checkpointer_options: Any,
) -> tuple[Checkpointer, Restored]:
    """A `Checkpointer` for `workdir` and the run's starting state (`restore_or_init`).

    checkpointer_options: `Checkpointer`'s keyword arguments (config, save_interval_steps,
    ignore_keys, defaults, ...). When restoring refuses (a config mismatch, a corrupt step), the
    checkpointer is closed before the error propagates, so no orbax thread outlives it.
    """
    checkpointer = Checkpointer(workdir, **checkpointer_options)
    try:
        restored = checkpointer.restore_or_init(
            abstract_state, init_fn=init_fn, resume=resume, init=init
        )
    except BaseException:
        checkpointer.close()
        raise
    return checkpointer, restored
