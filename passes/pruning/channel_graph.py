"""Channel dependencies: which output channels are tied together, and what removing one touches.

One forward walk over the main graph, in topological order, gives every value that carries
output channels of a prunable layer a :class:`Layout`: the axis the channels run along, the
*spaces* (sets of channels, one per prunable layer) laid end to end on it, and a *block*: each
channel covers ``block`` consecutive elements of the axis (``Flatten`` of ``[N, C, H, W]`` to
``[N, C*H*W]`` gives block ``H*W``). Rules, by op:

- **sources** (Conv with ``group=1``, ConvTranspose with ``group=1``, Gemm, MatMul with a
  constant 2-D weight, directly or under a ``Transpose``): a fresh space of ``C_out``
  channels; the weight's output axis and the bias are sliced. A source that reads a layout
  also slices the weight's input axis;
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

import math
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxforge.passes.pruning.channel_plan import (
    ChannelPlan,
    GroupEdit,
    Layout,
    Segment,
    ShapeEntryEdit,
    SliceEdit,
    Source,
)
from onnxforge.passes.pruning.reshape_rules import (
    ShapeEntry,
    Size,
    dim_size,
    match_reshape,
    target_sizes,
)
from onnxforge.passes.pruning.sparsify import layer_name
from onnxforge.passes.pruning.static_values import (
    ONNX_DOMAINS,
    Dim,
    ShapeTable,
    WeightView,
    constant_array,
    shape_range,
    static_array,
    static_length,
    weight_view,
)

__all__ = ["analyse_channels", "UNARY_OPS", "POOL_OPS", "BROADCAST_OPS", "REDUCE_OPS"]

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

    def source(self, node: ir.Node, name: str, weight: WeightView, axis: int) -> Layout:
        """Make the node a source: a fresh space of the weight's ``axis`` channels."""
        size = int(weight.array().shape[axis])
        space = self.plan.new_space(size)
        source_axis = weight.source_axis(axis)
        self.plan.sources.append(Source(node, name, weight.value, source_axis, space))
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
            hint = " (run prune before fuse)" if op.startswith("Fused") else ""
            self.fail(layouts, f"read by '{name}' ({node.domain}::{op}), an op outside ONNX{hint}")
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

    def ranked_input(
        self, node: ir.Node, name: str, layouts: list[Layout | None]
    ) -> tuple[Layout, int] | None:
        """Input 0's layout and rank, when only it carries channels and its rank is known."""
        layout = self.only_first(node, name, layouts)
        if layout is None:
            return None
        rank = self.table.rank(node.inputs[0])  # type: ignore[arg-type]
        if rank is None:
            self.fail([layout], f"'{name}' ({node.op_type}): the rank of its input is unknown")
            return None
        return layout, rank

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
        out = self.source(node, name, WeightView(weight, None, None), out_axis)
        self.plan.slices.append(SliceEdit(node, 1, out_axis, out.at(out_axis)))
        if bias is not None:
            self.plan.slices.append(SliceEdit(node, 2, 0, out.at(0)))
        self.set(node.outputs[0], out.at(1))

    def _depthwise(self, node: ir.Node, layout: Layout, weight: np.ndarray) -> bool:
        group = node.attributes.get_int("group", 1)
        return group == layout.extent and weight.shape[1] == 1 and weight.shape[0] % group == 0

    def gemm(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        weight = weight_view(node.inputs[1])
        array = weight.array() if weight is not None else None
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
        weight = weight_view(node.inputs[1])
        array = weight.array() if weight is not None else None
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
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
        axis = _normalised(node.attributes.get_int("axis", -1), rank)
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
        axis = _normalised(node.attributes.get_int("axis", 0), rank)
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
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
        axis = node.attributes.get_int("axis", 0)
        if _normalised(axis, rank) == layout.axis:
            self.fail([layout], f"'{name}' (Split) splits the channel axis")
            return
        for output in node.outputs:
            self.set(output, layout)

    def slice(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
        starts = static_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axes_value = node.inputs[3] if len(node.inputs) > 3 else None
        axes = static_array(axes_value) if axes_value is not None else None
        if starts is None or (axes_value is not None and axes is None):
            self.fail([layout], f"'{name}' (Slice): its axes are not constant")
            return
        listed = axes.reshape(-1).tolist() if axes is not None else list(range(starts.size))
        if layout.axis in [_normalised(a, rank) for a in listed]:
            self.fail([layout], f"'{name}' (Slice) slices the channel axis")
            return
        self.set(node.outputs[0], layout)

    def pad(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
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
        listed = [_normalised(a, rank) for a in listed]
        pads = pads.reshape(-1)
        if layout.axis in listed:
            at = listed.index(layout.axis)
            if pads[at] != 0 or pads[at + len(listed)] != 0:
                self.fail([layout], f"'{name}' (Pad) pads the channel axis")
                return
        self.set(node.outputs[0], layout)

    def transpose(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
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
        return sorted(_normalised(a, rank) for a in axes)

    def squeeze(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
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
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
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
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
        old = self.opset < 13
        axis = _normalised(node.attributes.get_int("axis", 1 if old else -1), rank)
        if (old and layout.axis >= axis) or layout.axis == axis:
            self.fail([layout], f"'{name}' ({node.op_type}) normalises over the channels")
            return
        self.set(node.outputs[0], layout)

    def arg(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
        axis = _normalised(node.attributes.get_int("axis", 0), rank)
        if axis == layout.axis:
            self.fail([layout], f"'{name}' ({node.op_type}) picks among the channels")
            return
        keep = node.attributes.get_int("keepdims", 1)
        self.set(node.outputs[0], layout.at(layout.axis - (0 if keep or axis > layout.axis else 1)))

    def shape(self, node: ir.Node, name: str, layouts: list[Layout | None]) -> None:
        found = self.ranked_input(node, name, layouts)
        if found is None:
            return
        layout, rank = found
        start, end = shape_range(node, rank)
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
        axis = _normalised(node.attributes.get_int("axis", 1), rank)
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
        in_dims = self.dims(node.inputs[0])
        entries = self._shape_entries(node)
        if in_dims is None or entries is None:
            self.fail([layout], f"'{name}' (Reshape): its target shape is computed at run time")
            return
        allowzero = node.attributes.get_int("allowzero", 0)
        in_sizes = [dim_size(d) for d in in_dims]
        out_sizes = target_sizes(
            [entry for entry, _, _ in entries],
            [size for _, _, size in entries],
            in_sizes,
            self.dims(node.outputs[0]),
            allowzero,
        )
        match = match_reshape(in_sizes, out_sizes, layout)
        if match is None:
            self.fail([layout], f"'{name}' (Reshape) mixes the channels with other dims")
            return
        k, block = match
        out = Layout(k, layout.segments, block)
        for position, (entry, _, _) in enumerate(entries):
            if entry == 0 and not allowzero and position == layout.axis and position != k:
                self.fail([layout], f"'{name}' (Reshape) copies the channel dim elsewhere")
                return
        entry, piece, _ = entries[k]
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

    def _shape_entries(self, node: ir.Node) -> list[ShapeEntry] | None:
        """The Reshape target's entries (see ``ShapeEntry``), or None when they are unknown."""
        target = node.inputs[1] if len(node.inputs) > 1 else None
        if target is None:
            return None
        array = static_array(target)
        if array is not None:
            flat = array.reshape(-1)
            return [(int(v), (node, 1, flat, i), None) for i, v in enumerate(flat.tolist())]
        producer = target.producer()
        if (
            producer is None
            or producer.op_type != "Concat"
            or producer.domain not in ONNX_DOMAINS
            or len(target.uses()) != 1
            or target.is_graph_output()
        ):
            return None
        entries: list[ShapeEntry] = []
        for index, piece in enumerate(producer.inputs):
            length = static_length(piece, self.table)
            if length is None:
                return None
            values = static_array(piece)
            if values is None:
                read = self._dims_read(piece)
                if read is None or len(read) != length:
                    read = [None] * length
                entries.extend((None, None, size) for size in read)
            else:
                flat = values.reshape(-1)
                entries.extend(
                    (int(v), (producer, index, flat, i), None) for i, v in enumerate(flat.tolist())
                )
        return entries

    def _dims_read(self, value: ir.Value | None, depth: int = 8) -> list[Size] | None:
        """The dims a run-time shape piece holds (``Shape(x)[a:b]``, squeezed, concatenated)."""
        if value is None or depth == 0:
            return None
        array = static_array(value)
        if array is not None:
            return [(int(v), ()) for v in array.reshape(-1).tolist()]
        node = value.producer()
        if node is None or node.domain not in ONNX_DOMAINS or not node.inputs:
            return None
        if node.op_type == "Shape":
            dims = self.dims(node.inputs[0])
            if dims is None:
                return None
            start, end = shape_range(node, len(dims))
            return [dim_size(d) for d in dims[start:end]]
        if node.op_type in ("Squeeze", "Unsqueeze", "Reshape", "Identity", "Cast"):
            return self._dims_read(node.inputs[0], depth - 1)  # the same elements, reshaped
        if node.op_type == "Concat":
            parts = [self._dims_read(v, depth - 1) for v in node.inputs]
            if any(part is None for part in parts):
                return None
            return [size for part in parts for size in part]  # type: ignore[union-attr]
        return None


def _normalised(axis: int, rank: int) -> int:
    """A possibly negative axis as a non-negative one."""
    return axis + rank if axis < 0 else axis


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
