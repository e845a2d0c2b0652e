"""Every command in a row, as a user runs them, on shapes_world/tiny32:

train data -> train tokenizer -> train vqvae -> train encode -> train dalle (in a subprocess,
SIGKILLed after its first checkpoint) -> the same `train dalle` again (resumes, finishes, writes
the bundle) -> load the bundle, sample image ids, decode them -> `sample --model BUNDLE`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import checkpoint as ckpt
from dalle_jax.bundle import load_bundle
from dalle_jax.sampling import SamplingSettings, jit_sampler
from dalle_jax.training import get_job
from train.cli import main
from vqvae.model import decode

DATASET = "shapes_world/tiny32"
TOTAL_STEPS = get_job("tiny").optim.total_steps  # 40; checkpoints every 10, evals every 20
FIRST_CHECKPOINT = get_job("tiny").checkpoint_every


def wait_for_checkpoint(workdir: Path, process: subprocess.Popen, log: Path, timeout: float) -> int:
    """Polls until a complete checkpoint exists; returns its step (the process must still run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = ckpt.complete_steps(ckpt.checkpoints_dir(workdir))
        if steps:
            return steps[0]
        if process.poll() is not None:
            raise AssertionError(
                f"train dalle exited ({process.returncode}) before a checkpoint:\n"
                + log.read_text()[-3000:]
            )
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint within {timeout} s:\n" + log.read_text()[-3000:])


def test_train_kill_resume_export_sample(tmp_path, capsys):
    data_dir, tokenizer = tmp_path / "data", tmp_path / "text.model"
    vqvae_dir, encoded, workdir = tmp_path / "vqvae", tmp_path / "encoded", tmp_path / "dalle"
    data = ["--dataset", DATASET, "--data-dir", str(data_dir)]

    assert main(["data", *data]) == 0
    assert main(["tokenizer", *data, "--vocab-size", "64", "--model-type", "bpe",
                 "--out", str(tokenizer)]) == 0  # fmt: skip
    # A few steps are enough for a real stage-1 checkpoint to encode with.
    assert main(["vqvae", "--config", "tiny", "--workdir", str(vqvae_dir),
                 "--data-dir", str(data_dir), "--stop-after", "2"]) == 0  # fmt: skip
    assert main(["encode", *data, "--vqvae", str(vqvae_dir), "--tokenizer", str(tokenizer),
                 "--out", str(encoded), "--text-length", "16"]) == 0  # fmt: skip
    capsys.readouterr()

    command = ["dalle", "--config", "tiny", "--workdir", str(workdir), "--data", str(encoded),
               "--vqvae", str(vqvae_dir), "--tokenizer", str(tokenizer)]  # fmt: skip
    log = tmp_path / "first_run.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "train", *command],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),  # conftest's 8 fake devices, CPU only
        )
        try:
            step = wait_for_checkpoint(workdir, process, log, timeout=240)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()
    assert step == FIRST_CHECKPOINT
    killed_at = ckpt.complete_steps(ckpt.checkpoints_dir(workdir))[-1]
    assert killed_at < TOTAL_STEPS, log.read_text()
    assert "started from scratch" in log.read_text()

    # The same command again: it resumes from the killed run's last checkpoint and finishes.
    assert main(command) == 0
    err = capsys.readouterr().err
    assert f"resumed from the latest checkpoint {ckpt.checkpoints_dir(workdir)}/{killed_at}" in err
    assert f"steps {killed_at} -> {TOTAL_STEPS}" in err
    assert ckpt.complete_steps(ckpt.checkpoints_dir(workdir))[-1] == TOTAL_STEPS
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = sorted({r["step"] for r in records if r["split"] == "train"})
    assert train_steps[-1] == TOTAL_STEPS
    assert (workdir / "images" / f"samples_{TOTAL_STEPS:07d}.png").is_file()

    bundle = load_bundle(workdir / "bundle")
    config = bundle.transformer.config
    assert config.text_vocab_size == bundle.tokenizer.vocab_size
    assert bundle.meta["provenance"]["step"] == TOTAL_STEPS
    # Two images of one prompt, drawn as `sample` draws them (so it reuses these programs).
    text_ids = bundle.tokenizer.encode(["a red circle"] * 2, config.text_length)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(2))
    ids = jit_sampler(bundle.transformer, SamplingSettings.from_dict(bundle.sampling))(
        jnp.asarray(text_ids), keys
    )
    assert ids.shape == (2, config.image_length)
    assert int(ids.min()) >= 0 and int(ids.max()) < config.image_vocab_size
    grid = ids.reshape(2, config.image_rows, config.image_cols)
    images = np.asarray(nnx.jit(decode)(bundle.vqvae, grid))
    assert images.shape == (2, 32, 32, 3) and np.all((images >= 0) & (images <= 1))

    sample_cli = pytest.importorskip("sample.cli")
    out = tmp_path / "samples"
    code = sample_cli.main(
        ["--model", str(workdir / "bundle"), "--num-images", "2", "--out", str(out),
         "a red circle"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (entry,) = json.loads((out / "manifest.json").read_text())
    assert entry["prompt"] == "a red circle" and len(entry["images"]) == 2
    for image in [entry["grid"], *entry["images"]]:
        assert (out / image).is_file()
