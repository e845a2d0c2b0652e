"""dalle-jax: the library under the `train` and `sample` commands.

Imports point one way: `vqvae` <- `dalle_jax` <- `train`, `sample`.
"""

__version__ = "0.1.0"
