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
