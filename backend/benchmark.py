"""Latency benchmarks: warm-up, then timed runs on tensors bound to the device.

Runs use IO binding (:meth:`Session.bind`), so on CUDA the timings hold no host-device copies
and each run waits for the device before the clock stops.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from onnxforge.backend.session import Session
from onnxforge.errors import InputError

__all__ = [
    "Stats",
    "benchmark",
    "time_runs",
    "summarize",
    "DEFAULT_WARMUP",
    "DEFAULT_DURATION_S",
    "MIN_RUNS",
]

DEFAULT_WARMUP = 5
# Without a run count, time runs for this long (but at least MIN_RUNS runs).
DEFAULT_DURATION_S = 2.0
MIN_RUNS = 10


@dataclasses.dataclass(frozen=True)
class Stats:
    """Latency percentiles and throughput of a benchmark (times in milliseconds)."""

    runs: int
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float
    throughput: float  # samples per second: batch * runs / time spent running

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return dataclasses.asdict(self)


def summarize(latencies_s: list[float], *, batch: int = 1, elapsed_s: float | None = None) -> Stats:
    """Stats from per-run latencies in seconds; ``elapsed_s`` defaults to their sum."""
    if not latencies_s:
        raise InputError("no runs to summarise")
    ms = np.asarray(latencies_s) * 1000.0
    total = elapsed_s if elapsed_s is not None else float(np.sum(latencies_s))
    return Stats(
        runs=len(ms),
        batch=batch,
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(np.mean(ms)),
        stdev_ms=float(statistics.stdev(ms)) if len(ms) > 1 else 0.0,
        min_ms=float(np.min(ms)),
        throughput=batch * len(ms) / total if total > 0 else float("inf"),
    )


def time_runs(
    run: Callable[[], object],
    *,
    batch: int = 1,
    warmup: int = DEFAULT_WARMUP,
    runs: int | None = None,
    duration: float | None = None,
    on_run: Callable[[int], None] | None = None,
) -> Stats:
    """Time a callable after ``warmup`` untimed calls.

    Calls it ``runs`` times, or as many times as fit in ``duration`` seconds (default 2 s, at
    least 10 calls).
    """
    if runs is not None and duration is not None:
        raise InputError("give runs or duration, not both")
    if runs is not None and runs < 1:
        raise InputError(f"runs must be at least 1, got {runs}")
    for _ in range(max(0, warmup)):
        run()
    limit = DEFAULT_DURATION_S if runs is None and duration is None else duration
    latencies: list[float] = []
    start = time.perf_counter()
    while True:
        begin = time.perf_counter()
        run()
        latencies.append(time.perf_counter() - begin)
        if on_run is not None:
            on_run(len(latencies))
        if runs is not None:
            if len(latencies) >= runs:
                break
        elif time.perf_counter() - start >= limit and len(latencies) >= MIN_RUNS:
            break
    return summarize(latencies, batch=batch)


def benchmark(
    session: Session,
    inputs: Mapping[str, np.ndarray],
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int | None = None,
    duration: float | None = None,
    on_run: Callable[[int], None] | None = None,
) -> Stats:
    """Time ``session`` on ``inputs`` after ``warmup`` untimed runs.

    Runs ``runs`` times, or as many times as fit in ``duration`` seconds (default 2 s, at least
    10 runs).
    """
    bound = session.bind(inputs)
    return time_runs(
        bound.run, batch=bound.batch, warmup=warmup, runs=runs, duration=duration, on_run=on_run
    )
