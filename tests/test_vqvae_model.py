"""vqvae config, model shapes and the encode/decode contract."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae.config import CONFIGS, VQVAEConfig, get_config
from vqvae.errors import VQVAEInputError
from vqvae.model import create_model, decode, encode

MULTIPLIERS = {4: (1, 2, 2), 8: (1, 1, 2, 2), 16: (1, 1, 1, 2, 2)}


def _images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _config(quantizer: str, factor: int, **kw) -> VQVAEConfig:
    base = get_config("tiny" if quantizer == "vq" else "tiny_gumbel")
    return dataclasses.replace(
        base, downsample_factor=factor, channel_multipliers=MULTIPLIERS[factor], **kw
    )


def test_every_named_config_round_trips_through_json():
    for name, config in CONFIGS.items():
        restored = VQVAEConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert restored == config, name
        assert get_config(name) == config


def test_named_configs_have_the_promised_grids():
    assert get_config("shapes64").image_size == 64
    assert get_config("shapes64").grid_size == 8
    assert get_config("shapes64").codebook_size == 512
    assert get_config("emoji32").grid_size == 8
    assert get_config("emoji32").codebook_size == 512


def test_unknown_config_name_lists_known_ones():
    with pytest.raises(VQVAEInputError, match="unknown vqvae config 'nope'.*shapes64"):
        get_config("nope")


def test_inconsistent_config_is_rejected_with_the_reason():
    with pytest.raises(VQVAEInputError, match="channel_multipliers needs .* = 4 entries"):
        VQVAEConfig(downsample_factor=8, channel_multipliers=(1, 2, 2))
    with pytest.raises(VQVAEInputError, match="power of two"):
        VQVAEConfig(downsample_factor=6)
    with pytest.raises(VQVAEInputError, match="unknown VQVAEConfig fields"):
        VQVAEConfig.from_dict({"image_size": 32, "colour": "red"})


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
@pytest.mark.parametrize("factor", [4, 8, 16])
def test_encode_decode_shapes(quantizer, factor):
    config = _config(quantizer, factor)
    model = create_model(config, seed=0)
    ids = nnx.jit(encode)(model, _images())
    grid = 32 // factor
    assert ids.shape == (2, grid, grid)
    assert ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < config.codebook_size
    images = nnx.jit(decode)(model, ids)
    assert images.shape == (2, 32, 32, 3)
    assert images.dtype == jnp.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_avgpool_downsampling_and_logit_laplace_decoder():
    config = dataclasses.replace(get_config("tiny"), downsample_mode="avgpool", logit_laplace=True)
    model = create_model(config)
    ids = encode(model, _images())
    assert ids.shape == (2, 8, 8)
    images = decode(model, ids)
    assert images.shape == (2, 32, 32, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_uint8_images_are_scaled_to_unit_range_inside():
    model = create_model(get_config("tiny"))
    images = _images()
    from_uint8 = encode(model, images)
    from_float = encode(model, images.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(from_uint8, from_float)


def test_encode_and_decode_jit_and_match_eager():
    model = create_model(get_config("tiny"))
    images = _images()
    ids = encode(model, images)
    np.testing.assert_array_equal(nnx.jit(encode)(model, images), ids)
    np.testing.assert_allclose(nnx.jit(decode)(model, ids), decode(model, ids), atol=1e-5)


def test_wrong_image_shape_names_the_expected_shape():
    model = create_model(get_config("tiny"))
    with pytest.raises(
        VQVAEInputError, match=r"expected images \[B, 32, 32, 3\], got \[2, 16, 16, 3\]"
    ):
        encode(model, _images(size=16))
    with pytest.raises(
        VQVAEInputError, match=r"expected images \[B, 32, 32, 3\], got \[2, 32, 32, 4\]"
    ):
        encode(model, np.zeros((2, 32, 32, 4), np.uint8))
    with pytest.raises(VQVAEInputError, match=r"got \[32, 32, 3\]"):
        encode(model, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(VQVAEInputError, match="expected uint8 images .* got dtype int32"):
        encode(model, np.zeros((2, 32, 32, 3), np.int32))


def test_wrong_id_shape_names_the_expected_shape():
    model = create_model(get_config("tiny"))
    with pytest.raises(VQVAEInputError, match=r"expected ids \[B, 8, 8\], got \[2, 4, 4\]"):
        decode(model, np.zeros((2, 4, 4), np.int32))
    with pytest.raises(VQVAEInputError, match="expected integer ids"):
        decode(model, np.zeros((2, 8, 8), np.float32))


def test_same_seed_same_model_and_different_seed_different_model():
    images = _images()
    a, b, c = (create_model(get_config("tiny"), seed=s) for s in (0, 0, 1))
    leaves = lambda m: jax.tree.leaves(nnx.state(m))
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    ids_a = np.asarray(encode(a, images))
    np.testing.assert_array_equal(ids_a, encode(b, images))
    np.testing.assert_array_equal(decode(a, ids_a), decode(b, ids_a))
    assert not np.array_equal(decode(a, ids_a), decode(c, ids_a))


def test_configs_and_errors_import_without_jax():
    # Every CLI imports vqvae.errors, and a checkpoint's config is read before the model is built:
    # neither may pay for a jax import.
    import subprocess
    import sys

    code = (
        "import sys, vqvae, vqvae.errors, vqvae.config, vqvae.train_config; "
        "assert 'jax' not in sys.modules and 'flax' not in sys.modules, 'jax imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
