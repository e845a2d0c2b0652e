"""A tiny random-init bundle on disk, shared by the tests of `sample`, `evaluate` and the demo.

Its weights are untrained: tests built on it check plumbing and contracts (shapes, files,
determinism, errors), never image quality.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from dalle_jax.bundle import export_bundle
from dalle_jax.model import DalleTransformer, get_config
from dalle_jax.tokenizer import TextTokenizer, train_tokenizer
from vqvae.config import VQVAEConfig
from vqvae.model import create_model

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [
    f"a {c} {s} above a {c2} {s2}"
    for c in COLOURS
    for s in SHAPES
    for c2 in COLOURS[:2]
    for s2 in SHAPES[:2]
]
IMAGE_SIZE = 16  # 4x4 ids: the `tiny` transformer's grid
TINY_VQVAE = VQVAEConfig(
    name="test16",
    image_size=IMAGE_SIZE,
    downsample_factor=4,
    base_channels=8,
    channel_multipliers=(1, 2, 2),
    num_res_blocks=1,
    num_groups=4,
    codebook_size=32,
    code_dim=8,
)


def make_bundle(out_dir: Path, *, made_by: str = "tests/bundle_factory.py") -> Path:
    """Writes the tiny bundle to `out_dir` (tiny transformer, 16 px vqvae, 40-piece tokenizer)."""
    tokenizer_bytes = train_tokenizer(CAPTIONS, vocab_size=40)
    vocab = TextTokenizer.from_bytes(tokenizer_bytes).vocab_size
    transformer_config = get_config("tiny", text_vocab_size=vocab)
    return export_bundle(
        out_dir,
        transformer_config=transformer_config,
        transformer_state=DalleTransformer(transformer_config, rngs=nnx.Rngs(0)),
        vqvae_config=TINY_VQVAE,
        vqvae_state=create_model(TINY_VQVAE, seed=0),
        tokenizer_bytes=tokenizer_bytes,
        sampling={"temperature": 1.0, "top_k": 16, "top_p": None, "cfg_scale": 2.0},
        provenance={"made_by": made_by},
    )
