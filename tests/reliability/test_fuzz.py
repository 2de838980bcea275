"""Fuzzing load -> validate -> cleanup with hypothesis (atheris is not needed).

Three targets:

- bytes: a well-formed model (initializers, a Constant, an If with two bodies, a local
  function) serialised, then mutated (bytes flipped, cut, inserted, spliced), or random bytes;
- fields: the same model with a few protobuf fields changed (names, types, dims, attribute
  kinds, data cut short, list entries dropped or repeated), which gives valid protobuf and odd
  ONNX, so most of these get past parsing and into validation and cleanup. ``load`` must
  either give a model or raise :class:`~onnxforge.errors.InputError`; a model it gives must go
  through ``cleanup`` and be saved and loaded again without any other exception.
- external data: the same model's weight in external data with random entries (keys, values,
  paths with ``..``, drives, links). ``load`` must refuse, or give a model whose every external
  tensor lies inside the model's folder and reads without error.

Run longer with ``--hypothesis-profile=fuzz`` (set below) or by raising ``FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxforge
from onnxforge.errors import InputError
from onnxforge.passes import CleanupPass

from . import hostile

FUZZ_EXAMPLES = int(os.environ.get("ONNXFORGE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def seed_model() -> onnx.ModelProto:
    """A small model that holds one of everything the validator walks."""
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["t"])], "then", [], [hostile.vector("t")]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["e"])], "else", [], [hostile.vector("e")]
    )
    function = helper.make_function(
        "local", "double", ["u"], ["v"], [helper.make_node("Add", ["u", "u"], ["v"])],
        [helper.make_opsetid("", hostile.OPSET)],
    )  # fmt: skip
    value = numpy_helper.from_array(np.array([2.0], np.float32), "two_value")
    nodes = [
        helper.make_node("Constant", [], ["two"], value=value),
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("Add", ["m", "bias"], ["a"]),
        helper.make_node("Identity", ["a"], ["i"]),
        helper.make_node("ReduceSum", ["i"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["b"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("double", ["b"], ["y"], domain="local"),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    bias = numpy_helper.from_array(hostile.bias(), "bias")
    return hostile.model_proto(
        nodes,
        initializers=[bias, zero],
        functions=[function],
        opsets={"": hostile.OPSET, "local": 1},
    )


SEED = seed_model().SerializeToString()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x3A]))
        elif kind == "cut":
            data = data[:at] + data[at + draw(st.integers(1, 64)) :]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "splice":
            start = draw(st.integers(0, len(SEED) - 1))
            data[at:at] = SEED[start : start + draw(st.integers(1, 128))]
    return bytes(data)


_INTS = (0, 1, -1, 2, 7, 13, 99, 2**31, 2**63 - 1, -(2**63))
_NAMES = ("x", "y", "a", "b", "c", "two", "bias", "zero", "m", "", "local", "double", "If")


def _repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return field.label == field.LABEL_REPEATED if repeated is None else repeated


def _message_fields(proto) -> list[tuple[object, object]]:
    """Every (message, field descriptor) pair reachable from ``proto``, without recursion."""
    found, pending = [], [proto]
    while pending:
        message = pending.pop()
        for field in message.DESCRIPTOR.fields:
            found.append((message, field))
            if field.type != field.TYPE_MESSAGE:
                continue
            value = getattr(message, field.name)
            if _repeated(field):
                pending.extend(value)
            elif message.HasField(field.name):
                pending.append(value)
    return found


@st.composite
def edited(draw) -> bytes:
    """The seed model with a few of its fields changed: structurally valid protobuf, odd ONNX."""
    proto = seed_model()
    for _ in range(draw(st.integers(1, 4))):
        fields = _message_fields(proto)
        message, field = fields[draw(st.integers(0, len(fields) - 1))]
        repeated = _repeated(field)
        value = getattr(message, field.name)
        if repeated:
            if len(value) and draw(st.booleans()):
                del value[draw(st.integers(0, len(value) - 1))]
            elif len(value) and field.type == field.TYPE_MESSAGE:
                value.add().CopyFrom(value[draw(st.integers(0, len(value) - 1))])
            elif field.type in (field.TYPE_INT64, field.TYPE_INT32):
                value.append(draw(st.sampled_from(_INTS)) % 2**31)
            elif field.type == field.TYPE_STRING:
                value.append(draw(st.sampled_from(_NAMES)))
        elif field.type == field.TYPE_MESSAGE:
            message.ClearField(field.name)
        elif field.type == field.TYPE_STRING:
            setattr(message, field.name, draw(st.sampled_from(_NAMES)))
        elif field.type == field.TYPE_BYTES:
            setattr(message, field.name, value[: draw(st.integers(0, len(value)))])
        elif field.type == field.TYPE_FLOAT:
            setattr(message, field.name, draw(st.sampled_from([0.0, -1.0, float("nan")])))
        elif field.type in (field.TYPE_INT64, field.TYPE_INT32, field.TYPE_ENUM):
            bits = 31 if field.type != field.TYPE_INT64 else 63
            number = draw(st.sampled_from(_INTS))
            if field.type == field.TYPE_ENUM:
                number = draw(st.sampled_from([v.number for v in field.enum_type.values]))
            setattr(message, field.name, max(min(number, 2**bits - 1), -(2**bits)))
    return proto.SerializeToString()


def _round_trip(model: ir.Model) -> None:
    CleanupPass()(model)
    with tempfile.TemporaryDirectory() as folder:
        saved = onnxforge.save(model, pathlib.Path(folder) / "out.onnx")
        onnxforge.load(saved)


def _load_or_refuse(data: bytes) -> None:
    """Load ``data``: a one-line InputError, or a model that survives cleanup and a save."""
    try:
        model = onnxforge.load(data)
    except InputError as error:
        assert str(error) and "\n" not in str(error).strip()
        return
    _round_trip(model)


@FUZZ
@given(data=mutated())
def test_mutated_bytes_load_or_are_refused(data):
    _load_or_refuse(data)


@FUZZ
@given(data=edited())
def test_edited_models_load_or_are_refused(data):
    _load_or_refuse(data)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_load_or_are_refused(data):
    try:
        onnxforge.load(data)
    except InputError:
        return


_KEYS = st.sampled_from(["location", "offset", "length", "checksum", "basepath", "LOCATION", ""])
_LOCATIONS = st.sampled_from(
    [
        "weights.data", "./weights.data", "sub/w.data", "sub/../weights.data", "../secret.bin",
        "/etc/hostname", "C:\\weights.data", "C:weights.data", "\\\\host\\share\\w", "link.data",
        "dirlink/secret.bin", "sub", "", ".", "weights.data\x00", "missing.data", "sub//w.data",
    ]
)  # fmt: skip
_NUMBERS = st.one_of(
    st.integers(-8, 4096).map(str),
    st.sampled_from(["", "0x10", "1e3", " 4", "+4", "٣", str(2**70), "-0"]),
)


@st.composite
def external_entries(draw) -> list[tuple[str, str]]:
    entries = []
    for _ in range(draw(st.integers(0, 5))):
        key = draw(_KEYS)
        value = draw(_LOCATIONS) if key.lower() == "location" else draw(_NUMBERS)
        entries.append((key, value))
    if draw(st.booleans()):
        entries.insert(0, ("location", draw(_LOCATIONS)))
    return entries


@FUZZ
@given(entries=external_entries())
def test_random_external_data_entries_never_read_outside_the_folder(entries):
    with tempfile.TemporaryDirectory() as root:
        outside = pathlib.Path(root)
        (outside / "secret.bin").write_bytes(np.full(hostile.WIDTH, 7, np.float32).tobytes())
        folder = outside / "m"
        (folder / "sub").mkdir(parents=True)
        (folder / "weights.data").write_bytes(hostile.bias().tobytes())
        (folder / "sub" / "w.data").write_bytes(hostile.bias().tobytes())
        (folder / "link.data").symlink_to(outside / "secret.bin")
        (folder / "dirlink").symlink_to(outside)
        tensor = TensorProto(name="bias", data_type=TensorProto.FLOAT, dims=[hostile.WIDTH])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in entries:
            tensor.external_data.add(key=key, value=value)
        path = folder / "model.onnx"
        path.write_bytes(hostile.tiny_proto(tensor).SerializeToString())
        try:
            model = onnxforge.load(path)
        except InputError:
            return
        weight = model.graph.initializers["bias"].const_value
        assert isinstance(weight, ir.ExternalTensor)
        resolved = pathlib.Path(weight.path).resolve()
        assert folder.resolve() in resolved.parents, (entries, resolved)
        assert weight.numpy().tobytes() == hostile.bias().tobytes()  # never the secret
