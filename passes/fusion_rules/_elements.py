"""What each element of a value is: an abstract evaluation of index, shape and mask arithmetic.

A fusion check that must prove where a value comes from (``attention_mask``: an additive
attention mask from an integer padding mask) reads it through :class:`ElementAnalysis`, which
evaluates the subgraph that computes the value, backwards from it and memoised. Each value is
described by its dims (static sizes, or the names of symbolic dims) and by what each of its
elements is, as a function of its position ``p``:

- :class:`Const` ``(v)``: every element is ``v``;
- :class:`Size` ``(name)``: every element is the run-time size of the symbolic dim ``name``;
- :class:`Iota` ``(axis, offset)``: each element is ``p[axis] + offset`` (``Range(0, n, 1)``,
  moved);
- :class:`Stack` ``(axis, parts)``: element ``p`` is ``parts[p[axis]]`` at ``p`` (shape vectors,
  the pairs of indices that GatherND reads);
- :class:`MaskOf` ``(source, row, col, at_zero, at_one)``: each element is ``f(m[p[row],
  p[col]])`` for the rank-2 integer graph input ``m``, with ``f`` known by its values at ``m =
  0`` and ``m = 1`` (all that a 0/1 mask needs of it; nothing is claimed for other values);
- ``None``: only the dims are known (a float graph input, an op whose values are not tracked).

The ops followed, each with its exact effect on these descriptions, are those exporters build
masks with: element-wise ops (Cast, Add, Sub, Mul, float Div, Neg, Not, And, Or,
Xor, Where, Equal, Greater(OrEqual), Less(OrEqual), Max, Min; on constants and on a
:class:`MaskOf` they are evaluated with numpy, which rounds single float operations as ONNX
Runtime does; a position compared with a constant it always exceeds is a constant); moves that
do not mix elements (Unsqueeze, Squeeze, Transpose, Expand, a Reshape that only adds or drops
unit axes, a Slice that keeps everything, Identity); and index arithmetic: Shape, Concat,
``Range(0, n, 1)``, and GatherND at a grid of positions (``padding_mask[b, k]`` gathered at
every ``(b, h, q, k)``, as HuggingFace's vmap-built masks are). Anything else (an op not
listed, a dim that cannot be proven to broadcast) raises :class:`Unproven` with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxforge.passes.fusion_rules._values import ONNX_DOMAINS, describe, known_dims

__all__ = [
    "ElementAnalysis",
    "Abstract",
    "Unproven",
    "Dim",
    "Const",
    "Size",
    "Iota",
    "Stack",
    "MaskOf",
    "Expr",
]

_INTEGER_TYPES = frozenset(
    {
        ir.DataType.INT8,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.UINT8,
        ir.DataType.UINT16,
        ir.DataType.UINT32,
        ir.DataType.UINT64,
    }
)
# The largest vector (a shape, a pair of indices) whose entries the analysis tracks one by one.
_MAX_STACK = 16
# A Slice end at least this large keeps the whole axis (exporters write INT64_MAX).
_WHOLE_AXIS_END = 2**62

Dim = int | str  # a static size, or the name of a symbolic dim


# ---------------------------------------------------------------------------------------------
# What each element of a value is


@dataclasses.dataclass(frozen=True, eq=False)
class Const:
    """Every element is ``value``."""

    value: np.ndarray  # 0-d


@dataclasses.dataclass(frozen=True)
class Size:
    """Every element is the run-time size of the symbolic dim ``name``."""

    name: str


@dataclasses.dataclass(frozen=True)
class Iota:
    """Each element is its position along ``axis``, plus ``offset``."""

    axis: int
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class Stack:
    """Element ``p`` is ``parts[p[axis]]`` at ``p``."""

    axis: int
    parts: tuple[Expr, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class MaskOf:
    """Each element is ``f(source[p[row], p[col]])``, ``f`` known at 0 and 1."""

    source: ir.Value  # a rank-2 integer graph input
    row: int
    col: int
    at_zero: np.ndarray  # 0-d: f(0)
    at_one: np.ndarray  # 0-d: f(1)


Expr = Const | Size | Iota | Stack | MaskOf


@dataclasses.dataclass(frozen=True)
class Abstract:
    """A value's dims, and what its elements are (None: only the dims are known)."""

    dims: tuple[Dim, ...]
    expr: Expr | None


class Unproven(Exception):
    """The analysis cannot tell what a value is; the message says why."""


def _depends(expr: Expr | None, axis: int) -> bool:
    if isinstance(expr, Iota):
        return expr.axis == axis
    if isinstance(expr, Stack):
        return expr.axis == axis or any(_depends(p, axis) for p in expr.parts)
    if isinstance(expr, MaskOf):
        return axis in (expr.row, expr.col)
    return False


def _moved(expr: Expr | None, where: Callable[[int], int]) -> Expr | None:
    """``expr`` with each axis ``a`` renamed ``where(a)``."""
    if isinstance(expr, Iota):
        return Iota(where(expr.axis), expr.offset)
    if isinstance(expr, Stack):
        return Stack(where(expr.axis), tuple(_moved(p, where) for p in expr.parts))
    if isinstance(expr, MaskOf):
        return dataclasses.replace(expr, row=where(expr.row), col=where(expr.col))
    return expr


def _normalized(expr: Expr | None, dims: Sequence[Dim]) -> Expr | None:
    """``expr`` with the position along unit axes (always 0) substituted."""
    if isinstance(expr, Iota) and dims[expr.axis] == 1:
        return Const(np.array(expr.offset, np.int64))
    if isinstance(expr, Stack):
        if dims[expr.axis] == 1:
            return _normalized(expr.parts[0], dims)
        return Stack(expr.axis, tuple(_normalized(p, dims) for p in expr.parts))
    return expr


def _abstract(dims: Sequence[Dim], expr: Expr | None) -> Abstract:
    dims = tuple(dims)
    return Abstract(dims, _normalized(expr, dims))


def _broadcast_dims(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """ONNX's multidirectional broadcast, where it is provable from the dims."""
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise Unproven(f"dims {' and '.join(map(str, sorted(map(str, dims))))} may differ")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _broadcast(value: Abstract, dims: Sequence[Dim]) -> Expr | None:
    """What ``value``'s elements are once broadcast to ``dims``."""
    shift = len(dims) - len(value.dims)
    for axis, dim in enumerate(value.dims):
        if dim != dims[axis + shift] and (dim != 1 or _depends(value.expr, axis)):
            raise Unproven(f"cannot broadcast dims {value.dims} to {tuple(dims)}")
    return _moved(value.expr, lambda a: a + shift)


# ---------------------------------------------------------------------------------------------
# Element-wise ops


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise Unproven("integer Div rounds differently in numpy")
    return np.true_divide(a, b)


def _where(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(c, a, b)


_ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": _divide,
    "Neg": np.negative,
    "Not": np.logical_not,
    "And": np.logical_and,
    "Or": np.logical_or,
    "Xor": np.logical_xor,
    "Equal": np.equal,
    "Greater": np.greater,
    "GreaterOrEqual": np.greater_equal,
    "Less": np.less,
    "LessOrEqual": np.less_equal,
    "Where": _where,
    "Max": np.maximum,
    "Min": np.minimum,
}


def _evaluate(node: ir.Node, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The op on 0-d arrays, in ONNX's types (an op mixing types is not valid ONNX)."""
    if node.op_type == "Cast":
        try:
            to = ir.DataType(node.attributes.get_int("to", 0)).numpy()
        except (TypeError, ValueError):  # no numpy type (a string, an undefined type)
            raise Unproven(f"Cast '{node.name}' is to a type numpy does not have") from None
        return np.asarray(arrays[0]).astype(to)
    function = _ELEMENTWISE[node.op_type]
    operands = list(arrays)
    if node.op_type != "Where" and len({a.dtype for a in operands}) > 1:
        raise Unproven(f"{node.op_type} '{node.name}' mixes element types")
    with np.errstate(all="ignore"):
        if node.op_type in ("Max", "Min"):
            result = operands[0]
            for operand in operands[1:]:
                result = function(result, operand)
            return np.asarray(result)
        return np.asarray(function(*operands))


def _position_test(op_type: str, exprs: Sequence[Expr | None]) -> Expr | None:
    """Positions (``p[axis] + offset``, at least ``offset``) against a constant, where decided."""
    if len(exprs) != 2:
        return None
    a, b = exprs
    if op_type == "Add":
        for iota, other in ((a, b), (b, a)):
            if isinstance(iota, Iota) and isinstance(other, Const):
                if np.issubdtype(other.value.dtype, np.integer):
                    return Iota(iota.axis, iota.offset + int(other.value))
        return None
    always = None
    if isinstance(a, Iota) and isinstance(b, Const):
        bound = float(b.value)
        always = {"GreaterOrEqual": a.offset >= bound, "Greater": a.offset > bound}.get(op_type)
    elif isinstance(a, Const) and isinstance(b, Iota):
        bound = float(a.value)
        always = {"LessOrEqual": bound <= b.offset, "Less": bound < b.offset}.get(op_type)
    return Const(np.array(True)) if always else None


def _elementwise(node: ir.Node, inputs: Sequence[Abstract]) -> Abstract:
    dims = _broadcast_dims(*(i.dims for i in inputs))
    exprs = [_broadcast(i, dims) for i in inputs]
    if all(isinstance(e, Const) for e in exprs):
        return _abstract(dims, Const(_evaluate(node, [e.value for e in exprs])))
    masks = [e for e in exprs if isinstance(e, MaskOf)]
    if masks and all(isinstance(e, (Const, MaskOf)) for e in exprs):
        first = masks[0]
        if any((m.source, m.row, m.col) != (first.source, first.row, first.col) for m in masks):
            raise Unproven(f"{node.op_type} '{node.name}' combines different mask elements")
        at = {}
        for point in ("at_zero", "at_one"):
            arrays = [e.value if isinstance(e, Const) else getattr(e, point) for e in exprs]
            at[point] = _evaluate(node, arrays)
        return _abstract(dims, dataclasses.replace(first, **at))
    return _abstract(dims, _position_test(node.op_type, exprs))


# ---------------------------------------------------------------------------------------------
# The analysis


def _ints(value: Abstract, what: str) -> list[Dim]:
    """The entries of a scalar or a short 1-D integer value (a shape, axes): ints or sizes."""
    if not value.dims:
        count = 1
    elif len(value.dims) == 1 and isinstance(value.dims[0], int):
        count = value.dims[0]
    else:
        raise Unproven(f"{what} is not a scalar or a vector of known length")
    parts = value.expr.parts if isinstance(value.expr, Stack) else (value.expr,) * count
    entries: list[Dim] = []
    for part in parts:
        if isinstance(part, Const) and np.issubdtype(part.value.dtype, np.integer):
            entries.append(int(part.value))
        elif isinstance(part, Size):
            entries.append(part.name)
        else:
            raise Unproven(f"{what} is not known")
    return entries


def _axes(raw: Sequence[Dim], rank: int, what: str) -> list[int]:
    axes = []
    for axis in raw:
        if not isinstance(axis, int) or not -rank <= axis < rank:
            raise Unproven(f"{what} has an axis {axis} out of range")
        axes.append(axis % rank)
    return axes


def _input_dims(value: ir.Value) -> tuple[Dim, ...]:
    """A graph input's declared dims; an unnamed dim is known only as itself."""
    if value.shape is None:
        raise Unproven(f"the rank of graph input {describe(value)} is not known")
    return tuple(
        d if isinstance(d, int) else (d.value or f"{value.name}[{axis}]")
        for axis, d in enumerate(value.shape)
    )


class ElementAnalysis:
    """Abstract evaluation of the values an additive mask is computed from (memoised)."""

    def __init__(self) -> None:
        self.seen: dict[ir.Value, Abstract] = {}
        self.refused: dict[ir.Value, Unproven] = {}

    def shape(self, value: ir.Value) -> tuple[Dim, ...]:
        """The value's dims: computed where the analysis follows it, else from shape inference.

        Computed dims come first: they name each dim by where it came from (the mask's own),
        where shape inference may have invented a name for a dim it could not follow.
        """
        if value.is_graph_input():  # declared: its values need not be looked at
            return _input_dims(value)
        try:
            return self.evaluate(value).dims
        except Unproven:
            dims = known_dims(value)
            if dims is None:
                raise
            return dims

    def evaluate(self, value: ir.Value | None) -> Abstract:
        """What ``value`` is; raises :class:`Unproven` where the analysis cannot tell."""
        if value is None:
            raise Unproven("an input is absent")
        if value in self.refused:
            raise self.refused[value]
        if value not in self.seen:
            try:
                self.seen[value] = self._evaluate(value)
            except Unproven as refusal:
                self.refused[value] = refusal
                raise
        return self.seen[value]

    def _evaluate(self, value: ir.Value) -> Abstract:
        if value.is_graph_input():
            return self._graph_input(value)
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is not None:
            return self._constant(value, tensor.numpy())
        node = value.producer()
        if node is None:
            raise Unproven(f"{describe(value)} comes from an outer scope")
        if node.domain not in ONNX_DOMAINS or len(node.outputs) != 1:
            raise Unproven(f"{describe(value)} is computed by {node.op_type} '{node.name}'")
        if node.op_type in _ELEMENTWISE or node.op_type == "Cast":
            return _elementwise(node, [self.evaluate(i) for i in node.inputs])
        handler = {
            "Identity": self._identity,
            "Unsqueeze": self._unsqueeze,
            "Squeeze": self._squeeze,
            "Transpose": self._transpose,
            "Reshape": self._reshape,
            "Slice": self._slice,
            "Expand": self._expand,
            "Shape": self._shape,
            "Concat": self._concat,
            "Range": self._range,
            "GatherND": self._gather_nd,
        }.get(node.op_type)
        if handler is None:
            raise Unproven(
                f"{describe(value)} is computed by {node.op_type} '{node.name}', which the "
                "mask analysis does not follow"
            )
        return handler(node)

    def _graph_input(self, value: ir.Value) -> Abstract:
        dims = _input_dims(value)
        if value.dtype not in _INTEGER_TYPES or len(dims) != 2:
            return _abstract(dims, None)
        dtype = value.dtype.numpy()
        return _abstract(dims, MaskOf(value, 0, 1, np.array(0, dtype), np.array(1, dtype)))

    def _constant(self, value: ir.Value, array: np.ndarray) -> Abstract:
        dims = array.shape
        flat = array.reshape(-1)
        if flat.size and np.all(flat == flat[0]):
            return _abstract(dims, Const(np.asarray(flat[0])))
        if array.ndim == 1 and array.size <= _MAX_STACK:
            return _abstract(dims, Stack(0, tuple(Const(np.asarray(v)) for v in flat)))
        raise Unproven(f"constant {describe(value)} is not a scalar or a short vector")

    def _constant_input(self, node: ir.Node, index: int, what: str) -> list[Dim]:
        if len(node.inputs) <= index or node.inputs[index] is None:
            return []
        return _ints(self.evaluate(node.inputs[index]), f"{what} of '{node.name}'")

    # moves

    def _identity(self, node: ir.Node) -> Abstract:
        return self.evaluate(node.inputs[0])

    def _unsqueeze(self, node: ir.Node) -> Abstract:
        x = self.evaluate(node.inputs[0])
        raw = self._constant_input(node, 1, "axes") or list(node.attributes.get_ints("axes", []))
        rank = len(x.dims) + len(raw)
        axes = sorted(_axes(raw, rank, f"Unsqueeze '{node.name}'"))
        kept = [a for a in range(rank) if a not in axes]  # kept[i]: where old axis i goes
        dims: list[Dim] = [1] * rank
        for old, new in enumerate(kept):
            dims[new] = x.dims[old]
        return _abstract(dims, _moved(x.expr, lambda a: kept[a]))

    def _squeeze(self, node: ir.Node) -> Abstract:
        x = self.evaluate(node.inputs[0])
        raw = self._constant_input(node, 1, "axes") or list(node.attributes.get_ints("axes", []))
        if raw:
            axes = _axes(raw, len(x.dims), f"Squeeze '{node.name}'")
        elif all(isinstance(d, int) for d in x.dims):
            axes = [a for a, d in enumerate(x.dims) if d == 1]
        else:
            raise Unproven(f"Squeeze '{node.name}' drops the dims that are 1 at run time")
        if any(x.dims[a] != 1 for a in axes):
            raise Unproven(f"Squeeze '{node.name}' drops a dim that is not 1")
        kept = [a for a in range(len(x.dims)) if a not in axes]
        new_axis = {old: new for new, old in enumerate(kept)}
        return _abstract([x.dims[a] for a in kept], _moved(x.expr, lambda a: new_axis[a]))

    def _transpose(self, node: ir.Node) -> Abstract:
        x = self.evaluate(node.inputs[0])
        rank = len(x.dims)
        perm = list(node.attributes.get_ints("perm", list(reversed(range(rank)))))
        new_axis = {old: new for new, old in enumerate(perm)}
        return _abstract([x.dims[a] for a in perm], _moved(x.expr, lambda a: new_axis[a]))

    def _reshape(self, node: ir.Node) -> Abstract:
        x = self.evaluate(node.inputs[0])
        target = _ints(self.evaluate(node.inputs[1]), f"the shape of Reshape '{node.name}'")
        if not node.attributes.get_int("allowzero", 0):
            target = [x.dims[i] if t == 0 and i < len(x.dims) else t for i, t in enumerate(target)]
        # only unit axes added or dropped: x's other dims, in order, with at most one -1 for one
        old = [a for a, d in enumerate(x.dims) if d != 1]
        new = [a for a, t in enumerate(target) if t != 1]
        if len(old) != len(new) or sum(target[a] == -1 for a in new) > 1:
            raise Unproven(f"Reshape '{node.name}' does more than add or drop unit axes")
        dims: list[Dim] = [1] * len(target)
        for o, n in zip(old, new, strict=True):
            if target[n] not in (-1, x.dims[o]):
                raise Unproven(f"Reshape '{node.name}' does more than add or drop unit axes")
            dims[n] = x.dims[o]
        new_axis = dict(zip(old, new, strict=True))
        return _abstract(dims, _moved(x.expr, lambda a: new_axis[a]))

    def _slice(self, node: ir.Node) -> Abstract:
        x = self.evaluate(node.inputs[0])
        starts = self._constant_input(node, 1, "starts")
        ends = self._constant_input(node, 2, "ends")
        axes = self._constant_input(node, 3, "axes") or list(range(len(starts)))
        steps = self._constant_input(node, 4, "steps") or [1] * len(starts)
        axes = _axes(axes, len(x.dims), f"Slice '{node.name}'")
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise Unproven(f"the arguments of Slice '{node.name}' differ in length")
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            whole_end = isinstance(end, int) and (end >= _WHOLE_AXIS_END or end == x.dims[axis])
            if start != 0 or step != 1 or not whole_end:
                raise Unproven(f"Slice '{node.name}' does not keep the whole of axis {axis}")
        return x

    def _expand(self, node: ir.Node) -> Abstract:
        x = self.evaluate(node.inputs[0])
        target = _ints(self.evaluate(node.inputs[1]), f"the shape of Expand '{node.name}'")
        dims = _broadcast_dims(x.dims, target)
        return _abstract(dims, _broadcast(x, dims))

    # index and shape arithmetic

    def _shape(self, node: ir.Node) -> Abstract:
        dims = self.shape(node.inputs[0])
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(dims))
        chosen = dims[slice(start, end)]
        parts = tuple(
            Size(d) if isinstance(d, str) else Const(np.array(d, np.int64)) for d in chosen
        )
        return _abstract([len(parts)], Stack(0, parts) if parts else None)

    def _concat(self, node: ir.Node) -> Abstract:
        inputs = [self.evaluate(i) for i in node.inputs]
        rank = len(inputs[0].dims)
        (axis,) = _axes([node.attributes.get_int("axis", 0)], rank, f"Concat '{node.name}'")
        parts: list[Expr | None] = []
        for x in inputs:
            size = x.dims[axis] if len(x.dims) == rank else None
            if not isinstance(size, int):
                raise Unproven(f"an input of Concat '{node.name}' has no static size on its axis")
            if isinstance(x.expr, Stack) and x.expr.axis == axis:
                parts.extend(x.expr.parts)
            elif _depends(x.expr, axis):
                raise Unproven(f"an input of Concat '{node.name}' varies along its axis")
            else:
                parts.extend([x.expr] * size)
            others = [d for a, d in enumerate(x.dims) if a != axis]
            if others != [d for a, d in enumerate(inputs[0].dims) if a != axis]:
                raise Unproven(f"the inputs of Concat '{node.name}' differ in their other dims")
        if len(parts) > _MAX_STACK or any(p is None for p in parts):
            raise Unproven(f"Concat '{node.name}' is not a short vector of known entries")
        dims = list(inputs[0].dims)
        dims[axis] = len(parts)
        return _abstract(dims, Stack(axis, tuple(parts)))

    def _range(self, node: ir.Node) -> Abstract:
        inputs = [self.evaluate(i) for i in node.inputs]
        if any(x.dims for x in inputs):
            raise Unproven(f"an input of Range '{node.name}' is not a scalar")
        start, limit, delta = (_ints(x, f"Range '{node.name}'") for x in inputs)
        if start != [0] or delta != [1]:
            raise Unproven(f"Range '{node.name}' does not count from 0 in steps of 1")
        return _abstract([limit[0]], Iota(0))

    def _gather_nd(self, node: ir.Node) -> Abstract:
        data, indices = (self.evaluate(i) for i in node.inputs)
        grid = indices.expr
        if node.attributes.get_int("batch_dims", 0) != 0 or not isinstance(grid, Stack):
            raise Unproven(f"GatherND '{node.name}' does not read at a grid of positions")
        last = len(indices.dims) - 1
        if grid.axis != last or len(grid.parts) != len(data.dims):
            raise Unproven(f"GatherND '{node.name}' does not read single elements")
        source_axis: dict[int, int] = {}  # data's axis -> the index grid's axis that runs over it
        for data_axis, part in enumerate(grid.parts):
            # p[axis] runs over [0, dims[axis]): in bounds when that is data's dim
            if not (isinstance(part, Iota) and part.offset == 0):
                raise Unproven(f"GatherND '{node.name}' does not read at a grid of positions")
            if indices.dims[part.axis] != data.dims[data_axis]:
                raise Unproven(f"GatherND '{node.name}' reads a grid of another size")
            source_axis[data_axis] = part.axis
        if isinstance(data.expr, Stack):
            raise Unproven(f"GatherND '{node.name}' reads a stacked value")
        return _abstract(indices.dims[:last], _moved(data.expr, lambda a: source_axis[a]))
