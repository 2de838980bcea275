"""Size figures of a model, read from shapes and dtypes without materialising any tensor."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

__all__ = [
    "ModelStats",
    "model_stats",
    "iter_graphs",
    "node_subgraphs",
    "has_subgraphs",
    "ONNX_DOMAINS",
    "inferred_copy_values",
]

# The default ONNX operator set's domain, as written in models ("" or its long name).
ONNX_DOMAINS = ("", "ai.onnx")


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """Node count (subgraphs included), op histogram, parameter count and parameter bytes."""

    nodes: int
    ops: dict[str, int]
    parameters: int
    parameter_bytes: int


def iter_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, then every If/Loop/Scan body reachable from it."""
    yield model.graph
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield from node_subgraphs(node)


def node_subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The If/Loop/Scan bodies held by ``node``'s attributes (not their nested bodies)."""
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def has_subgraphs(node: ir.Node) -> bool:
    """Whether ``node`` holds a body graph (If, Loop, Scan, ...)."""
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for attr in node.attributes.values()
    )


def inferred_copy_values(model: ir.Model) -> dict[str, ir.Value]:
    """The main graph's values by name, in a shape-inferred copy of ``model``.

    Types and shapes that ``model`` lacks, read without annotating ``model`` itself.
    """
    copy = model.clone()
    ir_common.ShapeInferencePass(strict_mode=False)(copy)
    graph = copy.graph
    values = [*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]
    return {v.name: v for v in values if v.name is not None}


def _op_key(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ONNX_DOMAINS else node.op_type


def _tensor_size(tensor: ir.TensorProtocol) -> tuple[int, int]:
    return int(tensor.size), int(tensor.nbytes)  # both from shape and dtype: nothing is loaded


def model_stats(model: ir.Model) -> ModelStats:
    """Count nodes and parameters: initializers plus the tensors held by Constant nodes."""
    ops: collections.Counter[str] = collections.Counter()
    parameters = parameter_bytes = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[_op_key(node)] += 1
        if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
            value = node.attributes.get("value")
            if value is not None and value.type == ir.AttributeType.TENSOR:
                count, size = _tensor_size(value.as_tensor())
                parameters += count
                parameter_bytes += size
    for graph in iter_graphs(model):
        for initializer in graph.initializers.values():
            tensor = initializer.const_value
            if tensor is None:  # an initializer whose data is not attached: count the declared type
                continue
            count, size = _tensor_size(tensor)
            parameters += count
            parameter_bytes += size
    return ModelStats(
        nodes=sum(ops.values()),
        ops=dict(sorted(ops.items())),
        parameters=parameters,
        parameter_bytes=parameter_bytes,
    )
