"""Unstructured and N:M sparsity: zero the smallest weights in place; shapes do not change.

The prunable weights are the constant float weights of Conv, ConvTranspose, Gemm and MatMul
(input 1; for MatMul, a constant input 0 when input 1 is not constant), directly or through
a ``Transpose`` (the dynamo exporter's ``MatMul(x, Transpose(W))``). A weight read by several
nodes is pruned once.

- Unstructured, ``scope="layer"``: each weight loses its ``floor(sparsity * size)`` smallest
  elements; ``scope="global"``: ``floor(sparsity * total)`` elements over all the prunable
  weights at once, ranked on one scale (so layers with small weights lose more).
- N:M: along the weight's reduction axis (Conv's input channels, Gemm's and MatMul's K), each
  run of ``m`` consecutive elements keeps its ``n`` largest and loses the other ``m - n``;
  a weight whose reduction axis is not a multiple of ``m`` is left alone. The sparsity is
  ``(m - n) / m`` by construction.

"Smallest" is by ``|w|`` for ``l1`` and ``w**2`` for ``l2``, which rank elements alike:
the criterion only matters for channel pruning, where it ranks channel norms. The count is
exact: ties at the threshold are split deterministically (N:M by position). Elements that are
zero already rank first, so a second run with the same options changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.passes.pruning.report import LayerRow
from onnxforge.passes.pruning.static_values import (
    ONNX_DOMAINS,
    WeightView,
    constant_array,
    weight_view,
)

__all__ = [
    "PrunableWeight",
    "prunable_weights",
    "layer_name",
    "unstructured_masks",
    "nm_mask",
    "apply_masks",
]

Criterion = Literal["l1", "l2"]


@dataclasses.dataclass(frozen=True)
class PrunableWeight:
    """A constant float weight of a matrix op, and the axis its dot products run along."""

    value: ir.Value
    layer: str
    op_type: str
    reduction_axis: int


def layer_name(node: ir.Node, index: int) -> str:
    """The node's name, or ``OpType#index`` for an unnamed node."""
    return node.name or f"{node.op_type}#{index}"


def _reduction_axis(node: ir.Node, input_index: int, rank: int) -> int | None:
    op = node.op_type
    if op == "Conv" and rank >= 3:
        return 1
    if op == "ConvTranspose" and rank >= 3:
        return 0
    if op == "Gemm" and rank == 2:
        if input_index == 1:
            return 1 if node.attributes.get_int("transB", 0) else 0
        return 0 if node.attributes.get_int("transA", 0) else 1
    if op == "MatMul" and rank >= 2:
        return rank - 2 if input_index == 1 else rank - 1
    return None


# The weight input of each matrix op, in order of preference (MatMul: B, else a constant A).
_WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (1,), "MatMul": (1, 0)}


def _float_weight(value: ir.Value | None) -> WeightView | None:
    """The initializer a weight input reads (maybe through a Transpose), if float and ours."""
    view = weight_view(value)
    if view is None:
        return None
    weight = view.value
    if weight.is_graph_input() or weight.is_graph_output() or weight.const_value is None:
        return None
    return view if weight.const_value.dtype.is_floating_point() else None


def _weight_input(node: ir.Node) -> tuple[int, WeightView] | None:
    """Which input of a matrix op is its prunable weight, and the initializer it reads."""
    for input_index in _WEIGHT_INPUTS.get(node.op_type, ()):
        if len(node.inputs) > input_index:
            view = _float_weight(node.inputs[input_index])
            if view is not None:
                return input_index, view
    return None


def prunable_weights(model: ir.Model, layers: Sequence[str] = ()) -> list[PrunableWeight]:
    """The weights that unstructured and N:M pruning may zero, restricted to ``layers``."""
    wanted = set(layers)
    found: dict[int, PrunableWeight] = {}
    for index, node in enumerate(model.graph):
        if node.domain not in ONNX_DOMAINS:
            continue
        weight = _weight_input(node)
        if weight is None:
            continue
        input_index, view = weight
        value = view.value
        assert value.const_value is not None
        name = layer_name(node, index)
        if wanted and name not in wanted and value.name not in wanted:
            continue
        axis = _reduction_axis(node, input_index, len(value.const_value.shape))
        if axis is not None and id(value) not in found:
            found[id(value)] = PrunableWeight(value, name, node.op_type, view.source_axis(axis))
    return list(found.values())


def _scores(array: np.ndarray, criterion: Criterion) -> np.ndarray:
    values = array.astype(np.float64)
    return np.abs(values) if criterion == "l1" else np.square(values)


def _smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest scores (a partition, not a sort: O(n))."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    if count >= scores.size:
        return np.arange(scores.size)
    return np.argpartition(scores, count - 1)[:count]


def unstructured_masks(
    arrays: Sequence[np.ndarray],
    *,
    sparsity: float,
    criterion: Criterion,
    scope: Literal["global", "layer"],
) -> list[np.ndarray]:
    """Boolean masks (True: zero it) that remove the smallest elements, per layer or globally."""
    scores = [_scores(a, criterion).reshape(-1) for a in arrays]
    masks = [np.zeros(a.size, dtype=bool) for a in arrays]
    if scope == "layer":
        for score, mask in zip(scores, masks, strict=True):
            mask[_smallest(score, math.floor(sparsity * score.size))] = True
    else:
        everything = np.concatenate(scores) if scores else np.zeros(0)
        count = math.floor(sparsity * everything.size)
        chosen = np.zeros(everything.size, dtype=bool)
        chosen[_smallest(everything, count)] = True
        offset = 0
        for mask in masks:
            mask[:] = chosen[offset : offset + mask.size]
            offset += mask.size
    return [mask.reshape(a.shape) for mask, a in zip(masks, arrays, strict=True)]


def nm_mask(array: np.ndarray, axis: int, *, n: int, m: int, criterion: Criterion) -> np.ndarray:
    """Mask (True: zero it) keeping the ``n`` largest of each ``m`` consecutive along ``axis``."""
    if array.shape[axis] % m:
        raise ValueError(f"axis {axis} of size {array.shape[axis]} is not a multiple of m={m}")
    moved = np.moveaxis(_scores(array, criterion), axis, -1)
    runs = moved.reshape(-1, m)
    order = np.argsort(runs, axis=1, kind="stable")[:, : m - n]
    mask = np.zeros(runs.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)


def apply_masks(
    weights: Sequence[PrunableWeight], masks: Sequence[np.ndarray | None]
) -> list[LayerRow]:
    """Zero the masked elements of each weight in place; one row per weight considered."""
    rows = []
    for weight, mask in zip(weights, masks, strict=True):
        if mask is None:
            continue
        array = constant_array(weight.value)
        assert array is not None  # prunable_weights took only initializers with data
        zeros_before = int(np.count_nonzero(array == 0))
        if np.any(array[mask] != 0):
            pruned = array.copy()
            pruned[mask] = 0
            weight.value.const_value = ir.tensor(pruned, name=weight.value.name)
        else:
            pruned = array
        rows.append(
            LayerRow(
                layer=weight.layer,
                op_type=weight.op_type,
                weight=weight.value.name or "",
                shape_before=tuple(array.shape),
                shape_after=tuple(pruned.shape),
                zeros_before=zeros_before,
                zeros_after=int(np.count_nonzero(pruned == 0)),
            )
        )
    return rows
