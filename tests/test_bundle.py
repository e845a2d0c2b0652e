"""Bundles (`dalle_jax.bundle`): export -> load round trips and one-line errors for bad input."""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dalle_jax import bundle as bundle_lib
from dalle_jax import reranker as reranker_lib
from dalle_jax.errors import UserError
from dalle_jax.model import DalleTransformer, get_config
from dalle_jax.sampling import generate_image_ids
from dalle_jax.tokenizer import TextTokenizer, train_tokenizer
from vqvae.config import get_config as get_vqvae_config
from vqvae.model import create_model, decode

CAPTIONS = [
    "a red circle",
    "a large blue square at the top left",
    "a small green triangle in the center",
    "a yellow diamond at the bottom right on a black background",
    "a purple circle and an orange square",
    "there is a large cyan triangle at the top",
]
VQVAE_CONFIG = get_vqvae_config("tiny")  # 32 px -> 8x8 ids of 32 codes


def jit_init(make):
    """`make()` (an nnx module) built by one compiled program: much faster than eager init."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    options = {"xla_backend_optimization_level": 0}
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()), compiler_options=options)())


forward = nnx.jit(lambda model, text_ids, image_ids: model(text_ids, image_ids))
decode_jit = nnx.jit(decode)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_bytes(train_tokenizer(CAPTIONS * 4, 40, "bpe"))


@pytest.fixture(scope="module")
def transformer(tokenizer) -> DalleTransformer:
    config = get_config(
        "tiny",
        image_rows=8,
        image_cols=8,
        text_length=16,
        text_vocab_size=tokenizer.vocab_size,
    )
    return jit_init(lambda: DalleTransformer(config, rngs=nnx.Rngs(1)))


@pytest.fixture(scope="module")
def vqvae():
    return jit_init(lambda: create_model(VQVAE_CONFIG, seed=2))


def export(out, transformer, vqvae, tokenizer, **kw):
    return bundle_lib.export_bundle(
        out,
        transformer_config=transformer.config,
        transformer_state=nnx.state(transformer),
        vqvae_config=vqvae.config,
        vqvae_state=nnx.state(vqvae),
        tokenizer_bytes=tokenizer.to_bytes(),
        **kw,
    )


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory, transformer, vqvae, tokenizer) -> Path:
    return export(
        tmp_path_factory.mktemp("bundles") / "good",
        transformer,
        vqvae,
        tokenizer,
        sampling={"top_k": 16, "cfg_scale": 2.0},
        provenance={"note": "test"},
    )


def inputs(tokenizer, config):
    text_ids = jnp.asarray(tokenizer.encode(CAPTIONS[:3], config.text_length))
    image_ids = jax.random.randint(jax.random.key(0), (3, config.image_length), 0, 32)
    return text_ids, image_ids


def test_round_trip_gives_the_same_models(good_bundle, transformer, vqvae, tokenizer):
    loaded = bundle_lib.load_bundle(good_bundle)
    assert loaded.path == good_bundle
    assert loaded.transformer.config == transformer.config
    assert loaded.vqvae.config == vqvae.config
    assert loaded.tokenizer.to_bytes() == tokenizer.to_bytes()
    assert loaded.reranker is None
    assert loaded.sampling == {"temperature": 1.0, "top_k": 16, "top_p": None, "cfg_scale": 2.0}
    assert loaded.meta["format"] == bundle_lib.BUNDLE_FORMAT
    assert loaded.meta["provenance"] == {"note": "test"}

    text_ids, image_ids = inputs(tokenizer, transformer.config)
    for ours, theirs in zip(
        forward(transformer, text_ids, image_ids),
        forward(loaded.transformer, text_ids, image_ids),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    ids = image_ids.reshape(3, 8, 8)
    np.testing.assert_array_equal(decode_jit(vqvae, ids), decode_jit(loaded.vqvae, ids))


def test_bfloat16_export_is_smaller_and_loads_as_float32(
    good_bundle, transformer, vqvae, tokenizer, tmp_path
):
    path = export(tmp_path / "bf16", transformer, vqvae, tokenizer, weights_dtype="bfloat16")
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path / "transformer").item_metadata.tree
    assert {np.dtype(leaf.dtype) for leaf in jax.tree.leaves(stored)} == {np.dtype(jnp.bfloat16)}

    def size(p):
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())

    assert size(path / "transformer") < 0.75 * size(good_bundle / "transformer")

    loaded = bundle_lib.load_bundle(path)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(loaded.transformer))} == {
        np.dtype(np.float32)
    }
    text_ids, image_ids = inputs(tokenizer, transformer.config)
    _, ours = forward(transformer, text_ids, image_ids)
    _, theirs = forward(loaded.transformer, text_ids, image_ids)
    assert not np.array_equal(np.asarray(ours), np.asarray(theirs))  # rounded weights
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=0.05)
    ids = nnx.jit(generate_image_ids)(loaded.transformer, text_ids, jax.random.key(0))
    assert ids.shape == (3, 64) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < 32
    images = decode_jit(loaded.vqvae, ids.reshape(3, 8, 8))
    assert images.shape == (3, 32, 32, 3) and np.all(np.isfinite(np.asarray(images)))


def test_a_shipped_bundle_loads_by_name(good_bundle, monkeypatch, tmp_path):
    shipped = tmp_path / "bundles"
    shutil.copytree(good_bundle, shipped / "demo")
    monkeypatch.setattr(bundle_lib, "SHIPPED_BUNDLES_DIR", shipped)
    monkeypatch.chdir(tmp_path)  # "demo" is not a folder here
    assert bundle_lib.shipped_bundles() == ["demo"]
    assert bundle_lib.load_bundle("demo").path == shipped / "demo"
    with pytest.raises(UserError, match=r"'nope' not found.*shipped bundles: demo"):
        bundle_lib.load_bundle("nope")


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = meta
        *parents, last = dotted.split("__")
        for parent in parents:
            node = node[parent]
        node[last] = value
    path.write_text(json.dumps(meta))


def _corrupt_files(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            file.write_bytes(b"\x00garbage" * 3)


BAD_BUNDLES = {
    "missing bundle.json": (lambda b: (b / "bundle.json").unlink(), r"bundle\.json: missing"),
    "bundle.json not JSON": (
        lambda b: _write(b / "bundle.json", "{not json"),
        r"bundle\.json: not valid JSON",
    ),
    "wrong format": (
        lambda b: _edit_json(b / "bundle.json", format="dalle_jax.bundle.v0"),
        r"bundle\.json: format 'dalle_jax\.bundle\.v0', expected 'dalle_jax\.bundle\.v1'",
    ),
    "unknown config field": (
        lambda b: _edit_json(b / "bundle.json", transformer__depth=3),
        r"bundle\.json: bad transformer config",
    ),
    "missing tokenizer": (
        lambda b: (b / "tokenizer.model").unlink(),
        r"tokenizer\.model: missing",
    ),
    "corrupt tokenizer": (
        lambda b: (b / "tokenizer.model").write_bytes(b"not a model"),
        r"tokenizer\.model' is not a sentencepiece model",
    ),
    "missing weights": (
        lambda b: shutil.rmtree(b / "transformer"),
        r"transformer: missing transformer weights folder",
    ),
    "corrupt weights": (
        lambda b: _corrupt_files(b / "vqvae"),
        r"vqvae: the vqvae weights cannot be read",
    ),
    "corrupt weight arrays": (
        lambda b: _corrupt_files(b / "transformer" / "d"),
        r"transformer: the transformer weights cannot be read",
    ),
    "weights of another shape": (
        lambda b: _edit_json(b / "bundle.json", transformer__mlp_dim=48),
        r"transformer: the transformer weights do not fit the transformer config in "
        r"bundle\.json \(blocks\.0\.mlp\.down\.kernel has shape \[64, 32\] in the weights but "
        r"\[48, 32\]",
    ),
    "vqvae of another size": (
        lambda b: _edit_json(b / "bundle.json", vqvae__base_channels=16),
        r"vqvae: the vqvae weights do not fit the vqvae config",
    ),
    "rerank_per_image 0": (
        lambda b: _edit_json(b / "bundle.json", sampling__rerank_per_image=0),
        r"bundle\.json: sampling 'rerank_per_image' must be a whole number >= 1 .*got 0",
    ),
    "rerank_per_image not a number": (
        lambda b: _edit_json(b / "bundle.json", sampling__rerank_per_image="x"),
        r"bundle\.json: sampling 'rerank_per_image' must be a whole number >= 1 .*got 'x'",
    ),
    "rerank_likelihood_weight negative": (
        lambda b: _edit_json(b / "bundle.json", sampling__rerank_likelihood_weight=-1),
        r"bundle\.json: sampling 'rerank_likelihood_weight' must be a number >= 0 .*got -1",
    ),
    "rerank_likelihood_weight not a number": (
        lambda b: _edit_json(b / "bundle.json", sampling__rerank_likelihood_weight="high"),
        r"bundle\.json: sampling 'rerank_likelihood_weight' must be a number >= 0 .*got 'high'",
    ),
    "vqvae grid unlike the transformer's": (
        lambda b: _edit_json(b / "bundle.json", vqvae__image_size=64),
        r"the transformer's image grid is \(8, 8\) but the vqvae's is \(16, 16\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_a_bad_bundle_is_a_one_line_user_error(case, good_bundle, tmp_path):
    damage, message = BAD_BUNDLES[case]
    broken = tmp_path / "broken"
    shutil.copytree(good_bundle, broken)
    damage(broken)
    with pytest.raises(UserError) as error:
        bundle_lib.load_bundle(broken)
    text = str(error.value)
    assert "\n" not in text
    assert str(broken) in text
    assert re.search(message, text), text


def test_a_missing_folder_or_a_file_is_a_user_error(good_bundle, tmp_path):
    with pytest.raises(UserError, match="not found: no such folder"):
        bundle_lib.load_bundle(tmp_path / "absent")
    with pytest.raises(UserError, match="is a file; pass the bundle's folder"):
        bundle_lib.load_bundle(good_bundle / "bundle.json")


def test_export_checks_its_inputs(good_bundle, transformer, vqvae, tokenizer, tmp_path):
    with pytest.raises(UserError, match="already exists and is not empty"):
        export(good_bundle, transformer, vqvae, tokenizer)
    other_tokenizer = TextTokenizer.from_bytes(train_tokenizer(CAPTIONS * 4, 30, "bpe"))
    with pytest.raises(UserError, match="text vocabulary is 40 but the tokenizer's is 30"):
        export(tmp_path / "a", transformer, vqvae, other_tokenizer)
    with pytest.raises(UserError, match="unknown sampling setting"):
        export(tmp_path / "b", transformer, vqvae, tokenizer, sampling={"temp": 1})
    with pytest.raises(UserError, match="weights dtype 'float16'"):
        export(tmp_path / "c", transformer, vqvae, tokenizer, weights_dtype="float16")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*tmp*"))

    # overwrite replaces a bundle whole.
    path = export(tmp_path / "d", transformer, vqvae, tokenizer)
    export(path, transformer, vqvae, tokenizer, sampling={"temperature": 0.5}, overwrite=True)
    assert bundle_lib.load_bundle(path).sampling["temperature"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.fixture(scope="module")
def tiny_reranker(tokenizer):
    """(config, module) of a random-init reranker that fits `tokenizer`."""
    config = reranker_lib.get_config(
        "tiny",
        text_vocab_size=tokenizer.vocab_size,
        tokenizer_sha256=reranker_lib.tokenizer_sha256(tokenizer.to_bytes()),
    )
    return config, jit_init(lambda: reranker_lib.create_reranker(config, seed=3))


def test_a_reranker_added_later_loads_and_scores(good_bundle, tokenizer, tiny_reranker, tmp_path):
    path = tmp_path / "with_reranker"
    shutil.copytree(good_bundle, path)
    config, reranker = tiny_reranker
    bundle_lib.add_reranker(path, config, nnx.state(reranker))
    loaded = bundle_lib.load_bundle(path)
    assert loaded.meta["reranker"] == config.to_dict()
    assert loaded.reranker.config == config
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle"] * 2 + ["a blue square at the top left"] * 2
    scores = loaded.reranker.score(images, prompts)
    ids = tokenizer.encode(prompts, config.text_length)
    np.testing.assert_allclose(scores, reranker_lib.score(reranker, images, ids), rtol=1e-6)

    wrong = config.replace(text_vocab_size=tokenizer.vocab_size + 1)
    with pytest.raises(UserError, match="expects a tokenizer of"):
        bundle_lib.add_reranker(path, wrong, nnx.state(reranker))


def test_a_relative_output_path_is_written_and_read(transformer, vqvae, tokenizer, tmp_path):
    # orbax itself refuses relative paths; the CLI user types them (`--out bundles/mine`).
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        export(Path("bundles") / "mine", transformer, vqvae, tokenizer)
        loaded = bundle_lib.load_bundle(Path("bundles") / "mine")
    assert (tmp_path / "bundles" / "mine" / bundle_lib.BUNDLE_JSON).is_file()
    assert loaded.transformer_config == transformer.config


def test_a_rerank_default_is_stored_and_loaded(transformer, vqvae, tokenizer, tmp_path):
    sampling = {"top_k": 16, "rerank_per_image": 4}
    path = export(tmp_path / "r", transformer, vqvae, tokenizer, sampling=sampling)
    assert json.loads((path / "bundle.json").read_text())["sampling"]["rerank_per_image"] == 4
    loaded = bundle_lib.load_bundle(path)
    assert loaded.sampling == {**bundle_lib.DEFAULT_SAMPLING, **sampling}
    with pytest.raises(UserError, match="export: sampling 'rerank_per_image' must be"):
        export(tmp_path / "bad", transformer, vqvae, tokenizer, sampling={"rerank_per_image": 0})


# ---- `train export --rerank-per-image` ------------------------------------------------------


@pytest.fixture
def fake_export(good_bundle, monkeypatch):
    """`train export` without a training run: `export_workdir` copies `good_bundle` to --out
    with the sampling dict it was asked for (as the real one writes it) and records that dict;
    `load_reranker` reads nothing."""
    calls = []

    def export_workdir(workdir, *, out, sampling, **kwargs):
        calls.append(dict(sampling))
        shutil.copytree(good_bundle, out)
        meta = json.loads((Path(out) / "bundle.json").read_text())
        meta["sampling"] = {**meta["sampling"], **sampling}
        (Path(out) / "bundle.json").write_text(json.dumps(meta))
        return Path(out)

    monkeypatch.setattr("dalle_jax.training.export_workdir", export_workdir)
    return calls


def train_export(tmp_path, *flags):
    from train.cli import main

    base = ["export", "--workdir", "w", "--vqvae", "v", "--tokenizer", "t"]
    return main([*base, "--out", str(tmp_path / "bundle"), *flags])


def test_train_export_stores_the_rerank_default_with_the_reranker(
    fake_export, tiny_reranker, tmp_path, monkeypatch, capsys
):
    from dalle_jax.generate import default_rerank

    config, reranker = tiny_reranker
    monkeypatch.setattr(
        "dalle_jax.reranker_training.load_reranker", lambda workdir: (nnx.state(reranker), config)
    )
    flags = ["--reranker", "r", "--rerank-per-image", "4", "--temperature", "0.5"]
    flags += ["--rerank-likelihood-weight", "0.25"]
    assert train_export(tmp_path, *flags) == 0, capsys.readouterr().err
    # Every sampling default, reranking's too, goes through `export_workdir`.
    assert fake_export == [
        {"temperature": 0.5, "rerank_per_image": 4, "rerank_likelihood_weight": 0.25}
    ]
    assert "reranking 4 candidates per image by default" in capsys.readouterr().out
    loaded = bundle_lib.load_bundle(tmp_path / "bundle")
    assert loaded.sampling["rerank_per_image"] == 4 and loaded.reranker is not None
    assert loaded.sampling["top_k"] == 16  # the rest of the sampling dict is kept
    assert default_rerank(loaded, 2) == 8


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--rerank-per-image", "4"], "--rerank-per-image 4 needs a reranker in the bundle"),
        (["--rerank-per-image", "0", "--reranker", "r"], "--rerank-per-image must be at least 1"),
        (["--rerank-likelihood-weight", "-0.5"], "must be a number >= 0"),
        (["--rerank-likelihood-weight", "nan"], "must be a number >= 0"),
    ],
)
def test_train_export_rerank_default_errors_are_one_line(
    flags, expected, fake_export, tmp_path, capsys
):
    assert train_export(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert fake_export == []  # refused before the (slow) export
