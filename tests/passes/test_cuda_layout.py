"""cuda-layout: space-to-depth stems, ReLU after max-pool, spatial means as MatMul."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.backend import compare_outputs
from onnxforge.passes import Semantics, get_pass
from onnxforge.passes.cuda_layout import CudaLayoutPass, space_to_depth_weight
from onnxforge.passes.fp16 import Float16Pass
from onnxforge.presets import CUDA_PIPELINE

from .conftest import as_text, assert_valid, build, inputs_for, normal, op_counts, run, weights

FLOAT16 = ir.DataType.FLOAT16
# float16 convolutions against their float32 originals (relative L2), as the fp16 tests allow
FLOAT16_BUDGET = 1e-2
# the rewritten float16 graph against the float16 graph it came from: the same products in
# float16, summed in another order
REASSOCIATION_BUDGET = 2e-3


def layout(model: ir.Model, **options) -> bool:
    return CudaLayoutPass(**options)(model).modified


def stem_model(
    *,
    batch: str = "N",
    channels: int = 3,
    size: int = 16,
    kernel: int = 7,
    stride: int = 2,
    pads: tuple[int, ...] = (3, 3, 3, 3),
    group: int = 1,
    float16: bool = True,
) -> ir.Model:
    """x -> Conv -> Relu -> MaxPool -> ReduceMean(H, W): a CNN stem and head, in float16."""
    w = normal(8, channels // group, kernel, kernel)
    model = build(
        f"""
        <ir_version: 10, opset_import: ["" : 20]>
        g (float[{batch},{channels},{size},{size}] x) => (float[{batch},8,1,1] y)
          {weights(w=w, b=normal(8, seed=1), axes=np.array([2, 3], np.int64))} {{
            c = Conv<pads: ints = {list(pads)}, strides: ints = [{stride}, {stride}],
                     group: int = {group}>(x, w, b)
            r = Relu(c)
            p = MaxPool<kernel_shape: ints = [3, 3], strides: ints = [2, 2],
                        pads: ints = [1, 1, 1, 1]>(r)
            y = ReduceMean(p, axes)
        }}
        """
    )
    if float16:
        assert Float16Pass(target="cuda")(model).modified
    return model


def _conv(model: ir.Model) -> ir.Node:
    (conv,) = [n for n in model.graph if n.op_type == "Conv"]
    return conv


def test_semantics_name_registration_and_preset() -> None:
    assert get_pass("cuda-layout") is CudaLayoutPass
    assert CudaLayoutPass.semantics is Semantics.REASSOCIATING
    assert CUDA_PIPELINE.split(",")[-2:] == ["fp16{target=cuda}", "cuda-layout"]


@pytest.mark.parametrize(("size", "kernel", "pad"), [(7, 7, 3), (3, 3, 1), (5, 5, 2)])
def test_space_to_depth_weight_computes_the_same_convolution(size, kernel, pad) -> None:
    x = normal(2, 3, 12, 12)
    w = normal(4, 3, kernel, kernel, seed=2)
    new_w, new_pads = space_to_depth_weight(w, pad)
    assert new_w.shape[:2] == (4, 12)
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    want = np.zeros((2, 4, 6, 6), np.float64)
    for i in range(6):
        for j in range(6):
            patch = padded[:, :, 2 * i : 2 * i + kernel, 2 * j : 2 * j + kernel]
            want[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    blocks = x.reshape(2, 3, 6, 2, 6, 2).transpose(0, 3, 5, 1, 2, 4).reshape(2, 12, 6, 6)
    top, left, bottom, right = new_pads[0], new_pads[1], new_pads[2], new_pads[3]
    blocks = np.pad(blocks, ((0, 0), (0, 0), (top, bottom), (left, right)))
    taps = new_w.shape[2]
    got = np.zeros_like(want)
    for i in range(6):
        for j in range(6):
            patch = blocks[:, :, i : i + taps, j : j + taps]
            got[:, :, i, j] = np.einsum("nchw,ochw->no", patch, new_w)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_stem_the_pool_and_the_mean_are_rewritten() -> None:
    model = stem_model()
    before = run(model, inputs := inputs_for(model))
    original = run(stem_model(float16=False), inputs)
    assert layout(model) is True
    assert_valid(model)
    ops = op_counts(model)
    assert ops["ReduceMean"] == 0 and ops["MatMul"] == 1
    assert ops["Expand"] == 1 and ops["Shape"] == 1  # zero channels for a symbolic batch
    conv = _conv(model)
    w = conv.inputs[1].const_value.numpy()
    assert w.dtype == np.float16 and w.shape == (8, 16, 4, 4)  # 4 x 3 channels + 4 zeros
    assert not w[:, 12:].any()
    assert "strides" not in conv.attributes
    assert list(conv.attributes["pads"].as_ints()) == [2, 2, 1, 1]
    stem_input = conv.inputs[0].producer()
    assert stem_input.op_type == "Transpose"
    assert list(stem_input.attributes["perm"].as_ints()) == [0, 3, 1, 2]
    pool = next(n for n in model.graph if n.op_type == "MaxPool")
    (use,) = pool.outputs[0].uses()
    assert use.node.op_type == "Relu" and use.node.outputs[0].name == "p"
    assert model.graph.outputs[0].name == "y"
    after = run(model, inputs)
    assert after[0].shape == before[0].shape
    assert compare_outputs(before, after).rel_l2 < REASSOCIATION_BUDGET
    assert compare_outputs(original, after).rel_l2 < FLOAT16_BUDGET


def test_a_known_batch_gets_constant_zeros_and_no_shape_arithmetic() -> None:
    model = stem_model(batch="2")
    inputs = inputs_for(model)
    inputs["x"] = inputs["x"][:2]
    before = run(model, inputs)
    assert layout(model) is True
    assert op_counts(model)["Shape"] == 0 and op_counts(model)["Expand"] == 1
    assert compare_outputs(before, run(model, inputs)).rel_l2 < REASSOCIATION_BUDGET


def test_four_channels_need_no_zeros() -> None:
    model = stem_model(channels=4)
    inputs = inputs_for(model)
    before = run(model, inputs)
    assert layout(model, relu_after_pool=False, mean_as_matmul=False) is True
    assert op_counts(model)["Expand"] == 0 and op_counts(model)["Concat"] == 0
    assert _conv(model).inputs[1].const_value.shape[1] == 16
    assert compare_outputs(before, run(model, inputs)).rel_l2 < REASSOCIATION_BUDGET


@pytest.mark.parametrize(
    "settings",
    [
        {"stride": 1},  # not a stride-2 stem
        {"channels": 8},  # enough channels for cuDNN's fast kernels
        {"float16": False},  # float32 convolutions are not what was measured
        {"group": 3},
        {"pads": (3, 3, 2, 2)},  # asymmetric
        {"pads": (0, 0, 0, 0)},  # output is not H/2 x W/2
        {"size": 15},  # odd: no 2 x 2 blocks
    ],
)
def test_convolutions_that_are_not_such_stems_stay(settings) -> None:
    model = stem_model(**settings)
    before = as_text(model)
    assert layout(model, relu_after_pool=False, mean_as_matmul=False) is False
    assert as_text(model) == before


def test_second_run_changes_nothing() -> None:
    model = stem_model()
    assert layout(model) is True
    once = as_text(model)
    assert layout(model) is False
    assert as_text(model) == once


def test_no_op_without_any_of_the_patterns() -> None:
    model = build(
        """
        g (float[N,4] x) => (float[N,4] y) {
            y = Relu(x)
        }
        """
    )
    assert layout(model) is False


def _pool_model(extra: str = "", outputs: str = "float[N,2,3,3] y", pool_attrs: str = "") -> str:
    attrs = "kernel_shape: ints = [3, 3], strides: ints = [2, 2], pads: ints = [1, 1, 1, 1]"
    return f"""
        g (float[N,2,6,6] x) => ({outputs}) {{
            r = Relu(x)
            y = MaxPool<{attrs}{pool_attrs}>(r)
            {extra}
        }}
        """


def test_relu_moves_after_the_pool_and_keeps_the_output_name() -> None:
    model = build(_pool_model())
    inputs = inputs_for(model)
    before = run(model, inputs)
    assert layout(model) is True
    assert [n.op_type for n in model.graph] == ["MaxPool", "Relu"]
    assert model.graph.outputs[0].name == "y"
    assert model.graph.outputs[0].producer().op_type == "Relu"
    np.testing.assert_array_equal(run(model, inputs)[0], before[0])  # max and ReLU commute


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (
            _pool_model("z = Neg(r)", "float[N,2,3,3] y, float[N,2,6,6] z"),
            "ReLU has another reader",
        ),
        (_pool_model(pool_attrs=", ceil_mode: int = 1"), "ceil mode"),
    ],
)
def test_relu_stays_where_moving_it_is_not_the_same(text, why) -> None:
    model = build(text)
    assert layout(model) is False, why


def test_relu_stays_when_the_pool_indices_are_read() -> None:
    model = build(
        """
        g (float[N,2,6,6] x) => (float[N,2,3,3] y, int64[N,2,3,3] i) {
            r = Relu(x)
            y, i = MaxPool<kernel_shape: ints = [2, 2], strides: ints = [2, 2]>(r)
        }
        """
    )
    assert layout(model) is False


@pytest.mark.parametrize(
    ("header", "mean", "keep"),
    [
        ('<ir_version: 10, opset_import: ["" : 20]>', "y = ReduceMean(x, axes)", True),
        (
            '<ir_version: 10, opset_import: ["" : 13]>',
            "y = ReduceMean<axes: ints = [-2, -1], keepdims: int = 0>(x)",
            False,
        ),
        ('<ir_version: 10, opset_import: ["" : 20]>', "y = GlobalAveragePool(x)", True),
    ],
)
def test_spatial_means_become_a_matmul(header, mean, keep) -> None:
    shape = "float[N,4,1,1] y" if keep else "float[N,4] y"
    model = build(
        f"""
        {header}
        g (float[N,4,3,5] x) => ({shape}) {weights(axes=np.array([2, 3], np.int64))} {{
            {mean}
        }}
        """
    )
    inputs = inputs_for(model)
    before = run(model, inputs)
    assert layout(model) is True
    assert_valid(model)
    assert op_counts(model)["MatMul"] == 1
    assert model.graph.outputs[0].name == "y"
    after = run(model, inputs)
    assert after[0].shape == before[0].shape
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)


def head_model() -> ir.Model:
    """Conv -> Relu -> ReduceMean(H, W) -> Flatten -> Gemm, made float16 by ``fp16``."""
    model = build(
        f"""
        g (float[N,3,6,6] x) => (float[N,5] y)
          {weights(w=normal(8, 3, 3, 3), g=normal(5, 8, seed=1), axes=np.array([2, 3], np.int64))}
        {{
            c = Conv<pads: ints = [1, 1, 1, 1]>(x, w)
            r = Relu(c)
            m = ReduceMean(r, axes)
            f = Flatten(m)
            y = Gemm<transB: int = 1>(f, g)
        }}
        """
    )
    assert Float16Pass(target="cuda")(model).modified
    return model


@pytest.mark.parametrize("cast_back", [True, False])
def test_a_float16_head_takes_its_mean_in_float16(cast_back: bool) -> None:
    # fp16 keeps the mean float32: Cast -> mean -> [Flatten -> Cast back ->] Gemm. The mean
    # moves onto the float16 data; with a Cast back after it, both Casts go.
    model = head_model() if cast_back else stem_model(size=8)
    assert op_counts(model)["Cast"] == (4 if cast_back else 2)
    inputs = inputs_for(model)
    before = run(model, inputs)
    assert layout(model, stems=False, relu_after_pool=False) is True
    assert_valid(model)
    (matmul,) = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmul.inputs[0].dtype == FLOAT16
    # left: the input's and the output's Casts (the stem model's output is the mean itself)
    assert op_counts(model)["Cast"] == 2
    assert compare_outputs(before, run(model, inputs)).rel_l2 < REASSOCIATION_BUDGET


@pytest.mark.parametrize(
    "text",
    [
        """g (float[N,4,3,5] x) => (float[N,1,3,5] y) {axes = Constant<value_ints = [1]>()
           y = ReduceMean(x, axes)}""",
        """g (float[N,4,H,W] x) => (float[N,4,1,1] y) {y = GlobalAveragePool(x)}""",
    ],
)
def test_other_means_stay(text) -> None:
    assert layout(build(text)) is False


def test_options_turn_each_rewrite_off() -> None:
    model = stem_model()
    assert layout(model, stems=False, relu_after_pool=False, mean_as_matmul=False) is False
    assert layout(model, stems=False, relu_after_pool=False) is True
    assert op_counts(model)["ReduceMean"] == 0 and _conv(model).inputs[1].const_value.shape[1] == 3
