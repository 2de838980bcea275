"""``cleanup``: remove Identity nodes, duplicate initializers, dead nodes and initializers.

Built on onnx-ir's common passes, in the order that lets each one expose work for the next:
Identity elimination first (it leaves nothing dead behind, but rewires uses), then initializer
de-duplication (the duplicates it drops become unused), then dead-node and dead-initializer
removal, then unused opset imports. Graph inputs and outputs are never changed. Reaches into
If/Loop/Scan bodies (identity elimination and dead-node removal walk subgraphs).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxforge.passes.base import Pass, PassResult, Semantics
from onnxforge.passes.registry import register

__all__ = ["CleanupPass", "DEFAULT_DEDUPLICATE_SIZE_LIMIT"]

# Initializers up to this many elements are compared by content when de-duplicating; larger
# ones are compared by hash, so de-duplication never holds two large tensors in memory at once.
DEFAULT_DEDUPLICATE_SIZE_LIMIT = 4 * 1024 * 1024 * 1024


@register
class CleanupPass(Pass):
    """Remove Identity nodes, duplicate initializers, dead nodes, dead initializers."""

    name = "cleanup"
    summary = "Remove Identity nodes, duplicate initializers, dead nodes and initializers."
    semantics = Semantics.EXACT

    def __init__(
        self, *, deduplicate: bool = True, size_limit: int = DEFAULT_DEDUPLICATE_SIZE_LIMIT
    ) -> None:
        self.deduplicate = deduplicate
        self.size_limit = size_limit

    def call(self, model: ir.Model) -> PassResult:
        """Run the steps once each; ``modified`` is true when any step changed the model."""
        steps: list[ir.passes.PassBase] = [ir_common.IdentityEliminationPass()]
        if self.deduplicate:
            steps.append(ir_common.DeduplicateHashedInitializersPass(size_limit=self.size_limit))
        steps += [ir_common.RemoveUnusedNodesPass(), ir_common.RemoveUnusedOpsetsPass()]
        modified = False
        for step in steps:
            modified = step(model).modified or modified
        return PassResult(model, modified)
