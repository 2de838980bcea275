"""Model ensembling as a graph operation: several models become one graph.

``ensemble([a, b, ...], mode=...)`` builds one ``onnx_ir.Model`` whose inputs are shared by
every member and whose outputs combine the members' outputs position by position:

- ``mean``: ``Mean(a_j, b_j, ...)``, the element-wise mean (of logits, for a classifier: the
  members' outputs are combined as they are);
- ``max``: ``Max(a_j, b_j, ...)``, the element-wise maximum;
- ``vote``: majority vote along the last axis: each member votes for its ``ArgMax`` class,
  ``OneHot`` turns the votes into rows and ``Sum`` counts them, so the output holds, for each
  class, the number of members that chose it (its ``ArgMax`` is the majority class; a tie
  goes to the lowest class index, as ``ArgMax`` breaks ties).

Being one graph, the ensemble runs in one ONNX Runtime session (one call, one set of input
copies) and the passes optimise it as one model (``fold-constants,cleanup,fuse`` see all
members at once).

Merging, member by member: every node, value and initializer name is prefixed with the
member's name (``m0.``, ``m1.``, ... or names given), node names too, so nothing clashes; the
inputs are matched by name (or by position) and must agree on element type and rank, with
dimensions equal or symbolic (a fixed size wins over a symbolic one); outputs are matched by
position and must agree likewise. The default-domain opset is the highest of the members' (at
least :data:`MIN_OPSET`); older members are brought up to it with onnxscript's version
converter, which works on the IR. Other domains must agree on their version. Local functions
whose identifiers clash are renamed with the member's prefix. Members are not modified.

Opset conversion is the one proto edge: onnxscript's converter (on the IR) covers opset 18
and up; a member below 18 goes through ONNX's C++ version converter (``onnx.version_converter``
on a proto, converted back at once), and one that neither can convert is refused. Converting
inlines a member's local functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from typing import Literal

import onnx_ir as ir

from onnxforge.errors import InputError, first_line
from onnxforge.passes.statistics import iter_graphs

__all__ = [
    "ensemble",
    "member_names",
    "MODES",
    "MATCH_INPUTS",
    "DEFAULT_MODE",
    "DEFAULT_MATCH_INPUTS",
    "ENSEMBLE_META_KEY",
    "MIN_OPSET",
]

logger = logging.getLogger(__name__)

MODES = ("mean", "max", "vote")
MATCH_INPUTS = ("name", "position")
DEFAULT_MODE = "mean"
DEFAULT_MATCH_INPUTS = "name"
# The merged model's metadata key: the mode and the members (JSON).
ENSEMBLE_META_KEY = "onnxforge.ensemble"
# Mean, Max, Sum, ArgMax and OneHot all have their current form by opset 13.
MIN_OPSET = 13
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Names of the nodes and values that combine the members' outputs start with this.
_COMBINE_PREFIX = "ensemble"


@dataclasses.dataclass
class _Member:
    name: str
    model: ir.Model
    inputs: list[ir.Value]
    outputs: list[ir.Value]


def member_names(labels: Sequence[str]) -> list[str]:
    """Prefixes for members from labels such as file stems: word characters, made unique.

    ``ensemble`` is reserved for the nodes that combine the outputs.
    """
    names: list[str] = []
    for index, label in enumerate(labels):
        base = re.sub(r"\W+", "_", label).strip("_") or f"m{index}"
        name, suffix = base, 1
        while name in names or name == _COMBINE_PREFIX:
            suffix += 1
            name = f"{base}_{suffix}"
        names.append(name)
    return names


def _real_inputs(model: ir.Model) -> list[ir.Value]:
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def _describe(value: ir.Value) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    shape = "?" if value.shape is None else "[" + ",".join(str(d) for d in value.shape) + "]"
    return f"{dtype}{shape}"


def _merge_shapes(values: Sequence[ir.Value], what: str, members: Sequence[str]) -> ir.Shape | None:
    """One shape for values that must agree: equal ranks, equal or symbolic dims."""
    shapes = [v.shape for v in values]
    known = [s for s in shapes if s is not None]
    if not known:
        return None
    rank = len(known[0])

    def mismatch() -> InputError:
        listed = "; ".join(f"{_describe(v)} in {m}" for v, m in zip(values, members, strict=True))
        return InputError(
            f"incompatible {what}: {listed}",
            hint="members must agree on element type and rank, with equal or symbolic dims",
        )

    if any(len(s) != rank for s in known):
        raise mismatch()
    dims: list[int | ir.SymbolicDim] = []
    for axis in range(rank):
        fixed = {d for s in known if isinstance(d := s[axis], int)}
        if len(fixed) > 1:
            raise mismatch()
        dims.append(fixed.pop() if fixed else ir.SymbolicDim(known[0][axis].value))
    return ir.Shape(dims)


def _check_dtypes(values: Sequence[ir.Value], what: str, members: Sequence[str]) -> ir.DataType:
    dtypes = {v.dtype for v in values}
    if len(dtypes) != 1 or None in dtypes:
        listed = "; ".join(f"{_describe(v)} in {m}" for v, m in zip(values, members, strict=True))
        raise InputError(
            f"incompatible {what}: {listed}", hint="members must agree on element types"
        )
    return dtypes.pop()


def _opsets(models: Sequence[ir.Model], names: Sequence[str]) -> dict[str, int]:
    """The merged opset imports; members below the default-domain version are converted."""
    merged: dict[str, int] = {}
    for model, name in zip(models, names, strict=True):
        for domain, version in model.opset_imports.items():
            domain = "" if domain in _DEFAULT_DOMAINS else domain
            if domain in merged and merged[domain] != version and domain != "":
                raise InputError(
                    f"the members import domain '{domain}' at different versions "
                    f"({merged[domain]} and {version} in {name})",
                    hint="only the default ONNX domain can be converted between versions",
                )
            merged[domain] = max(merged.get(domain, version), version)
    merged[""] = max(merged.get("", MIN_OPSET), MIN_OPSET)
    return merged


def _convert_opset(model: ir.Model, target: int, name: str) -> None:
    current = next((v for d, v in model.opset_imports.items() if d in _DEFAULT_DOMAINS), None)
    if current == target:
        return
    if current is None:
        model.opset_imports[""] = target
        return
    from onnxscript.version_converter import convert_version

    converter_logger = logging.getLogger("onnxscript.version_converter")
    level = converter_logger.level
    converter_logger.setLevel(logging.ERROR)  # it warns when it falls back; we log it below
    try:
        # onnxscript's converter works on the IR from opset 18 up; below that, fallback=True
        # hands the member to ONNX's C++ converter, as a proto, and back (a proto edge).
        convert_version(model, target_version=target, fallback=True)
    except Exception as error:
        raise InputError(
            f"cannot convert {name} from opset {current} to {target}: {first_line(error)}",
            hint="export the members at the same opset",
        ) from None
    finally:
        converter_logger.setLevel(level)
    if model.opset_imports.get("", model.opset_imports.get("ai.onnx")) != target:
        raise InputError(
            f"cannot convert {name} from opset {current} to {target}",
            hint="export the members at the same opset",
        )
    logger.info("converted %s from opset %d to %d", name, current, target)


def _prefix_names(member: _Member) -> None:
    """Prefix every node, value and initializer name of the member (inputs are replaced)."""
    prefix = f"{member.name}."
    inputs = set(member.inputs)
    for graph in iter_graphs(member.model):
        for value in [*graph.inputs, *graph.initializers.values()]:
            if value not in inputs and value.name:
                value.name = prefix + value.name
        for node in graph:
            if node.name:
                node.name = prefix + node.name
            for output in node.outputs:
                if output.name:
                    output.name = prefix + output.name


def _rename_clashing_functions(
    member: _Member, functions: dict[ir.OperatorIdentifier, ir.Function]
) -> None:
    renames: dict[ir.OperatorIdentifier, str] = {}
    for identifier, function in member.model.functions.items():
        if identifier in functions:
            renames[identifier] = f"{member.name}_{function.name}"
    calls = [node for graph in iter_graphs(member.model) for node in graph]
    calls += [node for function in member.model.functions.values() for node in function]
    for node in calls:
        new_name = renames.get(node.op_identifier())
        if new_name is not None:
            node.op_type = new_name
    for identifier, function in member.model.functions.items():
        if identifier in renames:
            function.name = renames[identifier]
        functions[function.identifier()] = function


def _match_inputs(members: list[_Member], match: str) -> list[list[ir.Value]]:
    """For each shared input, the member inputs it replaces (one per member, in order)."""
    first = members[0]
    if match == "position":
        for member in members[1:]:
            if len(member.inputs) != len(first.inputs):
                raise InputError(
                    f"{first.name} takes {len(first.inputs)} inputs, {member.name} "
                    f"{len(member.inputs)}"
                )
        return [[m.inputs[i] for m in members] for i in range(len(first.inputs))]
    wanted = [v.name for v in first.inputs]
    groups = []
    for member in members[1:]:
        names = [v.name for v in member.inputs]
        if sorted(names) != sorted(wanted):
            raise InputError(
                f"incompatible inputs: {first.name} takes ({', '.join(wanted)}), "
                f"{member.name} takes ({', '.join(names)})",
                hint="the inputs are matched by name; use position matching "
                "(--match-inputs position) when only the names differ",
            )
    for name in wanted:
        groups.append([next(v for v in m.inputs if v.name == name) for m in members])
    return groups


def _vote(outputs: Sequence[ir.Value], dtype: ir.DataType, name: str) -> list[ir.Node]:
    """ArgMax per member, OneHot over the class axis, Sum: votes per class."""
    nodes: list[ir.Node] = []

    def add(op: str, inputs: Sequence[ir.Value], tag: str, **attributes) -> ir.Value:
        node = ir.node(op, inputs, attributes=attributes, name=f"{_COMBINE_PREFIX}.{name}.{tag}")
        node.outputs[0].name = f"{_COMBINE_PREFIX}.{name}.{tag}"
        nodes.append(node)
        return node.outputs[0]

    shape = add("Shape", [outputs[0]], "shape")
    last = add("Constant", [], "last", value=ir.tensor(-1, dtype=ir.DataType.INT64))
    depth = add("Gather", [shape, last], "depth", axis=0)
    values = add("Constant", [], "values", value=ir.tensor([0, 1], dtype=dtype))
    hot = []
    for index, output in enumerate(outputs):
        choice = add("ArgMax", [output], f"argmax{index}", axis=-1, keepdims=0)
        hot.append(add("OneHot", [choice, depth, values], f"onehot{index}", axis=-1))
    add("Sum", hot, "votes")
    return nodes


def _combine(
    outputs: Sequence[ir.Value], mode: str, name: str, dtype: ir.DataType
) -> tuple[list[ir.Node], ir.Value]:
    scalar = any(o.shape is not None and len(o.shape) < 1 for o in outputs)
    if mode == "vote" and (not dtype.is_floating_point() or scalar):
        raise InputError(
            f"vote needs float outputs with a class axis; output '{name}' is "
            f"{_describe(outputs[0])}",
            hint="use --mode max",
        )
    if mode == "mean" and not dtype.is_floating_point():
        raise InputError(
            f"mean needs float outputs; output '{name}' is {_describe(outputs[0])}",
            hint="use --mode max",
        )
    if mode == "vote":
        nodes = _vote(outputs, dtype, name)
    else:
        op = {"mean": "Mean", "max": "Max"}[mode]
        nodes = [ir.node(op, list(outputs), name=f"{_COMBINE_PREFIX}.{name}.{mode}")]
    result = nodes[-1].outputs[0]
    return nodes, result


def ensemble(
    models: Sequence[ir.Model],
    *,
    mode: Literal["mean", "max", "vote"] = DEFAULT_MODE,
    names: Sequence[str] | None = None,
    match_inputs: Literal["name", "position"] = DEFAULT_MATCH_INPUTS,
) -> ir.Model:
    """One model whose inputs feed every member and whose outputs combine theirs.

    ``names`` are the members' prefixes (default ``m0``, ``m1``, ...). The combined outputs
    keep the first member's output names. See the module docstring for the rules.
    """
    if mode not in MODES:
        raise InputError(f"unknown ensemble mode '{mode}'", hint=f"use {', '.join(MODES)}")
    if match_inputs not in MATCH_INPUTS:
        raise InputError(
            f"unknown input matching '{match_inputs}'", hint=f"use {', '.join(MATCH_INPUTS)}"
        )
    if len(models) < 2:
        raise InputError("an ensemble needs at least two models")
    labels = list(names) if names is not None else [f"m{i}" for i in range(len(models))]
    if len(labels) != len(models):
        raise InputError(f"{len(models)} models but {len(labels)} names")
    labels = member_names(labels)
    opsets = _opsets(models, labels)
    members = []
    for model, label in zip(models, labels, strict=True):
        copy = model.clone()
        _convert_opset(copy, opsets[""], label)
        if not _real_inputs(copy):
            raise InputError(f"{label} has no inputs to share")
        members.append(_Member(label, copy, _real_inputs(copy), list(copy.graph.outputs)))
    counts = {len(m.outputs) for m in members}
    if len(counts) != 1:
        listed = ", ".join(f"{m.name} {len(m.outputs)}" for m in members)
        raise InputError(f"the members have different numbers of outputs: {listed}")

    shared: list[ir.Value] = []
    replaced: list[tuple[ir.Value, ir.Value]] = []
    for group in _match_inputs(members, match_inputs):
        what = f"input '{group[0].name}'"
        dtype = _check_dtypes(group, what, labels)
        value = ir.Value(
            name=group[0].name,
            type=ir.TensorType(dtype),
            shape=_merge_shapes(group, what, labels),
        )
        shared.append(value)
        replaced += [(member_input, value) for member_input in group]

    combined_nodes: list[ir.Node] = []
    combined_outputs: list[ir.Value] = []
    output_names = []
    for j in range(counts.pop()):
        group = [m.outputs[j] for m in members]
        name = group[0].name or f"output_{j}"
        output_names.append(name)
        what = f"output {j} ('{name}')"
        dtype = _check_dtypes(group, what, labels)
        shape = _merge_shapes(group, what, labels)
        nodes, result = _combine(group, mode, name, dtype)
        result.dtype, result.shape = dtype, shape
        combined_nodes += nodes
        combined_outputs.append(result)

    functions: dict[ir.OperatorIdentifier, ir.Function] = {}
    nodes: list[ir.Node] = []
    initializers: list[ir.Value] = []
    for member in members:
        graph = member.model.graph
        _prefix_names(member)
        _rename_clashing_functions(member, functions)
        graph.inputs.clear()
        graph.outputs.clear()
        member_nodes = list(graph)
        graph.remove(member_nodes)
        nodes += member_nodes
        for key in list(graph.initializers):
            initializers.append(graph.initializers.pop(key))
    for old, new in replaced:
        old.replace_all_uses_with(new)

    taken = {v.name for v in shared}
    for value, base in zip(combined_outputs, output_names, strict=True):
        value.name = base if base not in taken else f"{base}_ensemble"
        taken.add(value.name)

    graph = ir.Graph(
        shared,
        combined_outputs,
        nodes=[*nodes, *combined_nodes],
        initializers=initializers,
        opset_imports=opsets,
        name="ensemble",
    )
    merged = ir.Model(
        graph,
        ir_version=max(m.model.ir_version for m in members),
        producer_name="onnxforge",
        functions=list(functions.values()),
    )
    merged.metadata_props[ENSEMBLE_META_KEY] = json.dumps(
        {"mode": mode, "match_inputs": match_inputs, "members": labels}
    )
    logger.info("ensembled %s (%s): %d nodes", ", ".join(labels), mode, graph.num_nodes())
    return merged
