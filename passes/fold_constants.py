"""``fold-constants``: evaluate every node whose inputs are all constant, store the result.

Built on onnxscript's constant folder (``onnxscript.optimizer._constant_folding``): it walks
the graph in order, runs incremental ONNX shape inference, evaluates nodes whose inputs are all
constant with ONNX's reference implementation, and partially evaluates shape arithmetic
(``Shape``, ``Gather``/``Concat`` of shape values, ``Reshape``/``Expand`` to the same shape, a
``Cast`` to the same type, inference-mode ``Dropout``, ``If`` with a constant condition). It
reaches into If/Loop/Scan bodies (a constant computed in a body becomes an initializer of that
body; values the body captures from the outer graph stay where they are) and into model
functions (where results become ``Constant`` nodes). Around it, this pass:

- decides what may be folded *before* anything is evaluated (onnxscript's ``should_fold``
  callback): never non-deterministic ops (``RandomNormal``, ``RandomUniform``, their ``Like``
  forms, ``Multinomial``, ``Bernoulli``, training-mode ``Dropout``), never ops outside the ONNX
  domain (``""`` / ``"ai.onnx"``), never ``QuantizeLinear``, ``DequantizeLinear`` or
  ``DynamicQuantizeLinear`` (they carry the quantization parameters), never a node whose
  output is not a single tensor (onnxscript would evaluate it and throw the result away);
- bounds what folding may create: each candidate's output size is inferred with ONNX shape
  inference from the node and its constant inputs' values, and a node whose folded output would
  have more than ``output_size_limit`` elements is left alone (unless it replaces at least as
  many elements of constant inputs that only it uses: onnxscript's rule), logged as a warning
  and recorded in :attr:`FoldConstantsPass.skipped`. The check comes first because onnxscript
  applies its own limit only after evaluating, so a ``ConstantOfShape``, ``Expand`` or ``Tile``
  to a huge shape would be materialised first. A node whose output size cannot be inferred is
  left alone as well (recorded, logged at info level). ``ConstantOfShape`` within the limit is
  folded (onnxscript keeps every one by default);
- folds ``Gather`` from a shape value at static positions (``Gather(Shape(x), 1)`` with
  ``x: [N, 16, 5, 5]`` gives 16), which onnxscript does only for 1-D indices with an explicit
  ``axis``, then folds again: with a symbolic batch the static parts of exporter shape chains
  still fold;
- gives a ``Reshape`` a constant target where onnxscript's symbolic values show the computed
  one is constants and the data's own dimensions in place: ``x.view(x.size(0), -1)`` with a
  symbolic batch becomes ``Reshape(x, [0, -1])`` (0 copies the dimension), and the Shape,
  Gather/Squeeze, Unsqueeze and Concat chain that computed the target goes;
- treats a node on which one of onnxscript's partial evaluators crashes as not foldable
  (onnxscript 0.7 crashes on ``SplitToSequence`` with a non-constant scalar ``split``);
- keeps valid models valid: after folding, every node whose inputs changed is run through ONNX
  shape inference with its constant inputs' values, as ONNX Runtime does when it loads the
  model. Folding can expose a constant to a check that a computed value escaped (ONNX's own
  ``AffineGrid`` function passes ``Range`` a 1-element 1-D limit, which ``Range`` rejects once it
  is a constant); when that happens the whole model is put back as it was, with a warning and a
  record in :attr:`FoldConstantsPass.skipped`;
- leaves nothing behind: nodes and initializers that folding left unused are removed (dead
  code that was there before is cleanup's job), and when nothing was folded the annotations
  written by shape inference are put back, so that the model is untouched and ``modified``
  is false.

Sizes are counted in tensor *elements*, as onnxscript counts them. Folded float arithmetic is
computed by numpy, not by ONNX Runtime's kernels, and may differ in the last bits: the pass is
``reassociating``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.optimizer import _constant_folding

from onnxforge.errors import first_line
from onnxforge.passes.base import Pass, PassResult, Semantics
from onnxforge.passes.cleanup import NON_DETERMINISTIC_OPS
from onnxforge.passes.fusion_rules._values import new_initializer, unique_value_name, value_names
from onnxforge.passes.registry import register
from onnxforge.passes.statistics import ONNX_DOMAINS, has_subgraphs, iter_graphs

__all__ = [
    "FoldConstantsPass",
    "SkippedNode",
    "DEFAULT_INPUT_SIZE_LIMIT",
    "DEFAULT_OUTPUT_SIZE_LIMIT",
    "DEFAULT_SHAPE_INFERENCE",
    "NEVER_FOLD_OPS",
]

logger = logging.getLogger(__name__)

# A node with a constant input of more elements than this is not evaluated (onnxscript's rule;
# a Transpose that is the only user of its large input is the exception): evaluation runs in
# numpy through ONNX's reference implementation. 1 Mi elements is a 4 MiB float32 weight.
DEFAULT_INPUT_SIZE_LIMIT = 1024 * 1024
# How many elements folding one node may add to the model: a larger output is stored only when
# it replaces at least as many elements of constants that only that node used.
DEFAULT_OUTPUT_SIZE_LIMIT = 1024 * 1024
# Incremental ONNX shape inference while folding: needed to fold Shape of intermediate values.
DEFAULT_SHAPE_INFERENCE = True

NEVER_FOLD_OPS = NON_DETERMINISTIC_OPS | {
    # non-deterministic ops above: a folded sample would be the same on every run (Dropout in
    # training mode; onnxscript rewrites inference-mode Dropout to Identity)
    # quantization: the scale and zero point are what later passes and runtimes look for
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}
# Shape inference reads the values of constant inputs up to this many elements: the inputs whose
# values decide a shape (Reshape's shape, Tile's repeats, Range's limits, ...) are far smaller.
_INFERENCE_DATA_LIMIT = 1024
# One round is one onnxscript sweep; another runs only when a Gather from a shape value was
# folded after it (each round folds one more level of shape arithmetic through Gathers).
_MAX_ROUNDS = 8


class SkippedNode(NamedTuple):
    """A node that could have been folded but was left alone, and why."""

    node: str
    reason: str


def _node_label(node: ir.Node, *, by_outputs: bool = False) -> str:
    outputs = ", ".join(str(o.name) for o in node.outputs)
    return f"{node.op_type} -> {outputs}" if by_outputs or not node.name else node.name


def _graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph, every subgraph, and every function body (with their subgraphs)."""
    graphs = list(model.graphs())
    for function in model.functions.values():
        graphs.append(function.graph)
        graphs.extend(function.graph.subgraphs())
    return graphs


def _is_dead(node: ir.Node) -> bool:
    return all(not o.uses() and not o.is_graph_output() for o in node.outputs)


def _elements(shape: ir.Shape | None) -> int | None:
    if shape is None or not shape.is_static():
        return None
    return math.prod(shape.numpy())


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    """The value's tensor when ONNX Runtime would see it as a constant when loading the model."""
    if value.is_graph_input():  # an initializer that is also an input can be fed at run time
        return None
    return ir.convenience.get_const_tensor(value)


def _infer_node(
    node: ir.Node, opset_imports: dict[str, int], ir_version: int
) -> dict[str, onnx.TypeProto] | None:
    """ONNX shape inference on one node, with the values of its (small) constant inputs.

    Returns None when the node cannot be checked (no schema, an input of unknown type); raises
    ``onnx.shape_inference.InferenceError`` when inference rejects the node.
    """
    version = opset_imports.get(node.domain or "")
    if version is None or node.domain not in ONNX_DOMAINS:
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, version, node.domain)
    except onnx.defs.SchemaError:
        return None
    input_types: dict[str, onnx.TypeProto] = {}
    input_data: dict[str, onnx.TensorProto] = {}
    for value in node.inputs:
        if value is None:
            continue
        if not value.name:
            return None
        tensor = _constant(value)
        if tensor is not None:
            type_proto = ir.serde.serialize_type(ir.TensorType(tensor.dtype))
            ir.serde.serialize_shape_into(type_proto, tensor.shape)
            if tensor.size <= _INFERENCE_DATA_LIMIT:
                input_data[value.name] = ir.serde.serialize_tensor(tensor)
        elif value.type is not None:
            type_proto = ir.serde.serialize_type(value.type)
            if value.shape is not None:
                ir.serde.serialize_shape_into(type_proto, value.shape)
        else:
            return None
        input_types[value.name] = type_proto
    return onnx.shape_inference.infer_node_outputs(
        schema,
        ir.serde.serialize_node(node),
        input_types,
        input_data,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opset_imports.items()],
        ir_version=ir_version,
    )


class _Snapshot:
    """What the model looked like before folding, to undo or tidy up after it."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph.clone()
        self.functions = {key: f.clone() for key, f in model.functions.items()}
        self.annotations: dict[ir.Value, tuple[ir.TypeProtocol | None, ir.Shape | None]] = {}
        self.inputs: dict[ir.Node, tuple[ir.Value | None, ...]] = {}
        self.dead_nodes: set[ir.Node] = set()
        self.unused_initializers: set[ir.Value] = set()
        for graph in _graphs(model):
            values = [*graph.inputs, *graph.initializers.values()]
            for node in graph:
                values.extend(node.outputs)
                self.inputs[node] = tuple(node.inputs)
                if _is_dead(node):
                    self.dead_nodes.add(node)
            for value in values:
                shape = value.shape.copy() if value.shape is not None else None
                self.annotations[value] = (value.type, shape)
            self.unused_initializers.update(
                v for v in graph.initializers.values() if not v.uses() and not v.is_graph_output()
            )

    def restore_annotations(self) -> None:
        """Put back the types and shapes that shape inference wrote on existing values."""
        for value, (type_, shape) in self.annotations.items():
            value.type = type_
            value.shape = shape

    def restore(self, model: ir.Model) -> None:
        """Put the whole model back as it was."""
        model.graph = self.graph
        model.functions.clear()
        model.functions.update(self.functions)

    def remove_new_dead_code(self, model: ir.Model) -> None:
        """Remove nodes and initializers that folding left unused (not those that were before)."""
        for graph in _graphs(model):
            for node in reversed(list(graph)):
                if node not in self.dead_nodes and _is_dead(node):
                    graph.remove(node, safe=True)
            for name, value in list(graph.initializers.items()):
                if (
                    value not in self.unused_initializers
                    and not value.uses()
                    and not value.is_graph_output()
                    and not value.is_graph_input()
                ):
                    del graph.initializers[name]

    def changed_nodes(self, model: ir.Model) -> Iterable[ir.Node]:
        """Nodes that are new or whose inputs are not the values they were."""
        for graph in _graphs(model):
            for node in graph:
                if self.inputs.get(node) != tuple(node.inputs):
                    yield node


def _is_1d(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.shape is not None:
        return value.shape.rank() == 1
    producer = value.producer()
    return producer is not None and producer.op_type == "Shape" and producer.domain in ONNX_DOMAINS


def _fold_static_shape_gathers(model: ir.Model, shape_values: dict[ir.Value, object]) -> int:
    """Replace ``Gather(shape, i)`` by a constant where the gathered dimensions are static.

    ``shape_values`` is onnxscript's symbolic value map: a 1-D int64 value that holds a shape
    maps to an ``ir.Shape`` whose dimensions are ints or symbols.
    """
    count = 0
    for graph in _graphs(model):
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ONNX_DOMAINS:
                continue
            if len(node.inputs) != 2 or len(node.outputs) != 1 or node.inputs[1] is None:
                continue
            axis = node.attributes.get("axis")
            if axis is not None and (axis.is_ref() or axis.as_int() != 0):
                continue
            data = node.inputs[0]
            shape = shape_values.get(data)  # type: ignore[arg-type]
            indices = _constant(node.inputs[1])
            if not isinstance(shape, ir.Shape) or indices is None or indices.shape.rank() > 1:
                continue
            if not _is_1d(data):  # onnxscript also maps e.g. Reshape(shape, [1, n]) to a shape
                continue
            positions = indices.numpy()
            if positions.dtype.kind not in "iu" or not all(
                -len(shape) <= p < len(shape) for p in positions.reshape(-1)
            ):
                continue
            dims = [shape[int(p)] for p in positions.reshape(-1)]
            if not all(isinstance(d, int) for d in dims):
                continue
            tensor = ir.tensor(np.array(dims, dtype=np.int64).reshape(positions.shape))
            constant = ir.node("Constant", [], attributes={"value": tensor})
            constant.outputs[0].const_value = tensor
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [constant], node.outputs, constant.outputs
            )
            count += 1
    return count


def _reshape_target(node: ir.Node, target: object) -> np.ndarray | None:
    """The constant target equal to the symbolic ``target`` of this Reshape, if there is one.

    A symbolic dimension at position ``i`` is data's own dimension ``i`` when the symbols are
    the same: it becomes 0 ("copy dimension i", with ``allowzero`` off). Any other symbol, or a
    literal 0 that ``allowzero`` makes a real size, leaves the target as it is.
    """
    data = node.inputs[0]
    if not isinstance(target, ir.Shape) or data is None or data.shape is None:
        return None
    allowzero = node.attributes.get_int("allowzero", 0)
    dims = []
    for i, dim in enumerate(target):
        if isinstance(dim, int):
            if dim == 0 and allowzero:
                return None
            dims.append(dim)
        elif i < data.shape.rank() and dim.value is not None and data.shape[i] == dim:
            dims.append(0)
        else:
            return None
    return np.array(dims, dtype=np.int64)


def _fold_symbolic_reshape_targets(model: ir.Model, shape_values: dict[ir.Value, object]) -> int:
    """``Reshape(x, Concat(Shape(x)[0], [-1]))`` -> ``Reshape(x, [0, -1])``, and the like.

    Exporters write ``x.view(x.size(0), -1)`` as a chain of Shape, Gather or Squeeze,
    Unsqueeze and Concat. Where onnxscript's symbolic value map shows the computed target is
    made of constants and of x's own dimensions in place, the target becomes a constant and
    the chain dead code.
    """
    count = 0
    for graph in model.graphs():  # not function bodies: the target becomes an initializer
        taken = value_names(graph)
        for node in list(graph):
            if node.op_type != "Reshape" or node.domain not in ONNX_DOMAINS:
                continue
            if len(node.inputs) != 2 or node.inputs[1] is None or _constant(node.inputs[1]):
                continue
            dims = _reshape_target(node, shape_values.get(node.inputs[1]))  # type: ignore[arg-type]
            if dims is None:
                continue
            name = unique_value_name(graph, f"{node.inputs[1].name or node.name}_folded", taken)
            node.replace_input_with(1, new_initializer(graph, name, dims))
            node.attributes.pop("allowzero", None)
            count += 1
    return count


class _Folder(_constant_folding.FoldConstantsPass):
    """onnxscript's folder, where a partial evaluator that crashes means "do not fold"."""

    def process_node(self, node: ir.Node, is_function: bool):
        """Process the node as onnxscript does; no replacement where onnxscript raises."""
        try:
            return super().process_node(node, is_function)
        except RuntimeError as error:  # onnxscript wraps every partial-evaluator error in it
            logger.info("fold-constants: onnxscript failed on %s: %s", _node_label(node), error)
            return None


def _make_contiguous(model: ir.Model) -> None:
    """Give folded tensors C-contiguous memory.

    The evaluator returns views (a folded Transpose is a strided view of its input); hashing,
    serialising and some runtimes need contiguous bytes. Only in-memory numpy tensors are
    touched, never external (memory-mapped) weights.
    """
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray):
                if not tensor.raw.flags["C_CONTIGUOUS"]:
                    value.const_value = ir.tensor(
                        np.ascontiguousarray(tensor.raw), name=tensor.name
                    )


@register
class FoldConstantsPass(Pass):
    """Evaluate subgraphs whose inputs are all constant and store the results as constants.

    After a run, :attr:`skipped` lists the nodes that had only constant inputs but were left
    alone because their folded output would be too large or of unknown size (and, when
    folding had to be undone, the node it would have broken), as :class:`SkippedNode`
    ``(node, reason)`` tuples; each is also logged.
    """

    name = "fold-constants"
    summary = "Evaluate subgraphs whose inputs are all constant (shape arithmetic included)."
    semantics = Semantics.REASSOCIATING

    def __init__(
        self,
        *,
        input_size_limit: int = DEFAULT_INPUT_SIZE_LIMIT,
        output_size_limit: int = DEFAULT_OUTPUT_SIZE_LIMIT,
        shape_inference: bool = DEFAULT_SHAPE_INFERENCE,
    ) -> None:
        if input_size_limit < 0 or output_size_limit < 0:
            raise ValueError("size limits are element counts and cannot be negative")
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit
        self.shape_inference = shape_inference
        self.skipped: list[SkippedNode] = []
        self._skipped_nodes: set[ir.Node] = set()
        self._opset_imports: dict[str, int] = {}
        self._ir_version = onnx.IR_VERSION

    def call(self, model: ir.Model) -> PassResult:
        """Fold until nothing more folds; ``modified`` is true when anything was folded."""
        self.skipped = []
        self._skipped_nodes = set()
        self._opset_imports = dict(model.opset_imports)
        self._ir_version = model.ir_version or onnx.IR_VERSION
        snapshot = _Snapshot(model)
        folder = _Folder(
            shape_inference=self.shape_inference,
            input_size_limit=self.input_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=self._should_fold,
        )
        modified = False
        for _ in range(_MAX_ROUNDS):
            result = folder(model)
            modified = result.modified or modified
            shape_values = result.symbolic_value_map
            if not (
                _fold_static_shape_gathers(model, shape_values)
                + _fold_symbolic_reshape_targets(model, shape_values)
            ):
                break
            modified = True
        if not modified:
            snapshot.restore_annotations()
            return PassResult(model, False)
        snapshot.remove_new_dead_code(model)
        broken = self._first_rejected_node(snapshot.changed_nodes(model))
        if broken is not None:
            node, error = broken
            reason = f"folding made ONNX shape inference reject this node ({error})"
            label = _node_label(node, by_outputs=True)  # folding may have named the node
            snapshot.restore(model)
            self.skipped.append(SkippedNode(label, reason))
            logger.warning(
                "fold-constants: not folding anything: %s (%s): %s", label, node.op_type, reason
            )
            return PassResult(model, False)
        _make_contiguous(model)
        return PassResult(model, True)

    def _first_rejected_node(self, nodes: Iterable[ir.Node]) -> tuple[ir.Node, str] | None:
        for node in nodes:
            if has_subgraphs(node):
                continue  # node-level inference cannot see the scope a body captures from
            try:
                _infer_node(node, self._opset_imports, self._ir_version)
            except onnx.shape_inference.InferenceError as error:
                return node, first_line(error)
        return None

    # -----------------------------------------------------------------------------------------
    # What may be folded. onnxscript calls this for a node whose inputs are all constant, before
    # it evaluates it: False, never; True, fold (onnxscript's default rules are not applied);
    # None, onnxscript's default rules (its input-size limit and its list of preserved ops).

    def _should_fold(self, node: ir.Node) -> bool | None:
        if node.domain not in ONNX_DOMAINS or node.op_type in NEVER_FOLD_OPS:
            return False
        if len(node.outputs) != 1:
            return False
        output = node.outputs[0]
        if output.type is not None and not isinstance(output.type, ir.TensorType):
            return False
        try:
            inferred = _infer_node(node, self._opset_imports, self._ir_version)
        except Exception as error:  # onnx raises several types; an unknown size is the answer
            logger.debug("fold-constants: no shape for %s: %s", _node_label(node), error)
            inferred = None
        type_proto = (inferred or {}).get(str(output.name))
        if type_proto is not None and not type_proto.HasField("tensor_type"):
            return False  # a sequence or an optional: onnxscript cannot store it
        shape = ir.serde.deserialize_type_proto_for_shape(type_proto) if type_proto else None
        elements = _elements(shape)
        if elements is None:
            elements = _elements(output.shape)  # declared or inferred by onnxscript
        if elements is None:
            self._skip(node, "the size of its output cannot be inferred", logging.INFO)
            return False
        # onnxscript's rule, applied before evaluating instead of after: an output over the
        # limit is stored only when it replaces as many elements of constants only it uses.
        grown = elements - sum(
            value.const_value.size
            for value in node.inputs
            if value is not None and value.const_value is not None and len(value.uses()) == 1
        )
        if elements > self.output_size_limit and grown > 0:
            self._skip(
                node,
                f"its folded output would have {elements} elements and add {grown} to the "
                f"model (output_size_limit={self.output_size_limit})",
                logging.WARNING,
            )
            return False
        if node.op_type == "ConstantOfShape":
            return True  # within the limit: onnxscript would keep it by default
        return None

    def _skip(self, node: ir.Node, reason: str, level: int) -> None:
        if node in self._skipped_nodes:
            return
        self._skipped_nodes.add(node)
        label = _node_label(node)
        self.skipped.append(SkippedNode(label, reason))
        logger.log(level, "fold-constants: not folding %s (%s): %s", label, node.op_type, reason)
