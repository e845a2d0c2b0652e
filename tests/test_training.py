"""The stage-2 job (`dalle_jax.training`, `train dalle`, `train export`) on synthetic encoded data.

The data is written directly with `pipeline.write_encoded_shards`: 16 fixed (caption, image)
pairs of random ids, the same 16 as train and validation split, so the tiny model can memorise
them. One straight run is the reference that a killed-and-resumed run and other meshes are
compared with; the step, init and eval programs are compiled once per (config, mesh) and reused.
"""

import argparse
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dalle_jax import checkpoint as ckpt
from dalle_jax import training
from dalle_jax.bundle import check_compatible, load_bundle
from dalle_jax.data import pipeline
from dalle_jax.errors import UserError
from dalle_jax.model import loss_fn
from dalle_jax.sharding import MeshConfig
from dalle_jax.tokenizer import TextTokenizer, train_tokenizer
from train import dalle_cmd, encode_cmd
from train.cli import main
from train.recipes import RECIPES
from vqvae.config import get_config as get_vqvae_config
from vqvae.model import create_model

TEXT_LENGTH, GRID, TEXT_VOCAB, IMAGE_VOCAB = 16, (8, 8), 50, 32  # the tiny job's model
EXAMPLES = 16
STEPS = 140
RESUME_AFTER = 7
NON_TRAIN_METRICS = ("steps_per_s",)  # wall-clock, differs between any two runs


def write_split(out_dir, *, text_length=TEXT_LENGTH, grid=GRID, seed=0, extra=None):
    """EXAMPLES records: captions of 3..10 ids in [4, TEXT_VOCAB) then padding, random images."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(EXAMPLES):
        text_ids = np.zeros(text_length, np.int32)
        length = rng.integers(3, min(10, text_length) + 1)
        text_ids[:length] = rng.integers(4, TEXT_VOCAB, length)
        image_ids = rng.integers(0, IMAGE_VOCAB, grid[0] * grid[1]).astype(np.int32)
        records.append({"text_ids": text_ids, "image_ids": image_ids})
    return pipeline.write_encoded_shards(
        out_dir,
        records,
        text_length=text_length,
        image_grid=grid,
        text_vocab_size=TEXT_VOCAB,
        image_vocab_size=IMAGE_VOCAB,
        extra=extra,
    )


def write_encoded(root, **kw) -> str:
    for split in ("train", "validation"):
        write_split(Path(root) / split, **kw)
    return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_encoded(tmp_path_factory.mktemp("encoded"))


def write_vqvae_workdir(workdir, config) -> str:
    """A stage-1 workdir as `train vqvae` leaves it (config + weights), without training: zero
    weights of the right shapes (they decode every id to mid-grey), so nothing compiles."""
    abstract = nnx.state(nnx.eval_shape(lambda: create_model(config)))
    weights = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(abstract))
    with ckpt.Checkpointer(workdir, config={"model": config.to_dict()}) as checkpointer:
        checkpointer.save(1, {"params": weights}, force=True)
    return str(workdir)


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


ONE_DEVICE = jax.devices()[:1]


def run(job, workdir, **kw):
    """`train_and_evaluate` on one device, the reference the meshes are compared with."""
    return training.train_and_evaluate(job, str(workdir), devices=ONE_DEVICE, **kw)


@pytest.fixture(scope="module")
def job(data_dir) -> training.DalleJob:
    base = training.get_job("tiny")
    return base.replace(
        data_dir=data_dir,
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
        optim=base.optim.__class__(learning_rate=1e-2, warmup_steps=5, total_steps=STEPS),
        batch_size=8,
        log_every=1,
        eval_every=STEPS // 2,
        checkpoint_every=STEPS // 2,
    )


def read_metrics(workdir, split="train") -> dict[int, dict]:
    """step -> the last logged record of that step (a resumed run's lines come later)."""
    records = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == split:
            records[record["step"]] = record
    return records


def train_metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in NON_TRAIN_METRICS}


@pytest.fixture(scope="module")
def straight_run(job, tmp_path_factory):
    """STEPS steps in one go on one device: (workdir, final eval)."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, run(job, workdir)


def test_a_tiny_model_memorises_a_few_examples(straight_run):
    workdir, final_eval = straight_run
    metrics = read_metrics(workdir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    losses = np.asarray([metrics[s]["image_loss"] for s in range(1, STEPS + 1)])
    assert np.all(np.isfinite(losses))
    # From ln(32) = 3.47 nats of a uniform guess to a small fraction of it.
    assert losses[:3].mean() > 3.0, losses[:3]
    assert losses[-5:].mean() < 0.1 * losses[:3].mean(), losses[-5:]

    evals = read_metrics(workdir, split="validation")
    assert sorted(evals) == [STEPS // 2, STEPS]
    assert set(final_eval) == {"loss", "text_loss", "image_loss", "image_bits_per_dim"}
    assert final_eval["image_bits_per_dim"] == pytest.approx(final_eval["image_loss"] / np.log(2))
    assert evals[STEPS]["image_loss"] < 0.5 * evals[STEPS // 2]["image_loss"] + 0.5
    assert final_eval["image_loss"] < 1.0  # the validation split is the training examples
    assert ckpt.complete_steps(ckpt.checkpoints_dir(workdir)) == [STEPS // 2, STEPS]
    assert list((workdir / "tb").glob("events.out.tfevents.*"))


def test_a_killed_run_resumes_with_identical_losses(job, straight_run, tmp_path, capsys):
    killed = tmp_path / "killed"
    straight = read_metrics(straight_run[0])
    run(job, killed, stop_after=RESUME_AFTER)
    assert ckpt.complete_steps(ckpt.checkpoints_dir(killed)) == [RESUME_AFTER]
    assert sorted(read_metrics(killed)) == list(range(1, RESUME_AFTER + 1))

    # --resume continues another run's full state (weights, optimizer, data position) in a new
    # workdir, exactly as that run would have gone on.
    other = tmp_path / "other"
    run(job, other, resume=str(killed), stop_after=3)
    assert "resumed from --resume" in capsys.readouterr().err
    continued = read_metrics(other)
    assert sorted(continued) == [RESUME_AFTER + 1, RESUME_AFTER + 2, RESUME_AFTER + 3]
    for step in continued:
        assert train_metrics(continued[step]) == train_metrics(straight[step]), step

    run(job, killed)  # the same command again
    assert "resumed from the latest checkpoint" in capsys.readouterr().err
    resumed = read_metrics(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # Bit-identical, not just close: same next batch (the saved pipeline state), same caption
    # dropout (fold_in(key, step)), same compiled program, and the restored state is exact.
    for step in range(RESUME_AFTER + 1, STEPS + 1):
        assert train_metrics(resumed[step]) == train_metrics(straight[step]), step
    assert read_metrics(killed, "validation") == read_metrics(straight_run[0], "validation")


def test_steps_compile_once(job, straight_run):
    # The straight run and the resumed run (two invocations) used one compiled step: the state
    # comes back with the shardings it went in with, and the program is cached per config.
    mesh = training.make_mesh(job.mesh, ONE_DEVICE)
    model = job.model  # the tiny job's vocabulary is the data's
    step = training.compiled_train_step(model, job.optim, job.seed, mesh, training.DEFAULT_RULES)
    assert step.__closure__ is not None  # make_train_step's wrapper around one jitted program
    jitted = next(
        c.cell_contents for c in step.__closure__ if hasattr(c.cell_contents, "_cache_size")
    )
    assert jitted._cache_size() == 1


def test_init_takes_weights_only(job, straight_run, tmp_path, capsys):
    run(job, tmp_path, init=str(straight_run[0]), stop_after=1)
    assert "weights from --init" in capsys.readouterr().err
    first = read_metrics(tmp_path)[1]
    # Trained weights: far below the straight run's first loss, from step 1 of a new schedule.
    assert first["image_loss"] < 0.5 * read_metrics(straight_run[0])[1]["image_loss"]
    assert first["learning_rate"] == 0.0


def test_a_data_fsdp_tensor_mesh_gives_the_losses_of_one_device(job, straight_run, tmp_path):
    """data=2 x fsdp=2 x tensor=2 on 8 devices sees the batches the one-device run saw: the
    same losses up to the order of float sums."""
    one = read_metrics(straight_run[0])
    steps = 3
    mesh_job = job.replace(mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    training.train_and_evaluate(mesh_job, str(tmp_path), stop_after=steps)
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == list(range(1, steps + 1))
    for step in metrics:
        for key in ("loss", "text_loss", "image_loss"):
            assert metrics[step][key] == pytest.approx(one[step][key], rel=2e-5), (key, step)
        assert metrics[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-3)
    assert metrics[1]["loss"] != metrics[steps]["loss"]  # it did train


def test_the_fsdp_mesh_shards_the_checkpointed_state(job, straight_run):
    mesh = training.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = training.DEFAULT_RULES
    tree = training.compiled_init(job.model, job.optim, job.seed, mesh, rules)()
    kernel = tree["params"]["blocks"][0]["mlp"]["up"]["kernel"]
    assert kernel.shape == (32, 64)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 32)}


def first_batch(directory, count) -> dict:
    iterator = iter(
        pipeline.encoded_dataset(
            directory, pipeline.LoaderConfig.eval(count), process_index=0, process_count=1
        )
    )
    try:
        return next(iterator)
    finally:
        iterator.close()


def test_evaluate_averages_over_exactly_the_examples_asked_for(job, straight_run, data_dir):
    model, _ = training.load_transformer(str(straight_run[0]))
    mesh = training.make_mesh(job.mesh, ONE_DEVICE)
    # 5 examples in batches of 3: 3 + 2 (the last batch padded to 3, the padding dropped).
    metrics = training.evaluate(
        nnx.state(model),
        Path(data_dir) / "validation",
        config=model.config,
        batch_size=3,
        max_examples=5,
        mesh=mesh,
        rules=training.DEFAULT_RULES,
    )
    batch = first_batch(Path(data_dir) / "validation", 5)
    graphdef, state = nnx.split(model)
    reference = jax.jit(lambda s, b: loss_fn(nnx.merge(graphdef, s), b, None, train=False)[1])(
        state, {"text_ids": batch["text_ids"], "image_ids": batch["image_ids"]}
    )
    for key in ("loss", "text_loss", "image_loss"):
        assert metrics[key] == pytest.approx(float(reference[key]), rel=1e-5), key
    assert metrics["image_bits_per_dim"] == pytest.approx(metrics["image_loss"] / np.log(2))


# ----------------------------------------------------------------------------- guards


def test_config_and_data_mismatch_names_both_values(job, tmp_path):
    other = write_encoded(tmp_path / "short_text", text_length=12)
    with pytest.raises(UserError) as error:
        run(job.replace(data_dir=other), str(tmp_path / "w1"))
    message = str(error.value)
    assert "\n" not in message
    assert "text_length: config 16, data 12" in message
    assert "re-encode the dataset or fix the config" in message

    vocab_job = job.replace(text_vocab_from_data=False, model=job.model.replace(text_vocab_size=64))
    with pytest.raises(UserError, match="text_vocab_size: config 64, data 50"):
        run(vocab_job, str(tmp_path / "w2"))

    with pytest.raises(UserError, match=r"no metadata\.json in .*validation"):
        write_split(tmp_path / "no_eval" / "train")
        run(job.replace(data_dir=str(tmp_path / "no_eval")), str(tmp_path))
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()


def test_a_vqvae_or_tokenizer_of_other_data_is_refused(job, tmp_path, tokenizer_file):
    bigger = get_vqvae_config("tiny").__class__(
        **{**get_vqvae_config("tiny").to_dict(), "codebook_size": 64}
    )
    vqvae_dir = write_vqvae_workdir(tmp_path / "vq64", bigger)
    with pytest.raises(UserError, match="image vocabulary is 32 but the vqvae's is 64"):
        run(job, str(tmp_path / "w"), vqvae=vqvae_dir)

    encoded_with = {**get_vqvae_config("tiny").to_dict(), "base_channels": 16}
    other = write_encoded(tmp_path / "other", extra={"vqvae_config": encoded_with})
    tiny_dir = write_vqvae_workdir(tmp_path / "vq", get_vqvae_config("tiny"))
    with pytest.raises(UserError, match="vqvae has base_channels 8 but the data was encoded"):
        run(job.replace(data_dir=other), str(tmp_path / "w"), vqvae=tiny_dir)

    recorded = write_encoded(tmp_path / "sha", extra={"tokenizer_sha256": "0" * 64})
    with pytest.raises(UserError, match="the data was encoded with 000000000000"):
        run(job.replace(data_dir=recorded), str(tmp_path / "w"), tokenizer=tokenizer_file)


BLOWS_UP_AT = 3  # the step whose update turns the weights (and its loss) to NaN


@pytest.fixture
def exploding_step(monkeypatch):
    """Patches the loop's train step: from step BLOWS_UP_AT on, weights and loss become NaN
    (what a too-large learning rate does, without compiling another step for it)."""
    real = training.compiled_train_step
    poison = jax.jit(lambda tree: jax.tree.map(lambda x: x * np.float32("nan"), tree))

    def patched(*args):
        step_fn = real(*args)

        def exploding(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state[1]["step"][...]) >= BLOWS_UP_AT:
                state = nnx.State({0: poison(state[0]), 1: state[1]})
                metrics = dict(metrics, loss=np.float32("nan"))
            return state, metrics

        return exploding

    monkeypatch.setattr(training, "compiled_train_step", patched)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    job, straight_run, exploding_step, tmp_path
):
    with pytest.raises(ckpt.NonFiniteLossError) as error:
        run(job.replace(checkpoint_every=1), str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert f"loss became nan at step {BLOWS_UP_AT}; stopped" in message
    assert f"last good checkpoint (step {BLOWS_UP_AT - 1}) is kept" in message
    assert ckpt.complete_steps(ckpt.checkpoints_dir(tmp_path)) == list(range(1, BLOWS_UP_AT))
    assert sorted(read_metrics(tmp_path)) == list(range(1, BLOWS_UP_AT))  # no NaN line
    model, _ = training.load_transformer(str(tmp_path))
    assert ckpt.tree_is_finite(nnx.state(model))


# ----------------------------------------------------------------------------- grids, export


def test_evals_write_a_sample_grid(job, straight_run, vqvae_dir, tokenizer_file, tmp_path, capsys):
    # Without a tokenizer: the first 4 validation captions, true images above their samples.
    eval_job = job.replace(eval_every=2)
    run(eval_job, str(tmp_path / "a"), vqvae=vqvae_dir, stop_after=2)
    grid = np.asarray(Image.open(tmp_path / "a" / "images" / "samples_0000002.png"))
    assert grid.shape == (2 * (32 + 2) + 2, 4 * (32 + 2) + 2, 3)

    # With one: the job's own captions, one row of samples; and no grid without a vqvae.
    run(eval_job, str(tmp_path / "b"), vqvae=vqvae_dir, tokenizer=tokenizer_file, stop_after=2)
    grid = np.asarray(Image.open(tmp_path / "b" / "images" / "samples_0000002.png"))
    assert grid.shape == (32 + 4, 4 * (32 + 2) + 2, 3)
    capsys.readouterr()
    run(eval_job, str(tmp_path / "c"), stop_after=2)
    assert "no --vqvae given: evaluations write no sample grids" in capsys.readouterr().err
    assert not (tmp_path / "c" / "images").exists()


def test_export_writes_a_loadable_bundle(straight_run, vqvae_dir, tokenizer_file, tmp_path):
    out = tmp_path / "bundle"
    code = main(
        [
            "export",
            "--workdir", str(straight_run[0]),
            "--vqvae", vqvae_dir,
            "--tokenizer", tokenizer_file,
            "--out", str(out),
            "--weights-dtype", "bfloat16",
        ]
    )  # fmt: skip
    assert code == 0
    bundle = load_bundle(out)
    model, step_dir = training.load_transformer(str(straight_run[0]))
    assert bundle.transformer.config == model.config
    assert bundle.meta["provenance"]["step"] == STEPS
    assert bundle.meta["provenance"]["eval"]["image_loss"] < 1.0
    assert bundle.meta["weights_dtype"] == "bfloat16"
    kernel = bundle.transformer.blocks[0].mlp.up.kernel[...]
    np.testing.assert_allclose(kernel, model.blocks[0].mlp.up.kernel[...], atol=2e-2)

    assert main(["export", "--workdir", str(straight_run[0]), "--vqvae", vqvae_dir,
                 "--tokenizer", tokenizer_file, "--out", str(out)]) == 2  # fmt: skip

    # Sampling defaults, the rerank default among them, are written with the bundle.
    tuned = training.export_workdir(
        str(straight_run[0]), vqvae=vqvae_dir, tokenizer=tokenizer_file, out=str(tmp_path / "b2"),
        sampling={"temperature": 0.5, "rerank_per_image": 3},
    )  # fmt: skip
    sampling = json.loads((tuned / "bundle.json").read_text())["sampling"]
    assert sampling["temperature"] == 0.5 and sampling["rerank_per_image"] == 3


# ----------------------------------------------------------------------------- CLI


def test_the_cli_lists_the_job_configs():
    assert set(dalle_cmd.CONFIG_NAMES) == set(training.JOBS)


@pytest.mark.parametrize(
    ("job_name", "vqvae_name"),
    [("shapes", "shapes64"), ("shapes-90min", "shapes64"), ("emoji", "emoji32")],
)
def test_the_demo_jobs_fit_their_vqvaes_and_their_recipes_encoded_captions(job_name, vqvae_name):
    model = training.get_job(job_name).model
    check_compatible(model, get_vqvae_config(vqvae_name))
    (encode,) = [step.argv for step in RECIPES[job_name]("w") if step.name == "encode"]
    parser = argparse.ArgumentParser()
    encode_cmd.add_arguments(parser)
    # The recipe's --text-length, else `train encode`'s own default.
    length = parser.parse_known_args(list(encode[1:]))[0].text_length
    assert model.text_length == length  # else `train dalle` refuses the recipe's encoded data


@pytest.mark.parametrize("command", ["dalle", "export"])
def test_help_documents_every_flag(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    flags = re.findall(r"^  (--[a-z-]+)", out, flags=re.M)
    assert len(flags) >= (12 if command == "dalle" else 5), out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--data", "{tmp}/nowhere"], r"no metadata\.json in '.*nowhere/train'"),
        (["--data", "{data}", "--mesh", "2,x"], r"--mesh '2,x': give three sizes"),
        (["--data", "{data}", "--mesh", "3,1,1"], r"mesh data=3 x fsdp=1 x tensor=1 needs 3"),
        (["--data", "{data}", "--batch-size", "12"], r"batch size 12 is not divisible by the 8"),
        (["--data", "{data}", "--stop-after", "0"], r"stop_after must be at least 1"),
    ],
)
def test_a_user_error_exits_2_with_one_line(flags, expected, data_dir, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path, data=data_dir) for f in flags]
    code = main(["dalle", "--config", "tiny", "--workdir", str(tmp_path / "w"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
