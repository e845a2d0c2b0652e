"""Checkpoints: resume order, config check, damaged/unfinished saves, resharding, NaN guard."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from dalle_jax.checkpoint import (
    ABSENT,
    Checkpointer,
    NonFiniteLossError,
    abstract_of,
    check_finite,
    complete_steps,
    config_differences,
    find_step_dir,
    read_json_item,
    restore_or_init,
    restore_weights,
    tree_is_finite,
)
from dalle_jax.errors import UserError

CONFIG = {"model": {"d_model": 16, "n_layers": 2}, "train": {"total_steps": 100, "lr": 1e-3}}


def make_state(seed: int, *, step: int = 0, opt_scale: float = 0.0) -> dict:
    """A small training state: weights, optimizer moments, step and rng key data."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": jax.random.normal(keys[0], (8, 16), jnp.float32),
        "b": jax.random.normal(keys[1], (16,), jnp.float32),
    }
    opt = {"mu": jax.tree.map(lambda p: p * opt_scale, params), "count": jnp.int32(step)}
    return {
        "params": params,
        "opt": opt,
        "step": jnp.int32(step),
        "rng": jax.random.key_data(keys[2]),
    }


def fresh_state() -> dict:
    return make_state(99)


ABSTRACT = abstract_of(fresh_state())


def assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()  # bit-identical


def write_run(workdir, steps, *, config=CONFIG, max_to_keep=None, **kwargs) -> dict[int, dict]:
    """Saves `make_state(step)` at each step; returns the saved states by step."""
    saved = {}
    with Checkpointer(workdir, config=config, max_to_keep=max_to_keep, **kwargs) as ckpt:
        for step in steps:
            saved[step] = make_state(step, step=step, opt_scale=0.5)
            assert ckpt.save(step, saved[step], data_state={"position": step}, force=True)
    return saved


# ---------------------------------------------------------------------------------------------
# The resume order.


def test_scratch_when_there_is_nothing(tmp_path):
    state, data_state, how = restore_or_init(
        tmp_path / "run", ABSTRACT, config=CONFIG, init_fn=fresh_state
    )
    assert how.kind == "scratch" and str(how) == "started from scratch"
    assert data_state is None
    assert_trees_equal(state, fresh_state())


def test_latest_checkpoint_in_workdir_wins_over_resume_and_init(tmp_path):
    saved = write_run(tmp_path / "run", [10, 20])
    other = write_run(tmp_path / "other", [5])
    state, data_state, how = restore_or_init(
        tmp_path / "run",
        ABSTRACT,
        config=CONFIG,
        init_fn=fresh_state,
        resume=tmp_path / "other",
        init=tmp_path / "other",
    )
    assert (how.kind, how.step) == ("workdir", 20)
    assert "step 20" in str(how) and str(tmp_path / "run") in str(how)
    assert data_state == {"position": 20}
    assert_trees_equal(state, saved[20])
    assert not np.array_equal(state["params"]["w"], other[5]["params"]["w"])


@pytest.mark.parametrize("where", ["workdir", "checkpoints", "step_dir"])
def test_resume_takes_the_full_state_of_another_run(tmp_path, where):
    saved = write_run(tmp_path / "a", [10, 20])
    path = {
        "workdir": tmp_path / "a",
        "checkpoints": tmp_path / "a" / "checkpoints",
        "step_dir": tmp_path / "a" / "checkpoints" / "10",
    }[where]
    expected_step = 10 if where == "step_dir" else 20
    state, data_state, how = restore_or_init(
        tmp_path / "b", ABSTRACT, config=CONFIG, init_fn=fresh_state, resume=path, init=path
    )
    assert (how.kind, how.step) == ("resume", expected_step)
    assert data_state == {"position": expected_step}
    assert_trees_equal(state, saved[expected_step])


def test_init_takes_only_the_weights(tmp_path):
    saved = write_run(tmp_path / "a", [30])
    state, data_state, how = restore_or_init(
        tmp_path / "b", ABSTRACT, config=CONFIG, init_fn=fresh_state, init=tmp_path / "a"
    )
    assert (how.kind, how.step) == ("init", 30)
    assert "fresh optimizer, step 0" in str(how)
    assert data_state is None
    assert_trees_equal(state["params"], saved[30]["params"])
    fresh = fresh_state()
    for key in ("opt", "step", "rng"):
        assert_trees_equal(state[key], fresh[key])


def test_init_works_whatever_optimizer_state_the_other_run_had(tmp_path):
    other_state = make_state(3, step=7)
    other_state["opt"] = {"nu": jnp.ones((3, 3)), "schedule": {"count": jnp.int32(7)}}
    with Checkpointer(tmp_path / "a", config=CONFIG) as ckpt:
        ckpt.save(7, other_state, force=True)
    state, _, how = restore_or_init(
        tmp_path / "b", ABSTRACT, config=CONFIG, init_fn=fresh_state, init=tmp_path / "a"
    )
    assert how.kind == "init"
    assert_trees_equal(state["params"], other_state["params"])
    assert_trees_equal(state["opt"], fresh_state()["opt"])


def test_nnx_model_and_optimizer_state_round_trip_and_init(tmp_path):
    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = nnx.Linear(4, 3, rngs=rngs)

    def create(seed):
        model = Tiny(nnx.Rngs(seed))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        return model, optimizer

    def train_state(model, optimizer):
        return {"params": nnx.state(model), "opt": nnx.state(optimizer)}

    model, optimizer = create(0)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)  # non-trivial optimizer moments and count
    saved = train_state(model, optimizer)
    with Checkpointer(tmp_path / "a", config=CONFIG) as ckpt:
        ckpt.save(1, saved, force=True)

    abstract = train_state(*nnx.eval_shape(lambda: create(1)))
    state, _, how = restore_or_init(
        tmp_path / "a", abstract, config=CONFIG, init_fn=lambda: train_state(*create(1))
    )
    assert how.kind == "workdir"
    assert_trees_equal(state, saved)
    restored_model, restored_optimizer = create(1)
    nnx.update(restored_model, state["params"])
    nnx.update(restored_optimizer, state["opt"])
    assert int(restored_optimizer.step[...]) == 1

    state, _, how = restore_or_init(
        tmp_path / "b",
        abstract,
        config=CONFIG,
        init_fn=lambda: train_state(*create(1)),
        init=tmp_path / "a",
    )
    assert how.kind == "init"
    assert_trees_equal(state["params"], saved["params"])
    assert_trees_equal(state["opt"], train_state(*create(1))["opt"])
    # nnx.eval_shape gives no shardings: the weights land where the fresh ones were.
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state["params"]))


# ---------------------------------------------------------------------------------------------
# Config check.


def test_config_mismatch_names_the_key_and_both_values(tmp_path):
    write_run(tmp_path / "run", [10])
    bigger = {**CONFIG, "model": {"d_model": 32, "n_layers": 2}}
    with pytest.raises(UserError) as error:
        restore_or_init(tmp_path / "run", ABSTRACT, config=bigger, init_fn=fresh_state)
    message = str(error.value)
    assert f"workdir {tmp_path / 'run'} holds a checkpoint of a different model" in message
    assert "model.d_model 16 (checkpoint) vs 32 (config)" in message
    assert "use another --workdir or the matching config" in message
    assert "n_layers" not in message and "\n" not in message


def test_config_mismatch_for_init_names_the_flag(tmp_path):
    write_run(tmp_path / "a", [10])
    other = {**CONFIG, "model": {"d_model": 16, "n_layers": 4}}
    with pytest.raises(
        UserError,
        match=r"--init .* different model: model.n_layers 2 \(checkpoint\) vs 4 \(config\)",
    ):
        restore_or_init(
            tmp_path / "b", ABSTRACT, config=other, init_fn=fresh_state, init=tmp_path / "a"
        )


def test_ignored_keys_may_change_between_runs(tmp_path):
    saved = write_run(tmp_path / "run", [10])
    longer = {**CONFIG, "train": {"total_steps": 500, "lr": 1e-3}}
    with pytest.raises(UserError, match=r"train.total_steps 100 \(checkpoint\) vs 500"):
        restore_or_init(tmp_path / "run", ABSTRACT, config=longer, init_fn=fresh_state)
    state, _, _ = restore_or_init(
        tmp_path / "run",
        ABSTRACT,
        config=longer,
        init_fn=fresh_state,
        ignore_keys=["total_steps"],
    )
    assert_trees_equal(state, saved[10])


@dataclasses.dataclass(frozen=True)
class _Model:
    d_model: int = 16
    n_layers: int = 2
    attention: str = "xla"  # a field added after the checkpoint below was written


@dataclasses.dataclass(frozen=True)
class _Job:
    model: _Model = _Model()
    train: dict = dataclasses.field(default_factory=lambda: dict(CONFIG["train"]))


def test_a_field_added_since_the_checkpoint_resumes_only_at_its_default(tmp_path):
    saved = write_run(tmp_path / "run", [10])  # CONFIG: no "attention" key
    state, _, _ = restore_or_init(tmp_path / "run", ABSTRACT, config=_Job(), init_fn=fresh_state)
    assert_trees_equal(state, saved[10])
    other = _Job(model=_Model(attention="cudnn"))
    with pytest.raises(UserError, match=r"model.attention absent \(checkpoint\) vs \"cudnn\""):
        restore_or_init(tmp_path / "run", ABSTRACT, config=other, init_fn=fresh_state)


def test_config_differences_rules():
    saved = {"model": {"d": 1, "heads": 2}, "train": {"steps": 5}, "name": "a"}
    current = {"model": {"d": 1, "heads": 4, "extra": True}, "train": {"steps": 6}, "name": "a"}
    assert config_differences(saved, current) == [
        ("model.extra", ABSENT, True),
        ("model.heads", 2, 4),
        ("train.steps", 5, 6),
    ]
    assert config_differences(saved, current, ignore_keys=["train", "model.extra", "heads"]) == []


# ---------------------------------------------------------------------------------------------
# Damaged, missing and unfinished checkpoints.


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    files = sorted(p for p in (step_dir / "state" / "d").iterdir() if p.is_file())
    assert files, "orbax layout changed: no data files under state/d"
    return files


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_latest_checkpoint_is_a_one_line_user_error(tmp_path, damage):
    write_run(tmp_path / "run", [10, 20])
    step_dir = tmp_path / "run" / "checkpoints" / "20"
    for path in _data_files(step_dir):
        if damage == "delete":
            path.unlink()
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError) as error:
        restore_or_init(tmp_path / "run", ABSTRACT, config=CONFIG, init_fn=fresh_state)
    message = str(error.value)
    assert f"checkpoint {step_dir} cannot be read" in message
    assert f"delete {step_dir} to resume from the previous checkpoint (step 10)" in message
    assert "if the training code changed, use another --workdir" in message
    assert "\n" not in message


def test_damaged_config_is_a_user_error_naming_the_path(tmp_path):
    write_run(tmp_path / "run", [10])
    step_dir = tmp_path / "run" / "checkpoints" / "10"
    for path in (step_dir / "config").iterdir():
        path.write_text("{not json")
    with pytest.raises(UserError, match=f"checkpoint {step_dir}: its config cannot be read"):
        restore_or_init(tmp_path / "run", ABSTRACT, config=CONFIG, init_fn=fresh_state)


def test_missing_config_is_a_user_error(tmp_path):
    write_run(tmp_path / "run", [10])
    step_dir = tmp_path / "run" / "checkpoints" / "10"
    for path in (step_dir / "config").iterdir():
        path.unlink()
    (step_dir / "config").rmdir()
    with pytest.raises(UserError, match=f"checkpoint {step_dir} has no saved config"):
        restore_or_init(tmp_path / "run", ABSTRACT, config=CONFIG, init_fn=fresh_state)


def test_checkpoint_of_another_state_layout_is_a_user_error(tmp_path):
    write_run(tmp_path / "run", [10])
    other_layout = abstract_of({**fresh_state(), "ema": {"w": jnp.zeros((8, 16))}})
    pattern = "cannot be read .*another training state.*to start over; if the training code changed"
    with pytest.raises(UserError, match=pattern):
        restore_or_init(tmp_path / "run", other_layout, config=CONFIG, init_fn=fresh_state)


def test_unreadable_resume_and_init_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        ("resume", tmp_path / "missing", "--resume .*missing: no such file or directory"),
        ("init", tmp_path / "file", "--init .*file: not a directory"),
        ("init", tmp_path / "empty", "--init .*empty: no complete checkpoint found there"),
    ]
    for flag, path, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            restore_or_init(
                tmp_path / "run", ABSTRACT, config=CONFIG, init_fn=fresh_state, **{flag: path}
            )


def test_damaged_resume_checkpoint_names_the_flag_and_path(tmp_path):
    write_run(tmp_path / "a", [10])
    step_dir = tmp_path / "a" / "checkpoints" / "10"
    for path in _data_files(step_dir):
        path.unlink()
    with pytest.raises(UserError, match=f"checkpoint {step_dir} cannot be read.*--resume"):
        restore_or_init(
            tmp_path / "b", ABSTRACT, config=CONFIG, init_fn=fresh_state, resume=tmp_path / "a"
        )
    with pytest.raises(UserError, match=f"--init {step_dir}: its weights cannot be read"):
        restore_or_init(
            tmp_path / "b", ABSTRACT, config=CONFIG, init_fn=fresh_state, init=tmp_path / "a"
        )


KILLED_SAVE = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from dalle_jax.checkpoint import Checkpointer

    state = {"params": {"w": jnp.full((8, 16), 1.0)}}
    checkpointer = Checkpointer(sys.argv[1], config={"model": {"d_model": 16}})
    checkpointer.save(10, state, force=True)
    checkpointer.wait_until_finished()

    async def killed(self):  # the process dies where the finished save would be renamed
        os._exit(7)

    atomicity.AtomicRenameTemporaryPath.finalize = killed
    checkpointer.save(20, {"params": {"w": jnp.full((8, 16), 2.0)}}, force=True)
    checkpointer.wait_until_finished()
    """
)


def test_a_save_killed_half_way_is_ignored_and_cleaned_up(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(workdir)], capture_output=True)
    assert result.returncode == 7, result.stderr.decode()[-2000:]
    leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert leftovers == ["20.orbax-checkpoint-tmp"]

    config = {"model": {"d_model": 16}}
    abstract = {"params": {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}}
    state, _, how = restore_or_init(workdir, abstract, config=config, init_fn=None)
    assert (how.kind, how.step) == ("workdir", 10)
    np.testing.assert_array_equal(state["params"]["w"], np.full((8, 16), 1.0))
    with pytest.raises(UserError, match="unfinished save"):
        find_step_dir(workdir / "checkpoints" / "20.orbax-checkpoint-tmp", flag="--resume")

    # The next run's first save removes the leftover (orbax's tmp cleanup, which
    # `Checkpointer` turns on), even when it saves another step.
    with Checkpointer(workdir, config=config) as ckpt:
        assert ckpt.save(11, {"params": {"w": jnp.full((8, 16), 3.0)}}, force=True)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "11"]
    state, _, how = restore_or_init(workdir, abstract, config=config, init_fn=None)
    assert how.step == 11 and float(state["params"]["w"][0, 0]) == 3.0


def test_only_an_unfinished_save_means_the_next_option(tmp_path):
    write_run(tmp_path / "run", [10])
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "10").rename(checkpoints / "10.orbax-checkpoint-tmp")
    assert complete_steps(checkpoints) == []
    _, _, how = restore_or_init(tmp_path / "run", ABSTRACT, config=CONFIG, init_fn=fresh_state)
    assert how.kind == "scratch"


# ---------------------------------------------------------------------------------------------
# Restoring onto another mesh.


def test_restore_onto_another_mesh_shape_is_bit_identical(tmp_path):
    assert len(jax.devices()) == 8, "conftest should provide 8 fake CPU devices"
    specs = {"w": P("data", "model"), "b": P("model")}
    mesh_2x4 = jax.make_mesh((2, 4), ("data", "model"))
    state = make_state(5, step=5)
    state["params"] = jax.device_put(
        state["params"], {k: NamedSharding(mesh_2x4, s) for k, s in specs.items()}
    )
    assert state["params"]["w"].sharding.shard_shape((8, 16)) == (4, 4)
    write_dir = tmp_path / "run"
    with Checkpointer(write_dir, config=CONFIG) as ckpt:
        ckpt.save(5, state, force=True)

    mesh_4x2 = jax.make_mesh((4, 2), ("data", "model"))
    one_device = SingleDeviceSharding(jax.devices()[3])
    targets = {
        "mesh 4x2": {k: NamedSharding(mesh_4x2, s) for k, s in specs.items()},
        "one device": {k: one_device for k in specs},
    }
    for name, shardings in targets.items():
        abstract = abstract_of(state)
        abstract["params"] = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in abstract["params"].items()
        }
        restored, _, _ = restore_or_init(write_dir, abstract, config=CONFIG, init_fn=None)
        for k, array in restored["params"].items():
            assert array.sharding == shardings[k], name
        assert_trees_equal(restored, state)
    assert restored["params"]["w"].sharding.shard_shape((8, 16)) == (8, 16)


# ---------------------------------------------------------------------------------------------
# Saving: interval, retention, extra JSON, async copies.


def test_interval_retention_and_extra(tmp_path):
    with Checkpointer(
        tmp_path / "run", config=CONFIG, max_to_keep=2, save_interval_steps=10
    ) as ckpt:
        state = make_state(0)
        assert not ckpt.save(1, state)  # no save of the first step, only the interval
        for step in (10, 20, 30):
            assert ckpt.save(step, state, extra={"note": f"at {step}"})
        assert not ckpt.save(35, state)
        assert ckpt.save(35, state, force=True)
        assert not ckpt.save(35, state, force=True)  # already there
    checkpoints = tmp_path / "run" / "checkpoints"
    assert complete_steps(checkpoints) == [30, 35]
    assert read_json_item(checkpoints / "30", "extra") == {"note": "at 30"}
    assert read_json_item(checkpoints / "35", "extra") is None
    assert read_json_item(checkpoints / "30", "config") == CONFIG


def test_async_save_copies_the_arrays_before_returning(tmp_path):
    state = make_state(1)
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(tmp_path / "run", config=CONFIG, async_save=True) as ckpt:
        ckpt.save(1, state, force=True)
        for leaf in jax.tree.leaves(state):
            leaf.delete()  # what a donating train step does to the old state
    restored, _, _ = restore_or_init(tmp_path / "run", ABSTRACT, config=CONFIG, init_fn=None)
    assert_trees_equal(restored, expected)


# ---------------------------------------------------------------------------------------------
# The NaN guard.


def test_check_finite_message():
    check_finite({"loss": jnp.float32(2.5), "lr": 1e-3, "name": "x"}, 5)  # finite: no error
    with pytest.raises(NonFiniteLossError) as error:
        check_finite(
            {"grad_norm": jnp.float32(jnp.inf), "loss": jnp.float32(jnp.nan)},
            1234,
            last_good_step=1200,
            checkpoint_dir="/w/checkpoints",
        )
    message = str(error.value)
    assert message.startswith("loss became nan (also non-finite: grad_norm) at step 1234; stopped.")
    assert "The last good checkpoint (step 1200) is kept in /w/checkpoints" in message
    assert "lower the learning rate" in message and "rerun" in message
    assert isinstance(error.value, UserError)
    with pytest.raises(NonFiniteLossError, match="accuracy became inf at step 3; .*No checkpoint"):
        check_finite({"accuracy": np.array([1.0, np.inf])}, 3)


def test_checkpointer_refuses_to_save_after_non_finite_metrics(tmp_path):
    with Checkpointer(tmp_path / "run", config=CONFIG, save_interval_steps=10) as ckpt:
        ckpt.save(10, make_state(0))
        ckpt.check_finite({"loss": 1.0}, 12)
        with pytest.raises(NonFiniteLossError, match=r"step 15; .*\(step 10\) is kept in"):
            ckpt.check_finite({"loss": jnp.float32(jnp.nan)}, 15)
        with pytest.raises(NonFiniteLossError, match="not saving step 20"):
            ckpt.save(20, make_state(0))
    assert complete_steps(tmp_path / "run" / "checkpoints") == [10]


def test_checkpointer_never_writes_non_finite_weights(tmp_path):
    bad = make_state(0)
    bad["params"]["b"] = bad["params"]["b"].at[3].set(jnp.nan)
    assert tree_is_finite(make_state(0)) and not tree_is_finite(bad)
    with Checkpointer(tmp_path / "run", config=CONFIG, save_interval_steps=10) as ckpt:
        ckpt.save(10, make_state(0))
        assert not ckpt.save(15, bad)  # not a save step: nothing checked, nothing written
        with pytest.raises(NonFiniteLossError, match=r"weights became nan or inf .* step 20"):
            ckpt.save(20, bad)
    assert complete_steps(tmp_path / "run" / "checkpoints") == [10]


def test_a_failed_restore_leaves_no_stray_tracebacks(monkeypatch):
    """Late tensorstore callbacks into orbax's closed loop are dropped; other errors are not."""
    import types

    from dalle_jax import checkpoint

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    checkpoint._ignore_callbacks_into_closed_event_loops()
    checkpoint._ignore_callbacks_into_closed_event_loops()  # installs once
    late_callback = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(late_callback)
    sys.unraisablehook(other)
    assert reported == [other]


def test_relative_workdir_and_checkpoint_paths_work(tmp_path, monkeypatch):
    # Users type `--workdir runs/x`; orbax itself only accepts absolute paths.
    monkeypatch.chdir(tmp_path)
    state = {"params": {"w": jnp.arange(4.0)}}
    with Checkpointer("runs/x", config={"model": {"d": 1}}, async_save=False) as checkpointer:
        checkpointer.save(1, state, force=True)
    restored = restore_weights("runs/x", {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
    assert (tmp_path / "runs" / "x" / "checkpoints" / "1").is_dir()
