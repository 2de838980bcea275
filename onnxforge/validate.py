"""Validation of a model from elsewhere, before any of it is deserialised or any weight is read.

A model file is untrusted input. ``onnxforge.io.load`` runs these checks in order; the first
that fails raises :class:`~onnxforge.errors.InputError` with one line naming the file, the
tensor or node, and what is allowed:

1. the file (:func:`validate_file`, from its size and first bytes): not empty, not a pickle or
   a zip archive (a PyTorch checkpoint renamed ``.onnx``; nothing is ever unpickled), not past
   protobuf's 2 GiB limit (weights that large belong in external data);
2. versions (:func:`validate_versions`): the IR version and the opsets of the domains ONNX
   Runtime implements are no newer than the installed ONNX Runtime (and onnx) support;
3. structure: subgraphs nested at most ``MAX_SUBGRAPH_DEPTH`` deep, counting the bodies of the
   model-local functions they call; no local function calls itself, directly or through
   others; inlining every call gives at most ``MAX_INLINED_NODES`` nodes (a function that
   calls another twice, which calls another twice, ... grows exponentially);
4. tensors, everywhere (initializers, sparse initializers, ``Constant`` values and other tensor
   attributes, in every subgraph and function): a known data type; non-negative dimensions
   whose element count and byte size fit in int64 and stay within ``MAX_TENSOR_BYTES``;
   ``raw_data`` exactly as long as the dimensions and type say; typed data fields of the right
   count; at most one place holding the data;
5. shapes: the static shapes declared for graph inputs, outputs and intermediate values, and
   the outputs of ``ConstantOfShape`` nodes with a constant shape, stay within
   ``MAX_TENSOR_BYTES`` (a few bytes of model can otherwise ask for petabytes);
6. external data: only the keys ``location``, ``offset``, ``length`` and ``checksum``, each at
   most once; a location that is a plain relative path (no absolute or Windows drive or UNC
   path, no ``..``, no NUL); a regular file inside the model's folder once symbolic links are
   resolved, with a single hard link (another name could sit anywhere on the file system);
   ``offset`` and ``length`` non-negative integers; ``length`` equal to the tensor's size;
   the tensor's bytes inside the file.

Nothing here reads a weight: external data is checked with ``stat`` and ``realpath`` only, and
the model's protobuf is walked iteratively, so that a deeply nested file cannot exhaust the
Python stack before its depth is known.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import ntpath
import os
import pathlib
import posixpath
import stat
from collections.abc import Iterator, MutableMapping

import onnx
import onnx_ir as ir
from google.protobuf.descriptor import FieldDescriptor

from onnxforge.errors import InputError, first_line

__all__ = [
    "validate_file",
    "validate_bytes",
    "validate_model_proto",
    "validate_versions",
    "runtime_support",
    "RuntimeSupport",
    "iter_tensor_protos",
    "EXTERNAL_DATA_KEYS",
    "MAX_PROTOBUF_BYTES",
    "MAX_SUBGRAPH_DEPTH",
    "MAX_INLINED_NODES",
    "MAX_TENSOR_BYTES",
]

# protobuf cannot parse a message larger than this: bigger models keep their weights outside.
MAX_PROTOBUF_BYTES = (1 << 31) - 1
# Real models nest If/Loop/Scan bodies one to four deep. protobuf's parser stops near 33 levels
# (100 nested messages); passes and runtimes recurse into bodies, so the bound sits well below.
MAX_SUBGRAPH_DEPTH = 16
# Nodes after inlining every call of a model-local function (ONNX Runtime inlines them when it
# loads the model). Large exported models have 10^4 to 10^5 nodes.
MAX_INLINED_NODES = 10_000_000
# The largest tensor a model may declare or create from a constant shape: 1 TiB, more than
# any single machine this runs on can hold.
MAX_TENSOR_BYTES = 1 << 40
EXTERNAL_DATA_KEYS = ("location", "offset", "length", "checksum")
# More dimensions than any shape has: a "shape" tensor longer than this is not read.
_MAX_RANK = 64
_INT64_MAX = (1 << 63) - 1
_ONNX_DOMAINS = ("", "ai.onnx")
# Domains whose opsets ONNX Runtime checks when it loads a model ("" is ai.onnx).
_RUNTIME_DOMAINS = ("", "ai.onnx.ml", "com.microsoft")
# First bytes of files that people rename to .onnx by mistake.
_PICKLE_PROTOCOLS = (2, 3, 4, 5)
_ZIP_MAGIC = b"PK\x03\x04"
# The TensorProto field that holds each data type's values when raw_data is not used, and how
# many entries one element takes.
_TYPED_FIELDS: dict[int, tuple[str, int]] = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
    onnx.TensorProto.STRING: ("string_data", 1),
    **{
        getattr(onnx.TensorProto, name): ("int32_data", 1)
        for name in (
            "INT32",
            "INT16",
            "INT8",
            "UINT16",
            "UINT8",
            "BOOL",
            "FLOAT16",
            "BFLOAT16",
            "FLOAT8E4M3FN",
            "FLOAT8E4M3FNUZ",
            "FLOAT8E5M2",
            "FLOAT8E5M2FNUZ",
            "FLOAT8E8M0",
        )
        if hasattr(onnx.TensorProto, name)
    },
}
# The field that holds an attribute's value, by its type.
_ATTRIBUTE_FIELDS = {
    getattr(onnx.AttributeProto, kind): field
    for kind, field in (
        ("FLOAT", "f"),
        ("INT", "i"),
        ("STRING", "s"),
        ("TENSOR", "t"),
        ("GRAPH", "g"),
        ("SPARSE_TENSOR", "sparse_tensor"),
        ("TYPE_PROTO", "tp"),
        ("FLOATS", "floats"),
        ("INTS", "ints"),
        ("STRINGS", "strings"),
        ("TENSORS", "tensors"),
        ("GRAPHS", "graphs"),
        ("SPARSE_TENSORS", "sparse_tensors"),
        ("TYPE_PROTOS", "type_protos"),
    )
}
# Singular message fields: a value of these types must be present (numbers default to zero).
_MESSAGE_ATTRIBUTE_FIELDS = ("t", "g", "sparse_tensor", "tp")
_SINGULAR_ATTRIBUTE_FIELDS = ("f", "i", "s", *_MESSAGE_ATTRIBUTE_FIELDS)
_DATA_FIELDS = (
    "raw_data",
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


def _size_text(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes} {unit}" if unit == "B" else f"{nbytes:.0f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return f"{nbytes} B"


# ---------------------------------------------------------------------------------------------
# 1. The file


def _check_head(head: bytes, subject: str) -> None:
    """Refuse a pickle or a zip archive by its first bytes; ``subject`` reads "X is"."""
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        raise InputError(
            f"{subject} a Python pickle, not an ONNX model (it was not unpickled)",
            hint="export PyTorch models with `onnxforge export`",
        )
    if head[:4] == _ZIP_MAGIC:
        raise InputError(
            f"{subject} a zip archive (a PyTorch checkpoint, .pt2 or .npz?), not an ONNX model",
            hint="export PyTorch models with `onnxforge export`",
        )


def validate_file(path: pathlib.Path) -> None:
    """Refuse, from its size and first bytes, a file that cannot be an ONNX model."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path} is empty (0 bytes), not an ONNX model")
    if size > MAX_PROTOBUF_BYTES:
        raise InputError(
            f"{path} is {_size_text(size)}, past protobuf's 2 GiB limit for one file",
            hint="a model this large keeps its weights in external data files beside it",
        )
    with open(path, "rb") as file:
        _check_head(file.read(4), f"{path} is")


def validate_bytes(data: bytes) -> None:
    """Refuse, from their length and first bytes, bytes that cannot be an ONNX model."""
    if not data:
        raise InputError("the bytes are empty, not an ONNX model")
    if len(data) > MAX_PROTOBUF_BYTES:
        raise InputError("the bytes are past protobuf's 2 GiB limit for one model")
    _check_head(data[:4], "the bytes are")


# ---------------------------------------------------------------------------------------------
# 2. Versions


@dataclasses.dataclass(frozen=True)
class RuntimeSupport:
    """The newest IR version and opsets that the installed ONNX Runtime and onnx support."""

    runtime: str
    ir_version: int
    opsets: dict[str, int]

    def describe(self) -> str:
        """One phrase: ``IR version <= 13; opsets ai.onnx <= 26, ...``."""
        opsets = ", ".join(f"{domain or 'ai.onnx'} <= {v}" for domain, v in self.opsets.items())
        return f"IR version <= {self.ir_version}; opsets {opsets}"


def _probe_model(ir_version: int, opsets: dict[str, int]) -> bytes:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
    )
    model.ir_version = ir_version
    return model.SerializeToString()


def _runtime_accepts(model: bytes) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusals are the point: keep them quiet
    try:
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception:  # ONNX Runtime raises its own exception types
        return False
    return True


def _largest_accepted(low: int, high: int, accepts) -> int:
    """The largest ``v`` in ``[low, high]`` with ``accepts(v)``, given that ``accepts(low)``."""
    while low < high:
        middle = (low + high + 1) // 2
        if accepts(middle):
            low = middle
        else:
            high = middle - 1
    return low


@functools.cache
def runtime_support() -> RuntimeSupport:
    """What the installed ONNX Runtime loads, found by asking it (a few tiny sessions, once).

    ONNX Runtime has no API for this; its refusals are reliable, so each limit is found by a
    binary search over probe models. Limits are capped by what the installed onnx knows,
    since the passes use onnx's shape inference and reference evaluator.
    """
    import onnxruntime as ort

    base_opset = 7  # Relu-6 and IR version 3 exist from here on
    ir_version = _largest_accepted(
        3, 64, lambda v: _runtime_accepts(_probe_model(v, {"": base_opset}))
    )
    ir_version = min(ir_version, onnx.IR_VERSION)
    opsets = {
        "": min(
            _largest_accepted(
                base_opset, 1024, lambda v: _runtime_accepts(_probe_model(ir_version, {"": v}))
            ),
            onnx.defs.onnx_opset_version(),
        )
    }
    for domain in _RUNTIME_DOMAINS[1:]:
        opsets[domain] = _largest_accepted(
            1,
            1024,
            lambda v, d=domain: _runtime_accepts(_probe_model(ir_version, {"": base_opset, d: v})),
        )
    return RuntimeSupport(f"ONNX Runtime {ort.__version__}", ir_version, opsets)


def validate_versions(
    ir_version: int, opset_imports: dict[str, int], *, source: str, where: str = ""
) -> None:
    """Refuse an IR version or opset newer than the installed ONNX Runtime supports."""
    support = runtime_support()
    prefix = f"{source}: {where}" if where else f"{source}: "
    hint = f"supported: {support.describe()}; upgrade onnxruntime, or re-export for older opsets"
    if ir_version > support.ir_version:
        raise InputError(
            f"{prefix}IR version {ir_version} is newer than {support.runtime} supports "
            f"(IR version <= {support.ir_version})",
            hint=hint,
        )
    for domain, version in opset_imports.items():
        key = "" if domain in _ONNX_DOMAINS else domain
        newest = support.opsets.get(key)
        if newest is not None and version > newest:
            raise InputError(
                f"{prefix}opset {domain or 'ai.onnx'} {version} is newer than "
                f"{support.runtime} supports ({domain or 'ai.onnx'} <= {newest})",
                hint=hint,
            )


# ---------------------------------------------------------------------------------------------
# The walk: every graph and function body, iteratively, with its depth


@dataclasses.dataclass
class _Body:
    """A main graph or a function body: what it holds, for the inlining arithmetic."""

    label: str
    function: tuple[str, str, str] | None = None  # None: the main graph
    nodes: int = 0  # nodes in it and in its subgraphs
    depth: int = 0  # deepest subgraph nesting in it
    calls: list[tuple[tuple[str, str, str], int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Scope:
    """One graph being walked: where it sits, how deep, and the constants it can see."""

    graph: onnx.GraphProto | None
    nodes: list[onnx.NodeProto]
    label: str
    depth: int
    body: _Body
    constants: collections.ChainMap[str, onnx.TensorProto]
    defined: collections.ChainMap[str, bool]  # the value names visible here


def _function_key(domain: str, name: str, overload: str) -> tuple[str, str, str]:
    return (domain, name, overload)


def _function_label(key: tuple[str, str, str]) -> str:
    domain, name, overload = key
    return f"{domain + ':' if domain else ''}{name}{':' + overload if overload else ''}"


def _node_label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "")
    return f"node '{name}' ({node.op_type})"


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH or attribute.HasField("g"):
            yield attribute.name, attribute.g
        for graph in attribute.graphs:
            yield attribute.name, graph


def iter_tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, sparse parts, attributes, all graphs."""
    pending: list[list[onnx.NodeProto]] = [list(f.node) for f in model.functions]
    graphs = [model.graph]
    while graphs or pending:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            for sparse in graph.sparse_initializer:
                yield sparse.values
                yield sparse.indices
            pending.append(list(graph.node))
            continue
        for node in pending.pop():
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                for sparse in [attribute.sparse_tensor, *attribute.sparse_tensors]:
                    if sparse.HasField("values"):
                        yield sparse.values
                    if sparse.HasField("indices"):
                        yield sparse.indices
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


# ---------------------------------------------------------------------------------------------
# The checks


class _Validator:
    def __init__(self, proto: onnx.ModelProto, base_dir: pathlib.Path | None, source: str):
        self.proto = proto
        self.base_dir = base_dir
        self.root = base_dir.resolve() if base_dir is not None else None
        self.source = source
        self.file_sizes: dict[pathlib.Path, int] = {}
        self.functions = {
            _function_key(f.domain, f.name, getattr(f, "overload", "")): f for f in proto.functions
        }

    def fail(self, where: str, problem: str, *, hint: str | None = None) -> InputError:
        return InputError(f"{self.source}: {where}: {problem}", hint=hint)

    def run(self) -> None:
        proto = self.proto
        if proto.ir_version < 1:
            raise InputError(f"{self.source} is not an ONNX model (no IR version)")
        if not proto.HasField("graph") or not proto.graph.output:
            raise InputError(f"{self.source} is not an ONNX model (its graph has no outputs)")
        _check_text(proto, self.source)
        opsets = {o.domain: o.version for o in proto.opset_import}
        validate_versions(proto.ir_version, opsets, source=self.source)
        for function in proto.functions:
            validate_versions(
                proto.ir_version,
                {o.domain: o.version for o in function.opset_import},
                source=self.source,
                where=f"function '{function.name}': ",
            )
        bodies: dict[tuple[str, str, str] | None, _Body] = {}
        main = _Body("the main graph")
        bodies[None] = main
        graph = proto.graph
        self._walk(
            _Scope(
                graph,
                list(graph.node),
                main.label,
                0,
                main,
                collections.ChainMap(),
                collections.ChainMap(),
            )
        )
        for key, function in self.functions.items():
            body = _Body(f"function '{_function_label(key)}'", key)
            bodies[key] = body
            nodes = list(function.node)
            inputs = collections.ChainMap(dict.fromkeys(function.input, True))
            self._walk(_Scope(None, nodes, body.label, 0, body, collections.ChainMap(), inputs))
        self._check_inlining(bodies)

    # --- graphs -------------------------------------------------------------------------------

    def _walk(self, first: _Scope) -> None:
        pending = [first]
        while pending:
            scope = pending.pop()
            if scope.depth > MAX_SUBGRAPH_DEPTH:
                raise self.fail(
                    scope.label,
                    f"subgraphs are nested {scope.depth} deep (at most {MAX_SUBGRAPH_DEPTH})",
                    hint="a model this deep is broken or hostile; real models nest a few levels",
                )
            scope.body.depth = max(scope.body.depth, scope.depth)
            constants = scope.constants.new_child()  # a body sees the constants of its scopes
            defined = scope.defined.new_child()  # ... and the values defined in them
            graph = scope.graph
            if graph is not None:
                self._check_graph(scope, constants)
                for value in [*graph.input, *graph.initializer, *graph.sparse_initializer]:
                    defined[value.values.name if hasattr(value, "values") else value.name] = True
            computed = {name for node in scope.nodes for name in node.output}
            for node in scope.nodes:
                scope.body.nodes += 1
                key = _function_key(node.domain, node.op_type, getattr(node, "overload", ""))
                if key in self.functions:
                    scope.body.calls.append((key, scope.depth))
                self._check_node(node, scope, constants)
                self._check_dataflow(node, scope, defined, computed)
                for name, body in _subgraphs(node):
                    label = f"the '{name}' body of {_node_label(node)}"
                    pending.append(
                        _Scope(
                            body,
                            list(body.node),
                            label,
                            scope.depth + 1,
                            scope.body,
                            constants,
                            defined,
                        )
                    )
                if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS and node.output:
                    for attribute in node.attribute:
                        if attribute.name == "value" and attribute.HasField("t"):
                            constants[node.output[0]] = attribute.t
            for output in graph.output if graph is not None else ():
                if output.name not in defined:
                    raise self.fail(scope.label, f"output '{output.name}' is computed by no node")

    def _check_dataflow(
        self,
        node: onnx.NodeProto,
        scope: _Scope,
        defined: collections.ChainMap[str, bool],
        computed: set[str],
    ) -> None:
        """Every input defined before the node (SSA, in topological order), every output new.

        A node that reads a value defined later, or its own output, would make a cycle in
        the IR, which passes would walk forever.
        """
        where = _node_label(node) + ("" if scope.depth == 0 else f" in {scope.label}")
        for name in node.input:
            if not name or name in defined:
                continue
            if name in computed:
                raise self.fail(
                    where,
                    f"reads '{name}' before it is computed (the graph is out of order, or "
                    "has a cycle)",
                )
            raise self.fail(where, f"reads '{name}', which nothing defines")
        for name in node.output:
            if not name:
                continue
            if name in defined.maps[0]:
                raise self.fail(where, f"defines '{name}', which is already defined")
            defined[name] = True

    def _check_graph(self, scope: _Scope, constants: MutableMapping[str, onnx.TensorProto]) -> None:
        graph = scope.graph
        assert graph is not None
        where = "" if scope.depth == 0 else f" in {scope.label}"
        for tensor in graph.initializer:
            self._check_tensor(tensor, f"tensor '{tensor.name}'{where}")
            constants[tensor.name] = tensor
        for sparse in graph.sparse_initializer:
            self._check_sparse(sparse, f"sparse tensor '{sparse.values.name}'{where}")
        for kind, infos in (
            ("input", graph.input),
            ("output", graph.output),
            ("value", graph.value_info),
        ):
            for info in infos:
                self._check_value_info(info, f"{kind} '{info.name}'{where}")

    def _check_value_info(self, info: onnx.ValueInfoProto, where: str) -> None:
        kind = info.type.WhichOneof("value")
        if kind not in ("tensor_type", "sparse_tensor_type"):
            return
        tensor_type = getattr(info.type, kind)
        if not tensor_type.HasField("shape"):
            return
        dims = []
        for dim in tensor_type.shape.dim:
            if dim.WhichOneof("value") != "dim_value":
                return  # symbolic: no static size to check
            dims.append(dim.dim_value)
        self._check_size(dims, tensor_type.elem_type, where, "declares shape")

    # --- nodes --------------------------------------------------------------------------------

    def _check_node(
        self, node: onnx.NodeProto, scope: _Scope, constants: MutableMapping[str, onnx.TensorProto]
    ) -> None:
        where = _node_label(node) + ("" if scope.depth == 0 else f" in {scope.label}")
        for attribute in node.attribute:
            at = f"{where} attribute '{attribute.name}'"
            if attribute.ref_attr_name and scope.body.function is None:
                raise self.fail(at, "refers to a function attribute outside any function")
            if not attribute.ref_attr_name:
                self._check_attribute_type(attribute, at)
            if attribute.HasField("t"):
                self._check_tensor(attribute.t, at)
            for tensor in attribute.tensors:
                self._check_tensor(tensor, at)
            if attribute.HasField("sparse_tensor"):
                self._check_sparse(attribute.sparse_tensor, at)
            for sparse in attribute.sparse_tensors:
                self._check_sparse(sparse, at)
        if node.op_type == "ConstantOfShape" and node.domain in _ONNX_DOMAINS and node.input:
            shape = constants.get(node.input[0])
            if shape is not None:
                self._check_constant_of_shape(node, shape, where)

    def _check_attribute_type(self, attribute: onnx.AttributeProto, where: str) -> None:
        """The attribute's type is set, and its value is in that type's field alone."""
        own = _ATTRIBUTE_FIELDS.get(attribute.type)
        kind = onnx.AttributeProto.AttributeType.Name(attribute.type)
        if own is None:
            raise self.fail(where, f"has no valid type ({kind})")
        for field in _ATTRIBUTE_FIELDS.values():
            if field != own and _attribute_has(attribute, field):
                raise self.fail(where, f"is of type {kind} but holds a value in '{field}'")
        if own in _MESSAGE_ATTRIBUTE_FIELDS and not attribute.HasField(own):
            raise self.fail(where, f"is of type {kind} but holds no value")

    def _check_constant_of_shape(
        self, node: onnx.NodeProto, shape: onnx.TensorProto, where: str
    ) -> None:
        if (
            shape.data_location == onnx.TensorProto.EXTERNAL
            or shape.data_type != onnx.TensorProto.INT64
            or math.prod(shape.dims) > _MAX_RANK
        ):
            return  # not a shape ConstantOfShape accepts, or not read here: left to the runtime
        dims = list(onnx.numpy_helper.to_array(shape).reshape(-1).tolist())
        elem_type = onnx.TensorProto.FLOAT
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.HasField("t"):
                elem_type = attribute.t.data_type
        self._check_size(dims, elem_type, where, "would create a tensor of shape")

    # --- tensors ------------------------------------------------------------------------------

    def _check_size(self, dims: list[int], elem_type: int, where: str, what: str) -> int:
        """Refuse negative dims and a size past int64 or MAX_TENSOR_BYTES; the element count."""
        if any(d < 0 for d in dims):
            raise self.fail(where, f"has a negative dimension in {dims}")
        elements = math.prod(dims)
        bits = _bitwidth(elem_type)
        nbytes = (elements * (bits or 8) + 7) // 8
        if elements > _INT64_MAX or nbytes > _INT64_MAX:
            raise self.fail(where, f"{what} {dims}, whose size overflows int64")
        if nbytes > MAX_TENSOR_BYTES:
            raise self.fail(
                where,
                f"{what} {dims} ({_size_text(nbytes)}), past the "
                f"{_size_text(MAX_TENSOR_BYTES)} budget for one tensor",
                hint="no machine can hold it; the model is broken or hostile",
            )
        return elements

    def _check_sparse(self, sparse: onnx.SparseTensorProto, where: str) -> None:
        self._check_size(list(sparse.dims), sparse.values.data_type, where, "has shape")
        self._check_tensor(sparse.values, f"{where} values")
        self._check_tensor(sparse.indices, f"{where} indices")

    def _check_tensor(self, tensor: onnx.TensorProto, where: str) -> None:
        data_type = tensor.data_type
        if (
            data_type == onnx.TensorProto.UNDEFINED
            or _bitwidth(data_type) is None
            and (data_type != onnx.TensorProto.STRING)
        ):
            raise self.fail(where, f"has an unknown data type ({data_type})")
        elements = self._check_size(list(tensor.dims), data_type, where, "has shape")
        if tensor.segment.begin or tensor.segment.end:
            raise self.fail(where, "is a segment of a tensor, which onnxforge does not read")
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        present = [f for f in _DATA_FIELDS if _has_field(tensor, f)]
        if external:
            if present:
                raise self.fail(where, f"is marked external but also holds {present[0]}")
            self._check_external(tensor, where, elements)
            return
        if tensor.external_data:
            raise self.fail(where, "has external data entries but is not marked external")
        if len(present) > 1:
            raise self.fail(where, f"holds its data twice ({' and '.join(present)})")
        type_name = onnx.TensorProto.DataType.Name(data_type)
        if not present:
            if elements:
                raise self.fail(where, f"holds no data for its {elements} elements")
            return
        field = present[0]
        if field == "raw_data":
            if data_type == onnx.TensorProto.STRING:
                raise self.fail(where, "is a STRING tensor with raw_data")
            expected = _nbytes(elements, data_type)
            actual = len(tensor.raw_data)
            if actual != expected:
                raise self.fail(
                    where,
                    f"has {actual} bytes of raw_data, but {type_name}{list(tensor.dims)} "
                    f"takes {expected}",
                )
            return
        typed = _TYPED_FIELDS.get(data_type)
        if typed is None:
            return  # sub-byte types packed in int32_data: onnx_ir unpacks and checks them
        name, per_element = typed
        if field != name:
            raise self.fail(where, f"is {type_name} but holds its data in {field}")
        count = len(getattr(tensor, field))
        if count != elements * per_element:
            raise self.fail(
                where,
                f"has {count} values in {field}, but {type_name}{list(tensor.dims)} "
                f"takes {elements * per_element}",
            )

    # --- external data ------------------------------------------------------------------------

    def _check_external(self, tensor: onnx.TensorProto, where: str, elements: int) -> None:
        hint = "external data must be a file in the model's folder, named by a relative path"
        if self.root is None:
            raise self.fail(
                where,
                "refers to external data, which a model given as bytes cannot have",
                hint="load the model from its file",
            )
        entries: dict[str, str] = {}
        for entry in tensor.external_data:
            if entry.key not in EXTERNAL_DATA_KEYS:
                raise self.fail(
                    where,
                    f"has an unknown external data key {entry.key!r}",
                    hint=f"allowed keys: {', '.join(EXTERNAL_DATA_KEYS)}",
                )
            if entry.key in entries:
                raise self.fail(where, f"has the external data key {entry.key!r} twice")
            entries[entry.key] = entry.value
        location = entries.get("location", "")
        if not _is_plain_relative(location):
            raise self.fail(
                where,
                f"external data location {location!r} is not a plain relative path",
                hint=hint,
            )
        offset = self._external_int(entries, "offset", where, default=0)
        length = self._external_int(entries, "length", where, default=None)
        nbytes = _nbytes(elements, tensor.data_type)
        if tensor.data_type == onnx.TensorProto.STRING:
            raise self.fail(where, "is a STRING tensor in external data, which ONNX forbids")
        if length is not None and length != nbytes:
            type_name = onnx.TensorProto.DataType.Name(tensor.data_type)
            raise self.fail(
                where,
                f"external data length {length} does not match {type_name}{list(tensor.dims)}, "
                f"which takes {nbytes} bytes",
            )
        path = self.root / location.replace("\\", "/")
        try:
            resolved = path.resolve()  # symbolic links followed, before anything is opened
        except (OSError, RuntimeError) as error:  # RuntimeError: a link loop (3.10-3.12)
            raise self.fail(
                where, f"external data file {location!r} cannot be resolved: {first_line(error)}"
            ) from None
        if resolved != self.root and self.root not in resolved.parents:
            raise self.fail(
                where,
                f"external data file {location!r} resolves outside the model's folder "
                f"(to {resolved})",
                hint="remove the symbolic link; copy the file into the model's folder",
            )
        try:
            status = resolved.stat()
        except FileNotFoundError:
            raise self.fail(where, f"external data file {location!r} is missing") from None
        except OSError as error:
            raise self.fail(
                where, f"external data file {location!r} cannot be read: {error.strerror}"
            ) from None
        if not stat.S_ISREG(status.st_mode):
            raise self.fail(where, f"external data file {location!r} is not a regular file")
        if status.st_nlink > 1:
            raise self.fail(
                where,
                f"external data file {location!r} has {status.st_nlink} hard links; another "
                "name for it can sit outside the model's folder",
                hint="copy the file instead of linking it (cp, not ln)",
            )
        size = self.file_sizes.setdefault(resolved, status.st_size)
        if offset + nbytes > size:
            raise self.fail(
                where,
                f"external data range {offset}+{nbytes} lies past the end of {location!r} "
                f"({size} bytes): the file is shorter than the tensor",
            )

    def _external_int(
        self, entries: dict[str, str], key: str, where: str, *, default: int | None
    ) -> int | None:
        text = entries.get(key)
        if text is None:
            return default
        if not text.isascii() or not text.isdigit():
            raise self.fail(where, f"external data {key} {text!r} is not a non-negative integer")
        return int(text)

    # --- functions ----------------------------------------------------------------------------

    def _check_inlining(self, bodies: dict[tuple[str, str, str] | None, _Body]) -> None:
        """Refuse recursive functions, and inlining past MAX_INLINED_NODES or the depth bound."""
        expanded: dict[tuple[str, str, str], tuple[int, int]] = {}  # nodes, depth
        state: dict[tuple[str, str, str], str] = {}
        for root in [None, *self.functions]:
            stack: list[tuple[tuple[str, str, str] | None, int]] = [(root, 0)]
            path: list[tuple[str, str, str]] = []
            while stack:
                key, index = stack.pop()
                body = bodies[key]
                if key is not None and index == 0:
                    if state.get(key) == "done":
                        continue
                    state[key] = "active"
                    path.append(key)
                if index < len(body.calls):
                    stack.append((key, index + 1))
                    callee = body.calls[index][0]
                    if state.get(callee) == "active":
                        cycle = path[path.index(callee) :] + [callee]
                        raise self.fail(
                            f"function '{_function_label(callee)}'",
                            "calls itself ("
                            + " -> ".join(_function_label(k) for k in cycle)
                            + "), so it can never be inlined",
                            hint="ONNX functions cannot be recursive",
                        )
                    if state.get(callee) != "done":
                        stack.append((callee, 0))
                    continue
                nodes, depth = body.nodes, body.depth
                for callee, at in body.calls:
                    callee_nodes, callee_depth = expanded[callee]
                    nodes += callee_nodes
                    depth = max(depth, at + callee_depth)
                if nodes > MAX_INLINED_NODES and nodes > body.nodes:
                    raise self.fail(
                        body.label,
                        f"expands to {nodes} nodes once its function calls are inlined "
                        f"(at most {MAX_INLINED_NODES})",
                        hint="functions that call each other repeatedly grow exponentially",
                    )
                if depth > MAX_SUBGRAPH_DEPTH:
                    raise self.fail(
                        body.label,
                        f"subgraphs are nested {depth} deep once its function calls are "
                        f"inlined (at most {MAX_SUBGRAPH_DEPTH})",
                    )
                if key is None:
                    continue
                expanded[key] = (nodes, depth)
                state[key] = "done"
                path.pop()


def _check_text(proto: onnx.ModelProto, source: str) -> None:
    """Refuse a string field (a name, an op type, a doc string) that is not UTF-8 text.

    ONNX's protobuf schema is proto2, which does not check UTF-8 when parsing: such a field
    comes out as bytes, which every later step would trip over. Only string fields are read
    (never tensor data), one message at a time, without recursion.
    """
    pending: list = [proto]
    while pending:
        current = pending.pop()
        for name, is_text, repeated in _fields_of(current.DESCRIPTOR):
            value = getattr(current, name)
            if is_text:
                for text in value if repeated else (value,):
                    if not isinstance(text, str):
                        raise InputError(
                            f"{source}: a {current.DESCRIPTOR.name} field '{name}' holds "
                            f"{bytes(text)[:32]!r}, which is not UTF-8 text"
                        )
            elif repeated:
                pending.extend(value)
            elif current.HasField(name):
                pending.append(value)


@functools.cache
def _fields_of(descriptor) -> tuple[tuple[str, bool, bool], ...]:
    """A message type's string and message fields: ``(name, is_text, repeated)``.

    Tensor data fields are bytes, not strings, and are never read here.
    """
    fields = []
    for field in descriptor.fields:
        if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # protobuf before 5.28
            repeated = field.label == FieldDescriptor.LABEL_REPEATED
        fields.append((field.name, field.type == FieldDescriptor.TYPE_STRING, repeated))
    return tuple(fields)


def _attribute_has(attribute: onnx.AttributeProto, field: str) -> bool:
    if field in _SINGULAR_ATTRIBUTE_FIELDS:
        return attribute.HasField(field)
    return len(getattr(attribute, field)) > 0


def _has_field(tensor: onnx.TensorProto, field: str) -> bool:
    if field == "raw_data":
        return tensor.HasField("raw_data")
    return len(getattr(tensor, field)) > 0


@functools.cache
def _bitwidth(data_type: int) -> int | None:
    try:
        return ir.DataType(data_type).bitwidth
    except (ValueError, TypeError):
        return None


def _nbytes(elements: int, data_type: int) -> int:
    return (elements * (_bitwidth(data_type) or 8) + 7) // 8


def _is_plain_relative(location: str) -> bool:
    """A relative path without ``..``, drive, UNC prefix, root or NUL, in either spelling."""
    if not location or "\x00" in location:
        return False
    windows = ntpath.splitdrive(location)[0]
    if windows or location.startswith(("/", "\\")) or posixpath.isabs(location):
        return False
    parts = location.replace("\\", "/").split("/")
    return ".." not in parts and any(p not in ("", ".") for p in parts)


def validate_model_proto(
    proto: onnx.ModelProto, *, base_dir: str | os.PathLike[str] | None, source: str
) -> None:
    """Run checks 2 to 6 of the module docstring on a parsed model; raises InputError.

    ``base_dir`` is the folder of the model file (external data must sit inside it), or None
    for a model given as bytes, which may not refer to external data at all.
    """
    folder = pathlib.Path(base_dir) if base_dir is not None else None
    _Validator(proto, folder, source).run()
