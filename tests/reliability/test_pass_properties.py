"""Properties every shipped pass keeps, on random small models (hypothesis).

For every pass that onnxforge ships (its own and the example plug-in; test passes registered
by other test modules are left out), with default options, on random graphs:

- the graph's inputs and outputs keep their names, order, element types and ranks;
- a :class:`~onnxforge.passes.FunctionalPass` never modifies the caller's model (its
  serialised bytes are the same before and after), and returns another model object;
- the result serialises, and loads back through ``onnxforge.load`` (so through validation).

A pass may refuse a model with an :class:`~onnxforge.errors.OnnxforgeError` (a clean refusal);
any other exception is a bug. A fixed model exercises each pass too, and there no refusal is
allowed, so that no pass satisfies the property by refusing everything.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxforge
from onnxforge.errors import OnnxforgeError
from onnxforge.passes import FunctionalPass, available_passes

from . import hostile

WIDTH = 4
SHIPPED = sorted(
    name for name, cls in available_passes().items() if cls.__module__.startswith("onnxforge.")
)
UNARY = ("Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Identity")
BINARY = ("Add", "Mul", "Sub")
# Weights from a small pool, so that duplicate initializers are common.
POOL = (
    np.array([1.0, 2.0, 3.0, 4.0], np.float32),
    np.array([0.5, -1.0, 2.0, -0.25], np.float32),
)


def _activation(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", WIDTH])


@st.composite
def random_models(draw) -> onnx.ModelProto:
    """A random DAG over x, z: float[N, 4]: elementwise ops, MatMul(+Add), no-ops, constants,
    a shape chain into Reshape, Identity copies; outputs any computed values (or an input)."""
    values = ["x", "z"]
    nodes: list[onnx.NodeProto] = []
    initializers: dict[str, onnx.TensorProto] = {}

    def weight(kind: str) -> str:
        index = draw(st.integers(0, len(POOL) - 1))
        if kind == "matrix":
            array = np.outer(POOL[index], POOL[1 - index]).astype(np.float32)
        else:
            array = POOL[index]
        name = f"w{len(initializers)}"
        initializers[name] = numpy_helper.from_array(array, name)
        return name

    for step in range(draw(st.integers(1, 9))):
        out = f"v{step}"
        a = draw(st.sampled_from(values))
        kind = draw(
            st.sampled_from(
                ["unary", "binary", "bias", "matmul", "gemm", "noop", "constant", "reshape"]
            )
        )
        if kind == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(UNARY)), [a], [out]))
        elif kind == "binary":
            b = draw(st.sampled_from(values))
            nodes.append(helper.make_node(draw(st.sampled_from(BINARY)), [a, b], [out]))
        elif kind == "bias":
            op = draw(st.sampled_from(("Add", "Mul")))
            nodes.append(helper.make_node(op, [a, weight("vector")], [out]))
        elif kind == "matmul":
            nodes.append(helper.make_node("MatMul", [a, weight("matrix")], [out]))
        elif kind == "gemm":  # MatMul + Add: what fuse turns into Gemm
            nodes.append(helper.make_node("MatMul", [a, weight("matrix")], [f"{out}_m"]))
            addend = draw(st.sampled_from([weight("vector"), f"{out}_m", a]))
            nodes.append(helper.make_node("Add", [f"{out}_m", addend], [out]))
        elif kind == "noop":
            noop = draw(st.sampled_from(("Transpose", "Cast", "Dropout")))
            attributes = {"Transpose": {"perm": [0, 1]}, "Cast": {"to": 1}}.get(noop, {})
            nodes.append(helper.make_node(noop, [a], [out], **attributes))
        elif kind == "constant":
            index = draw(st.integers(0, len(POOL) - 1))
            tensor = numpy_helper.from_array(POOL[index], f"{out}_value")
            nodes.append(helper.make_node("Constant", [], [f"{out}_c"], value=tensor))
            nodes.append(helper.make_node("Mul", [a, f"{out}_c"], [out]))
        else:  # Reshape(a, Concat(Gather(Shape(a), [0]), [-1])): shape arithmetic to fold
            for name, array in (("index0", [0]), ("minus1", [-1])):
                initializers[name] = numpy_helper.from_array(np.array(array, np.int64), name)
            nodes += [
                helper.make_node("Shape", [a], [f"{out}_s"]),
                helper.make_node("Gather", [f"{out}_s", "index0"], [f"{out}_n"], axis=0),
                helper.make_node("Concat", [f"{out}_n", "minus1"], [f"{out}_shape"], axis=0),
                helper.make_node("Reshape", [a, f"{out}_shape"], [out]),
            ]
        values.append(out)
    computed = values[2:]
    outputs = draw(st.lists(st.sampled_from(computed), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()) and draw(st.booleans()):
        outputs.append("z")  # a graph input that is also a graph output
    return hostile.model_proto(
        nodes,
        inputs=[_activation("x"), _activation("z")],
        outputs=[_activation(name) for name in outputs],
        initializers=list(initializers.values()),
    )


def _signature(values) -> list[tuple[str, object, int | None]]:
    return [(v.name, v.dtype, v.shape.rank() if v.shape is not None else None) for v in values]


def _serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def check_pass(name: str, proto: onnx.ModelProto, *, refusal_allowed: bool = True) -> None:
    """Run pass ``name`` on the model and check every property in the module docstring."""
    cls = available_passes()[name]
    model = ir.serde.deserialize_model(proto)
    inputs, outputs = _signature(model.graph.inputs), _signature(model.graph.outputs)
    before = _serialized(model)
    try:
        result = cls()(model)
    except OnnxforgeError as error:
        if not refusal_allowed:
            raise
        assert str(error)  # a refusal says why
        return
    if issubclass(cls, FunctionalPass):
        assert result.model is not model
        assert _serialized(model) == before, f"{name} modified the caller's model"
    assert _signature(result.model.graph.inputs) == inputs
    assert _signature(result.model.graph.outputs) == outputs
    reloaded = onnxforge.load(_serialized(result.model))
    assert _signature(reloaded.graph.outputs) == outputs


@pytest.mark.parametrize("name", SHIPPED)
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(proto=random_models())
def test_every_pass_keeps_the_signature_and_the_callers_model(name, proto):
    check_pass(name, proto)


FIXED = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[N, 4] x, float[N, 4] z) => (float[N, 4] y, float[N, 4] u) <
    float[4, 4] w = {1., 0., 0., 0., 0., 2., 0., 0., 0., 0., 3., 0., 0., 0., 0., 4.},
    float[4] b = {0.5, -0.5, 0.25, 1.0},
    float[4] b2 = {0.5, -0.5, 0.25, 1.0}
> {
    i = Identity(x)
    m = MatMul(i, w)
    a = Add(m, b)
    r = Relu(a)
    r2 = Relu(r)
    y = Mul(r2, b2)
    u = Add(z, b)
}
"""


@pytest.mark.parametrize("name", SHIPPED)
def test_every_pass_accepts_a_plain_model(name):
    # No refusal here: a pass cannot satisfy the property above by refusing every model.
    check_pass(name, ir.to_proto(ir.from_onnx_text(FIXED)), refusal_allowed=False)


def test_fuse_leaves_an_add_of_a_product_to_itself_alone():
    # Found by the property above: Add(m, m) after MatMul made fuse's Gemm rule remove m
    # while the Gemm still read it (ValueError inside the rewriter).
    model = ir.from_onnx_text(
        """<ir_version: 10, opset_import: ["" : 20]>
        g (float[N, 4] x) => (float[N, 4] y) <float[4, 4] w = {1., 2., 3., 4., 5., 6., 7., 8.,
            9., 10., 11., 12., 13., 14., 15., 16.}> {
            m = MatMul(x, w)
            y = Add(m, m)
        }"""
    )
    from onnxforge.backend import Session

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (expected,) = Session(model).run({"x": x})
    result = available_passes()["fuse"]()(model)
    (actual,) = Session(result.model).run({"x": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_lifting_constants_in_a_clone_leaves_the_callers_tensors_alone():
    # Found by the property above (quantize lifts constants in its working copy): onnx-ir
    # renames an initializer's tensor when it serialises, and a clone shares the Constant's
    # tensor object with the original, whose Constant then changed.
    from onnxforge.passes.cleanup import lift_constants

    model = ir.from_onnx_text(
        """<ir_version: 10, opset_import: ["" : 20]>
        g (float[N, 4] x) => (float[N, 4] y) {
            c = Constant <value: tensor = float[4] c_value {1., 2., 3., 4.}> ()
            y = Mul(x, c)
        }"""
    )
    before = _serialized(model)
    working = model.clone()
    assert lift_constants(working) == 1
    _serialized(working)
    assert _serialized(model) == before
    assert working.graph.initializers["c"].const_value.numpy().tolist() == [1, 2, 3, 4]
