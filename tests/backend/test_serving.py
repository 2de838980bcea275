from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from onnxforge.backend import DynamicBatcher, Session, load_test, make_inputs
from onnxforge.backend.serving import direct_load, serve_load, split_rows
from onnxforge.errors import InputError


def _echo_run(calls: list[int]):
    """A fake model: doubles x, and records each batch size it was given."""

    def run(feed):
        calls.append(len(feed["x"]))
        return [feed["x"] * 2.0, feed["x"].sum(axis=1, keepdims=True)]

    return run


def test_split_rows_keeps_the_batch_axis():
    pool = {"x": np.arange(12.0).reshape(4, 3), "m": np.ones((4, 2), np.int64)}
    rows = split_rows(pool)
    assert len(rows) == 4
    for i, row in enumerate(rows):
        assert row["x"].shape == (1, 3) and row["m"].shape == (1, 2)
        np.testing.assert_array_equal(row["x"][0], pool["x"][i])


def test_batcher_hands_each_client_its_own_rows():
    calls: list[int] = []
    requests = [{"x": np.full((1, 3), float(i))} for i in range(40)]

    async def main():
        batcher = DynamicBatcher(_echo_run(calls), max_batch=8, batch_timeout_ms=50)
        try:
            return await asyncio.gather(*(batcher.infer(r) for r in requests))
        finally:
            await batcher.close()

    results = asyncio.run(main())
    for request, (doubled, total) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(doubled, request["x"] * 2.0)
        np.testing.assert_array_equal(total, request["x"].sum(axis=1, keepdims=True))
    assert sum(calls) == 40
    assert max(calls) <= 8
    assert len(calls) < 40  # requests really were coalesced


def test_batcher_runs_a_lone_request_after_the_timeout():
    calls: list[int] = []

    async def main():
        batcher = DynamicBatcher(_echo_run(calls), max_batch=16, batch_timeout_ms=20)
        try:
            begin = time.perf_counter()
            await batcher.infer({"x": np.ones((1, 2))})
            return time.perf_counter() - begin
        finally:
            await batcher.close()

    waited = asyncio.run(main())
    assert calls == [1]
    assert waited >= 0.015  # it waited for company, then ran alone


def test_batcher_reports_a_failing_batch_to_every_client():
    def broken(feed):
        raise RuntimeError("kernel exploded")

    async def main():
        batcher = DynamicBatcher(broken, max_batch=4, batch_timeout_ms=5)
        try:
            return await asyncio.gather(
                *(batcher.infer({"x": np.ones((1, 1))}) for _ in range(3)), return_exceptions=True
            )
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)


def test_batcher_rejects_bad_settings():
    async def main():
        with pytest.raises(InputError):
            DynamicBatcher(_echo_run([]), max_batch=0)
        with pytest.raises(InputError):
            DynamicBatcher(_echo_run([]), workers=0)

    asyncio.run(main())


def test_serve_load_counts_requests_and_batches():
    calls: list[int] = []
    requests = [{"x": np.full((1, 2), float(i))} for i in range(10)]
    stats = serve_load(
        _echo_run(calls),
        requests,
        concurrency=8,
        max_batch=4,
        batch_timeout_ms=5,
        requests_per_client=6,
    )
    assert stats.requests == 48 == sum(calls)
    assert max(calls) <= 4
    assert stats.mean_batch == pytest.approx(np.mean(calls))
    assert stats.throughput > 0 and stats.p99_ms >= stats.p50_ms > 0


def test_unbatched_serving_runs_single_rows_side_by_side():
    calls: list[int] = []
    active, peak = [0], [0]
    lock = threading.Lock()

    def slow(feed):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.005)
        with lock:
            active[0] -= 1
        calls.append(len(feed["x"]))
        return [feed["x"]]

    requests = [{"x": np.ones((1, 1))}]
    serve_load(
        slow,
        requests,
        concurrency=4,
        max_batch=1,
        batch_timeout_ms=0,
        workers=4,
        requests_per_client=3,
    )
    assert set(calls) == {1}
    assert peak[0] > 1  # several workers ran at once


def test_direct_load_calls_the_model_from_every_client():
    calls: list[int] = []
    stats = direct_load(
        _echo_run(calls), [{"x": np.ones((1, 2))}], concurrency=5, requests_per_client=4
    )
    assert stats.requests == 20 == len(calls)


def test_load_test_on_a_real_session(make_tiny_model, ep):
    model = make_tiny_model()
    session = Session(model, ep=ep)
    pool = make_inputs(model, batch=32, seed=1)
    result = load_test(
        session, pool, concurrency=8, max_batch=8, batch_timeout_ms=2, requests_per_client=10
    )
    data = result.as_dict()
    for mode in ("unbatched", "batched", "direct"):
        assert {"throughput", "p50_ms", "p99_ms"} <= set(data[mode])
        assert data[mode]["requests"] == 80
    assert data["unbatched"]["mean_batch"] == 1.0
    assert 1.0 <= data["batched"]["mean_batch"] <= 8.0
    assert result.speedup == pytest.approx(result.batched.throughput / result.unbatched.throughput)
