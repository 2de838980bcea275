"""``quantize``: int8 on ONNX Runtime's quantizer, with an accuracy budget (STYLE.md rule 5).

The pass is lossy: its numerics are held to stated budgets, relative L2 error below
``REL_L2_BUDGET`` on the tiny models through ONNX Runtime, and on the digits classifier at most
``ACCURACY_DROP`` of held-out top-1 accuracy. Tiny models are written as ONNX text; the
sample-based tests export a sample and are marked slow.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir
import pytest

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import EXIT_VERIFICATION_FAILED, InputError, PassError
from onnxforge.passes import Explain, PassManager, Semantics, get_pass
from onnxforge.passes.fold_constants import FoldConstantsPass
from onnxforge.passes.pipeline import canonical_pipeline
from onnxforge.passes.quantization import cpu, prepare
from onnxforge.passes.quantization.data import (
    StreamingReader,
    chunks,
    input_infos,
    open_source,
    parse_data,
)
from onnxforge.passes.quantization.search import BudgetNotMet
from onnxforge.passes.quantization.smooth import has_outliers, smooth, smoothing_groups
from onnxforge.passes.quantize import DYNAMIC_OP_TYPES, MIN_REDUCTION, QuantizePass

from .conftest import assert_valid, build, normal, op_counts, run, weights

# Largest relative L2 error of a tiny model's outputs after quantization (int8 keeps ~2 digits).
REL_L2_BUDGET = 0.05
# Largest drop of held-out top-1 accuracy on the digits classifier (half a point).
ACCURACY_DROP = 0.005
ROWS = 16
CONTRIB = '<ir_version: 10, opset_import: ["" : 20, "com.microsoft" : 1]>\n'

VNNI_CPUINFO = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
AVX2_CPUINFO = "processor : 0\nflags : fpu sse2 avx2 fma\n"
ARM_CPUINFO = "processor : 0\nFeatures : fp asimd asimddp\n"


def mlp_text(w2: np.ndarray | None = None, b1: np.ndarray | None = None) -> str:
    """x -> MatMul -> Add -> Relu -> MatMul -> y, 16 -> 32 -> 8."""
    w2 = normal(32, 8, seed=2) if w2 is None else w2
    b1 = normal(32, seed=3) if b1 is None else b1
    return f"""
    g (float[N,16] x) => (float[N,8] y)
        {weights(w1=normal(16, 32, seed=1), b1=b1, w2=w2)}
    {{
        h = MatMul(x, w1)
        hb = Add(h, b1)
        r = Relu(hb)
        y = MatMul(r, w2)
    }}
    """


def named(model: ir.Model, *names: str) -> ir.Model:
    """Give the main graph's nodes these names, in order (ONNX text cannot name nodes)."""
    for node, name in zip(model.graph, names, strict=True):
        node.name = name
    return model


def mlp(w2: np.ndarray | None = None, b1: np.ndarray | None = None) -> ir.Model:
    return named(build(mlp_text(w2, b1)), "up", "bias", "relu", "down")


# A small CNN: Conv + Relu, then a classifier. The Conv's 3x3 kernel over 2x8x8 images (18
# products per output: at least MIN_REDUCTION, so it is worth quantizing).
CNN_WEIGHTS = weights(
    k=normal(4, 2, 3, 3, seed=4),
    kb=normal(4, seed=5),
    fc=normal(10, 256, seed=6),
    fcb=normal(10, seed=7),
)
CNN = f"""
g (float[N,2,8,8] x) => (float[N,10] y) {CNN_WEIGHTS}
{{
    c = Conv <pads: ints = [1, 1, 1, 1]> (x, k, kb)
    r = Relu(c)
    f = Flatten(r)
    y = Gemm <transB: int = 1> (f, fc, fcb)
}}
"""

# The same CNN after `fuse`: Conv + Relu as ONNX Runtime's FusedConv, no value types given.
FUSED_CNN = CNN.replace(
    "c = Conv <pads: ints = [1, 1, 1, 1]> (x, k, kb)\n    r = Relu(c)",
    'r = com.microsoft.FusedConv <pads: ints = [1, 1, 1, 1], activation: string = "Relu"> '
    "(x, k, kb)",
)

# A fused transformer block as `fuse` leaves it: contrib Attention, then a MatMul that reads its
# output. ONNX shape inference cannot type `a`; ONNX Runtime's quantizer then fails on the MatMul.
ATTENTION_WEIGHTS = weights(w=normal(16, 48, seed=8), b=normal(48, seed=9), wo=normal(16, 16))
ATTENTION = f"""
g (float[N,4,16] x) => (float[N,4,16] y) {ATTENTION_WEIGHTS}
{{
    a = com.microsoft.Attention <num_heads: int = 2, qkv_hidden_sizes: ints = [16, 16, 16]>
        (x, w, b)
    y = MatMul(a, wo)
}}
"""


def images(rows: int = ROWS, seed: int = 0, channels: int = 2) -> np.ndarray:
    """Image-like inputs in [0, 1), ``channels`` of 8x8."""
    return np.random.default_rng(seed).random((rows, channels, 8, 8)).astype(np.float32)


def features(rows: int = ROWS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)


def save_batches(folder, make, count: int = 4) -> str:
    """``count`` .npz batches of ``{"x": make(seed)}`` in ``folder``; returns its path."""
    folder.mkdir(exist_ok=True)
    for index in range(count):
        np.savez(folder / f"batch{index:02d}.npz", x=make(seed=index))
    return str(folder)


def quantize(model: ir.Model, **options) -> tuple[ir.Model, bool, QuantizePass]:
    pass_ = QuantizePass(**options)
    result = pass_(model)
    assert result.model is not model  # a functional pass
    return result.model, result.modified, pass_


def rel_l2(ref: ir.Model, got: ir.Model, inputs: dict[str, np.ndarray]) -> float:
    comparison = compare_outputs(run(ref, inputs), run(got, inputs))
    assert comparison.finite
    return comparison.rel_l2


def quantized_op_count(model: ir.Model) -> int:
    return sum(prepare.quantized_ops(model).values())


def weight_producer(model: ir.Model, op_type: str) -> str | None:
    """The op that feeds the (first) ``op_type`` node's weight input."""
    node = next(n for n in model.graph if n.op_type == op_type)
    producer = node.inputs[1].producer()
    return None if producer is None else producer.op_type


# --- the pass contract --------------------------------------------------------------------------


def test_registered_as_lossy_with_keyword_options() -> None:
    cls = get_pass("quantize")
    assert cls is QuantizePass
    assert cls.semantics is Semantics.LOSSY
    options = {spec.name: spec.default for spec in cls.options()}
    assert options["mode"] == "dynamic" and options["per_channel"] is True
    assert options["reduce_range"] == "auto" and options["budget"] is None


def test_pipeline_text_round_trips() -> None:
    text = "quantize{mode=static,exclude=a,b,data=sample:digits-cnn,budget=0.005}"
    assert canonical_pipeline(text) == text
    reordered = "quantize{budget=0.005,data=sample:digits-cnn,exclude=a,b,mode=static}"
    assert canonical_pipeline(reordered) == text
    assert canonical_pipeline("quantize{per_channel=true}") == "quantize"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("quantize{mode=fast}", "not one of dynamic, static"),
        ("quantize{format=qoperator}", "applies to mode=static"),
        ("quantize{calibration=entropy}", "applies to mode=static"),
        ("quantize{activation_type=int8}", "applies to mode=static"),
        ("quantize{mode=static,activation_type=int8,weight_type=uint8}", "no kernels"),
        ("quantize{budget=-0.1}", "budget must be a positive number"),
        ("quantize{budget=0}", "budget must be a positive number"),
        ("quantize{smooth=1.5}", "smooth must be in"),
        ("quantize{max_float=-1}", "max_float"),
        ("quantize{data=sample:}", "needs a sample name"),
        ("quantize{metric=accuracy}", "not one of"),
        ("quantize{budgett=0.1}", "did you mean 'budget'"),
    ],
)
def test_bad_options_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        canonical_pipeline(text)
    assert message in f"{caught.value} {caught.value.hint}"


def test_unknown_op_type_and_exclude_name_the_choices() -> None:
    with pytest.raises(InputError, match="no entry for Softmax") as caught:
        quantize(mlp(), op_types=["Softmax"])
    assert "MatMul" in caught.value.hint
    with pytest.raises(InputError, match="exclude names no node") as caught:
        quantize(mlp(), exclude=["nope"])
    assert "up, down" in caught.value.hint


# --- dynamic mode -------------------------------------------------------------------------------


def test_dynamic_quantizes_matmuls_and_stays_within_budget() -> None:
    model = mlp()
    got, modified, pass_ = quantize(model)
    assert modified is True
    ops = op_counts(got)
    assert ops["MatMulInteger"] == 2 and ops["MatMul"] == 0
    assert ops["DynamicQuantizeLinear"] >= 1
    assert_valid(got)
    assert rel_l2(model, got, {"x": features()}) < REL_L2_BUDGET
    assert pass_.report.quantized == {"MatMul": 2}
    assert [v.name for v in got.graph.outputs] == ["y"]


def test_excluded_nodes_stay_float() -> None:
    model = mlp()
    got, modified, pass_ = quantize(model, exclude=["down"])
    assert modified is True
    down = next(n for n in got.graph if n.name == "down")
    assert down.op_type == "MatMul"
    assert down.inputs[1].const_value.dtype == ir.DataType.FLOAT
    assert "up_quant" in {n.name for n in got.graph}
    assert [(f.rule, f.nodes) for f in pass_.report.float_nodes] == [("excluded", ("down",))]


def test_exclude_by_op_type_leaves_nothing_to_quantize() -> None:
    model = mlp()
    got, modified, pass_ = quantize(model, exclude=["MatMul"])
    assert modified is False
    assert ir.to_onnx_text(got) == ir.to_onnx_text(model)
    assert "nothing to quantize" in pass_.report.note


# An MLP as `fuse` leaves it: Gemm + Relu as FusedGemm, then a plain Gemm.
FUSED_GEMM_WEIGHTS = weights(
    w1=normal(32, 16, seed=1),
    b1=normal(32, seed=3),
    w2=normal(8, 32, seed=2),
    b2=normal(8, seed=4),
)
FUSED_GEMMS = f"""
g (float[N,16] x) => (float[N,8] y) {FUSED_GEMM_WEIGHTS}
{{
    h = com.microsoft.FusedGemm <transB: int = 1, activation: string = "Relu"> (x, w1, b1)
    y = Gemm <transB: int = 1> (h, w2, b2)
}}
"""


def test_dynamic_quantizes_gemms_as_the_matmuls_onnxruntime_makes_of_them() -> None:
    model = named(build(CONTRIB + FUSED_GEMMS), "hidden", "head")
    got, modified, pass_ = quantize(model)
    assert modified is True
    assert op_counts(got)["MatMulInteger"] == 2 and op_counts(got)["FusedGemm"] == 0
    assert pass_.report.quantized == {"Gemm": 2}
    assert rel_l2(model, got, {"x": features()}) < REL_L2_BUDGET
    kept, _, pass_ = quantize(
        named(build(CONTRIB + FUSED_GEMMS), "hidden", "head"), exclude=["head"]
    )
    assert op_counts(kept)["MatMulInteger"] == 1
    assert [f.nodes for f in pass_.report.float_nodes] == [("head",)]


def test_no_op_on_a_model_without_weights() -> None:
    model = build("g (float[N,4] x) => (float[N,4] y) { r = Relu(x)\n y = Add(r, x) }")
    got, modified, pass_ = quantize(model)
    assert modified is False
    assert pass_.report.status == "no-op"
    assert ir.to_onnx_text(got) == ir.to_onnx_text(model)


def test_idempotent_never_quantizes_twice() -> None:
    once, modified, _ = quantize(mlp())
    assert modified is True
    twice, modified_again, pass_ = quantize(once.clone())
    assert modified_again is False
    assert "quantized already" in pass_.report.note
    assert ir.to_onnx_text(twice) == ir.to_onnx_text(once)


def test_graph_output_and_multiple_consumers_keep_their_values() -> None:
    # h is a graph output and read by two MatMuls: names and values survive quantization.
    model = build(
        f"""
        g (float[N,16] x) => (float[N,32] h, float[N,8] y, float[N,8] z)
            {weights(w1=normal(16, 32, seed=1), w2=normal(32, 8, seed=2), w3=normal(32, 8))}
        {{
            h = MatMul(x, w1)
            y = MatMul(h, w2)
            z = MatMul(h, w3)
        }}
        """
    )
    got, modified, _ = quantize(model)
    assert modified is True
    assert [v.name for v in got.graph.outputs] == ["h", "y", "z"]
    assert op_counts(got)["MatMulInteger"] == 3
    assert rel_l2(model, got, {"x": features()}) < REL_L2_BUDGET


def test_unfolded_weights_are_folded_first() -> None:
    # An exported Linear: the weight reaches MatMul through a Transpose of a constant.
    model = build(
        f"""
        g (float[N,16] x) => (float[N,8] y) {weights(w=normal(8, 16, seed=1))} {{
            wt = Transpose <perm: ints = [1, 0]> (w)
            y = MatMul(x, wt)
        }}
        """
    )
    got, modified, _ = quantize(model)
    assert modified is True
    assert op_counts(got)["MatMulInteger"] == 1
    assert rel_l2(model, got, {"x": features()}) < REL_L2_BUDGET


def test_reduce_range_false_uses_all_eight_bits_true_uses_seven() -> None:
    def weight_range(model: ir.Model) -> int:
        node = next(n for n in model.graph if n.op_type == "MatMulInteger")
        return int(np.abs(node.inputs[1].const_value.numpy().astype(np.int32)).max())

    full, _, _ = quantize(mlp(), reduce_range="false")
    reduced, _, _ = quantize(mlp(), reduce_range="true")
    assert weight_range(full) == 127
    assert weight_range(reduced) <= 64


# --- the CPU defaults ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpuinfo", "machine", "expected"),
    [
        (VNNI_CPUINFO, "x86_64", False),  # VNNI accumulates in int32: keep 8 bits
        (AVX2_CPUINFO, "x86_64", True),  # vpmaddubsw saturates int16: 7-bit weights
        (ARM_CPUINFO, "aarch64", False),  # Arm dot products accumulate in int32
        ("", "x86_64", True),  # nothing known: the safe choice
    ],
)
def test_reduce_range_only_where_the_cpu_lacks_vnni(cpuinfo, machine, expected) -> None:
    assert cpu.needs_reduce_range(cpuinfo, machine) is expected
    assert cpu.cpu_has_vnni(cpuinfo) is ("avx512_vnni" in cpuinfo)


def test_reduce_range_auto_follows_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(cpu, "needs_reduce_range", lambda: True)
    assert QuantizePass()._settings().reduce_range is True
    monkeypatch.setattr(cpu, "needs_reduce_range", lambda: False)
    assert QuantizePass()._settings().reduce_range is False
    assert QuantizePass(reduce_range="true")._settings().reduce_range is True
    assert QuantizePass()._settings().op_types == DYNAMIC_OP_TYPES


# --- static mode --------------------------------------------------------------------------------


def test_static_inserts_qdq_on_weights_and_activations(tmp_path) -> None:
    model = build(CNN)
    data = save_batches(tmp_path / "data", images)
    got, modified, pass_ = quantize(model, mode="static", data=data)
    assert modified is True
    assert weight_producer(got, "Conv") == "DequantizeLinear"
    assert weight_producer(got, "Gemm") == "DequantizeLinear"
    conv = next(n for n in got.graph if n.op_type == "Conv")
    activation = conv.inputs[0].producer()
    assert activation.op_type == "DequantizeLinear"
    assert activation.inputs[0].producer().op_type == "QuantizeLinear"
    assert op_counts(got)["Relu"] == 0  # folded into the quantized range (uint8, zero point 0)
    assert pass_.report.calibration_batches == 4
    assert rel_l2(model, got, {"x": images(seed=9)}) < REL_L2_BUDGET


def test_static_without_data_calibrates_on_random_inputs_and_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxforge.passes.quantize"):
        got, modified, pass_ = quantize(build(CNN), mode="static")
    assert modified is True
    assert "seeded random inputs" in caplog.text
    assert "random" in pass_.report.data


def test_a_conv_with_too_few_products_per_output_stays_float(tmp_path) -> None:
    # One input channel, 3x3: 9 products per output, under MIN_REDUCTION.
    one_channel = weights(
        k=normal(4, 1, 3, 3, seed=4),
        kb=normal(4, seed=5),
        fc=normal(10, 256, seed=6),
        fcb=normal(10, seed=7),
    )
    model = build(
        CNN.replace("float[N,2,8,8] x", "float[N,1,8,8] x").replace(CNN_WEIGHTS, one_channel)
    )
    data = save_batches(tmp_path / "d", lambda seed: images(seed=seed, channels=1))
    got, modified, pass_ = quantize(model, mode="static", data=data)
    assert modified is True
    assert weight_producer(got, "Conv") is None  # its weight stays a float initializer
    assert weight_producer(got, "Gemm") == "DequantizeLinear"
    (kept,) = pass_.report.float_nodes
    assert kept.rule == "not quantized" and "9 products per output" in kept.reason
    assert MIN_REDUCTION > 9


def test_folding_never_removes_qdq(tmp_path) -> None:
    got, _, _ = quantize(build(CNN), mode="static", data=save_batches(tmp_path / "d", images))
    before = collections.Counter({op: n for op, n in prepare.quantized_ops(got).items()})
    folded = got.clone()
    FoldConstantsPass()(folded)
    assert prepare.quantized_ops(folded) == dict(before)
    assert before["DequantizeLinear"] >= 3 and before["QuantizeLinear"] >= 2


def test_qoperator_format_makes_qlinear_ops(tmp_path) -> None:
    data = save_batches(tmp_path / "d", images)
    got, modified, _ = quantize(build(CNN), mode="static", format="qoperator", data=data)
    assert modified is True
    assert op_counts(got)["QLinearConv"] == 1


# --- after fuse ---------------------------------------------------------------------------------


def test_after_fuse_contrib_attention_becomes_qattention() -> None:
    model = build(CONTRIB + ATTENTION)
    got, modified, pass_ = quantize(model)
    assert modified is True
    ops = op_counts(got)
    assert ops["QAttention"] == 1 and ops["Attention"] == 0  # qkv_hidden_sizes dropped
    assert ops["MatMulInteger"] == 1  # the MatMul after it: typed from ORT's schema
    assert pass_.report.quantized == {"Attention": 1, "MatMul": 1}
    x = np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32)
    assert rel_l2(model, got, {"x": x}) < REL_L2_BUDGET


# A fused feed-forward block: MatMul then contrib BiasGelu, then the down projection.
BIAS_GELU = f"""
g (float[N,16] x) => (float[N,8] y)
    {weights(w1=normal(16, 32, seed=1), b1=normal(32, seed=3), w2=normal(32, 8, seed=2))}
{{
    h = MatMul(x, w1)
    g = com.microsoft.BiasGelu(h, b1)
    y = MatMul(g, w2)
}}
"""


def test_bias_gelu_after_a_quantized_matmul_is_split_for_the_bias_fusion() -> None:
    model = named(build(CONTRIB + BIAS_GELU), "up", "gelu", "down")
    got, modified, pass_ = quantize(model)
    assert modified is True
    ops = op_counts(got)
    assert ops["BiasGelu"] == 0 and ops["Gelu"] == 1 and ops["MatMulInteger"] == 2
    assert "gelu" in pass_.report.unfused
    assert rel_l2(model, got, {"x": features()}) < REL_L2_BUDGET
    kept, _, pass_ = quantize(
        named(build(CONTRIB + BIAS_GELU), "up", "gelu", "down"), exclude=["up"]
    )
    assert op_counts(kept)["BiasGelu"] == 1  # its MatMul stays float: nothing to gain
    assert pass_.report.unfused == []


# A fused post-norm residual as `fuse` leaves it: SkipLayerNormalization with its bias, whose
# fourth output (the residual sum) is read too; then a MatMul.
SKIP_WEIGHTS = weights(
    gamma=normal(16, seed=1),
    beta=normal(16, seed=2),
    bias=normal(16, seed=3),
    w=normal(16, 8, seed=4),
)
SKIP_LAYER_NORM = f"""
g (float[N,4,16] x, float[N,4,16] skip) => (float[N,4,8] y, float[N,4,16] total) {SKIP_WEIGHTS}
{{
    n, mean, inv, total = com.microsoft.SkipLayerNormalization <epsilon: float = 1e-5>
        (x, skip, gamma, beta, bias)
    y = MatMul(n, w)
}}
"""


def test_skip_layer_norm_becomes_sum_and_layer_norm_in_dynamic_mode() -> None:
    model = build(CONTRIB + SKIP_LAYER_NORM)
    got, modified, pass_ = quantize(model)
    assert modified is True
    ops = op_counts(got)
    assert ops["SkipLayerNormalization"] == 0
    assert ops["Sum"] == 1 and ops["LayerNormalization"] == 1 and ops["MatMulInteger"] == 1
    rng = np.random.default_rng(0)
    inputs = {k: rng.standard_normal((3, 4, 16)).astype(np.float32) for k in ("x", "skip")}
    ref, out = run(model, inputs), run(got, inputs)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-6, atol=1e-6)  # the residual sum
    assert compare_outputs(ref[:1], out[:1]).rel_l2 < REL_L2_BUDGET


# A CNN head: conv features N x 4 x 3 x 3 flattened into a classifier, by Flatten into a Gemm
# (weight K x CHW) or by Reshape into a MatMul (weight CHW x K).
CNN_HEAD_WEIGHTS = weights(
    w=normal(4, 2, 3, 3, seed=1), g=normal(5, 36, seed=2), m=normal(36, 5, seed=3)
)
CNN_HEAD = {
    "Gemm": f"""
    g (float[N,2,3,3] x) => (float[N,5] y) {CNN_HEAD_WEIGHTS}
    {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        f = Flatten <axis = 1> (c)
        y = Gemm <transB = 1> (f, g)
    }}
    """,
    "MatMul": f"""
    g (float[N,2,3,3] x) => (float[N,5] y) {CNN_HEAD_WEIGHTS}
    {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        shape = Constant <value_ints = [-1, 36]> ()
        f = Reshape (c, shape)
        y = MatMul (f, m)
    }}
    """,
}


@pytest.mark.parametrize("reader", CNN_HEAD)
def test_a_cnn_head_flattens_channels_last_with_its_weight_permuted(reader: str) -> None:
    model = build(CNN_HEAD[reader])
    prepare.name_nodes(model)
    prepare.annotate_types(model)  # the rewrite reads the feature map's C, H, W
    inputs = {"x": normal(3, 2, 3, 3, seed=9)}
    (reference,) = run(model, inputs)
    classifier = next(n for n in model.graph if n.op_type == reader)
    assert prepare.flatten_channels_last(model) == [classifier.name]
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    assert list(transpose.attributes.get_ints("perm")) == [0, 2, 3, 1]
    (got,) = run(model, inputs)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)  # the same sums
    assert prepare.flatten_channels_last(model) == []  # the flatten now reads N x H x W x C


# The same head on 1 x 1 features: flattening channels-last or channels-first is the same.
ONE_BY_ONE_WEIGHTS = weights(w=normal(4, 2, 3, 3, seed=1), g=normal(5, 4, seed=2))
ONE_BY_ONE_HEAD = f"""
g (float[N,2,3,3] x) => (float[N,5] y) {ONE_BY_ONE_WEIGHTS}
{{
    c = Conv (x, w)
    f = Flatten <axis = 1> (c)
    y = Gemm <transB = 1> (f, g)
}}
"""


@pytest.mark.parametrize("change", ["1 x 1 features", "flatten read twice", "weight an input"])
def test_a_cnn_head_is_left_alone_unless_the_rewrite_is_sound_and_useful(change: str) -> None:
    if change == "1 x 1 features":
        model = build(ONE_BY_ONE_HEAD)
    elif change == "flatten read twice":  # the flattened order is observable: a graph output
        model = build(
            CNN_HEAD["Gemm"].replace("=> (float[N,5] y)", "=> (float[N,5] y, float[N,36] f)")
        )
    else:  # a weight that can be overridden at run time cannot be permuted ahead of time
        model = build(CNN_HEAD["Gemm"])
        model.graph.inputs.append(model.graph.initializers["g"])
    prepare.annotate_types(model)
    before = [n.op_type for n in model.graph]
    assert prepare.flatten_channels_last(model) == []
    assert [n.op_type for n in model.graph] == before


@pytest.mark.slow
def test_static_digits_cnn_flattens_channels_last() -> None:
    model = onnxforge.export("digits-cnn")
    pass_ = QuantizePass(mode="static", data="sample:digits-cnn")
    got = pass_(model).model
    assert len(pass_.report.channels_last) == 1
    feeds, labels = onnxforge.samples.get_sample("digits-cnn").evaluation_data()
    (reference,) = run(model, feeds)
    (out,) = run(got, feeds)
    drop = np.mean(reference.argmax(1) == labels) - np.mean(out.argmax(1) == labels)
    assert drop <= ACCURACY_DROP


def test_contrib_outputs_get_types_from_onnxruntime_schemas() -> None:
    model = build(CONTRIB + ATTENTION)
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert attention.outputs[0].dtype is None
    assert prepare.annotate_types(model) >= 1
    assert attention.outputs[0].dtype == ir.DataType.FLOAT
    assert all(v.dtype is not None for n in model.graph for v in n.outputs)


def test_after_fuse_fused_conv_is_split_and_quantized(tmp_path) -> None:
    model = build(CONTRIB + FUSED_CNN)
    data = save_batches(tmp_path / "d", images)
    got, modified, pass_ = quantize(model, mode="static", data=data)
    assert modified is True
    assert op_counts(got)["FusedConv"] == 0
    assert weight_producer(got, "Conv") == "DequantizeLinear"
    assert len(pass_.report.unfused) == 1
    assert rel_l2(model, got, {"x": images(seed=9)}) < REL_L2_BUDGET


# --- data sources -------------------------------------------------------------------------------


def test_data_spellings() -> None:
    assert parse_data("") == ("none", "")
    assert parse_data("random") == ("random", "")
    assert parse_data("sample:mlp") == ("sample", "mlp")
    assert parse_data("calib/") == ("path", "calib/")


def test_data_from_a_folder_and_a_file(tmp_path) -> None:
    model = mlp()
    folder = save_batches(tmp_path / "d", features, count=3)
    source = open_source(folder, input_infos(model))
    assert [b["x"].shape for b in source.calibration()] == [(ROWS, 16)] * 3
    single = open_source(f"{folder}/batch01.npz", input_infos(model))
    (batch,) = list(single.calibration())
    np.testing.assert_array_equal(batch["x"], features(seed=1))


def test_bad_data_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        quantize(build(CNN), mode="static", data=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .npz files"):
        quantize(build(CNN), mode="static", data=str(tmp_path / "empty"))
    np.savez(tmp_path / "wrong.npz", images=images())
    with pytest.raises(InputError, match="lacks input"):
        quantize(build(CNN), mode="static", data=str(tmp_path / "wrong.npz"))


def test_evaluation_data_of_the_wrong_dtype_is_a_clear_error(tmp_path) -> None:
    np.savez(tmp_path / "doubles.npz", x=features().astype(np.float64))
    with pytest.raises(InputError, match="evaluation data does not fit the model"):
        quantize(mlp(), data=str(tmp_path / "doubles.npz"), budget=0.05)


def test_calibration_is_streamed() -> None:
    produced: list[int] = []

    def batches():
        for index in range(100):
            produced.append(index)
            yield {"x": np.full((1, 1), index, np.float32)}

    first = next(chunks(batches(), 8))
    assert len(first) == 8 and len(produced) == 8  # nothing read past the chunk
    reader = StreamingReader(batches())
    assert reader.get_next()["x"][0, 0] == 0 and reader.batches_read == 1
    assert reader.get_next()["x"][0, 0] == 1 and reader.batches_read == 2


# --- accuracy-aware mode ------------------------------------------------------------------------


def outlier_mlp() -> ir.Model:
    """The MLP whose second weight has one huge value: per-tensor int8 wipes out the rest.

    The huge value multiplies a hidden unit that Relu keeps at zero, so the float model's
    outputs come from the ordinary weights, which a per-tensor scale of 500/127 rounds away.
    """
    w2, b1 = normal(32, 8, seed=2), normal(32, seed=3)
    w2[0, 0], b1[0] = 500.0, -1000.0
    return mlp(w2, b1)


def test_budget_keeps_the_sensitive_node_float_and_reports_its_cost(tmp_path) -> None:
    model = outlier_mlp()
    data = save_batches(tmp_path / "d", features)
    options = {"per_channel": False, "data": data, "metric": "rel_l2"}
    everything, _, plain = quantize(model, **options)
    assert plain.report.loss > 0.05  # the outlier's weight ruins per-tensor quantization
    got, modified, pass_ = quantize(model, budget=0.05, **options)
    assert modified is True
    report = pass_.report
    assert report.loss <= 0.05 < report.loss_all_quantized
    (kept,) = [f for f in report.float_nodes if f.rule == "kept float"]
    assert kept.nodes == ("down",) and kept.cost > 0
    assert report.sensitivity["down"] > report.sensitivity["up"]
    down = next(n for n in got.graph if n.name == "down")
    assert down.op_type == "MatMul"  # float
    assert rel_l2(model, got, {"x": features(seed=7)}) < rel_l2(
        model, everything, {"x": features(seed=7)}
    )


def test_only_one_sensitivity_ranks_the_same_node(tmp_path) -> None:
    data = save_batches(tmp_path / "d", features)
    _, _, pass_ = quantize(
        outlier_mlp(),
        per_channel=False,
        data=data,
        metric="rel_l2",
        budget=0.05,
        sensitivity="only-one",
    )
    assert [f.nodes for f in pass_.report.float_nodes] == [("down",)]


def test_budget_that_cannot_be_met_fails_through_the_manager(tmp_path) -> None:
    data = save_batches(tmp_path / "d", features)
    text = f"quantize{{per_channel=false,data={data},metric=rel_l2,budget=0.05,max_float=0}}"
    with pytest.raises(PassError) as caught:
        PassManager(text).run(outlier_mlp())
    assert caught.value.exit_code == EXIT_VERIFICATION_FAILED
    assert isinstance(caught.value.__cause__, BudgetNotMet)
    assert "over the budget 0.05" in str(caught.value)


def test_explain_lists_float_nodes_and_call_reuses_the_work(tmp_path, monkeypatch) -> None:
    data = save_batches(tmp_path / "d", features)
    text = f"quantize{{per_channel=false,data={data},metric=rel_l2,budget=0.05}}"
    explainer = Explain("quantize")
    plans = []
    original = QuantizePass._plan
    monkeypatch.setattr(
        QuantizePass, "_plan", lambda self, model: plans.append(1) or original(self, model)
    )
    result = PassManager(text, instruments=[explainer]).run(outlier_mlp())
    assert [(i, m.rule, m.nodes) for i, m in explainer.near_misses] == [
        (0, "kept float", ("down",))
    ]
    assert "costs" in explainer.near_misses[0][1].reason
    assert len(plans) == 1  # explain did the work, the pass reused it
    assert result.records[0].modified is True


# --- SmoothQuant --------------------------------------------------------------------------------


def test_activations_without_outliers_are_not_smoothed(tmp_path) -> None:
    data = save_batches(tmp_path / "d", features)  # standard normal: every channel alike
    got, modified, pass_ = quantize(mlp(), data=data, smooth=0.5)
    assert modified is True
    assert pass_.report.smoothed == []
    assert op_counts(got)["Mul"] == op_counts(quantize(mlp())[0])["Mul"]


def test_smoothing_keeps_the_float_model_and_helps_outlier_activations(tmp_path) -> None:
    # Channel 0 of the activations is 100x the rest: per-tensor uint8 loses the small ones.
    def outlier_features(rows: int = ROWS, seed: int = 0) -> np.ndarray:
        x = features(rows, seed)
        x[:, 0] *= 100.0
        return x

    model = named(
        build(
            f"""
            g (float[N,16] x) => (float[N,8] y) {weights(w=normal(16, 8, seed=1))} {{
                y = MatMul(x, w)
            }}
            """
        ),
        "mm",
    )
    check = {"x": outlier_features(seed=11)}
    groups = smoothing_groups(model.clone(), op_types=["MatMul"], exclude=())
    assert [str(g.activation.name) for g in groups] == ["x"]
    smoothed = model.clone()
    ranges = {"x": np.abs(np.concatenate([outlier_features(seed=s) for s in range(4)])).max(0)}
    groups = smoothing_groups(smoothed, op_types=["MatMul"], exclude=())
    assert smooth(smoothed, groups, ranges, alpha=0.5) == ["x"]
    assert rel_l2(model, smoothed, check) < 1e-5  # exact up to rounding

    assert has_outliers(ranges["x"]) and not has_outliers(np.ones(16))
    data = save_batches(tmp_path / "d", outlier_features)
    plain, _, _ = quantize(model, data=data)
    helped, _, pass_ = quantize(model, data=data, smooth=0.5)
    assert pass_.report.smoothed == ["x"]
    assert rel_l2(model, helped, check) < rel_l2(model, plain, check) / 2


# --- the samples (exported: slow) ---------------------------------------------------------------


@pytest.mark.slow
def test_digits_cnn_static_after_fuse_holds_the_accuracy_budget() -> None:
    from onnxforge.samples import get_sample

    exported = onnxforge.export("digits-cnn")
    result = onnxforge.optimize(
        exported.clone(),
        "fold-constants,cleanup,fuse,quantize{mode=static,data=sample:digits-cnn,budget=0.005}",
        verify="structure",
    )
    assert result.records[-1].modified is True
    assert op_counts(result.model)["QuantizeLinear"] >= 3
    x, labels = get_sample("digits-cnn").evaluation_data()
    float_accuracy = np.mean(Session(exported).run(x)[0].argmax(1) == labels)
    int8_accuracy = np.mean(Session(result.model).run(x)[0].argmax(1) == labels)
    assert float_accuracy - int8_accuracy <= ACCURACY_DROP


@pytest.fixture(scope="module")
def transformer_export() -> ir.Model:
    """The transformer sample, exported once for this module (clone it)."""
    return onnxforge.export("transformer")


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline",
    [
        "fold-constants,cleanup,fuse,quantize{data=sample:transformer}",
        "fold-constants,cleanup,quantize{data=sample:transformer},fuse",
        "quantize{data=sample:transformer},fold-constants,cleanup,fuse",
        "fold-constants,cleanup,fuse,quantize{mode=static,data=sample:transformer}",
    ],
)
def test_transformer_orderings_run_within_budget(transformer_export, pipeline: str) -> None:
    from onnxforge.samples import get_sample

    exported = transformer_export
    result = onnxforge.optimize(exported.clone(), pipeline, verify="structure")
    quantize_record = next(r for r in result.records if r.name == "quantize")
    assert quantize_record.modified is True
    x, _ = get_sample("transformer").evaluation_data()
    comparison = compare_outputs(Session(exported).run(x), Session(result.model).run(x))
    assert comparison.finite and comparison.rel_l2 < REL_L2_BUDGET
    if pipeline.startswith("fold-constants,cleanup,fuse,quantize{data"):
        assert op_counts(result.model)["QAttention"] == 2
