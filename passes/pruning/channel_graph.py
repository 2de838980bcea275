"""Channel dependencies: which output channels are tied together, and what removing one touches.

One forward walk over the main graph, in topological order, gives every value that carries
output channels of a prunable layer a :class:`Layout`: the axis the channels run along, the
*spaces* (sets of channels, one per prunable layer) laid end to end on it, and a *block*: each
channel covers ``block`` consecutive elements of the axis (``Flatten`` of ``[N, C, H, W]`` to
``[N, C*H*W]`` gives block ``H*W``). Rules, by op:

- **sources** (Conv with ``group=1``, ConvTranspose with ``group=1``, Gemm, MatMul with a
  constant 2-D weight): a fresh space of ``C_out`` channels; the weight's output axis and the
  bias are sliced. A source that reads a layout also slices the weight's input axis;
- **pass-through**: element-wise unary ops (Relu, Clip, Sigmoid, Cast, Identity, ...), pools
  (MaxPool, AveragePool, GlobalAveragePool, ...), BatchNormalization and InstanceNormalization
  (their per-channel parameters are sliced), Dropout, Transpose, Squeeze, Unsqueeze, Slice,
  Split, Pad, reductions, Softmax, ArgMax, LayerNormalization, as long as they do not act
  *across* the channel axis;
- **depthwise Conv** (``group == C_in``, one input channel per group): channels pass through
  (a multiplier ``k`` makes the block ``k``); the weight and bias are sliced and ``group``
  shrinks. Other grouped convolutions are left alone;
- **broadcasting ops** (Add, Mul, Sub, Div, Where, Max, ..., PRelu): every input that carries
  channels must carry the *same* channels, so their spaces are merged into one group (a
  residual Add ties the block's last layer to the shortcut); a constant operand with the
  full channel dim is sliced, one with dim 1 broadcasts;
- **Concat** along the channel axis lays the inputs' spaces end to end (offsets); a free input
  keeps its channels (a fixed segment);
- **Flatten and Reshape** that merge the channel axis with the dims after it (or split them
  back) change the block; a Reshape's constant target shape is rewritten where it names the
  channel axis's size (directly, or as a constant piece of a ``Concat`` of shape pieces);
- anything else that reads channels (an op not listed, a Reshape the walk cannot follow, a
  Shape that sees the channel count, a use inside a subgraph, a graph output) makes the
  channels' group **unresolvable**: the group is left alone and the reason reported.

Spaces merge in a union-find; a group is one class of it. The walk only records edits: the
rewrite (:mod:`.channel_rewrite`) applies them once the kept channels are chosen.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxforge.passes.pruning.sparsify import layer_name
from onnxforge.passes.pruning.static_values import (
    ONNX_DOMAINS,
    Dim,
    ShapeTable,
    constant_array,
    dims_product,
    static_array,
    static_length,
)

__all__ = [
    "Segment",
    "Layout",
    "Source",
    "SliceEdit",
    "ShapeEntryEdit",
    "GroupEdit",
    "ChannelPlan",
    "analyse_channels",
]

# Element-wise ops of one data input (input 0): the output has the input's channels.
UNARY_OPS = frozenset(
    {
        "Abs", "Cast", "Ceil", "Celu", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu",
        "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish",
        "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin",
        "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
# Ops over the spatial dims of an NCHW tensor: channels (axis 1) pass through.
POOL_OPS = frozenset(
    {"AveragePool", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "LpPool", "MaxPool"}
)
# Multidirectional (and PRelu's unidirectional) broadcasting ops.
BROADCAST_OPS = frozenset(
    {
        "Add", "And", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
        "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow",
        "PRelu", "Sub", "Sum", "Where", "Xor",
    }
)  # fmt: skip
REDUCE_OPS = frozenset(
    {
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Segment:
    """``size`` channels of one space (``None``: channels that are never pruned)."""

    space: int | None
    size: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a value's prunable channels lie: axis, spaces end to end, elements per channel."""

    axis: int
    segments: tuple[Segment, ...]
    block: int = 1

    @property
    def channels(self) -> int:
        """Channels along the axis."""
        return sum(segment.size for segment in self.segments)

    @property
    def extent(self) -> int:
        """Elements along the axis: channels times block."""
        return self.channels * self.block

    def at(self, axis: int) -> Layout:
        """The same channels on another axis (a transposed or broadcast operand)."""
        return dataclasses.replace(self, axis=axis)

    def spaces(self) -> list[int]:
        """The spaces of the segments that may be pruned."""
        return [segment.space for segment in self.segments if segment.space is not None]


@dataclasses.dataclass(frozen=True)
class Source:
    """A layer whose output channels form a space: its weight, and the weight's output axis."""

    node: ir.Node
    layer: str
    weight: ir.Value
    axis: int
    space: int


@dataclasses.dataclass(frozen=True)
class SliceEdit:
    """Keep only the layout's kept elements of input ``index`` of ``node`` along ``axis``."""

    node: ir.Node
    index: int
    axis: int
    layout: Layout


@dataclasses.dataclass(frozen=True)
class ShapeEntryEdit:
    """Entry ``position`` of the constant shape piece in input ``index`` of ``node``.

    It becomes the layout's kept extent (a Reshape's target size on the channel axis).
    """

    node: ir.Node
    index: int
    piece: np.ndarray
    position: int
    layout: Layout


@dataclasses.dataclass(frozen=True)
class GroupEdit:
    """A depthwise Conv's ``group``: it becomes the kept extent of its input layout."""

    node: ir.Node
    layout: Layout


@dataclasses.dataclass
class ChannelPlan:
    """The walk's findings: sources, edits, layouts, the union-find of spaces and the reasons."""

    sources: list[Source] = dataclasses.field(default_factory=list)
    slices: list[SliceEdit] = dataclasses.field(default_factory=list)
    shape_entries: list[ShapeEntryEdit] = dataclasses.field(default_factory=list)
    group_edits: list[GroupEdit] = dataclasses.field(default_factory=list)
    layouts: dict[ir.Value, Layout] = dataclasses.field(default_factory=dict)
    parent: list[int] = dataclasses.field(default_factory=list)
    sizes: list[int] = dataclasses.field(default_factory=list)
    reasons: dict[int, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def new_space(self, size: int) -> int:
        """A fresh space of ``size`` channels."""
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        """The group (root space) of a space."""
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        """Tie two spaces of equal size into one group."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def groups(self) -> dict[int, list[Source]]:
        """The sources of each group, by root space, in graph order."""
        groups: dict[int, list[Source]] = {}
        for source in self.sources:
            groups.setdefault(self.find(source.space), []).append(source)
        return groups

    def group_reasons(self) -> dict[int, list[str]]:
        """Why each unresolvable group must be left alone (reasons in order, no repeats)."""
        merged: dict[int, list[str]] = {}
        for space, reasons in self.reasons.items():
            bucket = merged.setdefault(self.find(space), [])
            bucket.extend(r for r in reasons if r not in bucket)
        return merged


class _Walk:
    """The forward walk that fills a ChannelPlan (see the module docstring)."""

    def __init__(self, model: ir.Model, table: ShapeTable) -> None:
        self.model = model
        self.graph = model.graph
        self.table = table
        self.plan = ChannelPlan()
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))

    # -- bookkeeping -------------------------------------------------------------------------

    def fail(self, layouts: Iterable[Layout | None], reason: str) -> None:
        for layout in layouts:
            if layout is None:
                continue
            for space in layout.spaces():
                self.plan.reasons[space].append(reason)

    def set(self, value: ir.Value | None, layout: Layout) -> None:
        if value is None:
            return
        self.plan.layouts[value] = layout
        for use in value.uses():
            if use.node.graph is not self.graph:
                self.fail([layout], f"'{value.name}' is read inside a subgraph")

    def unify(self, a: Layout, b: Layout) -> bool:
        """Tie two layouts' spaces together; False when their structure differs."""
        if a.block != b.block or [s.size for s in a.segments] != [s.size for s in b.segments]:
            return False
        pairs = list(zip(a.segments, b.segments, strict=True))
        if any((x.space is None) != (y.space is None) for x, y in pairs):
            return False
        for x, y in pairs:
            if x.space is not None and y.space is not None:
                self.plan.union(x.space, y.space)
        return True

    def dims(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        return None if value is None else self.table.dims(value)

    def source(self, node: ir.Node, name: str, weight: ir.Value, axis: int) -> Layout:
        """Make the node a source: a fresh space of the weight's ``axis`` channels."""
        array = constant_array(weight)
        assert array is not None
        size = int(array.shape[axis])
        space = self.plan.new_space(size)
        self.plan.sources.append(Source(node, name, weight, axis, space))
        return Layout(0, (Segment(space, size),))

    # -- the walk ----------------------------------------------------------------------------

    def run(self) -> ChannelPlan:
        for index, node in enumerate(self.graph):
            self.visit(node, layer_name(node, index))
        for value in self.graph.outputs:
            layout = self.plan.layouts.get(value)
            if layout is not None:
                self.fail([layout], f"graph output '{value.name}' would change shape")
        return self.plan

    def visit(self, node: ir.Node, name: str) -> None:
        layouts = [self.plan.layouts.get(v) if v is not None else None for v in node.inputs]
        op = node.op_type
        if node.domain not in ONNX_DOMAINS:
            self.fail(layouts, f"read by '{name}' ({node.domain}::{op}), an op outside ONNX")
            return
        handler = _SOURCE_HANDLERS.get(op)
        if handler is not None:
            handler(self, node, name, layouts)
            return
        if not any(layouts):
            return
        handler = _HANDLERS.get(op)
        if handler is None:
            if op in UNARY_OPS:
                handler = _Walk.unary
            elif op in POOL_OPS:
                handler = _Walk.pool
            elif op in BROADCAST_OPS:
                handler = _Walk.broadcast
            elif op in REDUCE_OPS:
                handler = _Walk.reduce
        if handler is None:
            self.fail(layouts, f"read by '{name}' ({op}), an op the pass cannot follow")
            return
        handler(self, node, name, layouts)

    def only_first(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> Layout | None:
        """Input 0's layout, when no other input carries channels."""
        if layouts[0] is None or any(layouts[1:]):
            self.fail(layouts, f"'{name}' ({node.op_type}) reads channels through a parameter")
            return None
        return layouts[0]

    # -- sources -----------------------------------------------------------------------------

    def conv(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        transpose = node.op_type == "ConvTranspose"
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        array = constant_array(weight)
        group = node.attributes.get_int("group", 1)
        layout = layouts[0]
        if any(layouts[1:]):
            self.fail(layouts, f"'{name}' ({node.op_type}) computes its weight from channels")
            return
        if array is None or array.ndim < 3 or not np.issubdtype(array.dtype, np.floating):
            self.fail([layout], f"'{name}' ({node.op_type}) has no constant float weight")
            return
        assert weight is not None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if layout is not None and layout.axis != 1:
            self.fail([layout], f"'{name}' ({node.op_type}) reads channels on axis {layout.axis}")
            layout = None
        if group != 1:
            if not transpose and layout is not None and self._depthwise(node, layout, array):
                multiplier = array.shape[0] // group
                out = Layout(1, layout.segments, layout.block * multiplier)
                self.plan.slices.append(SliceEdit(node, 1, 0, out.at(0)))
                if bias is not None:
                    self.plan.slices.append(SliceEdit(node, 2, 0, out.at(0)))
                self.plan.group_edits.append(GroupEdit(node, layout))
                self.set(node.outputs[0], out)
                return
            self.fail([layout], f"'{name}' is a grouped convolution (group={group})")
            return
        in_axis, out_axis = (0, 1) if transpose else (1, 0)
        if layout is not None:
            self.plan.slices.append(SliceEdit(node, 1, in_axis, layout.at(in_axis)))
        out = self.source(node, name, weight, out_axis)
        self.plan.slices.append(SliceEdit(node, 1, out_axis, out.at(out_axis)))
        if bias is not None:
            self.plan.slices.append(SliceEdit(node, 2, 0, out.at(0)))
        self.set(node.outputs[0], out.at(1))

    def _depthwise(self, node: ir.Node, layout: Layout, weight: np.ndarray) -> bool:
        group = node.attributes.get_int("group", 1)
        return group == layout.extent and weight.shape[1] == 1 and weight.shape[0] % group == 0

    def gemm(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        weight = node.inputs[1]
        array = constant_array(weight)
        layout = layouts[0]
        if any(layouts[1:]):
            self.fail(layouts, f"'{name}' (Gemm) reads channels through B or C")
            return
        if array is None or array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            self.fail([layout], f"'{name}' (Gemm) has no constant float weight")
            return
        assert weight is not None
        trans_a = node.attributes.get_int("transA", 0)
        trans_b = node.attributes.get_int("transB", 0)
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        if layout is not None:
            if layout.axis != (0 if trans_a else 1):
                self.fail([layout], f"'{name}' (Gemm) reads channels on its M axis")
            else:
                self.plan.slices.append(SliceEdit(node, 1, k_axis, layout.at(k_axis)))
        out = self.source(node, name, weight, n_axis)
        self.plan.slices.append(SliceEdit(node, 1, n_axis, out.at(n_axis)))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        bias_dims = self.dims(bias)
        if bias is not None:
            if bias_dims is None:
                self.fail([out], f"'{name}' (Gemm): the shape of C is unknown")
            elif bias_dims and bias_dims[-1] != 1:
                axis = len(bias_dims) - 1
                self.plan.slices.append(SliceEdit(node, 2, axis, out.at(axis)))
        self.set(node.outputs[0], out.at(1))

    def matmul(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        weight = node.inputs[1]
        array = constant_array(weight)
        layout = layouts[0]
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if (
            layouts[1] is not None
            or array is None
            or array.ndim != 2
            or not np.issubdtype(array.dtype, np.floating)
            or rank is None
        ):
            if any(layouts):
                self.fail(layouts, f"'{name}' (MatMul) has no constant 2-D float weight")
            return
        assert weight is not None
        if layout is not None:
            if layout.axis != rank - 1:
                self.fail([layout], f"'{name}' (MatMul) reads channels off its K axis")
            else:
                self.plan.slices.append(SliceEdit(node, 1, 0, layout.at(0)))
        out = self.source(node, name, weight, 1)
        self.plan.slices.append(SliceEdit(node, 1, 1, out.at(1)))
        self.set(node.outputs[0], out.at(max(rank, 2) - 1 if rank >= 2 else 0))

    # -- pass-through ------------------------------------------------------------------------

    def unary(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        if layout is not None:
            for output in node.outputs:
                self.set(output, layout)

    def dropout(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        self.unary(node, name, layouts)

    def cast_like(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        if layouts[0] is not None:  # input 1 gives only its element type
            self.set(node.outputs[0], layouts[0])

    def pool(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        if layout is None:
            return
        if layout.axis != 1:
            self.fail([layout], f"'{name}' ({node.op_type}) pools over the channel axis")
            return
        if len(node.outputs) > 1 and node.outputs[1].uses():
            self.fail([layout], f"'{name}' (MaxPool): its indices count channels")
            return
        self.set(node.outputs[0], layout)

    def normalization(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        if layout is None:
            return
        if layout.axis != 1:
            self.fail([layout], f"'{name}' ({node.op_type}) normalises another axis")
            return
        if any(output.uses() or output.is_graph_output() for output in node.outputs[1:]):
            self.fail([layout], f"'{name}' ({node.op_type}) is in training mode")
            return
        for index in range(1, len(node.inputs)):
            if node.inputs[index] is not None:
                self.plan.slices.append(SliceEdit(node, index, 0, layout.at(0)))
        self.set(node.outputs[0], layout)

    def layer_norm(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (LayerNormalization): rank unknown")
            return
        axis = node.attributes.get_int("axis", -1)
        axis = axis + rank if axis < 0 else axis
        if layout.axis >= axis:
            self.fail([layout], f"'{name}' (LayerNormalization) normalises over the channels")
            return
        for output in node.outputs:
            self.set(output, layout)

    def broadcast(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        op = node.op_type
        ranks = [self.table.rank(v) if v is not None else 0 for v in node.inputs]
        if any(r is None for r in ranks):
            self.fail(layouts, f"'{name}' ({op}): the rank of an input is unknown")
            return
        out_rank = max(r for r in ranks if r is not None)
        carried = [(i, layout) for i, layout in enumerate(layouts) if layout is not None]
        first_index, first = carried[0]
        axis = first.axis + out_rank - ranks[first_index]  # type: ignore[operator]
        for i, layout in carried[1:]:
            if layout.axis + out_rank - ranks[i] != axis or not self.unify(first, layout):  # type: ignore[operator]
                self.fail(layouts, f"'{name}' ({op}) combines channels that do not line up")
                return
        for i, value in enumerate(node.inputs):
            if value is None or layouts[i] is not None:
                continue
            aligned = axis - (out_rank - ranks[i])  # type: ignore[operator]
            if aligned < 0:
                continue
            dims = self.dims(value)
            dim = dims[aligned] if dims is not None else None
            if dim == 1:
                continue
            if dim == first.extent and constant_array(value) is not None:
                self.plan.slices.append(SliceEdit(node, i, aligned, first.at(aligned)))
                continue
            self.fail(
                layouts,
                f"'{name}' ({op}) combines the channels with '{value.name}', whose channels "
                "are not pruned",
            )
            return
        for output in node.outputs:
            self.set(output, first.at(axis))

    def concat(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        rank = self.table.rank(node.outputs[0])
        carried = [layout for layout in layouts if layout is not None]
        if rank is None:
            carrier = next(v for v, lay in zip(node.inputs, layouts, strict=True) if lay)
            rank = self.table.rank(carrier)  # type: ignore[arg-type]
        if rank is None:
            self.fail(carried, f"'{name}' (Concat): rank unknown")
            return
        axis = node.attributes.get_int("axis", 0)
        axis = axis + rank if axis < 0 else axis
        if all(layout.axis == axis for layout in carried):
            if any(layout.block != 1 for layout in carried):
                self.fail(carried, f"'{name}' (Concat) joins flattened channels")
                return
            segments: list[Segment] = []
            for value, layout in zip(node.inputs, layouts, strict=True):
                if layout is not None:
                    segments.extend(layout.segments)
                    continue
                dims = self.dims(value)
                if dims is None or not isinstance(dims[axis], int):
                    self.fail(carried, f"'{name}' (Concat): the size of '{value.name}' is unknown")
                    return
                segments.append(Segment(None, dims[axis]))  # type: ignore[arg-type]
            self.set(node.outputs[0], Layout(axis, tuple(segments)))
            return
        if any(layout.axis == axis for layout in carried):
            self.fail(carried, f"'{name}' (Concat) joins channels on different axes")
            return
        first = carried[0]
        for index, (value, layout) in enumerate(zip(node.inputs, layouts, strict=True)):
            if layout is None:
                if constant_array(value) is None:
                    self.fail(carried, f"'{name}' (Concat) joins channels with '{value.name}'")
                    return
                self.plan.slices.append(SliceEdit(node, index, first.axis, first))
            elif layout.axis != first.axis or not self.unify(first, layout):
                self.fail(carried, f"'{name}' (Concat) joins channels that do not line up")
                return
        self.set(node.outputs[0], first)

    def split(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (Split): rank unknown")
            return
        axis = node.attributes.get_int("axis", 0)
        if (axis + rank if axis < 0 else axis) == layout.axis:
            self.fail([layout], f"'{name}' (Split) splits the channel axis")
            return
        for output in node.outputs:
            self.set(output, layout)

    def slice(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (Slice): rank unknown")
            return
        starts = static_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axes_value = node.inputs[3] if len(node.inputs) > 3 else None
        axes = static_array(axes_value) if axes_value is not None else None
        if starts is None or (axes_value is not None and axes is None):
            self.fail([layout], f"'{name}' (Slice): its axes are not constant")
            return
        listed = axes.reshape(-1).tolist() if axes is not None else list(range(starts.size))
        if layout.axis in [a + rank if a < 0 else a for a in listed]:
            self.fail([layout], f"'{name}' (Slice) slices the channel axis")
            return
        self.set(node.outputs[0], layout)

    def pad(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (Pad): rank unknown")
            return
        if len(node.inputs) > 1:
            pads = static_array(node.inputs[1])
        else:
            attr = node.attributes.get("pads")
            pads = np.array(list(attr.as_ints())) if attr is not None else None
        axes_value = node.inputs[3] if len(node.inputs) > 3 else None
        axes = static_array(axes_value) if axes_value is not None else None
        if pads is None or (axes_value is not None and axes is None):
            self.fail([layout], f"'{name}' (Pad): its pads are not constant")
            return
        listed = axes.reshape(-1).tolist() if axes is not None else list(range(rank))
        listed = [a + rank if a < 0 else a for a in listed]
        pads = pads.reshape(-1)
        if layout.axis in listed:
            at = listed.index(layout.axis)
            if pads[at] != 0 or pads[at + len(listed)] != 0:
                self.fail([layout], f"'{name}' (Pad) pads the channel axis")
                return
        self.set(node.outputs[0], layout)

    def transpose(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (Transpose): rank unknown")
            return
        attr = node.attributes.get("perm")
        perm = list(attr.as_ints()) if attr is not None else list(reversed(range(rank)))
        self.set(node.outputs[0], layout.at(perm.index(layout.axis)))

    def _axes(self, node: ir.Node, rank: int) -> list[int] | None:
        """Constant ``axes`` of Squeeze, Unsqueeze or a reduction (input 1 or the attribute)."""
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            array = static_array(node.inputs[1])
            if array is None:
                return None
            axes = array.reshape(-1).tolist()
        else:
            attr = node.attributes.get("axes")
            axes = list(attr.as_ints()) if attr is not None else []
        return sorted(a + rank if a < 0 else a for a in axes)

    def squeeze(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (Squeeze): rank unknown")
            return
        axes = self._axes(node, rank)
        if not axes or layout.axis in axes:  # no axes: every dim of size 1 goes, maybe ours
            self.fail([layout], f"'{name}' (Squeeze) may drop the channel axis")
            return
        self.set(node.outputs[0], layout.at(layout.axis - sum(a < layout.axis for a in axes)))

    def unsqueeze(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.outputs[0])
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (Unsqueeze): rank unknown")
            return
        axes = self._axes(node, rank)
        if axes is None:
            self.fail([layout], f"'{name}' (Unsqueeze): its axes are not constant")
            return
        kept = [i for i in range(rank) if i not in axes]
        self.set(node.outputs[0], layout.at(kept[layout.axis]))

    def reduce(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' ({node.op_type}): rank unknown")
            return
        axes = self._axes(node, rank)
        if axes is None:
            self.fail([layout], f"'{name}' ({node.op_type}): its axes are not constant")
            return
        if not axes:
            if not node.attributes.get_int("noop_with_empty_axes", 0):
                self.fail([layout], f"'{name}' ({node.op_type}) reduces over the channels")
                return
        elif layout.axis in axes:
            self.fail([layout], f"'{name}' ({node.op_type}) reduces over the channels")
            return
        keep = node.attributes.get_int("keepdims", 1)
        axis = layout.axis if keep else layout.axis - sum(a < layout.axis for a in axes)
        self.set(node.outputs[0], layout.at(axis))

    def softmax(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' ({node.op_type}): rank unknown")
            return
        old = self.opset < 13
        axis = node.attributes.get_int("axis", 1 if old else -1)
        axis = axis + rank if axis < 0 else axis
        if (old and layout.axis >= axis) or layout.axis == axis:
            self.fail([layout], f"'{name}' ({node.op_type}) normalises over the channels")
            return
        self.set(node.outputs[0], layout)

    def arg(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' ({node.op_type}): rank unknown")
            return
        axis = node.attributes.get_int("axis", 0)
        axis = axis + rank if axis < 0 else axis
        if axis == layout.axis:
            self.fail([layout], f"'{name}' ({node.op_type}) picks among the channels")
            return
        keep = node.attributes.get_int("keepdims", 1)
        self.set(node.outputs[0], layout.at(layout.axis - (0 if keep or axis > layout.axis else 1)))

    def shape(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = layouts[0]
        rank = self.table.rank(node.inputs[0]) if node.inputs[0] is not None else None
        if layout is None or rank is None:
            self.fail([layout], f"'{name}' (Shape): rank unknown")
            return
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", rank)
        start, end = (min(max(x + rank if x < 0 else x, 0), rank) for x in (start, end))
        if start <= layout.axis < end:
            self.fail([layout], f"'{name}' (Shape) reads the channel count")

    # -- reshaping ---------------------------------------------------------------------------

    def flatten(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        dims = self.dims(node.inputs[0])
        if layout is None or dims is None:
            self.fail([layout], f"'{name}' (Flatten): shape unknown")
            return
        rank = len(dims)
        axis = node.attributes.get_int("axis", 1)
        axis = axis + rank if axis < 0 else axis
        c = layout.axis
        outer, inner, out_axis = (
            (dims[axis:c], dims[c + 1 :], 1) if c >= axis else (dims[:c], dims[c + 1 : axis], 0)
        )
        if not all(d == 1 for d in outer) or not all(isinstance(d, int) for d in inner):
            self.fail([layout], f"'{name}' (Flatten) interleaves channels with other dims")
            return
        block = layout.block * math.prod(inner)  # type: ignore[arg-type]
        self.set(node.outputs[0], Layout(out_axis, layout.segments, block))

    def reshape(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        layout = self.only_first(node, name, layouts)
        if layout is None:
            return
        in_dims, out_dims = self.dims(node.inputs[0]), self.dims(node.outputs[0])
        if in_dims is None or out_dims is None:
            self.fail([layout], f"'{name}' (Reshape): shapes unknown")
            return
        match = _match_reshape(in_dims, out_dims, layout)
        if match is None:
            self.fail([layout], f"'{name}' (Reshape) mixes the channels with other dims")
            return
        k, block = match
        out = Layout(k, layout.segments, block)
        entries = self._shape_entries(node)
        if entries is None or len(entries) != len(out_dims):
            self.fail([layout], f"'{name}' (Reshape): its target shape is computed at run time")
            return
        allowzero = node.attributes.get_int("allowzero", 0)
        for position, (entry, _) in enumerate(entries):
            if entry == 0 and not allowzero and position == layout.axis and position != k:
                self.fail([layout], f"'{name}' (Reshape) copies the channel dim elsewhere")
                return
        entry, piece = entries[k]
        if entry is None or piece is None:
            self.fail([layout], f"'{name}' (Reshape): the channel size is computed at run time")
            return
        if entry == 0 and not allowzero:
            if k != layout.axis or block != layout.block:
                self.fail([layout], f"'{name}' (Reshape) copies a dim into the channel axis")
                return
        elif entry > 0:
            reader, index, array, position = piece
            self.plan.shape_entries.append(ShapeEntryEdit(reader, index, array, position, out))
        elif entry != -1:
            self.fail([layout], f"'{name}' (Reshape): target entry {entry} on the channel axis")
            return
        self.set(node.outputs[0], out)

    def _shape_entries(
        self, node: ir.Node
    ) -> list[tuple[int | None, tuple[ir.Node, int, np.ndarray, int] | None]] | None:
        """The Reshape target's entries, each with where its constant comes from, if it does."""
        target = node.inputs[1] if len(node.inputs) > 1 else None
        if target is None:
            return None
        array = static_array(target)
        if array is not None:
            flat = array.reshape(-1)
            return [(int(v), (node, 1, flat, i)) for i, v in enumerate(flat.tolist())]
        producer = target.producer()
        if (
            producer is None
            or producer.op_type != "Concat"
            or producer.domain not in ONNX_DOMAINS
            or len(target.uses()) != 1
            or target.is_graph_output()
        ):
            return None
        entries: list[tuple[int | None, tuple[ir.Node, int, np.ndarray, int] | None]] = []
        for index, piece in enumerate(producer.inputs):
            length = static_length(piece, self.table)
            if length is None:
                return None
            values = static_array(piece)
            if values is None:
                entries.extend((None, None) for _ in range(length))
            else:
                flat = values.reshape(-1)
                entries.extend(
                    (int(v), (producer, index, flat, i)) for i, v in enumerate(flat.tolist())
                )
        return entries


def _static_product(dims: Sequence[Dim]) -> int | None:
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)  # type: ignore[arg-type]


def _match_reshape(
    in_dims: Sequence[Dim], out_dims: Sequence[Dim], layout: Layout
) -> tuple[int, int] | None:
    """Where a Reshape puts the channel axis, and its new block; None if channels get mixed.

    The input's dims before the channel axis must give the output's dims before axis ``k``;
    the channel dim and some static dims after it (``P`` elements per channel) must give
    output dims ``k .. k+m`` (``Q`` elements per step of axis ``k``). Channel ``c`` then
    covers entries ``c * block*P/Q ...`` of axis ``k``: the new block is ``block*P/Q``.
    """
    c = layout.axis
    prefix = dims_product(in_dims[:c])
    if prefix is None:
        return None
    for k in range(len(out_dims)):
        if dims_product(out_dims[:k]) != prefix:
            continue
        for m in range(1, len(out_dims) - k + 1):
            right = _static_product(out_dims[k : k + m])
            if right is None:
                break
            for j in range(c + 1, len(in_dims) + 1):
                inner = _static_product(in_dims[c + 1 : j])
                if inner is None:
                    break
                if layout.extent * inner != right:
                    continue
                if dims_product(in_dims[j:]) != dims_product(out_dims[k + m :]):
                    continue
                steps = _static_product(out_dims[k + 1 : k + m])
                assert steps is not None
                if (layout.block * inner) % steps:
                    continue
                block = layout.block * inner // steps
                if out_dims[k] == layout.channels * block:
                    return k, block
    return None


_SOURCE_HANDLERS = {
    "Conv": _Walk.conv,
    "ConvTranspose": _Walk.conv,
    "Gemm": _Walk.gemm,
    "MatMul": _Walk.matmul,
}
_HANDLERS = {
    "ArgMax": _Walk.arg,
    "ArgMin": _Walk.arg,
    "BatchNormalization": _Walk.normalization,
    "CastLike": _Walk.cast_like,
    "Concat": _Walk.concat,
    "Dropout": _Walk.dropout,
    "Flatten": _Walk.flatten,
    "Hardmax": _Walk.softmax,
    "InstanceNormalization": _Walk.normalization,
    "LayerNormalization": _Walk.layer_norm,
    "LogSoftmax": _Walk.softmax,
    "Pad": _Walk.pad,
    "Reshape": _Walk.reshape,
    "Shape": _Walk.shape,
    "Slice": _Walk.slice,
    "Softmax": _Walk.softmax,
    "Split": _Walk.split,
    "Squeeze": _Walk.squeeze,
    "Transpose": _Walk.transpose,
    "Unsqueeze": _Walk.unsqueeze,
}


def analyse_channels(model: ir.Model, table: ShapeTable) -> ChannelPlan:
    """Walk the main graph and record every channel dependency (see the module docstring)."""
    return _Walk(model, table).run()
