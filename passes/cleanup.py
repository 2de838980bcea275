"""``cleanup``: remove no-op nodes, Identity nodes, common subexpressions and dead code.

Built on onnx-ir's common passes and onnxscript's rewrite rules where they are right, in the
order that lets each step expose work for the next:

0. Constant nodes become initializers (a Constant node and an initializer are the same value;
   the initializer costs no node, and step 3 then merges equal ones);
1. no-op elimination (rewrite rules): each no-op becomes an Identity of its input, which step
   2 then removes;
2. Identity elimination (our own, below): it rewires uses, so that CSE sees equal inputs;
3. initializer de-duplication: after it, two nodes that read equal weights read one value;
4. common-subexpression elimination (onnx-ir's pass, guarded against random ops);
5. dead-node and dead-initializer removal, then unused opset imports.

Every step reaches into If/Loop/Scan bodies and model-local functions, except step 0, which
leaves functions alone (a function has no initializers).

Constant lifting is our own: onnx-ir's ``LiftConstantsToInitializersPass`` raises on a
``sparse_value`` Constant, skips Constants in the ``ai.onnx`` domain spelled out, and by default
keeps small tensors as nodes. Here every Constant of the main graph and its subgraphs whose
value is a dense tensor, a number, or a list of numbers or strings becomes an initializer of its
graph under its output's name, unless that output is a graph output (an output must be computed
by the graph) or the model's IR version is below 4 (where every initializer must also be a graph
input, which would let the caller override it).

No-ops removed (each only when provably a no-op; ``x`` keeps its value bit for bit):

- ``Transpose(x, perm)`` with ``perm == [0, 1, ..., r-1]`` (onnxscript's rule);
- ``Cast(x, to)`` with ``to`` equal to ``x``'s element type (onnxscript's rule);
- ``Reshape(x, shape)`` whose constant ``shape`` gives back ``x``'s shape: each entry equals
  ``x``'s static dim, or is ``0`` (copy the dim, without ``allowzero``), and a single ``-1`` only
  where every other entry is a known positive size;
- ``Expand(x, shape)`` whose constant ``shape`` has no more entries than ``x`` has dims, each
  ``1`` or equal to ``x``'s static dim (then broadcasting gives ``x``'s shape);
- ``Slice(x, starts, ends, axes, steps)`` with constant arguments that keep every element:
  steps 1, starts that clamp to 0, ends that clamp to the dim (``INT64_MAX`` for a dim that is
  not static);
- ``Dropout`` in inference mode (no ``training_mode`` input, or a constant false one), whose
  mask output is unused: a used mask keeps the node, as ONNX Runtime's own Dropout elimination
  does.

A constant here is an initializer or a Constant node's output; an initializer that is also a
graph input can be overridden when the model runs, so it never counts as a constant. onnxscript's
own Expand and Slice rules read such initializers as constants, and its Dropout rules match only
Dropout-10's attributes, so those rules are ours.

Identity elimination is our own: onnx-ir's version renames a value to keep a graph output's
name, which loses an output when two outputs copy one value (``y = Identity(a); z =
Identity(a)``) and breaks an If branch whose output is an Identity of an outer-scope value.
Here an Identity whose output is a graph output goes only when its input is made by a node of
the same graph and is not itself a graph output; graph inputs and outputs keep their names.
The rewriter keeps a graph output's name too: its replacement Identity takes the old output's
name, and step 2 removes that Identity under the rule above.

CSE merges two nodes with the same op, attributes and input values. onnx-ir's pass skips
RandomNormal, RandomUniform and their ``*Like`` forms and Multinomial, but merges two Bernoulli
nodes, two training-mode Dropouts and two calls of a custom op that may draw random numbers or
keep state; it also raises on a type attribute (Optional's) and drops a merged graph output's
type. So while it runs, each node that must stay distinct carries one unique marker attribute in
place of its own: random and dropout ops in any domain, ops outside the ONNX and ONNX Runtime
domains (custom ops and calls of model-local functions, whose semantics are unknown here),
Identity nodes (those left after step 2 keep graph output names; merging them gains nothing),
and nodes with attributes that the pass cannot compare (type attributes, and a function's
reference attributes, which have no value). Graph outputs get their types back after it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as common_rules

from onnxforge.passes.base import Pass, PassResult, Semantics
from onnxforge.passes.registry import register
from onnxforge.passes.statistics import ONNX_DOMAINS, has_subgraphs, node_subgraphs

__all__ = [
    "CleanupPass",
    "lift_constants",
    "deduplicate_initializers",
    "DEFAULT_DEDUPLICATE_SIZE_LIMIT",
    "DEFAULT_CSE_SIZE_LIMIT",
    "NON_DETERMINISTIC_OPS",
    "eliminate_identities",
    "eliminate_common_subexpressions",
    "no_op_rules",
]

# Initializers with more elements than this are not de-duplicated (onnx-ir's size_limit): the
# hash of a huge tensor costs a full read of it.
DEFAULT_DEDUPLICATE_SIZE_LIMIT = 4 * 1024 * 1024 * 1024

# Constant nodes whose tensor has more elements than this are not merged by CSE (onnx-ir's
# size_limit): comparing large tensors costs more than the merge saves; duplicates of large
# weights are initializers, which step 3 merges.
DEFAULT_CSE_SIZE_LIMIT = 10

# Ops whose two calls with equal inputs give different outputs: CSE must never merge them.
NON_DETERMINISTIC_OPS = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)

# Domains whose ops are known here to be pure functions of their inputs (less the ops above).
_DETERMINISTIC_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
_CSE_BARRIER = "onnxforge.cse_barrier"
_INT64_MAX = np.iinfo(np.int64).max
# Before IR version 4, an initializer had to be a graph input too (so the caller could feed it).
_INITIALIZERS_WITHOUT_INPUTS_IR_VERSION = 4


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, every function body, and every subgraph below them."""
    pending: list[ir.Graph] = [model.graph]
    pending += [function.graph for function in model.functions.values()]
    while pending:
        graph = pending.pop(0)
        yield graph
        for node in graph:
            pending.extend(node_subgraphs(node))


# ---------------------------------------------------------------------------------------------
# Initializer de-duplication

# Bytes from each end of a tensor compared before its whole content is hashed.
_SAMPLE_BYTES = 64 * 1024


def _content(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's content as flat bytes (a view of memory-mapped data: read on access)."""
    if tensor.dtype == ir.DataType.STRING:
        return np.frombuffer(np.array(tensor.string_data()).tobytes(), np.uint8)
    return np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)


def _sample_digest(tensor: ir.TensorProtocol) -> str:
    content = _content(tensor)
    digest = hashlib.sha256(content[:_SAMPLE_BYTES])
    digest.update(content[-_SAMPLE_BYTES:])
    return digest.hexdigest()


def deduplicate_initializers(model: ir.Model, *, size_limit: int) -> int:
    """Merge initializers of equal type, shape and content in each graph; returns the count.

    The first of equal initializers (in graph order) stays; uses of the others move to it.
    Graph inputs and outputs, and initializers of more than ``size_limit`` elements, are left
    alone, as onnx-ir's pass does. Unlike it, only tensors that could be equal are read: those
    of one dtype and shape, then only those whose first and last 64 KiB match are hashed
    whole, so a large model's distinct weights are never read in full (nor paged in).
    """
    removed = 0
    for graph in model.graphs():
        groups: dict[tuple, list[ir.Value]] = collections.defaultdict(list)
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.is_graph_input() or value.is_graph_output():
                continue
            if tensor.size > size_limit:
                continue
            groups[(tensor.dtype, tuple(tensor.shape.numpy()))].append(value)
        for candidates in groups.values():
            if len(candidates) < 2:
                continue
            by_sample: dict[str, list[ir.Value]] = collections.defaultdict(list)
            for value in candidates:
                by_sample[_sample_digest(value.const_value)].append(value)
            for same_ends in by_sample.values():
                kept: dict[str, ir.Value] = {}
                for value in same_ends if len(same_ends) > 1 else ():
                    content = _content(value.const_value)
                    keep = kept.setdefault(hashlib.sha256(content).hexdigest(), value)
                    if keep is value or not np.array_equal(_content(keep.const_value), content):
                        continue
                    value.replace_all_uses_with(keep)
                    graph.initializers.pop(str(value.name))
                    removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# Identity elimination


def _removable_identity(node: ir.Node, graph: ir.Graph) -> bool:
    if node.op_type != "Identity" or node.domain not in ONNX_DOMAINS:
        return False
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        return False
    source, copy = node.inputs[0], node.outputs[0]
    if not copy.is_graph_output():
        return True
    producer = source.producer()
    return producer is not None and producer.graph is graph and not source.is_graph_output()


def eliminate_identities(graph: ir.Graph) -> int:
    """Remove removable Identity nodes from ``graph`` and its subgraphs; returns the count."""
    count = 0
    for node in list(graph):
        for subgraph in node_subgraphs(node):
            count += eliminate_identities(subgraph)
        if not _removable_identity(node, graph):
            continue
        source, copy = node.inputs[0], node.outputs[0]
        if source.type is None:
            source.type = copy.type
        if source.shape is None:
            source.shape = copy.shape
        is_output = copy.is_graph_output()
        ir.convenience.replace_all_uses_with(copy, source, replace_graph_outputs=True)
        if is_output:  # the graph output keeps its name; the copy's old value goes away
            name = copy.name
            copy.name = None
            source.name = name
        graph.remove(node, safe=True)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Constant nodes into initializers


# The attribute type each Constant attribute must have (sparse_value is never lifted).
_CONSTANT_ATTRIBUTE_TYPES = {
    "value": ir.AttributeType.TENSOR,
    "value_int": ir.AttributeType.INT,
    "value_ints": ir.AttributeType.INTS,
    "value_float": ir.AttributeType.FLOAT,
    "value_floats": ir.AttributeType.FLOATS,
    "value_string": ir.AttributeType.STRING,
    "value_strings": ir.AttributeType.STRINGS,
}


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The value of a Constant node as a tensor, or None when it is not a plain dense value."""
    if node.op_type != "Constant" or node.domain not in ONNX_DOMAINS or len(node.attributes) != 1:
        return None
    ((name, attr),) = node.attributes.items()
    if attr.is_ref() or attr.type != _CONSTANT_ATTRIBUTE_TYPES.get(name):
        return None  # a reference, sparse_value, or a malformed Constant: left alone
    if name == "value":
        return attr.as_tensor()
    arrays = {
        "value_int": lambda: np.array(attr.as_int(), np.int64),
        "value_ints": lambda: np.array(attr.as_ints(), np.int64),
        "value_float": lambda: np.array(attr.as_float(), np.float32),
        "value_floats": lambda: np.array(attr.as_floats(), np.float32),
        "value_string": lambda: np.array(attr.as_string().encode(), np.bytes_),
        "value_strings": lambda: np.array([s.encode() for s in attr.as_strings()], np.bytes_),
    }
    if name not in arrays:  # sparse_value: a sparse initializer is another kind of thing
        return None
    array = arrays[name]()
    if array.dtype == np.bytes_:
        return ir.StringTensor(array)
    return ir.tensor(array)


def _own_tensor(tensor: ir.TensorProtocol, name: str | None) -> ir.TensorProtocol:
    """A tensor object of its own, named ``name``, sharing ``tensor``'s data where it can.

    onnx-ir renames an initializer's tensor with the initializer (and when serialising), and a
    Constant's tensor object is shared with every clone of the model: an initializer holding
    that object would rename the tensor in the caller's model too.
    """
    if isinstance(tensor, ir.ExternalTensor):
        return ir.ExternalTensor(
            tensor.location,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=name or "",
            base_dir=tensor.base_dir,
        )
    if isinstance(tensor, ir.StringTensor):
        return ir.StringTensor(tensor.raw, shape=tensor.shape, name=name)
    if isinstance(tensor, ir.Tensor):
        return ir.Tensor(tensor.raw, dtype=tensor.dtype, shape=tensor.shape, name=name)
    if tensor.dtype == ir.DataType.STRING:
        strings = np.array(tensor.string_data(), dtype=np.bytes_).reshape(tensor.shape.numpy())
        return ir.StringTensor(strings, name=name)
    return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)  # a copy: Constants are small


def lift_constants(model: ir.Model) -> int:
    """Turn the Constant nodes of the main graph and its subgraphs into initializers.

    Returns how many were lifted; see the module docstring for those left alone.
    """
    if model.ir_version < _INITIALIZERS_WITHOUT_INPUTS_IR_VERSION:
        return 0
    count = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        tensor = _constant_tensor(node)
        output = node.outputs[0] if len(node.outputs) == 1 else None
        if tensor is None or output is None or output.is_graph_output():
            continue
        graph = node.graph
        assert graph is not None  # the iterator yields nodes of graphs
        name = output.name
        output.name = None  # the initializer takes the name
        initializer = ir.Value(
            name=name,
            shape=ir.Shape(tensor.shape.numpy()),
            type=ir.TensorType(tensor.dtype),
            const_value=_own_tensor(tensor, name),
            metadata_props=output.metadata_props.copy(),
        )
        initializer.meta.update(output.meta)
        graph.register_initializer(initializer)
        ir.convenience.replace_all_uses_with(output, initializer)
        graph.remove(node, safe=True)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------
# No-op elimination


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a constant that the caller cannot override, else None."""
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if (
            producer is None
            or producer.op_type != "Constant"
            or producer.domain not in ONNX_DOMAINS
        ):
            return None
        attr = producer.attributes.get("value")
        if attr is None or attr.type != ir.AttributeType.TENSOR:
            return None
        tensor = attr.as_tensor()
    return tensor.numpy()


def _dims_and_target(x: ir.Value, shape: ir.Value) -> tuple[tuple, list[int]] | str:
    """``x``'s dims and the constant target shape, or why they are not both known."""
    if x.shape is None:
        return f"the shape of '{x.name}' is not known"
    target = _constant(shape)
    if target is None:
        return f"the target shape '{shape.name}' is not a constant"
    return tuple(x.shape.dims), target.reshape(-1).tolist()


def _identity_of(op, x: ir.Value) -> ir.Value:
    """``Identity(x)``, typed like ``x`` so that a rule on the next node can read its type."""
    copy = op.Identity(x)
    copy.type, copy.shape = x.type, x.shape
    return copy


class _NoOpToShape(pattern.RewriteRuleClassBase):
    """Base of the rules for an op of data ``x`` and a constant target ``shape``."""

    def changes(self, context, dims: tuple, target: list[int]) -> str | None:
        """Why the op may change ``x``, or None when it provably keeps it."""
        raise NotImplementedError

    def check(self, context, x, shape, **_):
        result = pattern.MatchResult()
        known = _dims_and_target(x, shape)
        reason = known if isinstance(known, str) else self.changes(context, *known)
        return result.fail(reason) if reason else result

    def rewrite(self, op, x, **_):
        return _identity_of(op, x)


class _NoOpReshape(_NoOpToShape):
    """``Reshape(x, shape) -> x`` when the constant ``shape`` gives back ``x``'s shape."""

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape, _allow_other_attributes=True)

    def changes(self, context, dims, target):
        if len(target) != len(dims):
            return f"the rank changes from {len(dims)} to {len(target)}"
        allowzero = context.root.attributes.get_int("allowzero", 0)
        # the output dims that are known to equal x's: 0 copies x's dim unless allowzero
        kept = [
            (t == 0 and not allowzero) or (isinstance(d, int) and t == d)
            for t, d in zip(target, dims, strict=True)
        ]
        inferred = [i for i, t in enumerate(target) if t == -1]
        if len(inferred) > 1:
            return f"the target shape {target} has more than one -1"
        for i, same in enumerate(kept):
            if not same and i not in inferred:
                return f"dim {i} changes from {dims[i]} to {target[i]}"
        if inferred:
            # -1 is x's dim only when the other dims are known positive sizes (a 0 or a
            # symbolic dim that may be 0 makes the -1 ambiguous, and ONNX Runtime rejects it)
            others = [d for i, d in enumerate(dims) if i != inferred[0]]
            if not all(isinstance(d, int) and d > 0 for d in others):
                return f"the -1 in {target} is not provably dim {inferred[0]} of x"
        return None


class _NoOpExpand(_NoOpToShape):
    """``Expand(x, shape) -> x`` when broadcasting ``x`` to the constant ``shape`` keeps it."""

    def pattern(self, op, x, shape):
        return op.Expand(x, shape)

    def changes(self, context, dims, target):
        if len(target) > len(dims):
            return f"Expand to {target} raises the rank of x ({len(dims)})"
        for t, d in zip(reversed(target), reversed(dims), strict=False):
            if t != 1 and not (isinstance(d, int) and t == d):
                return f"Expand to {target} changes dim {d} of x"
        return None


class _NoOpSlice(pattern.RewriteRuleClassBase):
    """``Slice(x, starts, ends[, axes[, steps]]) -> x`` when the constant slice keeps all of x."""

    def pattern(self, op, x, starts, ends):
        return op.Slice(x, starts, ends, _allow_other_inputs=True)

    def check(self, context, x, starts, ends, **_):
        result = pattern.MatchResult()
        node = context.root
        optional = [node.inputs[i] if len(node.inputs) > i else None for i in (3, 4)]
        arguments = [_constant(v) for v in (starts, ends, *optional)]
        for name, value, array in zip(
            ("starts", "ends", "axes", "steps"), (starts, ends, *optional), arguments, strict=True
        ):
            if value is not None and array is None:
                return result.fail(f"{name} '{value.name}' is not a constant")
        start_list, end_list = (a.reshape(-1).tolist() for a in arguments[:2])
        count = len(start_list)
        axis_list = (
            list(range(count)) if arguments[2] is None else arguments[2].reshape(-1).tolist()
        )
        step_list = [1] * count if arguments[3] is None else arguments[3].reshape(-1).tolist()
        if not len(end_list) == len(axis_list) == len(step_list) == count:
            return result.fail("starts, ends, axes and steps differ in length")
        dims = None if x.shape is None else tuple(x.shape.dims)
        for start, end, axis, step in zip(start_list, end_list, axis_list, step_list, strict=True):
            if step != 1:
                return result.fail(f"step {step} on axis {axis}")
            dim = None
            if dims is not None and -len(dims) <= axis < len(dims) and isinstance(dims[axis], int):
                dim = dims[axis]
            if not (start == 0 or (dim is not None and start <= -dim)):
                return result.fail(f"start {start} on axis {axis} does not clamp to 0")
            if not (end == _INT64_MAX or (dim is not None and end >= dim)):
                return result.fail(f"end {end} on axis {axis} is not provably the end of the dim")
        return result

    def rewrite(self, op, x, **_):
        return _identity_of(op, x)


class _InferenceDropout(pattern.RewriteRuleClassBase):
    """``Dropout(x) -> x`` in inference mode (no training_mode, or a constant false one)."""

    def pattern(self, op, x):
        return op.Dropout(x, _allow_other_inputs=True, _allow_other_attributes=True)

    def check(self, context, x, **_):
        result = pattern.MatchResult()
        node = context.root
        if context.model.opset_imports.get("", 1) < 7 or "is_test" in node.attributes:
            return result.fail("Dropout before opset 7 is in training mode unless is_test=1")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            training = _constant(node.inputs[2])
            if training is None:
                return result.fail("training_mode is not a constant")
            if bool(training.reshape(-1)[0]):
                return result.fail("training_mode is true: Dropout draws random numbers")
        if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
            return result.fail("the mask output is used")
        return result

    def rewrite(self, op, x, **_):
        return _identity_of(op, x)


def no_op_rules() -> pattern.RewriteRuleSet:
    """Rules that turn no-op Transpose, Cast, Reshape, Expand, Slice, Dropout into Identity."""
    return pattern.RewriteRuleSet(
        [
            common_rules.no_op_transpose_rule,
            common_rules.no_op_cast_rule,
            _NoOpReshape.rule(),
            _NoOpExpand.rule(),
            _NoOpSlice.rule(),
            _InferenceDropout.rule(),
        ]
    )


# ---------------------------------------------------------------------------------------------
# Common-subexpression elimination


# Attribute types whose values onnx-ir's CSE can compare; it fails on the others (a type
# attribute holds an unhashable TypeAndShape) or, for a reference attribute, has no value.
_COMPARABLE_ATTRIBUTES = frozenset(
    {
        ir.AttributeType.INT,
        ir.AttributeType.FLOAT,
        ir.AttributeType.STRING,
        ir.AttributeType.INTS,
        ir.AttributeType.FLOATS,
        ir.AttributeType.STRINGS,
        ir.AttributeType.TENSOR,
        ir.AttributeType.GRAPH,  # skipped by onnx-ir's CSE itself
        ir.AttributeType.GRAPHS,
    }
)


def _must_stay_distinct(node: ir.Node) -> bool:
    if node.op_type in NON_DETERMINISTIC_OPS or "Random" in node.op_type:
        return True
    if node.domain not in _DETERMINISTIC_DOMAINS or "Dropout" in node.op_type:
        return True
    if any(
        attr.is_ref() or attr.type not in _COMPARABLE_ATTRIBUTES
        for attr in node.attributes.values()
    ):
        return True
    return node.op_type == "Identity"


@contextlib.contextmanager
def _cse_barriers(graph: ir.Graph) -> Iterator[None]:
    """For a while, give each node of ``graph`` that CSE must not merge one unique attribute.

    The node's own attributes are set aside meanwhile, so that onnx-ir's pass neither compares
    them (it cannot hash some) nor matches the node with another. Nodes with subgraphs are
    left alone: the pass skips them before it reads their attributes.
    """
    stashed = [
        (node, list(node.attributes.values()))
        for node in graph
        if _must_stay_distinct(node) and not has_subgraphs(node)
    ]
    for index, (node, _) in enumerate(stashed):
        node.attributes.clear()
        node.attributes[_CSE_BARRIER] = ir.AttrInt64(_CSE_BARRIER, index)
    try:
        yield
    finally:
        for node, attributes in stashed:
            node.attributes.clear()
            for attr in attributes:
                node.attributes[attr.name] = attr


def eliminate_common_subexpressions(
    model: ir.Model, *, size_limit: int = DEFAULT_CSE_SIZE_LIMIT
) -> bool:
    """Run onnx-ir's CSE on every graph of the model, never merging random or unknown ops."""
    cse = ir_common.CommonSubexpressionEliminationPass(size_limit=size_limit)
    modified = False
    for graph in list(_all_graphs(model)):
        # onnx-ir's pass works on a model's main graph: lend it each graph in turn
        holder = ir.Model(graph, ir_version=model.ir_version)
        output_types = [(value.type, value.shape) for value in graph.outputs]
        with _cse_barriers(graph):
            modified = cse(holder).modified or modified
        # A merged graph output is replaced by the surviving value under the output's name, but
        # keeps the survivor's type, which an intermediate value may lack: restore the output's.
        for value, (type_, shape) in zip(graph.outputs, output_types, strict=True):
            if value.type is None:
                value.type = type_
            if value.shape is None:
                value.shape = shape
    return modified


# ---------------------------------------------------------------------------------------------
# The pass


def _shape_of_graph(model: ir.Model) -> tuple:
    """Counts that any cleanup step changes when it changes the model (for ``modified``)."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    return (
        len(nodes),
        sum(len(n.inputs) for n in nodes),
        sum(len(n.outputs) for n in nodes),
        len(model.graph.initializers),
        tuple(sorted(model.opset_imports.items())),
    )


@register
class CleanupPass(Pass):
    """Lift Constants; remove no-ops, Identity nodes, duplicate initializers, CSE, dead code."""

    name = "cleanup"
    summary = (
        "Turn Constant nodes into initializers; remove no-op and Identity nodes, duplicate "
        "initializers, common subexpressions, dead nodes and initializers."
    )
    semantics = Semantics.EXACT

    def __init__(
        self,
        *,
        deduplicate: bool = True,
        size_limit: int = DEFAULT_DEDUPLICATE_SIZE_LIMIT,
        no_ops: bool = True,
        cse: bool = True,
        lift_constants: bool = True,
    ) -> None:
        self.deduplicate = deduplicate
        self.size_limit = size_limit
        self.no_ops = no_ops
        self.cse = cse
        self.lift_constants = lift_constants

    def call(self, model: ir.Model) -> PassResult:
        """Run the steps once each; ``modified`` is true when any step changed the model."""
        before = _shape_of_graph(model)
        modified = self.lift_constants and lift_constants(model) > 0
        rules = no_op_rules() if self.no_ops else None
        while True:
            # Each rewrite turns a no-op into an Identity, which goes next, so that a no-op that
            # read it sees a typed input in the next round; no rule matches an Identity, so
            # every round that rewrites leaves fewer other nodes, and the loop ends.
            rewrites = rules.apply_to_model(model) if rules is not None else 0
            modified = eliminate_identities(model.graph) > 0 or modified
            for function in model.functions.values():
                modified = eliminate_identities(function) > 0 or modified  # type: ignore[arg-type]
            modified = modified or rewrites > 0
            if not rewrites:
                break
        if self.deduplicate:
            modified = deduplicate_initializers(model, size_limit=self.size_limit) > 0 or modified
        if self.cse:
            modified = eliminate_common_subexpressions(model) or modified
        # RemoveUnusedNodesPass also drops unused optional outputs and trailing empty inputs,
        # and reports neither as a change: the structural counts below catch those.
        for step in (ir_common.RemoveUnusedNodesPass(), ir_common.RemoveUnusedOpsetsPass()):
            modified = step(model).modified or modified
        return PassResult(model, modified or _shape_of_graph(model) != before)
