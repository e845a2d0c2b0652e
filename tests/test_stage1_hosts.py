"""Stage 1 (`train vqvae`, `train reranker`) as two real processes through the CLI flags
`--coordinator-address/--num-processes/--process-id`, stopped and resumed.

Each process has 2 fake CPU devices (4 together) and feeds its own half of every global batch
from its own shard of the data. A checkpoint holds process 0's input-pipeline state only;
process 1 resumes from it in its own shard (`pipeline.state_for_process`; the fast unit tests
of that are in test_pipeline.py). A stopped and resumed run must then train exactly like a
run that never stopped.
"""

import numpy as np
import pytest
from test_multihost_cli import TIMEOUT_S, launch_cli
from test_multiprocess import check_ok, wait_all
from test_vqvae_training import read_metrics

from dalle_jax import checkpoint as ckpt
from dalle_jax.data import registry
from dalle_jax.data.pipeline import open_split
from dalle_jax.tokenizer import train_tokenizer

DATASET = "shapes_world/tiny32"
STEPS, STOP_AFTER = 7, 3
COMMON = ["--batch-size", "8", "--log-every", "1", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("data"))
    registry.builder(DATASET, data_dir=directory).download_and_prepare()
    return directory


def stop_and_resume(argv: list[str], straight_dir, resumed_dir) -> list[tuple[int, str]]:
    """Runs `argv` straight to the end in `straight_dir` and, at the same time, stopped after
    STOP_AFTER steps in `resumed_dir`; then resumes the stopped run. Returns the resumed run's
    (exit code, output) per process."""
    straight = launch_cli([*argv, "--workdir", str(straight_dir)])
    stopped = launch_cli([*argv, "--workdir", str(resumed_dir), "--stop-after", str(STOP_AFTER)])
    check_ok(wait_all(stopped, timeout=TIMEOUT_S))
    saved = ckpt.read_json_item(ckpt.checkpoints_dir(resumed_dir) / str(STOP_AFTER), ckpt.DATA_ITEM)
    # The state process 1 has to resume from is process 0's: shard 0 of 2, 4 rows a step.
    assert saved["pipeline"]["process_index"] == 0
    assert saved["pipeline"]["process_count"] == 2 and saved["pipeline"]["batch_size"] == 4
    resumed = wait_all(launch_cli([*argv, "--workdir", str(resumed_dir)]), timeout=TIMEOUT_S)
    check_ok(resumed)
    check_ok(wait_all(straight, timeout=TIMEOUT_S))
    return resumed


def assert_same_training(straight_dir, resumed_dir, keys=("loss",)) -> None:
    straight, resumed = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert sorted(straight) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(STOP_AFTER + 1, STEPS + 1):
        for key in keys:
            # Same batches on both processes and the same noise (fold_in(key, step)).
            np.testing.assert_allclose(
                resumed[step][key], straight[step][key], rtol=1e-6, err_msg=f"{key} {step}"
            )


@pytest.mark.slow  # four 2-process launches: ~60-120 s on a busy 2-core machine
def test_two_process_vqvae_resumes_like_a_run_that_never_stopped(data_dir, tmp_path):
    argv = [
        "vqvae", "--config", "tiny", "--data-dir", data_dir, "--steps", str(STEPS),
        "--eval-every", "1000", "--eval-examples", "8", *COMMON,
    ]  # fmt: skip
    (_, out0), (_, out1) = stop_and_resume(argv, tmp_path / "straight", tmp_path / "resumed")
    assert "resumed from the latest checkpoint" in out0, out0[-3000:]
    assert f"steps {STOP_AFTER} -> {STEPS}" in out0
    assert "vqvae tiny:" not in out1  # only process 0 prints
    assert_same_training(tmp_path / "straight", tmp_path / "resumed", ("loss", "psnr"))
    # The final eval ran once, on process 0's log, and agrees too.
    straight_eval = read_metrics(tmp_path / "straight", "validation")[STEPS]
    resumed_eval = read_metrics(tmp_path / "resumed", "validation")[STEPS]
    assert resumed_eval["psnr"] == pytest.approx(straight_eval["psnr"], rel=1e-5)


@pytest.fixture(scope="module")
def tokenizer_file(data_dir, tmp_path_factory) -> str:
    split = open_split(DATASET, "train", data_dir=data_dir)
    captions = [split.normalize(split.source[i], i)["caption"] for i in range(128)]
    path = tmp_path_factory.mktemp("tokenizer") / "text.model"
    path.write_bytes(train_tokenizer(captions, 128, "bpe"))
    return str(path)


@pytest.mark.slow
def test_two_process_reranker_resumes_like_a_run_that_never_stopped(
    data_dir, tokenizer_file, tmp_path
):
    argv = [
        "reranker", "--config", "tiny", "--data-dir", data_dir, "--tokenizer", tokenizer_file,
        "--steps", str(STEPS), "--warmup-steps", "2", "--eval-every", "1000",
        "--eval-examples", "8", *COMMON,
    ]  # fmt: skip
    (_, out0), _ = stop_and_resume(argv, tmp_path / "straight", tmp_path / "resumed")
    assert "resumed from the latest checkpoint" in out0, out0[-3000:]
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")
