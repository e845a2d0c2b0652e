"""`train` commands as processes of a multi-process run: the shared `--coordinator-address`,
`--num-processes` and `--process-id` flags (`train/run_flags.py`), and real two-process runs of
`train dalle --config tiny` and `train encode` through those flags on 127.0.0.1.

The two-process runs use `tests/test_multiprocess.py`'s launch pattern: each process has 2 fake
CPU devices, so together they form a 4-device mesh and talk through gloo. The mesh is
(data=1, fsdp=1, tensor=4): the tensor axis spans both processes, so each process holds every
row of the batch and reads the same examples as one process would; the losses must then match
a one-process run of the same job on 4 devices of this pytest process.
"""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from test_multiprocess import check_ok, free_port, wait_all
from test_training import read_metrics, write_vqvae_workdir

from dalle_jax import checkpoint as ckpt
from dalle_jax import sharding, training
from dalle_jax.bundle import load_bundle
from dalle_jax.data import pipeline, registry
from dalle_jax.errors import UserError
from dalle_jax.sharding import MeshConfig
from dalle_jax.tokenizer import TextTokenizer, train_tokenizer
from train.cli import main
from train.run_flags import start_distributed
from vqvae.config import get_config as get_vqvae_config
from vqvae.model import create_model

ROOT = Path(__file__).resolve().parent.parent
TEXT_LENGTH, GRID, TEXT_VOCAB, IMAGE_VOCAB = 16, (8, 8), 64, 32  # tiny job; 64 splits 4 ways
EXAMPLES = 16
STEPS = 2
MESH = "1,1,4"
TIMEOUT_S = 240

# Minimal arguments each command needs to reach its `run` (where the flags are checked first).
COMMANDS = {
    "dalle": ["--workdir", "{tmp}/w", "--data", "{tmp}/d"],
    "vqvae": ["--workdir", "{tmp}/w"],
    "encode": [
        "--vqvae",
        "{tmp}/v",
        "--tokenizer",
        "{tmp}/t",
        "--dataset",
        "x",
        "--out",
        "{tmp}/o",
    ],
    "reranker": ["--workdir", "{tmp}/w"],
}
FULL = ["--coordinator-address", "127.0.0.1:8476", "--num-processes", "2"]


# ----------------------------------------------------------------------------- the flags


def run_main(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_training_command_takes_the_three_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--coordinator-address HOST:PORT", "--num-processes N", "--process-id I"):
        assert flag in out, out
    assert "(default: None)" not in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--num-processes", "2"], "--num-processes given without --coordinator-address, "),
        ([*FULL[:2], "--process-id", "0"], "given without --num-processes; a multi-process"),
        ([*FULL, "--process-id", "2"], r"--process-id 2 is not in 0\.\.1 \(--num-processes 2\)"),
    ],
)
def test_partial_or_inconsistent_flags_are_one_line(command, flags, expected, tmp_path, capsys):
    argv = [command, *(a.format(tmp=tmp_path) for a in COMMANDS[command]), *flags]
    code, err = run_main(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"],
         "--coordinator-address 'localhost': give HOST:PORT"),
        (["--coordinator-address", "h:99999", "--num-processes", "2", "--process-id", "0"],
         "give HOST:PORT"),
        (["--coordinator-address", "h:1", "--num-processes", "0", "--process-id", "0"],
         "--num-processes must be at least 1, got 0"),
        ([*FULL, "--process-id", "-1"], "--process-id -1 is not in 0..1"),
    ],
)  # fmt: skip
def test_bad_flag_values_are_one_line(flags, expected, tmp_path, capsys):
    code, err = run_main(["dalle", "--workdir", str(tmp_path / "w"), "--data", "d", *flags], capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def flags(address=None, count=None, index=None) -> argparse.Namespace:
    return argparse.Namespace(coordinator_address=address, num_processes=count, process_id=index)


@pytest.fixture
def joins(monkeypatch) -> list:
    """Records `initialize_distributed` calls instead of making them (jax is running here)."""
    calls = []
    monkeypatch.setattr(sharding, "initialize_distributed", lambda *a, **k: calls.append((a, k)))
    return calls


def test_no_flags_and_no_cluster_is_a_plain_one_process_run(joins, monkeypatch):
    monkeypatch.setattr(sharding, "detected_cluster", lambda: None)
    assert start_distributed(flags()) is None
    assert joins == []


def test_no_flags_on_a_detected_cluster_lets_jax_configure_itself(joins, monkeypatch):
    # A TPU pod slice: jax reads the coordinator, count and id from the TPU metadata.
    monkeypatch.setattr(sharding, "detected_cluster", lambda: "GceTpuCluster")
    assert start_distributed(flags()) == "GceTpuCluster"
    assert joins == [((), {})]


def test_flags_are_passed_on_and_a_failed_join_is_one_line(joins, monkeypatch):
    monkeypatch.setattr(sharding, "detected_cluster", lambda: "never asked when flags are given")
    assert start_distributed(flags("10.0.0.1:8476", 4, 3)) == "flags"
    assert joins == [(("10.0.0.1:8476", 4, 3), {})]

    def unreachable(*args, **kwargs):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out. Id: PjRT_Client_Connect\nmore")

    monkeypatch.setattr(sharding, "initialize_distributed", unreachable)
    with pytest.raises(UserError) as error:
        start_distributed(flags("10.0.0.1:8476", 4, 3))
    message = str(error.value)
    assert message.startswith("process 3 of 4 could not join the run at 10.0.0.1:8476: DEADLINE")
    assert "\n" not in message


def test_the_detector_answers_without_touching_a_device():
    # Whatever this machine is, the answer is a cluster name or None, never an exception.
    found = sharding.detected_cluster()
    assert found is None or isinstance(found, str)


# ----------------------------------------------------------------------------- bad input


def test_a_mesh_axis_that_does_not_divide_a_dimension_is_one_line(data_dir, tmp_path, capsys):
    # The tiny model has 4 attention heads: a tensor axis of 8 cannot split them.
    argv = ["dalle", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--data", data_dir]
    code, err = run_main([*argv, "--mesh", "1,1,8"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "is not divisible by mesh axis tensor of size 8" in err, err
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- two processes


def write_split(out_dir, seed=0):
    """EXAMPLES records of random ids (captions of 3..10 ids, then padding)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(EXAMPLES):
        text_ids = np.zeros(TEXT_LENGTH, np.int32)
        length = rng.integers(3, 11)
        text_ids[:length] = rng.integers(4, TEXT_VOCAB, length)
        image_ids = rng.integers(0, IMAGE_VOCAB, GRID[0] * GRID[1]).astype(np.int32)
        records.append({"text_ids": text_ids, "image_ids": image_ids})
    pipeline.write_encoded_shards(
        out_dir,
        records,
        text_length=TEXT_LENGTH,
        image_grid=GRID,
        text_vocab_size=TEXT_VOCAB,
        image_vocab_size=IMAGE_VOCAB,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("encoded")
    for split in ("train", "validation"):
        write_split(root / split)
    return str(root)


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory) -> str:
    return write_vqvae_workdir(tmp_path_factory.mktemp("vqvae"), get_vqvae_config("tiny"))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    captions = [
        f"a {size} {color} {shape} at the {where}"
        for size in ("small", "large")
        for color in ("red", "green", "blue", "yellow", "purple", "orange")
        for shape in ("circle", "square", "triangle", "diamond")
        for where in ("top", "bottom left", "center")
    ]
    model = train_tokenizer(captions, TEXT_VOCAB, "bpe")
    assert TextTokenizer.from_bytes(model).vocab_size == TEXT_VOCAB
    path = tmp_path_factory.mktemp("tokenizer") / "text.model"
    path.write_bytes(model)
    return str(path)


def launch_cli(argv: list[str], processes: int = 2) -> list[subprocess.Popen]:
    """`python -m train ARGV` once per process, joined through the CLI flags."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    address = f"127.0.0.1:{free_port()}"
    return [
        subprocess.Popen(
            [sys.executable, "-m", "train", *argv, "--coordinator-address", address]
            + ["--num-processes", str(processes), "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(processes)
    ]


def dalle_argv(workdir, data_dir, *extra) -> list[str]:
    return [
        "dalle", "--config", "tiny", "--workdir", str(workdir), "--data", data_dir,
        "--steps", str(STEPS), "--batch-size", "8", "--mesh", MESH, "--log-every", "1",
        "--eval-every", str(STEPS), "--checkpoint-every", "1", "--eval-examples", "8", *extra,
    ]  # fmt: skip


def job_of(data_dir) -> training.DalleJob:
    """The job the CLI builds from `dalle_argv` (for the one-process reference)."""
    base = training.get_job("tiny")
    return base.replace(
        data_dir=data_dir,
        mesh=MeshConfig(1, 1, 4),
        optim=dataclasses.replace(base.optim, total_steps=STEPS),
        batch_size=8,
        log_every=1,
        eval_every=STEPS,
        checkpoint_every=1,
        eval_max_examples=8,
    )


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_process")
    training.train_and_evaluate(job_of(data_dir), str(workdir), devices=jax.devices()[:4])
    return workdir


def losses(workdir) -> list[float]:
    metrics = read_metrics(workdir)
    return [metrics[step]["loss"] for step in sorted(metrics)]


@pytest.mark.slow  # ~30 s of CPU over three processes (~60 s on a busy 2-core machine)
def test_two_processes_train_through_the_cli_like_one(
    data_dir, vqvae_dir, tokenizer_file, tmp_path, request
):
    workdir = tmp_path / "run"
    argv = dalle_argv(workdir, data_dir, "--vqvae", vqvae_dir, "--tokenizer", tokenizer_file)
    processes = launch_cli(argv)
    one_process_run = request.getfixturevalue("one_process_run")  # while they start up
    (_, out0), (_, out1) = results = wait_all(processes, timeout=TIMEOUT_S)
    check_ok(results)

    # Process 0 alone logs, writes metrics, images and the bundle; both write checkpoints.
    assert "mesh data=1 x fsdp=1 x tensor=4, batch 8" in out0, out0[-3000:]
    assert "bundle written to" in out0 and '"final_eval"' in out0
    for line in ("dalle tiny:", "eval step", "bundle written", "final_eval"):
        assert line not in out1, out1[-3000:]
    assert sorted(read_metrics(workdir)) == list(range(1, STEPS + 1))  # once each
    assert sorted(read_metrics(workdir, "validation")) == [STEPS]
    assert (workdir / "images" / f"samples_{STEPS:07d}.png").is_file()
    assert ckpt.complete_steps(ckpt.checkpoints_dir(workdir)) == list(range(1, STEPS + 1))

    # The tensor axis spans both processes, so each fed the whole batch from one shard of the
    # data: the same examples in the same order as one process, hence the same losses.
    saved = ckpt.read_json_item(ckpt.checkpoints_dir(workdir) / str(STEPS), ckpt.DATA_ITEM)
    assert saved["pipeline"]["process_count"] == 1 and saved["pipeline"]["batch_size"] == 8
    np.testing.assert_allclose(losses(workdir), losses(one_process_run), rtol=2e-5)
    evals = read_metrics(workdir, "validation")[STEPS]
    expected = read_metrics(one_process_run, "validation")[STEPS]
    assert evals["loss"] == pytest.approx(expected["loss"], rel=2e-5)

    # The bundle process 0 exported from the 2-process checkpoint loads in one process.
    bundle = load_bundle(str(workdir / "bundle"))
    assert bundle.meta["provenance"]["step"] == STEPS


@pytest.mark.slow
def test_a_two_process_run_resumes_where_it_stopped(data_dir, one_process_run, tmp_path):
    """Stopped after one step and started again, both processes resume from the checkpoint
    they wrote together and go on exactly as the one-process run did."""
    workdir = tmp_path / "run"
    for run in range(2):
        extra = ["--stop-after", "1"] if run == 0 else []
        check_ok(wait_all(launch_cli(dalle_argv(workdir, data_dir, *extra)), timeout=TIMEOUT_S))
    assert sorted(read_metrics(workdir)) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses(workdir), losses(one_process_run), rtol=2e-5)


@pytest.mark.slow
def test_two_processes_that_split_the_batch_resume_too(data_dir, tmp_path):
    """The default data-parallel mesh: each process reads its own half of every batch from its
    own shard of the data. The checkpoint holds only process 0's input-pipeline state; process
    1 must resume from it with its own shard number (before the fix it refused the state)."""
    workdir = tmp_path / "run"
    argv = [a if a != MESH else "--mesh=-1,1,1" for a in dalle_argv(workdir, data_dir)]
    argv.remove("--mesh")  # a value that starts with "-" needs the = form
    argv[argv.index("--steps") + 1] = "3"
    for run in range(2):
        extra = ["--stop-after", "2"] if run == 0 else []
        results = wait_all(launch_cli([*argv, *extra]), timeout=TIMEOUT_S)
        check_ok(results)
    assert "resumed from the latest checkpoint" in results[0][1]
    assert sorted(read_metrics(workdir)) == [1, 2, 3]
    saved = ckpt.read_json_item(ckpt.checkpoints_dir(workdir) / "3", ckpt.DATA_ITEM)
    assert saved["pipeline"]["process_count"] == 2 and saved["pipeline"]["batch_size"] == 4
    assert all(np.isfinite(losses(workdir)))


# ----------------------------------------------------------------------------- encode

ENCODE_DATASET = "shapes_world/tiny32"


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("prepared"))
    registry.builder(ENCODE_DATASET, data_dir=directory).download_and_prepare()
    return directory


@pytest.fixture(scope="module")
def random_vqvae_dir(tmp_path_factory) -> str:
    """A `train vqvae`-style workdir with random initial weights (their ids vary by image)."""
    config = get_vqvae_config("tiny")
    weights = nnx.to_pure_dict(nnx.state(create_model(config, seed=1)))
    workdir = tmp_path_factory.mktemp("random_vqvae")
    with ckpt.Checkpointer(workdir, config={"model": config.to_dict()}) as checkpointer:
        checkpointer.save(1, {"params": weights}, force=True)
    return str(workdir)


def read_records(directory) -> dict:
    (batch,) = pipeline.encoded_dataset(
        directory, pipeline.LoaderConfig.eval(10_000), process_index=0, process_count=1
    )
    return batch


def test_two_processes_encode_the_records_one_process_writes(
    prepared_dir, random_vqvae_dir, tokenizer_file, tmp_path
):
    argv = [
        "encode", "--vqvae", random_vqvae_dir, "--tokenizer", tokenizer_file,
        "--dataset", ENCODE_DATASET, "--data-dir", prepared_dir, "--splits", "validation",
        "--text-length", "8", "--batch-size", "24",
    ]  # fmt: skip
    processes = launch_cli([*argv, "--out", str(tmp_path / "two")])
    # The reference, while they start: one process, this pytest's 8 devices.
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    (_, out0), (_, out1) = results = wait_all(processes, timeout=TIMEOUT_S)
    check_ok(results)
    assert "validation: 64 records" in out0 and "records" not in out1  # process 0 reports
    one, two = read_records(tmp_path / "one/validation"), read_records(tmp_path / "two/validation")
    assert len(np.unique(one["image_ids"])) > 1  # ids that tell images apart
    for key in ("index", "text_ids", "image_ids"):
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
