"""`dalle_jax.evaluation.evaluate` and the `evaluate` command, on shapes_world/tiny32 prepared in
a temporary folder and a tiny random-init 32 px bundle (with a reranker) built here.

The bundle is untrained: the end-to-end tests check plumbing, structure and contracts; the
metric functions are checked on inputs whose answer is known.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import reranker as rr
from dalle_jax.bundle import export_bundle, load_bundle
from dalle_jax.data import pipeline, registry
from dalle_jax.data.shapes_world.spec import parse_caption
from dalle_jax.errors import UserError
from dalle_jax.evaluation import evaluate as ev
from dalle_jax.generate import generate_images
from dalle_jax.model import DalleTransformer, get_config
from dalle_jax.model.loss import loss_fn
from dalle_jax.tokenizer import TextTokenizer, train_tokenizer
from sample.evaluate_cli import main
from vqvae.config import VQVAEConfig
from vqvae.model import create_model

DATASET = "shapes_world/tiny32"
OTHER_SIZE_DATASET = "shapes_world/tiny64"  # 64 px images: not what the 32 px bundle takes
VQVAE_32 = VQVAEConfig(
    name="test32",
    image_size=32,
    downsample_factor=8,  # a 4x4 id grid: the `tiny` transformer's
    base_channels=8,
    channel_multipliers=(1, 2, 2, 2),
    num_res_blocks=1,
    num_groups=4,
    codebook_size=32,
    code_dim=8,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("data"))
    for name in (DATASET, OTHER_SIZE_DATASET):
        registry.builder(name, data_dir=directory).download_and_prepare()
    return directory


@pytest.fixture(scope="module")
def heldout(data_dir) -> ev.SplitExamples:
    split = pipeline.open_split(DATASET, "test_heldout", data_dir=data_dir)
    return ev.load_examples(split, 1000, 32)


def _initial_state(make) -> dict:
    """A new model's weights as a pure dict, initialised in one compiled program: eager
    initialisers would each compile on their own (seconds on a busy 2-core machine)."""
    compiled = jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(make())),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    return compiled()


@pytest.fixture(scope="module")
def bundle_dir(data_dir, tmp_path_factory):
    """A random-init 32 px bundle whose tokenizer knows shapes_world's words, with a reranker."""
    split = pipeline.open_split(DATASET, "train", data_dir=data_dir)
    captions = [split.normalize(split.source[i], i)["caption"] for i in range(split.num_examples)]
    tokenizer_bytes = train_tokenizer(captions, vocab_size=64)
    vocab = TextTokenizer.from_bytes(tokenizer_bytes).vocab_size
    transformer_config = get_config("tiny", text_vocab_size=vocab, text_length=16)
    reranker_config = rr.get_config(
        "tiny", text_vocab_size=vocab, tokenizer_sha256=rr.tokenizer_sha256(tokenizer_bytes)
    )
    return export_bundle(
        tmp_path_factory.mktemp("bundles") / "tiny32",
        transformer_config=transformer_config,
        transformer_state=_initial_state(
            lambda: DalleTransformer(transformer_config, rngs=nnx.Rngs(0))
        ),
        vqvae_config=VQVAE_32,
        vqvae_state=_initial_state(lambda: create_model(VQVAE_32, seed=0)),
        tokenizer_bytes=tokenizer_bytes,
        sampling={"temperature": 1.0, "top_k": 16, "top_p": None, "cfg_scale": 1.0},
        reranker_config=reranker_config,
        reranker_state=_initial_state(lambda: rr.create_reranker(reranker_config)),
    )


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


# ---- the shapes judge ------------------------------------------------------------------------


def test_judge_metrics_score_true_renders_right_blank_images_wrong_and_a_mix_in_proportion(
    heldout,
):
    images, captions = heldout.images, heldout.captions
    perfect = ev.judge_metrics(images, captions)
    assert perfect["judge_accuracy"] == 1.0
    assert perfect["judge_color_accuracy"] == perfect["judge_shape_accuracy"] == 1.0
    requested = [len(parse_caption(c)) for c in captions]
    assert perfect["judge_objects"] == sum(requested)

    blank = ev.judge_metrics(np.zeros_like(images), captions)
    assert blank["judge_accuracy"] == 0.0 and blank["judge_objects"] == sum(requested)

    # First half true renders, second half blank: right = the first half's objects.
    half = len(images) // 2
    mixed = np.concatenate([images[:half], np.zeros_like(images[half:])])
    expected = sum(requested[:half]) / sum(requested)
    assert ev.judge_metrics(mixed, captions)["judge_accuracy"] == pytest.approx(expected)


def test_judge_attribute_accuracy_is_none_when_no_caption_asks_for_it(heldout):
    image = heldout.images[:1]
    scores = ev.judge_metrics(image, ["a red circle"])  # no size, no position
    assert scores["judge_size_accuracy"] is None and scores["judge_position_accuracy"] is None


# ---- R-precision, Fréchet distance, losses -----------------------------------------------------


def _one_hot(n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)


def test_r_precision_is_one_for_a_scorer_that_knows_the_answer_and_chance_for_a_random_one():
    captions = [f"caption {i}" for i in range(250)]
    knowing = ev.r_precision_metrics(_one_hot(250), _one_hot(250), captions)
    assert knowing == {
        "r_precision": 1.0,
        "r_precision_by_index": 1.0,
        "r_precision_group": 100,
        "r_precision_images": 200,  # the partial last group is left out
    }
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    captions = [f"caption {i}" for i in range(2000)]
    scores = [
        ev.r_precision_metrics(
            unit(rng.normal(size=(2000, 32))), unit(rng.normal(size=(2000, 32))), captions
        )["r_precision"]
        for _ in range(2)
    ]
    assert 0.0 <= np.mean(scores) < 0.03  # chance: 1 in 100


def test_r_precision_counts_an_identical_twin_prompt_as_right_but_not_by_index():
    captions = ["a red circle", "a blue square", "a red circle", "a green star"]
    emb = np.stack([_one_hot(3)[i] for i in (0, 1, 0, 2)])  # twins embed alike
    scores = ev.r_precision_metrics(emb, emb, captions)
    assert scores["r_precision"] == 1.0
    assert scores["r_precision_by_index"] == 0.75  # image 2 picks caption 0 (a tie, lower index)
    assert scores["r_precision_group"] == 4


def test_frechet_distance_is_zero_for_one_set_and_the_gaussian_formula_otherwise():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 4))
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert ev.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift**2), rel=1e-6)
    x, y = rng.normal(size=(400, 1)), 3.0 * rng.normal(size=(400, 1)) + 2.0
    sx, sy = np.std(x, ddof=1), np.std(y, ddof=1)
    expected = (x.mean() - y.mean()) ** 2 + (sx - sy) ** 2
    assert ev.frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_loss_metrics_turn_summed_nats_into_per_token_figures_and_bits():
    text_nll = np.array([8.0, 16.0])  # T = 4: 3 nats per text token
    image_nll = np.array([32.0, 32.0])  # N = 16: 2 nats per image token
    metrics = ev.loss_metrics(
        text_nll, image_nll, text_length=4, image_length=16, text_weight=0.25, image_weight=0.75
    )
    assert metrics["text_nats_per_token"] == 3.0
    assert metrics["image_nats_per_token"] == 2.0
    assert metrics["image_bits_per_dim"] == pytest.approx(2.0 / math.log(2.0))
    assert metrics["loss"] == pytest.approx(0.25 * 3.0 + 0.75 * 2.0)
    assert ev.bits_per_dim(math.log(2.0)) == pytest.approx(1.0)


def test_token_nll_matches_the_training_loss_without_dropout(bundle):
    config = bundle.transformer.config
    rng = np.random.default_rng(2)
    text_ids = rng.integers(1, config.text_vocab_size, (5, config.text_length), dtype=np.int32)
    image_ids = rng.integers(0, config.image_vocab_size, (5, config.image_length), dtype=np.int32)
    # 5 rows in batches of 4: the second batch is padded, and the padding must not count.
    text_nll, image_nll = ev.token_nll(bundle.transformer, text_ids, image_ids, batch_size=4)
    training_loss = nnx.jit(lambda model, batch: loss_fn(model, batch, None, train=False)[1])
    expected = training_loss(
        bundle.transformer, {"text_ids": jnp.asarray(text_ids), "image_ids": jnp.asarray(image_ids)}
    )
    metrics = ev.loss_metrics(
        text_nll,
        image_nll,
        text_length=config.text_length,
        image_length=config.image_length,
        text_weight=config.text_loss_weight,
        image_weight=config.image_loss_weight,
    )
    assert metrics["image_nats_per_token"] == pytest.approx(float(expected["image_loss"]), 1e-5)
    assert metrics["text_nats_per_token"] == pytest.approx(float(expected["text_loss"]), 1e-5)
    assert metrics["loss"] == pytest.approx(float(expected["loss"]), 1e-5)


# ---- arguments -------------------------------------------------------------------------------


def test_parse_splits_and_metric_groups():
    assert ev.parse_splits(" test, test_heldout ") == ["test", "test_heldout"]
    assert ev.parse_metric_groups(None) == ev.METRIC_GROUPS
    assert ev.parse_metric_groups("vqvae,judge") == ("judge", "vqvae")
    assert ev.parse_metric_groups("all", generate=False) == ("loss", "vqvae")
    for bad in (lambda: ev.parse_splits(","), lambda: ev.parse_splits("test,test")):
        with pytest.raises(UserError):
            bad()
    with pytest.raises(UserError, match="unknown metric group 'fid'"):
        ev.parse_metric_groups("fid")
    with pytest.raises(UserError, match="--no-generate"):
        ev.parse_metric_groups("judge,loss", generate=False)


# ---- the whole evaluation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(bundle, data_dir):
    return ev.evaluate_bundle(
        bundle,
        DATASET,
        "test,test_heldout",
        num_prompts=12,
        batch_size=8,  # 12 prompts: a full batch and a padded one
        data_dir=data_dir,
        progress=False,
    )


def evaluate_test_split(bundle, data_dir, metrics="judge,r_precision,fd", **kwargs):
    """`evaluate_bundle` on the first 12 prompts of `test`, as `report` draws them."""
    return ev.evaluate_bundle(
        bundle,
        DATASET,
        ["test"],
        num_prompts=12,
        batch_size=8,
        metrics=metrics,
        data_dir=data_dir,
        progress=False,
        **kwargs,
    )


def test_evaluate_bundle_reports_every_metric_for_each_split(report, bundle):
    assert report["splits"] == ["test", "test_heldout"]
    assert list(report["results"]) == ["test", "test_heldout"]
    assert report["settings"] == {"temperature": 1.0, "top_k": 16, "top_p": None, "cfg_scale": 1.0}
    assert report["bundle"] == str(bundle.path) and report["seed"] == 0
    assert report["num_prompts"] == 12 and report["wall_time_s"] > 0
    for result in report["results"].values():
        assert result["examples"] == 12 and result["absent"] == {}
        for key in ("judge_accuracy", "r_precision", "vqvae_codebook_usage"):
            assert 0.0 <= result[key] <= 1.0
        assert result["r_precision_group"] == 12  # fewer prompts than 100: one group of all
        assert result["reranker_fd"] >= 0.0 and result["vqvae_psnr"] > 0.0
        # A random model: about log2(32 codes) = 5 bits per image token, not 0 and not 50.
        assert 3.0 < result["image_bits_per_dim"] < 8.0
        assert result["image_bits_per_dim"] == pytest.approx(
            result["image_nats_per_token"] / math.log(2.0)
        )
        assert result["vqvae_judge_accuracy"] is not None
    assert any(
        "not comparable to Inception FID" in n.replace("NOT", "not") for n in report["notes"]
    )


def test_without_a_reranker_r_precision_is_absent_and_generation_is_the_same(
    report, bundle, data_dir
):
    no_reranker = dataclasses.replace(bundle, reranker=None)
    again = evaluate_test_split(no_reranker, data_dir)
    result = again["results"]["test"]
    assert result["r_precision"] is None and result["reranker_fd"] is None
    assert result["absent"] == {"r_precision": ev.NO_RERANKER, "reranker_fd": ev.NO_RERANKER}
    assert "image_bits_per_dim" not in result  # the loss group was not asked for
    # Same seed, same prompts: the same images, so the same judge figures.
    assert result["judge_accuracy"] == report["results"]["test"]["judge_accuracy"]
    table = ev.format_table(again)
    assert "n/a" in table and f"R-precision (reranker top-1): {ev.NO_RERANKER}" in table


class BrightestFirst:
    """The bundle's reranker for embeddings (R-precision, FD), but scoring by brightness, so
    that reranking picks a known candidate."""

    def __init__(self, reranker):
        self.model, self.tokenizer = reranker.model, reranker.tokenizer

    def score(self, images, prompts):
        return images.reshape(len(images), -1).mean(axis=1)


@pytest.fixture
def spies(monkeypatch):
    """The images the judge and the reranker's image embeddings see, in call order."""
    seen = {"judge": [], "embedded": []}
    judge, embed = ev.judge_metrics, rr.image_embeddings

    def judge_spy(images, captions):
        seen["judge"].append(np.array(images))
        return judge(images, captions)

    def embed_spy(model, images):
        seen["embedded"].append(np.array(images))
        return embed(model, images)

    monkeypatch.setattr(ev, "judge_metrics", judge_spy)
    monkeypatch.setattr(rr, "image_embeddings", embed_spy)
    return seen


def test_a_rerank_default_reranks_the_judges_images_and_not_r_precisions(
    report, bundle, data_dir, spies, tmp_path
):
    reranker = BrightestFirst(bundle.reranker)
    defaulted = dataclasses.replace(
        bundle, reranker=reranker, sampling={**bundle.sampling, "rerank_per_image": 3}
    )
    reranked_report = evaluate_test_split(defaulted, data_dir)
    examples = ev.load_examples(pipeline.open_split(DATASET, "test", data_dir=data_dir), 12, 32)
    drawn = lambda b, rerank: np.stack(  # noqa: E731
        [
            d[0]
            for d in generate_images(
                b, examples.captions, num_images=1, rerank=rerank, batch_size=8, progress=False
            )
        ]
    )
    best_of_3 = drawn(dataclasses.replace(bundle, reranker=reranker), 3)
    plain = drawn(bundle, 0)
    assert (best_of_3 != plain).any()
    # The judge scores the reranker's pick, then (reported apart) the images R-precision and
    # FD use: generated without reranking, the same ones as without a rerank default.
    assert len(spies["judge"]) == 2
    np.testing.assert_array_equal(spies["judge"][0], best_of_3)
    np.testing.assert_array_equal(spies["judge"][1], plain)
    np.testing.assert_array_equal(spies["embedded"][0], plain)
    np.testing.assert_array_equal(spies["embedded"][1], examples.images)  # FD's real images
    result, before = reranked_report["results"]["test"], report["results"]["test"]
    assert result["r_precision"] == before["r_precision"]
    assert result["reranker_fd"] == before["reranker_fd"]
    assert result["judge_accuracy_no_rerank"] == before["judge_accuracy"]
    assert (
        result["judge_accuracy"] == ev.judge_metrics(best_of_3, examples.captions)["judge_accuracy"]
    )
    # Recorded in the JSON and said in the table; without reranking nothing is doubled.
    saved = json.loads(ev.write_report(reranked_report, tmp_path).read_text())
    assert saved["rerank"] == 3 and "judge_accuracy_no_rerank" in saved["results"]["test"]
    assert saved["rerank_likelihood_weight"] == 0.0  # the bundle sets none
    assert report["rerank"] is None and "judge_accuracy_no_rerank" not in before
    table = ev.format_table(reranked_report)
    assert (
        "generated images: judge: the reranker's best of 3 per prompt; R-precision, FD, judge "
        "without reranking: one image per prompt, no reranking"
    ) in table
    assert any(line.startswith("shapes judge without reranking") for line in table.splitlines())
    assert table.count("generated images:") == 1
    assert "generated images: one per prompt, no reranking" in ev.format_table(report)


def test_the_judge_scores_the_pick_the_likelihood_weight_makes(bundle, data_dir, spies, tmp_path):
    weighted = dataclasses.replace(
        bundle,
        reranker=BrightestFirst(bundle.reranker),
        sampling={**bundle.sampling, "rerank_per_image": 3, "rerank_likelihood_weight": 2.0},
    )
    report = evaluate_test_split(weighted, data_dir, metrics="judge")
    examples = ev.load_examples(pipeline.open_split(DATASET, "test", data_dir=data_dir), 12, 32)
    picked = generate_images(
        weighted, examples.captions, num_images=1, rerank=3, batch_size=8, progress=False
    )
    brightest = generate_images(
        weighted, examples.captions, num_images=1, rerank=3, batch_size=8, progress=False,
        likelihood_weight=0,
    )  # fmt: skip
    (judged,) = spies["judge"]
    np.testing.assert_array_equal(judged, np.stack([d[0] for d in picked]))
    assert (judged != np.stack([d[0] for d in brightest])).any()  # the weight changed picks
    assert report["rerank_likelihood_weight"] == 2.0
    assert "(with the transformer's likelihood, weight 2)" in ev.format_table(report)


def test_rerank_0_turns_the_default_off_and_an_explicit_one_needs_a_reranker(
    bundle, data_dir, spies
):
    defaulted = dataclasses.replace(
        bundle,
        reranker=BrightestFirst(bundle.reranker),
        sampling={**bundle.sampling, "rerank_per_image": 3},
    )
    off = evaluate_test_split(defaulted, data_dir, metrics="judge", rerank=0)
    assert off["rerank"] is None and "judge_accuracy_no_rerank" not in off["results"]["test"]
    examples = ev.load_examples(pipeline.open_split(DATASET, "test", data_dir=data_dir), 12, 32)
    plain = generate_images(bundle, examples.captions, num_images=1, batch_size=8, progress=False)
    (judged,) = spies["judge"]
    np.testing.assert_array_equal(judged, np.stack([d[0] for d in plain]))
    # Checked before any split is opened (this one does not exist).
    no_reranker = dataclasses.replace(bundle, reranker=None)
    with pytest.raises(UserError, match="no reranker"):
        ev.evaluate_bundle(no_reranker, DATASET, ["nope"], rerank=4, data_dir=data_dir)


def test_judge_is_absent_outside_shapes_world(bundle, heldout):
    examples = dataclasses.replace(heldout, name="emoji/32:test")
    result = ev.evaluate_split(
        bundle,
        examples,
        groups=("judge",),
        shapes=False,
        seed=0,
        batch_size=8,
        settings=None,  # nothing is generated
        progress=False,
    )
    assert result["judge_accuracy"] is None and result["absent"] == {
        "judge_accuracy": ev.NOT_SHAPES
    }


def test_format_table_has_a_column_per_split_and_a_row_per_metric(report):
    lines = ev.format_table(report).splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "test", "test_heldout"]
    judge_row = next(line for line in lines if line.startswith("shapes judge: objects right"))
    value = report["results"]["test_heldout"]["judge_accuracy"]
    assert judge_row.split()[-1] == f"{100 * value:.1f}%"
    assert any(line.startswith("image bits/dim") for line in lines)


# ---- the command -----------------------------------------------------------------------------


def test_cli_prints_the_table_and_writes_one_json_with_an_entry_per_split(
    bundle_dir, data_dir, tmp_path, capsys
):
    out = tmp_path / "eval"
    code = main(
        [
            "--model",
            str(bundle_dir),
            "--dataset",
            DATASET,
            "--split",
            "test,test_heldout",
            "--num-prompts",
            "6",
            "--batch-size",
            "8",
            "--data-dir",
            data_dir,
            "--out",
            str(out),
            "--metrics",
            "loss,vqvae",  # compiled for the report fixture already: no generation here
            "--temperature",
            "0.5",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    saved = json.loads((out / ev.REPORT_NAME).read_text())
    assert list(saved["results"]) == ["test", "test_heldout"]
    assert saved["settings"]["temperature"] == 0.5 and saved["settings"]["top_k"] == 16
    assert saved["metric_groups"] == ["loss", "vqvae"] and saved["num_prompts"] == 6
    assert saved["dataset"] == DATASET and saved["bundle"] == str(bundle_dir)
    for result in saved["results"].values():
        assert result["examples"] == 6 and result["image_bits_per_dim"] > 0
        assert result["vqvae_psnr"] > 0 and "judge_accuracy" not in result
    assert "metric" in captured.out and "test_heldout" in captured.out
    assert str(out / ev.REPORT_NAME) in captured.out


def test_cli_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--model",
        "--dataset",
        "--split",
        "--num-prompts",
        "--seed",
        "--batch-size",
        "--out",
        "--data-dir",
        "--metrics",
        "--no-generate",
        "--temperature",
        "--top-k",
        "--top-p",
        "--cfg-scale",
        "--rerank",
        "--folder",
        "--image-size",
    ):
        assert flag in text
    assert "0 = no reranking" in text and "rerank_per_image" in text
    assert "(default: 1000)" in text and "(default: evaluation)" in text


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--dataset", "no_such_data"], "unknown dataset 'no_such_data'"),
        (["--split", "nope"], "has no split 'nope'"),
        (["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["--model", "{tmp}/missing"], "not found"),
        (["--dataset", OTHER_SIZE_DATASET], "has 64 px images but the bundle's vqvae takes 32 px"),
        (["--metrics", "judge", "--no-generate"], "--no-generate leaves out judge"),
        (["--metrics", "fid"], "unknown metric group 'fid'"),
        (["--batch-size", "0"], "batch size must be at least 1"),
        (["--top-p", "0"], "top-p must be in (0, 1]"),
        (["--rerank", "-1"], "rerank -1 is negative"),
        (["--folder", "{tmp}"], "--folder: image_folder only, but the dataset is"),
        (["--image-size", "32"], "--image-size: image_folder only"),
        (["--dataset", "image_folder"], "dataset 'image_folder' needs --folder DIR"),
    ],
)
def test_bad_input_exits_2_with_one_line(flags, expected, bundle_dir, data_dir, tmp_path, capsys):
    base = {"--model": str(bundle_dir), "--dataset": DATASET, "--split": "test"}
    given = [f.format(tmp=tmp_path) for f in flags]
    for flag in given[::2]:
        base.pop(flag, None)
    argv = [x for kv in base.items() for x in kv] + given
    argv += ["--data-dir", data_dir, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_split_without_captions_exits_2_with_one_line(
    bundle_dir, data_dir, tmp_path, capsys, monkeypatch
):
    examples = [{"image": np.zeros((32, 32, 3), np.uint8), "caption": ""} for _ in range(3)]
    fake = pipeline.Split(
        name="image_folder/32:train",
        source=examples,
        normalize=lambda example, index: example,
        num_examples=len(examples),
    )
    monkeypatch.setattr(pipeline, "open_split", lambda *args, **kwargs: fake)
    argv = ["--model", str(bundle_dir), "--dataset", "image_folder/32", "--split", "train"]
    argv += ["--folder", str(tmp_path)]
    assert main(argv + ["--data-dir", data_dir, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image_folder/32:train has no captions") and err.count("\n") == 1


def test_the_cli_evaluates_your_own_image_folder(bundle_dir, tmp_path, capsys):
    # Captioned 32 px pictures of a few shapes, prepared as `train data --dataset image_folder`.
    from PIL import Image

    folder, data_dir = tmp_path / "pictures", tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
        Image.fromarray(image).save(folder / f"p{i:02d}.png")
        (folder / f"p{i:02d}.txt").write_text(f"a red circle number {i}")
    kwargs = {"folder": str(folder), "image_size": 32}
    registry.builder("image_folder", data_dir=str(data_dir), **kwargs).download_and_prepare()
    held_out = pipeline.open_split("image_folder", "validation", data_dir=str(data_dir), **kwargs)

    out = tmp_path / "eval"
    argv = ["--model", str(bundle_dir), "--dataset", "image_folder", "--folder", str(folder)]
    argv += ["--image-size", "32", "--split", "validation", "--data-dir", str(data_dir)]
    argv += ["--metrics", "loss,vqvae", "--batch-size", "8", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / ev.REPORT_NAME).read_text())["results"]["validation"]
    assert result["examples"] == held_out.num_examples > 0
    assert result["image_bits_per_dim"] > 0 and result["vqvae_psnr"] > 0
    # Prepared at 32 px, it must be named at 32: the 64 px variant was never prepared.
    argv[argv.index("32")] = "64"
    assert main(argv) == 2
    assert "train data" in capsys.readouterr().err
