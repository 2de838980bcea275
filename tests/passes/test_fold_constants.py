"""``fold-constants``: evaluate what is constant, never what must not be (STYLE.md rule 5)."""

from __future__ import annotations

import collections
import logging
import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnxscript.optimizer import _constant_folding

import onnxforge
from onnxforge.backend import Session, compare_outputs, make_inputs
from onnxforge.passes import (
    DEFAULT_TOLERANCES,
    PassManager,
    Semantics,
    VerifyNumerics,
    VerifyStructure,
    available_passes,
)
from onnxforge.passes.fold_constants import (
    DEFAULT_INPUT_SIZE_LIMIT,
    DEFAULT_OUTPUT_SIZE_LIMIT,
    DEFAULT_SHAPE_INFERENCE,
    NEVER_FOLD_OPS,
    FoldConstantsPass,
    SkippedNode,
)

from .conftest import as_text, assert_bitwise_equal, assert_valid, build, inputs_for, op_counts, run

TOLERANCE = DEFAULT_TOLERANCES[Semantics.REASSOCIATING]  # relative L2


def fold(model: ir.Model, **options) -> tuple[bool, FoldConstantsPass]:
    """Run fold-constants in place; returns ``modified`` and the pass (for ``skipped``)."""
    pass_ = FoldConstantsPass(**options)
    result = pass_(model)
    assert result.model is model  # an in-place pass
    return result.modified, pass_


def assert_close(ref: list[np.ndarray], got: list[np.ndarray], tolerance: float) -> None:
    """Same shapes and dtypes, values within ``tolerance`` relative L2 (through compare)."""
    assert [(r.shape, r.dtype) for r in ref] == [(g.shape, g.dtype) for g in got]
    comparison = compare_outputs(ref, got)
    assert comparison.finite
    assert comparison.rel_l2 <= tolerance, comparison


def check_fold(
    text: str, feeds: list[dict[str, np.ndarray]] | None = None, **options
) -> tuple[ir.Model, FoldConstantsPass]:
    """Fold the model and check what every folding must satisfy; return the result.

    ``modified`` is honest, the result passes the full ONNX checker, keeps the graph's input
    and output names, computes what the input computed (ONNX Runtime, reassociating tolerance,
    on every feed), and a second run changes nothing.
    """
    original = build(text)
    model = build(text)
    assert_valid(original)
    feeds = feeds if feeds is not None else [inputs_for(model)]
    text_before = as_text(model)
    modified, pass_ = fold(model, **options)
    assert modified == (as_text(model) != text_before)  # modified is honest
    assert_valid(model)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    for feed in feeds:
        assert_close(run(original, feed), run(model, feed), TOLERANCE)
    settled = as_text(model)
    assert fold(model, **options)[0] is False
    assert as_text(model) == settled
    return model, pass_


def initializer(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


class EvaluatorLog(list):
    """The op types onnxscript's evaluator was asked to evaluate, in order.

    Ops in ``refused`` are recorded but not evaluated (as if evaluation failed), so that a
    test of an op that must never be evaluated cannot allocate gigabytes when it fails.
    """

    refused: frozenset[str] = frozenset()


@pytest.fixture
def evaluated(monkeypatch) -> EvaluatorLog:
    """Record what onnxscript's reference evaluator is asked to evaluate."""
    log = EvaluatorLog()
    evaluator = _constant_folding._reference_evaluator
    original = evaluator.evaluate

    def evaluate(domain, op, version, *args, **kwargs):
        log.append(op)
        if op in log.refused:
            return None
        return original(domain, op, version, *args, **kwargs)

    monkeypatch.setattr(evaluator, "evaluate", evaluate)
    return log


def test_name_semantics_and_options() -> None:
    assert available_passes()["fold-constants"] is FoldConstantsPass
    assert FoldConstantsPass.semantics is Semantics.REASSOCIATING
    options = {spec.name: spec.default for spec in FoldConstantsPass.options()}
    assert options == {
        "input_size_limit": DEFAULT_INPUT_SIZE_LIMIT,
        "output_size_limit": DEFAULT_OUTPUT_SIZE_LIMIT,
        "shape_inference": DEFAULT_SHAPE_INFERENCE,
    }
    with pytest.raises(ValueError, match="cannot be negative"):
        FoldConstantsPass(output_size_limit=-1)


# ---------------------------------------------------------------------------------------------
# The rewrite on tiny graphs


def test_constant_subexpression_folded_into_an_initializer() -> None:
    model, _ = check_fold(
        """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, -2.0, 3.0, 0.5}> {
            two = Constant <value_float = 2.0> ()
            s = Mul(w, two)
            y = Add(x, s)
        }
        """
    )
    assert op_counts(model) == {"Add": 1}
    (add,) = model.graph
    assert add.inputs[1].is_initializer()
    np.testing.assert_array_equal(add.inputs[1].const_value.numpy(), [2.0, -4.0, 6.0, 1.0])
    assert list(model.graph.initializers) == ["s"]  # w is gone: only the folded node used it


def test_chain_of_constant_ops_folded_to_one_value() -> None:
    model, _ = check_fold(
        """
        g (float[N,2,3] x) => (float[N,2,3] y) <float[3,2] w = {1, 2, 3, 4, 5, 6}> {
            t = Transpose <perm = [1, 0]> (w)
            shape = Constant <value_ints = [1, 2, 3]> ()
            r = Reshape(t, shape)
            e = Exp(r)
            l = Log(e)
            c = Cast <to = 1> (l)
            y = Mul(x, c)
        }
        """
    )
    assert op_counts(model) == {"Mul": 1}
    (mul,) = model.graph
    expected = np.array([1, 2, 3, 4, 5, 6], np.float32).reshape(3, 2).T.reshape(1, 2, 3)
    np.testing.assert_allclose(mul.inputs[1].const_value.numpy(), expected, rtol=1e-6)


def test_small_constant_of_shape_is_folded() -> None:
    model, pass_ = check_fold(
        """
        g (float[N,3] x) => (float[N,3] y) {
            shape = Constant <value_ints = [3]> ()
            ones = ConstantOfShape <value = float[1] {1.5}> (shape)
            y = Add(x, ones)
        }
        """
    )
    assert op_counts(model) == {"Add": 1}
    np.testing.assert_array_equal(initializer(model, "ones"), [1.5, 1.5, 1.5])
    assert pass_.skipped == []


# ---------------------------------------------------------------------------------------------
# No-op and idempotence


@pytest.mark.parametrize(
    "text",
    [
        "g (float[N,4] x) => (float[N,4] y) { a = Relu(x)\n b = Neg(a)\n y = Abs(b) }",
        """g (float[N,4] x) => (float[N,4] y) <float[4] w = {1, 2, 3, 4}> {
               a = Mul(x, w)
               y = Relu(a)
           }""",
        # an initializer that is also a graph input can be fed at run time: not a constant
        """g (float[N,4] x, float[4] w) => (float[N,4] y) <float[4] w = {1, 2, 3, 4}> {
               two = Constant <value_float = 2.0> ()
               s = Mul(w, two)
               y = Add(x, s)
           }""",
    ],
)
def test_no_op_leaves_the_model_untouched(text: str) -> None:
    # shape inference annotates the intermediate values while folding; with nothing folded
    # the annotations are put back, so the text (value_info included) is unchanged
    model = build(text)
    before = as_text(model)
    modified, pass_ = fold(model)
    assert modified is False
    assert as_text(model) == before
    assert pass_.skipped == []


def test_idempotent_through_the_manager() -> None:
    model = build(
        """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1, 2, 3, 4}> {
            s = Shape(x)
            k = Constant <value_float = 0.5> ()
            h = Mul(w, k)
            a = Add(x, h)
            y = Reshape(a, s)
        }
        """
    )
    instruments = [
        VerifyStructure(),
        VerifyNumerics(Session.runner(), inputs_for(model), compare_outputs),
    ]
    result = PassManager("fold-constants,fold-constants", instruments).run(model)
    assert [r.modified for r in result.records] == [True, False]
    assert result.records[0].drift["rel_l2"] <= TOLERANCE
    assert op_counts(result.model) == {"Add": 1}  # Reshape to its own shape went too


# ---------------------------------------------------------------------------------------------
# Graph outputs and multiple consumers


def test_folded_value_that_is_a_graph_output_keeps_its_name() -> None:
    model, _ = check_fold(
        """
        g (float[N,4] x) => (float[N,4] y, float[4] z) <float[4] w = {1, 2, 3, 4}> {
            two = Constant <value_float = 2.0> ()
            z = Mul(w, two)
            y = Add(x, z)
        }
        """
    )
    assert [o.name for o in model.graph.outputs] == ["y", "z"]
    z = model.graph.outputs[1]
    assert z.is_initializer()
    np.testing.assert_array_equal(z.const_value.numpy(), [2, 4, 6, 8])
    (add,) = model.graph
    assert add.inputs[1] is z


def test_graph_output_computed_from_constants_only() -> None:
    model, _ = check_fold(
        """
        g (float[N,4] x) => (float[N,4] y, float[2,2] z) <float[4] w = {1, 2, 3, 4}> {
            shape = Constant <value_ints = [2, 2]> ()
            r = Reshape(w, shape)
            z = Neg(r)
            y = Relu(x)
        }
        """
    )
    assert op_counts(model) == {"Relu": 1}
    np.testing.assert_array_equal(model.graph.outputs[1].const_value.numpy(), [[-1, -2], [-3, -4]])


def test_constant_with_several_consumers_is_folded_once() -> None:
    model, _ = check_fold(
        """
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) <float[4] w = {1, 2, 3, 4}> {
            two = Constant <value_float = 2.0> ()
            s = Mul(w, two)
            y = Add(x, s)
            z = Sub(x, s)
        }
        """
    )
    add = next(n for n in model.graph if n.op_type == "Add")
    sub = next(n for n in model.graph if n.op_type == "Sub")
    assert add.inputs[1] is sub.inputs[1]
    assert add.inputs[1].is_initializer()
    assert sorted(model.graph.initializers) == ["s"]


def test_input_that_another_node_still_uses_is_kept() -> None:
    model, _ = check_fold(
        """
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) <float[4] w = {1, 2, 3, 4}> {
            two = Constant <value_float = 2.0> ()
            s = Mul(w, two)
            y = Add(x, s)
            z = Mul(x, w)
        }
        """
    )
    assert sorted(model.graph.initializers) == ["s", "w"]
    assert op_counts(model) == {"Add": 1, "Mul": 1}


def test_dead_code_that_was_there_before_is_left_to_cleanup() -> None:
    model, _ = check_fold(
        """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1, 2, 3, 4}, float[2] unused = {1, 2}> {
            dead = Neg(x)
            two = Constant <value_float = 2.0> ()
            s = Mul(w, two)
            y = Add(x, s)
        }
        """
    )
    assert op_counts(model) == {"Neg": 1, "Add": 1}
    assert sorted(model.graph.initializers) == ["s", "unused"]


# ---------------------------------------------------------------------------------------------
# What is never folded

NEVER_FOLDED = {
    "RandomNormal": "r = RandomNormal <shape = [4]> ()",
    "RandomUniform": "r = RandomUniform <shape = [4]> ()",
    "RandomNormalLike": "r = RandomNormalLike(c)",
    "RandomUniformLike": "r = RandomUniformLike(c)",
    "Multinomial": "r0 = Multinomial <sample_size = 4> (logits)\n r = Cast <to = 1> (r0)",
    "Bernoulli": "r = Bernoulli(p)",
    "Dropout": "r = Dropout(c, ratio, training)",
    "QuantizeLinear": "q = QuantizeLinear(c, scale, zp)\n r = Cast <to = 1> (q)",
    "DequantizeLinear": "r = DequantizeLinear(q8, scale, zp)",
    "DynamicQuantizeLinear": "q, qs, qz = DynamicQuantizeLinear(c)\n r = Cast <to = 1> (q)",
}
# every input the snippets above use, all constant
NEVER_FOLDED_CONSTANTS = """
    <float[4] c = {0.5, -1.0, 2.0, 0.25}, float[1,4] logits = {0.1, 0.2, 0.3, 0.4},
     float[4] p = {0.5, 0.5, 0.5, 0.5}, float ratio = {0.5}, bool training = {1},
     float scale = {0.5}, uint8 zp = {3}, uint8[4] q8 = {1, 2, 3, 250}>
"""


def test_never_fold_list_is_complete() -> None:
    assert set(NEVER_FOLDED) == NEVER_FOLD_OPS


@pytest.mark.parametrize("op_type", sorted(NEVER_FOLDED))
def test_never_folded(op_type: str, evaluated: EvaluatorLog) -> None:
    body = NEVER_FOLDED[op_type]
    shape = "1,4" if op_type == "Multinomial" else "4"
    text = f"""
        g (float[N,4] x) => (float[N,4] y, float[{shape}] z) {NEVER_FOLDED_CONSTANTS} {{
            {body}
            z = Identity(r)
            two = Constant <value_float = 2.0> ()
            k = Mul(c, two)
            y = Add(x, k)
        }}
        """
    model = build(text)
    assert_valid(model)
    assert fold(model)[0] is True  # the Mul next to it was folded
    assert_valid(model)
    assert op_counts(model)[op_type] == 1
    assert op_type not in evaluated
    assert "Mul" in evaluated  # the evaluator was in use, only not for this op
    (node,) = (n for n in model.graph if n.op_type == op_type)
    assert all(v is None or v.is_initializer() for v in node.inputs)  # inputs still constant


@pytest.mark.parametrize("domain", ["com.example", "ai.onnx.ml", "com.microsoft"])
def test_ops_outside_the_onnx_domain_are_never_folded(domain: str, evaluated: EvaluatorLog) -> None:
    # ai.onnx.ml's Binarizer and com.microsoft's ops have evaluators in onnx.reference
    op = "Binarizer <threshold = 0.5>" if domain == "ai.onnx.ml" else "Gelu"
    text = f"""
        <ir_version: 10, opset_import: ["" : 20, "{domain}" : 1]>
        g (float[N,4] x) => (float[N,4] y) <float[4] c = {{0.5, -1.0, 2.0, 0.25}}> {{
            r = {domain}.{op} (c)
            y = Add(x, r)
        }}
        """
    model = build(text)
    before = as_text(model)
    assert fold(model)[0] is False
    assert as_text(model) == before
    assert evaluated == []


def test_onnxscript_crash_on_a_node_means_not_folded() -> None:
    # onnxscript 0.7's SplitToSequence evaluator crashes on a non-constant scalar split
    text = """
        g (float[3,6] x, int64 split) => (float[3,6] y) {
            seq = SplitToSequence <axis = 1> (x, split)
            y = ConcatFromSequence <axis = 1> (seq)
        }
        """
    model = build(text)
    before = as_text(model)
    assert fold(model)[0] is False
    assert as_text(model) == before


# ---------------------------------------------------------------------------------------------
# Size limits: a huge folded output is reported and never materialised

HUGE = 100_000  # [HUGE, HUGE] float32 is 40 GB

HUGE_CASES = {
    "ConstantOfShape": f"""
        shape = Constant <value_ints = [{HUGE}, {HUGE}]> ()
        big = ConstantOfShape <value = float[1] {{1.0}}> (shape)
    """,
    "Expand": f"""
        shape = Constant <value_ints = [{HUGE}, {HUGE}]> ()
        one = Constant <value_float = 1.0> ()
        big = Expand(one, shape)
    """,
    "Tile": f"""
        repeats = Constant <value_ints = [{HUGE // 2}, {HUGE // 2}]> ()
        block = Constant <value_floats = [1.0, 2.0, 3.0, 4.0]> ()
        shape = Constant <value_ints = [2, 2]> ()
        tile = Reshape(block, shape)
        big = Tile(tile, repeats)
    """,
}


def huge_model(op_type: str) -> ir.Model:
    """A tiny model whose ``big`` value would be [HUGE, HUGE] floats if folded."""
    return build(
        f"""
        g (float[N,4] x) => (float[N,4] y, float s) {{
            {HUGE_CASES[op_type]}
            s = ReduceSum <keepdims = 0> (big)
            y = Relu(x)
        }}
        """
    )


@pytest.mark.parametrize("op_type", sorted(HUGE_CASES))
def test_huge_output_is_reported_and_never_evaluated(op_type, evaluated, caplog) -> None:
    evaluated.refused = frozenset({op_type, "ReduceSum"})
    model = huge_model(op_type)
    with caplog.at_level(logging.WARNING, logger="onnxforge.passes.fold_constants"):
        modified, pass_ = fold(model)
    assert op_counts(model)[op_type] == 1
    assert "ReduceSum" in op_counts(model)
    assert op_type not in evaluated
    assert "ReduceSum" not in evaluated
    skipped = [s for s in pass_.skipped if s.node.startswith(f"{op_type} -> big")]
    assert len(skipped) == 1, pass_.skipped
    assert isinstance(skipped[0], SkippedNode)
    assert f"{HUGE * HUGE} elements" in skipped[0].reason
    assert any(f"{op_type} -> big" in r.getMessage() for r in caplog.records)
    assert_valid(model)
    # Tile's Reshape of its constant input is small and still folds; nothing else does
    assert modified is (op_type == "Tile")


def test_huge_output_never_materialised_in_memory() -> None:
    # 10_000 x 10_000 float32 would be 400 MB; the pass must stay far below that
    model = build(
        """
        g (float[N,4] x) => (float[N,4] y, float s) {
            shape = Constant <value_ints = [10000, 10000]> ()
            big = ConstantOfShape <value = float[1] {1.0}> (shape)
            s = ReduceSum <keepdims = 0> (big)
            two = Constant <value_float = 2.0> ()
            three = Constant <value_float = 3.0> ()
            six = Mul(two, three)
            y = Mul(x, six)
        }
        """
    )
    tracemalloc.start()
    try:
        modified, pass_ = fold(model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert modified is True  # six was folded
    assert peak < 20 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"
    assert {"ConstantOfShape", "ReduceSum"} <= set(op_counts(model))
    assert [s.node for s in pass_.skipped] == ["ConstantOfShape -> big"]


def test_output_size_limit_counts_elements_and_credits_single_use_inputs() -> None:
    text = """
        g (float[N,4] x) => (float[N,4] y, float[N,4] z) <float[4] w = {1, 2, 3, 4},
                                                          float[4] v = {1, 2, 3, 4}> {
            two = Constant <value_float = 2.0> ()
            a = Mul(w, two)
            y = Add(x, a)
            b = Mul(v, two)
            z = Add(x, b)
            u = Mul(x, v)
        }
        """
    # a (4 elements) replaces w (4 elements, used only by it): no growth, folded at any limit;
    # b adds 4 elements to the model (v stays for u): over a limit of 3, reported
    model, pass_ = check_fold(text, output_size_limit=3)
    assert "a" in model.graph.initializers
    assert [s.node for s in pass_.skipped] == ["Mul -> b"]
    assert op_counts(model) == {"Constant": 1, "Add": 2, "Mul": 2}
    model, pass_ = check_fold(text, output_size_limit=4)
    assert pass_.skipped == []
    assert op_counts(model) == {"Add": 2, "Mul": 1}


def test_input_size_limit() -> None:
    text = """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1, 2, 3, 4}> {
            two = Constant <value_float = 2.0> ()
            a = Mul(w, two)
            y = Add(x, a)
        }
        """
    model = build(text)
    assert fold(model, input_size_limit=3)[0] is False
    assert op_counts(model) == {"Constant": 1, "Mul": 1, "Add": 1}
    assert fold(model, input_size_limit=4)[0] is True
    assert op_counts(model) == {"Add": 1}


# ---------------------------------------------------------------------------------------------
# Subgraphs

IF_CAPTURING = """
g (bool c, float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
    y = If(c) <
        then_branch = t () => (float[N,4] ty) {
            two = Constant <value_float = 2.0> ()
            s = Mul(w, two)
            ty = Add(x, s)
        },
        else_branch = e () => (float[N,4] ey) {
            k = Constant <value_floats = [1.0, -1.0, 0.5, 2.0]> ()
            n = Neg(k)
            m = Mul(x, n)
            ey = Add(m, w)
        }
    >
}
"""


def if_feeds(**extra: np.ndarray) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    return [{"c": np.array(c), "x": x, **extra} for c in (True, False)]


def branches(model: ir.Model) -> dict[str, ir.Graph]:
    (node,) = (n for n in model.graph if n.op_type == "If")
    return {name: attr.as_graph() for name, attr in node.attributes.items()}


def test_if_branches_fold_and_keep_outer_scope_values() -> None:
    model, _ = check_fold(IF_CAPTURING, if_feeds())
    graphs = branches(model)
    then, else_ = graphs["then_branch"], graphs["else_branch"]
    assert [n.op_type for n in then] == ["Add"]
    assert [n.op_type for n in else_] == ["Mul", "Add"]
    # the folded constants live in the branches; x and w still come from the outer graph
    np.testing.assert_array_equal(then.initializers["s"].const_value.numpy(), [2, 4, 6, 8])
    np.testing.assert_array_equal(else_.initializers["n"].const_value.numpy(), [-1, 1, -0.5, -2])
    (add,) = then
    assert add.inputs[0] is model.graph.inputs[1]
    assert else_.node(1).inputs[1] is model.graph.initializers["w"]


def test_if_branch_output_folded_to_a_branch_initializer() -> None:
    text = """
        g (bool c, float[4] x) => (float[4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
            y = If(c) <
                then_branch = t () => (float[4] ty) {
                    two = Constant <value_float = 2.0> ()
                    ty = Mul(w, two)
                },
                else_branch = e () => (float[4] ey) { ey = Neg(x) }
            >
        }
        """
    x = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    model, _ = check_fold(text, [{"c": np.array(c), "x": x} for c in (True, False)])
    then = branches(model)["then_branch"]
    assert list(then) == []
    assert then.outputs[0].is_initializer()
    assert then.outputs[0].name == "ty"
    assert "w" not in model.graph.initializers


def test_if_with_a_constant_condition_is_inlined() -> None:
    text = """
        g (float[N,4] x) => (float[N,4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
            c = Constant <value = bool {1}> ()
            y = If(c) <
                then_branch = t () => (float[N,4] ty) {
                    two = Constant <value_float = 2.0> ()
                    s = Mul(w, two)
                    ty = Add(x, s)
                },
                else_branch = e () => (float[N,4] ey) { ey = Neg(x) }
            >
        }
        """
    model, _ = check_fold(text)
    assert op_counts(model) == {"Add": 1}


def test_loop_body_folds_and_keeps_outer_scope_values() -> None:
    text = """
        g (float[4] x) => (float[4] y) <float[4] w = {1, 2, 3, 4}, int64 n = {3}> {
            go = Constant <value = bool {1}> ()
            y = Loop(n, go, x) <
                body = b (int64 i, bool cin, float[4] acc) => (bool cout, float[4] next) {
                    half = Constant <value_float = 0.5> ()
                    s = Mul(w, half)
                    t = Mul(acc, s)
                    next = Add(t, w)
                    cout = Identity(cin)
                }
            >
        }
        """
    x = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    model, _ = check_fold(text, [{"x": x}])
    (loop,) = (n for n in model.graph if n.op_type == "Loop")
    body = loop.attributes["body"].as_graph()
    assert [n.op_type for n in body] == ["Mul", "Add", "Identity"]
    assert body.node(1).inputs[1] is model.graph.initializers["w"]


def test_scan_body_folds() -> None:
    text = """
        g (float[3,2] xs) => (float[2] total, float[3,2] ys) <float[2] w = {1, 2}> {
            zero = Constant <value_floats = [0.0, 0.0]> ()
            total, ys = Scan <
                num_scan_inputs = 1,
                body = b (float[2] acc, float[2] xi) => (float[2] acc_out, float[2] yi) {
                    three = Constant <value_float = 3.0> ()
                    s = Mul(w, three)
                    yi = Mul(xi, s)
                    acc_out = Add(acc, yi)
                }
            > (zero, xs)
        }
        """
    xs = np.arange(6, dtype=np.float32).reshape(3, 2)
    model, _ = check_fold(text, [{"xs": xs}])
    (scan,) = (n for n in model.graph if n.op_type == "Scan")
    assert [n.op_type for n in scan.attributes["body"].as_graph()] == ["Mul", "Add"]


def test_function_bodies_fold_to_constant_nodes() -> None:
    text = """
        <ir_version: 10, opset_import: ["" : 20, "local" : 1]>
        g (float[N,4] x) => (float[N,4] y) { y = local.scale(x) }
        <domain: "local", opset_import: ["" : 20]>
        scale (a) => (b) {
            two = Constant <value_float = 2.0> ()
            three = Constant <value_float = 3.0> ()
            six = Mul(two, three)
            b = Mul(a, six)
        }
        """
    model, _ = check_fold(text)
    (function,) = model.functions.values()
    assert [n.op_type for n in function] == ["Constant", "Mul"]
    assert list(function)[0].attributes["value"].as_tensor().numpy() == 6.0


def test_folding_that_would_break_shape_inference_is_undone(caplog) -> None:
    # The condition is constant only to shape analysis (Size of a static input), so ONNX
    # Runtime keeps the If; folding inlines it and hands Range its 1-element 1-D limit as a
    # constant, which Range's shape inference rejects (ONNX's AffineGrid function does this)
    text = """
        g (float[2] x) => (int64[?] y) <int64 zero = {0}, int64 one = {1}> {
            size = Size(x)
            two = Constant <value_int = 2> ()
            c = Equal(size, two)
            limit = If (c) <
                then_branch = t () => (int64[1] t_limit) {
                    three = Constant <value_ints = [3]> ()
                    t_limit = Identity(three)
                },
                else_branch = e () => (int64[1] e_limit) {
                    e_limit = Constant <value_ints = [2]> ()
                }
            >
            y = Range(zero, limit, one)
        }
        """
    x = np.zeros(2, np.float32)
    with caplog.at_level(logging.WARNING, logger="onnxforge.passes.fold_constants"):
        model, pass_ = check_fold(text, [{"x": x}])
    assert as_text(model) == as_text(build(text))
    np.testing.assert_array_equal(run(model, {"x": x})[0], [0, 1, 2])
    assert [s.node for s in pass_.skipped if "shape inference" in s.reason] == ["Range -> y"]
    assert any("Range -> y" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Shape arithmetic


def test_shape_gather_concat_reshape_chain_folds_when_shapes_are_static() -> None:
    # what the TorchScript exporter writes for x.view(x.size(0), -1)
    text = """
        g (float[2,16,5,5] x) => (float[2,400] y) {
            s = Shape(x)
            zero = Constant <value_int = 0> ()
            n = Gather(s, zero)
            axes = Constant <value_ints = [0]> ()
            nu = Unsqueeze(n, axes)
            minus_one = Constant <value_ints = [-1]> ()
            shape = Concat <axis = 0> (nu, minus_one)
            y = Reshape(x, shape)
        }
        """
    model, _ = check_fold(text)
    assert op_counts(model) == {"Reshape": 1}
    np.testing.assert_array_equal(initializer(model, "shape"), [2, -1])


# x.view(x.size(0), -1) with the features computed from Shape too; {batch} reads the batch
SYMBOLIC_BATCH = """
    g (float[N,16,5,5] x, float[M,3] z) => (float[N,400] y, float[M,3] w) {{
        s = Shape(x)
        one = Constant <value_int = 1> ()
        c = Gather(s, one)
        hw_index = Constant <value_ints = [2, 3]> ()
        hw = Gather(s, hw_index)
        hw_size = ReduceProd <keepdims = 1> (hw)
        axes = Constant <value_ints = [0]> ()
        cu = Unsqueeze(c, axes)
        features = Mul(cu, hw_size)
        batch = Shape <end = 1> ({batch})
        shape = Concat <axis = 0> (batch, features)
        y = Reshape <allowzero = 1> (x, shape)
        w = Relu(z)
    }}
    """


def _symbolic_batch_feeds() -> list[dict[str, np.ndarray]]:
    x3 = np.random.default_rng(0).standard_normal((3, 16, 5, 5)).astype(np.float32)
    return [
        {"x": x[:batch], "z": np.ones((batch, 3), np.float32)} for x, batch in ((x3, 3), (x3, 1))
    ]


def test_a_reshape_to_its_own_symbolic_batch_gets_a_constant_target() -> None:
    # the target [N, 400] is x's own N in place: it becomes [0, 400] ("copy dim 0")
    model, _ = check_fold(SYMBOLIC_BATCH.format(batch="x"), _symbolic_batch_feeds())
    assert op_counts(model) == {"Reshape": 1, "Relu": 1}
    (reshape,) = (n for n in model.graph if n.op_type == "Reshape")
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [0, 400])
    assert reshape.attributes.get_int("allowzero", 0) == 0


def test_symbolic_batch_of_another_value_folds_only_the_static_parts() -> None:
    # the batch is z's M, which may differ from x's N: only the features fold
    model, _ = check_fold(SYMBOLIC_BATCH.format(batch="z"), _symbolic_batch_feeds())
    assert op_counts(model) == {"Shape": 1, "Concat": 1, "Reshape": 1, "Relu": 1}
    np.testing.assert_array_equal(initializer(model, "features"), [400])
    (shape,) = (n for n in model.graph if n.op_type == "Shape")
    assert shape.attributes["end"].as_int() == 1  # the batch dimension is still read at run time


def test_a_literal_zero_that_allowzero_makes_a_size_is_not_taken_for_a_copy() -> None:
    text = """
        g (float[N,2,0] x) => (float[N,0] y) {
            batch = Shape <end = 1> (x)
            zero = Constant <value_ints = [0]> ()
            shape = Concat <axis = 0> (batch, zero)
            y = Reshape <allowzero = 1> (x, shape)
        }
        """
    # [N, 0] with allowzero is N x 0; as a copy, [0, 0] would be N x 2
    model, _ = check_fold(text, [{"x": np.zeros((3, 2, 0), np.float32)}])
    assert "Shape" in op_counts(model)


def test_gather_from_a_reshaped_shape_value_is_not_taken_for_a_dimension() -> None:
    # onnxscript tracks Reshape(Shape(x), [1, 4]) as the shape [2, N, 3, 4]; Gather(., 0) on
    # that [1, 4] tensor is its first row, not the dimension 2
    text = """
        g (float[2,N,3,4] x) => (int64[4] y) {
            s = Shape(x)
            row_shape = Constant <value_ints = [1, 4]> ()
            rows = Reshape(s, row_shape)
            zero = Constant <value_int = 0> ()
            y = Gather(rows, zero)
        }
        """
    x = np.zeros((2, 5, 3, 4), np.float32)
    model, _ = check_fold(text, [{"x": x}])
    np.testing.assert_array_equal(run(model, {"x": x})[0], [2, 5, 3, 4])


def test_shape_inference_option() -> None:
    # Shape of an intermediate value is known only through shape inference
    text = """
        g (float[2,3] x) => (float[6] y) {
            a = Relu(x)
            s = Shape(a)
            n = ReduceProd <keepdims = 1> (s)
            y = Reshape(a, n)
        }
        """
    model = build(text)
    assert fold(model, shape_inference=False)[0] is False
    model, _ = check_fold(text, shape_inference=True)
    assert op_counts(model) == {"Relu": 1, "Reshape": 1}
    np.testing.assert_array_equal(initializer(model, "n"), [6])


@pytest.fixture(scope="module")
def static_seed_cnn() -> ir.Model:
    """The seed-cnn sample exported with a static batch (do not mutate; clone it)."""
    return onnxforge.export("seed-cnn", dynamic_batch=False)


SHAPE_CHAIN_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Constant"}


@pytest.mark.slow
def test_exporter_shape_chains_fold_away(static_seed_cnn: ir.Model) -> None:
    original = static_seed_cnn.clone()
    model = static_seed_cnn.clone()
    assert op_counts(model) & collections.Counter(dict.fromkeys(SHAPE_CHAIN_OPS, 1))  # a chain
    modified, pass_ = fold(model)
    assert modified is True
    assert pass_.skipped == []
    counts = op_counts(model)
    assert not set(counts) & SHAPE_CHAIN_OPS, counts
    assert counts["Reshape"] == op_counts(original)["Reshape"] == 1
    (reshape,) = (n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].is_initializer()
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [2, 400])
    assert_valid(model)
    inputs = make_inputs(original, batch=2)
    assert_close(run(original, inputs), run(model, inputs), TOLERANCE)
    assert fold(model)[0] is False


@pytest.mark.slow
def test_exporter_dynamic_batch_model_still_right(seed_cnn_model: ir.Model) -> None:
    original = seed_cnn_model.clone()
    model = seed_cnn_model.clone()
    fold(model)
    assert_valid(model)
    assert not set(op_counts(model)) & SHAPE_CHAIN_OPS  # the flatten copies the batch dimension
    (reshape,) = (n for n in model.graph if n.op_type == "Reshape")
    np.testing.assert_array_equal(reshape.inputs[1].const_value.numpy(), [0, 400])
    for batch in (1, 3):
        inputs = make_inputs(original, batch=batch)
        assert_close(run(original, inputs), run(model, inputs), TOLERANCE)


# ---------------------------------------------------------------------------------------------
# Property: random small graphs of constant and non-constant elementwise and shape ops

_UNARY = ("Neg", "Abs", "Relu", "Sigmoid", "Tanh")
_BINARY = ("Add", "Sub", "Mul", "Max", "Min")
_SHAPE_OPS = ("reshape-flat", "transpose-twice", "unsqueeze-squeeze", "expand", "gather-dims")
_VALUES = st.lists(
    st.integers(min_value=-8, max_value=8).map(lambda v: v / 4), min_size=6, max_size=6
)


@st.composite
def random_graphs(draw) -> tuple[str, list[str]]:
    """ONNX text of a random DAG over x: float[2,3], constants of shape [3] and [2,3].

    Values are [2,3] or [3]; elementwise ops broadcast; shape ops round-trip through Shape,
    Gather, Concat, Reshape, Transpose, Unsqueeze/Squeeze and Expand, so that folding has
    shape arithmetic to do on non-constant values as well as arithmetic on constants.
    """
    shapes = {"x": (2, 3)}
    initializers = []
    for index in range(draw(st.integers(min_value=1, max_value=4))):
        shape = draw(st.sampled_from([(3,), (2, 3)]))
        data = draw(_VALUES)[: int(np.prod(shape))]
        dims = ",".join(map(str, shape))
        initializers.append(f"float[{dims}] c{index} = {{{', '.join(map(str, data))}}}")
        shapes[f"c{index}"] = shape
    lines = [
        "minus_one = Constant <value_ints = [-1]> ()",
        "axes = Constant <value_ints = [0]> ()",
        "last = Constant <value_int = -1> ()",
    ]
    values = list(shapes)
    for index in range(draw(st.integers(min_value=1, max_value=10))):
        out = f"v{index}"
        kind = draw(st.sampled_from(_UNARY + _BINARY + _SHAPE_OPS))
        a = draw(st.sampled_from(values))
        if kind in _UNARY:
            lines.append(f"{out} = {kind}({a})")
            shapes[out] = shapes[a]
        elif kind in _BINARY:
            b = draw(st.sampled_from(values))
            lines.append(f"{out} = {kind}({a}, {b})")
            shapes[out] = max(shapes[a], shapes[b], key=len)
        elif kind == "reshape-flat":
            lines += [
                f"{out}_flat = Reshape({a}, minus_one)",
                f"{out}_shape = Shape({a})",
                f"{out} = Reshape({out}_flat, {out}_shape)",
            ]
            shapes[out] = shapes[a]
        elif kind == "transpose-twice":
            lines += [f"{out}_t = Transpose({a})", f"{out} = Transpose({out}_t)"]
            shapes[out] = shapes[a]
        elif kind == "unsqueeze-squeeze":
            lines += [f"{out}_u = Unsqueeze({a}, axes)", f"{out} = Squeeze({out}_u, axes)"]
            shapes[out] = shapes[a]
        elif kind == "expand":
            lines += [f"{out}_shape = Shape(x)", f"{out} = Expand({a}, {out}_shape)"]
            shapes[out] = (2, 3)
        else:  # gather-dims: reshape to [-1, last dim], read through Shape and Gather
            lines += [
                f"{out}_shape = Shape({a})",
                f"{out}_last = Gather({out}_shape, last)",
                f"{out}_lastu = Unsqueeze({out}_last, axes)",
                f"{out}_target = Concat <axis = 0> (minus_one, {out}_lastu)",
                f"{out}_2d = Reshape({a}, {out}_target)",
                f"{out} = Reshape({out}_2d, {out}_shape)",
            ]
            shapes[out] = shapes[a]
        values.append(out)
    produced = [v for v in values if v.startswith("v")]
    outputs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3, unique=True))
    signature = ", ".join(f"float[{','.join(map(str, shapes[o]))}] {o}" for o in outputs)
    body = "\n    ".join(lines)
    text = f"g (float[2,3] x) => ({signature}) <{', '.join(initializers)}> {{\n    {body}\n}}"
    return text, outputs


def _is_constant(value: ir.Value | None) -> bool:
    return value is None or ir.convenience.get_const_tensor(value) is not None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.integers(min_value=0, max_value=2**16))
def test_random_graphs(graph, seed: int) -> None:
    text, outputs = graph
    x = np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)
    original = build(text)
    model = build(text)
    before = as_text(model)
    modified, pass_ = fold(model)
    assert modified == (as_text(model) != before), text
    assert_valid(model)
    assert [o.name for o in model.graph.outputs] == outputs
    ref, got = run(original, {"x": x}), run(model, {"x": x})
    assert [(r.shape, r.dtype) for r in ref] == [(g.shape, g.dtype) for g in got]
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=text)
    assert pass_.skipped == [], text
    # everything foldable was folded: each node left reads something computed from x
    for node in model.graph:
        if node.op_type != "Constant":
            assert not all(_is_constant(v) for v in node.inputs), (text, node)
    settled = as_text(model)
    assert fold(model)[0] is False, text
    assert as_text(model) == settled


def test_folded_transpose_is_contiguous_and_cleanup_can_hash_it() -> None:
    # A folded Transpose is a strided numpy view; cleanup's de-duplication hashes raw bytes.
    from onnxforge.passes import PassManager

    model = build(
        """
        g (float[3,2] x) => (float[3,2] y, float[3,2] z)
            <float[2,3] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}> {
            t = Transpose<perm = [1, 0]>(w)
            y = Add(x, t)
            u = Transpose<perm = [1, 0]>(w)
            z = Mul(x, u)
        }
        """
    )
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(3, 2)}
    expected = run(model, inputs)
    result = PassManager("fold-constants,cleanup").run(model)
    for value in result.model.graph.initializers.values():
        assert value.const_value.numpy().flags["C_CONTIGUOUS"], value.name
    assert not [n for n in result.model.graph if n.op_type == "Transpose"]
    assert_bitwise_equal(expected, run(result.model, inputs))
