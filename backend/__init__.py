"""Backend: ONNX Runtime sessions, inputs, output comparison, benchmarks, serving load tests."""

from __future__ import annotations

from onnxforge.backend.benchmark import Stats, benchmark
from onnxforge.backend.inputs import InputSpec, input_specs, load_inputs, make_inputs
from onnxforge.backend.numerics import OutputComparison, compare_outputs
from onnxforge.backend.serving import (
    DynamicBatcher,
    LoadTestResult,
    ServingStats,
    instances,
    load_test,
)
from onnxforge.backend.session import BoundRun, Session, available_eps

__all__ = [
    "Session",
    "BoundRun",
    "available_eps",
    "InputSpec",
    "input_specs",
    "make_inputs",
    "load_inputs",
    "OutputComparison",
    "compare_outputs",
    "Stats",
    "benchmark",
    "DynamicBatcher",
    "ServingStats",
    "LoadTestResult",
    "load_test",
    "instances",
]
