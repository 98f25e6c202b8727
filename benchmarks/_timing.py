"""Timing helper shared by the benchmarks: medians of repeated calls after a warm-up."""

from __future__ import annotations

import statistics
import time


def time_call(fn, repeats: int, warmup: int = 1):
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Returns (median seconds, all timed seconds, the last result).
    """
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result
