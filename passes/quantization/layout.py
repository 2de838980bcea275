"""A float convolution hands its output to a quantized one channels-last (static int8 models).

ONNX Runtime's CPU provider runs quantized convolutions channels-last (its NHWC transformer
turns each QLinearConv into the ``channels_last`` contrib form with a Transpose in front, and
cancels the Transposes between two of them) and float convolutions in its blocked NCHWc layout,
reordered back to NCHW after each. Where a convolution left float (too few products per output,
excluded, or kept float by the budget) feeds a quantized one, ONNX Runtime's graph ends
``ReorderOutput -> QuantizeLinear -> Transpose (uint8) -> QLinearConv``, and that Transpose is
the slow part on two threads: digits-cnn's 256 x 16 x 8 x 8 features took 0.22 ms in it (19 µs
on one thread), a quarter of the quantized model's run.

:func:`hand_over_channels_last` writes the hand-over channels-last in the graph::

    y = Relu(Conv(x, W))                 y = Relu(Conv(x, W))
                                         f = Flatten<axis=3>(Transpose<perm=[0,2,3,1]>(y))
    d = DQ(Q(y))                  ->     d = DQ(Q(f))                      # (N*H*W) x C
                                         c = Transpose<perm=[0,3,1,2]>(Reshape(d, [-1,H,W,C]))
    z = Conv(d, DQ(Wq))                  z = Conv(c, DQ(Wq))

ONNX Runtime then writes the float convolution's output channels-last straight from its NCHWc
reorder (the first Transpose folds into it), the quantized convolution's own Transpose cancels
the second, and Flatten and Reshape only relabel the buffer. The Flatten is what keeps the
first Transpose next to the convolution: ONNX Runtime moves a QuantizeLinear up across a
Transpose or a Reshape, which would leave the uint8 Transpose where it was, but not across a
Flatten. In QOperator form (``QLinearConv`` reading the QuantizeLinear) the Reshape and the
second Transpose come straight after the QuantizeLinear. Only the layout changes: the model
computes the same values.

Digits-cnn, batch 256, on this project's 2-core machine: 0.79 -> 0.68 ms on two threads,
1.18 -> 1.19 ms on one (the float model 1.32 and 2.55 ms).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxforge.passes.fusion_rules._values import (
    ONNX_DOMAINS,
    constant_float32,
    new_initializer,
    only_reader,
    unique_value_name,
    value_names,
)

__all__ = ["hand_over_channels_last"]

# ONNX Runtime's NCHWc convolution (the one whose reorder can write channels-last) takes output
# channels in multiples of its block (16 with AVX-512, 8 with AVX2) and input channels below 8
# or in multiples of the block; 16 satisfies both blocks.
_NCHWC_BLOCK = 16


def _float_conv(value: ir.Value) -> ir.Node | None:
    """The float 2-D Conv that computes ``value`` (maybe through a Relu), if it runs NCHWc."""
    node = value.producer()
    if node is not None and node.op_type == "Relu" and node.domain in ONNX_DOMAINS:
        inner = node.inputs[0]
        if inner is None or only_reader(inner) is not node:
            return None
        node = inner.producer()
    if node is None or node.op_type != "Conv" or node.domain not in ONNX_DOMAINS:
        return None
    weight = constant_float32(node.inputs[1], 4)
    if weight is None:
        return None
    out_channels, in_channels = weight.shape[:2]
    if node.attributes.get_int("group", 1) != 1 or out_channels % _NCHWC_BLOCK:
        return None
    if in_channels >= 8 and in_channels % _NCHWC_BLOCK:
        return None
    return node


def _is_quantized_conv_input(use: ir.Usage) -> bool:
    """Input 0 of a QLinearConv, or of a Conv whose weight is dequantized (QDQ)."""
    node = use.node
    if use.idx != 0 or node.domain not in ONNX_DOMAINS:
        return False
    if node.op_type == "QLinearConv":
        return True
    weight = node.inputs[1] if node.op_type == "Conv" else None
    producer = weight.producer() if weight is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _per_tensor(node: ir.Node) -> bool:
    scale = node.inputs[1]
    return scale is not None and scale.const_value is not None and scale.const_value.size == 1


def _hand_over(quantize: ir.Node) -> tuple[ir.Node, ir.Node, list[int]] | None:
    """(float Conv, last node of the hand-over, [C, H, W]) when ``quantize`` starts one.

    The hand-over ends at the DequantizeLinear after ``quantize`` (QDQ), or at ``quantize``
    itself when QLinearConvs read it (QOperator).
    """
    y = quantize.inputs[0]
    if y is None or only_reader(y) is not quantize or not _per_tensor(quantize):
        return None
    if y.shape is None or len(y.shape) != 4:
        return None
    dims = list(y.shape)[1:]
    if not all(isinstance(d, int) for d in dims):
        return None
    conv = _float_conv(y)
    if conv is None:
        return None
    last = quantize
    reader = only_reader(quantize.outputs[0])
    if reader is not None and reader.op_type == "DequantizeLinear":
        if not _per_tensor(reader):
            return None
        last = reader
    out = last.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or not uses or not all(_is_quantized_conv_input(u) for u in uses):
        return None
    return conv, last, dims


def hand_over_channels_last(model: ir.Model) -> list[str]:
    """Rewrite every float-Conv -> quantized-Conv hand-over channels-last (see the module).

    Returns the names of the float Conv nodes whose output now leaves channels-last. Each
    rewrite needs: the float Conv 2-D, ungrouped, its weight constant with channel counts ONNX
    Runtime's NCHWc convolution takes, followed by nothing or a Relu, then a per-tensor
    QuantizeLinear (and DequantizeLinear, in QDQ form) read only by quantized Convs (QDQ Convs
    or QLinearConvs), and C, H, W known.
    """
    graph = model.graph
    names = value_names(graph)
    rewritten: list[str] = []
    for quantize in list(graph):
        if quantize.op_type != "QuantizeLinear" or quantize.domain not in ONNX_DOMAINS:
            continue
        found = _hand_over(quantize)
        if found is None:
            continue
        conv, last, (channels, height, width) = found
        y, d = quantize.inputs[0], last.outputs[0]
        readers = list(d.uses())
        batch = y.shape[0]
        transpose = ir.node("Transpose", [y], attributes={"perm": [0, 2, 3, 1]})
        flatten = ir.node("Flatten", [transpose.outputs[0]], attributes={"axis": 3})
        target = new_initializer(
            graph, f"{y.name}_nhwc_shape", np.array([-1, height, width, channels], np.int64)
        )
        reshape = ir.node("Reshape", [d, target])
        back = ir.node("Transpose", [reshape.outputs[0]], attributes={"perm": [0, 3, 1, 2]})
        for node, like, suffix, shape in (
            (transpose, y, "channels_last", [batch, height, width, channels]),
            (flatten, y, "channels_last_rows", [None, channels]),
            (reshape, d, "nhwc", [batch, height, width, channels]),  # uint8 in QOperator form
            (back, d, "nchw", [batch, channels, height, width]),
        ):
            name = unique_value_name(graph, f"{like.name}_{suffix}", names)
            node.name = node.outputs[0].name = name
            node.outputs[0].type, node.outputs[0].shape = like.type, ir.Shape(shape)
        graph.insert_before(quantize, [transpose, flatten])
        quantize.replace_input_with(0, flatten.outputs[0])
        for value in {quantize.outputs[0], d}:
            value.shape = ir.Shape([None, channels])
        graph.insert_after(last, [reshape, back])
        for use in readers:
            use.node.replace_input_with(use.idx, back.outputs[0])
        rewritten.append(str(conv.name))
    return rewritten
