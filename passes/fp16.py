"""``fp16``: store weights and compute activations in float16, keeping sensitive parts in float32.

Written on onnx-ir directly. ONNX Runtime's ``convert_float_to_float16`` was the alternative;
it clamps out-of-range weights to 65504 instead of keeping them in float32, appends its Casts at
the end of the node list (the ONNX checker then rejects the graph as unsorted), leaves
float32 -> float16 -> float32 Cast pairs between neighbouring blocked nodes, and gives two
blocked consumers of one value two Casts with the same output name.

How each float32 value is placed, node by node in topological order:

- a node runs in float16 when it is an ONNX-domain op whose schema allows ``tensor(float16)``
  for the type parameter bound to its float32 values; inputs with a fixed float type (Resize's
  ``scales``) and type parameters that do not allow float16 (LayerNormalization's ``Mean``)
  stay float32;
- data-movement ops (Reshape, Transpose, Gather, Concat, Slice, Shape, ...) and type parameters
  bound only to inputs (``Less``, ``Shape``, ``Cast``'s input) follow their inputs' precision
  instead: they compute nothing that rounding could change, so they add a Cast only where their
  inputs mix precisions (a Concat of a float16 and a float32 value);
- ``Cast(to=FLOAT)`` and ``ConstantOfShape`` make float16 unless a consumer needs float32;
- ONNX Runtime contrib ops that the fusions produce (Attention, MultiHeadAttention,
  SkipLayerNormalization, BiasGelu, FastGelu, Gelu) run in float16 where the ``target``
  provider has a float16 kernel for them (CUDA: all of them; CPU: SkipLayerNormalization),
  with their float32-only outputs (SkipLayerNormalization's mean and inverse deviation) kept;
  on ``target=cuda``, FusedConv with a Relu, Sigmoid or Tanh is split back into Conv (+ Add) +
  activation first, because CUDA's FusedConv kernel is float32-only;
- these stay float32: ops in ``op_block_list``; ops outside the ONNX domain (custom ops, other
  ONNX Runtime contrib ops, calls of model-local functions); random ops; nodes with subgraphs
  (If/Loop/Scan bodies are left as they are, and outer values they read stay float32 for them);
  nodes that read a constant with a finite value beyond ``max_finite`` (float16 would make it
  infinite); and the producer and consumers of a value whose calibration range exceeds
  ``max_finite``;
- weights (initializers, Constant nodes) become float16 in place when every consumer runs in
  float16, are copied when consumers run in both precisions, and stay float32 otherwise. Nonzero
  values too small for float16 become its smallest subnormal (``+-2**-24``), never zero, so an
  epsilon such as 1e-12 keeps a division away from zero, as ONNX Runtime's converter does;
- one Cast per value and precision is inserted where a producer and a consumer differ, so
  that no float32 -> float16 -> float32 Cast pair is ever created.

On ``target=cuda``, a model left with float16 convolutions records the CUDA provider options they
run best with in ``metadata_props["onnxforge.cuda_provider_options"]``, which the backend's
Session applies on CUDA (options the caller passes win): ``prefer_nhwc=1`` (cuDNN's channels-last
float16 kernels) and ``fuse_conv_bias=1`` (the bias add inside the cuDNN convolution instead of
one more kernel per Conv; ONNX Runtime fuses it only in NHWC: in NCHW its cuDNN graph for a
3-channel first layer finds no engine). ResNet-50, batch 32, H200: 3.65 ms plain, 2.92 ms with
``prefer_nhwc``, 2.13 ms with both.

``keep_io_types`` keeps the float32 graph inputs and outputs float32, with Casts at the
boundary; without it they become float16.

The default block list, and why. ONNX Runtime on the CPU runs few ops in float16: it casts
around the others and then drops the float16 -> float32 Cast pairs, so activations there keep
float32 precision and only weights are rounded. The figures below therefore come from ONNX's
reference evaluator, where each op rounds its result to its declared type as a float16 kernel
does (relative L2 error against float32, batch of 4; the tests pin the overflow cases):

=====================  =======  ================  ===============  ===============
model (scale of x)     default  default less Exp,  default plus     nothing blocked
                                Log               Softmax
=====================  =======  ================  ===============  ===============
RMSNorm (x ~ 100)      3.1e-4   3.1e-4            3.1e-4           1.0 (x*x = inf)
LayerNorm (x ~ 300)    5.3e-4   5.3e-4            5.3e-4           not finite
log-sum-exp (x ~ 6)    0 [1]_   not finite        0                not finite
attention (x ~ 3)      1.7e-3   1.7e-3            1.4e-3           1.7e-3
attention (x ~ 6)      1.8e-3   1.8e-3            2.0e-3           1.8e-3
=====================  =======  ================  ===============  ===============

.. [1] the whole graph stays float32: Exp, ReduceSum and Log are blocked, the Sub is an island.

Through ONNX Runtime on the CPU (the tests' budget is relative L2 below 1e-2, batch of 4), the
exported samples drift by 4.1e-4 (seed-cnn), 2.5e-4 (digits-cnn) and 4.0e-4 (transformer),
the same with or without the block list, and digits-cnn keeps its held-out top-1 accuracy
(0.997 on 360 images); parameter bytes fall to 0.50-0.51 of float32.

- ``ReduceMean``, ``ReduceSum``, ``ReduceSumSquare``, ``ReduceL2``, ``ReduceLogSumExp``,
  ``ReduceLogSum``, ``ReduceProd``, ``CumSum``: sums over a row overflow 65504 or lose the small
  terms;
- ``Pow``, ``Sqrt``, ``Reciprocal``: the rest of a decomposed LayerNorm or RMSNorm
  (``Pow(x, 2)`` overflows above 256); with the reductions they keep the statistics float32,
  and the ``+ eps`` between them stays float32 too (see "islands" below);
- ``Exp``, ``Log``: ``Exp`` overflows above 11.1; a decomposed log-sum-exp stays finite only
  when Exp, the sum and Log all stay float32;
- ``Resize``: its ``roi`` (relative crop coordinates) would be float16, off by up to 2.4e-4 of
  the image side, a pixel on a 4096-pixel image; its ``scales`` are float32 by schema anyway.

``Softmax`` and ``LogSoftmax`` are not blocked: they subtract the row maximum before ``Exp``,
keeping it in range, and blocking Softmax changed the attention error by under 20% either way
while costing two Casts of the (batch, heads, sequence, sequence) scores. ``LayerNormalization``
is not blocked: its ``stash_type`` keeps the statistics float32.

Islands: a node without weights whose inputs all come in float32 and whose consumers all read
float32 (the ``+ eps`` between ReduceMean and Sqrt) stays float32: float16 would add two Casts
and a rounding and save nothing.

Calibration ranges: the pass runs no model (passes never import the backend). Give
``calibration_ranges`` the path of an ``.npz`` file that maps value names to arrays (the largest
absolute value of each array is the value's range: save a max-abs scalar or the activation
itself). Values whose range exceeds ``max_finite`` stay float32 with their producer and
consumers. Lower ``max_finite`` to leave headroom for inputs larger than the calibration saw.

The pass works on the main graph: subgraphs and model-local functions stay as they are.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.errors import InputError
from onnxforge.passes.base import CUDA_PROVIDER_OPTIONS_KEY, Pass, PassResult, Semantics
from onnxforge.passes.cleanup import NON_DETERMINISTIC_OPS
from onnxforge.passes.fusion_rules._values import unique_value_name, value_names
from onnxforge.passes.registry import register
from onnxforge.passes.statistics import ONNX_DOMAINS, has_subgraphs, inferred_copy_values

__all__ = [
    "Float16Pass",
    "DEFAULT_OP_BLOCK_LIST",
    "DEFAULT_MAX_FINITE",
    "load_calibration_ranges",
    "unfuse_conv_activations",
    "TARGETS",
    "DEFAULT_TARGET",
    "CUDA_CONV_PROVIDER_OPTIONS",
]

logger = logging.getLogger(__name__)

# The largest finite float16 value.
DEFAULT_MAX_FINITE = float(np.finfo(np.float16).max)

# Numerically sensitive ops kept in float32 (the module docstring gives the reasons).
DEFAULT_OP_BLOCK_LIST: tuple[str, ...] = (
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceLogSum",
    "ReduceProd",
    "CumSum",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Reciprocal",
    "Resize",
)

# Ops whose output type comes from an attribute, or that are not inference ops: never converted.
_ALWAYS_FLOAT32 = NON_DETERMINISTIC_OPS | {"EyeLike", "SequenceEmpty"}

# Ops that move, select or inspect data without arithmetic: they take their inputs' precision.
_DATA_MOVEMENT = frozenset(
    {
        "Identity",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Flatten",
        "Expand",
        "Tile",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "GatherElements",
        "GatherND",
        "Shape",
        "Size",
        "DepthToSpace",
        "SpaceToDepth",
        "Pad",
        "Where",
        "Compress",
        "ReverseSequence",
        "Trilu",
    }
)

_VARIADIC = onnx.defs.OpSchema.FormalParameterOption.Variadic
_CONTRIB_DOMAIN = "com.microsoft"
TARGETS = ("cpu", "cuda")
DEFAULT_TARGET = "cpu"
# CUDA provider options for float16 convolutions (module docstring: why, and what they gain).
CUDA_CONV_PROVIDER_OPTIONS = {"prefer_nhwc": "1", "fuse_conv_bias": "1"}


@dataclasses.dataclass(frozen=True)
class _ContribSchema:
    """The type parameter of each formal input and output of an ONNX Runtime contrib op.

    ONNX ships no schemas for ``com.microsoft`` ops, so the ones that the fusions produce are
    written out here from ONNX Runtime's contrib op definitions. ``float16`` names the targets
    whose kernel takes float16 for ``T`` (checked against each provider's kernel registry).
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float16: frozenset[str]
    type_constraints: tuple[onnx.defs.OpSchema.TypeConstraintParam, ...] = ()


_T = onnx.defs.OpSchema.TypeConstraintParam("T", ["tensor(float)", "tensor(float16)"])
_CUDA, _CPU_AND_CUDA = frozenset({"cuda"}), frozenset({"cpu", "cuda"})
_CONTRIB_SCHEMAS = {
    # input, weights, bias, mask_index, past, attention_bias, past_sequence_length
    "Attention": _ContribSchema(("T", "T", "T", "M", "T", "T", "M"), ("T", "T"), _CUDA, (_T,)),
    # query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value, ...
    "MultiHeadAttention": _ContribSchema(
        ("T", "T", "T", "T", "M", "T", "T", "T", "M", "M"), ("T", "T", "T", "QK"), _CUDA, (_T,)
    ),
    # outputs: output, mean and inv_std_var (U: float32 only), input_skip_bias_sum
    "SkipLayerNormalization": _ContribSchema(
        ("T",) * 5, ("T", "U", "U", "T"), _CPU_AND_CUDA, (_T,)
    ),
    "SkipSimplifiedLayerNormalization": _ContribSchema(
        ("T",) * 4, ("T", "U", "U", "T"), _CPU_AND_CUDA, (_T,)
    ),
    "BiasGelu": _ContribSchema(("T", "T"), ("T",), _CUDA, (_T,)),
    "FastGelu": _ContribSchema(("T", "T"), ("T",), _CUDA, (_T,)),
    "Gelu": _ContribSchema(("T",), ("T",), _CUDA, (_T,)),
}
# ONNX Runtime's CUDA FusedConv has a float32 kernel only; in float16 the Conv and its
# activation run as two ops, which is far faster than a float32 FusedConv between two Casts.
_UNFUSED_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh")
_FLOAT = ir.DataType.FLOAT
_FLOAT16 = ir.DataType.FLOAT16
_SMALLEST_SUBNORMAL = float(np.finfo(np.float16).smallest_subnormal)
_F16, _F32, _ANY = 16, 32, 0  # precisions; a read at _ANY takes the value as it ends up


def load_calibration_ranges(path: str | os.PathLike[str]) -> dict[str, float]:
    """Value name -> largest absolute value, from an ``.npz`` file of arrays (no pickles)."""
    hint = "give an .npz file that maps value names to arrays (np.savez)"
    try:
        loaded = np.load(os.fspath(path), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not arrays by value name")
        with loaded as archive:
            ranges = {}
            for name in archive.files:
                array = np.asarray(archive[name], dtype=np.float64)
                ranges[name] = float(np.max(np.abs(array))) if array.size else 0.0
            return ranges
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as error:
        raise InputError(
            f"cannot read calibration ranges from '{path}': {error}", hint=hint
        ) from error


# ---------------------------------------------------------------------------------------------
# Reading the model


@dataclasses.dataclass
class _Slots:
    """A node's float32 inputs and outputs, grouped by the schema's type parameters."""

    inputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    outputs: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # float32 inputs that must stay float32: fixed float types, params without float16
    fixed_inputs: list[int] = dataclasses.field(default_factory=list)

    def params(self) -> set[str]:
        return set(self.inputs) | set(self.outputs)


def _formal_type(parameters, index: int) -> str | None:
    """The type string of formal parameter ``index`` (ONNX's, or a contrib schema's string)."""
    if index < len(parameters):
        formal = parameters[index]
    elif parameters and getattr(parameters[-1], "option", None) == _VARIADIC:
        formal = parameters[-1]
    else:
        return None
    return formal if isinstance(formal, str) else formal.type_str


def _is_constant(value: ir.Value) -> bool:
    """An initializer that the caller cannot override, or a Constant node's output."""
    if value.is_graph_input():
        return False
    if value.is_initializer():
        return value.const_value is not None
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "Constant"
        and producer.domain in ONNX_DOMAINS
        and any(k in producer.attributes for k in ("value", "value_float", "value_floats"))
    )


def _constant_array(value: ir.Value) -> np.ndarray:
    if value.is_initializer():
        return value.const_value.numpy()
    attributes = value.producer().attributes
    if "value" in attributes:
        return attributes["value"].as_tensor().numpy()
    if "value_float" in attributes:
        return np.array(attributes["value_float"].as_float(), dtype=np.float32)
    return np.array(attributes["value_floats"].as_floats(), dtype=np.float32)


def _is_read(value: ir.Value) -> bool:
    """Whether anything reads the value: an optional output nobody reads has no say."""
    return bool(value.uses()) or value.is_graph_output() or value.producer() is None


def _to_float16(array: np.ndarray) -> np.ndarray:
    """Round to float16; nonzero values that would flush to zero keep their sign instead."""
    half = array.astype(np.float16)
    flushed = (half == 0) & (array != 0)
    if np.any(flushed):
        half[flushed] = np.copysign(_SMALLEST_SUBNORMAL, array[flushed]).astype(np.float16)
    return half


def _out_of_range(array: np.ndarray, max_finite: float) -> bool:
    finite = array[np.isfinite(array)]
    return bool(finite.size and np.max(np.abs(finite)) > max_finite)


def _size(value: ir.Value) -> int:
    """The number of elements of a constant (an initializer's from its shape: nothing loads)."""
    if value.is_initializer():
        return int(value.const_value.size)
    return int(_constant_array(value).size)


class _Converter:
    """One conversion of one model's main graph; ``run()`` returns the number of changes."""

    def __init__(
        self,
        model: ir.Model,
        *,
        keep_io_types: bool,
        op_block_list: Iterable[str],
        max_finite: float,
        ranges: Mapping[str, float],
        target: str = DEFAULT_TARGET,
    ) -> None:
        self.model = model
        self.target = target
        self.graph = model.graph
        self.keep_io_types = keep_io_types
        self.op_block_list = frozenset(op_block_list)
        self.max_finite = max_finite
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.dtypes = self._dtypes()
        self.pinned = self._pinned_values(ranges)
        self.range_cache: dict[ir.Value, bool] = {}
        self.slots: dict[ir.Node, _Slots] = {}
        self.blocked: dict[ir.Node, str] = {}
        for node in self.graph:
            reason = self._block_reason(node)
            if reason is not None:
                self.blocked[node] = reason
        self.precision: dict[ir.Value, int] = {}  # of every non-constant float32 value
        # (node, input index) or (None, graph output index) -> the precision it reads
        self.reads: dict[ir.Value, list[tuple[ir.Node | None, int, int]]] = collections.defaultdict(
            list
        )
        self.converted_nodes: list[ir.Node] = []
        self.names: set[str] = set()  # every value name, once rewriting starts

    # -- facts about the model ------------------------------------------------------------------

    def _dtypes(self) -> dict[ir.Value, ir.DataType | None]:
        values = self._main_values()
        dtypes = {v: v.dtype for v in values}
        if any(dtype is None for dtype in dtypes.values()):
            # Infer on a copy: the pass must not add annotations to a model it leaves alone.
            inferred = {name: v.dtype for name, v in inferred_copy_values(self.model).items()}
            for value, dtype in dtypes.items():
                if dtype is None and value.name is not None:
                    dtypes[value] = inferred.get(value.name)
            _propagate_contrib_types(self.graph, dtypes)
        return dtypes

    def _main_values(self) -> list[ir.Value]:
        return _values_of(self.graph)

    def _pinned_values(self, ranges: Mapping[str, float]) -> set[ir.Value]:
        by_name = {v.name: v for v in self._main_values() if v.name}
        unknown = sorted(name for name in ranges if name not in by_name)
        if unknown:
            logger.warning(
                "calibration ranges name %d values that are not in the main graph (%s%s)",
                len(unknown),
                ", ".join(unknown[:5]),
                ", ..." if len(unknown) > 5 else "",
            )
        return {
            by_name[name]
            for name, limit in ranges.items()
            if name in by_name and limit > self.max_finite
        }

    def is_float32(self, value: ir.Value | None) -> bool:
        return value is not None and self.dtypes.get(value) == _FLOAT

    def _too_large(self, value: ir.Value) -> bool:
        """A float32 constant with a finite value that float16 cannot hold."""
        if value not in self.range_cache:
            self.range_cache[value] = _out_of_range(_constant_array(value), self.max_finite)
        return self.range_cache[value]

    def _schema(self, node: ir.Node):
        """ONNX's schema of the node, or ours of a contrib op; None when neither is known."""
        if node.domain == _CONTRIB_DOMAIN:
            return _CONTRIB_SCHEMAS.get(node.op_type)
        try:
            return onnx.defs.get_schema(node.op_type, node.version or self.opset, "")
        except onnx.defs.SchemaError:
            return None

    def _slots(self, node: ir.Node) -> _Slots | None:
        """The node's float32 slots by type parameter; None when the schema is not known."""
        schema = self._schema(node)
        if schema is None:
            return None
        allowed = {
            c.type_param_str
            for c in schema.type_constraints
            if "tensor(float16)" in c.allowed_type_strs
        }
        slots = _Slots()
        sides = (
            (node.inputs, schema.inputs, slots.inputs),
            (node.outputs, schema.outputs, slots.outputs),
        )
        for values, formals, bound in sides:
            for index, value in enumerate(values):
                if not self.is_float32(value):
                    continue
                formal = _formal_type(formals, index)
                if formal is None:
                    return None
                if formal in allowed:
                    bound.setdefault(formal, []).append(index)
                elif bound is slots.inputs:
                    slots.fixed_inputs.append(index)
        return slots

    def _block_reason(self, node: ir.Node) -> str | None:
        """Why the node stays float32, or None; records the node's slots on the way."""
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        if not any(self.is_float32(v) for v in values):
            return None  # nothing to convert
        if node.domain == _CONTRIB_DOMAIN and node.op_type in _CONTRIB_SCHEMAS:
            if self.target not in _CONTRIB_SCHEMAS[node.op_type].float16:
                return f"ONNX Runtime has no float16 {node.op_type} kernel for {self.target}"
        elif node.domain not in ONNX_DOMAINS:
            return f"domain '{node.domain}' is not ONNX's"
        if has_subgraphs(node):
            return "it has subgraphs"
        if node.op_type in self.op_block_list:
            return "op_block_list"
        if node.op_type in _ALWAYS_FLOAT32:
            return "a random or attribute-typed op"
        if any(self.dtypes.get(v) is None and _is_read(v) for v in values):
            return "a value of unknown type"
        for value in values:
            if value in self.pinned:
                return f"calibration range of '{value.name}' exceeds {self.max_finite:g}"
        if node.op_type in ("Constant", "Cast"):
            return None
        for value in node.inputs:
            if self.is_float32(value) and _is_constant(value) and self._too_large(value):
                return f"constant '{value.name}' exceeds {self.max_finite:g}"
        if node.op_type == "ConstantOfShape":
            fill = node.attributes.get("value")
            if fill is not None and _out_of_range(fill.as_tensor().numpy(), self.max_finite):
                return f"its fill value exceeds {self.max_finite:g}"
            return None
        slots = self._slots(node)
        if slots is None:
            return "no ONNX schema for it"
        if not slots.params():
            return "its float32 values have no float16 type"
        self.slots[node] = slots
        return None

    # -- deciding -------------------------------------------------------------------------------

    def _consumers_take_float16(self, value: ir.Value) -> bool:
        """No consumer of ``value`` is pinned to float32 (blocked, in a subgraph, an output)."""
        if value.is_graph_output() and (self.keep_io_types or value in self.pinned):
            return False
        for use in value.uses():
            if use.node.graph is not self.graph or use.node in self.blocked:
                return False
            slots = self.slots.get(use.node)
            if slots is not None and use.idx in slots.fixed_inputs:
                return False
        return True

    def _consumers_need_float32(self, value: ir.Value) -> bool:
        """Every consumer of ``value`` reads float32 (and there is one)."""
        needs = []
        if value.is_graph_output():
            needs.append(self.keep_io_types or value in self.pinned)
        for use in value.uses():
            slots = self.slots.get(use.node)
            needs.append(
                use.node.graph is not self.graph
                or use.node in self.blocked
                or (slots is not None and use.idx in slots.fixed_inputs)
            )
        return bool(needs) and all(needs)

    def _read(self, node: ir.Node | None, index: int, value: ir.Value, precision: int) -> None:
        self.reads[value].append((node, index, precision))

    def _decide_node(self, node: ir.Node) -> None:
        if node in self.blocked:
            for index, value in enumerate(node.inputs):
                if self.is_float32(value):
                    self._read(node, index, value, _F32)
            for value in node.outputs:
                if self.is_float32(value):
                    self.precision[value] = _F32
            return
        if node.op_type == "Constant":
            return  # its output is a constant, placed by its consumers
        if node.op_type in ("Cast", "ConstantOfShape"):
            # reads any input type; makes float16 when every consumer takes it
            output = node.outputs[0]
            if self.is_float32(output):
                to16 = self._consumers_take_float16(output)
                self.precision[output] = _F16 if to16 else _F32
                if to16:
                    self.converted_nodes.append(node)
            return
        slots = self.slots.get(node)
        if slots is None:
            return  # no float32 values
        chosen: dict[str, int] = {}
        for param in slots.params():
            inputs = [node.inputs[i] for i in slots.inputs.get(param, [])]
            outputs = [node.outputs[i] for i in slots.outputs.get(param, [])]
            if not outputs and len(inputs) == 1:
                chosen[param] = _ANY  # Shape of a weight: it reads the weight as it ends up
                continue
            computed = [self.precision.get(v, _F32) for v in inputs if not _is_constant(v)]
            follows = node.op_type in _DATA_MOVEMENT or not outputs
            if not follows:
                # between float32 producers and float32 consumers (the ``+ eps`` between
                # ReduceMean and Sqrt), float16 would only add two Casts and a rounding; a node
                # with weights still converts, to halve them
                island = (
                    computed
                    and _F16 not in computed
                    and not any(_is_constant(v) and _size(v) > 1 for v in inputs)
                )
                if island and all(self._consumers_need_float32(v) for v in outputs):
                    chosen[param] = _F32
                else:
                    chosen[param] = _F16
                continue
            if _F16 in computed:
                chosen[param] = _F16
            elif computed:
                chosen[param] = _F32
            else:  # only constants: halve them unless a consumer needs float32
                to16 = bool(outputs) and all(self._consumers_take_float16(v) for v in outputs)
                chosen[param] = _F16 if to16 else _F32
        for param, precision in chosen.items():
            for index in slots.inputs.get(param, []):
                self._read(node, index, node.inputs[index], precision)
            for index in slots.outputs.get(param, []):
                self.precision[node.outputs[index]] = precision
        for index in slots.fixed_inputs:
            self._read(node, index, node.inputs[index], _F32)
        if _F16 in chosen.values():
            self.converted_nodes.append(node)

    def _decide(self) -> None:
        for value in self.graph.inputs:
            if self.is_float32(value):
                keep = self.keep_io_types or value in self.pinned
                self.precision[value] = _F32 if keep else _F16
        for node in self.graph:
            self._decide_node(node)
        for value in self._main_values():  # If/Loop/Scan bodies read outer values as they are
            if self.is_float32(value):
                for use in value.uses():
                    if use.node.graph is not self.graph:
                        self._read(use.node, use.idx, value, _F32)
        for index, value in enumerate(self.graph.outputs):
            if self.is_float32(value):
                keep = self.keep_io_types or value in self.pinned
                self._read(None, index, value, _F32 if keep else _F16)

    # -- rewriting ------------------------------------------------------------------------------

    def _unique(self, base: str) -> str:
        return unique_value_name(self.graph, base, self.names)

    def _rewire(self, value: ir.Value, reads, replacement: ir.Value) -> None:
        for node, index, _ in reads:
            if node is None:  # a graph output: the replacement takes over its name
                name = value.name
                value.name = self._unique(f"{name}_{'fp16' if value.dtype == _FLOAT16 else 'fp32'}")
                self.names.discard(replacement.name)
                replacement.name = name
                self.graph.outputs[index] = replacement
            else:
                node.replace_input_with(index, replacement)

    def _cast(self, value: ir.Value, precision: int) -> ir.Value:
        """A new Cast of ``value`` to ``precision``, placed right after its producer."""
        dtype = _FLOAT16 if precision == _F16 else _FLOAT
        suffix = "fp16" if precision == _F16 else "fp32"
        base = value.name or "value"
        output = ir.Value(
            name=self._unique(f"{base}_{suffix}"),
            type=ir.TensorType(dtype),
            shape=value.shape,
        )
        cast = ir.node(
            "Cast",
            [value],
            {"to": dtype},
            outputs=[output],
            name=self._unique(f"{base}_cast_{suffix}"),
        )
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, cast)
        elif len(self.graph):
            self.graph.insert_before(next(iter(self.graph)), cast)
        else:
            self.graph.append(cast)
        return output

    def _convert_constant(self, value: ir.Value, half: np.ndarray) -> None:
        """Store the constant ``value`` as float16 in place."""
        tensor = ir.tensor(half, name=value.name)
        if value.is_initializer():
            value.const_value = tensor
        else:
            node = value.producer()
            for key in ("value_float", "value_floats"):
                node.attributes.pop(key, None)
            node.attributes["value"] = ir.AttrTensor("value", tensor)
            if value.const_value is not None:
                value.const_value = tensor
        value.type = ir.TensorType(_FLOAT16)

    def _copy_constant(self, value: ir.Value, half: np.ndarray) -> ir.Value:
        """A float16 copy of the constant ``value``, beside it."""
        name = self._unique(f"{value.name}_fp16")
        if value.is_initializer():
            copy = ir.Value(name=name, type=ir.TensorType(_FLOAT16), shape=value.shape)
            copy.const_value = ir.tensor(half, name=name)
            self.graph.register_initializer(copy)
            return copy
        constant = ir.node(
            "Constant", [], {"value": ir.tensor(half, name=name)}, name=self._unique(name)
        )
        constant.outputs[0].name = name
        constant.outputs[0].type = ir.TensorType(_FLOAT16)
        constant.outputs[0].shape = value.shape
        self.graph.insert_after(value.producer(), constant)
        return constant.outputs[0]

    def _place_constant(self, value: ir.Value, reads) -> int:
        wanted = {precision for _, _, precision in reads}
        if _F16 not in wanted:
            return 0
        half = _to_float16(_constant_array(value))
        if _F32 not in wanted and not (value.is_graph_output() and self.keep_io_types):
            self._convert_constant(value, half)
            return 1
        self._rewire(value, [r for r in reads if r[2] == _F16], self._copy_constant(value, half))
        return 1

    def _place(self, value: ir.Value, reads) -> int:
        if _is_constant(value):
            return self._place_constant(value, reads)
        changes = 0
        have = self.precision.get(value, _F32)
        for precision in (_F16, _F32):
            moving = [r for r in reads if r[2] == precision and precision != have]
            if moving:
                self._rewire(value, moving, self._cast(value, precision))
                changes += 1
        return changes

    def run(self) -> int:
        self._decide()
        self.names = value_names(self.graph)
        changes = 0
        # types first: the Casts inserted below copy the type of the value they read
        for value, precision in self.precision.items():
            if precision == _F16 and self.dtypes.get(value) == _FLOAT:
                value.type = ir.TensorType(_FLOAT16)
                if value.is_graph_input() and value.const_value is not None:
                    value.const_value = ir.tensor(
                        _to_float16(value.const_value.numpy()), name=value.name
                    )
                changes += 1
        for node in self.converted_nodes:
            if node.op_type == "Cast":
                node.attributes["to"] = ir.AttrInt64("to", _FLOAT16)
            elif node.op_type == "ConstantOfShape":
                fill = node.attributes.get("value")
                array = fill.as_tensor().numpy() if fill is not None else np.zeros(1, np.float32)
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_float16(array)))
        changes += len(self.converted_nodes)
        for value, reads in list(self.reads.items()):
            changes += self._place(value, reads)
        for node, reason in self.blocked.items():
            logger.debug("fp16: %s '%s' stays float32: %s", node.op_type, node.name, reason)
        return changes


def _propagate_contrib_types(graph: ir.Graph, dtypes: dict[ir.Value, ir.DataType | None]) -> None:
    """Type the untyped outputs of known contrib ops from their inputs (ONNX cannot infer them)."""
    for node in graph:
        schema = _CONTRIB_SCHEMAS.get(node.op_type) if node.domain == _CONTRIB_DOMAIN else None
        if schema is None:
            continue
        bound = {
            param: dtypes.get(value)
            for value, param in zip(node.inputs, schema.inputs, strict=False)
            if value is not None and dtypes.get(value) is not None
        }
        for value, param in zip(node.outputs, schema.outputs, strict=False):
            if dtypes.get(value) is None and param in bound:
                dtypes[value] = bound[param]


def unfuse_conv_activations(graph: ir.Graph) -> int:
    """Split each ``FusedConv`` with a parameterless activation into Conv (+ Add) + activation.

    FusedConv computes ``activation(Conv(X, W, B) + Z)``; the split computes the same formula
    with ONNX ops. Returns the number of nodes split.
    """
    count = 0
    for node in list(graph):
        if node.domain != _CONTRIB_DOMAIN or node.op_type != "FusedConv":
            continue
        activation = node.attributes.get_string("activation", "")
        if activation not in _UNFUSED_ACTIVATIONS:
            continue
        x, w, *rest = node.inputs
        bias = rest[0] if rest else None
        z = rest[1] if len(rest) > 1 else None
        attributes = {
            k: v for k, v in node.attributes.items() if k not in ("activation", "activation_params")
        }
        conv = ir.node("Conv", [x, w] + ([bias] if bias is not None else []), attributes)
        conv.name = f"{node.name}_conv"
        out = conv.outputs[0]
        out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
        new_nodes = [conv]
        if z is not None:
            add = ir.node("Add", [out, z], name=f"{node.name}_sum")
            add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
            new_nodes.append(add)
            out = add.outputs[0]
        act = ir.node(activation, [out], name=f"{node.name}_{activation.lower()}")
        new_nodes.append(act)
        graph.insert_before(node, new_nodes)
        fused, split = node.outputs[0], act.outputs[0]
        split.type, split.shape = fused.type, fused.shape
        ir.convenience.replace_all_uses_with(fused, split, replace_graph_outputs=True)
        split.name, fused.name = fused.name, None
        graph.remove(node, safe=True)
        count += 1
    return count


def _values_of(graph: ir.Graph) -> list[ir.Value]:
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in graph:
        values += [v for v in node.outputs]
    return list(dict.fromkeys(values))


@register
class Float16Pass(Pass):
    """Convert float32 weights and activations to float16, keeping sensitive ops in float32."""

    name = "fp16"
    summary = "Store weights and compute activations in float16; sensitive ops stay float32."
    semantics = Semantics.LOSSY

    def __init__(
        self,
        *,
        keep_io_types: bool = True,
        op_block_list: tuple[str, ...] = DEFAULT_OP_BLOCK_LIST,
        max_finite: float = DEFAULT_MAX_FINITE,
        calibration_ranges: str | None = None,
        # the execution provider the model will run on: which fused (contrib) ops have
        # float16 kernels there; ``cuda`` also splits FusedConv, which is float32-only on CUDA
        target: Literal["cpu", "cuda"] = DEFAULT_TARGET,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choices: {', '.join(TARGETS)}")
        if not 0 < max_finite <= DEFAULT_MAX_FINITE:
            raise ValueError(f"max_finite must be in (0, {DEFAULT_MAX_FINITE:g}]")
        self.keep_io_types = keep_io_types
        self.op_block_list = tuple(op_block_list)
        self.max_finite = float(max_finite)
        self.calibration_ranges = calibration_ranges
        self.target = target

    def call(self, model: ir.Model) -> PassResult:
        """Place every float32 value of the main graph in float16 or float32, Casts between."""
        ranges = (
            load_calibration_ranges(self.calibration_ranges)
            if self.calibration_ranges is not None
            else {}
        )
        split = unfuse_conv_activations(model.graph) if self.target == "cuda" else 0
        converter = _Converter(
            model,
            target=self.target,
            keep_io_types=self.keep_io_types,
            op_block_list=self.op_block_list,
            max_finite=self.max_finite,
            ranges=ranges,
        )
        changed = converter.run() + split > 0
        if self.target == "cuda" and _has_float16_conv(model.graph):
            options = json.dumps(CUDA_CONV_PROVIDER_OPTIONS, sort_keys=True)
            changed |= model.metadata_props.get(CUDA_PROVIDER_OPTIONS_KEY) != options
            model.metadata_props[CUDA_PROVIDER_OPTIONS_KEY] = options
        return PassResult(model, changed)


def _has_float16_conv(graph: ir.Graph) -> bool:
    return any(
        node.op_type == "Conv"
        and node.domain in ONNX_DOMAINS
        and len(node.inputs) > 1
        and node.inputs[1] is not None
        and node.inputs[1].dtype == ir.DataType.FLOAT16
        for node in graph
    )
