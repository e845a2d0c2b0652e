"""Stage 1: the discrete VAE that turns images into a grid of codebook ids and back.

A leaf package: no mesh, no checkpoints, no file I/O, and it never imports `dalle_jax`.

The public names below are re-exported lazily (PEP 562), so `import vqvae.errors` (which every
command-line entry point does) stays free of jax/flax imports.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "VQVAEConfig": "vqvae.config",
    "get_config": "vqvae.config",
    "TrainConfig": "vqvae.train_config",
    "get_train_config": "vqvae.train_config",
    "VQVAE": "vqvae.model",
    "create_model": "vqvae.model",
    "encode": "vqvae.model",
    "decode": "vqvae.model",
    "make_optimizer": "vqvae.train_step",
    "create_optimizer": "vqvae.train_step",
    "train_step": "vqvae.train_step",
    "make_train_step": "vqvae.train_step",
    "eval_step": "vqvae.train_step",
    "psnr": "vqvae.metrics",
    "psnr_per_image": "vqvae.metrics",
    "code_histogram": "vqvae.metrics",
    "codebook_usage": "vqvae.metrics",
    "codebook_perplexity": "vqvae.metrics",
    "VQVAEInputError": "vqvae.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vqvae' has no attribute {name!r}")
