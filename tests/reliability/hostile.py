"""Builders of bad and hostile models, written by the tests into their own folders.

Each builder returns the bytes of a ModelProto (or writes a model with its files and returns its
path); nothing here is a stored fixture file. The models are tiny except where size is the
point, and there the size is declared, not allocated.
"""

from __future__ import annotations

import os
import pathlib
import pickle

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 256  # elements of the tiny model's bias: 1 KiB of float32
OPSET = 20
IR_VERSION = 10


class Payload:
    """Unpickling this touches ``marker``: proof that a pickle's code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def model_proto(
    nodes: list[onnx.NodeProto],
    *,
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    initializers: list[onnx.TensorProto] = (),
    functions: list[onnx.FunctionProto] = (),
    opsets: dict[str, int] | None = None,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """A ModelProto around ``nodes`` (x: float[N, WIDTH] -> y by default)."""
    graph = helper.make_graph(
        nodes,
        "g",
        inputs if inputs is not None else [vector("x")],
        outputs if outputs is not None else [vector("y")],
        initializer=list(initializers),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in (opsets or {"": OPSET}).items()],
        functions=list(functions),
    )
    model.ir_version = ir_version
    return model


def vector(name: str, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, ["N", WIDTH])


def bias() -> np.ndarray:
    return np.linspace(-1.0, 1.0, WIDTH, dtype=np.float32)


def tiny_proto(bias_tensor: onnx.TensorProto | None = None) -> onnx.ModelProto:
    """``y = Relu(x) + bias``: the well-formed model every bad one is a variation of."""
    tensor = bias_tensor if bias_tensor is not None else numpy_helper.from_array(bias(), "bias")
    return model_proto(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "bias"], ["y"])],
        initializers=[tensor],
    )


def external_bias(
    location: str, *, offset: str | None = "0", length: str | None = None, extra=()
) -> onnx.TensorProto:
    """The bias as a tensor whose data is external, with the given entries (as strings)."""
    tensor = TensorProto(name="bias", data_type=TensorProto.FLOAT, dims=[WIDTH])
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", offset), ("length", length), *extra]
    for key, value in entries:
        if value is not None:
            tensor.external_data.add(key=key, value=value)
    return tensor


def write_external_model(
    folder: pathlib.Path, location: str = "weights.data", *, data: bool = True, **entries
) -> pathlib.Path:
    """``folder/model.onnx`` with its bias in ``folder/<location>`` (written when ``data``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if data:
        (folder / "weights.data").write_bytes(bias().tobytes())
    path = folder / "model.onnx"
    path.write_bytes(tiny_proto(external_bias(location, **entries)).SerializeToString())
    return path


# --- tensors ---------------------------------------------------------------------------------


def raw_data_mismatch() -> bytes:
    tensor = numpy_helper.from_array(bias(), "bias")
    tensor.raw_data = tensor.raw_data[:-4]  # one float short
    return tiny_proto(tensor).SerializeToString()


def typed_data_mismatch() -> bytes:
    tensor = TensorProto(name="bias", data_type=TensorProto.FLOAT, dims=[WIDTH])
    tensor.float_data.extend([0.5] * (WIDTH - 1))  # one value short
    return tiny_proto(tensor).SerializeToString()


def dims_overflow() -> bytes:
    tensor = TensorProto(name="bias", data_type=TensorProto.FLOAT, dims=[1 << 32, 1 << 32])
    tensor.raw_data = b"\0" * 16
    return tiny_proto(tensor).SerializeToString()


def negative_dim() -> bytes:
    tensor = TensorProto(name="bias", data_type=TensorProto.FLOAT, dims=[-4])
    tensor.raw_data = b"\0" * 16
    return tiny_proto(tensor).SerializeToString()


def unknown_data_type() -> bytes:
    tensor = numpy_helper.from_array(bias(), "bias")
    tensor.data_type = 99
    return tiny_proto(tensor).SerializeToString()


def constant_of_shape(shape: list[int]) -> bytes:
    """``y = ReduceSum(ConstantOfShape(shape))`` with a constant shape: tiny file, any size."""
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros"),
        helper.make_node("ReduceSum", ["zeros"], ["s"], keepdims=0),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    shape_tensor = numpy_helper.from_array(np.array(shape, np.int64), "shape")
    return model_proto(nodes, initializers=[shape_tensor]).SerializeToString()


def constant_of_shape_from_a_constant_node(shape: list[int]) -> bytes:
    """Like :func:`constant_of_shape`, the shape held by a Constant node."""
    proto = onnx.load_from_string(constant_of_shape(shape))
    shape_tensor = proto.graph.initializer.pop()
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["shape"], value=shape_tensor))
    return proto.SerializeToString()


def huge_declared_output() -> bytes:
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1 << 30, 1 << 30])
    return model_proto(
        [helper.make_node("Relu", ["x"], ["y"])], outputs=[output]
    ).SerializeToString()


# --- versions --------------------------------------------------------------------------------


def with_versions(ir_version: int = IR_VERSION, opsets: dict[str, int] | None = None) -> bytes:
    proto = model_proto(
        [helper.make_node("Relu", ["x"], ["y"])], opsets=opsets, ir_version=ir_version
    )
    return proto.SerializeToString()


# --- subgraphs and functions -----------------------------------------------------------------


def _branch(name: str, source: str = "x") -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", [source], [name])], name, [], [vector(name)]
    )


def deep_if(depth: int) -> bytes:
    """If nodes nested ``depth`` deep (each then-branch holds the next If), built with onnx."""
    body = _branch("y0")
    for level in range(1, depth + 1):
        node = helper.make_node(
            "If", ["c"], [f"y{level}"], then_branch=body, else_branch=_branch(f"e{level}")
        )
        body = helper.make_graph([node], f"b{level}", [], [vector(f"y{level}")])
    inputs = [helper.make_tensor_value_info("c", TensorProto.BOOL, []), vector("x")]
    return model_proto(
        list(body.node), inputs=inputs, outputs=list(body.output)
    ).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field: appended to a message, it adds that field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def deep_if_bytes(depth: int) -> bytes:
    """Like :func:`deep_if`, encoded by hand: protobuf itself cannot build past ~33 levels."""
    graph_node, node_attribute, attribute_g, model_graph = 1, 5, 6, 7
    body = _branch("y0").SerializeToString()
    for level in range(1, depth + 1):
        then_attribute = onnx.AttributeProto(
            name="then_branch", type=onnx.AttributeProto.GRAPH
        ).SerializeToString() + _field(attribute_g, body)
        else_attribute = helper.make_attribute("else_branch", _branch(f"e{level}"))
        node = helper.make_node("If", ["c"], [f"y{level}"])
        node_bytes = (
            node.SerializeToString()
            + _field(node_attribute, then_attribute)
            + _field(node_attribute, else_attribute.SerializeToString())
        )
        if level < depth:
            shell = helper.make_graph([], f"b{level}", [], [vector(f"y{level}")])
        else:
            inputs = [helper.make_tensor_value_info("c", TensorProto.BOOL, []), vector("x")]
            shell = helper.make_graph([], "main", inputs, [vector(f"y{level}")])
        body = shell.SerializeToString() + _field(graph_node, node_bytes)
    shell_model = helper.make_model(
        helper.make_graph([], "unused", [], []), opset_imports=[helper.make_opsetid("", OPSET)]
    )
    shell_model.ir_version = IR_VERSION
    shell_model.ClearField("graph")
    return shell_model.SerializeToString() + _field(model_graph, body)


def _function(name: str, calls: list[str]) -> onnx.FunctionProto:
    """A local function ``name(x) -> y`` calling each of ``calls`` in turn (Relu if none)."""
    nodes, value = [], "x"
    for index, callee in enumerate(calls):
        nodes.append(helper.make_node(callee, [value], [f"v{index}"], domain="local"))
        value = f"v{index}"
    nodes.append(helper.make_node("Relu", [value], ["y"]))
    return helper.make_function(
        "local", name, ["x"], ["y"], nodes, [helper.make_opsetid("", OPSET)]
    )


def with_functions(functions: list[onnx.FunctionProto], entry: str) -> bytes:
    node = helper.make_node(entry, ["x"], ["y"], domain="local")
    return model_proto(
        [node], functions=functions, opsets={"": OPSET, "local": 1}
    ).SerializeToString()


def recursive_function() -> bytes:
    return with_functions([_function("f", ["f"])], "f")


def mutually_recursive_functions() -> bytes:
    return with_functions(
        [_function("f", ["g"]), _function("g", ["h"]), _function("h", ["f"])], "f"
    )


def exponential_functions(levels: int) -> bytes:
    """``f<k>`` calls ``f<k-1>`` twice: a few hundred bytes that inline to 2**levels nodes."""
    functions = [_function("f0", [])]
    functions += [_function(f"f{k}", [f"f{k - 1}", f"f{k - 1}"]) for k in range(1, levels + 1)]
    return with_functions(functions, f"f{levels}")


# --- files that are not models ---------------------------------------------------------------


def truncated() -> bytes:
    data = tiny_proto().SerializeToString()
    return data[: len(data) // 2]


def random_bytes(seed: int = 0, size: int = 4096) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def pickled(marker: pathlib.Path) -> bytes:
    return pickle.dumps({"weights": Payload(marker)}, protocol=4)


def torch_saved(marker: pathlib.Path) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"weights": Payload(marker)}, buffer)
    return buffer.getvalue()


def snapshot(folder: pathlib.Path) -> dict[str, object]:
    """Every entry under ``folder`` with its content (files), target (links) or kind."""
    entries: dict[str, object] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = pathlib.Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                entries[key] = ("link", os.readlink(path))
            elif path.is_file():
                entries[key] = ("file", path.read_bytes())
            else:
                entries[key] = ("other", path.stat().st_mode)
    return entries
