"""Shared helpers and test passes for the pass-infrastructure tests.

Models are tiny and written as ONNX text inside the tests. The passes registered here are
deliberately simple (and some deliberately wrong); their names start with ``test-`` because the
registry is global.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxforge.backend import Session, compare_outputs, make_inputs
from onnxforge.passes import Pass, PassResult, Semantics, register
from onnxforge.passes import registry as _registry

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'

# y = Relu(Identity(x)): cleanup removes the Identity, collapse-relu has nothing to do.
IDENTITY_RELU = """
g (float[N,4] x) => (float[N,4] y) {
    a = Identity(x)
    y = Relu(a)
}
"""

# y = Relu(Relu(x * w)): every test pass below has something to rewrite in it.
SCALED_RELU = """
g (float[N,4] x) => (float[N,4] y) <float[4] w = {0.5, -1.5, 2.0, 3.0}> {
    a = Identity(x)
    m = Mul(a, w)
    r = Relu(m)
    y = Relu(r)
}
"""


def build(text: str) -> ir.Model:
    """An IR model from ONNX text; the ``<ir_version, opset_import>`` header is added if absent."""
    if not text.lstrip().startswith("<"):
        text = HEADER + text
    return ir.from_onnx_text(text)


def as_text(model: ir.Model) -> str:
    """The model's full text (initializer values included), for before/after comparisons."""
    return ir.to_onnx_text(model)


def run(model: ir.Model, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model once with ONNX Runtime on the CPU."""
    return Session(model).run(inputs)


def inputs_for(model: ir.Model, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs at batch 3, so that Relu sees negative values."""
    return make_inputs(model, batch=3, seed=seed)


def assert_valid(model: ir.Model) -> None:
    """The ONNX checker with full shape and type inference."""
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def assert_bitwise_equal(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> None:
    """Same number of outputs, same shapes and dtypes, same bits (exact semantics)."""
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        assert r.dtype == g.dtype
        np.testing.assert_array_equal(r, g)
    comparison = compare_outputs(ref, got)
    assert comparison.finite
    assert comparison.max_abs == 0.0
    assert comparison.rel_l2 == 0.0


def array_text(name: str, array: np.ndarray) -> str:
    """An initializer in ONNX text: ``float[2,3] w = {...}``."""
    kind = {np.float32: "float", np.float64: "double", np.int64: "int64"}[array.dtype.type]
    values = ", ".join(repr(v.item()) for v in array.reshape(-1))
    return f"{kind}[{','.join(map(str, array.shape))}] {name} = {{{values}}}"


def weights(**arrays: np.ndarray) -> str:
    """The ``<...>`` initializer list of a graph."""
    return "<" + ", ".join(array_text(name, a) for name, a in arrays.items()) + ">"


def normal(*shape: int, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal float32 weights."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def positive(*shape: int, seed: int = 0) -> np.ndarray:
    """Seeded float32 weights in [0.5, 2) (scales, variances)."""
    return np.random.default_rng(seed).uniform(0.5, 2.0, shape).astype(np.float32)


def op_counts(model: ir.Model) -> collections.Counter[str]:
    """How many nodes of each op type, subgraphs included."""
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


# ---------------------------------------------------------------------------------------------
# Keeping the test passes out of other tests' way
#
# The registry is global and these test modules register passes when they are imported, which
# pytest does for every module before running any test. Other suites compare the registry with
# what a fresh `onnxforge passes` process lists, so the passes registered by this package are
# parked right after collection and registered only while this package's tests run.

_PACKAGE = __name__.rpartition(".")[0]
_parked: dict[str, type] = {}


def _park_test_passes() -> None:
    for name, cls in _registry.available_passes().items():
        if cls.__module__ == _PACKAGE or cls.__module__.startswith(f"{_PACKAGE}."):
            _parked[name] = cls
            _registry.unregister(name)


def pytest_collection_finish(session: pytest.Session) -> None:
    """After every module is imported: take this package's test passes out of the registry."""
    if _PACKAGE:
        _park_test_passes()


@pytest.fixture(scope="package", autouse=True)
def _test_passes_registered():
    """The test passes are registered while this package's tests run, and parked after."""
    if not _PACKAGE:  # not imported as a package: nothing to isolate
        yield
        return
    _park_test_passes()
    for cls in _parked.values():
        _registry.register(cls)
    yield
    _park_test_passes()


@pytest.fixture
def identity_relu() -> ir.Model:
    """A fresh ``y = Relu(Identity(x))`` model."""
    return build(IDENTITY_RELU)


@pytest.fixture
def scaled_relu() -> ir.Model:
    """A fresh ``y = Relu(Relu(Identity(x) * w))`` model."""
    return build(SCALED_RELU)


@register
class NoOpPass(Pass):
    """Changes nothing and says so."""

    name = "test-noop"
    summary = "Do nothing."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


@register
class ReluToSigmoidPass(Pass):
    """WRONG on purpose: claims to be exact but turns every Relu into a Sigmoid."""

    name = "test-relu-to-sigmoid"
    summary = "Replace Relu with Sigmoid (a deliberately wrong 'exact' pass)."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
                modified = True
        return PassResult(model, modified)


DEFAULT_FACTOR = 2.0


@register
class ScaleInitializersPass(Pass):
    """WRONG on purpose when declared exact: multiplies every float initializer by ``factor``."""

    name = "test-scale-initializers"
    summary = "Multiply float initializers by a factor (a deliberately wrong 'exact' pass)."
    semantics = Semantics.EXACT

    def __init__(self, *, factor: float = DEFAULT_FACTOR) -> None:
        self.factor = factor

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if np.issubdtype(array.dtype, np.floating):
                value.const_value = ir.tensor(
                    array * array.dtype.type(self.factor), name=value.name
                )
                modified = True
        return PassResult(model, modified)


DEFAULT_PERTURBATION = 0.0


@register
class PerturbPass(Pass):
    """A lossy pass: multiplies every float initializer by ``1 + scale``."""

    name = "test-perturb"
    summary = "Scale float initializers by 1 + scale (a lossy pass with a known drift)."
    semantics = Semantics.LOSSY

    def __init__(self, *, scale: float = DEFAULT_PERTURBATION) -> None:
        self.scale = scale

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if self.scale and np.issubdtype(array.dtype, np.floating):
                scaled = (array.astype(np.float64) * (1.0 + self.scale)).astype(array.dtype)
                value.const_value = ir.tensor(scaled, name=value.name)
                modified = True
        return PassResult(model, modified)


class CrashError(RuntimeError):
    """What the crashing test pass raises."""


@register
class CrashAfterEditPass(Pass):
    """Turns the first Relu into a Neg, then crashes: the model it leaves behind is half-done."""

    name = "test-crash"
    summary = "Edit the model, then raise (a deliberately crashing pass)."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Neg"
                break
        raise CrashError("boom: the test pass crashed on purpose")
