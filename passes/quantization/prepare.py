"""Getting a model ready for ONNX Runtime's quantizer, on the IR, before the proto boundary.

ONNX Runtime's quantizer reads ONNX shape inference's value types, knows only the ops in its
registries, and names nodes to exclude by name. After ``fuse`` a graph holds ``com.microsoft``
ops that ONNX shape inference cannot type, so the quantizer stops with "Unable to find data
type for weight_name". These steps help it, each exact (the float model computes the same):

- :func:`annotate_types`: ONNX shape inference, then the output types of contrib ops read off
  ONNX Runtime's own op schemas (a type parameter bound to a typed input takes its type, one
  with a single allowed type takes that), and inference again downstream, until every value of
  the main graph that can have a type has one. ONNX Runtime's symbolic shape inference knows
  these ops too, but it fails on common exported graphs (an ``Expand`` of a computed shape in
  MiniLM), and the quantizer needs types, not shapes;
- :func:`unfuse_activations`: ``FusedConv``/``FusedGemm`` (from ``fuse``) back to Conv/Gemm
  followed by their activation, where the mode quantizes Conv/Gemm. The quantizer has no entry
  for the fused ops, so they would stay float; in QDQ form ONNX Runtime folds a Relu or Clip
  into the quantized output's range anyway;
- :func:`drop_redundant_qkv_sizes`: ``Attention``'s ``qkv_hidden_sizes`` attribute when the
  three sizes are equal (the default split): ONNX Runtime's quantizer leaves an Attention that
  has the attribute in float instead of making it a ``QAttention``;
- :func:`split_bias_gelu` and :func:`lower_skip_layer_norm` (dynamic mode): fused float ops
  split back into ops that ONNX Runtime runs faster next to integer MatMuls (each function
  gives its measurements);
- :func:`flatten_channels_last` (static mode with Conv quantized): a CNN head that flattens
  ``N x C x H x W`` into a Gemm or MatMul flattens in ``N x H x W x C`` order instead, with the
  weight's rows permuted to match (the same products, summed in another order). ONNX Runtime
  runs quantized convolutions channels-last and transposes back before a flatten; on two
  threads here that Transpose of a 256 x 64 x 2 x 2 uint8 tensor took 0.22-0.46 ms, as long as
  the convolutions. Flattening channels-last puts a Transpose in the graph that cancels it;
- :func:`name_nodes`: a unique name for every node, since exclusions go by name;
- :func:`quantized_ops`: the ops that show a model is quantized already (``quantize`` is then
  a no-op, so that a second run never quantizes twice).
"""

from __future__ import annotations

import collections
import functools
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxforge.passes.fusion_rules._values import ONNX_DOMAINS, unique_initializer_name
from onnxforge.passes.fusion_rules.normalization import lower_skip_layer_norm

__all__ = [
    "QUANTIZED_OPS",
    "quantized_ops",
    "name_nodes",
    "unfuse_activations",
    "drop_redundant_qkv_sizes",
    "split_bias_gelu",
    "lower_skip_layer_norm",
    "flatten_channels_last",
    "annotate_types",
]

logger = logging.getLogger(__name__)

# Ops that only appear in a model that is quantized already (QDQ, QOperator or dynamic form).
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearWhere",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulIntegerToFloat",
        "MatMulNBits",
    }
)

_CONTRIB_DOMAIN = "com.microsoft"
# Rounds of "type contrib outputs, then infer downstream": each round reaches one more layer of
# contrib ops fed only by contrib ops; real graphs need two or three.
_MAX_TYPING_ROUNDS = 8


def quantized_ops(model: ir.Model) -> dict[str, int]:
    """How many nodes of each quantized op the model holds, subgraphs included."""
    counts = collections.Counter(
        node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type in QUANTIZED_OPS
    )
    return dict(sorted(counts.items()))


def name_nodes(model: ir.Model) -> int:
    """Give every main-graph node a unique name (``OpType_index`` when it has none)."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(model.graph):
        name = node.name
        if not name or name in seen:
            base = name or f"{node.op_type}_{index}"
            name, suffix = base, 0
            while name in seen:
                suffix += 1
                name = f"{base}_{suffix}"
            node.name = name
            renamed += 1
        seen.add(name)
    return renamed


# -- flatten channels-last ------------------------------------------------------------------------


def _static_dims(value: ir.Value) -> list[int] | None:
    if value.shape is None:
        return None
    dims = list(value.shape)
    return dims if all(isinstance(d, int) for d in dims[1:]) else None


def _flattened_weight_reader(value: ir.Value, flat: int) -> tuple[ir.Node, ir.Value, bool] | None:
    """The Gemm/MatMul that reads ``value`` as its left operand, against a constant weight.

    ``value`` must have no other use; the weight must have ``flat`` rows (columns when the
    Gemm transposes it). Returns (node, weight, weight is transposed), else None.
    """
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].idx != 0:
        return None
    reader = uses[0].node
    if reader.domain not in ONNX_DOMAINS or reader.op_type not in ("Gemm", "MatMul"):
        return None
    if len(reader.inputs) < 2 or reader.inputs[1] is None:
        return None
    weight = reader.inputs[1]
    if weight.const_value is None or weight.is_graph_input() or weight.shape is None:
        return None
    transposed = reader.op_type == "Gemm" and reader.attributes.get_int("transB", 0) == 1
    if reader.op_type == "Gemm" and reader.attributes.get_int("transA", 0) != 0:
        return None
    dims = list(weight.shape)
    if len(dims) != 2 or dims[1 if transposed else 0] != flat:
        return None
    return reader, weight, transposed


def _is_channels_last(value: ir.Value) -> bool:
    """Whether ``value`` is a Transpose to channels-last (this rewrite's own, on a rerun)."""
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "Transpose"
        and list(producer.attributes.get_ints("perm", [])) == [0, 2, 3, 1]
    )


def flatten_channels_last(model: ir.Model) -> list[str]:
    """``Gemm(Flatten(x), W)`` -> ``Gemm(Flatten(Transpose(x, NHWC)), W')``, W' permuted to match.

    Returns the names of the Gemm/MatMul nodes whose input now flattens channels-last. ``x`` is
    ``N x C x H x W`` with C, H, W known and H x W > 1, flattened to ``N x CHW`` by Flatten
    (axis 1) or Reshape and read only by a Gemm or MatMul with a constant weight of CHW rows
    (columns when transposed). Each output is the same sum of the same products, in another
    order. A weight that other nodes read too is copied.
    """
    graph = model.graph
    rewritten: list[str] = []
    for node in list(graph):
        if node.domain not in ONNX_DOMAINS or node.op_type not in ("Flatten", "Reshape"):
            continue
        if node.op_type == "Flatten" and node.attributes.get_int("axis", 1) != 1:
            continue
        x, flat_value = node.inputs[0], node.outputs[0]
        dims = _static_dims(x) if x is not None else None
        if dims is None or len(dims) != 4 or dims[2] * dims[3] == 1 or _is_channels_last(x):
            continue
        _, channels, height, width = dims
        flat = channels * height * width
        out = _static_dims(flat_value)
        if out is None or len(out) != 2 or out[1] != flat:
            continue
        found = _flattened_weight_reader(flat_value, flat)
        if found is None:
            continue
        reader, weight, transposed = found
        array = weight.const_value.numpy()
        if transposed:  # K x (C, H, W) -> K x (H, W, C)
            k = array.shape[0]
            permuted = array.reshape(k, channels, height, width).transpose(0, 2, 3, 1)
            permuted = permuted.reshape(k, flat)
        else:  # (C, H, W) x K -> (H, W, C) x K
            k = array.shape[1]
            permuted = array.reshape(channels, height, width, k).transpose(1, 2, 0, 3)
            permuted = permuted.reshape(flat, k)
        tensor = ir.tensor(np.ascontiguousarray(permuted), name=weight.name)
        if len(weight.uses()) == 1 and weight.name in graph.initializers:
            weight.const_value = tensor
        else:
            name = unique_initializer_name(graph, f"{weight.name}_channels_last")
            tensor.name = name
            copy = ir.Value(name=name, type=weight.type, shape=weight.shape, const_value=tensor)
            graph.register_initializer(copy)
            reader.replace_input_with(1, copy)
        transpose = ir.node(
            "Transpose", [x], attributes={"perm": [0, 2, 3, 1]}, name=f"{node.name}_channels_last"
        )
        transpose.outputs[0].name = f"{x.name}_channels_last"
        transpose.outputs[0].type = x.type
        transpose.outputs[0].shape = ir.Shape([x.shape[0], height, width, channels])
        graph.insert_before(node, transpose)
        node.replace_input_with(0, transpose.outputs[0])
        rewritten.append(str(reader.name))
    return rewritten


# -- FusedConv / FusedGemm back to op + activation ------------------------------------------------


def _activation_node(kind: str, params: list[float], x: ir.Value, graph: ir.Graph) -> ir.Node:
    """The ONNX activation that a fused kernel's ``activation``/params stand for."""
    if kind in ("Relu", "Sigmoid", "Tanh"):
        return ir.node(kind, [x])
    if kind == "LeakyRelu":
        return ir.node(kind, [x], attributes={"alpha": params[0]})
    if kind == "HardSigmoid":
        return ir.node(kind, [x], attributes={"alpha": params[0], "beta": params[1]})
    if kind == "Clip":
        bounds = []
        for suffix, bound in zip(("min", "max"), params, strict=True):
            name = f"{x.name}_clip_{suffix}"
            while name in graph.initializers:
                name += "_"
            value = ir.Value(name=name, const_value=ir.tensor(np.float32(bound), name=name))
            value.type = ir.TensorType(ir.DataType.FLOAT)
            value.shape = ir.Shape([])
            graph.register_initializer(value)
            bounds.append(value)
        return ir.node("Clip", [x, *bounds])
    raise ValueError(kind)


def _fused_activation(node: ir.Node) -> tuple[str, list[float]] | None:
    attributes = node.attributes
    if "activation" not in attributes:
        return None
    kind = attributes["activation"].as_string()
    if node.op_type == "FusedConv":
        params = (
            list(attributes["activation_params"].as_floats())
            if "activation_params" in attributes
            else []
        )
    else:
        params = [
            attributes[key].as_float()
            for key in ("activation_alpha", "activation_beta")
            if key in attributes
        ]
    needed = {"Relu": 0, "Sigmoid": 0, "Tanh": 0, "LeakyRelu": 1, "HardSigmoid": 2, "Clip": 2}
    if kind not in needed or len(params) < needed[kind]:
        return None
    return kind, params[: needed[kind]]


_FUSED = {"FusedConv": "Conv", "FusedGemm": "Gemm"}
_FUSED_ONLY_ATTRIBUTES = frozenset(
    {"activation", "activation_params", "activation_alpha", "activation_beta", "activation_gamma"}
)


def unfuse_activations(model: ir.Model, op_types: frozenset[str]) -> list[str]:
    """``FusedConv``/``FusedGemm`` -> Conv/Gemm + activation where ``op_types`` has Conv/Gemm.

    Returns the names of the nodes split. A FusedConv with its fourth input (a residual added
    before the activation) has no plain-ONNX equivalent of two nodes and is left alone.
    """
    graph = model.graph
    split = []
    for node in list(graph):
        plain = _FUSED.get(node.op_type)
        if node.domain != _CONTRIB_DOMAIN or plain not in op_types:
            continue
        if plain == "Conv" and len(node.inputs) > 3 and node.inputs[3] is not None:
            continue
        activation = _fused_activation(node)
        if activation is None:
            continue
        kind, params = activation
        attributes = [
            ir.Attr(a.name, a.type, a.value)
            for a in node.attributes.values()
            if a.name not in _FUSED_ONLY_ATTRIBUTES
        ]
        base = ir.Node("", plain, list(node.inputs), attributes, name=node.name)
        output = node.outputs[0]
        base.outputs[0].name = f"{output.name}_pre_{kind.lower()}"
        base.outputs[0].type = output.type
        base.outputs[0].shape = output.shape
        act = _activation_node(kind, params, base.outputs[0], graph)
        act.name = f"{node.name}_{kind.lower()}"
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [base, act], [output], [act.outputs[0]]
        )
        split.append(base.name)
    return split


def drop_redundant_qkv_sizes(model: ir.Model) -> int:
    """Remove ``qkv_hidden_sizes`` from contrib Attention nodes whose three sizes are equal."""
    dropped = 0
    for node in model.graph:
        if node.domain != _CONTRIB_DOMAIN or node.op_type != "Attention":
            continue
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is None:
            continue
        values = list(sizes.as_ints())
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        width = weight.shape[-1] if weight is not None and weight.shape is not None else None
        # Without the attribute the weight's columns split into three equal parts.
        if len(values) == 3 and len(set(values)) == 1 and width in (None, sum(values)):
            del node.attributes["qkv_hidden_sizes"]
            dropped += 1
    return dropped


def split_bias_gelu(model: ir.Model, quantized: frozenset[str]) -> list[str]:
    """``BiasGelu(MatMul(x, W), b)`` -> ``Gelu(MatMul(x, W) + b)`` where the MatMul is quantized.

    Returns the names of the BiasGelu nodes split. Once the MatMul is quantized, ONNX Runtime
    folds a bias Add that follows it into ``DynamicQuantizeMatMul`` (which takes a bias), and
    runs ``Gelu`` on its own kernel, which uses every thread; ``BiasGelu`` hides the bias from
    that fusion, and its CPU kernel ran on one thread here. Same formula: both are the exact
    (erf) GELU. Needs opset 20 for ONNX's ``Gelu``; below it the contrib ``Gelu`` is used.
    """
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    split = []
    for node in list(graph):
        if node.domain != _CONTRIB_DOMAIN or node.op_type != "BiasGelu" or len(node.inputs) < 2:
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        if producer is None or producer.op_type != "MatMul" or producer.name not in quantized:
            continue
        output = node.outputs[0]
        add = ir.node("Add", list(node.inputs[:2]), name=f"{node.name}_bias")
        add.outputs[0].name = f"{output.name}_biased"
        add.outputs[0].type = output.type
        add.outputs[0].shape = output.shape
        if opset >= 20:
            gelu = ir.node("Gelu", [add.outputs[0]], name=f"{node.name}_gelu")
        else:
            gelu = ir.node("Gelu", [add.outputs[0]], domain=_CONTRIB_DOMAIN, name=node.name)
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [add, gelu], [output], [gelu.outputs[0]]
        )
        split.append(str(node.name))
    return split


# -- types -----------------------------------------------------------------------------------------


@functools.cache
def _ort_schemas() -> dict[tuple[str, str], object]:
    """ONNX Runtime's op schemas (contrib ops included), by (domain, op type)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return {}
    getter = getattr(ort_c, "get_all_operator_schema", None)
    if getter is None:
        return {}
    schemas: dict[tuple[str, str], object] = {}
    for schema in getter():
        key = (schema.domain, schema.name)
        if key not in schemas or schema.since_version > schemas[key].since_version:
            schemas[key] = schema
    return schemas


_TYPE_STRINGS = {
    "tensor(float)": ir.DataType.FLOAT,
    "tensor(float16)": ir.DataType.FLOAT16,
    "tensor(bfloat16)": ir.DataType.BFLOAT16,
    "tensor(double)": ir.DataType.DOUBLE,
    "tensor(int64)": ir.DataType.INT64,
    "tensor(int32)": ir.DataType.INT32,
    "tensor(int8)": ir.DataType.INT8,
    "tensor(uint8)": ir.DataType.UINT8,
    "tensor(bool)": ir.DataType.BOOL,
}


def _formal(formals, index: int):
    if index < len(formals):
        return formals[index]
    variadic = formals and "Variadic" in str(formals[-1].option)
    return formals[-1] if variadic else None


def _output_types(node: ir.Node, schema) -> list[ir.DataType | None]:
    """The output dtypes the schema implies from the node's typed inputs."""
    bound: dict[str, ir.DataType] = {}
    for index, value in enumerate(node.inputs):
        formal = _formal(schema.inputs, index)
        if value is not None and value.dtype is not None and formal is not None:
            bound.setdefault(formal.typeStr, value.dtype)
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    types: list[ir.DataType | None] = []
    for index in range(len(node.outputs)):
        formal = _formal(schema.outputs, index)
        if formal is None:
            types.append(None)
        elif formal.typeStr in bound:
            types.append(bound[formal.typeStr])
        elif formal.typeStr in _TYPE_STRINGS:
            types.append(_TYPE_STRINGS[formal.typeStr])
        elif len(allowed.get(formal.typeStr, ())) == 1:
            types.append(_TYPE_STRINGS.get(allowed[formal.typeStr][0]))
        else:
            types.append(None)
    return types


def _type_contrib_outputs(model: ir.Model) -> int:
    schemas = _ort_schemas()
    typed = 0
    for node in model.graph:
        if node.domain in ONNX_DOMAINS:
            continue
        schema = schemas.get((node.domain, node.op_type))
        if schema is None:
            continue
        for value, dtype in zip(node.outputs, _output_types(node, schema), strict=True):
            if value.dtype is None and dtype is not None and value.uses():
                value.type = ir.TensorType(dtype)
                typed += 1
    return typed


def annotate_types(model: ir.Model) -> int:
    """Give every main-graph value a type where ONNX or ONNX Runtime's schemas imply one.

    Returns the number of contrib-op outputs typed from schemas.
    """
    ir_common.ShapeInferencePass(strict_mode=False)(model)
    total = 0
    for _ in range(_MAX_TYPING_ROUNDS):
        typed = _type_contrib_outputs(model)
        if not typed:
            break
        total += typed
        ir_common.ShapeInferencePass(strict_mode=False)(model)
    return total
