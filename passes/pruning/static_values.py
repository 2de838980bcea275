"""Constants, small shape tensors and value shapes, read from the graph without running it.

A *constant* is an initializer that is not a graph input (a graph input can be overridden at
run time) or the output of a ``Constant`` node. A *static array* is a small integer tensor
computed from constants only, the way exporters build shape tensors: ``Concat``, ``Reshape``,
``Squeeze``, ``Unsqueeze``, ``Cast`` and ``Identity`` of constants.

:class:`ShapeTable` gives each value's dims: its own annotation where it has one, else what
ONNX shape inference finds (run once, on demand, on a serialised copy; the model is not
touched).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.passes.statistics import ONNX_DOMAINS

__all__ = [
    "ONNX_DOMAINS",
    "Dim",
    "constant_array",
    "WeightView",
    "weight_view",
    "static_array",
    "static_length",
    "ShapeTable",
    "dims_product",
    "shape_range",
]


# A dim is a static size, a symbolic dim (the batch, ...) or None when nothing is known.
Dim = int | ir.SymbolicDim | None

# Shape tensors are short; a longer integer tensor is not a shape and is not evaluated here.
_MAX_STATIC_ELEMENTS = 64
_MAX_DEPTH = 8


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant (initializer, not a graph input, or Constant output), else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant":
            return None
        if producer.domain not in ONNX_DOMAINS:
            return None
        return _constant_node_array(producer)
    return tensor.numpy()


class WeightView(NamedTuple):
    """The constant a matrix op's weight input reads, and the Transpose between, if any."""

    value: ir.Value
    perm: tuple[int, ...] | None
    transpose: ir.Node | None

    def array(self) -> np.ndarray:
        """The weight as the op sees it (the constant, transposed by ``perm``)."""
        array = constant_array(self.value)
        assert array is not None
        return array if self.perm is None else array.transpose(self.perm)

    def source_axis(self, axis: int) -> int:
        """The constant's axis that the op's ``axis`` reads."""
        return axis if self.perm is None else self.perm[axis]


def weight_view(value: ir.Value | None) -> WeightView | None:
    """A matrix op's constant weight: the input itself, or a constant under a ``Transpose``.

    The dynamo exporter writes ``MatMul(x, Transpose(W))`` for ``nn.Linear``: the weight is W.
    """
    if value is None:
        return None
    if constant_array(value) is not None:
        return WeightView(value, None, None)
    node = value.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ONNX_DOMAINS:
        return None
    source = node.inputs[0]
    array = constant_array(source)
    if source is None or array is None:
        return None
    attr = node.attributes.get("perm")
    perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(array.ndim)))
    return WeightView(source, perm, node)


def _constant_node_array(node: ir.Node) -> np.ndarray | None:
    for name, attr in node.attributes.items():
        if name == "value" and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
        if name == "value_int":
            return np.array(attr.as_int(), dtype=np.int64)
        if name == "value_ints":
            return np.array(list(attr.as_ints()), dtype=np.int64)
        if name == "value_float":
            return np.array(attr.as_float(), dtype=np.float32)
        if name == "value_floats":
            return np.array(list(attr.as_floats()), dtype=np.float32)
    return None


def _axes(node: ir.Node, inputs: list[np.ndarray | None], rank: int) -> list[int] | None:
    if len(inputs) > 1:
        if inputs[1] is None:
            return None
        axes = inputs[1].reshape(-1).tolist()
    else:
        attr = node.attributes.get("axes")
        axes = list(attr.as_ints()) if attr is not None else []
    return [a + rank if a < 0 else a for a in axes]


def static_array(value: ir.Value | None, *, depth: int = _MAX_DEPTH) -> np.ndarray | None:
    """A small integer tensor computed from constants only, or None."""
    array = constant_array(value)
    if array is not None:
        return array if array.size <= _MAX_STATIC_ELEMENTS else None
    if value is None or depth == 0:
        return None
    node = value.producer()
    if node is None or node.domain not in ONNX_DOMAINS or len(node.outputs) != 1:
        return None
    inputs = [static_array(v, depth=depth - 1) if v is not None else None for v in node.inputs]
    op = node.op_type
    try:
        if op in ("Identity", "Cast"):
            if inputs[0] is None:
                return None
            if op == "Cast":
                to = ir.DataType(node.attributes.get_int("to", 0))
                return inputs[0].astype(to.numpy())
            return inputs[0]
        if op == "Concat":
            if any(a is None for a in inputs):
                return None
            axis = node.attributes.get_int("axis", 0)
            return np.concatenate(inputs, axis=axis)  # type: ignore[arg-type]
        if op == "Reshape":
            if inputs[0] is None or inputs[1] is None:
                return None
            target = inputs[1].reshape(-1).tolist()
            if not node.attributes.get_int("allowzero", 0):
                target = [inputs[0].shape[i] if t == 0 else t for i, t in enumerate(target)]
            return inputs[0].reshape(target)
        if op == "Squeeze":
            if inputs[0] is None:
                return None
            axes = _axes(node, inputs, inputs[0].ndim)
            if axes is None:
                return None
            return np.squeeze(inputs[0], axis=tuple(axes)) if axes else np.squeeze(inputs[0])
        if op == "Unsqueeze":
            if inputs[0] is None:
                return None
            axes = _axes(node, inputs, inputs[0].ndim + max(len(inputs) - 1, 0))
            if axes is None:
                return None
            rank = inputs[0].ndim + len(axes)
            axes = [a + rank if a < 0 else a for a in axes]
            return np.expand_dims(inputs[0], axis=tuple(sorted(axes)))
    except (ValueError, IndexError, TypeError):  # a malformed constant: not ours to diagnose
        return None
    return None


def static_length(value: ir.Value | None, table: ShapeTable) -> int | None:
    """The number of elements of a 1-D shape piece, when it is known before run time."""
    if value is None:
        return None
    array = static_array(value)
    if array is not None:
        return int(array.size)
    node = value.producer()
    if node is not None and node.op_type == "Reshape" and node.domain in ONNX_DOMAINS:
        # exporters write ``Reshape(size, [-1])`` for a dynamic dim: one entry
        target = static_array(node.inputs[1]) if len(node.inputs) > 1 else None
        source = table.dims(node.inputs[0]) if node.inputs[0] is not None else None
        if target is not None and target.size == 1:
            entry = int(target.reshape(-1)[0])
            if entry > 0:
                return entry
            if entry == -1 and source is not None and all(isinstance(d, int) for d in source):
                return math.prod(source)  # type: ignore[arg-type]
    dims = table.dims(value)
    if dims is not None and all(isinstance(d, int) for d in dims):
        return math.prod(dims)  # type: ignore[arg-type]
    return None


def shape_range(node: ir.Node, rank: int) -> tuple[int, int]:
    """The dims ``[start, end)`` a ``Shape`` node reads from an input of rank ``rank``."""
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (min(max(x + rank if x < 0 else x, 0), rank) for x in (start, end))
    return start, end


def dims_product(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]] | None:
    """A product of dims as (static factor, sorted symbolic names); None if a dim is unknown."""
    factor, names = 1, []
    for dim in dims:
        if isinstance(dim, int):
            factor *= dim
        elif isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            names.append(dim.value)
        else:
            return None
    return factor, tuple(sorted(names))


class ShapeTable:
    """Each value's dims: its annotation, else ONNX shape inference's (run once, on demand)."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._inferred: dict[str, tuple[Dim, ...] | None] | None = None

    def _infer(self) -> dict[str, tuple[Dim, ...] | None]:
        proto = ir.to_proto(self._model)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
        except Exception:  # inference is a best effort: unknown shapes stay unknown
            return {}
        table: dict[str, tuple[Dim, ...] | None] = {}
        graph = inferred.graph
        for info in [*graph.value_info, *graph.output, *graph.input]:
            tensor_type = info.type.tensor_type
            if not tensor_type.HasField("shape"):
                continue
            dims: list[Dim] = []
            for dim in tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                elif dim.HasField("dim_param"):
                    dims.append(ir.SymbolicDim(dim.dim_param))
                else:
                    dims.append(None)
            table[info.name] = tuple(dims)
        return table

    def dims(self, value: ir.Value) -> tuple[Dim, ...] | None:
        """The value's dims, or None when even its rank is unknown."""
        if value.shape is not None:
            return tuple(
                d if isinstance(d, int) else (d if d.value is not None else None)
                for d in value.shape.dims
            )
        if value.const_value is not None:
            return tuple(value.const_value.shape.dims)
        if self._inferred is None:
            self._inferred = self._infer()
        return self._inferred.get(value.name or "")

    def rank(self, value: ir.Value) -> int | None:
        """The value's rank, or None when unknown."""
        dims = self.dims(value)
        return None if dims is None else len(dims)
