"""`train recipe`: the steps that make a shipped bundle, run for real on the tiny recipe."""

from __future__ import annotations

import json

from dalle_jax.bundle import load_bundle
from train.cli import main
from train.recipe_cmd import STATE_FILE
from train.recipes import RECIPES


def test_dry_run_lists_every_step_and_runs_nothing(tmp_path, capsys):
    workdir = tmp_path / "shapes"
    assert main(["recipe", "shapes", "--workdir", str(workdir), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    steps = RECIPES["shapes"](workdir)
    assert len(out) == len(steps)
    assert [line.split(":")[0].split("] ")[1] for line in out] == [s.name for s in steps]
    assert "train vqvae --config shapes64" in out[2] and "--steps 2500" in out[2]
    assert "--steps 4500" in out[3]
    assert out[6].startswith("[7/10] dalle-continued: train dalle") and "--steps 6500" in out[6]
    assert out[7].startswith("[8/10] dalle-continued-2: train dalle") and "--steps 13000" in out[7]
    assert "--rerank-per-image 16 --rerank-likelihood-weight 0.25" in out[-1]
    assert f"--out {workdir}/bundle --weights-dtype bfloat16" in out[-1]
    assert not workdir.exists()


def test_the_90_minute_recipe_trains_each_model_once_with_flags_its_commands_take(tmp_path, capsys):
    from dalle_jax.training import get_job
    from train.cli import build_parser

    workdir = tmp_path / "shapes90"
    assert main(["recipe", "shapes-90min", "--workdir", str(workdir), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split(":")[0].split("] ")[1] for line in out]
    assert names == ["data", "tokenizer", "vqvae", "encode", "dalle", "reranker", "export"]
    assert "--batch-size 16 --steps 4500" in out[2] and "--text-length 24" in out[3]
    # The transformer runs its job's own schedule: the mini model, batch 16, 22,000 steps.
    assert "train dalle --config shapes-90min" in out[4] and "--steps" not in out[4]
    job = get_job("shapes-90min")
    assert (job.model.num_layers, job.model.d_model, job.model.text_length) == (4, 128, 24)
    assert (job.batch_size, job.optim.total_steps, job.model.activation) == (16, 22000, "relu")
    assert "--steps 800" in out[5]
    assert "--rerank-per-image 16 --rerank-likelihood-weight 0.25" in out[6]
    # Every step is a command line `train` accepts as it stands.
    parser = build_parser()
    for step in RECIPES["shapes-90min"](workdir):
        parser.parse_args(list(step.argv))
    assert not workdir.exists()


def test_tiny_recipe_makes_a_bundle_with_reranker_and_resumes_by_skipping(tmp_path, capsys):
    workdir, data_dir = tmp_path / "tiny", tmp_path / "data"
    command = ["recipe", "tiny", "--workdir", str(workdir), "--data-dir", str(data_dir)]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert f"bundle in {workdir / 'bundle'}" in captured.out

    bundle = load_bundle(workdir / "bundle")
    assert bundle.meta["weights_dtype"] == "bfloat16"
    assert bundle.reranker is not None
    assert bundle.sampling["cfg_scale"] == 2.0  # the recipe's export flag over the run's 1.0
    assert bundle.sampling["rerank_likelihood_weight"] == 0.5  # through the real export
    assert bundle.transformer.config.text_vocab_size == bundle.tokenizer.vocab_size
    state = json.loads((workdir / STATE_FILE).read_text())
    assert state["recipe"] == "tiny"
    assert list(state["steps"]) == [s.name for s in RECIPES["tiny"](workdir, str(data_dir))]
    assert all(r["seconds"] >= 0 for r in state["steps"].values())

    # Rerunning does nothing but report: every step is recorded as done with the same argv.
    assert main(command) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == len(state["steps"])
    assert json.loads((workdir / STATE_FILE).read_text()) == state

    # Another recipe in the same workdir is refused in one line.
    assert main(["recipe", "shapes", "--workdir", str(workdir), "--data-dir", str(data_dir)]) == 2
    assert "holds recipe 'tiny', not 'shapes'" in capsys.readouterr().err


def test_a_corrupt_record_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / STATE_FILE).write_text("{not json")
    assert main(["recipe", "tiny", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "delete it to start the recipe over" in err
    assert len(err.splitlines()) == 1
