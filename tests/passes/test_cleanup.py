"""``cleanup``: Identity elimination, initializer de-duplication, dead code (STYLE.md rule 5)."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxforge.backend import Session, compare_outputs
from onnxforge.passes import CleanupPass, PassManager, Semantics, VerifyNumerics, VerifyStructure

from .conftest import (
    as_text,
    assert_bitwise_equal,
    assert_valid,
    build,
    inputs_for,
    op_counts,
    run,
)


def cleanup(model: ir.Model, **options) -> bool:
    """Run cleanup in place; returns ``modified``."""
    result = CleanupPass(**options)(model)
    assert result.model is model  # an in-place pass
    return result.modified


def check_cleanup(text: str, inputs: dict[str, np.ndarray] | None = None) -> ir.Model:
    """Run cleanup on the model and check what every cleanup must satisfy; return the result.

    The result is valid, computes bit-for-bit what the input computed (cleanup is exact), keeps
    the graph's input and output names, and a second run changes nothing.
    """
    original = build(text)
    model = build(text)
    inputs = inputs if inputs is not None else inputs_for(model)
    text_before = as_text(model)
    modified = cleanup(model)
    assert modified == (as_text(model) != text_before)  # modified is honest
    assert_valid(model)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    assert_bitwise_equal(run(original, inputs), run(model, inputs))
    settled = as_text(model)
    assert cleanup(model) is False
    assert as_text(model) == settled
    return model


def test_semantics_and_name() -> None:
    assert CleanupPass.name == "cleanup"
    assert CleanupPass.semantics is Semantics.EXACT


# ---------------------------------------------------------------------------------------------
# Each rewrite on a tiny graph


def test_identity_removed() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y) {
            a = Identity(x)
            b = Identity(a)
            y = Relu(b)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1}
    (relu,) = model.graph
    assert relu.inputs[0] is model.graph.inputs[0]


def test_duplicate_initializers_merged() -> None:
    model = check_cleanup(
        """
        g (float[N,3] x) => (float[N,3] y)
            <float[3] w1 = {1.0, -2.0, 3.0}, float[3] w2 = {1.0, -2.0, 3.0},
             float[3] w3 = {1.0, -2.0, 4.0}> {
            a = Mul(x, w1)
            b = Add(a, w2)
            y = Sub(b, w3)
        }
        """
    )
    assert sorted(model.graph.initializers) == ["w1", "w3"]
    mul, add, _ = model.graph
    assert mul.inputs[1] is add.inputs[1] is model.graph.initializers["w1"]


def test_same_bytes_different_dtype_or_shape_not_merged() -> None:
    # f, f22 and i hold the same 16 bytes (i is f's float32 bit patterns read as int32)
    f = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    i = ", ".join(str(v) for v in f.view(np.int32))
    model = check_cleanup(
        f"""
        g (float[N,4] x) => (float[N,4] y, int32[4] z)
            <int64[1] shape = {{4}}, float[4] f = {{1.0, 2.0, 3.0, 4.0}},
             float[2,2] f22 = {{1.0, 2.0, 3.0, 4.0}}, int32[4] i = {{{i}}}> {{
            a = Mul(x, f)
            r = Reshape(f22, shape)
            y = Add(a, r)
            z = Neg(i)
        }}
        """
    )
    assert sorted(model.graph.initializers) == ["f", "f22", "i", "shape"]


def test_dead_nodes_and_dead_initializers_removed() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0},
                                            float[2] unused = {5.0, 6.0}> {
            dead1 = Neg(x)
            dead2 = Mul(dead1, w)
            y = Relu(x)
            dead3 = Exp(y)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1}
    assert dict(model.graph.initializers) == {}


def test_unused_opset_import_removed() -> None:
    text = """
        <ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>
        g (float[N,4] x) => (float[N,4] y) { y = Relu(x) }
        """
    model = build(text)
    assert cleanup(model) is True
    assert dict(model.opset_imports) == {"": 20}


def test_everything_at_once() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y)
            <float[4] w1 = {0.5, 1.0, 1.5, 2.0}, float[4] w2 = {0.5, 1.0, 1.5, 2.0},
             float[4] dead_w = {9.0, 9.0, 9.0, 9.0}> {
            a = Identity(x)
            m = Mul(a, w1)
            i = Identity(m)
            n = Add(i, w2)
            dead = Mul(n, dead_w)
            y = Relu(n)
        }
        """
    )
    assert op_counts(model) == {"Mul": 1, "Add": 1, "Relu": 1}
    assert list(model.graph.initializers) == ["w1"]


def test_options_turn_deduplication_off() -> None:
    text = """
        g (float[N,3] x) => (float[N,3] y) <float[3] w1 = {1.0, 2.0, 3.0},
                                            float[3] w2 = {1.0, 2.0, 3.0}> {
            a = Mul(x, w1)
            y = Add(a, w2)
        }
        """
    model = build(text)
    assert cleanup(model, deduplicate=False) is False
    assert sorted(model.graph.initializers) == ["w1", "w2"]
    assert cleanup(model) is True
    assert sorted(model.graph.initializers) == ["w1"]


def test_size_limit_leaves_larger_duplicates_alone() -> None:
    # size_limit is onnx_ir's: initializers with more elements are not de-duplicated at all
    # (the comment on DEFAULT_DEDUPLICATE_SIZE_LIMIT says they are "compared by hash" instead)
    text = """
        g (float[N,3] x) => (float[N,3] y) <float[3] w1 = {1.0, 2.0, 3.0},
                                            float[3] w2 = {1.0, 2.0, 3.0},
                                            float[1] s1 = {7.0}, float[1] s2 = {7.0}> {
            a = Mul(x, w1)
            b = Add(a, w2)
            c = Mul(b, s1)
            y = Add(c, s2)
        }
        """
    model = build(text)
    assert cleanup(model, size_limit=1) is True
    assert sorted(model.graph.initializers) == ["s1", "w1", "w2"]


# ---------------------------------------------------------------------------------------------
# No-op and idempotence


def test_no_op() -> None:
    text = """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
            a = Mul(x, w)
            y = Relu(a)
        }
        """
    model = build(text)
    before = as_text(model)
    assert cleanup(model) is False
    assert as_text(model) == before


def test_idempotent_through_the_manager() -> None:
    model = build(
        """
        g (float[N,4] x) => (float[N,4] y) <float[4] w1 = {1.0, 2.0, 3.0, 4.0},
                                            float[4] w2 = {1.0, 2.0, 3.0, 4.0}> {
            a = Identity(x)
            b = Mul(a, w1)
            c = Mul(b, w2)
            d = Neg(c)
            y = Relu(c)
        }
        """
    )
    inputs = inputs_for(model)
    instruments = [
        VerifyStructure(),
        VerifyNumerics(Session.runner(), inputs, compare_outputs),
    ]
    result = PassManager("cleanup,cleanup,cleanup", instruments).run(model)
    assert [r.modified for r in result.records] == [True, False, False]
    assert result.records[0].drift["max_abs"] == 0.0


# ---------------------------------------------------------------------------------------------
# Graph outputs, graph inputs, multiple consumers


def test_identity_producing_a_graph_output() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y) {
            a = Relu(x)
            y = Identity(a)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1}
    (relu,) = model.graph
    assert relu.outputs[0] is model.graph.outputs[0]
    assert model.graph.outputs[0].name == "y"


def test_identity_from_graph_input_to_graph_output_stays() -> None:
    text = "g (float[N,4] x) => (float[N,4] y) { y = Identity(x) }"
    model = check_cleanup(text)
    assert op_counts(model) == {"Identity": 1}
    assert as_text(model) == as_text(build(text))


def test_identity_from_initializer_to_graph_output_stays() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y, float[4] z) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
            y = Mul(x, w)
            z = Identity(w)
        }
        """
    )
    assert op_counts(model) == {"Mul": 1, "Identity": 1}


def test_identity_chain_from_graph_input_to_graph_output() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y) {
            a = Identity(x)
            b = Identity(a)
            y = Identity(b)
        }
        """
    )
    assert op_counts(model) == {"Identity": 1}
    (identity,) = model.graph
    assert identity.inputs[0] is model.graph.inputs[0]


def test_identity_with_multiple_consumers() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) {
            r = Relu(x)
            a = Identity(r)
            y = Neg(a)
            z = Exp(a)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1, "Neg": 1, "Exp": 1}
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert {use.node.op_type for use in relu.outputs[0].uses()} == {"Neg", "Exp"}


def test_value_that_is_both_graph_output_and_consumed() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) {
            a = Identity(x)
            y = Relu(a)
            b = Identity(y)
            z = Neg(b)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1, "Neg": 1}


def test_duplicate_initializer_that_is_a_graph_input_is_kept() -> None:
    # an initializer listed among the graph inputs can be overridden at run time: not merged
    model = check_cleanup(
        """
        g (float[N,3] x, float[3] w2) => (float[N,3] y) <float[3] w1 = {1.0, 2.0, 3.0},
                                                         float[3] w2 = {1.0, 2.0, 3.0}> {
            a = Mul(x, w1)
            y = Add(a, w2)
        }
        """
    )
    assert sorted(model.graph.initializers) == ["w1", "w2"]


@pytest.mark.parametrize(
    "body",
    [
        "a = Relu(x)\n y = Identity(a)\n z = Identity(a)",
        "y = Relu(x)\n z = Identity(y)",
    ],
)
def test_two_graph_outputs_copied_from_one_value_keep_their_names(body: str) -> None:
    check_cleanup(f"g (float[N,4] x) => (float[N,4] y, float[N,4] z) {{ {body} }}")


# ---------------------------------------------------------------------------------------------
# Subgraphs

IF_MODEL = """
g (bool c, float[N,4] x) => (float[N,4] y) {
    y = If(c) <
        then_branch = t () => (float[N,4] ty) {
            ta = Identity(x)
            tb = Relu(ta)
            dead = Neg(tb)
            ty = Identity(tb)
        },
        else_branch = e () => (float[N,4] ey) {
            ea = Neg(x)
            ey = Identity(ea)
        }
    >
}
"""


@pytest.mark.parametrize("condition", [True, False])
def test_identity_and_dead_nodes_inside_if_branches(condition: bool) -> None:
    inputs = {
        "c": np.array(condition),
        "x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32),
    }
    model = check_cleanup(IF_MODEL, inputs)
    assert op_counts(model) == {"If": 1, "Relu": 1, "Neg": 1}


@pytest.mark.parametrize("else_body", ["ey = Neg(a)", "ey = Identity(a)"])
def test_if_branch_returning_an_outer_value(else_body: str) -> None:
    text = f"""
        g (bool c, float[N,4] x) => (float[N,4] y) {{
            a = Relu(x)
            y = If(c) <
                then_branch = t () => (float[N,4] ty) {{ ty = Identity(a) }},
                else_branch = e () => (float[N,4] ey) {{ {else_body} }}
            >
        }}
        """
    check_cleanup(text, {"c": np.array(True), "x": np.ones((2, 4), np.float32)})


def test_dropping_an_unused_optional_output_counts_as_a_change() -> None:
    model = build("g (float[N,4] x) => (float[N,4] y) { y, mask = Dropout(x) }")
    before = as_text(model)
    modified = cleanup(model)
    assert modified == (as_text(model) != before)


# ---------------------------------------------------------------------------------------------
# Property: random small graphs

_UNARY = ("Relu", "Neg", "Identity", "Abs")
_BINARY = ("Add", "Mul", "Sub")
_OPS = (*_UNARY, "Identity", "Identity", *_BINARY)  # Identity is what cleanup is most about
# A small pool of weight values, so that duplicate initializers are common.
_WEIGHT_POOL = ((1.0, 2.0, 3.0), (0.5, -1.0, 2.0), (-2.0, 0.25, 1.5))


@st.composite
def random_graphs(draw) -> tuple[str, list[str]]:
    """ONNX text of a random DAG of elementwise ops over x: float[2,3] and float[3] weights.

    Some weights repeat, some nodes and weights are dead, Identity nodes appear anywhere (also
    in front of graph outputs and on weights). Graph outputs are any distinct node outputs,
    Identity copies of one value included.
    """
    weights = draw(st.lists(st.sampled_from(_WEIGHT_POOL), max_size=4))
    shapes = {"x": "2,3", **{f"w{i}": "3" for i in range(len(weights))}}
    values = list(shapes)
    lines = []
    for index in range(draw(st.integers(min_value=1, max_value=10))):
        out = f"v{index}"
        op = draw(st.sampled_from(_OPS))
        args = [draw(st.sampled_from(values)) for _ in range(1 if op in _UNARY else 2)]
        lines.append(f"{out} = {op}({', '.join(args)})")
        shapes[out] = "2,3" if any(shapes[a] == "2,3" for a in args) else "3"
        values.append(out)
    candidates = draw(st.permutations(values[1 + len(weights) :]))
    count = draw(st.integers(min_value=1, max_value=3))
    outputs = list(candidates[:count])
    initializers = ", ".join(
        f"float[3] w{i} = {{{', '.join(map(str, w))}}}" for i, w in enumerate(weights)
    )
    signature = ", ".join(f"float[{shapes[o]}] {o}" for o in outputs)
    body = "\n    ".join(lines)
    text = f"g (float[2,3] x) => ({signature}) <{initializers}> {{\n    {body}\n}}"
    return text.replace(" <> ", " "), outputs


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.integers(min_value=0, max_value=2**16))
def test_random_graphs(graph, seed: int) -> None:
    text, outputs = graph
    x = np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)
    model = check_cleanup(text, {"x": x})
    assert [o.name for o in model.graph.outputs] == outputs
    graph_outputs = set(model.graph.outputs)
    # no dead node: every node output is used or is a graph output
    for node in model.graph:
        assert any(out.uses() or out in graph_outputs for out in node.outputs), text
    # Identity only where it must stay: into a graph output, from a graph input, a weight or
    # another graph output (two outputs that are copies of one value keep both their names)
    for node in model.graph:
        if node.op_type == "Identity":
            source = node.inputs[0]
            assert node.outputs[0] in graph_outputs, text
            assert source.is_graph_input() or source.is_initializer() or source in graph_outputs, (
                text
            )
    # no dead and no duplicate weights
    contents = collections.Counter()
    for value in model.graph.initializers.values():
        assert value.uses() or value in graph_outputs, text
        contents[value.const_value.numpy().tobytes()] += 1
    assert all(n == 1 for n in contents.values()), text
