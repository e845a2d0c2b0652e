"""The contrastive reranker (`dalle_jax.reranker`), its training job (`dalle_jax.reranker_training`)
and `train reranker`.

Pure functions are checked on hand-built embeddings; score/rerank/r_precision on a tiny model
trained here in a few seconds to tell solid colours apart; the job on shapes_world/tiny32 with
8 fake devices: a straight run, a killed-and-resumed run finished through the CLI, and loading.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import checkpoint as ckpt
from dalle_jax import reranker as rr
from dalle_jax import reranker_training as rt
from dalle_jax.data import pipeline, registry
from dalle_jax.errors import UserError
from dalle_jax.tokenizer import TextTokenizer, train_tokenizer
from dalle_jax.vqvae_training import data_mesh, global_batch
from train.cli import main

DATASET = "shapes_world/tiny32"
STEPS = 60
RESUME_AFTER = 25

# ----------------------------------------------------------------------------- config


def test_config_round_trips_through_json_and_rejects_bad_shapes():
    config = rr.get_config("small", tokenizer_sha256="ab" * 32)
    assert rr.RerankerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(UserError, match="divisible by 16"):
        rr.get_config("small", image_size=40)
    with pytest.raises(UserError, match="text_heads"):
        rr.get_config("tiny", text_heads=3)
    with pytest.raises(UserError, match="unknown keys"):
        rr.RerankerConfig.from_dict({**config.to_dict(), "depth": 3})
    with pytest.raises(UserError, match="unknown reranker config"):
        rr.get_config("huge")


# ----------------------------------------------------------------------------- pure math


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_info_nce_is_lower_for_aligned_than_for_shuffled_pairs():
    rng = np.random.default_rng(0)
    image_emb = jnp.asarray(_unit(rng.normal(size=(16, 8))))
    aligned, terms = rr.info_nce_loss(image_emb, image_emb, 10.0)
    shuffled, shuffled_terms = rr.info_nce_loss(image_emb, image_emb[::-1], 10.0)
    assert float(aligned) < float(shuffled)
    assert float(terms["batch_top1"]) == 1.0
    assert float(shuffled_terms["batch_top1"]) < 0.5
    # Symmetric: the two directions agree when the similarity matrix is symmetric.
    assert float(terms["loss_image_to_text"]) == pytest.approx(float(terms["loss_text_to_image"]))


def test_identical_captions_are_positives_of_each_other():
    text_ids = jnp.asarray([[5, 6, 0], [5, 6, 0], [7, 0, 0], [5, 0, 0]], jnp.int32)
    mask = np.asarray(rr.same_caption_mask(text_ids))
    expected = np.eye(4, dtype=bool)
    expected[0, 1] = expected[1, 0] = True
    np.testing.assert_array_equal(mask, expected)
    # Pairs 0 and 1 are twins: the same caption (and images it fits equally). Without the mask
    # the loss is lower when the twins' embeddings are pulled apart (each twin is a negative of
    # the other); with it, keeping them together is the better solution.
    together = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32)
    apart = together.copy()
    apart[1] = [0, 0, 0, 1]
    mask = jnp.asarray(mask)

    def loss(emb, positives=None):
        return float(rr.info_nce_loss(jnp.asarray(emb), jnp.asarray(emb), 20.0, positives)[0])

    assert loss(apart) < loss(together)
    assert loss(together, mask) < loss(apart, mask)


def test_retrieval_metrics_on_hand_built_embeddings():
    image_emb = np.eye(4, dtype=np.float32)
    # Image 0 picks caption 0, its own; image 1 picks caption 0 too, the twin of its own
    # caption 1; image 2 picks caption 3 and image 3 caption 2, both of other texts.
    text_emb = _unit(
        np.array(
            [[1, 1, 0, 0], [0.6, 0.5, 0.62, 0], [0, 0, 0.2, 1], [0, 0, 1, 0.1]], dtype=np.float32
        )
    )
    captions = ["a red circle", "a red circle", "a blue square", "a green diamond"]
    metrics = rr.retrieval_metrics(image_emb, text_emb, captions)
    assert metrics["top1"] == pytest.approx(1 / 4)  # only image 0 picks its own index
    assert metrics["top1_text"] == pytest.approx(2 / 4)  # image 1's pick is its twin
    assert metrics["top5"] == 1.0 and metrics["top5_text"] == 1.0  # 4 captions: all in top 5
    # Text ids work as caption keys too.
    ids = np.array([[4, 5], [4, 5], [6, 7], [8, 9]])
    assert rr.retrieval_metrics(image_emb, text_emb, ids)["top1_text"] == pytest.approx(2 / 4)
    assert "top1_text" not in rr.retrieval_metrics(image_emb, text_emb)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("data"))
    registry.builder(DATASET, data_dir=directory).download_and_prepare()
    return directory


@pytest.fixture(scope="module")
def tokenizer_file(data_dir, tmp_path_factory) -> str:
    split = pipeline.open_split(DATASET, "train", data_dir=data_dir)
    captions = [split.normalize(split.source[i], i)["caption"] for i in range(len(split.source))]
    path = tmp_path_factory.mktemp("tokenizer") / "shapes.model"
    path.write_bytes(train_tokenizer(captions, 200, "bpe"))
    return str(path)


@pytest.fixture(scope="module")
def job(data_dir, tokenizer_file) -> rt.RerankerJob:
    base = rt.get_job("tiny")
    return base.replace(
        data_dir=data_dir,
        tokenizer=tokenizer_file,
        train=dataclasses.replace(base.train, total_steps=STEPS),
        log_every=5,
        eval_every=1000,  # only the final eval
        checkpoint_every=1000,  # only the final (or stop_after) checkpoint
    )


# ----------------------------------------------------------------------------- a toy model

COLOURS = np.array([[220, 30, 30], [30, 170, 50], [30, 70, 230], [245, 215, 20]], np.uint8)
COLOUR_IDS = np.array([[5, 9, 0, 0], [6, 9, 0, 0], [7, 9, 0, 0], [8, 9, 0, 0]], np.int32)


def _colour_batch(rng, count):
    colours = rng.integers(0, len(COLOURS), size=count)
    noise = rng.integers(-20, 21, size=(count, 32, 32, 3))
    images = np.clip(COLOURS[colours][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, COLOUR_IDS[colours]


@pytest.fixture(scope="module")
def colour_model(job):
    """The tiny job's reranker trained a few seconds to match solid colours with their "words".

    Same configs and mesh as the job, so the job's runs reuse this fixture's compiled step.
    """
    tokenizer = TextTokenizer.from_file(job.tokenizer)
    resolved = rt.resolve_job(job, tokenizer, image_size=32)
    model_config, train_config = resolved.model, resolved.train
    mesh = data_mesh()
    state = rt.fresh_train_state(model_config, train_config, mesh)
    step_fn = rt.compiled_train_step(model_config, train_config, mesh)
    rng = np.random.default_rng(0)
    for step in range(train_config.total_steps):
        images, text_ids = _colour_batch(rng, train_config.batch_size)
        batch = global_batch(images, mesh), global_batch(text_ids, mesh)
        state, _ = step_fn(state, *batch, jnp.int32(step))
    return rt.model_of(state, model_config, train_config)


def test_embeddings_are_unit_norm_and_ignore_padding(colour_model):
    rng = np.random.default_rng(1)
    images, text_ids = _colour_batch(rng, 6)
    image_emb = rr.image_embeddings(colour_model, images)
    text_emb = rr.text_embeddings(colour_model, text_ids)
    assert image_emb.shape == text_emb.shape == (6, colour_model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-4)
    # The sampler's id blocks may be shorter or longer than the reranker's text_length.
    longer = np.pad(text_ids, ((0, 0), (0, 40)))
    np.testing.assert_allclose(rr.text_embeddings(colour_model, longer), text_emb, atol=1e-5)
    # An all-padding caption (the unconditional prompt) still embeds to finite numbers.
    assert np.all(np.isfinite(rr.text_embeddings(colour_model, np.zeros((1, 8), np.int32))))


def test_score_and_rerank_pick_the_matching_image(colour_model):
    images = np.repeat(np.repeat(COLOURS[:, None, None, :], 32, 1), 32, 2)  # [4, 32, 32, 3]
    matched = rr.score(colour_model, images, COLOUR_IDS)
    assert matched.dtype == np.float32 and matched.shape == (4,)
    for colour in range(4):
        order = rr.rerank(colour_model, images, COLOUR_IDS[colour], keep=2)
        assert order.shape == (2,) and order[0] == colour, (colour, order)
        one_prompt = rr.score(colour_model, images, COLOUR_IDS[colour : colour + 1])
        assert one_prompt[colour] == pytest.approx(matched[colour], abs=1e-5)
        assert np.argmax(one_prompt) == colour
    with pytest.raises(UserError, match="keep"):
        rr.rerank(colour_model, images, COLOUR_IDS[0], keep=5)
    # Images of another size are resized, not refused.
    small = images[:, ::2, ::2]
    assert rr.rerank(colour_model, small, COLOUR_IDS[2], keep=1)[0] == 2


def test_r_precision_counts_true_captions_beating_distractors(colour_model):
    rng = np.random.default_rng(2)
    images, true_ids = _colour_batch(rng, 12)
    # The pool holds every colour word (in shorter rows: padding aside, the same captions);
    # each image's own is skipped, leaving 3 distractors.
    pool = COLOUR_IDS[:, :2]
    assert rr.r_precision(colour_model, images, true_ids, pool, k=4) == 1.0
    # Wrong "true" captions (the next colour) lose to the right one, which is now a distractor.
    wrong = COLOUR_IDS[(np.argmax(true_ids[:, 0:1] == COLOUR_IDS[:, 0], axis=1) + 1) % 4]
    assert rr.r_precision(colour_model, images, wrong, pool, k=4) == 0.0
    with pytest.raises(UserError, match="distractors"):
        rr.r_precision(colour_model, images, true_ids, pool, k=5)


def test_weights_round_trip_through_a_pure_dict(colour_model):
    state = nnx.to_pure_dict(nnx.state(colour_model))
    state16 = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), state)  # as a bundle may store
    restored = rr.reranker_from_state(colour_model.config, state16)
    images = np.repeat(np.repeat(COLOURS[:, None, None, :], 32, 1), 32, 2)
    np.testing.assert_allclose(
        rr.score(restored, images, COLOUR_IDS),
        rr.score(colour_model, images, COLOUR_IDS),
        atol=0.05,
    )
    with pytest.raises(UserError, match="another model"):
        rr.reranker_from_state(rr.get_config("tiny", text_vocab_size=17), state)


# ----------------------------------------------------------------------------- the job


def read_metrics(workdir, split="train") -> dict[int, dict]:
    """step -> the last logged record of that step (a resumed run's lines come later)."""
    records = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == split:
            records[record["step"]] = record
    return records


@pytest.fixture(scope="module")
def straight_run(job, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, rt.train_and_evaluate(job, str(workdir))


def test_training_raises_retrieval_above_chance(straight_run):
    workdir, final_eval = straight_run
    assert final_eval["group"] == 64 and final_eval["examples"] == 64  # tiny32: 64 validation
    chance_top1, chance_top5 = 1 / 64, 5 / 64
    assert final_eval["top1"] > 2 * chance_top1, final_eval
    assert final_eval["top5"] > 2 * chance_top5, final_eval
    assert final_eval["top1_text"] >= final_eval["top1"]
    # The tiny job swaps shapes_world's words: its hard negatives are in the loss and logged.
    assert 0 <= read_metrics(workdir)[STEPS]["hard_negative_top1"] <= 1
    losses = [r["loss"] for _, r in sorted(read_metrics(workdir).items())]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert read_metrics(workdir, "validation")[STEPS]["top1"] == final_eval["top1"]
    assert ckpt.complete_steps(ckpt.checkpoints_dir(workdir)) == [STEPS]
    assert (workdir / rt.TOKENIZER_FILENAME).is_file()


def test_a_killed_run_resumes_through_the_cli(job, straight_run, tmp_path, capsys):
    rt.train_and_evaluate(job, str(tmp_path), stop_after=RESUME_AFTER)
    assert ckpt.complete_steps(ckpt.checkpoints_dir(tmp_path)) == [RESUME_AFTER]
    # The same run again from the command line; the tokenizer comes from the workdir's copy.
    argv = ["reranker", "--config", "tiny", "--workdir", str(tmp_path), "--steps", str(STEPS)]
    argv += ["--data-dir", job.data_dir, "--log-every", "5", "--eval-every", "1000"]
    argv += ["--checkpoint-every", "1000"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "validation retrieval" in out and "final_eval" in out
    resumed, straight = read_metrics(tmp_path), read_metrics(straight_run[0])
    assert sorted(resumed) == sorted(straight)
    for step in range(RESUME_AFTER + 5, STEPS + 1, 5):
        # Same next batch (the saved pipeline state), same program, exact restored state.
        assert resumed[step]["loss"] == straight[step]["loss"], step
    assert read_metrics(tmp_path, "validation") == read_metrics(straight_run[0], "validation")


def test_load_reranker_gives_the_trained_model(job, straight_run, data_dir):
    workdir, final_eval = straight_run
    model, config = rt.load_reranker(str(workdir))
    tokenizer = rt.load_reranker_tokenizer(str(workdir))
    assert config.image_size == 32 and config.text_vocab_size == tokenizer.vocab_size
    rr.check_tokenizer(config, tokenizer)
    split = pipeline.open_split(DATASET, "validation", data_dir=data_dir)
    again = rt.evaluate(model, split, tokenizer, group=100, max_examples=64)
    assert again["top1"] == pytest.approx(final_eval["top1"])
    with pytest.raises(UserError, match="no complete checkpoint"):
        rt.load_reranker(str(workdir / "tb"))


def test_a_workdir_refuses_another_tokenizer(job, straight_run, tmp_path):
    workdir, _ = straight_run
    other = tmp_path / "other.model"
    other.write_bytes(train_tokenizer(["a red circle", "a blue square at the top"] * 20, 30))
    with pytest.raises(UserError, match="different model"):
        rt.train_and_evaluate(job.replace(tokenizer=str(other)), str(workdir))
    with pytest.raises(UserError, match="another tokenizer|tokenizer of"):
        rr.check_tokenizer(rt.load_reranker(str(workdir))[1], TextTokenizer.from_file(other))


def test_cli_help_and_user_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["reranker", "--help"])
    assert exit_info.value.code == 0
    assert "--tokenizer" in capsys.readouterr().out
    # No tokenizer given and none in the (new) workdir: a one-line error, exit 2.
    assert main(["reranker", "--config", "tiny", "--workdir", str(tmp_path / "new")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--folder", "{tmp}"], "--folder: image_folder only, but the dataset is 'shapes_world"),
        (["--dataset", "image_folder"], "dataset 'image_folder' needs --folder DIR"),
    ],
)
def test_folder_flags_name_an_image_folder_only(flags, expected, tokenizer_file, tmp_path, capsys):
    argv = ["reranker", "--config", "tiny", "--workdir", str(tmp_path / "run")]
    argv += ["--tokenizer", tokenizer_file, *(f.format(tmp=tmp_path) for f in flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_trains_and_resumes_on_an_image_folder(tokenizer_file, tmp_path, capsys):
    from PIL import Image

    # 100 captioned 40x48 pictures (2 held out for validation), prepared at 32 px.
    folder, data_dir = tmp_path / "pictures", tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(100):
        colour = COLOURS[i % len(COLOURS)]
        Image.fromarray(np.broadcast_to(colour, (40, 48, 3))).save(folder / f"p{i:03d}.png")
        name = ("red", "green", "blue", "yellow")[i % len(COLOURS)]
        (folder / f"p{i:03d}.txt").write_text(f"a {name} square {rng.integers(9)}")
    flags = ["--dataset", "image_folder", "--folder", str(folder), "--image-size", "32"]
    flags += ["--data-dir", str(data_dir)]
    assert main(["data", *flags]) == 0
    workdir = tmp_path / "run"
    argv = ["reranker", "--config", "tiny", "--workdir", str(workdir), *flags]
    argv += ["--tokenizer", tokenizer_file, "--steps", "4", "--warmup-steps", "1"]
    argv += ["--batch-size", "8"]
    argv += ["--log-every", "1", "--eval-every", "1000", "--checkpoint-every", "1000"]
    assert main([*argv, "--stop-after", "2"]) == 0
    assert main(argv) == 0  # resumes: the folder is part of the job
    assert sorted(read_metrics(workdir)) == [1, 2, 3, 4]
    final = read_metrics(workdir, "validation")[4]
    assert final["group"] == 2 and final["examples"] == 2  # the folder's own held-out images
    saved_job = ckpt.read_json_item(ckpt.checkpoints_dir(workdir) / "4")["job"]
    assert saved_job["dataset"] == "image_folder"
    assert saved_job["builder_kwargs"] == {"folder": str(folder), "image_size": 32}
    assert rt.load_reranker(str(workdir))[1].image_size == 32


def test_the_cli_offers_every_reranker_job():
    # The CLI lists the job names without importing jax; the list must follow JOBS.
    from train.reranker_cmd import CONFIG_NAMES

    assert set(CONFIG_NAMES) == set(rt.JOBS)


def test_training_on_vqvae_reconstructions(job, tmp_path, capsys):
    from test_training import write_vqvae_workdir

    from vqvae.config import get_config as get_vqvae_config

    # Zero weights decode every image to the same mid-grey (sigmoid(0) -> 128).
    vqvae_dir = write_vqvae_workdir(tmp_path / "vqvae", get_vqvae_config("tiny"))
    reconstruct = rt.reconstructor(job.replace(vqvae=vqvae_dir), 32, data_mesh())
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(reconstruct(jnp.asarray(images))), 128)
    assert rt.reconstructor(job, 32, data_mesh()) is None
    with pytest.raises(UserError, match="works on 32px images but the reranker trains at 64px"):
        rt.reconstructor(job.replace(vqvae=vqvae_dir), 64, data_mesh())

    # Through the CLI: the training step sees the reconstructions, so with every image the
    # same grey no image can pick its own caption (chance is about 1 in 32).
    argv = ["reranker", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--steps", "10"]
    argv += ["--data-dir", job.data_dir, "--tokenizer", job.tokenizer, "--vqvae", vqvae_dir]
    argv += ["--log-every", "5", "--eval-every", "1000", "--eval-examples", "32"]
    assert main(argv) == 0
    capsys.readouterr()
    logged = read_metrics(tmp_path / "w")
    assert max(logged[step]["batch_top1"] for step in (5, 10)) < 0.25, logged
    # What the workdir was trained on includes the vqvae: resuming without it is refused.
    with pytest.raises(UserError, match="vqvae"):
        rt.train_and_evaluate(job, str(tmp_path / "w"))
