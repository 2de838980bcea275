"""``cuda-layout``: reshape convolutional graphs for cuDNN on ONNX Runtime's CUDA provider.

Three rewrites, each the same function computed in another layout or order. They pay on CUDA
(measured on ResNet-50, batch 32, float16, H200, with the provider options that ``fp16``
records: 2.13 ms -> 1.73 ms) and nowhere else, so the pass belongs to the ``cuda`` preset,
after ``fp16``:

- **space-to-depth stems**. A stride-2 float16 convolution over fewer than 8 channels (an image
  stem: 3 channels, 7x7) gets a generic cuDNN kernel: 0.42 of ResNet-50's 2.13 ms. The same
  sums, over ``x'[n, h, w, (i*2 + j)*C + c] = x[n, c, 2h + i, 2w + j]``, are a stride-1
  convolution with a ``ceil(K/2)``-wide kernel ``W'[o, (i*2 + j)*C + c, t, u] =
  W[o, c, 2t + i - 2a, 2u + j - 2a]`` (zero outside W; ``a`` the offset that keeps the kernel
  inside the padding), over ``4C`` channels padded with zeros to a multiple of 8. ``x'`` is
  built channels-last (Reshape, one Transpose, Reshape, Concat with zeros) and handed to the
  Conv through ``Transpose(0, 3, 1, 2)``, which cancels against the NHWC Transpose that ONNX
  Runtime puts before a channels-last Conv (``prefer_nhwc``). The stem with its layout ops:
  0.42 -> about 0.15 ms, and the input's separate NCHW -> NHWC Transpose (0.08 ms) is gone.
- **ReLU after max-pool**. ``MaxPool(Relu(x)) = Relu(MaxPool(x))``: ReLU is monotonic and
  every window holds at least one element of ``x`` (no ceil mode, padding under the kernel),
  so the ReLU runs on the pooled tensor, a quarter of the size in ResNet's stem. On the CPU
  the ReLU would be lost to FusedConv instead, which is why this is a CUDA rewrite.
- **spatial means as MatMul**. ``ReduceMean(x, axes=[2, 3])`` (and ``GlobalAveragePool``) over
  ``N x C x H x W`` is ``Reshape(x, [N, C, HW]) @ (1/HW)``: ONNX Runtime's CUDA ReduceMean
  goes through cuDNN's reduction (0.05 ms on ResNet-50's 32 x 2048 x 7 x 7), cuBLAS does it in
  a few microseconds. Each output is the sum with every term scaled first: reassociating.
  ``fp16`` keeps a mean in float32 behind a Cast of its float16 input; the MatMul runs on the
  float16 data instead (cuBLAS accumulates in float32 either way), and the Cast moves to the
  small result, or cancels against a Cast back to float16 after it (ResNet-50's head: two
  Casts and a float32 MatMul fewer).

Only nodes of the default ONNX domain with constant weights and known channel and spatial
sizes are rewritten; the batch size may be symbolic.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxforge.passes.base import Pass, PassResult, Semantics
from onnxforge.passes.fusion_rules._values import constant_array, new_initializer, only_reader
from onnxforge.passes.registry import register
from onnxforge.passes.statistics import ONNX_DOMAINS, inferred_copy_values

__all__ = ["CudaLayoutPass", "space_to_depth_weight", "MAX_STEM_CHANNELS"]

FLOAT16 = ir.DataType.FLOAT16
# Convolutions over fewer input channels than this get cuDNN's generic float16 kernels.
MAX_STEM_CHANNELS = 8
# cuDNN's channels-last float16 kernels want channel counts that are multiples of this.
CHANNEL_MULTIPLE = 8
# The element types a spatial mean is rewritten for.
_FLOAT_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)


class _Dims:
    """Known sizes (None where symbolic) and element types of values.

    From the model or, where it has none, from ONNX shape inference on a copy: the pass never
    annotates a model it leaves alone.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._inferred: dict[str, ir.Value] | None = None

    def _copy_of(self, value: ir.Value) -> ir.Value | None:
        if self._inferred is None:
            self._inferred = inferred_copy_values(self.model)
        return self._inferred.get(value.name) if value.name is not None else None

    def __call__(self, value: ir.Value | None) -> list[int | None] | None:
        if value is None:
            return None
        shape = value.shape
        if shape is None:
            copy = self._copy_of(value)
            shape = copy.shape if copy is not None else None
        if shape is None:
            return None
        return [d if isinstance(d, int) else None for d in shape]

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        if value.dtype is not None:
            return value.dtype
        copy = self._copy_of(value)
        return copy.dtype if copy is not None else None


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attribute = node.attributes.get(name)
    return list(attribute.as_ints()) if attribute is not None else default


def _take_over(old: ir.Value, new: ir.Value, suffix: str) -> None:
    """Hand ``old``'s name, type, shape and every use (graph outputs too) to ``new``."""
    name = old.name
    old.name = f"{name}_{suffix}"
    new.name = name
    if old.type is not None:
        new.type = old.type
    if old.shape is not None:
        new.shape = ir.Shape(list(old.shape))
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


def _insert(
    graph: ir.Graph,
    before: ir.Node,
    op: str,
    inputs: list,
    dtype: ir.DataType,
    shape: list,
    **attributes,
) -> ir.Value:
    """A new ``op`` node inserted before ``before``; its output, typed ``dtype`` and ``shape``."""
    created = ir.node(op, inputs, attributes=attributes)
    graph.insert_before(before, created)
    output = created.outputs[0]
    output.type = ir.TensorType(dtype)
    output.shape = ir.Shape(shape)
    return output


# -- space-to-depth stems -----------------------------------------------------------------------


def space_to_depth_weight(weight: np.ndarray, pad: int) -> tuple[np.ndarray, list[int]]:
    """The stride-1 kernel over a space-to-depth(2) input, and its pads, for a stride-2 conv.

    ``weight`` is ``O x C x K x K`` with ``pad`` on every side. The result is
    ``O x 4C x T x T`` with channel ``(i*2 + j)*C + c`` for the input pixel at offset (i, j)
    of each 2x2 block, and ONNX pads ``[a, a, b, b]``.
    """
    out_channels, channels, size, _ = weight.shape
    offsets = [(k - pad - i) // 2 for k in range(size) for i in (0, 1) if (k - pad - i) % 2 == 0]
    low, high = min(offsets), max(offsets)
    taps = high - low + 1
    result = np.zeros((out_channels, 4 * channels, taps, taps), dtype=weight.dtype)
    for i in (0, 1):
        for j in (0, 1):
            block = slice((i * 2 + j) * channels, (i * 2 + j + 1) * channels)
            for t in range(taps):
                for u in range(taps):
                    kh, kw = 2 * (t + low) + pad + i, 2 * (u + low) + pad + j
                    if 0 <= kh < size and 0 <= kw < size:
                        result[:, block, t, u] = weight[:, :, kh, kw]
    return result, [-low, -low, high, high]


def _stem_plan(node: ir.Node, dims_of: _Dims) -> tuple[int | None, ...] | None:
    """(batch, channels, height, width, kernel, pad) of a Conv the stem rewrite applies to.

    None when it does not apply; batch is None when symbolic.
    """
    if node.op_type != "Conv" or node.domain not in ONNX_DOMAINS or len(node.inputs) < 2:
        return None
    x, weight = node.inputs[0], node.inputs[1]
    array = constant_array(weight)
    dims = dims_of(x)
    if array is None or array.dtype != np.float16 or array.ndim != 4 or dims is None:
        return None
    if len(dims) != 4 or None in dims[1:]:
        return None
    batch, channels, height, width = dims
    out_channels, in_channels, size, size_w = array.shape
    if in_channels != channels or channels >= MAX_STEM_CHANNELS or size != size_w:
        return None
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return None
    if node.attributes.get_int("group", 1) != 1 or _ints(node, "dilations", [1, 1]) != [1, 1]:
        return None
    if _ints(node, "strides", [1, 1]) != [2, 2] or height % 2 or width % 2:
        return None
    pads = _ints(node, "pads", [0, 0, 0, 0])
    if len(set(pads)) != 1:
        return None
    pad = pads[0]
    # the rewrite's output is (H/2, W/2): only for the "same"-padded stride-2 conv
    if any((n + 2 * pad - size) // 2 + 1 != n // 2 for n in (height, width)):
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and constant_array(bias) is None:
        return None
    return batch, channels, height, width, size, pad


def _batch_shape(
    graph: ir.Graph, x: ir.Value, batch: int | None, tail: list[int], before: ir.Node
) -> ir.Value:
    """``[N, *tail]`` for ``x``'s batch size N: a constant when N is known, else from Shape."""
    if batch is not None:
        shape = np.array([batch, *tail], np.int64)
        return new_initializer(graph, f"{x.name}_s2d_zeros_shape", shape)
    int64 = ir.DataType.INT64
    shape = _insert(graph, before, "Shape", [x], int64, [1], start=0, end=1)
    tail_value = new_initializer(graph, f"{x.name}_s2d_zeros_tail", np.array(tail, np.int64))
    return _insert(graph, before, "Concat", [shape, tail_value], int64, [1 + len(tail)], axis=0)


def _space_to_depth_stem(graph: ir.Graph, node: ir.Node, plan) -> None:
    known_batch, channels, height, width, size, pad = plan
    x, weight = node.inputs[0], node.inputs[1]
    array = constant_array(weight)
    kernel, new_pads = space_to_depth_weight(array.astype(np.float32), pad)
    depth = 4 * channels
    padded = math.ceil(depth / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    kernel = np.concatenate(
        [kernel, np.zeros((kernel.shape[0], padded - depth, *kernel.shape[2:]), np.float32)], 1
    ).astype(array.dtype)
    half_h, half_w = height // 2, width // 2
    batch = x.shape[0] if x.shape is not None else known_batch  # keeps a symbolic name

    def add(op: str, inputs: list, shape: list, **attributes) -> ir.Value:
        return _insert(graph, node, op, inputs, FLOAT16, shape, **attributes)

    blocks = new_initializer(
        graph, f"{x.name}_s2d_blocks", np.array([0, channels, half_h, 2, half_w, 2], np.int64)
    )
    split = add("Reshape", [x, blocks], [batch, channels, half_h, 2, half_w, 2])
    moved = add(
        "Transpose", [split], [batch, half_h, half_w, 2, 2, channels], perm=[0, 2, 4, 3, 5, 1]
    )
    pixels = new_initializer(
        graph, f"{x.name}_s2d_pixels", np.array([0, half_h, half_w, depth], np.int64)
    )
    channels_last = add("Reshape", [moved, pixels], [batch, half_h, half_w, depth])
    if padded > depth:
        zero = new_initializer(graph, f"{x.name}_s2d_zero", np.zeros((1, 1, 1, 1), array.dtype))
        target = _batch_shape(graph, x, known_batch, [half_h, half_w, padded - depth], node)
        zeros = add("Expand", [zero, target], [batch, half_h, half_w, padded - depth])
        channels_last = add(
            "Concat", [channels_last, zeros], [batch, half_h, half_w, padded], axis=3
        )
    first = add("Transpose", [channels_last], [batch, padded, half_h, half_w], perm=[0, 3, 1, 2])
    new_weight = new_initializer(graph, f"{weight.name}_s2d", kernel)
    node.replace_input_with(0, first)
    node.replace_input_with(1, new_weight)
    for name in ("strides", "pads", "kernel_shape", "dilations"):
        node.attributes.pop(name, None)
    node.attributes["pads"] = ir.AttrInt64s("pads", new_pads)
    node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", list(kernel.shape[2:]))
    if not weight.uses() and weight.name in graph.initializers and not weight.is_graph_input():
        graph.initializers.pop(weight.name)


def _space_to_depth_stems(graph: ir.Graph, dims_of: _Dims) -> int:
    """Rewrite every stride-2 float16 Conv over fewer than 8 channels; returns how many."""
    count = 0
    for node in list(graph):
        plan = _stem_plan(node, dims_of)
        if plan is not None:
            _space_to_depth_stem(graph, node, plan)
            count += 1
    return count


# -- ReLU after max-pool ------------------------------------------------------------------------


def _max_pool_keeps_relu(pool: ir.Node) -> bool:
    """True when every window of ``pool`` holds an element of its input (so ReLU commutes)."""
    if pool.attributes.get_int("ceil_mode", 0) != 0:
        return False
    if pool.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return False
    kernel = _ints(pool, "kernel_shape", [])
    dilations = _ints(pool, "dilations", [1] * len(kernel))
    pads = _ints(pool, "pads", [0] * 2 * len(kernel))
    if not kernel or any(d != 1 for d in dilations):
        return False
    return all(p < k for p, k in zip(pads, kernel + kernel, strict=True))


def _relu_after_max_pool(graph: ir.Graph) -> int:
    """``MaxPool(Relu(x))`` -> ``Relu(MaxPool(x))`` where that is the same; returns how many."""
    count = 0
    for pool in list(graph):
        if pool.op_type != "MaxPool" or pool.domain not in ONNX_DOMAINS:
            continue
        indices = pool.outputs[1] if len(pool.outputs) > 1 else None
        if indices is not None and (indices.uses() or indices.is_graph_output()):
            continue  # the Indices output points into Relu's output
        relu = pool.inputs[0].producer() if pool.inputs[0] is not None else None
        if relu is None or relu.op_type != "Relu" or relu.domain not in ONNX_DOMAINS:
            continue
        if only_reader(relu.outputs[0]) is not pool:
            continue
        if not _max_pool_keeps_relu(pool):
            continue
        pooled = pool.outputs[0]
        pool.replace_input_with(0, relu.inputs[0])
        graph.remove(relu, safe=True)
        after = ir.node("Relu", [pooled], name=relu.name)
        graph.insert_after(pool, after)
        _take_over(pooled, after.outputs[0], "before_relu")
        after.replace_input_with(0, pooled)  # the line above moved Relu's own input too
        count += 1
    return count


# -- spatial means as MatMul --------------------------------------------------------------------


def _mean_axes(node: ir.Node) -> list[int] | None:
    if node.op_type == "GlobalAveragePool":
        return [2, 3]
    if node.attributes.get_int("noop_with_empty_axes", 0):
        return None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    attribute = node.attributes.get("axes")
    return list(attribute.as_ints()) if attribute is not None else None


# Ops that only relabel a tensor's shape: a Cast pair around a chain of them cancels.
_SHAPE_ONLY_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def _cast_to(node: ir.Node | None, dtype: ir.DataType) -> bool:
    return (
        node is not None
        and node.op_type == "Cast"
        and node.domain in ONNX_DOMAINS
        and node.attributes.get_int("to", 0) == dtype.value
    )


def _float16_source(x: ir.Value, dims_of: _Dims) -> ir.Value | None:
    """``x16`` when ``x = Cast(x16, float32)`` is read only here, x16 float16 (fp16's head)."""
    producer = x.producer()
    if not _cast_to(producer, ir.DataType.FLOAT) or only_reader(x) is None:
        return None
    source = producer.inputs[0]
    return source if source is not None and dims_of.dtype(source) == FLOAT16 else None


def _drop_cast_back(graph: ir.Graph, widen: ir.Node) -> None:
    """Remove ``widen`` (float16 to float32) and the Cast back to float16 after it, if any.

    Only shape-only ops may stand between the two; they then carry float16. Exact: the data
    was float16 all along.
    """
    chain, reader = [], only_reader(widen.outputs[0])
    while reader is not None and not _cast_to(reader, FLOAT16):
        if reader.op_type not in _SHAPE_ONLY_OPS or reader.domain not in ONNX_DOMAINS:
            return
        chain.append(reader)
        reader = only_reader(reader.outputs[0])
    if reader is None:
        return
    value = widen.inputs[0]
    for node in chain:
        node.outputs[0].type = ir.TensorType(FLOAT16)
    ir.convenience.replace_all_uses_with(widen.outputs[0], value)
    _take_over(reader.outputs[0], chain[-1].outputs[0] if chain else value, "float16")
    graph.remove([reader, widen], safe=True)


def _means_as_matmul(graph: ir.Graph, dims_of: _Dims) -> int:
    """``ReduceMean(x, [2, 3])`` / ``GlobalAveragePool`` of 4-D x -> Reshape, MatMul, Reshape.

    Where ``x`` is float16 data cast to float32 for the mean (as ``fp16`` leaves a CNN head),
    the mean runs on the float16 data (the MatMul accumulates in float32 either way) and the
    Cast moves to its small result, or goes with the Cast back to float16 after it.
    """
    count = 0
    for node in list(graph):
        if node.op_type not in ("ReduceMean", "GlobalAveragePool"):
            continue
        if node.domain not in ONNX_DOMAINS:
            continue
        x = node.inputs[0]
        dims = dims_of(x)
        axes = _mean_axes(node)
        if dims is None or len(dims) != 4 or None in dims[1:] or axes is None:
            continue
        dtype = dims_of.dtype(x)
        if sorted(a % 4 for a in axes) != [2, 3] or dtype not in _FLOAT_DTYPES:
            continue
        keep = node.op_type == "GlobalAveragePool" or node.attributes.get_int("keepdims", 1)
        source = _float16_source(x, dims_of)
        if source is not None:
            cast, x, dtype = x.producer(), source, FLOAT16
        _, channels, height, width = dims
        batch, area = (x.shape[0] if x.shape is not None else None), height * width
        rows_shape = np.array([0, channels, area], np.int64)
        rows = new_initializer(graph, f"{x.name}_mean_rows", rows_shape)
        flat = _insert(graph, node, "Reshape", [x, rows], dtype, [batch, channels, area])
        scale = np.full((area, 1), 1.0 / area, dtype=dtype.numpy())
        weight = new_initializer(graph, f"{x.name}_mean", scale)
        product = _insert(graph, node, "MatMul", [flat, weight], dtype, [batch, channels, 1])
        out_shape = [0, channels, 1, 1] if keep else [0, channels]
        target = new_initializer(graph, f"{x.name}_mean_shape", np.array(out_shape, np.int64))
        mean_shape = [batch, channels, 1, 1] if keep else [batch, channels]
        mean = _insert(graph, node, "Reshape", [product, target], dtype, mean_shape)
        if source is not None:  # back to float32 on the small result
            float32 = ir.DataType.FLOAT
            mean = _insert(graph, node, "Cast", [mean], float32, mean_shape, to=float32.value)
        _take_over(node.outputs[0], mean, "mean")
        graph.remove(node, safe=True)
        if source is not None:
            graph.remove(cast, safe=True)
            _drop_cast_back(graph, mean.producer())
        count += 1
    return count


@register
class CudaLayoutPass(Pass):
    """Space-to-depth stems, ReLU after max-pool and spatial means as MatMul, for cuDNN."""

    name = "cuda-layout"
    summary = (
        "For ONNX Runtime's CUDA provider: stride-2 float16 stems over few channels as "
        "space-to-depth convolutions, ReLU after max-pool, spatial means as MatMul."
    )
    semantics = Semantics.REASSOCIATING

    def __init__(
        self,
        *,
        stems: bool = True,
        relu_after_pool: bool = True,
        mean_as_matmul: bool = True,
    ) -> None:
        self.stems = stems
        self.relu_after_pool = relu_after_pool
        self.mean_as_matmul = mean_as_matmul

    def call(self, model: ir.Model) -> PassResult:
        """Apply the chosen rewrites to the main graph."""
        graph, dims_of = model.graph, _Dims(model)
        count = 0
        if self.stems:
            count += _space_to_depth_stems(graph, dims_of)
        if self.relu_after_pool:
            count += _relu_after_max_pool(graph)
        if self.mean_as_matmul:
            count += _means_as_matmul(graph, dims_of)
        return PassResult(model, count > 0)
