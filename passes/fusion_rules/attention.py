"""Scaled dot-product attention into ONNX Runtime's MultiHeadAttention and Attention.

Attention is ``softmax(Q K^T * scale + mask) V`` per head, with Q, K, V the input projected by
three MatMuls (plus biases), split into heads by Reshape + Transpose, and the heads merged back
by Transpose + Reshape. The stages, in order, are onnxscript's ``ort_fusions`` rules, as its
``fuse_xformers`` runs them:

1. ``SDPA``: the per-head product, scale, optional additive mask, softmax and second product,
   into a temporary ``ai.onnxruntime._fusion.SDPA`` node (the scale is folded into one float);
2. ``MHA``: the head split/merge around it into ``com.microsoft.MultiHeadAttention``;
3. ``MHAScale``: a Mul of the query by a constant into MHA's ``scale``;
4. ``MHABias``: the Q/K/V bias Adds into MHA's packed bias;
5. ``Attention``: three projections of one input into ``com.microsoft.Attention`` with one
   packed QKV weight (only with a bias: the pattern's bias variable never matches a missing
   input, which matters because ONNX Runtime 1.31's CPU Attention crashes without one);
6. ``SDPAImplementation``: any temporary SDPA node left (its head split did not match) into an
   MHA between explicit Transposes, so that no temporary op ever leaves the pass.

The kernels compute the same formula, with a different summation order and softmax
implementation: reassociating. Both ops have CPU and CUDA kernels (float32 and float16).

onnxforge adds two guards: SDPA only fires when the number of heads is static (stage 6 needs
it, so a temporary node can never be stranded); and, before stages 4 and 5,
:class:`ShapeOfAddInput` and :class:`ShapeOfMatMulInput` move a Shape node from a sum or a
product to the operand with the same dims. MHA's mask broadcast reads the query's shape with a
Shape node; that extra reader of the query's bias Add, and then of its projection MatMul,
would stop stages 4 and 5, whose fusions must remove those nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.attention import AttentionFusion
from onnxscript.rewriter.ort_fusions.mha import mha_rules_no_past, mha_rules_with_past
from onnxscript.rewriter.ort_fusions.mha_bias import FuseBiasMHA
from onnxscript.rewriter.ort_fusions.mha_scale import FuseMHAScale
from onnxscript.rewriter.ort_fusions.sdpa import SDPA
from onnxscript.rewriter.ort_fusions.sdpa_via_mha import SDPAImplementation

from onnxforge.passes.fusion_rules._values import describe, same_dims

__all__ = ["attention_stages", "TEMPORARY_DOMAIN", "SHAPE_READERS"]

# The domain of onnxscript's intermediate fusion ops, which no runtime implements.
TEMPORARY_DOMAIN = "ai.onnxruntime._fusion"
# The name of the stages that only move Shape nodes (they make room for a fusion).
SHAPE_READERS = "shape-readers"


class StaticHeadsSDPA(SDPA):
    """onnxscript's SDPA fusion, only where the number of heads is static."""

    def check(self, context, query, key, value, mask, key_format, **bindings):
        result = super().check(context, query, key, value, mask, key_format, **bindings)
        if not result:
            return result
        if query.shape is None or not isinstance(query.shape[1], int):
            return pattern.MatchResult().fail(
                f"the number of heads of query {describe(query)} is not static"
            )
        return result


class ShapeOfAddInput(pattern.RewriteRuleClassBase):
    """``Shape(Add(a, b))`` -> ``Shape(a)`` when ``a`` and the sum have one static shape."""

    def __init__(self) -> None:
        super().__init__(remove_nodes=False)  # the Add stays: it has other consumers

    def pattern(self, op, a, b):
        return op.Shape(op.Add(a, b, _outputs=["total"]), _outputs=["shape"])

    def check(self, context, a, b, total, **_):
        if not same_dims(a, total):
            return pattern.MatchResult().fail(
                f"{describe(a)} and {describe(total)} are not known to have one shape"
            )
        return pattern.MatchResult()

    def rewrite(self, op, a, b, total, shape, **_):
        return op.Shape(a, **shape.producer().attributes)


class ShapeOfMatMulInput(pattern.RewriteRuleClassBase):
    """``Shape(MatMul(a, W), start, end)`` -> ``Shape(a, start, end)`` off the last axis.

    With a 2-D ``W``, the product has ``a``'s dims on every axis but the last, so a Shape
    sliced to exclude the last axis reads the same dims from ``a``.
    """

    def __init__(self) -> None:
        super().__init__(remove_nodes=False)  # the MatMul stays: it has other consumers

    def pattern(self, op, a, w):
        return op.Shape(op.MatMul(a, w, _outputs=["product"]), _outputs=["shape"])

    def check(self, context, a, w, product, shape, **_):
        result = pattern.MatchResult()
        if w.shape is None or w.shape.rank() != 2:
            return result.fail(f"MatMul weight {describe(w)} is not known to be 2-D")
        if a.shape is None or product.shape is None or a.shape.rank() != product.shape.rank():
            return result.fail(f"{describe(a)} and {describe(product)} differ in rank")
        rank = a.shape.rank()
        attributes = shape.producer().attributes
        end = attributes.get_int("end", rank)
        if (end + rank if end < 0 else end) > rank - 1:
            return result.fail(f"Shape '{shape.producer().name}' reads the product's last axis")
        return result

    def rewrite(self, op, a, w, product, shape, **_):
        return op.Shape(a, **shape.producer().attributes)


def attention_stages(target: str) -> Sequence[tuple[str, Sequence[pattern.RewriteRule]]]:
    """The attention stages, named, each applied to the whole graph before the next.

    The stages named :data:`SHAPE_READERS` move Shape nodes; they fuse nothing.
    """
    del target  # MultiHeadAttention and Attention have CPU and CUDA kernels
    shape_readers = [*ShapeOfAddInput.rule().commute(), ShapeOfMatMulInput.rule()]
    attention = [
        AttentionFusion.rule(
            f"Attention{'Past' if past else ''}{'Packed' if packed else ''}",
            has_past=past,
            no_slice=not packed,
        )
        for past in (False, True)
        for packed in (False, True)
    ]
    return [
        ("sdpa", [StaticHeadsSDPA.rule("SDPA")]),
        ("mha", [*mha_rules_with_past, *mha_rules_no_past]),
        ("mha-scale", [FuseMHAScale.rule()]),
        (SHAPE_READERS, shape_readers),
        ("mha-bias", [FuseBiasMHA.rule()]),
        (SHAPE_READERS, shape_readers),
        ("attention", attention),
        ("sdpa-leftovers", [SDPAImplementation.rule()]),
    ]
