"""Backend: ONNX Runtime sessions, inputs, and output comparison.

Benchmarking and concurrent load tests arrive with their issue (see ``docs/roadmap.md``).
"""

from __future__ import annotations

from onnxforge.backend.inputs import InputSpec, input_specs, load_inputs, make_inputs
from onnxforge.backend.numerics import OutputComparison, compare_outputs
from onnxforge.backend.session import Session, available_eps

__all__ = [
    "Session",
    "available_eps",
    "InputSpec",
    "input_specs",
    "make_inputs",
    "load_inputs",
    "OutputComparison",
    "compare_outputs",
]
