"""Which test covers which row of docs/ERRORS.md: `@covers("W01", ...)` on the test."""

from __future__ import annotations

from collections import defaultdict

COVERED: dict[str, list[str]] = defaultdict(list)


def covers(*ids: str):
    def mark(fn):
        for i in ids:
            COVERED[i].append(f"{fn.__module__}.{fn.__name__}")
        return fn

    return mark
