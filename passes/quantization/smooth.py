"""SmoothQuant: move activation outliers into the weights before quantizing.

Xiao et al., "SmoothQuant" (ICML 2023). A product ``Y = X W`` (X: activations, K input
channels; W: K x N constant weights) equals ``(X diag(1/s)) (diag(s) W)`` for any positive
per-channel ``s``. With

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(``max|X_j|`` over calibration data, ``max|W_j|`` over row j of every weight that reads X),
channel j of the activations shrinks to ``max|X_j| ** (1 - alpha) * max|W_j| ** (1 - alpha)``:
the few channels that are 10-100x larger than the rest (the outliers of transformer
activations) stop setting the scale of the whole tensor, which per-tensor activation
quantization (all of ONNX Runtime's integer MatMul kernels) has to use. The weights take the
factor on their rows, and they are quantized per output channel, which absorbs it well.
``alpha`` sets how much moves: 0 none, 1 all.

The float model computes the same up to rounding. The division ``X / s`` is a ``Mul`` by a
constant inserted before the weights' readers (MatMul with a constant 2-D B, Gemm with a
constant B, contrib ``Attention``, whose weights are ``K x 3H``); other readers of X (a
residual Add) keep reading X itself. A weight that is also read by a node outside the group is
left alone (it cannot take two scalings), and so is its whole group.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping

import numpy as np
import onnx_ir as ir

from onnxforge.passes.fusion_rules._values import (
    constant_float32,
    unique_value_name,
    value_names,
)

__all__ = [
    "SmoothGroup",
    "smoothing_groups",
    "smooth",
    "has_outliers",
    "SMOOTHABLE_OPS",
    "MIN_RANGE",
    "OUTLIER_RATIO",
]

logger = logging.getLogger(__name__)

# Ops whose second input is a constant K x N (or N x K) weight that a channel scaling can enter.
SMOOTHABLE_OPS = frozenset({"MatMul", "Gemm", "Attention"})
# Ranges below this are treated as this (a dead channel must not make 1/s infinite).
MIN_RANGE = 1e-5
# An activation is smoothed only when its largest channel range is at least this many times
# its median channel range: where there are outliers to move. Each smoothed activation costs a
# Mul over the whole tensor at run time, so those without outliers are left alone. On MiniLM
# the ranges were 10-19x at the feed-forward blocks' inputs, 4-6x at attention's, 2-3.6x at
# the output projection's and the last GELU's: smoothing the 18 activations at 4x or more
# gave the same worst cosine as smoothing all 24 (0.99745), the 10 at 8x or more 0.99538.
OUTLIER_RATIO = 4.0


@dataclasses.dataclass
class SmoothGroup:
    """One activation and the weighted nodes that read it."""

    activation: ir.Value
    nodes: list[ir.Node]
    # (weight value, axis of the weight that runs along the activation's channels)
    weights: list[tuple[ir.Value, int]]

    @property
    def channels(self) -> int:
        """K, the activation's channel count (the weights' reduction size)."""
        weight, axis = self.weights[0]
        return int(weight.const_value.shape[axis])


def _weight_axis(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The node's constant weight and the axis along its input channels, if it has one."""
    if len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if constant_float32(weight, 2) is None:
        return None
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        return weight, 1 if node.attributes.get_int("transB", 0) else 0
    if node.op_type == "Attention" and node.domain != "com.microsoft":
        return None
    return weight, 0


def smoothing_groups(model: ir.Model, *, op_types: Collection[str], exclude: Collection[str]):
    """The groups SmoothQuant can rewrite: activations read by weighted, quantized nodes."""
    readers: dict[ir.Value, list[tuple[ir.Node, ir.Value, int]]] = {}
    for node in model.graph:
        if node.op_type not in SMOOTHABLE_OPS or node.op_type not in op_types:
            continue
        if node.name in exclude or node.inputs[0] is None:
            continue
        found = _weight_axis(node)
        if found is None:
            continue
        readers.setdefault(node.inputs[0], []).append((node, *found))
    groups = []
    for activation, members in readers.items():
        if activation.dtype != ir.DataType.FLOAT or activation.const_value is not None:
            continue
        nodes = [node for node, _, _ in members]
        weights = list({w: (w, axis) for _, w, axis in members}.values())
        sizes = {int(w.const_value.shape[axis]) for w, axis in weights}
        outside = any(user not in nodes for w, _ in weights for user, _ in w.uses()) or any(
            w.is_graph_output() for w, _ in weights
        )
        if len(sizes) != 1 or outside:
            continue
        groups.append(SmoothGroup(activation, nodes, weights))
    return groups


def _scales(group: SmoothGroup, activation_range: np.ndarray, alpha: float) -> np.ndarray:
    weight_range = np.max(
        [
            np.max(np.abs(w.const_value.numpy()), axis=1 - axis).astype(np.float64)
            for w, axis in group.weights
        ],
        axis=0,
    )
    a = np.maximum(np.asarray(activation_range, np.float64), MIN_RANGE)
    w = np.maximum(weight_range, MIN_RANGE)
    return (a**alpha / w ** (1.0 - alpha)).astype(np.float32)


def has_outliers(activation_range: np.ndarray, ratio: float = OUTLIER_RATIO) -> bool:
    """Whether the largest channel range is at least ``ratio`` times the median one."""
    ranges = np.maximum(np.asarray(activation_range, np.float64), MIN_RANGE)
    return bool(ranges.max() >= ratio * np.median(ranges))


def smooth(
    model: ir.Model,
    groups: list[SmoothGroup],
    ranges: Mapping[str, np.ndarray],
    *,
    alpha: float,
    outlier_ratio: float = OUTLIER_RATIO,
) -> list[str]:
    """Apply SmoothQuant to each group whose range has outliers; returns those activations."""
    graph = model.graph
    taken = value_names(graph)
    order = {node: index for index, node in enumerate(graph)}
    done = []
    for group in groups:
        activation_range = ranges.get(str(group.activation.name))
        if activation_range is None or activation_range.shape != (group.channels,):
            continue
        if not has_outliers(activation_range, outlier_ratio):
            continue
        scales = _scales(group, activation_range, alpha)
        name = str(group.activation.name)
        inverse = ir.Value(
            name=unique_value_name(graph, f"{name}_smooth_scale", taken),
            const_value=ir.tensor((1.0 / scales).astype(np.float32)),
        )
        inverse.type = ir.TensorType(ir.DataType.FLOAT)
        inverse.shape = ir.Shape([group.channels])
        graph.register_initializer(inverse)
        mul = ir.node("Mul", [group.activation, inverse], name=f"{name}_smooth")
        mul.outputs[0].name = unique_value_name(graph, f"{name}_smoothed", taken)
        mul.outputs[0].type = group.activation.type
        mul.outputs[0].shape = group.activation.shape
        first = min(group.nodes, key=order.__getitem__)
        graph.insert_before(first, mul)
        for weight, axis in group.weights:
            array = weight.const_value.numpy()
            factor = scales[:, None] if axis == 0 else scales[None, :]
            weight.const_value = ir.tensor((array * factor).astype(np.float32), name=weight.name)
        for node in group.nodes:
            node.replace_input_with(0, mul.outputs[0])
        done.append(name)
    logger.debug("smoothed %d activations (alpha %g)", len(done), alpha)
    return done
