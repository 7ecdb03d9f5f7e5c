"""Timing helper shared by the benchmarks (imported with the benchmarks directory on sys.path)."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, *args, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn(*args)``, in ms (``time.perf_counter`` around each call)."""
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
