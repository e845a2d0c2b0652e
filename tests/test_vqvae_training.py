"""The stage-1 job (`dalle_jax.vqvae_training`, `train vqvae`) on shapes_world/tiny32.

One tiny straight run is shared by most tests: it is the reference that a killed-and-resumed
run, a one-device run and a run of another model are compared with. The step, init and eval
programs are compiled once per (config, mesh) and reused by every run of this module.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dalle_jax import checkpoint as ckpt
from dalle_jax import train_state
from dalle_jax import vqvae_training as vt
from dalle_jax.data import pipeline, registry
from dalle_jax.errors import UserError
from train import vqvae_cmd
from train.cli import main
from vqvae.errors import VQVAEInputError

DATASET = "shapes_world/tiny32"
STEPS = 12
RESUME_AFTER = 5
NON_TRAIN_METRICS = ("steps_per_s",)  # wall-clock, differs between any two runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("data"))
    registry.builder(DATASET, data_dir=directory).download_and_prepare()
    return directory


@pytest.fixture(scope="module")
def job(data_dir) -> vt.VQVAEJob:
    base = vt.get_job("tiny")
    return base.replace(
        data_dir=data_dir,
        train=dataclasses.replace(base.train, total_steps=STEPS),
        log_every=1,
        eval_every=1000,  # only the final eval
        checkpoint_every=6,
        eval_max_examples=16,
        grid_examples=4,
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
    """STEPS steps in one go on all 8 devices: (workdir, final eval metrics)."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, vt.train_and_evaluate(job, str(workdir))


def test_training_lowers_the_loss_and_writes_its_outputs(straight_run):
    workdir, final_eval = straight_run
    metrics = read_metrics(workdir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    losses = [metrics[step]["loss"] for step in range(1, STEPS + 1)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses

    assert ckpt.complete_steps(ckpt.checkpoints_dir(workdir)) == [6, 12]
    evals = read_metrics(workdir, split="validation")
    assert list(evals) == [STEPS]
    assert set(final_eval) == {"psnr", "codebook_usage", "perplexity", "judge_accuracy"}
    assert evals[STEPS]["psnr"] == pytest.approx(final_eval["psnr"])
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    png = workdir / "images" / f"reconstructions_{STEPS:07d}.png"
    from PIL import Image

    grid = np.asarray(Image.open(png))
    # 4 originals above their 4 reconstructions: 2 rows of 32 px cells with 2 px padding.
    assert grid.shape == (2 * (32 + 2) + 2, 4 * (32 + 2) + 2, 3)


def test_a_killed_run_resumes_with_identical_losses(job, straight_run, tmp_path):
    straight = read_metrics(straight_run[0])
    vt.train_and_evaluate(job, str(tmp_path), stop_after=RESUME_AFTER)
    assert ckpt.complete_steps(ckpt.checkpoints_dir(tmp_path)) == [RESUME_AFTER]
    assert sorted(read_metrics(tmp_path)) == list(range(1, RESUME_AFTER + 1))

    vt.train_and_evaluate(job, str(tmp_path))  # the same command again, in the same workdir
    resumed = read_metrics(tmp_path)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # Bit-identical, not just close: same next batch (the saved pipeline state), same noise
    # (fold_in(key, step)), same compiled program, and the restored state is exact.
    for step in range(RESUME_AFTER + 1, STEPS + 1):
        assert train_metrics(resumed[step]) == train_metrics(straight[step]), step
    assert read_metrics(tmp_path, "validation") == read_metrics(straight_run[0], "validation")


def test_one_device_matches_eight_devices(job, straight_run, tmp_path):
    eight = read_metrics(straight_run[0])
    steps = 4
    vt.train_and_evaluate(job, str(tmp_path), stop_after=steps, devices=jax.devices()[:1])
    one = read_metrics(tmp_path)
    assert sorted(one) == list(range(1, steps + 1))
    for step in one:
        # Same data and noise; only the order of the cross-device sums differs.
        assert one[step]["loss"] == pytest.approx(eight[step]["loss"], rel=1e-5), step
        assert one[step]["grad_norm"] == pytest.approx(eight[step]["grad_norm"], rel=1e-4), step
        assert one[step]["codebook_usage"] == eight[step]["codebook_usage"], step


def test_the_batch_is_split_over_the_data_axis():
    mesh = vt.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count() == 8
    local = np.arange(16 * 2, dtype=np.int32).reshape(16, 2)
    batch = vt.global_batch(local, mesh)
    shards = sorted(batch.addressable_shards, key=lambda s: s.index[0].start)
    assert len({s.device for s in shards}) == 8
    assert [np.asarray(s.data).tolist() for s in shards] == [
        local[2 * i : 2 * i + 2].tolist() for i in range(8)
    ]
    whole = vt.shard_whole_batch(local, mesh)
    assert whole.sharding == batch.sharding
    np.testing.assert_array_equal(np.asarray(whole), local)
    with pytest.raises(UserError, match="not divisible by the 8 devices"):
        vt.check_batch_divides(12, mesh)


def test_steps_compile_once_per_config(job, straight_run):
    # The straight run and the resumed run (two invocations) all used one compiled step: the
    # state comes back with the shardings it went in with, and the program is cached per config.
    step_fn = vt.compiled_train_step(job.model, job.train, vt.data_mesh())
    assert step_fn._cache_size() == 1


def test_a_run_with_a_window_phase_resumes_identically_across_the_phase_switch(job, tmp_path):
    # Windows of 16 px for the first 6 steps, then whole 32 px images; killed inside the window
    # phase, resumed with the same command.
    cropped = job.replace(train=dataclasses.replace(job.train, crop_size=16, crop_steps=6))
    straight = tmp_path / "straight"
    vt.train_and_evaluate(cropped, str(straight))
    killed = tmp_path / "killed"
    vt.train_and_evaluate(cropped, str(killed), stop_after=4)
    vt.train_and_evaluate(cropped, str(killed))
    expected, resumed = read_metrics(straight), read_metrics(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert train_metrics(resumed[step]) == train_metrics(expected[step]), step
    assert read_metrics(killed, "validation") == read_metrics(straight, "validation")
    # One program per phase, each compiled once for both invocations.
    mesh = vt.data_mesh()
    for crop in (True, False):
        assert vt.compiled_train_step(cropped.model, cropped.train, mesh, crop)._cache_size() == 1


def test_eval_pads_the_last_batch_instead_of_recompiling(job, straight_run, data_dir):
    model = vt.load_vqvae(str(straight_run[0]))
    split = pipeline.open_split(DATASET, "validation", data_dir=data_dir)
    mesh = vt.data_mesh()
    eval_fn = vt.compiled_eval_step(job.model, mesh)
    compiled = eval_fn._cache_size()
    kwargs = dict(image_size=32, max_examples=20, mesh=mesh, grid_examples=0)
    padded, _ = vt.evaluate(model, split, batch_size=8, **kwargs)  # 8 + 8 + 4 (padded)
    whole, grid = vt.evaluate(model, split, batch_size=24, **kwargs)  # 20 (padded)
    assert grid is None
    assert padded == pytest.approx(whole, rel=1e-5)
    assert padded["codebook_usage"] == whole["codebook_usage"]
    assert eval_fn._cache_size() - compiled <= 2  # batch 8 and batch 24, short batches padded
    # Batch sizes are rounded up to a multiple of the device count.
    odd, _ = vt.evaluate(model, split, batch_size=3, **kwargs)
    assert odd == pytest.approx(whole, rel=1e-5)


def test_a_workdir_of_another_model_refuses_to_resume(job, straight_run):
    workdir = straight_run[0]
    other = job.replace(model=dataclasses.replace(job.model, codebook_size=16))
    with pytest.raises(UserError) as error:
        vt.train_and_evaluate(other, str(workdir))
    message = str(error.value)
    assert "\n" not in message
    assert "model.codebook_size 32 (checkpoint) vs 16 (config)" in message
    assert ckpt.complete_steps(ckpt.checkpoints_dir(workdir)) == [6, 12]


def test_training_settings_may_change_on_resume(job, straight_run, tmp_path):
    # --init: weights of the finished run, but a run of its own from step 0.
    vt.train_and_evaluate(job, str(tmp_path), init=str(straight_run[0]), stop_after=1)
    assert ckpt.complete_steps(ckpt.checkpoints_dir(tmp_path)) == [1]
    assert sorted(read_metrics(tmp_path)) == [1]
    # Trained weights, fresh optimizer: the first loss is the trained run's, not a fresh one's.
    straight = read_metrics(straight_run[0])
    assert read_metrics(tmp_path)[1]["loss"] < 0.8 * straight[1]["loss"]
    assert read_metrics(tmp_path)[1]["learning_rate"] == straight[1]["learning_rate"]
    # Logging, eval and checkpoint intervals are not part of what the weights mean.
    vt.train_and_evaluate(job.replace(log_every=2, checkpoint_every=2), str(tmp_path), stop_after=2)
    assert ckpt.complete_steps(ckpt.checkpoints_dir(tmp_path)) == [1, 2, 3]
    assert sorted(read_metrics(tmp_path)) == [1, 2, 3]


def test_decoder_fine_tuning_starts_from_a_trained_run_and_keeps_its_ids(
    job, straight_run, data_dir, tmp_path
):
    trained_dir = straight_run[0]
    fine_tune = job.replace(train=dataclasses.replace(job.train, train_decoder_only=True))
    # Not where the trained run is: its optimizer holds the whole model's state.
    with pytest.raises(UserError, match="holds a full vqvae training run, not this one; "):
        vt.train_and_evaluate(fine_tune, str(trained_dir))
    workdir = tmp_path / "decoder"
    final = vt.train_and_evaluate(fine_tune, str(workdir), init=str(trained_dir))
    assert final["codebook_usage"] > 0
    # A fine-tuning workdir goes on only as one.
    longer = dataclasses.replace(job.train, total_steps=STEPS + 1)
    with pytest.raises(UserError, match="add --train-decoder-only to continue it"):
        vt.train_and_evaluate(job.replace(train=longer), str(workdir))

    split = pipeline.open_split(DATASET, "validation", data_dir=data_dir)
    loader = pipeline.LoaderConfig.eval(16)
    batch = next(
        iter(pipeline.image_text_dataset(split.source, split.normalize, loader, image_size=32))
    )
    trained, tuned = vt.load_vqvae(str(trained_dir)), vt.load_vqvae(str(workdir))
    encode = nnx.jit(lambda model, x: model.encode_ids(x / 255.0))
    np.testing.assert_array_equal(encode(tuned, batch["images"]), encode(trained, batch["images"]))
    decode = nnx.jit(lambda model, x: model.decode_ids(model.encode_ids(x / 255.0)))
    assert not np.allclose(decode(tuned, batch["images"]), decode(trained, batch["images"]))


def _checkpoint_steps_all_finite(workdir) -> list[int]:
    steps = ckpt.complete_steps(ckpt.checkpoints_dir(workdir))
    for step in steps:
        model = vt.load_vqvae(str(ckpt.checkpoints_dir(workdir) / str(step)))
        assert ckpt.tree_is_finite(nnx.state(model)), step
    return steps


BLOWS_UP_AT = 3  # the step whose update turns the weights (and its loss) to NaN


@pytest.fixture
def exploding_step(monkeypatch):
    """Patches the loop's train step: from step BLOWS_UP_AT on, weights and loss become NaN
    (what a too-large learning rate does, without compiling another step for it)."""
    real = vt.compiled_train_step
    poison = jax.jit(lambda tree: jax.tree.map(lambda x: x * np.float32("nan"), tree))

    def patched(model_config, train_config, mesh, crop=False):
        step_fn = real(model_config, train_config, mesh, crop)

        def exploding(state, images, step, key):
            state, metrics = step_fn(state, images, step, key)
            if int(step) + 1 >= BLOWS_UP_AT:
                state = nnx.State({0: poison(state[0]), 1: state[1]})
                metrics = dict(metrics, loss=np.float32("nan"))
            return state, metrics

        return exploding

    monkeypatch.setattr(vt, "compiled_train_step", patched)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(
    job, exploding_step, tmp_path
):
    job = job.replace(checkpoint_every=1)
    with pytest.raises(ckpt.NonFiniteLossError) as error:
        vt.train_and_evaluate(job, str(tmp_path / "logged"))
    message = str(error.value)
    assert "\n" not in message
    assert f"loss became nan at step {BLOWS_UP_AT}; stopped" in message
    assert f"last good checkpoint (step {BLOWS_UP_AT - 1}) is kept" in message
    assert _checkpoint_steps_all_finite(tmp_path / "logged") == list(range(1, BLOWS_UP_AT))
    assert sorted(read_metrics(tmp_path / "logged")) == list(range(1, BLOWS_UP_AT))  # no NaN line

    # Between log steps, the save itself refuses weights that are no longer finite.
    with pytest.raises(ckpt.NonFiniteLossError) as error:
        vt.train_and_evaluate(job.replace(log_every=1000), str(tmp_path / "unlogged"))
    assert f"weights became nan or inf (not saved) at step {BLOWS_UP_AT}" in str(error.value)
    assert _checkpoint_steps_all_finite(tmp_path / "unlogged") == list(range(1, BLOWS_UP_AT))


def test_images_of_the_wrong_size_name_the_expected_shape(job):
    mesh = vt.data_mesh()
    _, abstract_state = nnx.split(nnx.eval_shape(lambda: vt._init(job.model, job.train)))
    tree = vt.compiled_init(job.model, job.train, mesh)()
    state = train_state.step_state(vt.train_graphdef(job.model, job.train), abstract_state, tree)
    step_fn = vt.compiled_train_step(job.model, job.train, mesh)
    images = vt.global_batch(np.zeros((8, 16, 16, 3), np.uint8), mesh)
    expected = r"expected images \[B, 32, 32, 3\], got \[8, 16, 16, 3\]; resize to 32x32"
    with pytest.raises(VQVAEInputError, match=expected):
        step_fn(state, images, np.int32(0), jax.random.key(0))


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vqvae", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    parser = argparse.ArgumentParser()
    vqvae_cmd.add_arguments(parser)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) == 23  # 18 of its own, --folder/--image-size, 3 multi-process
    for action in flags:
        assert action.option_strings[0] in out
        assert action.help and len(action.help) > 10, action.option_strings
    assert set(vqvae_cmd.CONFIG_NAMES) == set(vt.JOBS)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--batch-size", "12"], "batch size 12 is not divisible by the 8 devices"),
        (["--log-every", "0"], "log_every must be at least 1"),
        (["--data-dir", "{empty}"], "is not prepared in"),
        (["--steps", "3"], "warmup_steps (5) must be below total_steps (3)"),
        (["--config", "base"], "dataset 'image_folder' needs --folder DIR"),
        (["--folder", "{empty}"], "--folder: image_folder only, but the dataset is 'shapes_world"),
        (["--image-size", "32"], "--image-size: image_folder only"),
        (["--train-decoder-only"], "fine-tunes the decoder of a trained vqvae: pass its workdir"),
        (["--crop-steps", "5"], "crop_steps (5) needs a crop_size"),
        (
            ["--crop-size", "14", "--crop-steps", "5"],
            "crop_size 14 must be a multiple of the downsampling factor 4",
        ),
        # The base job reads your folder at 256 px: it says how to prepare it.
        (
            ["--config", "base", "--folder", "{empty}"],
            "run `train data --dataset image_folder/256 --folder ",
        ),
    ],
)
def test_a_user_error_exits_2_with_one_line(flags, expected, tmp_path, capsys, data_dir):
    flags = [f.replace("{empty}", str(tmp_path / "empty")) for f in flags]
    argv = ["vqvae", "--config", "tiny", "--workdir", str(tmp_path / "run"), *flags]
    if "--data-dir" not in flags:
        argv += ["--data-dir", data_dir]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err and "Traceback" not in err


# --------------------------------------------------------------------------- your own images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[str, str]:
    """(folder of 20 captioned 40x48 images, data dir where `train data` prepared it at 32)."""
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(20):
        blocks = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        image = np.kron(blocks, np.ones((8, 8, 1), np.uint8))  # 40x48, coarse blocks
        Image.fromarray(image).save(folder / f"picture_{i:02d}.png")
        (folder / f"picture_{i:02d}.txt").write_text(f"picture number {i}")
    data_dir = tmp_path_factory.mktemp("folder_data")
    flags = ["--folder", str(folder), "--image-size", "32", "--data-dir", str(data_dir)]
    assert main(["data", "--dataset", "image_folder", *flags]) == 0
    return str(folder), str(data_dir)


def test_trains_and_resumes_on_an_image_folder(image_folder, job, straight_run, tmp_path):
    folder, data_dir = image_folder
    workdir = tmp_path / "run"
    argv = [
        "vqvae", "--config", "tiny", "--workdir", str(workdir), "--data-dir", data_dir,
        "--dataset", "image_folder", "--folder", folder, "--image-size", "32",
        "--steps", str(STEPS), "--log-every", "1", "--eval-every", "2",
    ]  # fmt: skip
    assert main([*argv, "--stop-after", "2"]) == 0
    assert main([*argv, "--stop-after", "1"]) == 0  # resumes: the folder is part of the job
    assert sorted(read_metrics(workdir)) == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in read_metrics(workdir).values())
    evals = read_metrics(workdir, "validation")  # the folder's own held-out images
    assert list(evals) == [2] and np.isfinite(evals[2]["psnr"])

    step_dir = ckpt.checkpoints_dir(workdir) / "3"
    saved_job = ckpt.read_json_item(step_dir)["job"]
    assert saved_job["dataset"] == "image_folder"
    assert saved_job["builder_kwargs"] == {"folder": folder, "image_size": 32}
    data_state = ckpt.read_json_item(step_dir, ckpt.DATA_ITEM)
    assert data_state["pipeline"]["source"] == "image_folder:train"
    assert data_state["pipeline"]["num_examples"] == 19  # 20 images, 1 held out


def test_loading_a_vqvae_uses_no_deprecated_state_api(straight_run):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vt.load_vqvae(str(straight_run[0]))
    deprecated = [str(w.message) for w in caught if "to_pure_dict" in str(w.message)]
    assert not deprecated, deprecated
