"""Fold a zero-valued constant Pad of the spatial axes into the following Conv's ``pads``.

``Conv(Pad(x, p, 0), W, pads=q) = Conv(x, W, pads=p + q)`` when the Pad is in ``constant``
mode with value 0, pads only the spatial axes, by non-negative amounts, and the Conv's
``auto_pad`` is ``NOTSET``: the same products are summed in the same order, so the rewrite is
exact. The match, the checks and the rewrite are onnxscript's ``FuseConvPad``; this rule only
removes the Pad (onnxscript's keeps it alive for its other consumers, which onnxforge's fusion
contract forbids) and refuses Pad-2's attribute form.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common._fuse_pad_into_conv import FuseConvPad

__all__ = ["rules"]


class FoldPadIntoConv(FuseConvPad):
    """``Conv(Pad(x))`` -> ``Conv(x)`` with the Pad's amounts added to ``pads``."""

    def __init__(self) -> None:
        pattern.RewriteRuleClassBase.__init__(self, name="FoldPadIntoConv", remove_nodes=True)

    def check(self, context, x, pad, conv):
        if len(pad.producer().inputs) < 2:
            return pattern.MatchResult().fail(
                f"Pad '{pad.producer().name}' gives its pads as an attribute (opset < 11)"
            )
        return super().check(context, x, pad, conv)


def rules(target: str) -> Sequence[pattern.RewriteRule]:
    """The Pad fold (a plain ONNX op on every target)."""
    del target
    return [FoldPadIntoConv.rule()]
