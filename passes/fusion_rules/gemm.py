"""Rewrite a 2-D MatMul followed by an Add into one Gemm.

``MatMul(A, B) + C = Gemm(A, B, C)`` (``alpha = beta = 1``) when A and B are 2-D (Gemm takes
nothing else) and C broadcasts to the product's (M, N) shape one way: Add broadcasts both
ways, so a C of (M, N) added to a (1, N) product would make the sum bigger than Gemm's
output. A Transpose feeding A or B becomes ``transA``/``transB``. The products and the sum are
the same; a Gemm kernel may accumulate in another order: reassociating.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import (
    MatMulAddToGemm,
    TransABMatMulAddToGemm,
    TransAMatMulAddToGemm,
    TransBMatMulAddToGemm,
)

from onnxforge.passes.fusion_rules._values import describe, known_dims

__all__ = ["rules"]

# The types Gemm-13 takes.
_GEMM_TYPES = {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "INT32", "INT64", "UINT32", "UINT64"}


def _check_gemm_operands(input_a, input_b, input_c) -> pattern.MatchResult:
    result = pattern.MatchResult()
    for name, value in (("A", input_a), ("B", input_b)):
        if value.shape is None or value.shape.rank() != 2:
            return result.fail(f"MatMul operand {name} {describe(value)} is not known to be 2-D")
    if input_a.dtype is None or input_a.dtype.name not in _GEMM_TYPES:
        return result.fail(f"MatMul operand {describe(input_a)} is {input_a.dtype}")
    if input_c.dtype != input_a.dtype:
        return result.fail(f"addend {describe(input_c)} is {input_c.dtype}, not {input_a.dtype}")
    c_dims = known_dims(input_c)
    if c_dims is None or len(c_dims) > 2:
        return result.fail(f"addend {describe(input_c)} is not known to have rank <= 2")
    return result


def _check_broadcast(product_dims, input_c) -> pattern.MatchResult:
    """C must broadcast to the product's (M, N) without growing it."""
    result = pattern.MatchResult()
    c_dims = known_dims(input_c)
    if product_dims is None:
        return result.fail("the MatMul's output shape is unknown")
    aligned = (1,) * (2 - len(c_dims)) + tuple(c_dims)
    for c_dim, out_dim in zip(aligned, product_dims, strict=True):
        if c_dim != 1 and c_dim != out_dim:
            return result.fail(
                f"addend {describe(input_c)} of shape {list(c_dims)} does not broadcast "
                f"one way to the product's {list(product_dims)}"
            )
    return result


def _product_dims(input_a, input_b, trans_a: bool, trans_b: bool):
    a_dims, b_dims = known_dims(input_a), known_dims(input_b)
    if a_dims is None or b_dims is None:
        return None
    return (a_dims[1] if trans_a else a_dims[0], b_dims[0] if trans_b else b_dims[1])


def _checked(base):
    class Checked(base):
        __doc__ = base.__doc__

        def check(self, context, input_a, input_b, input_c, **_):
            add = context.root
            if len(add.inputs) == 2 and add.inputs[0] is add.inputs[1]:
                # Add(m, m): the addend is the product itself, which the Gemm would remove
                return pattern.MatchResult().fail("the addend is the MatMul's own output")
            result = _check_gemm_operands(input_a, input_b, input_c)
            if not result:
                return result
            dims = _product_dims(input_a, input_b, self.trans_a, self.trans_b)
            return _check_broadcast(dims, input_c)

    Checked.__name__ = Checked.__qualname__ = base.__name__
    return Checked


def rules(target: str) -> Sequence[pattern.RewriteRule]:
    """MatMul + Add -> Gemm, with and without Transposes, both operand orders of the Add."""
    del target
    found: list[pattern.RewriteRule] = []
    for base in (
        TransABMatMulAddToGemm,
        TransAMatMulAddToGemm,
        TransBMatMulAddToGemm,
        MatMulAddToGemm,
    ):
        found.extend(_checked(base).rule().commute())
    return found
