"""``fp16``: float16 weights and activations, sensitive parts kept float32 (STYLE.md rule 5).

The pass is lossy: its numerics are held to a stated budget, relative L2 error below
``BUDGET`` against the float32 model through ONNX Runtime, and at most ``ACCURACY_DROP`` of
top-1 accuracy on the digits classifier's held-out data. ONNX Runtime on the CPU runs most
ops of a float16 graph in float32 (it casts around them and drops the Cast pairs), so the tests
that show what float16 arithmetic would do to a node (overflow) use ONNX's reference evaluator,
where every op rounds its result to its declared type.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from onnx.reference import ReferenceEvaluator

import onnxforge
from onnxforge.backend import compare_outputs, make_inputs
from onnxforge.errors import InputError
from onnxforge.passes import Semantics, get_pass
from onnxforge.passes.base import CUDA_PROVIDER_OPTIONS_KEY
from onnxforge.passes.fp16 import (
    CUDA_CONV_PROVIDER_OPTIONS,
    DEFAULT_MAX_FINITE,
    DEFAULT_OP_BLOCK_LIST,
    Float16Pass,
    load_calibration_ranges,
)
from onnxforge.passes.pipeline import canonical_pipeline
from onnxforge.passes.statistics import model_stats
from onnxforge.samples import get_sample

from .conftest import as_text, assert_valid, build, inputs_for, normal, op_counts, run, weights

# Largest relative L2 error of the outputs against float32, through ONNX Runtime.
BUDGET = 1e-2
# Largest drop of top-1 accuracy on held-out data.
ACCURACY_DROP = 0.01
FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def fp16(model: ir.Model, **options) -> bool:
    """Run the pass in place; returns ``modified``."""
    result = Float16Pass(**options)(model)
    assert result.model is model  # an in-place pass
    return result.modified


def typed(model: ir.Model) -> ir.Model:
    """A copy whose values all carry their types (ONNX shape inference)."""
    copy = model.clone()
    ir.passes.common.ShapeInferencePass()(copy)
    return copy


def value(model: ir.Model, name: str) -> ir.Value:
    """The main graph's value called ``name``."""
    for candidate in (*model.graph.inputs, *model.graph.initializers.values()):
        if candidate.name == name:
            return candidate
    for node in model.graph:
        for output in node.outputs:
            if output.name == name:
                return output
    raise KeyError(name)


def node_of(model: ir.Model, op_type: str) -> ir.Node:
    """The only node of ``op_type`` in the main graph."""
    (node,) = [n for n in model.graph if n.op_type == op_type]
    return node


def cast_chains(model: ir.Model) -> list[str]:
    """Casts that read a Cast and undo it: float32 -> float16 -> float32 or the reverse."""
    chains = []
    for node in model.graph:
        producer = node.inputs[0].producer() if node.op_type == "Cast" else None
        if producer is None or producer.op_type != "Cast":
            continue
        source = producer.inputs[0].dtype
        middle = producer.attributes["to"].as_int()
        target = node.attributes["to"].as_int()
        if {source, middle} == {FLOAT, FLOAT16} and target == source:
            chains.append(f"{producer.name} -> {node.name}")
    return chains


def check_fp16(text: str, inputs: dict[str, np.ndarray] | None = None, **options) -> ir.Model:
    """Convert and check what every conversion must satisfy; return the result, typed.

    The result is valid, keeps the graph's input and output names, has no Cast pair that
    undoes itself, stays within the budget through ONNX Runtime, and a second run changes
    nothing. The returned copy carries every value's type (the texts declare only the graph's).
    """
    original = build(text)
    model = build(text)
    inputs = inputs if inputs is not None else inputs_for(model)
    text_before = as_text(model)
    modified = fp16(model, **options)
    assert modified == (as_text(model) != text_before)  # modified is honest
    assert_valid(model)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    assert cast_chains(model) == []
    feed = {
        name: array.astype(np.float16) if value(model, name).dtype == FLOAT16 else array
        for name, array in inputs.items()
    }
    got = [np.asarray(a, dtype=np.float32) for a in run(model, feed)]
    comparison = compare_outputs(run(original, inputs), got)
    assert comparison.finite
    assert comparison.rel_l2 < BUDGET
    settled = as_text(model)
    assert fp16(model, **options) is False
    assert as_text(model) == settled
    return typed(model)


def reference_run(model: ir.Model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The first output from ONNX's reference evaluator, in float64."""
    return ReferenceEvaluator(ir.to_proto(model)).run(None, inputs)[0].astype(np.float64)


def relative_error(reference: np.ndarray, got: np.ndarray) -> float:
    """Relative L2 error; infinite when ``got`` is not finite."""
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


def test_semantics_name_and_registration() -> None:
    assert Float16Pass.name == "fp16"
    assert Float16Pass.semantics is Semantics.LOSSY
    assert get_pass("fp16") is Float16Pass
    assert DEFAULT_MAX_FINITE == 65504.0
    assert canonical_pipeline("fp16{keep_io_types=false,op_block_list=Exp,Log}") == (
        "fp16{keep_io_types=false,op_block_list=Exp,Log}"
    )
    assert canonical_pipeline(f"fp16{{op_block_list={','.join(DEFAULT_OP_BLOCK_LIST)}}}") == "fp16"


# ---------------------------------------------------------------------------------------------
# The rewrite on a tiny graph

WEIGHTS = ", ".join(f"{v:.3f}" for v in np.linspace(-1.0, 1.0, 16))
LINEAR = f"""
g (float[N,4] x) => (float[N,4] y)
    <float[4,4] w = {{{WEIGHTS}}}, float[4] b = {{0.5, -0.25, 1.0, 2.0}}> {{
    m = MatMul(x, w)
    a = Add(m, b)
    y = Relu(a)
}}
"""


def test_tiny_graph_is_converted() -> None:
    model = check_fp16(LINEAR)
    assert op_counts(model) == {"Cast": 2, "MatMul": 1, "Add": 1, "Relu": 1}
    first, *_, last = model.graph
    assert first.op_type == last.op_type == "Cast"
    assert first.inputs[0] is model.graph.inputs[0]
    assert last.outputs[0] is model.graph.outputs[0]
    for name in ("w", "b", "m", "a"):
        assert value(model, name).dtype == FLOAT16, name
    assert model.graph.initializers["w"].const_value.dtype == FLOAT16
    np.testing.assert_array_equal(
        model.graph.initializers["b"].const_value.numpy(),
        np.array([0.5, -0.25, 1.0, 2.0], np.float16),
    )
    before, after = model_stats(build(LINEAR)), model_stats(model)
    assert after.parameters == before.parameters
    assert after.parameter_bytes * 2 == before.parameter_bytes


@pytest.mark.parametrize("keep_io_types", [True, False])
def test_keep_io_types(keep_io_types: bool) -> None:
    model = check_fp16(LINEAR, keep_io_types=keep_io_types)
    dtype = FLOAT if keep_io_types else FLOAT16
    assert [v.dtype for v in model.graph.inputs] == [dtype]
    assert [v.dtype for v in model.graph.outputs] == [dtype]
    assert op_counts(model)["Cast"] == (2 if keep_io_types else 0)
    x = inputs_for(model)["x"].astype(np.float32 if keep_io_types else np.float16)
    (y,) = run(model, {"x": x})
    assert y.dtype == (np.float32 if keep_io_types else np.float16)


def test_value_that_is_both_graph_output_and_consumed() -> None:
    model = check_fp16(
        f"""
        g (float[N,4] x) => (float[N,4] m, float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}> {{
            m = MatMul(x, w)
            y = Relu(m)
        }}
        """
    )
    relu = node_of(model, "Relu")
    assert relu.inputs[0].dtype == FLOAT16  # the consumer reads float16, not the output's Cast
    assert [v.dtype for v in model.graph.outputs] == [FLOAT, FLOAT]
    assert op_counts(model)["Cast"] == 3  # x in, m and y out


def test_input_read_by_float32_and_float16_nodes_gets_one_cast() -> None:
    model = check_fp16(
        f"""
        g (float[N,4] x) => (float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}> {{
            m = MatMul(x, w)
            e = Exp(x)
            n = MatMul(x, w)
            s = Add(m, n)
            y = Mul(s, e)
        }}
        """
    )
    casts = [n for n in model.graph if n.op_type == "Cast"]
    assert len(casts) == 3  # x to float16 once, Exp's output to float16, y to float32
    exp = node_of(model, "Exp")
    assert exp.inputs[0] is model.graph.inputs[0]  # the blocked node reads x itself


def test_no_op_on_a_model_without_float32() -> None:
    for text in (
        "g (int64[N,4] x) => (int64[N,4] y) <int64[4] w = {1, 2, 3, 4}> "
        "{ a = Mul(x, w)\n y = Neg(a) }",
        "g (double[N,4] x) => (double[N,4] y) { a = Exp(x)\n y = Neg(a) }",
        "g (float16[N,4] x) => (float16[N,4] y) { a = Relu(x)\n y = Neg(a) }",
    ):
        model = build(text)
        before = as_text(model)
        assert fp16(model) is False
        assert as_text(model) == before


def test_pass_infers_types_on_a_copy_only() -> None:
    # intermediate values have no type here: the pass infers them, and adds none to a model
    # that it leaves alone
    model = build("g (int64[N,4] x) => (int64[N,4] y) { a = Neg(x)\n y = Abs(a) }")
    assert value(model, "a").dtype is None
    before = as_text(model)
    assert fp16(model) is False
    assert as_text(model) == before


# ---------------------------------------------------------------------------------------------
# What stays float32

GAMMA = ", ".join(f"{v:.3f}" for v in np.linspace(0.5, 1.5, 64))
DECOMPOSED_LAYER_NORM = f"""
g (float[N,64] x) => (float[N,64] y)
    <int64[1] axes = {{-1}}, float two = {{2.0}}, float eps = {{1e-5}},
     float[64] gamma = {{{GAMMA}}}> {{
    mu = ReduceMean<keepdims=1>(x, axes)
    d = Sub(x, mu)
    sq = Pow(d, two)
    var = ReduceMean<keepdims=1>(sq, axes)
    v = Add(var, eps)
    s = Sqrt(v)
    n = Div(d, s)
    y = Mul(n, gamma)
}}
"""


def test_blocked_ops_stay_float32() -> None:
    model = typed(check_fp16(DECOMPOSED_LAYER_NORM))
    for op in ("ReduceMean", "Pow", "Sqrt"):
        for node in model.graph:
            if node.op_type == op:
                floats = [v for v in (*node.inputs, *node.outputs) if v.dtype in (FLOAT, FLOAT16)]
                assert {v.dtype for v in floats} == {FLOAT}, op
    # Sub and Div compute in float16; the Add of eps sits between float32 nodes and stays
    for op, dtype in (("Sub", FLOAT16), ("Div", FLOAT16), ("Mul", FLOAT16), ("Add", FLOAT)):
        assert node_of(model, op).outputs[0].dtype == dtype, op
    assert model.graph.initializers["eps"].const_value.dtype == FLOAT
    assert model.graph.initializers["gamma"].const_value.dtype == FLOAT16
    assert cast_chains(model) == []


def test_custom_block_list() -> None:
    model = check_fp16(LINEAR, op_block_list=["Add"])
    add = node_of(model, "Add")
    assert [v.dtype for v in (*add.inputs, *add.outputs)] == [FLOAT] * 3
    assert node_of(model, "MatMul").outputs[0].dtype == FLOAT16
    # Relu sits between the float32 Add and the float32 output: it stays float32 (an island)
    assert node_of(model, "Relu").outputs[0].dtype == FLOAT
    assert op_counts(model)["Cast"] == 2  # x to float16, m back to float32
    # b is read only by the blocked Add: it stays float32; w is halved
    assert model.graph.initializers["b"].const_value.dtype == FLOAT
    assert model.graph.initializers["w"].const_value.dtype == FLOAT16


def test_neighbouring_blocked_ops_share_float32_without_casts() -> None:
    model = check_fp16(
        f"""
        g (float[N,4] x) => (float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}> {{
            m = MatMul(x, w)
            e = Exp(m)
            l = Log(e)
            r = Sqrt(e)
            s = Add(l, r)
            y = MatMul(s, w)
        }}
        """
    )
    exp, log, sqrt = (node_of(model, op) for op in ("Exp", "Log", "Sqrt"))
    assert log.inputs[0] is exp.outputs[0] is sqrt.inputs[0]  # no Cast between them
    assert exp.inputs[0].producer().op_type == "Cast"  # one Cast of m into float32
    # the island rule: Add reads two float32 values but feeds a float16 MatMul, so it converts
    assert node_of(model, "Add").outputs[0].dtype == FLOAT16


def test_resize_scales_stay_float32_even_when_resize_converts() -> None:
    text = """
        g (float[1,1,4,4] x) => (float[1,1,8,8] y) <float[4] scales = {1.0, 1.0, 2.0, 2.0}> {
            a = Relu(x)
            r = Resize<mode="linear">(a, , scales)
            y = Neg(r)
        }
        """
    model = check_fp16(text, op_block_list=[])
    resize = node_of(model, "Resize")
    assert resize.inputs[0].dtype == FLOAT16
    assert resize.inputs[2].dtype == FLOAT  # scales are tensor(float) in the schema
    blocked = check_fp16(text)  # Resize is in the default block list
    resize = node_of(blocked, "Resize")
    assert resize.inputs[0].dtype == resize.outputs[0].dtype == FLOAT


def test_out_of_range_initializer_stays_float32() -> None:
    model = check_fp16(
        f"""
        g (float[N,4] x) => (float[N,4] y)
            <float[4,4] w = {{{WEIGHTS}}}, float[4] big = {{1.0, 100000.0, -2.0, 3.0}}> {{
            m = MatMul(x, w)
            s = Mul(m, big)
            y = Relu(s)
        }}
        """
    )
    assert model.graph.initializers["big"].const_value.dtype == FLOAT
    np.testing.assert_array_equal(
        model.graph.initializers["big"].const_value.numpy(), [1.0, 100000.0, -2.0, 3.0]
    )
    mul = node_of(model, "Mul")
    assert [v.dtype for v in (*mul.inputs, *mul.outputs)] == [FLOAT] * 3
    assert model.graph.initializers["w"].const_value.dtype == FLOAT16
    # a lower max_finite keeps more in float32
    lowered = build(LINEAR)
    fp16(lowered, max_finite=1.5)  # b holds 2.0
    lowered = typed(lowered)
    assert lowered.graph.initializers["b"].const_value.dtype == FLOAT
    assert node_of(lowered, "Add").outputs[0].dtype == FLOAT


def test_out_of_range_constant_node_stays_float32() -> None:
    model = check_fp16(
        """
        g (float[N,4] x) => (float[N,4] y) {
            big = Constant<value = float[4] {1.0, -70000.0, 2.0, 3.0}>()
            a = MatMul(x, w)
            s = Mul(a, big)
            y = Neg(s)
        }
        """.replace("(float[N,4] y) {", f"(float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}> {{")
    )
    assert value(model, "big").dtype == FLOAT
    assert node_of(model, "MatMul").outputs[0].dtype == FLOAT16
    assert node_of(model, "Mul").outputs[0].dtype == FLOAT


def test_tiny_values_do_not_flush_to_zero() -> None:
    model = check_fp16(
        """
        g (float[N,4] x) => (float[N,4] y) <float eps = {1e-12}> {
            a = Abs(x)
            b = Add(a, eps)
            y = Div(x, b)
        }
        """
    )
    eps = model.graph.initializers["eps"].const_value.numpy()
    assert eps.dtype == np.float16
    assert eps == np.finfo(np.float16).smallest_subnormal


def test_weight_read_in_both_precisions_is_copied() -> None:
    model = check_fp16(
        f"""
        g (float[N,4] x) => (float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}, int64[1] axes = {{0}}> {{
            m = MatMul(x, w)
            s = ReduceSum<keepdims=0>(w, axes)
            y = Add(m, s)
        }}
        """
    )
    assert model.graph.initializers["w"].const_value.dtype == FLOAT
    (copy,) = [v for k, v in model.graph.initializers.items() if k not in ("w", "axes")]
    assert copy.const_value.dtype == FLOAT16
    assert node_of(model, "MatMul").inputs[1] is copy
    assert node_of(model, "ReduceSum").inputs[0] is model.graph.initializers["w"]


def test_shape_of_a_weight_does_not_keep_it_float32() -> None:
    # Shape reads any type: the weight is halved in place, not copied
    model = check_fp16(
        f"""
        g (float[N,4] x) => (float[N,4] y, int64[2] s) <float[4,4] w = {{{WEIGHTS}}}> {{
            s = Shape(w)
            y = MatMul(x, w)
        }}
        """
    )
    assert list(model.graph.initializers) == ["w"]
    assert model.graph.initializers["w"].const_value.dtype == FLOAT16
    assert node_of(model, "Shape").inputs[0] is model.graph.initializers["w"]


# ---------------------------------------------------------------------------------------------
# Casts and Constants in the model


def test_cast_to_float_becomes_a_cast_to_float16() -> None:
    model = check_fp16(
        f"""
        g (int64[N,4] x) => (float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}> {{
            f = Cast<to=1>(x)
            y = MatMul(f, w)
        }}
        """,
        {"x": np.arange(12, dtype=np.int64).reshape(3, 4)},
    )
    cast = model.graph.node(0)
    assert cast.attributes["to"].as_int() == FLOAT16
    assert op_counts(model)["Cast"] == 2  # that Cast, and y back to float32


def test_cast_to_float_for_a_blocked_consumer_stays() -> None:
    model = check_fp16(
        """
        g (int64[N,4] x) => (float[N,4] y) { f = Cast<to=1>(x)\n e = Exp(f)\n y = Neg(e) }
        """,
        {"x": np.arange(12, dtype=np.int64).reshape(3, 4) % 5},
    )
    assert model.graph.node(0).attributes["to"].as_int() == FLOAT


def test_constant_of_shape_makes_float16() -> None:
    model = check_fp16(
        """
        g (float[2,4] x) => (float[2,4] y) <int64[2] shape = {2, 4}> {
            c = ConstantOfShape<value = float[1] {0.5}>(shape)
            y = Add(x, c)
        }
        """
    )
    fill = node_of(model, "ConstantOfShape").attributes["value"].as_tensor()
    assert fill.dtype == FLOAT16


def test_if_reading_an_outer_float16_value_gets_float32() -> None:
    # If bodies stay as they are: the outer value they read is cast back for them
    inputs = {
        "c": np.array(True),
        "x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
    }
    text = f"""
        g (bool c, float[N,4] x) => (float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}> {{
            m = MatMul(x, w)
            y = If(c) <
                then_branch = t () => (float[N,4] ty) {{ ty = Neg(m) }},
                else_branch = e () => (float[N,4] ey) {{ ey = Relu(m) }}
            >
        }}
        """
    model = check_fp16(text, inputs)
    check_fp16(text, {**inputs, "c": np.array(False)})
    assert node_of(model, "MatMul").outputs[0].dtype == FLOAT16
    (then_node,) = node_of(model, "If").attributes["then_branch"].as_graph()
    assert then_node.inputs[0].dtype == FLOAT
    assert then_node.inputs[0].producer().op_type == "Cast"


def test_custom_domain_ops_stay_float32() -> None:
    model = build(
        f"""
        <ir_version: 10, opset_import: ["" : 20, "custom.domain" : 1]>
        g (float[N,4] x) => (float[N,4] y) <float[4,4] w = {{{WEIGHTS}}}, float[N,4] b> {{
            a = MatMul(x, w)
            b = custom.domain.Op(a)
            y = MatMul(b, w)
        }}
        """
    )
    assert fp16(model) is True
    model = typed(model)
    op = node_of(model, "Op")
    assert op.inputs[0].dtype == op.outputs[0].dtype == FLOAT
    assert {n.outputs[0].dtype for n in model.graph if n.op_type == "MatMul"} == {FLOAT16}
    assert cast_chains(model) == []


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's fused ops: float16 where the target provider has the kernel

SKIP_LAYER_NORM = f"""
    <ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>
    g (float[N,4] x, float[N,4] s) => (float[N,4] y)
        <float[4,4] w = {{{WEIGHTS}}}, float[4] gamma = {{1.0, 0.5, 2.0, 1.5}},
         float[4] beta = {{0.1, 0.2, 0.3, 0.4}}> {{
        a = MatMul(x, w)
        n, mean, inv = com.microsoft.SkipLayerNormalization(a, s, gamma, beta)
        y = MatMul(n, w)
    }}
    """


def _attention() -> ir.Model:
    return build(
        f"""
        <ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>
        g (float[2,3,4] x) => (float[2,3,4] y) {weights(qkv=normal(4, 12), bias=normal(12))} {{
            y = com.microsoft.Attention<num_heads: int = 2>(x, qkv, bias)
        }}
        """
    )


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_skip_layer_norm_runs_in_float16_on_both_targets(target: str) -> None:
    original = build(SKIP_LAYER_NORM)
    model = build(SKIP_LAYER_NORM)
    assert fp16(model, target=target) is True
    node = node_of(model, "SkipLayerNormalization")
    assert [v.dtype for v in node.inputs] == [FLOAT16] * 4
    assert node.outputs[0].dtype == FLOAT16
    assert cast_chains(model) == []
    assert op_counts(model)["Cast"] == 3  # only at the two float32 graph inputs and the output
    inputs = inputs_for(original)
    comparison = compare_outputs(run(original, inputs), run(model, inputs))
    assert 0 < comparison.rel_l2 < BUDGET


@pytest.mark.parametrize(("target", "dtype"), [("cpu", FLOAT), ("cuda", FLOAT16)])
def test_attention_is_float16_only_where_the_target_has_the_kernel(target, dtype) -> None:
    model = _attention()
    fp16(model, target=target)
    node = node_of(model, "Attention")
    assert [v.dtype for v in node.inputs] == [dtype] * 3
    assert node.outputs[0].dtype == dtype
    assert model.graph.initializers["qkv"].const_value.dtype == dtype
    if target == "cpu":  # ONNX Runtime's CPU Attention is float32-only: it must still run
        inputs = {"x": normal(2, 3, 4)}
        np.testing.assert_allclose(run(model, inputs)[0], run(_attention(), inputs)[0], atol=1e-2)


def _fused_conv() -> ir.Model:
    return build(
        f"""
        <ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>
        g (float[N,2,5,5] x) => (float[N,3,5,5] y) {weights(w=normal(3, 2, 3, 3), b=normal(3))} {{
            y = com.microsoft.FusedConv<activation: string = "Relu", pads: ints = [1, 1, 1, 1]>(
                x, w, b)
        }}
        """
    )


def test_cuda_target_splits_fused_conv_back_into_conv_and_relu() -> None:
    model = _fused_conv()
    assert fp16(model, target="cuda") is True
    assert_valid(model)
    assert op_counts(model) == {"Cast": 2, "Conv": 1, "Relu": 1}
    assert node_of(model, "Conv").outputs[0].dtype == FLOAT16
    assert model.graph.outputs[0].name == "y"
    inputs = inputs_for(model)
    comparison = compare_outputs(run(_fused_conv(), inputs), run(model, inputs))
    assert 0 < comparison.rel_l2 < BUDGET


def test_cpu_target_keeps_fused_conv_float32() -> None:
    model = _fused_conv()
    assert fp16(model) is False  # its only float op has no float16 kernel on the CPU
    assert op_counts(model) == {"FusedConv": 1}


def test_cuda_target_records_provider_options_for_float16_convolutions() -> None:
    model = _fused_conv()
    assert fp16(model, target="cuda") is True
    recorded = json.loads(model.metadata_props[CUDA_PROVIDER_OPTIONS_KEY])
    assert recorded == CUDA_CONV_PROVIDER_OPTIONS == {"prefer_nhwc": "1", "fuse_conv_bias": "1"}
    assert fp16(model, target="cuda") is False  # already float16, options already recorded


def test_provider_options_only_for_float16_convolutions_on_cuda() -> None:
    model = _fused_conv()
    fp16(model, target="cuda", op_block_list=("Conv",))  # the Conv stays float32
    assert CUDA_PROVIDER_OPTIONS_KEY not in model.metadata_props
    on_cpu = build(
        f"""
        <ir_version: 10, opset_import: ["" : 20]>
        g (float[N,2,5,5] x) => (float[N,3,5,5] y) {weights(w=normal(3, 2, 3, 3))} {{
            y = Conv<pads: ints = [1, 1, 1, 1]>(x, w)
        }}
        """
    )
    assert fp16(on_cpu) is True and node_of(on_cpu, "Conv").inputs[1].dtype == FLOAT16
    assert CUDA_PROVIDER_OPTIONS_KEY not in on_cpu.metadata_props


def test_unused_untyped_optional_outputs_do_not_block() -> None:
    model = build(SKIP_LAYER_NORM)  # mean and inv have no type and nobody reads them
    node = node_of(model, "SkipLayerNormalization")
    assert node.outputs[1].dtype is None and not node.outputs[1].uses()
    fp16(model, target="cuda")
    assert node.outputs[0].dtype == FLOAT16


def test_cuda_preset_converts_a_fused_transformer() -> None:
    from onnxforge.presets import CUDA_PIPELINE

    model = onnxforge.optimize(exported("transformer"), CUDA_PIPELINE).model
    assert CUDA_PROVIDER_OPTIONS_KEY not in model.metadata_props  # no convolutions
    fused = [n for n in model.graph if n.domain == "com.microsoft"]
    assert {n.op_type for n in fused} >= {"Attention", "SkipLayerNormalization"}
    for node in fused:
        assert node.outputs[0].dtype == FLOAT16, node.op_type


# ---------------------------------------------------------------------------------------------
# Overflow: what the block list and calibration ranges prevent (ONNX's reference evaluator)


def large_rows(scale: float, width: int = 64) -> np.ndarray:
    """Rows of values around ``scale``, spread by ``scale``: their squares pass 65504."""
    rng = np.random.default_rng(5)
    return (rng.standard_normal((4, width)) * scale + scale).astype(np.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_block_list_keeps_a_decomposed_layer_norm_finite() -> None:
    x = large_rows(300.0)
    reference = reference_run(build(DECOMPOSED_LAYER_NORM), {"x": x})
    default, unblocked = build(DECOMPOSED_LAYER_NORM), build(DECOMPOSED_LAYER_NORM)
    fp16(default)
    fp16(unblocked, op_block_list=[])
    assert relative_error(reference, reference_run(default, {"x": x})) < BUDGET
    assert relative_error(reference, reference_run(unblocked, {"x": x})) > 0.5  # Pow overflows


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_block_list_keeps_log_sum_exp_finite() -> None:
    text = """
        g (float[N,64] x) => (float[N,64] y) <int64[1] axes = {-1}> {
            e = Exp(x)
            s = ReduceSum<keepdims=1>(e, axes)
            l = Log(s)
            y = Sub(x, l)
        }
        """
    x = (np.random.default_rng(6).standard_normal((4, 64)) * 6).astype(np.float32)
    reference = reference_run(build(text), {"x": x})
    default = build(text)
    fp16(default)
    without_exp_log = build(text)
    fp16(
        without_exp_log, op_block_list=[o for o in DEFAULT_OP_BLOCK_LIST if o not in ("Exp", "Log")]
    )
    assert relative_error(reference, reference_run(default, {"x": x})) < BUDGET
    assert relative_error(reference, reference_run(without_exp_log, {"x": x})) == float("inf")


# h = x @ I runs in float16 (it has weights); s = h * h passes 65504 when x is large
EYE = ", ".join(f"{v:.1f}" for v in np.eye(64).ravel())
SQUARES = f"""
g (float[N,64] x) => (float[N,64] y) <float[64,64] eye = {{{EYE}}}, int64[1] axes = {{-1}}> {{
    h = MatMul(x, eye)
    s = Mul(h, h)
    m = ReduceMean<keepdims=1>(s, axes)
    r = Sqrt(m)
    y = Div(h, r)
}}
"""


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_calibration_ranges_keep_a_large_activation_float32(tmp_path) -> None:
    # s = h * h passes 65504: only its calibration range can tell, the Mul is not blocked
    x = large_rows(300.0)
    path = tmp_path / "ranges.npz"
    np.savez(path, s=np.max(np.abs(x * x)), h=np.max(np.abs(x)))
    reference = reference_run(build(SQUARES), {"x": x})
    plain, calibrated = build(SQUARES), build(SQUARES)
    fp16(plain)
    assert relative_error(reference, reference_run(plain, {"x": x})) > 0.5
    assert fp16(calibrated, calibration_ranges=str(path)) is True
    mul = node_of(typed(calibrated), "Mul")
    assert [v.dtype for v in (*mul.inputs, *mul.outputs)] == [FLOAT] * 3
    assert relative_error(reference, reference_run(calibrated, {"x": x})) < BUDGET
    assert node_of(typed(calibrated), "Div").outputs[0].dtype == FLOAT16
    # and the result passes the usual checks through ONNX Runtime
    check_fp16(SQUARES, {"x": x}, calibration_ranges=str(path))


def test_calibration_ranges_within_float16_change_nothing(tmp_path) -> None:
    path = tmp_path / "ranges.npz"
    np.savez(path, s=np.float32(100.0), y=np.array([-3.0, 2.0]))
    assert load_calibration_ranges(path) == {"s": 100.0, "y": 3.0}
    plain, calibrated = build(SQUARES), build(SQUARES)
    fp16(plain)
    fp16(calibrated, calibration_ranges=str(path))
    assert as_text(plain) == as_text(calibrated)


def test_calibration_ranges_naming_unknown_values_warn(tmp_path, caplog) -> None:
    path = tmp_path / "ranges.npz"
    np.savez(path, nowhere=np.float32(1e6))
    with caplog.at_level(logging.WARNING, logger="onnxforge.passes.fp16"):
        fp16(build(SQUARES), calibration_ranges=str(path))
    assert "nowhere" in caplog.text


def test_calibration_ranges_that_cannot_be_read(tmp_path) -> None:
    with pytest.raises(InputError, match="calibration ranges"):
        fp16(build(SQUARES), calibration_ranges=str(tmp_path / "missing.npz"))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, s=np.array([{"a": 1}], dtype=object))
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    for path in (pickled, single):
        with pytest.raises(InputError, match="calibration ranges"):
            fp16(build(SQUARES), calibration_ranges=str(path))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_finite"):
        Float16Pass(max_finite=70000.0)
    with pytest.raises(ValueError, match="unknown target 'tpu'; choices: cpu, cuda"):
        Float16Pass(target="tpu")


# ---------------------------------------------------------------------------------------------
# Exported samples through ONNX Runtime


@functools.cache
def _exported(name: str) -> ir.Model:
    return onnxforge.export(name)


def exported(name: str) -> ir.Model:
    """A fresh copy of the exported sample (exported once per test session)."""
    return _exported(name).clone()


@pytest.mark.parametrize("sample", ["seed-cnn", "digits-cnn", "transformer"])
def test_exported_sample_within_budget(sample: str) -> None:
    original = exported(sample)
    model = exported(sample)
    assert fp16(model) is True
    assert_valid(model)
    assert cast_chains(model) == []
    assert [v.dtype for v in model.graph.inputs] == [v.dtype for v in original.graph.inputs]
    assert [v.dtype for v in model.graph.outputs] == [v.dtype for v in original.graph.outputs]
    # the weights really become float16: parameter bytes halve (int64 shapes and a scalar or
    # two read in both precisions, and so copied, keep it a little above one half)
    before, after = model_stats(original), model_stats(model)
    assert before.parameters <= after.parameters <= before.parameters + 4
    assert 0.5 <= after.parameter_bytes / before.parameter_bytes < 0.51
    inputs = make_inputs(original, batch=4)
    comparison = compare_outputs(run(original, inputs), run(model, inputs))
    assert comparison.finite
    assert 0 < comparison.rel_l2 < BUDGET  # lossy, within budget
    assert fp16(model) is False


def test_digits_accuracy_within_budget() -> None:
    original = exported("digits-cnn")
    model = exported("digits-cnn")
    fp16(model)
    data, labels = get_sample("digits-cnn").evaluation_data()
    assert labels is not None and len(labels) >= 100
    accuracy32 = float(np.mean(run(original, data)[0].argmax(-1) == labels))
    accuracy16 = float(np.mean(run(model, data)[0].argmax(-1) == labels))
    assert accuracy32 > 0.9  # the float model is a real classifier
    assert accuracy32 - accuracy16 <= ACCURACY_DROP


def test_optimize_with_numeric_verification_reports_drift() -> None:
    result = onnxforge.optimize(exported("seed-cnn"), "fp16", verify="numeric", budget=0.05)
    (record,) = result.records
    assert record.modified is True
    assert record.semantics is Semantics.LOSSY
    assert 0 < record.drift["rel_l2"] < 0.05
    assert record.total_drift["rel_l2"] == record.drift["rel_l2"]
    assert record.parameter_bytes_after < record.parameter_bytes_before


def test_optimize_fails_past_the_budget() -> None:
    with pytest.raises(onnxforge.VerificationError, match="budget"):
        onnxforge.optimize(exported("seed-cnn"), "fp16", verify="numeric", budget=1e-9)
