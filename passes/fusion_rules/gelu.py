"""GELU written out in elementary ops into ONNX Runtime's GELU kernels, and bias + GELU.

Exact GELU is ``gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))``; :class:`FuseErfGelu` matches it
with ``x / sqrt(2)`` or ``x * (1 / sqrt(2))`` inside the erf and the three ways exporters
associate the outer product (``(0.5 x)(1 + e)``, ``x (0.5 (1 + e))``, ``0.5 (x (1 + e))``), in
any operand order, and writes ``com.microsoft.Gelu``, which computes the same erf formula.

The tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` is matched by
:class:`FuseTanhGelu` and written as ``com.microsoft.FastGelu``, which computes that same tanh
formula: the model already used the approximation, so the rewrite does not change the formula
and stays reassociating. The pass never turns exact GELU into the tanh approximation (a
different function, |error| up to about 5e-4): that would be an approximate rewrite.

:class:`BiasGelu` is onnxscript's ``Gelu(x + bias) -> com.microsoft.BiasGelu(x, bias)`` (for
the standard and the com.microsoft Gelu), with the stricter check that the bias is a vector
of x's last dimension: ONNX Runtime's kernel does not broadcast a 1-element bias.
All three ops have CPU and CUDA kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.bias_gelu import BiasGeluFusion

from onnxforge.passes.fusion_rules._values import FLOAT_TYPES, describe, known_dims

__all__ = ["gelu_rules", "bias_gelu_rules"]

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715
# How exporters associate 0.5 * x * (1 + f(x)).
_ASSOCIATIONS = ("half_x_first", "x_times_half_sum", "half_times_x_sum")


def _outer(op, x, one_plus, association: str):
    if association == "half_x_first":
        return op.Mul(op.Mul(x, 0.5), one_plus)
    if association == "x_times_half_sum":
        return op.Mul(x, op.Mul(0.5, one_plus))
    return op.Mul(0.5, op.Mul(x, one_plus))


class _FuseGelu(pattern.RewriteRuleClassBase):
    def __init__(self, association: str) -> None:
        super().__init__(name=f"{type(self).__name__}_{association}")
        self.association = association

    def _inner(self, op, x):
        raise NotImplementedError

    def pattern(self, op, x):
        return _outer(op, x, op.Add(self._inner(op, x), 1.0), self.association)

    def check(self, context, x, **_):
        if x.dtype not in FLOAT_TYPES:
            return pattern.MatchResult().fail(f"input {describe(x)} is {x.dtype}, not a float")
        return pattern.MatchResult()


class FuseErfGelu(_FuseGelu):
    """``0.5 * x * (1 + erf(x / sqrt(2)))`` -> ``com.microsoft.Gelu(x)``."""

    def _inner(self, op, x):
        return op.Erf(pattern.OrValue([op.Div(x, _SQRT_2), op.Mul(x, 1.0 / _SQRT_2)]))

    def rewrite(self, op, x, **_):
        return op.Gelu(x, _domain="com.microsoft")


class FuseTanhGelu(_FuseGelu):
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` -> ``com.microsoft.FastGelu``."""

    def _inner(self, op, x):
        cubic = op.Mul(_TANH_CUBIC, op.Pow(x, 3.0))
        return op.Tanh(op.Mul(_SQRT_2_OVER_PI, op.Add(x, cubic)))

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


class BiasGelu(BiasGeluFusion):
    """``Gelu(x + bias)`` -> ``com.microsoft.BiasGelu(x, bias)``, bias a vector of x's last dim."""

    def check(self, op, gelu, input, bias, **kwargs):
        result = super().check(op, gelu, input, bias, **kwargs)
        if not result:
            return result
        input_dims, bias_dims = known_dims(input), known_dims(bias)
        if not input_dims or bias_dims != input_dims[-1:]:
            return pattern.MatchResult().fail(
                f"bias {describe(bias)} is not a vector of the size of the last axis of "
                f"{describe(input)}"
            )
        return result


def gelu_rules(target: str, form: str = "erf") -> Sequence[pattern.RewriteRule]:
    """The ``erf`` or ``tanh`` form's GELU fusions, every association and operand order.

    Every rule of a form needs an Erf (or Tanh) node in the graph; the operand orders make
    over a hundred rules per form, so ``fuse`` builds a form's only when the graph has one.
    """
    del target
    fusion = {"erf": FuseErfGelu, "tanh": FuseTanhGelu}[form]
    found: list[pattern.RewriteRule] = []
    for association in _ASSOCIATIONS:
        found.extend(fusion.rule(association).commute())
    return found


def bias_gelu_rules(target: str) -> Sequence[pattern.RewriteRule]:
    """BiasGelu for the standard and the com.microsoft Gelu, both operand orders of the Add."""
    del target
    return [
        *BiasGelu.rule("BiasGelu", contrib_op=False).commute(),
        *BiasGelu.rule("BiasGeluContrib", contrib_op=True).commute(),
    ]
