from __future__ import annotations

import numpy as np
import pytest

from onnxforge.backend import Session, benchmark, make_inputs
from onnxforge.backend.benchmark import MIN_RUNS, summarize
from onnxforge.errors import InputError


def test_summarize_computes_percentiles_and_throughput():
    latencies = [0.001 * i for i in range(1, 101)]  # 1..100 ms
    stats = summarize(latencies, batch=4)
    ms = np.arange(1, 101, dtype=float)
    assert stats.runs == 100
    assert stats.p50_ms == pytest.approx(np.percentile(ms, 50))
    assert stats.p90_ms == pytest.approx(np.percentile(ms, 90))
    assert stats.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert stats.mean_ms == pytest.approx(ms.mean())
    assert stats.stdev_ms == pytest.approx(ms.std(ddof=1))
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.throughput == pytest.approx(4 * 100 / sum(latencies))


def test_summarize_uses_the_wall_time_when_given():
    assert summarize([0.01, 0.01], elapsed_s=0.01).throughput == pytest.approx(200.0)
    with pytest.raises(InputError):
        summarize([])


def test_benchmark_counts_runs_and_batch(make_tiny_model, ep):
    model = make_tiny_model()
    session = Session(model, ep=ep)
    seen = []
    stats = benchmark(session, make_inputs(model, batch=3), warmup=1, runs=7, on_run=seen.append)
    assert stats.runs == 7 and stats.batch == 3
    assert seen == list(range(1, 8))
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms


def test_benchmark_by_duration_runs_at_least_the_minimum(make_tiny_model):
    model = make_tiny_model()
    stats = benchmark(Session(model), make_inputs(model), warmup=0, duration=0.0)
    assert stats.runs == MIN_RUNS


def test_benchmark_rejects_runs_and_duration_together(make_tiny_model):
    model = make_tiny_model()
    with pytest.raises(InputError, match="not both"):
        benchmark(Session(model), make_inputs(model), runs=3, duration=1.0)
    with pytest.raises(InputError, match="at least 1"):
        benchmark(Session(model), make_inputs(model), runs=0)


def test_bound_run_gives_the_same_outputs_as_run(make_tiny_model, ep):
    model = make_tiny_model()
    session = Session(model, ep=ep)
    inputs = make_inputs(model, batch=5, seed=3)
    bound = session.bind(inputs)
    bound.run()
    for got, want in zip(bound.outputs(), session.run(inputs), strict=True):
        np.testing.assert_array_equal(got, want)


def test_cuda_graph_needs_cuda(make_tiny_model, ep):
    if ep != "cuda":
        with pytest.raises(InputError, match="CUDA graphs need the cuda"):
            Session(make_tiny_model(), ep="cpu", cuda_graph=True)
        return
    # A static-shape model replayed from a captured CUDA graph gives the same outputs.
    import onnx_ir as ir

    model = make_tiny_model()
    model.graph.inputs[0].shape = ir.Shape([4, model.graph.inputs[0].shape[1]])
    model.graph.outputs[0].shape = ir.Shape([4, model.graph.outputs[0].shape[1]])
    inputs = make_inputs(model, seed=2)
    plain = Session(model, ep="cuda").run(inputs)
    bound = Session(model, ep="cuda", cuda_graph=True).bind(inputs)
    for _ in range(3):  # capture, then replay
        bound.run()
    np.testing.assert_allclose(bound.outputs()[0], plain[0], rtol=1e-6, atol=1e-6)
