"""Two real JAX processes on 127.0.0.1 train like one.

Each process (`tests/multiprocess_worker.py`) has 2 fake CPU devices; together they form a
(data=1, fsdp=2, tensor=2) mesh, talk through the coordination service and gloo collectives,
and each feeds only its half of every global batch. The test process (8 fake devices) runs the
same training in one process for the reference.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import multiprocess_worker as tiny
import numpy as np
import pytest

from dalle_jax.sharding import MeshConfig, make_mesh

WORKER = Path(__file__).with_name("multiprocess_worker.py")
STEPS = 3
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, *extra: str) -> list[subprocess.Popen]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--port", port, "--process-id", str(i), "--mode", mode]
            + list(extra),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def wait_all(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """Exit code and output of each process; kills them all (and fails) past `timeout`."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"the worker processes did not finish within {timeout} s (a hang)")
    return results


def check_ok(results: list[tuple[int, str]]) -> None:
    for i, (code, out) in enumerate(results):
        assert code == 0, f"process {i} exited with {code}:\n{out[-3000:]}"


def one_process_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Trains `STEPS` steps in two processes; returns (workdir, out folder)."""
    root = tmp_path_factory.mktemp("two_process")
    workdir, out = root / "work", root / "out"
    check_ok(
        wait_all(
            launch("train", "--workdir", str(workdir), "--out", str(out), "--steps", str(STEPS))
        )
    )
    return workdir, out


@pytest.fixture(scope="module")
def one_process_run():
    return tiny.train(one_process_mesh(), STEPS)


def test_two_processes_train_like_one(two_process_run, one_process_run):
    _, out = two_process_run
    losses = json.loads((out / "losses.json").read_text())
    reference = one_process_run[1]
    assert len(losses) == STEPS and losses[0] != losses[-1]
    np.testing.assert_allclose(losses, reference, rtol=2e-5)
    params = dict(np.load(out / "params.npz"))
    expected = tiny.flat_arrays(tiny.to_checkpoint(one_process_run[0])["params"])
    assert params.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(params[key], value, rtol=1e-4, atol=1e-4, err_msg=key)


def test_two_process_checkpoint_restores_in_one_process(two_process_run):
    workdir, out = two_process_run
    written = dict(np.load(out / "params.npz"))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    restored = tiny.flat_arrays(tiny.restore(str(workdir), mesh)["params"])
    assert restored.keys() == written.keys()
    for key, value in written.items():
        assert restored[key].tobytes() == value.tobytes(), key  # bit-identical


def test_one_process_checkpoint_restores_in_two_processes(one_process_run, tmp_path):
    state = one_process_run[0]
    tiny.save(str(tmp_path / "work"), STEPS, state)
    expected = tiny.flat_arrays(tiny.to_checkpoint(state)["params"])
    out = tmp_path / "out"
    check_ok(wait_all(launch("restore", "--workdir", str(tmp_path / "work"), "--out", str(out))))
    restored = dict(np.load(out / "params.npz"))
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        assert restored[key].tobytes() == value.tobytes(), key


def test_a_dead_process_makes_the_other_exit_with_an_error():
    """Process 1 dies like a killed process (no clean shutdown) after joining; process 0, then
    in a collective of the train step, must notice through the missed heartbeats and exit."""
    start = time.monotonic()
    results = wait_all(launch("die", "--hard", "--heartbeat-timeout", "5"), timeout=90)
    elapsed = time.monotonic() - start
    (survivor_code, survivor_out), (dead_code, _) = results
    assert dead_code == 3
    assert survivor_code != 0, survivor_out[-2000:]
    assert "heartbeat" in survivor_out.lower() or "unhealthy" in survivor_out.lower()
    assert elapsed < 90
