"""``collapse-relu``, the example custom pass: the STYLE.md rule-5 set, and its use in pipelines."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import InputError
from onnxforge.passes import PassManager, Semantics, format_pass, parse_pipeline
from onnxforge.samples.custom_pass import DEFAULT_MAX_ROUNDS, CollapseReluPass

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def build(body: str, signature: str = "(float[N,4] x) => (float[N,4] y)") -> ir.Model:
    """A model ``g`` with the given signature and node lines."""
    return ir.from_onnx_text(f"{HEADER}g {signature} {{\n{body}\n}}")


def relu_chain(length: int) -> ir.Model:
    """``y = Relu(Relu(...Relu(x)))`` with ``length`` Relus."""
    names = ["x", *[f"r{i}" for i in range(length - 1)], "y"]
    body = "\n".join(f"{out} = Relu({arg})" for arg, out in zip(names, names[1:], strict=False))
    return build(body)


def ops(model: ir.Model) -> list[str]:
    """The op types of the main graph's nodes, in order."""
    return [node.op_type for node in model.graph]


def inputs() -> dict[str, np.ndarray]:
    """Inputs with negative, zero and positive values, and a negative zero."""
    x = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    x[0, :2] = [0.0, -0.0]
    return {"x": x}


def collapse(model: ir.Model, **options) -> bool:
    """Run collapse-relu in place; returns ``modified``."""
    result = CollapseReluPass(**options)(model)
    assert result.model is model
    return result.modified


def assert_same_outputs(before: ir.Model, after: ir.Model) -> None:
    """Bit-for-bit equal outputs through ONNX Runtime (the pass is exact)."""
    ref = Session(before).run(inputs())
    got = Session(after).run(inputs())
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_array_equal(r, g)
    assert compare_outputs(ref, got).max_abs == 0.0


def test_declares_the_contract() -> None:
    assert CollapseReluPass.name == "collapse-relu"
    assert CollapseReluPass.semantics is Semantics.EXACT
    assert CollapseReluPass.summary
    assert CollapseReluPass().max_rounds == DEFAULT_MAX_ROUNDS
    assert [spec.name for spec in CollapseReluPass.options()] == ["max_rounds"]


def test_relu_of_relu_collapses() -> None:
    model = relu_chain(2)
    assert collapse(model) is True
    assert ops(model) == ["Relu"]
    (relu,) = model.graph
    assert relu.inputs[0] is model.graph.inputs[0]
    assert relu.outputs[0] is model.graph.outputs[0]
    assert model.graph.outputs[0].name == "y"
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_same_outputs(relu_chain(2), model)


@pytest.mark.parametrize("length", [3, 4, 7])
def test_chains_collapse_to_one_relu(length: int) -> None:
    model = relu_chain(length)
    assert collapse(model) is True
    assert ops(model) == ["Relu"]
    assert [o.name for o in model.graph.outputs] == ["y"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_same_outputs(relu_chain(length), model)


def test_collapses_between_other_ops() -> None:
    body = "n = Neg(x)\na = Relu(n)\nb = Relu(a)\ny = Exp(b)"
    model = build(body)
    assert collapse(model) is True
    assert ops(model) == ["Neg", "Relu", "Exp"]
    assert_same_outputs(build(body), model)


@pytest.mark.parametrize(
    "body",
    [
        "y = Relu(x)",
        "a = Relu(x)\nb = Neg(a)\ny = Relu(b)",
        "a = Neg(x)\ny = Abs(a)",
    ],
)
def test_no_op(body: str) -> None:
    model = build(body)
    before = ir.to_onnx_text(model)
    assert collapse(model) is False
    assert ir.to_onnx_text(model) == before


@pytest.mark.parametrize("length", [2, 4])
def test_idempotent(length: int) -> None:
    model = relu_chain(length)
    assert collapse(model) is True
    once = ir.to_onnx_text(model)
    assert collapse(model) is False
    assert ir.to_onnx_text(model) == once


def test_does_not_fire_when_the_inner_relu_has_another_consumer() -> None:
    signature = "(float[N,4] x) => (float[N,4] y, float[N,4] z)"
    body = "a = Relu(x)\ny = Relu(a)\nz = Neg(a)"
    model = build(body, signature)
    before = ir.to_onnx_text(model)
    assert collapse(model) is False
    assert ir.to_onnx_text(model) == before
    assert_same_outputs(build(body, signature), model)


def test_does_not_fire_when_the_inner_relu_is_a_graph_output() -> None:
    signature = "(float[N,4] x) => (float[N,4] y, float[N,4] a)"
    body = "a = Relu(x)\ny = Relu(a)"
    model = build(body, signature)
    before = ir.to_onnx_text(model)
    assert collapse(model) is False
    assert ir.to_onnx_text(model) == before
    assert [o.name for o in model.graph.outputs] == ["y", "a"]


def test_shared_inner_relu_still_collapses_the_unshared_part() -> None:
    # r0 feeds two consumers, so only the chain after it can collapse: r1 -> r2 -> y
    signature = "(float[N,4] x) => (float[N,4] y, float[N,4] z)"
    body = "r0 = Relu(x)\nz = Neg(r0)\nr1 = Neg(r0)\nr2 = Relu(r1)\ny = Relu(r2)"
    model = build(body, signature)
    assert collapse(model) is True
    assert sorted(ops(model)) == ["Neg", "Neg", "Relu", "Relu"]
    assert_same_outputs(build(body, signature), model)


def test_does_not_fire_on_integer_tensors() -> None:
    model = build("a = Relu(x)\ny = Relu(a)", "(int32[N,4] x) => (int32[N,4] y)")
    assert collapse(model) is False
    assert ops(model) == ["Relu", "Relu"]


@pytest.mark.parametrize("rounds", [0, -1])
def test_max_rounds_below_one_is_rejected(rounds: int) -> None:
    with pytest.raises(ValueError, match="max_rounds"):
        CollapseReluPass(max_rounds=rounds)
    with pytest.raises(InputError, match="max_rounds"):
        parse_pipeline(f"collapse-relu{{max_rounds={rounds}}}")


def test_usable_from_a_pipeline_string() -> None:
    (pass_,) = parse_pipeline("collapse-relu{max_rounds=2}")
    assert isinstance(pass_, CollapseReluPass)
    assert pass_.max_rounds == 2
    assert format_pass(pass_) == "collapse-relu{max_rounds=2}"
    assert format_pass(CollapseReluPass(max_rounds=DEFAULT_MAX_ROUNDS)) == "collapse-relu"

    model = relu_chain(4)
    result = PassManager("cleanup,collapse-relu{max_rounds=2}").run(model)
    assert [r.text for r in result.records] == ["cleanup", "collapse-relu{max_rounds=2}"]
    assert [r.modified for r in result.records] == [False, True]
    assert ops(result.model) == ["Relu"]


def test_readme_pipeline_verifies_numerically() -> None:
    body = "i = Identity(x)\na = Relu(i)\nb = Relu(a)\ny = Relu(b)"
    model = build(body)
    result = onnxforge.optimize(model, "cleanup,collapse-relu", verify="numeric")
    assert [r.status for r in result.records] == ["ok", "ok"]
    assert [r.modified for r in result.records] == [True, True]
    assert result.records[1].drift["max_abs"] == 0.0
    assert ops(result.model) == ["Relu"]
    assert_same_outputs(build(body), result.model)
