"""`bench/memory.py`: per-device bytes from shapes and sharding rules, without allocating."""

import math
import subprocess
import sys
from pathlib import Path

import jax
from flax import nnx

from bench.memory import activation_bytes, measure
from dalle_jax.model import DalleTransformer, get_config

ROOT = Path(__file__).resolve().parent.parent


def tiny_param_bytes() -> int:
    model = nnx.eval_shape(lambda: DalleTransformer(get_config("tiny"), rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_one_device_holds_every_parameter_byte():
    record = measure("tiny", (1, 1, 1))
    assert record["params_bytes"] == record["params_total_bytes"] == tiny_param_bytes()
    # AdamW: two float32 moments per parameter, plus a few scalar step counters (the
    # optimizer's, Adam's and the schedule's).
    moments = 2 * tiny_param_bytes()
    assert moments < record["optimizer_bytes"] <= moments + 4 * 4


def test_eight_way_mesh_splits_parameters_eight_ways_up_to_the_norms():
    total = tiny_param_bytes()
    record = measure("tiny", (1, 4, 2))
    assert record["params_total_bytes"] == total
    # Norm scales and biases shard over fsdp only (not tensor): a few percent above total/8.
    assert total / 8 <= record["params_bytes"] <= total / 8 * 1.1
    assert record["optimizer_bytes"] < record["optimizer_total_bytes"] / 7


def test_activations_shrink_with_remat_and_grow_with_the_batch():
    config = get_config("350m")
    full = activation_bytes(config, 4, 1, remat=False)
    assert activation_bytes(config, 4, 1, remat=True) < full / 4
    assert activation_bytes(config, 8, 1, remat=False) == 2 * full
    assert activation_bytes(config, 4, 4, remat=False) < full / 2


def test_cli_sizes_1b_on_a_256_chip_abstract_mesh():
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--config", "1b", "--mesh", "1,64,4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert '"devices": 256' in result.stdout and "per-device memory" in result.stdout


def test_cli_rejects_a_bad_mesh_with_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--config", "tiny", "--mesh", "1,3,1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "divisible" in result.stderr
