"""Removing channels: choose the kept channels of each group, then rewrite the graph.

Choosing (:func:`select_channels`): a group's channel scores are the sums, over its source
layers, of each output channel's weight norm (L1 or L2 over the channel's slice of the
weight). ``scope="layer"`` removes the ``floor(sparsity * C)`` lowest-scoring channels of each
group; ``scope="global"`` ranks every channel of every group on one scale (each score divided
by its group's mean score, since raw norms of different layers are not comparable) and
removes ``floor(sparsity * total)`` of them, always leaving each group at least one channel.

Rewriting (:func:`apply_selection`), through the IR only:

- a sliced constant is rewritten in place when every node that reads it takes the same slice
  (``Shape`` nodes that read it are first replaced by its old shape, a constant), else the
  readers that need a slice get a new initializer and the old one goes once unused;
- a weight read through a ``Transpose`` (the dynamo exporter's ``MatMul(x, Transpose(W))``)
  is sliced under the Transpose, along the axes the Transpose maps to;
- a per-channel input that is not a constant (a bias computed at run time) is sliced by an
  inserted ``Gather`` with constant indices;
- constant pieces of Reshape targets, depthwise ``group`` attributes and the shapes of the
  values whose channels shrink are updated; constants left without readers are removed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.passes.pruning.channel_plan import ChannelPlan, Layout, Source
from onnxforge.passes.pruning.macs import MATRIX_OPS
from onnxforge.passes.pruning.report import GroupRow, LayerRow, SkippedGroup
from onnxforge.passes.pruning.sparsify import layer_name
from onnxforge.passes.pruning.static_values import (
    ONNX_DOMAINS,
    ShapeTable,
    constant_array,
    shape_range,
    weight_view,
)

__all__ = ["Selection", "select_channels", "apply_selection", "channel_scores"]

# Ops whose output is a constant when their inputs are: removed with the constants they fed.
_CONSTANT_OPS = frozenset(
    {"Constant", "Reshape", "Concat", "Squeeze", "Unsqueeze", "Cast", "Identity"}
)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The kept channels of each group to prune (by root space), and what the report lists."""

    kept: dict[int, np.ndarray]
    groups: list[GroupRow]
    skipped: list[SkippedGroup]
    group_ids: dict[int, int]  # root space -> the group number the report uses


def _source_norms(source: Source, criterion: Literal["l1", "l2"]) -> np.ndarray:
    array = constant_array(source.weight)
    assert array is not None
    channels = array.shape[source.axis]
    rows = np.moveaxis(array.astype(np.float64), source.axis, 0).reshape(channels, -1)
    if criterion == "l1":
        return np.abs(rows).sum(axis=1)
    return np.sqrt(np.square(rows).sum(axis=1))


def channel_scores(sources: Sequence[Source], criterion: Literal["l1", "l2"]) -> np.ndarray:
    """A group's channel scores: the sum of its sources' per-channel weight norms."""
    return np.sum([_source_norms(source, criterion) for source in sources], axis=0)


def select_channels(
    plan: ChannelPlan,
    *,
    sparsity: float,
    criterion: Literal["l1", "l2"],
    scope: Literal["global", "layer"],
    layers: Sequence[str] = (),
) -> Selection:
    """Choose the channels each group keeps; unresolvable groups are listed with reasons."""
    wanted = set(layers)
    reasons = plan.group_reasons()
    scores: dict[int, np.ndarray] = {}
    names: dict[int, tuple[str, ...]] = {}
    group_ids: dict[int, int] = {}
    skipped: list[SkippedGroup] = []
    for number, (root, sources) in enumerate(plan.groups().items(), start=1):
        group_ids[root] = number
        names[root] = tuple(source.layer for source in sources)
        if root in reasons:
            skipped.append(SkippedGroup(names[root], tuple(reasons[root])))
            continue
        if wanted and not any(s.layer in wanted or s.weight.name in wanted for s in sources):
            continue
        scores[root] = channel_scores(sources, criterion)
    removed: dict[int, np.ndarray] = {}
    if scope == "layer":
        for root, score in scores.items():
            count = math.floor(sparsity * score.size)
            removed[root] = np.argsort(score, kind="stable")[:count]
    else:
        roots = list(scores)
        scaled = [_normalised(scores[root]) for root in roots]
        everything = np.concatenate(scaled) if scaled else np.zeros(0)
        owners = np.concatenate([np.full(s.size, i) for i, s in enumerate(scaled)] or [[]])
        offsets = np.concatenate([[0], np.cumsum([s.size for s in scaled])])
        budget = math.floor(sparsity * everything.size)
        chosen: list[list[int]] = [[] for _ in roots]
        for flat in np.argsort(everything, kind="stable"):
            if budget == 0:
                break
            owner = int(owners[flat])
            if len(chosen[owner]) < scaled[owner].size - 1:  # every group keeps a channel
                chosen[owner].append(int(flat - offsets[owner]))
                budget -= 1
        removed = {root: np.array(c, dtype=np.int64) for root, c in zip(roots, chosen, strict=True)}
    kept: dict[int, np.ndarray] = {}
    groups: list[GroupRow] = []
    for root, score in scores.items():
        drop = removed.get(root, np.zeros(0, dtype=np.int64))
        if drop.size:
            kept[root] = np.setdiff1d(np.arange(score.size), drop)
        groups.append(GroupRow(group_ids[root], names[root], score.size, score.size - drop.size))
    return Selection(kept, groups, skipped, group_ids)


def _normalised(score: np.ndarray) -> np.ndarray:
    mean = float(score.mean()) if score.size else 0.0
    return score / mean if mean > 0 else score


class _Rewriter:
    """Applies a plan's edits for a selection (see the module docstring)."""

    def __init__(self, model: ir.Model, plan: ChannelPlan, selection: Selection) -> None:
        self.graph = model.graph
        self.plan = plan
        self.selection = selection
        self.names: set[str] = {v.name for v in self.graph.inputs if v.name}
        self.names |= set(self.graph.initializers)
        for node in self.graph:
            self.names |= {v.name for v in node.outputs if v.name}

    def kept_indices(self, layout: Layout) -> np.ndarray | None:
        """Indices kept along the layout's axis, or None when nothing of it is removed."""
        parts, offset, changed = [], 0, False
        for segment in layout.segments:
            kept = None
            if segment.space is not None:
                kept = self.selection.kept.get(self.plan.find(segment.space))
            if kept is None:
                parts.append(np.arange(segment.size) + offset)
            else:
                parts.append(kept + offset)
                changed = True
            offset += segment.size
        if not changed:
            return None
        channels = np.concatenate(parts).astype(np.int64)
        return (channels[:, None] * layout.block + np.arange(layout.block)[None, :]).reshape(-1)

    def unique(self, base: str) -> str:
        name, counter = base, 1
        while name in self.names:
            name = f"{base}_{counter}"
            counter += 1
        self.names.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.unique(base)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def drop_if_unused(self, value: ir.Value | None) -> None:
        """Remove a constant nobody reads any more, and the constant ops that made it."""
        if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
            return
        if value.is_initializer():
            assert value.name is not None
            self.graph.initializers.pop(value.name)
            return
        node = value.producer()
        if (
            node is None
            or node.graph is not self.graph
            or node.op_type not in _CONSTANT_OPS
            or node.domain not in ONNX_DOMAINS
            or any(out.uses() or out.is_graph_output() for out in node.outputs)
        ):
            return
        inputs = list(node.inputs)
        self.graph.remove(node, safe=True)
        for source in inputs:
            self.drop_if_unused(source)

    def fold_shape(self, node: ir.Node, dims: Sequence[int]) -> None:
        """Replace ``Shape(constant)`` by the constant's (old) shape."""
        start, end = shape_range(node, len(dims))
        output = node.outputs[0]
        constant = self.initializer(f"{output.name}_folded", np.array(dims[start:end], np.int64))
        ir.convenience.replace_all_uses_with(output, constant)
        self.graph.remove(node, safe=True)

    def replace_constant(
        self, value: ir.Value, edits: list[tuple[ir.Node, int, bytes, np.ndarray]]
    ) -> None:
        """Give each edited reader its slice of the constant ``value``."""
        edited = {(id(node), index) for node, index, _, _ in edits}
        others = [u for u in value.uses() if (id(u.node), u.idx) not in edited]
        shapes = [
            u.node
            for u in others
            if u.node.op_type == "Shape"
            and u.node.domain in ONNX_DOMAINS
            and u.node.graph is self.graph
            and not u.node.outputs[0].is_graph_output()
        ]
        in_place = (
            value.is_initializer()
            and not value.is_graph_output()
            and len({key for _, _, key, _ in edits}) == 1
            and len(others) == len(shapes)
        )
        if in_place:
            old_dims = [int(d) for d in value.const_value.shape]  # type: ignore[union-attr]
            for node in shapes:
                self.fold_shape(node, old_dims)
            array = edits[0][3]
            value.const_value = ir.tensor(array, name=value.name)
            value.shape = ir.Shape(array.shape)
            return
        made: dict[bytes, ir.Value] = {}
        for node, index, key, array in edits:
            if key not in made:
                made[key] = self.initializer(f"{value.name or 'constant'}_pruned", array)
            node.replace_input_with(index, made[key])
        self.drop_if_unused(value)

    def gather(self, node: ir.Node, index: int, cuts: list[tuple[int, np.ndarray]]) -> None:
        """Slice a run-time input with ``Gather`` nodes inserted before its reader."""
        current = node.inputs[index]
        assert current is not None
        base = current.name or "value"
        for axis, indices in cuts:
            shape = None
            if current.shape is not None and current.type is not None:
                dims = list(current.shape.dims)
                dims[axis] = int(indices.size)
                shape = ir.Shape(dims)
            kept = self.initializer(f"{base}_kept", indices.astype(np.int64))
            output = ir.Value(name=self.unique(f"{base}_pruned"), shape=shape, type=current.type)
            gather = ir.node(
                "Gather", [current, kept], {"axis": axis}, outputs=[output],
                name=self.unique(f"{base}_gather"),
            )  # fmt: skip
            self.graph.insert_before(node, gather)
            current = output
        node.replace_input_with(index, current)


def value_shape(value: ir.Value, flat: np.ndarray) -> tuple[int, ...]:
    """The shape a rewritten shape piece keeps: the old constant's (1-D, or a scalar)."""
    old = constant_array(value)
    return tuple(old.shape) if old is not None and old.size == flat.size else flat.shape


def apply_selection(
    model: ir.Model, plan: ChannelPlan, selection: Selection, table: ShapeTable
) -> list[LayerRow]:
    """Remove the unselected channels; one report row per matrix-op weight that shrank."""
    rewriter = _Rewriter(model, plan, selection)
    # Shapes first: the rewrite changes what the table would read from the values.
    shrink: list[tuple[ir.Value, int, int]] = []
    for value, layout in plan.layouts.items():
        indices = rewriter.kept_indices(layout)
        if indices is not None and value.shape is not None:  # unannotated values stay so
            shrink.append((value, layout.axis, int(indices.size)))
    dims_before = {value: table.dims(value) for value, _, _ in shrink}

    cuts: dict[tuple[int, int], tuple[ir.Node, int, list[tuple[int, np.ndarray]]]] = {}
    for edit in plan.slices:
        indices = rewriter.kept_indices(edit.layout)
        if indices is None:
            continue
        _, _, axes = cuts.setdefault((id(edit.node), edit.index), (edit.node, edit.index, []))
        if all(axis != edit.axis for axis, _ in axes):
            axes.append((edit.axis, indices))

    rows: list[LayerRow] = []
    group_of = {id(s.node): selection.group_ids[plan.find(s.space)] for s in plan.sources}
    layer_names = {id(node): layer_name(node, i) for i, node in enumerate(model.graph)}
    constants: dict[int, tuple[ir.Value, list[tuple[ir.Node, int, bytes, np.ndarray]]]] = {}
    transposed: list[tuple[ir.Value, tuple[int, ...]]] = []
    for node, index, axes in cuts.values():
        owner = node
        value = node.inputs[index]
        assert value is not None
        array = constant_array(value)
        if array is None:
            view = weight_view(value)
            if view is None or view.transpose is None or len(value.uses()) != 1:
                rewriter.gather(node, index, axes)
                continue
            # a weight under a Transpose: slice the constant, the Transpose follows
            transposed.append((value, view.perm))  # type: ignore[arg-type]
            node, index, value = view.transpose, 0, view.value
            axes = [(view.source_axis(axis), indices) for axis, indices in axes]
            array = constant_array(value)
            assert array is not None
        sliced = array
        key = b""
        for axis, indices in sorted(axes, key=lambda cut: cut[0]):
            sliced = np.take(sliced, indices, axis=axis)
            key += axis.to_bytes(2, "little") + indices.tobytes()
        constants.setdefault(id(value), (value, []))[1].append((node, index, key, sliced))
        if owner.op_type in MATRIX_OPS and (owner is not node or index == 1):
            rows.append(
                LayerRow(
                    layer=layer_names[id(owner)],
                    op_type=owner.op_type,
                    weight=value.name or "",
                    shape_before=tuple(array.shape),
                    shape_after=tuple(sliced.shape),
                    zeros_before=int(np.count_nonzero(array == 0)),
                    zeros_after=int(np.count_nonzero(sliced == 0)),
                    group=group_of.get(id(owner)),
                )
            )
    for value, edits in constants.values():
        rewriter.replace_constant(value, edits)
    for value, perm in transposed:
        weight = value.producer().inputs[0]  # type: ignore[union-attr]
        if value.shape is not None and weight is not None and weight.shape is not None:
            value.shape = ir.Shape([weight.shape[axis] for axis in perm])

    pieces: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}
    for edit in plan.shape_entries:
        indices = rewriter.kept_indices(edit.layout)
        if indices is None:
            continue
        _, _, array = pieces.setdefault(
            (id(edit.node), edit.index), (edit.node, edit.index, edit.piece.copy())
        )
        array[edit.position] = indices.size
    shape_constants: dict[int, tuple[ir.Value, list[tuple[ir.Node, int, bytes, np.ndarray]]]] = {}
    for node, index, array in pieces.values():
        value = node.inputs[index]
        assert value is not None
        edits = shape_constants.setdefault(id(value), (value, []))[1]
        edits.append((node, index, array.tobytes(), array.reshape(value_shape(value, array))))
    for value, edits in shape_constants.values():
        rewriter.replace_constant(value, edits)

    for edit in plan.group_edits:
        indices = rewriter.kept_indices(edit.layout)
        if indices is not None:
            edit.node.attributes["group"] = ir.AttrInt64("group", int(indices.size))

    for value, axis, size in shrink:
        dims = dims_before[value]
        if dims is None:
            continue
        new_dims = list(dims)
        new_dims[axis] = size
        value.shape = ir.Shape(new_dims)
    return rows
