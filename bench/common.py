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
    """This machine's matmul peak, measured now (other sessions share the cores, so a
    benchmark measures it in the same run, ideally before and after what it times).

    One reading times a jitted loop of `reps` [n, n] x [n, n] matmuls in `dtype` (n = 2048
    float32 by default: large enough to run at a CPU kernel's best rate; on a GPU use bfloat16 and
    n = 8192, the rate bf16 training is held to). Inputs are random, never zeros (which can run
    faster than real data). The right factor is orthogonal, so the product keeps the left
    factor's norm: a check that the matmuls really ran (loosely in bfloat16, whose rounding
    drifts the norm a little each product).
    Call the instance for one reading in GFLOP/s; `cpu_readings` holds the same work per
    CPU-second of this process.
    """

    def __init__(self, n: int = 2048, reps: int = 4, seed: int = 0, dtype: str = "float32"):
        import jax
        import jax.numpy as jnp
        import numpy as np

        rng = np.random.default_rng(seed)
        self.n, self.reps, self.dtype = n, reps, dtype
        self._a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32), dtype=dtype)
        b = np.linalg.qr(rng.standard_normal((n, n), dtype=np.float32))[0]
        self._b = jnp.asarray(b, dtype=dtype)
        self._loop = jax.jit(lambda a, b: jax.lax.fori_loop(0, reps, lambda i, c: c @ b, a))
        self._norm = float(jnp.linalg.norm(self._a.astype(jnp.float32)))
        self._tolerance = 1e-3 if jnp.dtype(dtype).itemsize >= 4 else 0.1
        self._loop(self._a, self._b).block_until_ready()  # compile outside the readings
        self.readings: list[float] = []
        self.cpu_readings: list[float] = []

    def __call__(self) -> float:
        import time

        import jax.numpy as jnp

        start, cpu_start = time.perf_counter(), time.process_time()
        out = self._loop(self._a, self._b).block_until_ready()
        seconds = time.perf_counter() - start
        cpu_seconds = max(time.process_time() - cpu_start, 1e-9)
        norm = float(jnp.linalg.norm(out.astype(jnp.float32)))
        if not abs(norm / self._norm - 1) <= self._tolerance:
            raise RuntimeError("the peak matmul loop computed a wrong result; check XLA_FLAGS")
        flops = 2 * self.n**3 * self.reps
        self.readings.append(flops / seconds / 1e9)
        self.cpu_readings.append(flops / cpu_seconds / 1e9)
        return self.readings[-1]
