"""Shared output of the benchmark scripts: one JSON line per measurement, then a table.

JSON lines go to stdout so `python -m bench.x | grep '^{'` collects them; the table is for people.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def emit(record: Mapping[str, Any], file: TextIO | None = None) -> None:
    """Prints `record` as one JSON line (keys in the given order)."""
    print(json.dumps(dict(record), default=_jsonable), file=file or sys.stdout, flush=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def format_value(value: Any) -> str:
    """Numbers readable at a glance: 3 significant figures, thousands separated."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of `rows` (dicts); `columns` picks and orders the keys shown."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[format_value(row.get(column, "")) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        # Numbers right-aligned, text left-aligned, as a reader scans them.
        parts = []
        for value, width, column in zip(values, widths, columns, strict=True):
            numeric = all(isinstance(row.get(column), int | float) for row in rows)
            parts.append(value.rjust(width) if numeric else value.ljust(width))
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(list(columns)), rule, *(line(values) for values in cells)])


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
    file: TextIO | None = None,
) -> None:
    """Prints `format_table(rows, columns)` under an optional title."""
    out = file or sys.stdout
    if title:
        print(f"\n{title}", file=out)
    print(format_table(rows, columns), file=out, flush=True)


class MatmulPeak:
    """This machine's float32 matmul peak, measured now (other sessions share the cores, so a
    benchmark measures it in the same run, ideally before and after what it times).

    One reading times a jitted loop of `reps` [n, n] x [n, n] float32 matmuls (n = 2048 by
    default: large enough to run at the kernel's best rate). The right factor is orthogonal, so
    the product keeps the left factor's norm: a check that the matmuls really ran.
    Call the instance for one reading in GFLOP/s.
    """

    def __init__(self, n: int = 2048, reps: int = 4, seed: int = 0):
        import jax
        import jax.numpy as jnp
        import numpy as np

        rng = np.random.default_rng(seed)
        self.n, self.reps = n, reps
        self._a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
        self._b = jnp.asarray(np.linalg.qr(rng.standard_normal((n, n)))[0].astype(np.float32))
        self._loop = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda i, c: c @ b, a))
        self._norm = float(jnp.linalg.norm(self._a))
        self._loop(self._a, self._b).block_until_ready()  # compile outside the readings
        self.readings: list[float] = []

    def __call__(self) -> float:
        import time

        import jax.numpy as jnp

        start = time.perf_counter()
        out = self._loop(self._a, self._b).block_until_ready()
        seconds = time.perf_counter() - start
        if abs(float(jnp.linalg.norm(out)) / self._norm - 1) > 1e-3:
            raise RuntimeError("the peak matmul loop computed a wrong result; check XLA_FLAGS")
        gflops = 2 * self.n**3 * self.reps / seconds / 1e9
        self.readings.append(gflops)
        return gflops
