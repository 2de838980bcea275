"""An example custom pass: ``collapse-relu`` rewrites ``Relu(Relu(x))`` to ``Relu(x)``.

This file is the README's "write your own pass" example and is run by the tests, so it cannot
go stale. It shows the whole contract: a rewrite rule on ``onnxscript.rewriter`` whose check
returns a reason, a pass class with name, summary, semantics and a keyword-only option, and
``@register`` so that pipelines can name it::

    onnxforge optimize in.onnx -o out.onnx -p cleanup,collapse-relu --verify numeric

Relu is idempotent (``max(max(x, 0), 0) = max(x, 0)``), so the rewrite is exact. The rewriter
never fires when the inner Relu's output has another consumer or is a graph output.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxforge.passes import Pass, PassResult, Semantics, register

__all__ = ["CollapseReluPass", "DEFAULT_MAX_ROUNDS"]

# Enough for any chain of Relus that a real exporter produces; each round halves a chain.
DEFAULT_MAX_ROUNDS = 8


class _ReluOfRelu(pattern.RewriteRuleClassBase):
    """``Relu(Relu(x)) -> Relu(x)``."""

    def pattern(self, op, x):
        return op.Relu(op.Relu(x))

    def check(self, context, x, **_):
        result = pattern.MatchResult()
        if x.dtype is not None and not x.dtype.is_floating_point():
            return result.fail(f"input '{x.name}' is {x.dtype}, not a float tensor")
        return result

    def rewrite(self, op, x):
        return op.Relu(x)


@register
class CollapseReluPass(Pass):
    """Collapse chains of Relu into one Relu."""

    name = "collapse-relu"
    summary = "Rewrite Relu(Relu(x)) to Relu(x) (an example custom pass)."
    semantics = Semantics.EXACT

    def __init__(self, *, max_rounds: int = DEFAULT_MAX_ROUNDS) -> None:
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> PassResult:
        """Apply the rule until nothing matches (or ``max_rounds`` rounds)."""
        rules = pattern.RewriteRuleSet([_ReluOfRelu.rule()])
        rewrites = 0
        for _ in range(self.max_rounds):
            count = rules.apply_to_model(model)
            rewrites += count
            if not count:
                break
        return PassResult(model, rewrites > 0)
