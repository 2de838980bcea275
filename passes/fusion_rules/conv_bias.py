"""Fold an Add of a per-channel constant after a Conv into the Conv's bias.

``Conv(x, W, B) + c = Conv(x, W, B + c)`` when ``c`` is constant and broadcasts along the
output-channel axis only: after right-aligning ``c``'s shape with the output (N, C, d1, ...),
every axis but C has size 1 and C has size 1 or C. The sum ``B + c`` is rounded once at fusion
time where the original rounded once per output element: a reassociating rewrite.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxforge.passes.fusion_rules._values import (
    FLOAT_TYPES,
    constant_array,
    describe,
    unique_initializer_name,
)

__all__ = ["rules"]


class FoldAddIntoConvBias(pattern.RewriteRuleClassBase):
    """``Add(Conv(x, W, B), c)`` -> ``Conv(x, W, B + c)``."""

    def pattern(self, op, x, c):
        return op.Add(op.Conv(x, _allow_other_inputs=True, _outputs=["conv"]), c)

    def check(self, context, x, c, conv: ir.Value, **_):
        result = pattern.MatchResult()
        node = conv.producer()
        weight = node.inputs[1]
        if weight is None or weight.shape is None or not isinstance(weight.shape[0], int):
            return result.fail(f"Conv '{node.name}' weight {describe(weight)} has no static shape")
        channels, rank = weight.shape[0], weight.shape.rank()
        addend = constant_array(c)
        if addend is None:
            return result.fail(f"addend {describe(c)} is not a constant")
        if conv.dtype not in FLOAT_TYPES or c.dtype != conv.dtype:
            return result.fail(f"Conv output is {conv.dtype}, addend {describe(c)} is {c.dtype}")
        if addend.ndim > rank:
            return result.fail(f"addend {describe(c)} has rank {addend.ndim} > {rank}")
        aligned = (1,) * (rank - addend.ndim) + addend.shape
        if aligned[1] not in (1, channels) or any(d != 1 for i, d in enumerate(aligned) if i != 1):
            return result.fail(
                f"addend {describe(c)} of shape {list(addend.shape)} is not per-channel "
                f"for an output of {channels} channels"
            )
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if constant_array(node.inputs[2]) is None:
                return result.fail(f"Conv bias {describe(node.inputs[2])} is not a constant")
        graph = context.graph_or_function
        if not isinstance(graph, ir.Graph):
            return result.fail("fusing into a function body would need new initializers there")
        self._bias_name = unique_initializer_name(graph, f"{conv.name or 'conv'}_bias")
        return result

    def rewrite(self, op, x, c, conv: ir.Value, **_):
        node = conv.producer()
        channels = node.inputs[1].shape[0]
        addend = np.broadcast_to(c.const_value.numpy().reshape(-1), (channels,))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        original = bias.const_value.numpy() if bias is not None else np.zeros_like(addend)
        fused = ir.tensor((original + addend).astype(addend.dtype), name=self._bias_name)
        return op.Conv(
            x,
            node.inputs[1],
            op.initializer(fused, name=self._bias_name),
            _name=node.name,
            **node.attributes,
        )


def rules(target: str) -> Sequence[pattern.RewriteRule]:
    """The Conv-bias fold, both operand orders of the Add (a plain ONNX op on every target)."""
    del target
    return list(FoldAddIntoConvBias.rule().commute())
