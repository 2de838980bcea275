"""``quantize``'s channels-last hand-over from a float Conv to a quantized one (layout.py).

The rewrite is exact (only the layout changes), so outputs must match bit for bit; and it is
only worth having if ONNX Runtime's optimised graph loses its Transpose, which is checked on
the graph ONNX Runtime itself writes out.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxforge
from onnxforge.passes.quantization import layout
from onnxforge.passes.quantize import QuantizePass

from .conftest import assert_bitwise_equal, assert_valid, build, normal, op_counts, run

# The quantized Conv in the two forms ONNX Runtime's quantizer writes.
QUANTIZED_CONV = {
    "qdq": """
        d = DequantizeLinear (q, s, zp)
        wd = DequantizeLinear <axis = 0> (wq, ws, wzp)
        o = Conv <pads = [1, 1, 1, 1]> (d, wd)
        oq = QuantizeLinear (o, os, zp)
    """,
    "qoperator": """
        oq = QLinearConv <pads = [1, 1, 1, 1]> (q, s, zp, wq, ws, wzp, os, zp)
    """,
}


def hand_over_model(
    channels: int = 16, extra: str = "", outputs: str = "", form: str = "qdq"
) -> ir.Model:
    """A float Conv (1 -> ``channels``) + Relu, then a quantized Conv (-> 8), as the quantizer
    leaves digits-cnn's first two layers; ``extra`` adds a node, ``outputs`` graph outputs."""
    text = f"""
    <ir_version: 10, opset_import: ["" : 20]>
    g (float[N,1,6,6] x) => (float[N,8,6,6] y{outputs}) {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        r = Relu (c)
        q = QuantizeLinear (r, s, zp)
        {QUANTIZED_CONV[form]}
        y = DequantizeLinear (oq, os, zp)
        {extra}
    }}
    """
    model = build(text)
    rng = np.random.default_rng(0)
    for name, array in {
        "w": normal(channels, 1, 3, 3, seed=1),
        "b": normal(channels, seed=2),
        "wq": rng.integers(-127, 128, (8, channels, 3, 3)).astype(np.int8),
        "ws": np.full(8, 0.01, np.float32),
        "wzp": np.zeros(8, np.int8),
        "s": np.array(0.02, np.float32),
        "os": np.array(0.5, np.float32),
        "zp": np.array(0, np.uint8),
    }.items():
        value = next(
            v for node in model.graph for v in node.inputs if v is not None and v.name == name
        )
        value.const_value = ir.tensor(array, name=name)
        value.type, value.shape = (
            ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            ir.Shape(array.shape),
        )
        model.graph.register_initializer(value)
    ir.passes.common.ShapeInferencePass()(model)
    return model


def onnxruntime_ops(model: ir.Model, tmp_path, threads: int = 2) -> list[str]:
    """The op types of the graph ONNX Runtime runs, after all its optimisations."""
    path, optimized = tmp_path / "model.onnx", tmp_path / "ort.onnx"
    onnx.save(ir.to_proto(model), path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.intra_op_num_threads = threads
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(optimized).graph.node]


@pytest.mark.parametrize("form", sorted(QUANTIZED_CONV))
def test_the_hand_over_is_exact_and_onnxruntime_loses_its_transpose(form: str, tmp_path) -> None:
    model = hand_over_model(form=form)
    feeds = {"x": np.random.default_rng(1).random((4, 1, 6, 6), dtype=np.float32)}
    reference = run(model, feeds)
    # ONNX Runtime's quantized Conv runs NHWC: a Transpose into it (uint8), one out of it
    assert onnxruntime_ops(model, tmp_path).count("Transpose") == 2

    assert layout.hand_over_channels_last(model) == [next(iter(model.graph)).name]

    assert_valid(model)
    assert op_counts(model)["Transpose"] == 2 and op_counts(model)["Flatten"] == 1
    assert_bitwise_equal(reference, run(model, feeds))
    assert onnxruntime_ops(model, tmp_path).count("Transpose") == 1  # only the one out
    assert layout.hand_over_channels_last(model) == []  # done once


POOL = "p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (d)"


@pytest.mark.parametrize(
    ("change", "kwargs"),
    [
        ("channels ONNX Runtime's NCHWc Conv does not take", {"channels": 12}),
        ("the Relu read twice", {"extra": "t = Identity (r)", "outputs": ", float[N,16,6,6] t"}),
        ("the dequantized value pooled", {"extra": POOL, "outputs": ", float[N,16,3,3] p"}),
        ("the dequantized value a graph output", {"outputs": ", float[N,16,6,6] d"}),
    ],
)  # fmt: skip
def test_a_hand_over_is_left_alone_unless_the_rewrite_pays(change: str, kwargs: dict) -> None:
    model = hand_over_model(**kwargs)
    before = [n.op_type for n in model.graph]
    assert layout.hand_over_channels_last(model) == [], change
    assert [n.op_type for n in model.graph] == before


@pytest.mark.slow
def test_static_digits_cnn_hands_its_first_conv_over_channels_last(tmp_path) -> None:
    model = onnxforge.optimize(onnxforge.export("digits-cnn"), "fold-constants,cleanup,fuse").model
    pass_ = QuantizePass(mode="static", data="sample:digits-cnn")
    got = pass_(model).model
    assert len(pass_.report.hand_over) == 1  # the 1-channel first Conv stays float
    assert any("hand over channels-last" in line for line in pass_.report.lines())
    assert "Transpose" not in onnxruntime_ops(got, tmp_path)
