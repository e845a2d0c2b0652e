"""Meshes, logical-axis rules and sharded initialisation.

Model code names the axes of every parameter and of activations at block boundaries with logical
names (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`); this module owns the one table
that maps them onto the physical mesh axes `data`, `fsdp` and `tensor`. Nothing else in the
project names a mesh axis.

Meshes use `AxisType.Auto` axes: with Explicit axes (the `jax.make_mesh` default) every matmul
whose contracting dimension is sharded needs an explicit `out_sharding`, which model code must
not have to know about.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dalle_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

# The rules table. A logical name may appear more than once: the first entry whose mesh axes are
# all still free in the spec being built wins, else the dimension is replicated. That is how
# activations `("batch", "length", "embed")` shard batch over (data, fsdp) and leave embed whole,
# while parameters `("embed", "mlp")` shard embed over fsdp (FSDP / ZeRO-3) and mlp over tensor.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
)


def override_rules(overrides: Mapping[str, MeshAxes], rules: LogicalRules = DEFAULT_RULES):
    """`rules` with every entry for a name in `overrides` replaced by the one given there.

    `overrides` comes from a config, e.g. `{"embed": None}` to turn FSDP off. Mesh axes must be
    among `MESH_AXES`.
    """
    for name, axes in overrides.items():
        for axis in _as_tuple(axes):
            if axis not in MESH_AXES:
                raise UserError(
                    f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {axis!r}; "
                    f"mesh axes are {MESH_AXES}"
                )
    kept = tuple((name, axes) for name, axes in rules if name not in overrides)
    return tuple((name, _normalise(axes)) for name, axes in overrides.items()) + kept


_current_rules: contextvars.ContextVar[LogicalRules] = contextvars.ContextVar(
    "dalle_jax_logical_rules", default=DEFAULT_RULES
)


@contextlib.contextmanager
def use_rules(rules: LogicalRules) -> Iterator[None]:
    """Within the block, `with_logical_constraint` uses `rules` (set it around tracing)."""
    token = _current_rules.set(rules)
    try:
        yield
    finally:
        _current_rules.reset(token)


def current_rules() -> LogicalRules:
    return _current_rules.get()


# ---- meshes --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes `data`, `fsdp`, `tensor`; one of them may be -1 (fill the rest)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """The three axis sizes for `num_devices` devices, -1 filled in."""
        sizes = (self.data, self.fsdp, self.tensor)
        described = " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes, strict=True))
        if sum(s == -1 for s in sizes) > 1:
            raise UserError(f"mesh {described}: at most one axis may be -1 (fill)")
        if any(s == 0 or s < -1 for s in sizes):
            raise UserError(f"mesh {described}: axis sizes must be positive, or -1 to fill")
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise UserError(
                    f"mesh {described}: the fixed axes use {fixed} devices, which does not divide "
                    f"the {num_devices} devices available; choose sizes whose product divides "
                    f"{num_devices}"
                )
            sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
        elif fixed != num_devices:
            raise UserError(
                f"mesh {described} needs {fixed} devices, but {num_devices} are available; "
                f"make the product of the axis sizes {num_devices} (or set one axis to -1)"
            )
        return sizes  # type: ignore[return-value]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axes `("data", "fsdp", "tensor")` over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh | jax.sharding.AbstractMesh, rules: LogicalRules | None = None):
    """How many ways the `batch` axis is split on `mesh`."""
    spec = logical_to_mesh(("batch",), rules, mesh_axis_names=mesh.axis_names)
    return _axes_size(mesh, spec[0])


# ---- logical -> physical -------------------------------------------------------------------------
def logical_to_mesh(
    logical_axes: Sequence[str | None],
    rules: LogicalRules | None = None,
    *,
    mesh_axis_names: Sequence[str] | None = None,
) -> PartitionSpec:
    """The `PartitionSpec` of one array whose dimensions are named `logical_axes`.

    Each name takes the first rule whose mesh axes are unused so far in this spec (and present in
    the mesh, if `mesh_axis_names` is given); otherwise that dimension is replicated.
    A name with no rule at all is an error: it is almost always a typo.
    """
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        candidates = [axes for rule_name, axes in rules if rule_name == name]
        if not candidates:
            raise UserError(
                f"logical axis {name!r} has no sharding rule; add it to the rules table "
                f"(known: {sorted({n for n, _ in rules})})"
            )
        chosen: MeshAxes = None
        for axes in candidates:
            axes_t = _as_tuple(axes)
            if mesh_axis_names is not None:
                axes_t = tuple(a for a in axes_t if a in mesh_axis_names)
            if axes_t and not used.intersection(axes_t):
                chosen = axes_t[0] if len(axes_t) == 1 else axes_t
                used.update(axes_t)
                break
        spec.append(chosen)
    return PartitionSpec(*spec)


def _logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def param_shardings(tree: Any, mesh: Mesh, rules: LogicalRules | None = None) -> Any:
    """`NamedSharding`s for every Variable of `tree` (an nnx State or graph node, abstract or not).

    The result has the structure of `nnx.state(tree)` with each Variable's value replaced by its
    `NamedSharding`, ready for `jax.jit(..., out_shardings=...)`. Variables without a logical
    annotation (optimizer step counters) are replicated; a `nnx.Param` without one is an error,
    because it would come back from the first step with another sharding and force a recompile.
    Raises `UserError` when a mesh axis does not divide the dimension it shards.
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def to_sharding(path: tuple, variable: Any) -> Any:
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        where = _path_str(path)
        names = _logical_axes_of(variable)
        shape = tuple(np.shape(variable.get_value()))
        if names is None:
            if isinstance(variable, nnx.Param) and shape:
                raise ValueError(f"parameter {where} {shape} has no logical axis annotation")
            return variable.replace(NamedSharding(mesh, PartitionSpec()))
        if len(names) != len(shape):
            raise ValueError(f"{where}: logical axes {names} do not match its shape {shape}")
        spec = logical_to_mesh(names, rules, mesh_axis_names=mesh.axis_names)
        for dim, (size, axes) in enumerate(zip(shape, spec, strict=True)):
            ways = _axes_size(mesh, axes)
            if size % ways:
                raise UserError(
                    f"{where} {shape}: dimension {dim} ({names[dim]}, size {size}) is not "
                    f"divisible by mesh axis {axes} of size {ways}; change the model size or the "
                    f"mesh shape"
                )
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(
        to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def sharded_init(
    make_model: Callable[[], nnx.Module], mesh: Mesh, rules: LogicalRules | None = None
) -> nnx.Module:
    """Builds `make_model()` directly in its sharded layout (it never exists whole on one device).

    `nnx.eval_shape` gives shapes and annotations, `param_shardings` turns them into
    `NamedSharding`s and a jitted init places each shard where it belongs.
    """
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)

    def init() -> nnx.State:
        return nnx.state(make_model())

    with jax.set_mesh(mesh), use_rules(current_rules() if rules is None else rules):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_batch(
    batch: Mapping[str, Any], mesh: Mesh, rules: LogicalRules | None = None
) -> dict[str, jax.Array]:
    """Places every array of `batch` (leading dimension = batch) split over the data axes."""
    ways = data_parallel_size(mesh, rules)
    out = {}
    for key, value in batch.items():
        size = np.shape(value)[0]
        if size % ways:
            raise UserError(
                f"batch size {size} ({key!r}) is not divisible by the data-parallel size {ways} "
                f"({_describe(mesh)}); use a batch size that is a multiple of {ways}"
            )
        names = ("batch",) + (None,) * (np.ndim(value) - 1)
        spec = logical_to_mesh(names, rules, mesh_axis_names=mesh.axis_names)
        out[key] = jax.device_put(value, NamedSharding(mesh, spec))
    return out


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains activation `x` to the sharding its `logical_axes` map to; a no-op outside a mesh.

    A mesh axis that does not divide a dimension is dropped (an activation may be replicated; a
    single-example decode must not fail on a data-parallel mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh(logical_axes, mesh_axis_names=mesh.axis_names)
    spec = PartitionSpec(
        *(
            axes if size % _axes_size(mesh, axes) == 0 else None
            for size, axes in zip(x.shape, spec, strict=True)
        )
    )
    if all(a == AxisType.Explicit for a in mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def replicated_fraction(tree: Any) -> float:
    """Fraction of the parameter bytes of `tree` (placed arrays) that every device holds whole."""
    total = replicated = 0
    for leaf in jax.tree.leaves(
        nnx.state(tree, nnx.Param) if not isinstance(tree, nnx.State) else tree
    ):
        nbytes = leaf.size * leaf.dtype.itemsize
        total += nbytes
        if leaf.sharding.is_fully_replicated:
            replicated += nbytes
    return replicated / total if total else 0.0


# ---- multi-host ----------------------------------------------------------------------------------
def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_seconds: int | None = None,
    initialization_timeout: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX job (call once, before any other jax call).

    On TPU pods and other clusters JAX detects everything itself: call it with no arguments.
    Elsewhere pass all three, e.g. `("10.0.0.1:1234", 2, 0)`. On CPU, cross-process collectives
    go through gloo (the default `jax_cpu_collectives_implementation` of this jax); it is set
    here explicitly so an environment that turned it off still gets working collectives.
    `heartbeat_timeout_seconds`: how soon the others notice a dead process and exit with an
    error instead of waiting (jax's default is 100 s).
    """
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if heartbeat_timeout_seconds is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
    if initialization_timeout is not None:
        kwargs["initialization_timeout"] = initialization_timeout
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )


def detected_cluster() -> str | None:
    """The name of the cluster environment `jax.distributed.initialize()` can configure itself
    from with no arguments (a Cloud TPU VM pod slice, Slurm, Open MPI, ...), or None here.

    Reads jax's own detectors, so it agrees with what `initialize()` would do; they are not
    public API, so a jax without them counts as "no cluster" (pass the three flags then).
    Call it after `import jax` (which notes a Cloud TPU VM) and before any device is used.
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return None
    for env in getattr(ClusterEnv, "_cluster_types", ()):
        if getattr(env, "opt_in_only_method", False):
            continue  # mpi4py: only when asked for by name
        try:
            if env.is_env_present():
                return env.__name__
        except Exception:  # a detector that cannot tell (missing package, no metadata server)
            continue
    return None


def batch_sharding_of(mesh: Mesh, ndim: int, rules: LogicalRules | None = None) -> NamedSharding:
    """The `NamedSharding` of an array of rank `ndim` whose leading dimension is the batch."""
    names = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_mesh(names, rules, mesh_axis_names=mesh.axis_names))


def process_batch_rows(
    global_batch_size: int, mesh: Mesh, rules: LogicalRules | None = None
) -> slice:
    """The rows `[start, stop)` of the global batch this process must load.

    The rows of a process are those its devices hold under the batch sharding. Raises
    `UserError` when they are not one contiguous block (a mesh whose data axes interleave the
    processes' devices), since a data loader could not read them as one slice.
    """
    sharding = batch_sharding_of(mesh, 1, rules)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
        rows.update(range(*index[0].indices(global_batch_size)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise UserError(
            f"this process's devices hold rows {sorted(rows)} of the batch, not one block; "
            f"order the mesh so each process's devices are adjacent on the data axes"
        )
    return slice(start, stop)


def host_local_batch_to_global(
    batch: Mapping[str, Any],
    mesh: Mesh,
    global_batch_size: int,
    rules: LogicalRules | None = None,
) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's rows (`process_batch_rows`).

    batch: this process's rows, leading dimension `global_batch_size / process_count` (any
    dtype). Every process calls it with its own rows; the result is one global `jax.Array`
    per key, `[global_batch_size, ...]`, split over the data axes. With one process it is
    `shard_batch`.
    """
    ways = data_parallel_size(mesh, rules)
    if global_batch_size % ways:
        raise UserError(
            f"batch size {global_batch_size} is not divisible by the data-parallel size {ways} "
            f"({_describe(mesh)}); use a batch size that is a multiple of {ways}"
        )
    rows = process_batch_rows(global_batch_size, mesh, rules)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] != rows.stop - rows.start:
            raise UserError(
                f"batch {key!r} has {value.shape[0]} rows on process {jax.process_index()}, "
                f"which must load rows {rows.start}..{rows.stop - 1} of the global batch of "
                f"{global_batch_size}"
            )
        sharding = batch_sharding_of(mesh, value.ndim, rules)
        global_shape = (global_batch_size, *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# ---- helpers -------------------------------------------------------------------------------------
def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _normalise(axes: MeshAxes) -> MeshAxes:
    t = _as_tuple(axes)
    return None if not t else (t[0] if len(t) == 1 else t)


def _axes_size(mesh: Mesh | jax.sharding.AbstractMesh, axes: MeshAxes) -> int:
    return math.prod(mesh.shape[a] for a in _as_tuple(axes))


def _describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


def _path_str(path: tuple) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
        parts.append(str(key))
    return ".".join(parts)
