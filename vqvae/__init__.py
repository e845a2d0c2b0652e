"""Stage 1: the discrete VAE that turns images into a grid of codebook ids and back.

A leaf package: no mesh, no checkpoints, no file I/O, and it never imports `dalle_jax`.
"""
