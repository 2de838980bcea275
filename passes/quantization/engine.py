"""ONNX Runtime's quantizer and sessions, behind the proto boundary.

The pass hands an IR model in and gets IR models back; protobuf and files live only here, in
a temporary folder. :class:`Engine` saves the prepared float model once, calibrates once
(static mode), and then quantizes as often as the accuracy-aware search asks, each time with
another set of nodes left in float: the calibrated ranges are kept in ONNX Runtime's
calibration cache file, so a trial costs one quantizer run, not a calibration.

Calibration streams: batches come from an iterator and go to ONNX Runtime's calibrator in
chunks of :data:`CALIBRATION_CHUNK`. The min-max calibrator keeps a running range and the
histogram calibrators (entropy, percentile) a running histogram, so memory holds one chunk of
activations at a time, however long the data set.

ONNX Runtime's quantizer logs through the root logger and its histogram collector prints to
stdout; both are routed to this module's logger at debug level (the CLI owns the terminal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import pathlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

from onnxforge.errors import InputError, first_line
from onnxforge.passes.quantization.data import Batch, StreamingReader, chunks
from onnxforge.passes.statistics import model_stats

__all__ = [
    "Settings",
    "Engine",
    "QuantizerError",
    "ort_default_op_types",
    "make_session",
    "activation_ranges",
    "quantized_node_names",
    "save_for_onnxruntime",
    "CALIBRATION_CHUNK",
    "EXTERNAL_DATA_BYTES",
]

logger = logging.getLogger(__name__)

# Batches handed to ONNX Runtime's calibrator at a time (its histogram calibrators hold every
# activation of a chunk until the chunk is merged into the running histogram).
CALIBRATION_CHUNK = 8
# Models with more parameter bytes than this go through files with external data (protobuf's
# own limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

# The suffix ONNX Runtime's dynamic quantizer gives the MatMul it rewrites a Gemm into.
_GEMM_MATMUL = "_MatMul"
_CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


class QuantizerError(InputError):
    """ONNX Runtime's quantizer refused the model; the message says what to do instead."""


def ort_default_op_types(mode: str) -> tuple[str, ...]:
    """The op types ONNX Runtime's quantizer handles in ``mode`` (its registries)."""
    if mode == "dynamic":
        return tuple(sorted(IntegerOpsRegistry))
    return tuple(sorted(set(QLinearOpsRegistry) | set(QDQRegistry)))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything ONNX Runtime's quantizer is told, resolved (no "auto" left)."""

    mode: str
    format: str
    per_channel: bool
    reduce_range: bool
    weight_type: str
    activation_type: str
    calibration: str
    op_types: tuple[str, ...]

    @property
    def quantizable(self) -> frozenset[str]:
        """The op types whose nodes get quantized: ``op_types``, and Gemm in dynamic mode.

        ONNX Runtime's dynamic quantizer rewrites every Gemm (alpha = beta = 1, no transA) as
        MatMul + Add before quantizing, so with MatMul in ``op_types`` it quantizes Gemm too.
        """
        extra = {"Gemm"} if self.mode == "dynamic" and "MatMul" in self.op_types else set()
        return frozenset(self.op_types) | extra

    def describe(self) -> str:
        """One line for the report."""
        parts = [f"mode={self.mode}"]
        if self.mode == "static":
            parts += [
                f"format={self.format}",
                f"activations={self.activation_type}",
                f"calibration={self.calibration}",
            ]
        else:
            parts.append("activations=uint8 (dynamic, per batch)")
        parts += [
            f"weights={self.weight_type}",
            f"per_channel={'true' if self.per_channel else 'false'}",
            f"reduce_range={'true' if self.reduce_range else 'false'}",
        ]
        return " ".join(parts)


class _RootLogRouter(logging.Filter):
    """Drops ONNX Runtime's root-logger records and logs them again here, at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname:
            logger.debug("onnxruntime: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    router = _RootLogRouter()
    root = logging.getLogger()
    root.addFilter(router)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(router)
        for line in printed.getvalue().splitlines():
            if line.strip():
                logger.debug("onnxruntime: %s", line)


def make_session(path: pathlib.Path) -> ort.InferenceSession:
    """A CPU session on a saved model, ONNX Runtime's default graph optimisations, warnings off."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def activation_ranges(
    model: ir.Model, names: Sequence[str], batches: Iterable[Batch], workdir: pathlib.Path
) -> dict[str, np.ndarray]:
    """Per-channel (last axis) largest absolute value of each named activation over the data."""
    augmented = model.clone()
    values = {v.name: v for node in augmented.graph for v in node.outputs if v.name}
    values.update({v.name: v for v in augmented.graph.inputs})
    outputs = {o.name for o in augmented.graph.outputs}
    for name in names:
        if name not in outputs:
            augmented.graph.outputs.append(values[name])
    path = workdir / "activations.onnx"
    save_for_onnxruntime(augmented, path)
    session = make_session(path)
    ranges: dict[str, np.ndarray] = {}
    for batch in batches:
        arrays = session.run(list(names), batch)
        for name, array in zip(names, arrays, strict=True):
            flat = np.abs(array.reshape(-1, array.shape[-1])).max(axis=0)
            ranges[name] = np.maximum(ranges[name], flat) if name in ranges else flat
    return ranges


def save_for_onnxruntime(model: ir.Model, path: pathlib.Path) -> bool:
    """Save for ONNX Runtime; returns whether the weights went to external data.

    Value types are kept, except those of initializers, which carry their own: ONNX Runtime's
    dynamic quantizer transposes a Gemm's weight in place, and a stale entry for it makes
    its shape inference fail ("Inferred shape and existing shape differ").
    """
    external = model_stats(model).parameter_bytes > EXTERNAL_DATA_BYTES
    ir.save(model, path, external_data=f"{path.name}.data" if external else None)
    proto = onnx.load(str(path), load_external_data=False)
    weights = {tensor.name for tensor in proto.graph.initializer}
    kept = [info for info in proto.graph.value_info if info.name not in weights]
    if len(kept) != len(proto.graph.value_info):
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
        onnx.save(proto, str(path))
    return external


class Engine:
    """A prepared float model in ``workdir``, quantized with ONNX Runtime on demand."""

    def __init__(
        self,
        model: ir.Model,
        settings: Settings,
        workdir: pathlib.Path,
        *,
        calibration: Callable[[], Iterable[Batch]] | None = None,
    ) -> None:
        self.settings = settings
        self.workdir = workdir
        self.float_path = workdir / "float.onnx"
        self.external = save_for_onnxruntime(model, self.float_path)
        self.ranges_path: pathlib.Path | None = None
        self.calibration_batches = 0
        self._trials = 0
        if settings.mode == "static":
            if calibration is None:
                raise ValueError("static quantization needs calibration data")
            self._calibrate(calibration)

    def _calibrate(self, calibration: Callable[[], Iterable[Batch]]) -> None:
        method = _CALIBRATION_METHODS[self.settings.calibration]
        with _quiet_onnxruntime():
            calibrator = create_calibrator(
                self.float_path,
                list(self.settings.op_types),
                augmented_model_path=str(self.workdir / "augmented.onnx"),
                calibrate_method=method,
                use_external_data_format=self.external,
            )
            try:
                for chunk in chunks(calibration(), CALIBRATION_CHUNK):
                    reader = StreamingReader(chunk)
                    calibrator.collect_data(reader)
                    self.calibration_batches += reader.batches_read
            except InputError:
                raise
            except Exception as error:
                raise InputError(
                    f"calibration failed: {first_line(error)}",
                    hint="check that the data's arrays match the graph inputs' names, dtypes "
                    "and shapes",
                ) from error
            if not self.calibration_batches:
                raise InputError("the calibration data holds no batch")
            ranges = calibrator.compute_data()
        self.ranges_path = self.workdir / "ranges.json"
        save_tensors_data(ranges, self.ranges_path)

    def quantize(
        self, *, exclude: Collection[str] = (), only: Collection[str] | None = None
    ) -> pathlib.Path:
        """Quantize the float model, leaving ``exclude`` in float (or quantizing ``only``)."""
        self._trials += 1
        out = self.workdir / f"quantized-{self._trials}.onnx"
        s = self.settings
        if s.mode == "dynamic":  # a Gemm is quantized as the MatMul it is rewritten to first
            exclude = {*exclude, *(f"{name}{_GEMM_MATMUL}" for name in exclude)}
            if only is not None:
                only = {*only, *(f"{name}{_GEMM_MATMUL}" for name in only)}
        common = {
            "op_types_to_quantize": list(s.op_types),
            "per_channel": s.per_channel,
            "reduce_range": s.reduce_range,
            "weight_type": _TYPES[s.weight_type],
            "nodes_to_exclude": sorted(exclude),
            "nodes_to_quantize": sorted(only) if only is not None else None,
            "use_external_data_format": self.external,
        }
        try:
            with _quiet_onnxruntime():
                if s.mode == "dynamic":
                    quantize_dynamic(
                        self.float_path,
                        out,
                        extra_options={"MatMulConstBOnly": True},
                        **common,
                    )
                else:
                    quantize_static(
                        self.float_path,
                        out,
                        None,
                        quant_format=_FORMATS[s.format],
                        activation_type=_TYPES[s.activation_type],
                        calibrate_method=_CALIBRATION_METHODS[s.calibration],
                        calibration_cache_path=self.ranges_path,
                        **common,
                    )
        except Exception as error:
            raise QuantizerError(
                f"ONNX Runtime's quantizer failed: {first_line(error)}",
                hint="run quantize before fuse (fold-constants,cleanup,quantize,fuse), or leave "
                "the failing op type out with op_types=...",
            ) from error
        return out

    def discard(self, path: pathlib.Path) -> None:
        """Delete a trial's model (and its external data): the folder holds only what is kept."""
        for file in (path, path.with_name(f"{path.name}.data")):
            file.unlink(missing_ok=True)

    def load(self, path: pathlib.Path) -> ir.Model:
        """A quantized model as IR, its weights read into memory (the folder is temporary)."""
        model = ir.load(path)
        if self.external:
            ir.external_data.load_to_model(model)
        return model


def quantized_node_names(model: ir.Model, candidates: Collection[str]) -> set[str]:
    """Which of the candidate (weighted) nodes ONNX Runtime quantized in ``model``.

    Dynamic and QOperator quantization replace a node by one named ``<name>_quant``; QDQ keeps
    the node and feeds its weight through a DequantizeLinear of a constant.
    """
    by_name = {node.name: node for node in model.graph}
    done = set()
    for name in candidates:
        if f"{name}_quant" in by_name or f"{name}{_GEMM_MATMUL}_quant" in by_name:
            done.add(name)
            continue
        node = by_name.get(name)
        if node is not None and any(_dequantized_constant(v) for v in node.inputs):
            done.add(name)
    return done


def _dequantized_constant(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear":
        return False
    source = producer.inputs[0]
    return source is not None and source.const_value is not None
