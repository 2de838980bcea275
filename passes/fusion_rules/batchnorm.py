"""Fold an inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

BatchNormalization computes ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel.
With ``s = gamma / sqrt(var + eps)`` and the producer ``x = W * a + B``:

    W' = W * s        (scaling each output channel's filter; for Gemm each output column)
    B' = (B - mean) * s + beta

Conv's output channels are W's axis 0. ConvTranspose's weight is (C_in, C_out/group, k...),
so output channel ``g * C_out/group + j`` is W's axis-1 slice ``j`` within group ``g``. Gemm
computes ``alpha * A' B' + beta_g * C``: the output columns are B's axis 1 (axis 0 when
``transB``), and ``B' = (beta_g * C - mean) * s + beta`` with ``beta_g`` dropped.

The rewrite is reassociating: ``W * s`` is rounded once where the original rounded twice. It
needs every BatchNormalization input and the producer's weight and bias to be constants, and
refuses training mode (``training_mode=1`` normalises with batch statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxforge.passes.fusion_rules._values import (
    FLOAT_TYPES,
    constant_array,
    describe,
    unique_initializer_name,
)

__all__ = ["rules", "DEFAULT_EPSILON"]

# BatchNormalization's default epsilon in the ONNX specification.
DEFAULT_EPSILON = 1e-5


class _FoldBatchNorm(pattern.RewriteRuleClassBase):
    """``BatchNormalization(Producer(a, W, B))`` -> ``Producer(a, W', B')``."""

    producer: ClassVar[str]

    def pattern(self, op, a):
        produced = getattr(op, self.producer)(a, _allow_other_inputs=True, _outputs=["produced"])
        return op.BatchNormalization(produced, _allow_other_inputs=True, _outputs=["normalized"])

    def _output_axis_size(self, weight: np.ndarray, node: ir.Node) -> int:
        raise NotImplementedError

    def _scale_weight(self, weight: np.ndarray, scale: np.ndarray, node: ir.Node) -> np.ndarray:
        raise NotImplementedError

    def check(self, context, a, produced: ir.Value, normalized: ir.Value, **_):
        result = pattern.MatchResult()
        node, batchnorm = produced.producer(), normalized.producer()
        if batchnorm.attributes.get_int("training_mode", 0):
            return result.fail(f"BatchNormalization '{batchnorm.name}' is in training mode")
        if any(output.uses() or output.is_graph_output() for output in batchnorm.outputs[1:]):
            return result.fail(f"BatchNormalization '{batchnorm.name}' has running-stat outputs")
        if produced.dtype not in FLOAT_TYPES:
            return result.fail(f"{describe(produced)} is {produced.dtype}, not a float tensor")
        if len(batchnorm.inputs) != 5:
            return result.fail(f"BatchNormalization '{batchnorm.name}' lacks an input")
        for name, value in zip(("scale", "B", "mean", "var"), batchnorm.inputs[1:], strict=True):
            array = constant_array(value)
            if array is None:
                return result.fail(f"BatchNormalization {name} {describe(value)} is not a constant")
            if array.ndim != 1:
                return result.fail(f"BatchNormalization {name} {describe(value)} is not 1-D")
        weight = constant_array(node.inputs[1] if len(node.inputs) > 1 else None)
        if weight is None:
            return result.fail(
                f"{self.producer} weight {describe(node.inputs[1])} is not a constant"
            )
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if constant_array(node.inputs[2]) is None:
                return result.fail(
                    f"{self.producer} bias {describe(node.inputs[2])} is not a constant"
                )
        channels = batchnorm.inputs[1].const_value.shape[0]
        try:
            axis_size = self._output_axis_size(weight, node)
        except ValueError as error:
            return result.fail(str(error))
        if axis_size != channels:
            return result.fail(
                f"{self.producer} '{node.name}' has {axis_size} output channels, "
                f"BatchNormalization '{batchnorm.name}' normalises {channels}"
            )
        graph = context.graph_or_function
        if not isinstance(graph, ir.Graph):
            return result.fail("fusing into a function body would need new initializers there")
        self._names = (
            unique_initializer_name(graph, f"{node.inputs[1].name or 'weight'}_bn"),
            unique_initializer_name(graph, f"{normalized.name or 'bias'}_bn_bias"),
        )
        return result

    def _fused_bias(self, node: ir.Node, bias: np.ndarray | None, mean: np.ndarray) -> np.ndarray:
        return (bias if bias is not None else 0.0) - mean

    def rewrite(self, op, a, produced: ir.Value, normalized: ir.Value, **_):
        node, batchnorm = produced.producer(), normalized.producer()
        gamma, beta, mean, var = (v.const_value.numpy() for v in batchnorm.inputs[1:])
        epsilon = batchnorm.attributes.get_float("epsilon", DEFAULT_EPSILON)
        compute = np.float64
        scale = gamma.astype(compute) / np.sqrt(var.astype(compute) + epsilon)
        weight = node.inputs[1].const_value.numpy()
        bias = (
            node.inputs[2].const_value.numpy().astype(compute)
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else None
        )
        fused_weight = self._scale_weight(weight.astype(compute), scale, node).astype(weight.dtype)
        fused_bias = (self._fused_bias(node, bias, mean.astype(compute)) * scale + beta).astype(
            weight.dtype
        )
        weight_name, bias_name = self._names
        attributes = {k: v for k, v in node.attributes.items() if k != "beta"}
        return op.op(
            self.producer,
            a,
            op.initializer(ir.tensor(fused_weight, name=weight_name), name=weight_name),
            op.initializer(ir.tensor(fused_bias, name=bias_name), name=bias_name),
            _name=node.name,
            **attributes,
        )


def _per_axis(scale: np.ndarray, rank: int, axis: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return scale.reshape(shape)


class FoldBatchNormIntoConv(_FoldBatchNorm):
    """``BatchNormalization(Conv(a, W, B))`` -> ``Conv(a, W', B')``."""

    producer = "Conv"

    def _output_axis_size(self, weight, node):
        return weight.shape[0]

    def _scale_weight(self, weight, scale, node):
        return weight * _per_axis(scale, weight.ndim, 0)


class FoldBatchNormIntoConvTranspose(_FoldBatchNorm):
    """``BatchNormalization(ConvTranspose(a, W, B))`` -> ``ConvTranspose(a, W', B')``."""

    producer = "ConvTranspose"

    def _output_axis_size(self, weight, node):
        group = node.attributes.get_int("group", 1)
        if weight.shape[0] % group:
            raise ValueError(
                f"ConvTranspose '{node.name}' has {weight.shape[0]} input channels, "
                f"not a multiple of group={group}"
            )
        return weight.shape[1] * group

    def _scale_weight(self, weight, scale, node):
        group = node.attributes.get_int("group", 1)
        in_channels, per_group, *kernel = weight.shape
        grouped = weight.reshape(group, in_channels // group, per_group, *kernel)
        factors = scale.reshape(group, 1, per_group, *([1] * len(kernel)))
        return (grouped * factors).reshape(weight.shape)


class FoldBatchNormIntoGemm(_FoldBatchNorm):
    """``BatchNormalization(Gemm(a, W, C))`` -> ``Gemm(a, W', C')``."""

    producer = "Gemm"

    def _axis(self, node: ir.Node) -> int:
        return 0 if node.attributes.get_int("transB", 0) else 1

    def _output_axis_size(self, weight, node):
        if weight.ndim != 2:
            raise ValueError(f"Gemm '{node.name}' weight is not 2-D")
        return weight.shape[self._axis(node)]

    def _scale_weight(self, weight, scale, node):
        return weight * _per_axis(scale, 2, self._axis(node))

    def _fused_bias(self, node, bias, mean):
        beta = node.attributes.get_float("beta", 1.0)
        return (beta * bias if bias is not None else 0.0) - mean


def rules(target: str) -> Sequence[pattern.RewriteRule]:
    """The BatchNormalization folds (plain ONNX ops: every target has them)."""
    del target
    return [
        FoldBatchNormIntoConv.rule(),
        FoldBatchNormIntoConvTranspose.rule(),
        FoldBatchNormIntoGemm.rule(),
    ]
