"""``cleanup``: Identity elimination, initializer de-duplication, dead code (STYLE.md rule 5)."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxforge.backend import Session, compare_outputs, make_inputs
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


@pytest.mark.parametrize(
    "copy",
    ["a = Identity(r)", "t = Transpose<perm=[0, 1]>(r)\n c = Cast<to=1>(t)\n a = Identity(c)"],
)
def test_identity_or_no_op_with_multiple_consumers(copy: str) -> None:
    model = check_cleanup(
        f"""
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) <float[N,4] r> {{
            r = Relu(x)
            {copy}
            y = Neg(a)
            z = Exp(a)
        }}
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


@pytest.mark.parametrize("no_ops", [True, False])
def test_dropping_an_unused_optional_output_counts_as_a_change(no_ops: bool) -> None:
    # with no_ops=False the Dropout stays and only its unused mask output goes
    model = build("g (float[N,4] x) => (float[N,4] y) { y, mask = Dropout(x) }")
    before = as_text(model)
    modified = cleanup(model, no_ops=no_ops)
    assert modified is True
    assert modified == (as_text(model) != before)
    assert op_counts(model) == ({"Identity": 1} if no_ops else {"Dropout": 1})


# ---------------------------------------------------------------------------------------------
# No-op elimination: Transpose, Cast, Reshape, Expand, Slice, Dropout


def check_unchanged(text: str, **options) -> ir.Model:
    """Cleanup leaves the model exactly as it is and says so."""
    model = build(text)
    before = as_text(model)
    assert cleanup(model, **options) is False
    assert as_text(model) == before
    return model


# (shape of x, initializers, the line that computes t from a = Relu(x)); t is a no-op of a
NO_OPS = {
    "transpose": ("2,4", "", "t = Transpose<perm=[0, 1]>(a)"),
    "transpose-rank-3": ("2,3,4", "", "t = Transpose<perm=[0, 1, 2]>(a)"),
    "cast": ("N,4", "", "t = Cast<to=1>(a)"),
    "reshape-static": ("2,4", "int64[2] s = {2, 4}", "t = Reshape(a, s)"),
    "reshape-copy-dim": ("N,4", "int64[2] s = {0, 4}", "t = Reshape(a, s)"),
    "reshape-minus-one": ("N,4", "int64[2] s = {-1, 4}", "t = Reshape(a, s)"),
    "reshape-constant-node": (
        "2,4",
        "",
        "s = Constant<value = int64[2] {2, 4}>()\n t = Reshape(a, s)",
    ),
    "expand-same": ("2,4", "int64[2] s = {2, 4}", "t = Expand(a, s)"),
    "expand-ones": ("N,4", "int64[2] s = {1, 1}", "t = Expand(a, s)"),
    "expand-lower-rank": ("N,4", "int64[1] s = {4}", "t = Expand(a, s)"),
    "slice-to-int64-max": (
        "N,4",
        "int64[1] st = {0}, int64[1] en = {9223372036854775807}",
        "t = Slice(a, st, en)",
    ),
    "slice-axes-steps": (
        "2,4",
        "int64[2] st = {-2, 0}, int64[2] en = {2, 100}, int64[2] ax = {0, -1}, "
        "int64[2] sp = {1, 1}",
        "t = Slice(a, st, en, ax, sp)",
    ),
    "dropout": ("N,4", "", "t = Dropout(a)"),
    "dropout-ratio": ("N,4", "float r = {0.5}", "t = Dropout(a, r)"),
    "dropout-training-false": (
        "N,4",
        "float r = {0.5}, bool tm = {0}",
        "t = Dropout(a, r, tm)",
    ),
    "dropout-unused-mask": ("N,4", "", "t, mask = Dropout(a)"),
}


def no_op_text(shape: str, initializers: str, line: str, *, tail: str = "y = Neg(t)") -> str:
    """``a = Relu(x)``, the line under test, then ``tail``; ``a`` carries its type and shape."""
    declarations = ", ".join(filter(None, [initializers, f"float[{shape}] a"]))
    return f"""
        g (float[{shape}] x) => (float[{shape}] y) <{declarations}> {{
            a = Relu(x)
            {line}
            {tail}
        }}
        """


@pytest.mark.parametrize("case", NO_OPS)
def test_no_op_removed(case: str) -> None:
    model = check_cleanup(no_op_text(*NO_OPS[case]))
    assert op_counts(model) == {"Relu": 1, "Neg": 1}
    relu, neg = model.graph
    assert neg.inputs[0] is relu.outputs[0]
    assert dict(model.graph.initializers) == {}


@pytest.mark.parametrize("case", NO_OPS)
def test_no_op_producing_a_graph_output(case: str) -> None:
    # the no-op's output is the graph output: the Relu takes over its name
    model = check_cleanup(no_op_text(*NO_OPS[case], tail="y = Identity(t)"))
    assert op_counts(model) == {"Relu": 1}
    assert model.graph.outputs[0].producer().op_type == "Relu"


@pytest.mark.parametrize("case", ["transpose", "cast", "reshape-static", "dropout"])
def test_no_op_from_a_graph_input_to_a_graph_output_keeps_both_names(case: str) -> None:
    shape, initializers, line = NO_OPS[case]
    declarations = f" <{initializers}>" if initializers else ""
    line = line.replace("(a", "(x").replace("t = ", "y = ").replace("t, mask = ", "y, mask = ")
    model = check_cleanup(f"g (float[{shape}] x) => (float[{shape}] y){declarations} {{ {line} }}")
    assert op_counts(model) == {"Identity": 1}
    (identity,) = model.graph
    assert identity.inputs[0] is model.graph.inputs[0]


def test_no_ops_copied_to_two_graph_outputs_keep_their_names() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) <float[N,4] a> {
            a = Relu(x)
            y = Transpose<perm=[0, 1]>(a)
            z = Cast<to=1>(a)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1, "Identity": 1}


def test_no_op_whose_input_is_a_graph_output() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] a, float[N,4] y) <float[N,4] a> {
            a = Relu(x)
            t = Transpose<perm=[0, 1]>(a)
            y = Neg(t)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1, "Neg": 1}


# (shape of x, type of y, initializers, the line that computes y from a = Relu(x))
NOT_NO_OPS = {
    "transpose-swaps-axes": ("4,4", "float[4,4]", "", "y = Transpose<perm=[1, 0]>(a)"),
    "cast-to-double": ("N,4", "double[N,4]", "", "y = Cast<to=11>(a)"),
    "reshape-changes-shape": ("2,4", "float[4,2]", "int64[2] s = {4, 2}", "y = Reshape(a, s)"),
    "reshape-changes-rank": ("2,4", "float[8]", "int64[1] s = {8}", "y = Reshape(a, s)"),
    "reshape-ambiguous-minus-one": (
        "N,4",
        "float[N,4]",
        "int64[2] s = {0, -1}",
        "y = Reshape(a, s)",
    ),
    "reshape-allowzero": (
        "N,4",
        "float[0,4]",
        "int64[2] s = {0, 4}",
        "y = Reshape<allowzero=1>(a, s)",
    ),
    "expand-broadcasts": ("N,1", "float[N,4]", "int64[2] s = {1, 4}", "y = Expand(a, s)"),
    "expand-raises-rank": ("N,4", "float[2,N,4]", "int64[3] s = {2, 1, 4}", "y = Expand(a, s)"),
    "slice-start": (
        "N,4",
        "float[N,4]",
        "int64[1] st = {1}, int64[1] en = {9223372036854775807}",
        "y = Slice(a, st, en)",
    ),
    "slice-end": (
        "N,4",
        "float[N,3]",
        "int64[1] st = {0}, int64[1] en = {3}, int64[1] ax = {1}",
        "y = Slice(a, st, en, ax)",
    ),
    "slice-end-of-dynamic-dim": (
        "N,4",
        "float[N,4]",
        "int64[1] st = {0}, int64[1] en = {100}",
        "y = Slice(a, st, en)",
    ),
    "slice-step": (
        "2,4",
        "float[1,4]",
        "int64[1] st = {0}, int64[1] en = {2}, int64[1] ax = {-2}, int64[1] sp = {3}",
        "y = Slice(a, st, en, ax, sp)",
    ),
    "dropout-training": (
        "N,4",
        "float[N,4]",
        "float r = {0.5}, bool tm = {1}",
        "y = Dropout(a, r, tm)",
    ),
}


@pytest.mark.parametrize("case", NOT_NO_OPS)
def test_not_a_no_op_stays(case: str) -> None:
    shape, output, initializers, line = NOT_NO_OPS[case]
    declarations = ", ".join(filter(None, [initializers, f"float[{shape}] a"]))
    check_unchanged(
        f"g (float[{shape}] x) => ({output} y) <{declarations}> {{ a = Relu(x)\n {line} }}"
    )


@pytest.mark.parametrize(
    "line",
    ["y = Reshape(a, s)", "y = Expand(a, s)"],
)
def test_shape_that_the_caller_can_override_is_not_a_constant(line: str) -> None:
    # s is a graph input with a default: the caller may feed another shape
    check_unchanged(
        f"""
        g (float[2,4] x, int64[2] s) => (float[2,4] y) <int64[2] s = {{2, 4}}, float[2,4] a> {{
            a = Relu(x)
            {line}
        }}
        """
    )


def test_slice_bounds_that_the_caller_can_override_are_not_constants() -> None:
    check_unchanged(
        """
        g (float[2,4] x, int64[1] en) => (float[2,4] y)
            <int64[1] st = {0}, int64[1] en = {9223372036854775807}, float[2,4] a> {
            a = Relu(x)
            y = Slice(a, st, en)
        }
        """
    )


def test_cast_of_a_value_of_unknown_type_stays() -> None:
    check_unchanged("g (float[N,4] x) => (float[N,4] y) { a = Relu(x)\n y = Cast<to=1>(a) }")


def test_dropout_with_a_training_mode_input_stays() -> None:
    check_unchanged(
        "g (float[N,4] x, bool tm) => (float[N,4] y) { a = Relu(x)\n y = Dropout(a, , tm) }"
    )


@pytest.mark.parametrize(
    "text",
    [
        # the mask is a graph output
        "g (float[N,4] x) => (float[N,4] y, bool[N,4] m) { a = Relu(x)\n y, m = Dropout(a) }",
        # the mask is read by another node
        """g (float[N,4] x) => (float[N,4] y, bool[N,4] n) {
            a = Relu(x)
            y, m = Dropout(a)
            n = Not(m)
        }""",
    ],
)
def test_dropout_whose_mask_is_used_stays(text: str) -> None:
    model = check_unchanged(text)
    inputs = inputs_for(model)
    outputs = run(model, inputs)
    np.testing.assert_array_equal(outputs[0], np.maximum(inputs["x"], 0))


def test_no_ops_option_off_keeps_them() -> None:
    text = no_op_text(*NO_OPS["transpose"])
    check_unchanged(text, no_ops=False)
    model = build(text)
    assert cleanup(model) is True
    assert "Transpose" not in op_counts(model)


def test_no_op_inside_an_if_branch() -> None:
    model = check_cleanup(
        """
        g (bool c, float[N,4] x) => (float[N,4] y) {
            y = If(c) <
                then_branch = t () => (float[N,4] ty) {
                    ta = Transpose<perm=[0, 1]>(x)
                    ty = Neg(ta)
                },
                else_branch = e () => (float[N,4] ey) {
                    s = Constant<value = int64[1] {0}>()
                    n = Constant<value = int64[1] {9223372036854775807}>()
                    ea = Slice(x, s, n)
                    ey = Relu(ea)
                }
            >
        }
        """,
        {"c": np.array(False), "x": np.random.default_rng(2).standard_normal((3, 4), np.float32)},
    )
    assert op_counts(model) == {"If": 1, "Neg": 1, "Relu": 1}


# ---------------------------------------------------------------------------------------------
# Constant nodes into initializers

# (input type, the Constant's attribute, the value it holds)
CONSTANTS = {
    "value": ("float[N,3]", "value = float[3] {1.5, -2.0, 3.0}", np.array([1.5, -2.0, 3.0])),
    "value_float": ("float[N,3]", "value_float = 2.5", np.array(2.5)),
    "value_floats": ("float[N,3]", "value_floats = [1.5, -2.0, 3.0]", np.array([1.5, -2.0, 3.0])),
    "value_int": ("int64[N,3]", "value_int = 7", np.array(7)),
    "value_ints": ("int64[N,3]", "value_ints = [1, -2, 3]", np.array([1, -2, 3])),
}


@pytest.mark.parametrize("form", CONSTANTS)
def test_constant_becomes_an_initializer(form: str) -> None:
    kind, attribute, value = CONSTANTS[form]
    model = check_cleanup(
        f"""
        g ({kind} x) => ({kind} y) {{
            k = Constant<{attribute}>()
            a = Mul(x, k)
            y = Add(a, k)
        }}
        """
    )
    assert op_counts(model) == {"Mul": 1, "Add": 1}
    (k,) = model.graph.initializers.values()
    assert k.name == "k"
    np.testing.assert_array_equal(k.const_value.numpy(), value)
    mul, add = model.graph
    assert mul.inputs[1] is add.inputs[1] is k


def test_equal_constants_become_one_initializer() -> None:
    model = check_cleanup(
        """
        g (float[N,3] x) => (float[N,3] y) {
            k1 = Constant<value_floats = [1.0, 2.0, 3.0]>()
            k2 = Constant<value = float[3] {1.0, 2.0, 3.0}>()
            a = Mul(x, k1)
            y = Add(a, k2)
        }
        """
    )
    assert op_counts(model) == {"Mul": 1, "Add": 1}
    assert list(model.graph.initializers) == ["k1"]


def test_constant_that_is_a_graph_output_stays() -> None:
    model = check_unchanged(
        """
        g (float[N,3] x) => (float[N,3] y, float[3] k) {
            k = Constant<value_floats = [1.0, 2.0, 3.0]>()
            y = Mul(x, k)
        }
        """
    )
    assert op_counts(model) == {"Constant": 1, "Mul": 1}


def test_constant_inside_an_if_branch_becomes_its_initializer() -> None:
    model = check_cleanup(
        """
        g (bool c, float[N,3] x) => (float[N,3] y) {
            y = If(c) <
                then_branch = t () => (float[N,3] ty) {
                    k = Constant<value_floats = [1.0, 2.0, 3.0]>()
                    ty = Mul(x, k)
                },
                else_branch = e () => (float[N,3] ey) { ey = Neg(x) }
            >
        }
        """,
        {"c": np.array(True), "x": np.random.default_rng(4).standard_normal((2, 3), np.float32)},
    )
    assert op_counts(model) == {"If": 1, "Mul": 1, "Neg": 1}
    (if_node,) = model.graph
    then_branch = if_node.attributes["then_branch"].as_graph()
    assert list(then_branch.initializers) == ["k"]
    assert not model.graph.initializers


def test_constant_inside_a_function_stays() -> None:
    # a function has no initializers
    model = check_unchanged(
        """
        <ir_version: 10, opset_import: ["" : 20, "local" : 1]>
        g (float[N,3] x) => (float[N,3] y) { y = local.scale(x) }
        <domain: "local", opset_import: ["" : 20]>
        scale (p) => (q) {
            k = Constant<value_float = 2.0>()
            q = Mul(p, k)
        }
        """
    )
    (function,) = model.functions.values()
    assert [n.op_type for n in function] == ["Constant", "Mul"]


def test_lifting_is_an_option() -> None:
    text = """
        g (float[N,3] x) => (float[N,3] y) {
            k = Constant<value_float = 2.0>()
            y = Mul(x, k)
        }
        """
    model = build(text)
    assert cleanup(model, lift_constants=False) is False
    assert op_counts(model) == {"Constant": 1, "Mul": 1}
    model = check_cleanup(text)
    assert op_counts(model) == {"Mul": 1}


def test_constants_stay_before_ir_version_4() -> None:
    # an initializer had to be a graph input too, which the caller could override
    model = build(
        """
        <ir_version: 3, opset_import: ["" : 8]>
        g (float[N,3] x) => (float[N,3] y) {
            k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
            y = Mul(x, k)
        }
        """
    )
    assert cleanup(model) is False
    assert op_counts(model) == {"Constant": 1, "Mul": 1}
    assert not model.graph.initializers


# ---------------------------------------------------------------------------------------------
# Common-subexpression elimination


def test_cse_merges_identical_adds() -> None:
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
            a = Add(x, w)
            b = Add(x, w)
            y = Mul(a, b)
        }
        """
    )
    assert op_counts(model) == {"Add": 1, "Mul": 1}
    add, mul = model.graph
    assert mul.inputs[0] is mul.inputs[1] is add.outputs[0]


def test_cse_merges_chains_and_what_earlier_steps_expose() -> None:
    # the two Adds read duplicate weights, the two Relus read x directly and through an Identity
    model = check_cleanup(
        """
        g (float[N,4] x) => (float[N,4] y)
            <float[4] w1 = {1.0, 2.0, 3.0, 4.0}, float[4] w2 = {1.0, 2.0, 3.0, 4.0}> {
            i = Identity(x)
            r1 = Relu(x)
            r2 = Relu(i)
            a1 = Add(r1, w1)
            a2 = Add(r2, w2)
            t2 = Transpose<perm=[0, 1]>(a2)
            e1 = Exp(a1)
            e2 = Exp(t2)
            y = Sub(e1, e2)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1, "Add": 1, "Exp": 1, "Sub": 1}


def test_cse_keeps_nodes_that_differ() -> None:
    check_unchanged(
        """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
            a = Softmax<axis=0>(x)
            b = Softmax<axis=1>(x)
            c = Add(x, w)
            d = Add(w, x)
            e = Add(a, b)
            f = Add(c, d)
            y = Add(e, f)
        }
        """
    )


def test_cse_of_two_graph_outputs_keeps_both_names() -> None:
    model = check_cleanup(
        "g (float[N,4] x) => (float[N,4] y, float[N,4] z) { y = Relu(x)\n z = Relu(x) }"
    )
    assert op_counts(model) == {"Relu": 1, "Identity": 1}


def test_cse_inside_an_if_branch_and_a_function() -> None:
    model = check_cleanup(
        """
        <ir_version: 10, opset_import: ["" : 20, "local" : 1]>
        g (bool c, float[N,4] x) => (float[N,4] y) {
            y = If(c) <
                then_branch = t () => (float[N,4] ty) {
                    a = Neg(x)
                    b = Neg(x)
                    ty = Add(a, b)
                },
                else_branch = e () => (float[N,4] ey) { ey = local.twice(x) }
            >
        }
        <domain: "local", opset_import: ["" : 20]>
        twice (p) => (q) {
            m = Exp(p)
            n = Exp(p)
            q = Add(m, n)
        }
        """,
        {"c": np.array(True), "x": np.random.default_rng(3).standard_normal((2, 4), np.float32)},
    )
    assert op_counts(model) == {"If": 1, "Neg": 1, "Add": 1, "twice": 1}
    (function,) = model.functions.values()
    assert [n.op_type for n in function] == ["Exp", "Add"]


def test_cse_option_off() -> None:
    text = "g (float[N,4] x) => (float[N,4] y) { a = Relu(x)\n b = Relu(x)\n y = Add(a, b) }"
    check_unchanged(text, cse=False)
    model = check_cleanup(text)
    assert op_counts(model) == {"Relu": 1, "Add": 1}


RANDOM_PAIRS = {
    "RandomNormal": "a = RandomNormal<shape=[2, 4]>()\n b = RandomNormal<shape=[2, 4]>()",
    "RandomUniform": "a = RandomUniform<shape=[2, 4]>()\n b = RandomUniform<shape=[2, 4]>()",
    "RandomNormalLike": "a = RandomNormalLike(x)\n b = RandomNormalLike(x)",
    "RandomUniformLike": "a = RandomUniformLike(x)\n b = RandomUniformLike(x)",
    "Bernoulli": "p = Sigmoid(x)\n a = Bernoulli(p)\n b = Bernoulli(p)",
    "Multinomial": "a = Multinomial<sample_size=4, dtype=1>(x)\n"
    " b = Multinomial<sample_size=4, dtype=1>(x)",
    "Dropout-training": "a, am = Dropout(x, r, tm)\n b, bm = Dropout(x, r, tm)",
}


@pytest.mark.parametrize("op", RANDOM_PAIRS)
def test_cse_never_merges_random_ops(op: str) -> None:
    # Neg(x) twice shows that CSE ran; the random pair must survive it
    model = build(
        f"""
        g (float[2,4] x) => (float[2,4] y, float[2,4] z)
            <float r = {{0.5}}, bool tm = {{1}}> {{
            {RANDOM_PAIRS[op]}
            y = Sub(a, b)
            n1 = Neg(x)
            n2 = Neg(x)
            z = Add(n1, n2)
        }}
        """
    )
    assert cleanup(model) is True
    counts = op_counts(model)
    assert counts["Neg"] == 1
    assert counts[op.partition("-")[0]] == 2
    assert not any(  # the temporary markers are gone, the random ops' attributes are back
        key.startswith("onnxforge.")
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for key in node.attributes
    )
    for node in model.graph:
        if node.op_type in ("RandomNormal", "RandomUniform"):
            assert list(node.attributes["shape"].as_ints()) == [2, 4]
        if node.op_type == "Multinomial":
            assert node.attributes["sample_size"].as_int() == 4
    if op != "Multinomial":  # two independent draws differ: a - b is not all zeros
        # (ONNX Runtime's own CSE merges two Bernoulli nodes: run without its optimizations)
        session = Session(model, graph_optimization="none")
        feed = {"x": np.random.default_rng(4).random((2, 4), np.float32)}
        # 8 Bernoulli or Dropout pairs agree everywhere about 1% of the time: draw again;
        # merged nodes would agree on every draw
        assert any(np.any(session.run(feed)[0] != 0) for _ in range(5))


def test_cse_never_merges_custom_ops() -> None:
    check_unchanged(
        """
        <ir_version: 10, opset_import: ["" : 20, "custom.domain" : 1]>
        g (float[N,4] x) => (float[N,4] y) {
            a = custom.domain.Sample(x)
            b = custom.domain.Sample(x)
            y = Add(a, b)
        }
        """
    )


def test_cse_skips_nodes_whose_attributes_it_cannot_compare() -> None:
    # onnx-ir's CSE raises on Optional's type attribute (ONNX's node case test_if_opt)
    model = check_unchanged(
        """
        g (float[4] x) => (bool y, bool z) {
            a = Optional<type = float[4]>()
            b = Optional<type = float[4]>()
            y = OptionalHasElement(a)
            z = OptionalHasElement(b)
        }
        """
    )
    assert run(model, {"x": np.ones(4, np.float32)}) == [False, False]


def test_cse_markers_are_removed_when_cse_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass

    def fail(self, model):
        raise RuntimeError("CSE failed")

    monkeypatch.setattr(CommonSubexpressionEliminationPass, "call", fail)
    model = build(
        "g (float[N,4] x) => (float[N,4] y) "
        "{ a = RandomNormalLike<seed=2.0, scale=3.0>(x)\n y = Add(a, x) }"
    )
    before = as_text(model)
    with pytest.raises(RuntimeError, match="CSE failed"):
        cleanup(model)
    assert as_text(model) == before  # the random node has its own attributes back


# ---------------------------------------------------------------------------------------------
# Exported samples: cleanup is bit-exact on real models


@pytest.mark.parametrize("sample", ["seed-cnn", "transformer"])
def test_exported_sample_stays_bit_exact(sample: str) -> None:
    import onnxforge

    original = onnxforge.export(sample)
    model = original.clone()
    inputs = make_inputs(model, batch=2)
    nodes_before = sum(op_counts(model).values())
    assert cleanup(model) is True  # both exports hold an Identity; the transformer, no-ops
    assert sum(op_counts(model).values()) < nodes_before
    assert_valid(model)
    assert_bitwise_equal(run(original, inputs), run(model, inputs))
    assert cleanup(model) is False


# ---------------------------------------------------------------------------------------------
# Property: random small graphs

_UNARY = ("Relu", "Neg", "Identity", "Abs")
# No-ops that cleanup removes: Transpose with the identity perm, Cast to float, Reshape to the
# value's own shape (the perm and the shape follow the argument's rank, see _call).
_NO_OPS = ("Transpose", "Cast", "Reshape")
_BINARY = ("Add", "Mul", "Sub")
# Identity and the no-ops are what cleanup is most about
_OPS = (*_UNARY, "Identity", "Identity", *_NO_OPS, *_BINARY)
# A small pool of weight values, so that duplicate initializers are common.
_WEIGHT_POOL = ((1.0, 2.0, 3.0), (0.5, -1.0, 2.0), (-2.0, 0.25, 1.5))
# The target shapes of the no-op Reshapes, one per shape that a value can have.
_SHAPE_INITIALIZERS = "int64[2] s23 = {2, 3}, int64[1] s3 = {3}"


def _call(op: str, args: list[str], shape: str) -> str:
    """The right-hand side of ``op`` on ``args``; ``shape`` is the shape of the first one."""
    rank2 = shape == "2,3"
    if op == "Transpose":
        return f"Transpose<perm={'[0, 1]' if rank2 else '[0]'}>({args[0]})"
    if op == "Cast":
        return f"Cast<to=1>({args[0]})"
    if op == "Reshape":
        return f"Reshape({args[0]}, {'s23' if rank2 else 's3'})"
    return f"{op}({', '.join(args)})"


@st.composite
def random_graphs(draw) -> tuple[str, list[str]]:
    """ONNX text of a random DAG of elementwise ops over x: float[2,3] and float[3] weights.

    Some weights repeat, some nodes and weights are dead, Identity nodes and no-ops appear
    anywhere (also in front of graph outputs and on weights), and equal nodes are common. Graph
    outputs are any distinct node outputs, Identity copies of one value included. Every
    intermediate value carries its type and shape, as an exporter's would.
    """
    weights = draw(st.lists(st.sampled_from(_WEIGHT_POOL), max_size=4))
    shapes = {"x": "2,3", **{f"w{i}": "3" for i in range(len(weights))}}
    values = list(shapes)
    lines = []
    for index in range(draw(st.integers(min_value=1, max_value=10))):
        out = f"v{index}"
        op = draw(st.sampled_from(_OPS))
        args = [draw(st.sampled_from(values)) for _ in range(2 if op in _BINARY else 1)]
        lines.append(f"{out} = {_call(op, args, shapes[args[0]])}")
        shapes[out] = "2,3" if any(shapes[a] == "2,3" for a in args) else "3"
        values.append(out)
    candidates = draw(st.permutations(values[1 + len(weights) :]))
    count = draw(st.integers(min_value=1, max_value=3))
    outputs = list(candidates[:count])
    declarations = [f"float[3] w{i} = {{{', '.join(map(str, w))}}}" for i, w in enumerate(weights)]
    declarations.append(_SHAPE_INITIALIZERS)
    declarations += [
        f"float[{shapes[v]}] {v}" for v in values[1 + len(weights) :] if v not in outputs
    ]
    signature = ", ".join(f"float[{shapes[o]}] {o}" for o in outputs)
    body = "\n    ".join(lines)
    text = f"g (float[2,3] x) => ({signature}) <{', '.join(declarations)}> {{\n    {body}\n}}"
    return text, outputs


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
    # no no-op is left
    assert not set(op_counts(model)) & set(_NO_OPS), text
    # Identity only where it must stay: into a graph output, from a graph input, a weight or
    # another graph output (two outputs that are copies of one value keep both their names)
    for node in model.graph:
        if node.op_type == "Identity":
            source = node.inputs[0]
            assert node.outputs[0] in graph_outputs, text
            assert source.is_graph_input() or source.is_initializer() or source in graph_outputs, (
                text
            )
    # no common subexpression is left: no two nodes apply one op to the same values
    computed = collections.Counter(
        (node.op_type, tuple(id(v) for v in node.inputs))
        for node in model.graph
        if node.op_type != "Identity"
    )
    assert all(n == 1 for n in computed.values()), text
    # no dead and no duplicate weights
    contents = collections.Counter()
    for value in model.graph.initializers.values():
        assert value.uses() or value in graph_outputs, text
        contents[value.const_value.numpy().tobytes()] += 1
    assert all(n == 1 for n in contents.values()), text
