"""Benchmark scripts: each prints JSON lines (one per measurement) and a readable table.

Run from the repository root as modules, e.g. `python -m bench.input_pipeline`.
"""
