"""Layer normalisation: the decomposed form into LayerNormalization, and residual adds into it.

LayerNormalization over the last axis computes, with ``mean`` and ``var`` taken over that axis:

    y = (x - mean) / sqrt(var + eps) * gamma + beta,   var = mean((x - mean)^2)

:class:`FuseDecomposedLayerNorm` matches that formula spelled out as ReduceMean, Sub,
Pow(., 2) or Mul(d, d), ReduceMean, Add(eps), Sqrt, Div (or Mul by Reciprocal) and Mul(gamma),
and writes the standard ``LayerNormalization`` (opset 17+, float32, stash_type 1); then
:class:`FoldAddIntoLayerNormBias` takes a following ``+ beta`` in as its bias. The kernel
computes the same formula in float32 in another order: reassociating. ``gamma`` must be 1-D
of the normalised axis's size (``beta`` the same shape), and both reductions over the last
axis with ``keepdims=1``.

:class:`SkipLayerNorm` is onnxscript's SkipLayerNormalization fusion, ``LayerNorm(a + b [+
bias])`` into ONNX Runtime's ``com.microsoft.SkipLayerNormalization`` (CPU and CUDA kernels),
whose fourth output is the sum ``a + b + bias``; it only adds the check that the
LayerNormalization has a bias (onnxscript's check reads its shape unguarded).
:func:`lower_skip_layer_norm` writes the fused node back as ``Sum`` + ``LayerNormalization``
(the same formula), which ONNX Runtime's CPU runs faster than its SkipLayerNormalization kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.skip_normalization import SkipLayerNormFusion

from onnxforge.passes.fusion_rules._values import constant_array, describe, known_dims

__all__ = [
    "layer_norm_rules",
    "layer_norm_bias_rules",
    "skip_layer_norm_rules",
    "lower_skip_layer_norm",
    "LAYER_NORM_OPSET",
]

# LayerNormalization joined the standard domain in opset 17.
LAYER_NORM_OPSET = 17
_MS = "com.microsoft"
# ReduceMean takes its axes as an input from opset 18 on.
AXES_AS_INPUT_OPSET = 18


class FuseDecomposedLayerNorm(pattern.RewriteRuleClassBase):
    """ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul -> LayerNormalization(x, gamma)."""

    def __init__(self, *, axes_as_input: bool) -> None:
        super().__init__(
            name="FuseDecomposedLayerNorm" + ("" if axes_as_input else "AxesAttribute")
        )
        self.axes_as_input = axes_as_input

    def _reduce_mean(self, op, value, axes, output: str):
        if self.axes_as_input:
            return op.ReduceMean(value, axes, _outputs=[output])
        return op.ReduceMean(value, _outputs=[output])

    def pattern(self, op, x, axes1, axes2, epsilon, gamma):
        mean = self._reduce_mean(op, x, axes1, "mean")
        deviation = op.Sub(x, mean)
        squared = pattern.OrValue([op.Pow(deviation, 2.0), op.Mul(deviation, deviation)])
        variance = self._reduce_mean(op, squared, axes2, "variance")
        std = op.Sqrt(op.Add(variance, epsilon))
        normalized = pattern.OrValue(
            [op.Div(deviation, std), op.Mul(deviation, op.Reciprocal(std))]
        )
        return op.Mul(normalized, gamma)

    def _axes(self, reduction: ir.Node) -> list[int] | None:
        if self.axes_as_input:
            if len(reduction.inputs) < 2:
                return None
            array = constant_array(reduction.inputs[1])
            return None if array is None else [int(a) for a in array.reshape(-1)]
        axes = reduction.attributes.get_ints("axes", None)
        return None if axes is None else list(axes)

    def check(self, context, x, epsilon, gamma, mean=None, variance=None, **_):
        result = pattern.MatchResult()
        opset = context.model.opset_imports.get("", 0)
        if opset < LAYER_NORM_OPSET:
            return result.fail(
                f"opset {opset} has no LayerNormalization (needs {LAYER_NORM_OPSET})"
            )
        if (opset >= AXES_AS_INPUT_OPSET) != self.axes_as_input:
            return result.fail(f"ReduceMean's axes form does not match opset {opset}")
        if x.dtype != ir.DataType.FLOAT:
            return result.fail(f"input {describe(x)} is {x.dtype}; the fusion is for float32")
        dims = known_dims(x)
        if dims is None or not isinstance(dims[-1], int):
            return result.fail(f"the normalised axis of {describe(x)} has no static size")
        rank, size = len(dims), dims[-1]
        for reduction in (mean.producer(), variance.producer()):
            if self._axes(reduction) not in ([-1], [rank - 1]):
                return result.fail(f"ReduceMean '{reduction.name}' is not over the last axis only")
            if reduction.attributes.get_int("keepdims", 1) != 1:
                return result.fail(f"ReduceMean '{reduction.name}' drops the reduced axis")
        eps = constant_array(epsilon)
        if eps is None or eps.size != 1:
            return result.fail(f"epsilon {describe(epsilon)} is not a constant scalar")
        if gamma.dtype != x.dtype or known_dims(gamma) != (size,):
            return result.fail(
                f"scale {describe(gamma)} is not a {x.dtype} vector of the normalised axis's "
                f"size {size}"
            )
        self._epsilon = float(np.asarray(eps).reshape(()))
        return result

    def rewrite(self, op, x, gamma, **_):
        return op.LayerNormalization(x, gamma, axis=-1, epsilon=self._epsilon, stash_type=1)


class FoldAddIntoLayerNormBias(pattern.RewriteRuleClassBase):
    """``LayerNormalization(x, gamma) + beta`` -> ``LayerNormalization(x, gamma, beta)``.

    LayerNormalization's bias is added to the scaled result, so an Add of a tensor with the
    scale's exact shape after a bias-less LayerNormalization is its bias.
    """

    def pattern(self, op, x, gamma, beta):
        normalized = op.LayerNormalization(x, gamma, _outputs=["normalized"])
        return op.Add(normalized, beta)

    def check(self, context, x, gamma, beta, normalized, **_):
        result = pattern.MatchResult()
        scale_dims = known_dims(gamma)
        if scale_dims is None or known_dims(beta) != scale_dims or beta.dtype != gamma.dtype:
            return result.fail(
                f"addend {describe(beta)} does not have the shape and type of the scale "
                f"{describe(gamma)}"
            )
        return result

    def rewrite(self, op, x, gamma, beta, normalized, **_):
        attributes = normalized.producer().attributes
        return op.LayerNormalization(x, gamma, beta, **attributes)


class SkipLayerNorm(SkipLayerNormFusion):
    """``LayerNormalization(a + b [+ bias])`` -> ``com.microsoft.SkipLayerNormalization``."""

    def check(self, op, input, skip, gamma, beta, bias, layer_norm, **kwargs):
        if beta is None:
            return pattern.MatchResult().fail(
                f"LayerNormalization '{layer_norm.producer().name}' has no bias input"
            )
        return super().check(op, input, skip, gamma, beta, bias, layer_norm, **kwargs)


def layer_norm_rules(target: str) -> Sequence[pattern.RewriteRule]:
    """The decomposed-LayerNorm fusions (a standard op on every target)."""
    del target
    found: list[pattern.RewriteRule] = []
    for axes_as_input in (True, False):
        found.extend(FuseDecomposedLayerNorm.rule(axes_as_input=axes_as_input).commute())
    return found


def layer_norm_bias_rules(target: str) -> Sequence[pattern.RewriteRule]:
    """The bias fold, both operand orders of the Add (after the decomposed fusion)."""
    del target
    return list(FoldAddIntoLayerNormBias.rule().commute())


def skip_layer_norm_rules(target: str) -> Sequence[pattern.RewriteRule]:
    """SkipLayerNormalization fusions (CPU and CUDA kernels), as onnxscript orders them."""
    del target
    return [
        SkipLayerNorm.rule("SkipLayerNormPreBias", has_bias=True, bias_pre_add=True),
        SkipLayerNorm.rule("SkipLayerNormBias", has_bias=True, bias_pre_add=False),
        SkipLayerNorm.rule("SkipLayerNorm", has_bias=False),
    ]


def lower_skip_layer_norm(model: ir.Model) -> list[str]:
    """``SkipLayerNormalization`` -> ``Sum`` + ``LayerNormalization``, for ONNX Runtime's CPU.

    Returns the names of the nodes lowered. Same formula: ``LN(input + skip + bias)``, the
    sum being the node's optional fourth output. ONNX Runtime's CPU kernel for the fused op
    adds and normalises each row in scalar loops: in MiniLM at batch 8, sequence 128 on 2
    threads here its 12 nodes took 12.1 ms of a 130 ms run, against 4.9 ms for the Sum and
    LayerNormalization that replace them (and once the MatMuls around them are integer, they
    were 19% of the run). The sum is a ``Sum`` rather than an ``Add``
    because ONNX Runtime's session optimiser fuses Add + LayerNormalization back into
    SkipLayerNormalization. Nodes whose mean or inverse-deviation outputs are read, or that are
    not float32, are left alone.
    """
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    lowered: list[str] = []
    if opset < LAYER_NORM_OPSET:
        return lowered
    for node in list(graph):
        if node.domain != _MS or node.op_type != "SkipLayerNormalization":
            continue
        outputs = list(node.outputs)
        if any(v.uses() or v.is_graph_output() for v in outputs[1:3]):
            continue
        x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
        beta = node.inputs[3] if len(node.inputs) > 3 else None
        bias = node.inputs[4] if len(node.inputs) > 4 else None
        if x is None or x.dtype != ir.DataType.FLOAT:
            continue
        epsilon = node.attributes.get_float("epsilon", 1e-12)
        total = ir.node(
            "Sum", [v for v in (x, skip, bias) if v is not None], name=f"{node.name}_sum"
        )
        total.outputs[0].name = f"{outputs[0].name}_sum"
        total.outputs[0].type = x.type
        total.outputs[0].shape = x.shape
        norm = ir.node(
            "LayerNormalization",
            [total.outputs[0], gamma, *([beta] if beta is not None else [])],
            attributes={"axis": -1, "epsilon": epsilon},
            name=f"{node.name}_norm",
        )
        old_values, new_values = [outputs[0]], [norm.outputs[0]]
        if len(outputs) > 3 and outputs[3] is not None:
            old_values.append(outputs[3])
            new_values.append(total.outputs[0])
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [total, norm], old_values, new_values
        )
        lowered.append(str(node.name))
    return lowered
