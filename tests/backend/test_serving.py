from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from onnxforge.backend import DynamicBatcher, Session, instances, load_test, make_inputs
from onnxforge.backend.serving import default_max_batch, direct_load, serve_load, split_rows
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
        with pytest.raises(InputError, match="instance"):
            DynamicBatcher([])

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


def _instance(index: int, calls: list[tuple[int, int]], lock: threading.Lock, busy: set[int]):
    """A fake model instance that records (instance, batch size) and fails if run twice at once."""

    def run(feed):
        with lock:
            assert index not in busy, f"instance {index} ran two batches at once"
            busy.add(index)
        time.sleep(0.003)
        with lock:
            busy.discard(index)
            calls.append((index, len(feed["x"])))
        return [feed["x"] + index * 100.0]

    return run


def test_batcher_runs_one_batch_at_a_time_on_each_instance():
    calls: list[tuple[int, int]] = []
    lock, busy = threading.Lock(), set()
    runs = [_instance(i, calls, lock, busy) for i in range(2)]
    requests = [{"x": np.full((1, 1), float(i))} for i in range(10)]
    stats = serve_load(
        runs, requests, concurrency=8, max_batch=4, batch_timeout_ms=1, requests_per_client=6
    )
    assert stats.requests == 48 == sum(size for _, size in calls)
    assert {index for index, _ in calls} == {0, 1}  # both instances served batches
    assert max(size for _, size in calls) <= 4


def test_batcher_hands_rows_back_from_the_instance_that_ran_them():
    calls: list[tuple[int, int]] = []
    lock, busy = threading.Lock(), set()
    runs = [_instance(i, calls, lock, busy) for i in range(2)]
    requests = [{"x": np.full((1, 1), float(i))} for i in range(12)]

    async def main():
        batcher = DynamicBatcher(runs, max_batch=3, batch_timeout_ms=5)
        try:
            return await asyncio.gather(*(batcher.infer(r) for r in requests))
        finally:
            await batcher.close()

    results = asyncio.run(main())
    for request, (out,) in zip(requests, results, strict=True):
        offset = float(out[0, 0] - request["x"][0, 0])
        assert offset in (0.0, 100.0)  # the request's own row, from one of the instances


def test_direct_load_deals_the_instances_to_the_clients():
    lock = threading.Lock()
    seen: list[int] = []

    def tagged(index):
        def run(feed):
            with lock:
                seen.append(index)
            return [feed["x"]]

        return run

    runs = [tagged(0), tagged(1)]
    direct_load(runs, [{"x": np.ones((1, 1))}], concurrency=4, requests_per_client=3)
    assert sorted(seen) == [0] * 6 + [1] * 6


def test_default_max_batch_is_each_instances_share_of_the_clients():
    assert default_max_batch(16) == 16
    assert default_max_batch(16, 2) == 8
    assert default_max_batch(5, 2) == 3
    assert default_max_batch(64) == 16  # never above the default cap
    assert default_max_batch(1, 4) == 1


def test_instances_divide_the_cores(make_tiny_model, monkeypatch):
    import onnxforge.backend.serving as serving

    monkeypatch.setattr(serving, "_cores", lambda: 4)
    model = make_tiny_model()
    two = instances(model, 2)
    assert len(two) == 2 and all(s.threads == 2 for s in two)
    assert [s.threads for s in instances(model, 8)] == [1] * 8
    assert instances(model, 1)[0].threads is None  # one instance: ONNX Runtime's default
    assert [s.threads for s in instances(model, 2, threads=3)] == [3, 3]
    with pytest.raises(InputError, match="at least 1"):
        instances(model, 0)


def test_load_test_on_instances(make_tiny_model, ep):
    model = make_tiny_model()
    sessions = instances(model, 2, ep=ep)
    pool = make_inputs(model, batch=32, seed=1)
    result = load_test(sessions, pool, concurrency=8, batch_timeout_ms=2, requests_per_client=10)
    assert result.instances == 2 and result.as_dict()["instances"] == 2
    assert result.max_batch == 4
    assert 1.0 <= result.batched.mean_batch <= 4.0
    for stats in (result.unbatched, result.batched, result.direct):
        assert stats.requests == 80
