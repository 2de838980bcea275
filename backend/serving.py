"""Concurrent serving with dynamic batching, and the load test that measures it.

The load test is closed-loop: ``concurrency`` clients each send one single-row request, wait
for its answer, and send the next, so ``concurrency`` requests are always outstanding (the
definition Triton's perf_analyzer uses). Clients and the server share one asyncio event loop;
inference runs on a worker thread (ONNX Runtime releases the GIL), so requests keep arriving
while a batch runs.

The server's :class:`DynamicBatcher` takes the waiting requests as a batch when it has
``max_batch`` of them, or when the oldest has waited ``batch_timeout_ms``, or as soon as the
worker is free and requests are waiting (requests that arrive during a run form the next
batch). It concatenates the batch along axis 0, runs once, and hands each client its rows.
Unbatched serving is the same server with ``max_batch=1`` and one worker thread per client,
so the two differ only in batching. For reference the load test also measures ``direct``
calls: each client thread calling the session itself, with no server in between, which is the
floor of per-request overhead that no server reaches.

The server may hold several *instances* of the model (sessions, each with its own threads;
Triton's instance groups): each batching worker owns one instance and runs one batch at a
time on it, so on a CPU two one-thread instances run two batches side by side instead of
splitting each operator of one batch over two threads. Unbatched workers and direct clients
are spread over the same instances.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.backend.benchmark import summarize
from onnxforge.backend.session import Session
from onnxforge.errors import InputError

__all__ = [
    "DynamicBatcher",
    "ServingStats",
    "LoadTestResult",
    "serve_load",
    "direct_load",
    "split_rows",
    "take_rows",
    "load_test",
    "instances",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_BATCH_TIMEOUT_MS",
    "DEFAULT_REQUESTS_PER_CLIENT",
    "default_max_batch",
]

DEFAULT_CONCURRENCY = 16
DEFAULT_MAX_BATCH = 16
# How long the oldest waiting request may wait for company before its batch runs anyway.
DEFAULT_BATCH_TIMEOUT_MS = 2.0
DEFAULT_REQUESTS_PER_CLIENT = 50

Request = Mapping[str, np.ndarray]
RunBatch = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]


def _rows_of(request: Request) -> int:
    return len(next(iter(request.values())))


def default_max_batch(concurrency: int, instances: int = 1) -> int:
    """The largest batch worth waiting for: each instance's share of the clients, at most 16.

    A closed loop of ``concurrency`` clients never has more requests outstanding, and with
    several instances a batch that took them all would leave the other instances idle.
    """
    return max(1, min(DEFAULT_MAX_BATCH, -(-concurrency // max(1, instances))))


def _per_worker(run: RunBatch | Sequence[RunBatch], workers: int | None) -> list[RunBatch]:
    """``workers`` run callables: one callable for all, or a list (instances) dealt in turn."""
    runs = [run] if callable(run) else list(run)
    if not runs:
        raise InputError("serving needs at least one model instance")
    count = len(runs) if workers is None else workers
    if count < 1:
        raise InputError(f"workers must be at least 1, got {count}")
    return [runs[i % len(runs)] for i in range(count)]


class DynamicBatcher:
    """Coalesce requests into batches of at most ``max_batch`` rows, run on worker threads.

    ``run`` is one callable, or one per model instance; ``workers`` (default: one per
    callable) are dealt the callables in turn, and a worker runs one batch at a time. Create
    and use it inside a running event loop: ``await batcher.infer(request)`` returns the
    request's outputs (each keeping its batch axis). ``close()`` stops it.
    """

    def __init__(
        self,
        run: RunBatch | Sequence[RunBatch],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS,
        workers: int | None = None,
    ) -> None:
        self._runs = _per_worker(run, workers)
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        if batch_timeout_ms < 0:
            raise InputError(f"batch_timeout_ms must not be negative, got {batch_timeout_ms}")
        self.max_batch = max_batch
        self.timeout_s = batch_timeout_ms / 1000.0
        self.batch_sizes: list[int] = []
        self._waiting: list[tuple[Request, asyncio.Future, float]] = []
        self._arrived = asyncio.Event()
        self._worker = concurrent.futures.ThreadPoolExecutor(
            len(self._runs), thread_name_prefix="onnxforge"
        )
        self._free: asyncio.Queue[int] = asyncio.Queue()  # idle workers, by index
        for index in range(len(self._runs)):
            self._free.put_nowait(index)
        self._running: set[asyncio.Task] = set()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def infer(self, request: Request) -> list[np.ndarray]:
        """Queue one request and wait for its outputs."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future, time.perf_counter()))
        self._arrived.set()
        return await future

    async def _next_batch(self) -> list[tuple[Request, asyncio.Future, float]]:
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._waiting[0][2] + self.timeout_s
        while sum(_rows_of(r) for r, _, _ in self._waiting) < self.max_batch:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch, rows = [], 0
        while self._waiting and rows + _rows_of(self._waiting[0][0]) <= self.max_batch:
            item = self._waiting.pop(0)
            batch.append(item)
            rows += _rows_of(item[0])
        if not batch:  # a single request larger than max_batch still runs, alone
            batch.append(self._waiting.pop(0))
        return batch

    async def _serve(self) -> None:
        while True:
            worker = await self._free.get()  # requests keep queueing while every worker is busy
            batch = await self._next_batch()
            task = asyncio.get_running_loop().create_task(self._run_batch(worker, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(
        self, worker: int, batch: list[tuple[Request, asyncio.Future, float]]
    ) -> None:
        loop = asyncio.get_running_loop()
        requests = [request for request, _, _ in batch]
        feed = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
        try:
            outputs = await loop.run_in_executor(self._worker, self._runs[worker], feed)
        except Exception as error:  # every waiting client hears about it
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            self._free.put_nowait(worker)
        self.batch_sizes.append(_rows_of(feed))
        offset = 0
        for request, future, _ in batch:
            size = _rows_of(request)
            if not future.done():
                future.set_result([out[offset : offset + size] for out in outputs])
            offset += size

    async def close(self) -> None:
        """Stop serving (requests still waiting are cancelled)."""
        for task in (self._task, *self._running):
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for _, future, _ in self._waiting:
            future.cancel()
        self._worker.shutdown(wait=True)


@dataclasses.dataclass(frozen=True)
class ServingStats:
    """Throughput (requests per second) and per-request latency under concurrent load."""

    requests: int
    throughput: float
    p50_ms: float
    p99_ms: float
    mean_batch: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LoadTestResult:
    """Unbatched and batched serving at the same concurrency."""

    concurrency: int
    max_batch: int
    batch_timeout_ms: float
    unbatched: ServingStats
    batched: ServingStats
    direct: ServingStats
    instances: int = 1

    @property
    def speedup(self) -> float:
        """Batched throughput over unbatched throughput."""
        return self.batched.throughput / self.unbatched.throughput

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures, with ``unbatched`` and ``batched`` objects."""
        return {
            "concurrency": self.concurrency,
            "max_batch": self.max_batch,
            "batch_timeout_ms": self.batch_timeout_ms,
            "instances": self.instances,
            "unbatched": self.unbatched.as_dict(),
            "batched": self.batched.as_dict(),
            "direct": self.direct.as_dict(),
            "speedup": self.speedup,
        }


def take_rows(pool: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """One request of ``count`` rows from ``pool``, cycling through its rows."""
    return {name: np.take(a, np.arange(count) % len(a), axis=0) for name, a in pool.items()}


def split_rows(pool: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Single-row requests from arrays that share their first (batch) axis."""
    count = _rows_of(pool)
    return [{name: array[i : i + 1] for name, array in pool.items()} for i in range(count)]


def serve_load(
    run: RunBatch | Sequence[RunBatch],
    requests: Sequence[Request],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_batch: int = DEFAULT_MAX_BATCH,
    batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS,
    requests_per_client: int = DEFAULT_REQUESTS_PER_CLIENT,
    workers: int | None = None,
) -> ServingStats:
    """Serve ``requests`` (cycled) to ``concurrency`` closed-loop clients through a batcher.

    ``run`` is one callable or one per model instance; ``workers`` inference threads (default:
    one per callable) run batches side by side.
    """
    if concurrency < 1 or requests_per_client < 1:
        raise InputError("concurrency and requests per client must be at least 1")
    if not requests:
        raise InputError("the load test needs at least one request")

    async def main() -> tuple[list[float], float, list[int]]:
        batcher = DynamicBatcher(
            run, max_batch=max_batch, batch_timeout_ms=batch_timeout_ms, workers=workers
        )
        latencies: list[float] = []

        async def client(index: int) -> None:
            for k in range(requests_per_client):
                request = requests[(index * requests_per_client + k) % len(requests)]
                begin = time.perf_counter()
                await batcher.infer(request)
                latencies.append(time.perf_counter() - begin)

        start = time.perf_counter()
        try:
            await asyncio.gather(*(client(i) for i in range(concurrency)))
        finally:
            elapsed = time.perf_counter() - start
            await batcher.close()
        return latencies, elapsed, batcher.batch_sizes

    latencies, elapsed, sizes = asyncio.run(main())
    stats = summarize(latencies, elapsed_s=elapsed)
    mean_batch = float(np.mean(sizes)) if sizes else 0.0
    return ServingStats(len(latencies), stats.throughput, stats.p50_ms, stats.p99_ms, mean_batch)


def direct_load(
    run: RunBatch | Sequence[RunBatch],
    requests: Sequence[Request],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    requests_per_client: int = DEFAULT_REQUESTS_PER_CLIENT,
) -> ServingStats:
    """``concurrency`` client threads each calling ``run`` themselves, with no server.

    With one callable per model instance, the clients are dealt the instances in turn.
    """
    runs = _per_worker(run, concurrency)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(concurrency + 1)

    def client(index: int) -> None:
        start_line.wait()
        try:
            for k in range(requests_per_client):
                request = requests[(index * requests_per_client + k) % len(requests)]
                begin = time.perf_counter()
                runs[index](request)
                latencies[index].append(time.perf_counter() - begin)
        except BaseException as error:  # re-raised after the join
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    start_line.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    flat = [x for per in latencies for x in per]
    stats = summarize(flat, elapsed_s=elapsed)
    return ServingStats(len(flat), stats.throughput, stats.p50_ms, stats.p99_ms, 1.0)


def load_test(
    session: Session | Sequence[Session],
    pool: Mapping[str, np.ndarray],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_batch: int | None = None,
    batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS,
    requests_per_client: int = DEFAULT_REQUESTS_PER_CLIENT,
    warmup: int = 3,
) -> LoadTestResult:
    """Serve single-row requests from ``pool`` (rows along axis 0) at ``concurrency``.

    Three ways, on the same sessions and requests: unbatched (``max_batch=1``, a worker per
    client), with dynamic batching (a worker per session), and as direct calls. ``session`` is
    one session or several instances of one model (see :func:`instances`); ``max_batch``
    defaults to :func:`default_max_batch`.
    """
    sessions = [session] if isinstance(session, Session) else list(session)
    if not sessions:
        raise InputError("the load test needs at least one session")
    if max_batch is None:
        max_batch = default_max_batch(concurrency, len(sessions))
    requests = split_rows(pool)
    full = take_rows(pool, max_batch)
    for each in sessions:
        for _ in range(warmup):  # both batch sizes: neither mode pays for first-run allocation
            each.run(requests[0])
            each.run(full)
    runs = [each.run for each in sessions]
    settings = {"concurrency": concurrency, "requests_per_client": requests_per_client}
    unbatched = serve_load(
        runs, requests, max_batch=1, batch_timeout_ms=0.0, workers=concurrency, **settings
    )
    batched = serve_load(
        runs, requests, max_batch=max_batch, batch_timeout_ms=batch_timeout_ms, **settings
    )
    direct = direct_load(runs, requests, **settings)
    return LoadTestResult(
        concurrency, max_batch, batch_timeout_ms, unbatched, batched, direct, len(sessions)
    )


def instances(
    model_or_path: ir.Model | str | os.PathLike[str],
    count: int,
    *,
    threads: int | None = None,
    **options: Any,
) -> list[Session]:
    """``count`` sessions of one model, each with ``threads`` intra-op threads.

    ``threads`` defaults to this process's cores divided among the instances (at least one);
    ``options`` go to every :class:`Session` (``ep``, ``graph_optimization``, ...).
    """
    if count < 1:
        raise InputError(f"instances must be at least 1, got {count}")
    if threads is None and count > 1:
        threads = max(1, _cores() // count)
    return [Session(model_or_path, threads=threads, **options) for _ in range(count)]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
