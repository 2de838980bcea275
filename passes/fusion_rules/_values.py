"""Reading what the fusion checks need from IR values: constants, static shapes, dtypes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxforge.passes.statistics import ONNX_DOMAINS

__all__ = [
    "ONNX_DOMAINS",
    "FLOAT_TYPES",
    "constant_array",
    "known_dims",
    "same_dims",
    "describe",
    "unique_initializer_name",
    "new_initializer",
    "constant_float32",
    "only_reader",
    "value_names",
    "unique_value_name",
]

# The float types that the fused ops take.
FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def describe(value: ir.Value | None) -> str:
    """A value's name for a check's failure reason."""
    if value is None:
        return "<absent input>"
    return f"'{value.name}'" if value.name else "<unnamed value>"


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's contents when it is a constant (initializer or Constant output), else None.

    An initializer that is also a graph input can be overridden at run time: not a constant.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def constant_float32(value: ir.Value | None, rank: int) -> ir.TensorProtocol | None:
    """The value's tensor when it is a float32 constant of ``rank`` dims, else None.

    An initializer that is also a graph input can be overridden at run time: not a constant.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    return tensor if tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == rank else None


def only_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value``, when nothing else does (a graph output counts)."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def known_dims(value: ir.Value | None) -> tuple[int | str, ...] | None:
    """The value's dims (ints, or names of symbolic dims), or None when any is unknown."""
    if value is None or value.shape is None:
        return None
    dims: list[int | str] = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif dim.value is not None:
            dims.append(dim.value)
        else:
            return None
    return tuple(dims)


def same_dims(a: ir.Value | None, b: ir.Value | None) -> bool:
    """Both shapes are fully known and equal (symbolic dims by name)."""
    dims_a, dims_b = known_dims(a), known_dims(b)
    return dims_a is not None and dims_a == dims_b


def unique_initializer_name(graph: ir.Graph | ir.Function, base: str) -> str:
    """A name that no initializer of ``graph`` uses yet, made from ``base``."""
    existing = graph.initializers if isinstance(graph, ir.Graph) else {}
    name, index = base, 0
    while name in existing:
        index += 1
        name = f"{base}_{index}"
    return name


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a typed, shaped initializer under a new name made from ``base``."""
    name = unique_initializer_name(graph, base)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def value_names(graph: ir.Graph) -> set[str]:
    """Every value name the graph uses: inputs, initializers and node outputs."""
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    return names | {v.name for node in graph for v in node.outputs if v.name}


def unique_value_name(graph: ir.Graph, base: str, taken: set[str]) -> str:
    """A value name made from ``base`` that neither ``taken`` nor an initializer holds.

    ``base``, else ``base_1``, ``base_2``, ...; the name is added to ``taken``.
    """
    name, index = base, 0
    while name in taken or name in graph.initializers:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name
