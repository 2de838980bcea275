"""``quantize``: int8 quantization on ONNX Runtime's quantizer, held to an accuracy budget.

::

    quantize                                   dynamic: int8 weights, uint8 activations per batch
    quantize{mode=static,data=sample:digits-cnn}          QDQ, calibrated on the sample's data
    quantize{data=sample:minilm,smooth=0.7,budget=0.005}  SmoothQuant, worst cosine >= 0.995

ONNX Runtime's kernels decide the speed, so the quantizing itself is ``onnxruntime.
quantization`` (``quantize_dynamic``, ``quantize_static``, its calibrators), reached through a
temporary file at the pass boundary (:mod:`~onnxforge.passes.quantization.engine`). Around it,
onnxforge's own steps, each in :mod:`onnxforge.passes.quantization`:

- *preparation* on the IR (``prepare``): every value typed (contrib ops from ``fuse`` included,
  from ONNX Runtime's op schemas: the quantizer otherwise stops with "Unable to find data type
  for weight_name"), ``FusedConv``/``FusedGemm`` split back into Conv/Gemm + activation where
  the mode quantizes them, a redundant ``qkv_hidden_sizes`` dropped so that ``Attention``
  becomes ``QAttention``, unique node names; in dynamic mode, ``BiasGelu`` after a quantized
  MatMul and ``SkipLayerNormalization`` split back into ops that ONNX Runtime's CPU kernels
  run faster around integer MatMuls; in static mode, a CNN head flattened channels-last with
  its weight permuted (ONNX Runtime's integer convolutions run channels-last). So the pass
  works after ``fuse`` as well as before;
- *layout* after the quantizer (static mode, ``layout``): a convolution left float that feeds a
  quantized one hands its output over channels-last, so that ONNX Runtime writes it in that
  layout directly instead of transposing the uint8 tensor (exact: only the layout changes);
- *SmoothQuant* (``smooth=alpha``, needs data): per-channel activation outliers moved into the
  weights, which per-tensor activation quantization needs on transformers;
- *calibration* (static mode) once, streamed in chunks, from ``data``: ``sample:NAME`` (a
  bundled sample's calibration data), a folder of ``.npz`` batches, one ``.npz`` file, or
  ``random`` (seeded random inputs, with a warning; also what static mode uses without data);
- *accuracy-aware mode* (``budget``): the loss on evaluation data against the float model
  (``metric``: cosine, top1 or rel_l2, see :mod:`~onnxforge.passes.quantization.metrics`);
  when quantizing everything costs more than ``budget``, each quantized node's sensitivity is
  measured and the most sensitive are kept float until the budget holds
  (:mod:`~onnxforge.passes.quantization.search`).

Defaults per CPU: weights per channel; ``reduce_range=auto`` quantizes weights to 7 bits only
on x86 CPUs without VNNI, where the U8S8 kernels can saturate
(:mod:`~onnxforge.passes.quantization.cpu`); uint8 activations with int8 weights (U8S8), the
combination ONNX Runtime's x86 kernels are fastest at (on a QDQ ResNet, ONNX Runtime's default
int8 activations, per-tensor weights, ran 1.66x the float speed; uint8 with per-channel weights
3.87x). Dynamic mode quantizes MatMul (and Gemm, which ONNX Runtime rewrites as MatMul first),
contrib Attention and LSTM by default: the ops whose integer kernels are faster. Conv is static
mode's job (``ConvInteger`` ran 4-8x slower than float convolution here); Gather
(embedding tables) only saves size, at some accuracy.

After the run, ``pass_.report`` (:class:`~onnxforge.passes.quantization.report.QuantizeReport`)
says what was quantized, the loss, and every node left float with why and, from the search,
what it would cost; ``onnxforge optimize ... --explain quantize`` prints those nodes. A model
that is quantized already (it holds Q/DQ, integer or QLinear ops) is returned unchanged
(``modified=False``): a second ``quantize`` never quantizes twice. The pass quantizes the main
graph; If/Loop/Scan bodies stay float.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import pathlib
import tempfile
from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxforge.errors import EXIT_VERIFICATION_FAILED, InputError, OnnxforgeError
from onnxforge.passes.base import FunctionalPass, PassResult, Semantics
from onnxforge.passes.cleanup import lift_constants
from onnxforge.passes.fold_constants import FoldConstantsPass
from onnxforge.passes.quantization import cpu, layout, prepare
from onnxforge.passes.quantization import data as sources
from onnxforge.passes.quantization.engine import (
    Engine,
    Settings,
    activation_ranges,
    make_session,
    ort_default_op_types,
    save_for_onnxruntime,
)
from onnxforge.passes.quantization.metrics import METRICS, Evaluator
from onnxforge.passes.quantization.report import FloatNode, QuantizeReport
from onnxforge.passes.quantization.search import SENSITIVITY_METHODS, SearchResult, search
from onnxforge.passes.quantization.smooth import smooth, smoothing_groups
from onnxforge.passes.registry import register

__all__ = [
    "QuantizePass",
    "DEFAULT_MODE",
    "DEFAULT_FORMAT",
    "DEFAULT_PER_CHANNEL",
    "DEFAULT_WEIGHT_TYPE",
    "DEFAULT_ACTIVATION_TYPE",
    "DEFAULT_CALIBRATION",
    "DEFAULT_REDUCE_RANGE",
    "DEFAULT_OP_TYPES",
    "DEFAULT_EXCLUDE",
    "DEFAULT_DATA",
    "DEFAULT_EVAL_DATA",
    "DEFAULT_METRIC",
    "DEFAULT_BUDGET",
    "DEFAULT_SENSITIVITY",
    "DEFAULT_MAX_FLOAT",
    "DEFAULT_SMOOTH",
    "DYNAMIC_OP_TYPES",
    "MIN_REDUCTION",
]

logger = logging.getLogger(__name__)

DEFAULT_MODE = "dynamic"  # needs no data
DEFAULT_FORMAT = "qdq"  # static mode; ONNX Runtime's CPU kernels are tuned for QDQ
DEFAULT_PER_CHANNEL = True
DEFAULT_WEIGHT_TYPE = "int8"
DEFAULT_ACTIVATION_TYPE = "uint8"  # U8S8: the fast x86 kernels
DEFAULT_CALIBRATION = "minmax"
DEFAULT_REDUCE_RANGE = "auto"  # true on x86 without VNNI (see passes/quantization/cpu.py)
DEFAULT_OP_TYPES: tuple[str, ...] = ()  # the mode's own list (DYNAMIC_OP_TYPES, ORT's for static)
DEFAULT_EXCLUDE: tuple[str, ...] = ()
DEFAULT_DATA = ""  # none: dynamic mode needs none; static mode falls back to random, warning
DEFAULT_EVAL_DATA = ""  # the evaluation side of `data`
DEFAULT_METRIC = "auto"  # the sample's metric with data=sample:NAME, else cosine
DEFAULT_BUDGET = None  # no accuracy-aware search
DEFAULT_SENSITIVITY = "exclude-one"
DEFAULT_MAX_FLOAT = 8
DEFAULT_SMOOTH = None  # SmoothQuant off

# Dynamic mode's default op types: those whose integer kernels beat float on the CPU.
DYNAMIC_OP_TYPES = ("MatMul", "Attention", "LSTM")
# A node whose outputs each sum fewer products than this (its weight's reduction size: a
# Conv's in-channels x kernel, a MatMul's K) stays float: int8 saves nothing on so little
# arithmetic and adds a quantization pass over its input. The first Conv of digits-cnn (1
# channel, 3x3: 9 products) cost 0.85 ms quantized against 0.08 ms float at batch 256.
MIN_REDUCTION = 16

_MODES = ("dynamic", "static")
_FORMATS = ("qdq", "qoperator")
_INT_TYPES = ("int8", "uint8")
_CALIBRATIONS = ("minmax", "entropy", "percentile")
_TRISTATE = ("auto", "true", "false")
# Node names listed in the hint of an unknown exclude.
_NAMES_SHOWN = 8


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


@dataclasses.dataclass
class _Plan:
    model: ir.Model
    modified: bool
    report: QuantizeReport


@register
class QuantizePass(FunctionalPass):
    """Quantize to int8 with ONNX Runtime's quantizer; keep sensitive nodes float for a budget."""

    name = "quantize"
    summary = (
        "int8 quantization (dynamic or static QDQ) on ONNX Runtime's quantizer, after fuse too; "
        "SmoothQuant, calibration data, and a budget that keeps the most sensitive nodes float."
    )
    semantics = Semantics.LOSSY

    def __init__(
        self,
        *,
        mode: Literal["dynamic", "static"] = DEFAULT_MODE,
        format: Literal["qdq", "qoperator"] = DEFAULT_FORMAT,
        per_channel: bool = DEFAULT_PER_CHANNEL,
        weight_type: Literal["int8", "uint8"] = DEFAULT_WEIGHT_TYPE,
        activation_type: Literal["uint8", "int8"] = DEFAULT_ACTIVATION_TYPE,
        calibration: Literal["minmax", "entropy", "percentile"] = DEFAULT_CALIBRATION,
        reduce_range: Literal["auto", "true", "false"] = DEFAULT_REDUCE_RANGE,
        op_types: list[str] = DEFAULT_OP_TYPES,  # type: ignore[assignment]
        exclude: list[str] = DEFAULT_EXCLUDE,  # type: ignore[assignment]
        data: str = DEFAULT_DATA,
        eval_data: str = DEFAULT_EVAL_DATA,
        metric: Literal["auto", "cosine", "top1", "rel_l2"] = DEFAULT_METRIC,
        budget: float | None = DEFAULT_BUDGET,
        sensitivity: Literal["exclude-one", "only-one"] = DEFAULT_SENSITIVITY,
        max_float: int = DEFAULT_MAX_FLOAT,
        smooth: float | None = DEFAULT_SMOOTH,
    ) -> None:
        _check_choice("mode", mode, _MODES)
        _check_choice("format", format, _FORMATS)
        _check_choice("weight_type", weight_type, _INT_TYPES)
        _check_choice("activation_type", activation_type, _INT_TYPES)
        _check_choice("calibration", calibration, _CALIBRATIONS)
        _check_choice("reduce_range", reduce_range, _TRISTATE)
        _check_choice("metric", metric, ("auto", *METRICS))
        _check_choice("sensitivity", sensitivity, SENSITIVITY_METHODS)
        if mode == "dynamic":
            static_only = {
                "format": (format, DEFAULT_FORMAT),
                "activation_type": (activation_type, DEFAULT_ACTIVATION_TYPE),
                "calibration": (calibration, DEFAULT_CALIBRATION),
            }
            for option, (value, default) in static_only.items():
                if value != default:
                    raise ValueError(
                        f"{option}={value} applies to mode=static (dynamic mode quantizes "
                        "activations to uint8 per batch, without calibration)"
                    )
        if activation_type == "int8" and weight_type == "uint8":
            raise ValueError("ONNX Runtime has no kernels for int8 activations with uint8 weights")
        if budget is not None and (isinstance(budget, bool) or not 0 < float(budget) < math.inf):
            raise ValueError(f"budget must be a positive number, got {budget!r}")
        if isinstance(max_float, bool) or int(max_float) != max_float or max_float < 0:
            raise ValueError(f"max_float must be a whole number >= 0, got {max_float!r}")
        if smooth is not None and (isinstance(smooth, bool) or not 0 < float(smooth) <= 1):
            raise ValueError(f"smooth must be in (0, 1] (SmoothQuant's alpha), got {smooth!r}")
        sources.parse_data(data)
        sources.parse_data(eval_data)
        self.mode = mode
        self.format = format
        self.per_channel = bool(per_channel)
        self.weight_type = weight_type
        self.activation_type = activation_type
        self.calibration = calibration
        self.reduce_range = reduce_range
        self.op_types = [op_types] if isinstance(op_types, str) else list(op_types)
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.data = data
        self.eval_data = eval_data
        self.metric = metric
        self.budget = None if budget is None else float(budget)
        self.sensitivity = sensitivity
        self.max_float = int(max_float)
        self.smooth = None if smooth is None else float(smooth)
        self.report: QuantizeReport | None = None
        self._cache: tuple[str, _Plan] | None = None
        self._signature: tuple = ()

    def requires(self, model: ir.Model) -> None:
        """Nothing beyond a model; notes its graph inputs and outputs for ``ensures``."""
        self._signature = _signature(model)

    def ensures(self, model: ir.Model) -> None:
        """Graph inputs and outputs keep their names and element types."""
        if _signature(model) != self._signature:
            raise AssertionError("quantize changed the graph's inputs or outputs")

    # -- what the options resolve to ----------------------------------------------------------

    def _settings(self) -> Settings:
        if self.reduce_range == "auto":
            reduce_range = cpu.needs_reduce_range()
        else:
            reduce_range = self.reduce_range == "true"
        known = ort_default_op_types(self.mode)
        if self.op_types:
            unknown = [op for op in self.op_types if op not in known]
            if unknown:
                raise InputError(
                    f"quantize: ONNX Runtime's {self.mode} quantizer has no entry for "
                    f"{', '.join(unknown)}",
                    hint=f"op_types for mode={self.mode}: {', '.join(known)}",
                )
            op_types = tuple(self.op_types)
        else:
            op_types = DYNAMIC_OP_TYPES if self.mode == "dynamic" else known
        return Settings(
            mode=self.mode,
            format=self.format,
            per_channel=self.per_channel,
            reduce_range=reduce_range,
            weight_type=self.weight_type,
            activation_type=self.activation_type,
            calibration=self.calibration,
            op_types=op_types,
        )

    def _excluded_nodes(self, model: ir.Model, candidates: Sequence[str]) -> set[str]:
        """Node names from ``exclude``: names of nodes, or op types standing for all their nodes."""
        names = {node.name for node in model.graph}
        ops = {node.op_type for node in model.graph}
        unknown = [item for item in self.exclude if item not in names and item not in ops]
        if unknown:
            shown = ", ".join(candidates[:_NAMES_SHOWN])
            more = f", ... ({len(candidates)} in all)" if len(candidates) > _NAMES_SHOWN else ""
            raise InputError(
                f"quantize: exclude names no node or op type of the model: {', '.join(unknown)}",
                hint=f"exclude takes op types (MatMul) or node names; nodes it can quantize: "
                f"{shown or 'none'}{more}",
            )
        chosen = set(self.exclude)
        return {node.name for node in model.graph if node.name in chosen or node.op_type in chosen}

    # -- the pass ---------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> PassResult:
        """Quantize a copy of ``model``; ``modified`` is true when any node was quantized."""
        plan = self._cached_plan(model)
        self.report = plan.report
        for line in plan.report.lines():
            logger.info("%s", line)
        return PassResult(plan.model, plan.modified)

    def explain(self, model: ir.Model) -> list[FloatNode]:
        """The nodes that stay float on ``model``, with why (for ``--explain quantize``).

        The work is the pass's own: it is kept, and ``call`` on the same model reuses it.
        """
        return list(self._cached_plan(model).report.float_nodes)

    def _cached_plan(self, model: ir.Model) -> _Plan:
        fingerprint = _plan_key(model)
        if self._cache is None or self._cache[0] != fingerprint:
            self._cache = (fingerprint, self._plan(model))
        plan = self._cache[1]
        # A plan's model is handed out once; a second call gets its own copy.
        self._cache = (fingerprint, dataclasses.replace(plan, model=plan.model.clone()))
        return plan

    def _no_op(self, model: ir.Model, status: str, note: str, *, warn: bool = True) -> _Plan:
        """The model unchanged; ``warn`` when the user asked for something that did not happen."""
        (logger.warning if warn else logger.debug)("quantize: %s", note)
        report = QuantizeReport(status=status, note=note)
        return _Plan(model.clone(), False, report)

    def _plan(self, model: ir.Model) -> _Plan:
        already = prepare.quantized_ops(model)
        if already:
            ops = ", ".join(f"{op} {n}" for op, n in already.items())
            return self._no_op(
                model,
                "no-op",
                f"the model is quantized already ({ops}); left unchanged",
                warn=False,
            )
        settings = self._settings()
        report = QuantizeReport(settings=settings.describe(), budget=self.budget)
        working = self._prepare(model, settings, report)
        candidates = _candidates(working, settings.quantizable, dynamic=settings.mode == "dynamic")
        exclude = self._excluded_nodes(working, candidates)
        shallow = _shallow_nodes(working, candidates)
        if settings.mode == "dynamic":  # float ops ONNX Runtime runs faster split (prepare.py)
            to_quantize = frozenset(candidates) - exclude - set(shallow)
            report.unfused += prepare.split_bias_gelu(working, to_quantize)
            report.unfused += prepare.lower_skip_layer_norm(working)
        if not [name for name in candidates if name not in exclude and name not in shallow]:
            return self._no_op(
                model,
                "no-op",
                f"nothing to quantize: no node of {', '.join(settings.op_types)} with a "
                f"constant weight of at least {MIN_REDUCTION} products per output outside "
                "exclude"
                + (" (Conv is quantized by mode=static)" if settings.mode == "dynamic" else ""),
            )
        inputs = sources.input_infos(working)
        source = self._source(self.data, inputs, settings, report)
        left_float = {*exclude, *shallow}
        quantized, result = self._quantize(
            model, working, settings, source, candidates, left_float, report
        )
        quantized.metadata_props.update(model.metadata_props)
        counts = prepare.quantized_ops(quantized)
        if not counts:
            return self._no_op(model, "no-op", "ONNX Runtime's quantizer quantized no node")
        if settings.mode == "static":  # exact: only the layout changes
            report.hand_over = layout.hand_over_channels_last(quantized)
        report.quantized = _quantized_by_op(working, result.quantized - set(result.kept))
        report.candidates = len(candidates)
        report.loss_all_quantized, report.loss = result.loss_all_quantized, result.loss
        report.sensitivity = dict(result.costs)
        report.trials = result.trials
        report.float_nodes = _float_nodes(working, candidates, exclude, shallow, result)
        return _Plan(quantized, True, report)

    def _quantize(
        self,
        model: ir.Model,
        working: ir.Model,
        settings: Settings,
        source: sources.DataSource,
        candidates: Sequence[str],
        left_float: set[str],
        report: QuantizeReport,
    ) -> tuple[ir.Model, SearchResult]:
        """SmoothQuant, calibration, ONNX Runtime's quantizer and the search, in a temp folder."""
        with tempfile.TemporaryDirectory(prefix="onnxforge-quantize-") as folder:
            workdir = pathlib.Path(folder)
            if self.smooth is not None:
                groups = smoothing_groups(
                    working, op_types=settings.quantizable, exclude=left_float
                )
                names = [str(g.activation.name) for g in groups]
                batches = _Counted(source.calibration())
                ranges = activation_ranges(working, names, batches, workdir) if names else {}
                report.smoothed = smooth(working, groups, ranges, alpha=self.smooth)
                report.calibration_batches = batches.count
            calibration = source.calibration if settings.mode == "static" else None
            engine = Engine(working, settings, workdir, calibration=calibration)
            report.calibration_batches = max(report.calibration_batches, engine.calibration_batches)
            evaluator = self._evaluator(
                model, source, sources.input_infos(working), workdir, report
            )
            result = search(
                engine,
                evaluator,
                candidates,
                exclude=left_float,
                budget=self.budget,
                method=self.sensitivity,
                max_float=self.max_float,
            )
            if evaluator is None:  # the post-check the evaluation would have made
                _check_runs(reference_path(workdir, model), result.path, source)
            return engine.load(result.path), result

    def _prepare(self, model: ir.Model, settings: Settings, report: QuantizeReport) -> ir.Model:
        """A copy of the model made ready for ONNX Runtime's quantizer (all steps exact)."""
        working = model.clone()
        lift_constants(working)
        # Weights computed from constants (an exported Linear's transposed weight) become
        # constants the quantizer can read: quantize then works on an unfolded export too.
        FoldConstantsPass()(working)
        prepare.name_nodes(working)
        report.unfused = prepare.unfuse_activations(working, settings.quantizable)
        prepare.drop_redundant_qkv_sizes(working)
        report.typed_values = prepare.annotate_types(working)
        if settings.mode == "static" and "Conv" in settings.quantizable:  # reads the shapes
            report.channels_last = prepare.flatten_channels_last(working)
        return working

    def _source(
        self,
        text: str,
        inputs: list[sources.InputInfo],
        settings: Settings,
        report: QuantizeReport,
    ) -> sources.DataSource:
        source = sources.open_source(text, inputs)
        needs = [
            why
            for why, needed in (
                ("static calibration", settings.mode == "static"),
                ("SmoothQuant ranges", self.smooth is not None),
                ("the accuracy budget", self.budget is not None),
            )
            if needed
        ]
        if source.random and needs and text != "random":
            logger.warning(
                "quantize: no data given; %s use seeded random inputs, whose ranges are not "
                "those of real data (give data=sample:NAME or data=DIR of .npz batches)",
                " and ".join(needs),
            )
        if needs or text:
            report.data = source.description
        return source

    def _evaluator(
        self,
        model: ir.Model,
        source: sources.DataSource,
        inputs: list[sources.InputInfo],
        workdir: pathlib.Path,
        report: QuantizeReport,
    ) -> Evaluator | None:
        """The loss measure, when there is a budget to hold or real data to measure on."""
        if self.budget is None and (source.random or not self.data):
            return None
        evaluation = source
        if self.eval_data:
            evaluation = sources.open_source(self.eval_data, inputs)
        auto = evaluation.metric or source.metric or "cosine"
        metric = self.metric if self.metric != "auto" else auto
        report.metric = metric
        float_session = make_session(reference_path(workdir, model))

        def runner(path: pathlib.Path):
            session = make_session(path)
            return lambda batch: session.run(None, batch)

        return Evaluator(
            lambda batch: float_session.run(None, batch), evaluation.evaluation, metric, runner
        )


def _plan_key(model: ir.Model) -> str:
    """What ``explain`` and ``call`` must agree on to share a plan.

    The graph as text and the identity of every weight tensor: hashing the weights' bytes would
    cost a serialisation of the whole model, impossible past 2 GiB.
    """
    tensors = sorted(
        (str(name), id(value.const_value)) for name, value in model.graph.initializers.items()
    )
    text = ir.to_onnx_text(model, exclude_initializers=True)
    return hashlib.sha256(f"{id(model)}\n{tensors}\n{text}".encode()).hexdigest()


def _signature(model: ir.Model) -> tuple:
    values = [*model.graph.inputs, *model.graph.outputs]
    return tuple((v.name, v.dtype) for v in values)


def reference_path(workdir: pathlib.Path, model: ir.Model) -> pathlib.Path:
    """The float model saved in ``workdir`` (once), for ONNX Runtime sessions."""
    path = workdir / "reference.onnx"
    if not path.exists():
        save_for_onnxruntime(model, path)
    return path


def _check_runs(reference: pathlib.Path, quantized: pathlib.Path, source) -> None:
    """Post-check: the quantized model runs on a batch; outputs shaped and finite as float's."""
    batch, _ = next(iter(source.evaluation()))
    expected = make_session(reference).run(None, batch)
    try:
        got = make_session(quantized).run(None, batch)
    except Exception as error:
        raise QuantizedModelBroken(f"the quantized model does not run: {error}") from error
    for index, (ref, out) in enumerate(zip(expected, got, strict=True)):
        if ref.shape != out.shape:
            raise QuantizedModelBroken(
                f"output {index} of the quantized model has shape {out.shape}, not {ref.shape}"
            )
        if np.issubdtype(ref.dtype, np.floating) and not np.isfinite(out[np.isfinite(ref)]).all():
            raise QuantizedModelBroken(f"output {index} of the quantized model is not finite")


class QuantizedModelBroken(OnnxforgeError):
    """The post-check failed: the quantized model does not run, or its outputs are not finite."""

    exit_code = EXIT_VERIFICATION_FAILED


class _Counted:
    """An iterator that counts what it hands out."""

    def __init__(self, items) -> None:
        self._items = iter(items)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.count += 1
        return item


def _candidates(model: ir.Model, op_types: Collection[str], *, dynamic: bool) -> list[str]:
    """Nodes of the quantized op types with a constant float weight, in graph order."""
    wanted = set(op_types)
    names = []
    for node in model.graph:
        if node.op_type not in wanted:
            continue
        if dynamic and node.op_type == "Gemm" and not _plain_gemm(node):
            continue  # ONNX Runtime rewrites (and quantizes) only alpha = beta = 1, no transA
        if any(
            value is not None
            and value.const_value is not None
            and not value.is_graph_input()
            and value.const_value.dtype == ir.DataType.FLOAT
            and value.const_value.size > 1
            for value in node.inputs
        ):
            names.append(node.name)
    return names


def _reduction_size(node: ir.Node) -> int | None:
    """How many products each output of ``node`` sums, from its weight's shape (None: unknown)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return None
    shape = [int(d) for d in weight.const_value.shape]
    if not shape:
        return None
    if node.op_type == "Conv" and len(shape) >= 3:
        return math.prod(shape[1:])
    if node.op_type == "ConvTranspose" and len(shape) >= 3:
        return shape[0] * math.prod(shape[2:])
    if node.op_type == "MatMul" and len(shape) >= 2:
        return shape[-2]
    if node.op_type == "Gemm" and len(shape) == 2:
        return shape[1] if node.attributes.get_int("transB", 0) else shape[0]
    if node.op_type in ("Attention", "LSTM") and len(shape) >= 2:
        return shape[0] if node.op_type == "Attention" else shape[-1]
    return None


def _shallow_nodes(model: ir.Model, candidates: Sequence[str]) -> dict[str, int]:
    """Candidates whose reduction size is below MIN_REDUCTION, with that size."""
    by_name = {node.name: node for node in model.graph}
    shallow = {}
    for name in candidates:
        size = _reduction_size(by_name[name])
        if size is not None and size < MIN_REDUCTION:
            shallow[name] = size
    return shallow


def _plain_gemm(node: ir.Node) -> bool:
    attributes = node.attributes
    return (
        attributes.get_float("alpha", 1.0) == 1.0
        and attributes.get_float("beta", 1.0) == 1.0
        and not attributes.get_int("transA", 0)
    )


def _quantized_by_op(model: ir.Model, names: set[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.name in names:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _float_nodes(
    model: ir.Model, candidates, exclude: set[str], shallow: dict[str, int], result
) -> list[FloatNode]:
    ops = {node.name: node.op_type for node in model.graph}
    nodes = []
    for name in result.kept:
        nodes.append(
            FloatNode(
                "kept float",
                (name,),
                f"quantizing it costs {result.costs[name]:.5f} of the metric; with it float "
                f"the loss is {result.steps[name]:.5f}",
                ops[name],
                result.costs[name],
            )
        )
    for name in sorted(exclude):
        nodes.append(FloatNode("excluded", (name,), "named in exclude", ops[name]))
    for name, size in shallow.items():
        if name not in exclude:
            reason = f"{size} products per output, under {MIN_REDUCTION}: int8 gains nothing"
            nodes.append(FloatNode("not quantized", (name,), reason, ops[name]))
    for name in candidates:
        if name not in result.quantized and name not in exclude and name not in shallow:
            nodes.append(
                FloatNode(
                    "not quantized",
                    (name,),
                    "ONNX Runtime's quantizer left it float (no integer kernel for its inputs)",
                    ops[name],
                )
            )
    return nodes
