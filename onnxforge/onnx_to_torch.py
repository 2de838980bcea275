"""An ONNX graph as a trainable ``torch.nn.Module``: the way back from a pruned ``.onnx``.

``prune{granularity=channel}`` writes a model whose layers really have fewer channels; to
retrain it (``onnxforge distill``) it has to be a module again. :func:`onnx_to_torch`
interprets the graph node by node with torch operators, so autograd, ``train()``/``eval()``
and ``torch.export`` all work on it:

- every floating-point initializer of rank >= 1 becomes an ``nn.Parameter`` (rank-0 floats are
  constants such as a scale or an epsilon); BatchNormalization's running mean and variance
  become buffers, updated in training mode with the momentum the node states; integer
  initializers stay constants;
- parameters keep their ONNX names as module paths (``features.0.weight`` is the parameter
  ``weight`` of the submodule ``features.0``), so exporting the module again through the
  frontend gives initializers of the same names; a name that cannot be a module path is
  stored under ``onnx_params.<n>``;
- ``forward`` takes the graph inputs by name, in order, and returns the graph outputs (one
  tensor, or a tuple when the graph has several);
- integer tensors of rank 0 or 1 computed from shapes (``Shape``, ``Gather``, ``Concat``, ...,
  the exporter's batch-size arithmetic) are kept as Python ints, so a dynamic batch stays
  symbolic under ``torch.export`` instead of becoming data.

Limits: main graph only (If, Loop and Scan are refused), default ONNX domain only (fused
``com.microsoft`` ops from ``fuse{target=cpu}`` are refused: distil before fusing), the ops in
:data:`SUPPORTED_OPS` (what the bundled samples export to: convolutions, pooling,
normalisation, Gemm/MatMul, element-wise and activation ops, the reshaping family, softmax,
layer norm, GELU, embeddings); ``auto_pad`` other than ``NOTSET``/``VALID`` is refused;
Dropout is the identity (an exported inference graph has none to train with). An unsupported
graph raises :class:`~onnxforge.errors.InputError` listing what is missing.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxforge.errors import InputError

__all__ = ["OnnxModule", "onnx_to_torch", "SUPPORTED_OPS", "FALLBACK_PARAMETER_MODULE"]

# Parameters whose ONNX names cannot be module paths live here, numbered.
FALLBACK_PARAMETER_MODULE = "onnx_params"
# Integer constants up to this many elements are kept as Python ints (shape arithmetic).
_MAX_INT_LIST = 64
_INT_DTYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.INT16, ir.DataType.INT8)
_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}
_SEGMENT = re.compile(r"^[A-Za-z0-9_]+$")


@dataclasses.dataclass(frozen=True)
class _Ints:
    """An integer tensor of rank 0 or 1 held as Python ints (or SymInts while tracing)."""

    values: tuple
    scalar: bool = False

    def tensor(self) -> torch.Tensor:
        data = torch.tensor(list(self.values), dtype=torch.int64)
        return data.reshape(()) if self.scalar else data


def _as_tensor(value: Any) -> torch.Tensor:
    return value.tensor() if isinstance(value, _Ints) else value


def _ints(value: Any, what: str) -> list:
    """A value as a list of ints: shapes, axes, indices."""
    if isinstance(value, _Ints):
        return list(value.values)
    if isinstance(value, torch.Tensor) and not value.dtype.is_floating_point:
        return [int(v) for v in value.reshape(-1).tolist()]
    raise InputError(f"{what} must be a constant or shape-derived integer tensor")


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attribute = node.attributes.get(name)
    if attribute is None:
        return default
    value = attribute.value
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _broadcast_ints(a: _Ints, b: _Ints, op: Callable[[Any, Any], Any]) -> _Ints:
    left, right = list(a.values), list(b.values)
    if len(left) == 1 and len(right) != 1:
        left = left * len(right)
    if len(right) == 1 and len(left) != 1:
        right = right * len(left)
    return _Ints(tuple(op(x, y) for x, y in zip(left, right, strict=True)), a.scalar and b.scalar)


def _int_div(x: Any, y: Any) -> Any:
    """ONNX integer Div truncates toward zero."""
    quotient = abs(x) // abs(y)
    return quotient if (x >= 0) == (y >= 0) else -quotient


_INT_BINARY = {
    "Add": lambda x, y: x + y,
    "Sub": lambda x, y: x - y,
    "Mul": lambda x, y: x * y,
    "Div": _int_div,
}
_TENSOR_BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}
_UNARY = {
    "Identity": lambda x: x,
    "Dropout": lambda x: x,  # inference graphs: nothing to drop
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Not": torch.logical_not,
    "Softplus": F.softplus,
}


def _binary(node: ir.Node, args: list) -> list:
    a, b = args
    if isinstance(a, _Ints) and isinstance(b, _Ints) and node.op_type in _INT_BINARY:
        return [_broadcast_ints(a, b, _INT_BINARY[node.op_type])]
    a, b = _as_tensor(a), _as_tensor(b)
    if node.op_type == "Div" and not a.dtype.is_floating_point:
        return [torch.div(a, b, rounding_mode="trunc")]
    return [_TENSOR_BINARY[node.op_type](a, b)]


def _variadic(node: ir.Node, args: list) -> list:
    tensors = [_as_tensor(a) for a in args]
    result = tensors[0]
    for t in tensors[1:]:
        result = {"Max": torch.maximum, "Min": torch.minimum}.get(node.op_type, torch.add)(
            result, t
        )
    if node.op_type == "Mean":
        result = result / len(tensors)
    return [result]


def _gelu(node: ir.Node, args: list) -> list:
    return [F.gelu(args[0], approximate=_attr(node, "approximate", "none"))]


def _leaky_relu(node: ir.Node, args: list) -> list:
    return [F.leaky_relu(args[0], _attr(node, "alpha", 0.01))]


def _clip(node: ir.Node, args: list) -> list:
    low = _as_tensor(args[1]) if len(args) > 1 and args[1] is not None else None
    high = _as_tensor(args[2]) if len(args) > 2 and args[2] is not None else None
    return [torch.clamp(args[0], low, high)]


def _pads(node: ir.Node, spatial: int) -> list[int]:
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise InputError(f"{node.op_type} '{node.name}': auto_pad={auto_pad} is not supported")
    pads = _attr(node, "pads") if auto_pad == "NOTSET" else None
    return list(pads) if pads else [0] * (2 * spatial)


def _symmetric_or_pad(x: torch.Tensor, pads: list[int], fill: float) -> tuple[torch.Tensor, list]:
    """Pad explicitly (torch pads both sides alike) when ONNX's begin and end pads differ."""
    spatial = len(pads) // 2
    begins, ends = pads[:spatial], pads[spatial:]
    if begins == ends:
        return x, begins
    torch_pads: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends), strict=True):
        torch_pads += [begin, end]
    return F.pad(x, torch_pads, value=fill), [0] * spatial


def _conv(node: ir.Node, args: list) -> list:
    x, weight = args[0], args[1]
    bias = _as_tensor(args[2]) if len(args) > 2 and args[2] is not None else None
    spatial = weight.dim() - 2
    if spatial not in (1, 2, 3):
        raise InputError(f"Conv '{node.name}': {spatial}-d convolution is not supported")
    x, padding = _symmetric_or_pad(x, _pads(node, spatial), 0.0)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return [
        conv(
            x,
            weight,
            bias,
            stride=_attr(node, "strides", [1] * spatial),
            padding=padding,
            dilation=_attr(node, "dilations", [1] * spatial),
            groups=_attr(node, "group", 1),
        )
    ]


def _pool(node: ir.Node, args: list) -> list:
    x = args[0]
    spatial = x.dim() - 2
    kernel = _attr(node, "kernel_shape")
    strides = _attr(node, "strides", [1] * spatial)
    ceil_mode = bool(_attr(node, "ceil_mode", 0))
    if node.op_type == "MaxPool":
        if len(node.outputs) > 1 and node.outputs[1].uses():
            raise InputError(f"MaxPool '{node.name}': the indices output is not supported")
        x, padding = _symmetric_or_pad(x, _pads(node, spatial), -math.inf)
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        dilation = _attr(node, "dilations", [1] * spatial)
        return [pool(x, kernel, strides, padding, dilation, ceil_mode=ceil_mode)]
    pads = _pads(node, spatial)
    count_include_pad = bool(_attr(node, "count_include_pad", 0))
    if pads[:spatial] != pads[spatial:] and not count_include_pad:
        raise InputError(f"AveragePool '{node.name}': asymmetric pads are not supported")
    x, padding = _symmetric_or_pad(x, pads, 0.0)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
    options = {"ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    return [pool(x, kernel, strides, padding, **options)]


def _global_pool(node: ir.Node, args: list) -> list:
    x = args[0]
    dims = tuple(range(2, x.dim()))
    if node.op_type == "GlobalAveragePool":
        return [x.mean(dim=dims, keepdim=True)]
    return [x.amax(dim=dims, keepdim=True)]


def _reduce(node: ir.Node, args: list) -> list:
    x = args[0]
    axes = _attr(node, "axes")
    if len(args) > 1 and args[1] is not None:
        axes = _ints(args[1], f"{node.op_type} '{node.name}' axes")
    keepdims = bool(_attr(node, "keepdims", 1))
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.dim()))
    dims = tuple(_axis(a, x.dim()) for a in axes)
    reduce = {
        "ReduceMean": lambda: x.mean(dim=dims, keepdim=keepdims),
        "ReduceSum": lambda: x.sum(dim=dims, keepdim=keepdims),
        "ReduceMax": lambda: x.amax(dim=dims, keepdim=keepdims),
        "ReduceMin": lambda: x.amin(dim=dims, keepdim=keepdims),
    }
    return [reduce[node.op_type]()]


def _gemm(node: ir.Node, args: list) -> list:
    a, b = args[0], args[1]
    if _attr(node, "transA", 0):
        a = a.transpose(0, 1)
    if _attr(node, "transB", 0):
        b = b.transpose(0, 1)
    result = torch.matmul(a, b)
    alpha = _attr(node, "alpha", 1.0)
    if alpha != 1.0:
        result = result * alpha
    if len(args) > 2 and args[2] is not None:
        beta = _attr(node, "beta", 1.0)
        c = _as_tensor(args[2])
        result = result + (c if beta == 1.0 else c * beta)
    return [result]


def _matmul(node: ir.Node, args: list) -> list:
    return [torch.matmul(_as_tensor(args[0]), _as_tensor(args[1]))]


class _BatchNorm:
    """BatchNormalization, with the module's training flag and its running buffers."""

    def __init__(self, module: OnnxModule) -> None:
        self.module = module

    def __call__(self, node: ir.Node, args: list) -> list:
        x, scale, bias, mean, var = args[:5]
        if _attr(node, "training_mode", 0):
            raise InputError(f"BatchNormalization '{node.name}': training_mode=1 graphs")
        # ONNX: running = running * momentum + batch * (1 - momentum); torch the other way.
        momentum = 1.0 - _attr(node, "momentum", 0.9)
        return [
            F.batch_norm(
                x,
                mean,
                var,
                scale,
                bias,
                training=self.module.training,
                momentum=momentum,
                eps=_attr(node, "epsilon", 1e-5),
            )
        ]


def _layer_norm(node: ir.Node, args: list) -> list:
    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    axis = _axis(_attr(node, "axis", -1), x.dim())
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        raise InputError(f"LayerNormalization '{node.name}': mean/inv-std outputs are used")
    shape = tuple(x.shape[axis:])
    return [F.layer_norm(x, shape, scale, bias, _attr(node, "epsilon", 1e-5))]


def _softmax(node: ir.Node, args: list) -> list:
    x = args[0]
    axis = _attr(node, "axis", -1)
    if node.op_type == "LogSoftmax":
        return [F.log_softmax(x, dim=axis)]
    return [F.softmax(x, dim=axis)]


def _shape(node: ir.Node, args: list) -> list:
    dims = list(_as_tensor(args[0]).shape)
    start, end = _attr(node, "start", 0), _attr(node, "end")
    return [_Ints(tuple(dims[start:end]))]


def _reshape(node: ir.Node, args: list) -> list:
    x = args[0]
    shape = _ints(args[1], f"Reshape '{node.name}' shape")
    if isinstance(x, _Ints) and len(shape) <= 1:  # to a scalar or a 1-d list: still ints
        return [_Ints(x.values, scalar=not shape)]
    x = _as_tensor(x)
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(node: ir.Node, args: list) -> list:
    x = args[0]
    axis = _axis(_attr(node, "axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


def _transpose(node: ir.Node, args: list) -> list:
    x = args[0]
    perm = _attr(node, "perm") or list(reversed(range(x.dim())))
    return [x.permute(perm)]


def _concat(node: ir.Node, args: list) -> list:
    present = [a for a in args if a is not None]
    if all(isinstance(a, _Ints) for a in present):
        return [_Ints(tuple(v for a in present for v in a.values))]
    tensors = [_as_tensor(a) for a in present]
    return [torch.cat(tensors, dim=_attr(node, "axis"))]


def _axes_of(node: ir.Node, args: list) -> list[int] | None:
    if len(args) > 1 and args[1] is not None:
        return _ints(args[1], f"{node.op_type} '{node.name}' axes")
    return _attr(node, "axes")


def _unsqueeze(node: ir.Node, args: list) -> list:
    x, axes = args[0], _axes_of(node, args)
    if isinstance(x, _Ints) and x.scalar and axes in ([0], [-1]):
        return [_Ints(x.values)]
    x = _as_tensor(x)
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(node: ir.Node, args: list) -> list:
    x, axes = args[0], _axes_of(node, args)
    if isinstance(x, _Ints):
        if len(x.values) != 1 or x.scalar:
            raise InputError(f"Squeeze '{node.name}': cannot squeeze {x.values}")
        return [_Ints(x.values, scalar=True)]
    if axes is None:
        return [x.squeeze()]
    for axis in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def _gather(node: ir.Node, args: list) -> list:
    data, indices = args
    axis = _attr(node, "axis", 0)
    if isinstance(data, _Ints) and isinstance(indices, _Ints):
        picked = tuple(data.values[i] for i in indices.values)
        return [_Ints(picked, scalar=indices.scalar)]
    data, indices = _as_tensor(data), _as_tensor(indices).to(torch.int64)
    axis = _axis(axis, data.dim())
    size = data.shape[axis]
    indices = torch.where(indices < 0, indices + size, indices)
    picked = torch.index_select(data, axis, indices.reshape(-1))
    shape = [*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]]
    return [picked.reshape(shape)]


def _slice(node: ir.Node, args: list) -> list:
    data = args[0]
    starts = _ints(args[1], f"Slice '{node.name}' starts")
    ends = _ints(args[2], f"Slice '{node.name}' ends")
    axes = _ints(args[3], "axes") if len(args) > 3 and args[3] is not None else None
    steps = _ints(args[4], "steps") if len(args) > 4 and args[4] is not None else None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    if isinstance(data, _Ints):
        if axes not in ([0], [-1]):
            raise InputError(f"Slice '{node.name}': integer lists slice along axis 0 only")
        return [_Ints(tuple(data.values[starts[0] : ends[0] : steps[0]]))]
    if any(step < 1 for step in steps):
        raise InputError(f"Slice '{node.name}': negative steps are not supported")
    index: list = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[_axis(axis, data.dim())] = slice(start, end, step)
    return [data[tuple(index)]]


def _cast(node: ir.Node, args: list) -> list:
    x = args[0]
    if node.op_type == "CastLike":
        like = args[1]
        dtype = torch.int64 if isinstance(like, _Ints) else like.dtype
    else:
        dtype = _TORCH_DTYPES.get(ir.DataType(_attr(node, "to")))
        if dtype is None:
            raise InputError(f"Cast '{node.name}': unsupported target type")
    if isinstance(x, _Ints) and not dtype.is_floating_point and dtype != torch.bool:
        return [x]
    return [_as_tensor(x).to(dtype)]


def _expand(node: ir.Node, args: list) -> list:
    x, shape = args[0], _ints(args[1], f"Expand '{node.name}' shape")
    if isinstance(x, _Ints) and len(shape) == 1:
        values = x.values * shape[0] if len(x.values) == 1 and shape[0] != 1 else x.values
        return [_Ints(tuple(values))]
    x = _as_tensor(x)
    return [x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))]


def _where(node: ir.Node, args: list) -> list:
    condition, a, b = (_as_tensor(v) for v in args)
    return [torch.where(condition, a, b)]


def _range(node: ir.Node, args: list) -> list:
    start, limit, delta = args
    if all(isinstance(v, _Ints) for v in args):
        return [torch.arange(start.values[0], limit.values[0], delta.values[0])]
    start, limit, delta = (_as_tensor(v) for v in args)
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _constant_of_shape(node: ir.Node, args: list) -> list:
    shape = _ints(args[0], f"ConstantOfShape '{node.name}' shape")
    value = _attr(node, "value")
    fill = torch.from_numpy(value.numpy().copy()).reshape(()) if value is not None else None
    dtype = fill.dtype if fill is not None else torch.float32
    return [torch.full(shape, fill.item() if fill is not None else 0.0, dtype=dtype)]


def _constant_value(node: ir.Node) -> Any:
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if name in node.attributes:
            value = node.attributes[name].value
            break
    else:
        raise InputError(f"Constant '{node.name}': unsupported attribute kind")
    if name == "value_int":
        return _Ints((int(value),), scalar=True)
    if name == "value_ints":
        return _Ints(tuple(int(v) for v in value))
    if name in ("value_float", "value_floats"):
        return torch.tensor(value, dtype=torch.float32)
    return _constant_tensor(value)


def _constant_tensor(tensor: ir.TensorProtocol) -> Any:
    """A constant tensor: small integer ones as Python ints, the others as tensors."""
    array = np.array(tensor.numpy())  # a writable copy
    if tensor.dtype in _INT_DTYPES and array.ndim <= 1 and array.size <= _MAX_INT_LIST:
        return _Ints(tuple(int(v) for v in array.reshape(-1)), scalar=array.ndim == 0)
    return torch.from_numpy(array)


_STATELESS_OPS: dict[str, Callable[[ir.Node, list], list]] = {
    **{op: (lambda node, args, f=f: [f(_as_tensor(args[0]))]) for op, f in _UNARY.items()},
    **{op: _binary for op in _TENSOR_BINARY},
    **{op: _variadic for op in ("Max", "Min", "Sum", "Mean")},
    "Gelu": _gelu,
    "LeakyRelu": _leaky_relu,
    "Clip": _clip,
    "Conv": _conv,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    **{op: _reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")},
    "Gemm": _gemm,
    "MatMul": _matmul,
    "LayerNormalization": _layer_norm,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Shape": _shape,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Gather": _gather,
    "Slice": _slice,
    "Cast": _cast,
    "CastLike": _cast,
    "Expand": _expand,
    "Where": _where,
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
}
SUPPORTED_OPS: frozenset[str] = frozenset({*_STATELESS_OPS, "BatchNormalization", "Constant"})


def _module_path(name: str) -> list[str] | None:
    parts = name.split(".")
    return parts if all(_SEGMENT.match(part) for part in parts) else None


class OnnxModule(nn.Module):
    """An ONNX graph run with torch operators; parameters named after the initializers."""

    def __init__(self, model: ir.Model) -> None:
        super().__init__()
        _check_supported(model)
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [v.name for v in graph.outputs]
        self._nodes = list(graph)
        self._ops = {**_STATELESS_OPS, "BatchNormalization": _BatchNorm(self)}
        self._constants: dict[str, Any] = {}
        # ONNX name -> (owning submodule path, attribute) of each parameter and buffer.
        self._tensors: dict[str, tuple[str, str]] = {}
        running = {
            node.inputs[i].name
            for node in graph
            if node.op_type == "BatchNormalization"
            for i in (3, 4)
            if len(node.inputs) > i and node.inputs[i] is not None
        }
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None:
                raise InputError(f"initializer '{name}' has no value")
            if tensor.dtype.is_floating_point() and len(tensor.shape) >= 1:
                data = torch.from_numpy(np.array(tensor.numpy()))
                self._add_tensor(name, data, buffer=name in running)
            else:
                self._constants[name] = _constant_tensor(tensor)

    def _add_tensor(self, name: str, data: torch.Tensor, *, buffer: bool) -> None:
        path = _module_path(name)
        if path is None or not self._can_place(path):
            path = [FALLBACK_PARAMETER_MODULE, f"p{len(self._tensors)}"]
        owner: nn.Module = self
        for segment in path[:-1]:
            if segment not in owner._modules:
                owner.add_module(segment, nn.Module())
            owner = owner._modules[segment]
        if buffer:
            owner.register_buffer(path[-1], data)
        else:
            owner.register_parameter(path[-1], nn.Parameter(data))
        self._tensors[name] = (".".join(path[:-1]), path[-1])

    def _can_place(self, path: list[str]) -> bool:
        """Whether ``path`` reaches a free attribute through submodules (or new ones)."""
        owner: nn.Module | None = self
        for segment in path[:-1]:
            if owner is None:
                continue  # below a submodule that does not exist yet: all free
            if segment in owner._modules:
                owner = owner._modules[segment]
            elif hasattr(owner, segment):
                return False
            else:
                owner = None
        return owner is None or not hasattr(owner, path[-1])

    def _initializer(self, name: str) -> Any:
        if name in self._constants:
            return self._constants[name]
        owner_path, attribute = self._tensors[name]
        owner = self.get_submodule(owner_path) if owner_path else self
        return getattr(owner, attribute)

    def run_graph(self, inputs: Sequence[torch.Tensor]) -> Any:
        """Evaluate the graph on ``inputs`` (in graph-input order)."""
        if len(inputs) != len(self.input_names):
            raise InputError(
                f"the graph takes {len(self.input_names)} inputs, got {len(inputs)}",
                hint=f"inputs: {', '.join(self.input_names)}",
            )
        env: dict[str, Any] = dict(zip(self.input_names, inputs, strict=True))
        for node in self._nodes:
            if node.op_type == "Constant":
                results = [_constant_value(node)]
            else:
                args = [self._value(env, v) for v in node.inputs]
                results = self._ops[node.op_type](node, args)
            for output, result in zip(node.outputs, results, strict=False):
                env[output.name] = result
        outputs = [_as_tensor(self._value(env, name)) for name in self.output_names]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _value(self, env: dict[str, Any], value: ir.Value | str | None) -> Any:
        if value is None:
            return None
        name = value if isinstance(value, str) else value.name
        if name == "":
            return None
        if name in env:
            return env[name]
        return self._initializer(name)

    def forward(self, *inputs: torch.Tensor) -> Any:
        """The graph outputs for the graph inputs, given in order."""
        return self.run_graph(inputs)


def _check_supported(model: ir.Model) -> None:
    unsupported: dict[str, int] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            key = f"{node.domain}::{node.op_type}"
        elif node.op_type not in SUPPORTED_OPS:
            key = node.op_type  # If, Loop and Scan among them: bodies are not interpreted
        else:
            continue
        unsupported[key] = unsupported.get(key, 0) + 1
    if unsupported:
        listed = ", ".join(f"{op} x{count}" for op, count in sorted(unsupported.items()))
        raise InputError(
            f"cannot convert the ONNX graph to a torch module: unsupported ops {listed}",
            hint="distil the output of prune before fuse or quantize; supported ops: "
            + ", ".join(sorted(SUPPORTED_OPS)),
        )
    if not any(v.name not in model.graph.initializers for v in model.graph.inputs):
        raise InputError("the ONNX graph has no inputs to train on")


def _identifier(name: str, index: int, taken: set[str]) -> str:
    text = re.sub(r"\W", "_", name) or f"input_{index}"
    if text[0].isdigit() or text in taken or text == "self":
        text = f"input_{index}_{text}"
    return text


def onnx_to_torch(model: ir.Model) -> OnnxModule:
    """A trainable module computing what ``model`` computes (see the module docstring).

    ``forward`` takes the graph inputs as arguments named after them (names that are not
    Python identifiers are made into ones), so that exporting the module through the frontend
    gives inputs of the same names.
    """
    module = OnnxModule(model)
    taken: set[str] = set()
    names = []
    for index, name in enumerate(module.input_names):
        names.append(_identifier(name, index, taken))
        taken.add(names[-1])
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names
    ]

    def forward(self: OnnxModule, *inputs: torch.Tensor) -> Any:
        return self.run_graph(inputs)

    # torch.export and the frontend read the argument names from the signature.
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *parameters]
    )
    forward.__doc__ = OnnxModule.forward.__doc__
    name = re.sub(r"\W", "_", model.graph.name or "graph")
    namespace = {"forward": forward, "__doc__": OnnxModule.__doc__}
    module.__class__ = type(f"OnnxModule_{name}", (OnnxModule,), namespace)
    return module
