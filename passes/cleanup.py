"""``cleanup``: remove Identity nodes, duplicate initializers, dead nodes and initializers.

Built on onnx-ir's common passes where they are right, in the order that lets each one expose
work for the next: Identity elimination first (it rewires uses), then initializer
de-duplication (the duplicates it drops become unused), then dead-node and dead-initializer
removal, then unused opset imports. Reaches into If/Loop/Scan bodies.

Identity elimination is our own: onnx-ir's version renames a value to keep a graph output's
name, which loses an output when two outputs copy one value (``y = Identity(a); z =
Identity(a)``) and breaks an If branch whose output is an Identity of an outer-scope value.
Here an Identity whose output is a graph output goes only when its input is made by a node of
the same graph and is not itself a graph output; graph inputs and outputs keep their names.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxforge.passes.base import Pass, PassResult, Semantics
from onnxforge.passes.registry import register

__all__ = ["CleanupPass", "DEFAULT_DEDUPLICATE_SIZE_LIMIT"]

# Initializers with more elements than this are not de-duplicated (onnx-ir's size_limit): the
# hash of a huge tensor costs a full read of it.
DEFAULT_DEDUPLICATE_SIZE_LIMIT = 4 * 1024 * 1024 * 1024


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def _removable_identity(node: ir.Node, graph: ir.Graph) -> bool:
    if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
        return False
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        return False
    source, copy = node.inputs[0], node.outputs[0]
    if not copy.is_graph_output():
        return True
    producer = source.producer()
    return producer is not None and producer.graph is graph and not source.is_graph_output()


def eliminate_identities(graph: ir.Graph) -> int:
    """Remove removable Identity nodes from ``graph`` and its subgraphs; returns the count."""
    count = 0
    for node in list(graph):
        for subgraph in _subgraphs(node):
            count += eliminate_identities(subgraph)
        if not _removable_identity(node, graph):
            continue
        source, copy = node.inputs[0], node.outputs[0]
        if source.type is None:
            source.type = copy.type
        if source.shape is None:
            source.shape = copy.shape
        is_output = copy.is_graph_output()
        ir.convenience.replace_all_uses_with(copy, source, replace_graph_outputs=True)
        if is_output:  # the graph output keeps its name; the copy's old value goes away
            name = copy.name
            copy.name = None
            source.name = name
        graph.remove(node, safe=True)
        count += 1
    return count


def _shape_of_graph(model: ir.Model) -> tuple:
    """Counts that any cleanup step changes when it changes the model (for ``modified``)."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    return (
        len(nodes),
        sum(len(n.inputs) for n in nodes),
        sum(len(n.outputs) for n in nodes),
        len(model.graph.initializers),
        tuple(sorted(model.opset_imports.items())),
    )


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
        before = _shape_of_graph(model)
        modified = eliminate_identities(model.graph) > 0
        for function in model.functions.values():
            modified = eliminate_identities(function) > 0 or modified  # type: ignore[arg-type]
        steps: list[ir.passes.PassBase] = []
        if self.deduplicate:
            steps.append(ir_common.DeduplicateHashedInitializersPass(size_limit=self.size_limit))
        # RemoveUnusedNodesPass also drops unused optional outputs and trailing empty inputs,
        # and reports neither as a change: the structural counts below catch those.
        steps += [ir_common.RemoveUnusedNodesPass(), ir_common.RemoveUnusedOpsetsPass()]
        for step in steps:
            modified = step(model).modified or modified
        return PassResult(model, modified or _shape_of_graph(model) != before)
