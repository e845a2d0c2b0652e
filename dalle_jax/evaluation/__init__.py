"""Evaluation of a bundle: `evaluate` (the figures of the `evaluate` command: judge, R-precision,
reranker-feature FD, losses, vqvae) and `shapes_judge` (the deterministic shapes judge)."""
