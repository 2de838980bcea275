"""Multiply-accumulate counts of the matrix ops: Conv, ConvTranspose, Gemm, MatMul.

Counts come from static shapes; a symbolic dim (the batch, a sequence length) counts as 1,
so the figure is per sample for a batch-symbolic model. A node whose shapes are unknown is
left out and named in ``uncounted``. Per node:

- Conv: ``prod(output dims) * (C_in / group) * prod(kernel)``, i.e. output elements times
  the weight's ``shape[1:]``;
- ConvTranspose: ``prod(input dims) * (C_out / group) * prod(kernel)``, i.e. input elements
  times the weight's ``shape[1:]``;
- Gemm: ``M * K * N``;
- MatMul: ``prod(output dims) * K``.

ONNX Runtime's FusedConv, FusedGemm and FusedMatMul (``com.microsoft``) count as the op they
fuse, so that figures before and after ``fuse`` compare.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from onnxforge.passes.pruning.static_values import ONNX_DOMAINS, Dim, ShapeTable

__all__ = ["MacCount", "count_macs", "MATRIX_OPS"]

MATRIX_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# ONNX Runtime's fused forms (what ``fuse`` writes) count like the op they fuse.
FUSED_OPS = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul"}
MICROSOFT_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class MacCount:
    """Total multiply-accumulates, per node, and the matrix nodes whose shapes are unknown."""

    total: int
    by_node: dict[str, int]
    uncounted: tuple[str, ...]


def _size(dims: tuple[Dim, ...] | None) -> int | None:
    """Elements, symbolic dims counted as 1; None when a dim or the rank is unknown."""
    if dims is None or any(d is None for d in dims):
        return None
    return math.prod(d if isinstance(d, int) else 1 for d in dims)


def _node_macs(node: ir.Node, op: str, table: ShapeTable) -> int | None:
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    inputs = [table.dims(node.inputs[0]), table.dims(node.inputs[1])]  # never the bias
    output = table.dims(node.outputs[0])
    weight = inputs[1]
    if weight is None:
        return None
    if op == "Conv":
        per_output = _size(weight[1:])
        count = _size(output)
        return None if per_output is None or count is None else count * per_output
    if op == "ConvTranspose":
        per_input = _size(weight[1:])
        count = _size(inputs[0])
        return None if per_input is None or count is None else count * per_input
    if op == "Gemm":
        a = inputs[0]
        if a is None or len(a) != 2:
            return None
        k = a[0] if node.attributes.get_int("transA", 0) else a[1]
        count = _size(output)
        if count is None or k is None:
            return None
        return count * (k if isinstance(k, int) else 1)
    if op == "MatMul":
        a = inputs[0]
        if a is None or not a:
            return None
        k = a[-1]
        count = _size(output)
        if count is None or k is None:
            return None
        return count * (k if isinstance(k, int) else 1)
    return None


def count_macs(model: ir.Model, table: ShapeTable | None = None) -> MacCount:
    """Multiply-accumulates of the main graph's matrix ops (symbolic dims count as 1)."""
    table = table if table is not None else ShapeTable(model)
    by_node: dict[str, int] = {}
    uncounted: list[str] = []
    for index, node in enumerate(model.graph):
        if node.domain in ONNX_DOMAINS and node.op_type in MATRIX_OPS:
            op = node.op_type
        elif node.domain == MICROSOFT_DOMAIN and node.op_type in FUSED_OPS:
            op = FUSED_OPS[node.op_type]
        else:
            continue
        name = node.name or f"{node.op_type}#{index}"
        macs = _node_macs(node, op, table)
        if macs is None:
            uncounted.append(name)
        else:
            by_node[name] = macs
    return MacCount(sum(by_node.values()), by_node, tuple(uncounted))
