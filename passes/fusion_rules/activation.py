"""Fold an activation after a Conv or Gemm into ONNX Runtime's ``FusedConv`` / ``FusedGemm``.

``act(Conv(x, W, B)) = com.microsoft.FusedConv(x, W, B, activation=act)`` and likewise for
Gemm, for the activations ONNX Runtime's fused kernels apply to each output element as it is
written: Relu, LeakyRelu(alpha), Sigmoid, Tanh, HardSigmoid(alpha, beta) and Clip(min, max)
with constant bounds. The activation is the same function applied to the same values: exact
up to the kernel's own vectorised activation. Only where the target has the kernel (read off
ONNX Runtime's registered kernels and checked by running them): CPU has FusedConv and FusedGemm
for float32 with all six activations; CUDA has FusedConv for float32 with Relu only (its
kernel maps nothing else to cuDNN) and no FusedGemm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxforge.passes.fusion_rules._values import constant_array, describe

__all__ = ["rules", "ACTIVATIONS"]

# The activations each target's fused kernels apply, by ONNX op type.
ACTIVATIONS = {
    "cpu": ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "Clip"),
    "cuda": ("Relu",),
}
# The producers that have a fused kernel on each target.
PRODUCERS = {"cpu": ("Conv", "Gemm"), "cuda": ("Conv",)}

# ONNX defaults of the activations' attributes.
_LEAKY_RELU_ALPHA = 0.01
_HARD_SIGMOID_ALPHA = 0.2
_HARD_SIGMOID_BETA = 0.5


def _activation_params(node: ir.Node) -> list[float] | None:
    """The activation's parameters in ONNX Runtime's order, or None when they are not constant."""
    if node.op_type == "LeakyRelu":
        return [node.attributes.get_float("alpha", _LEAKY_RELU_ALPHA)]
    if node.op_type == "HardSigmoid":
        return [
            node.attributes.get_float("alpha", _HARD_SIGMOID_ALPHA),
            node.attributes.get_float("beta", _HARD_SIGMOID_BETA),
        ]
    if node.op_type == "Clip":
        bounds = []
        for index, default in ((1, -np.inf), (2, np.inf)):
            value = node.inputs[index] if len(node.inputs) > index else None
            if value is None:
                bounds.append(float(np.finfo(np.float32).max) * np.sign(default))
                continue
            array = constant_array(value)
            if array is None or array.size != 1:
                return None
            bounds.append(float(array.reshape(())))
        return bounds
    return []


class _FoldActivation(pattern.RewriteRuleClassBase):
    """``act(Producer(...))`` -> ``com.microsoft.FusedProducer(..., activation=act)``."""

    producer: ClassVar[str]

    def __init__(self, activation: str) -> None:
        super().__init__(name=f"Fold{activation}Into{self.producer}")
        self.activation = activation

    def pattern(self, op, x):
        produced = getattr(op, self.producer)(x, _allow_other_inputs=True, _outputs=["produced"])
        if self.activation == "Clip":
            return op.Clip(produced, _allow_other_inputs=True, _outputs=["activated"])
        return getattr(op, self.activation)(produced, _outputs=["activated"])

    def check(self, context, x, produced: ir.Value, activated: ir.Value, **_):
        result = pattern.MatchResult()
        if produced.dtype != ir.DataType.FLOAT:
            return result.fail(
                f"{self.producer} output {describe(produced)} is {produced.dtype}; "
                f"Fused{self.producer} has a float32 kernel only"
            )
        params = _activation_params(activated.producer())
        if params is None:
            return result.fail(f"Clip '{activated.producer().name}' has non-constant bounds")
        self._params = params
        return result

    def _fused_attributes(self, node: ir.Node) -> dict:
        raise NotImplementedError

    def rewrite(self, op, x, produced: ir.Value, activated: ir.Value, **_):
        node = produced.producer()
        return op.op(
            f"Fused{self.producer}",
            *node.inputs,
            _domain="com.microsoft",
            _name=node.name,
            **{k: v for k, v in node.attributes.items()},
            **self._fused_attributes(node),
        )


class FoldActivationIntoConv(_FoldActivation):
    """Conv + activation -> FusedConv (``activation``, ``activation_params``)."""

    producer = "Conv"

    def _fused_attributes(self, node):
        attributes: dict = {"activation": self.activation}
        if self._params:
            attributes["activation_params"] = [float(p) for p in self._params]
        return attributes


class FoldActivationIntoGemm(_FoldActivation):
    """Gemm + activation -> FusedGemm (``activation``, ``activation_alpha``/``_beta``)."""

    producer = "Gemm"

    def _fused_attributes(self, node):
        attributes: dict = {"activation": self.activation}
        for key, value in zip(("activation_alpha", "activation_beta"), self._params, strict=False):
            attributes[key] = float(value)
        return attributes


def rules(target: str) -> Sequence[pattern.RewriteRule]:
    """The activation folds that have a kernel on ``target``."""
    classes = {"Conv": FoldActivationIntoConv, "Gemm": FoldActivationIntoGemm}
    return [
        classes[producer].rule(activation)
        for producer in PRODUCERS[target]
        for activation in ACTIVATIONS[target]
    ]
