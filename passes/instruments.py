"""The shipped pass instruments.

Timing, Ledger, VerifyStructure, VerifyNumerics, Bisect, CrashReproducer and PrintIR.

Instruments that must run a model (VerifyNumerics) receive a ``runner`` and a ``compare``
callable from the core, so that this package never imports the backend.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.errors import InputError, first_line
from onnxforge.passes.base import PassBase, Semantics
from onnxforge.passes.manager import CheckFailed, Instrument, PassRecord
from onnxforge.passes.statistics import ModelStats, model_stats

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "Runner",
    "Comparison",
    "Comparator",
    "DEFAULT_TOLERANCES",
    "Timing",
    "Ledger",
    "VerifyStructure",
    "VerifyNumerics",
    "Bisect",
    "CrashReproducer",
    "PrintIR",
    "Explain",
]

logger = logging.getLogger(__name__)

Inputs = Mapping[str, np.ndarray]
Runner = Callable[[ir.Model, Inputs], Sequence[np.ndarray]]


class Comparison(Protocol):
    """What VerifyNumerics needs from an output comparison (``backend.compare_outputs``)."""

    rel_l2: float
    max_abs: float
    finite: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        ...


Comparator = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], Comparison]

# Largest relative L2 error of the outputs that a single pass may cause, by its semantics.
# Lossy passes have no fixed tolerance: their drift is reported against an accuracy budget.
DEFAULT_TOLERANCES: dict[Semantics, float | None] = {
    Semantics.EXACT: 1e-6,
    Semantics.REASSOCIATING: 1e-4,
    Semantics.APPROXIMATE: 5e-3,
    Semantics.LOSSY: None,
}


class Timing(Instrument):
    """Wall time of each pass and the process's peak resident memory after it."""

    def before_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def _stop(self, record: PassRecord) -> None:
        record.wall_s = time.perf_counter() - self._start
        if resource is not None:  # ru_maxrss is in KiB on Linux
            record.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def after_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Stop the clock."""
        self._stop(record)

    def after_pass_failed(self, record: PassRecord, model: ir.Model, error: Exception) -> None:
        """Stop the clock on failure too."""
        self._stop(record)


class Ledger(Instrument):
    """Node counts, op-type deltas, parameter counts and bytes before and after each pass."""

    def __init__(self) -> None:
        self._before: ModelStats | None = None

    def before_pipeline(self, model: ir.Model, passes: Sequence[PassBase]) -> None:
        """Measure the input model."""
        self._before = model_stats(model)

    def after_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Measure the result and record the differences."""
        before = self._before if self._before is not None else model_stats(model)
        after = model_stats(model) if record.modified else before
        record.nodes_before, record.nodes_after = before.nodes, after.nodes
        record.parameters_before, record.parameters_after = before.parameters, after.parameters
        record.parameter_bytes_before = before.parameter_bytes
        record.parameter_bytes_after = after.parameter_bytes
        delta = collections.Counter(after.ops)
        delta.subtract(before.ops)
        record.ops_delta = {op: n for op, n in sorted(delta.items()) if n}
        self._before = after


# In-memory tensors larger than this are checked as references to a placeholder file (below).
_PLACEHOLDER_MIN_BYTES = 1 << 20


def _check_structure(model: ir.Model) -> None:
    """ONNX checker and strict shape inference, without reading or copying large weights.

    The checker needs a tensor's type and shape, not its bytes, but it reads external data
    relative to the model file's folder, which a proto built in memory does not have (so every
    model loaded with external data failed), and a proto past 2 GiB cannot be built at all.
    External tensors and large in-memory ones are therefore checked as references into an
    empty placeholder file in a temporary folder: nothing is read, copied or written.
    """
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.dtype == ir.DataType.STRING:
                continue
            if isinstance(tensor, ir.ExternalTensor) or tensor.nbytes > _PLACEHOLDER_MIN_BYTES:
                swapped.append((value, tensor))
    if not swapped:
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        return
    with tempfile.TemporaryDirectory(prefix="onnxforge-check-") as folder:
        placeholder = pathlib.Path(folder) / "placeholder.data"
        try:
            for value, tensor in swapped:
                value.const_value = ir.ExternalTensor(
                    placeholder.name,
                    0,
                    tensor.nbytes,
                    tensor.dtype,
                    shape=tensor.shape,
                    name=str(tensor.name or value.name),
                    base_dir=folder,
                )
            proto = ir.to_proto(model)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
        placeholder.touch()  # the checker wants the file to exist; it never reads it
        path = pathlib.Path(folder) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path), full_check=True)


class VerifyStructure(Instrument):
    """ONNX checker and strict shape inference after every pass that changed the model."""

    def before_pipeline(self, model: ir.Model, passes: Sequence[PassBase]) -> None:
        """Check the input; an input that already fails is reported and not held against passes."""
        self.enabled = True
        try:
            _check_structure(model)
        except Exception as error:
            self.enabled = False
            logger.warning(
                "the input model fails the ONNX checker, structure checks are off: %s",
                first_line(error),
            )

    def after_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Raise CheckFailed when the result is not a valid model."""
        if not (self.enabled and record.modified):
            return
        try:
            _check_structure(model)
        except Exception as error:
            reason = first_line(error)
            raise CheckFailed(
                f"the result is not a valid ONNX model: {reason}",
                hint="the pass produced an invalid graph; this is a bug in the pass",
            ) from error


class VerifyNumerics(Instrument):
    """Run the model before and after every pass on the same inputs and compare the outputs.

    A pass whose outputs move more than its semantics allow (``DEFAULT_TOLERANCES``, relative
    L2 error against the previous pass) fails verification and is named in the error. Lossy
    passes are held instead to ``budget``, the largest relative L2 error against the input
    model; without a budget their drift is only reported.
    """

    def __init__(
        self,
        runner: Runner,
        inputs: Inputs,
        compare: Comparator,
        *,
        tolerances: Mapping[Semantics, float | None] | None = None,
        budget: float | None = None,
    ) -> None:
        self.runner = runner
        self.inputs = inputs
        self.compare = compare
        self.tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
        self.budget = budget

    def _run(self, model: ir.Model, record: PassRecord | None) -> Sequence[np.ndarray]:
        try:
            return self.runner(model, self.inputs)
        except Exception as error:
            if record is None:
                raise InputError(f"the input model does not run: {error}") from error
            raise CheckFailed(f"the result no longer runs: {error}") from error

    def before_pipeline(self, model: ir.Model, passes: Sequence[PassBase]) -> None:
        """Run the input model once: the reference for every later comparison."""
        self.reference = self._run(model, None)
        self.previous = self.reference

    def after_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Compare with the previous outputs; raise CheckFailed past the tolerance."""
        if not record.modified:
            return
        outputs = self._run(model, record)
        step = self.compare(self.previous, outputs)
        total = self.compare(self.reference, outputs)
        record.drift, record.total_drift = step.as_dict(), total.as_dict()
        self.previous = outputs
        if not step.finite:
            raise CheckFailed("the outputs became NaN or infinite")
        tolerance = self.tolerances.get(record.semantics)
        if tolerance is not None and not step.rel_l2 <= tolerance:
            raise CheckFailed(
                f"outputs drifted by relative L2 {step.rel_l2:.3g} (max abs {step.max_abs:.3g}), "
                f"past the {tolerance:g} allowed for a pass whose semantics are "
                f"'{record.semantics}'",
                hint="the pass changed what the model computes: drop it from the pipeline, or "
                "rerun with --reproducer DIR to keep the model it was given",
            )
        if record.semantics is Semantics.LOSSY and self.budget is not None:
            if not total.rel_l2 <= self.budget:
                raise CheckFailed(
                    f"outputs drifted by relative L2 {total.rel_l2:.3g} from the input model, "
                    f"over the accuracy budget {self.budget:g}",
                    hint="loosen the pass's options or raise the budget",
                )


class Bisect(Instrument):
    """Run only the first ``limit`` passes and skip the rest, as LLVM's -opt-bisect-limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def should_run(self, record: PassRecord, model: ir.Model) -> bool:
        """Passes at index ``limit`` and later are skipped."""
        return record.index < self.limit


class CrashReproducer(Instrument):
    """On a failing pass, save the model as it was before that pass, ready to rerun alone.

    The saved model's metadata holds ``onnxforge.reproduce``: the text of the failing pass.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = pathlib.Path(directory)
        self._snapshot: ir.Model | None = None

    def before_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Keep a copy of the model (tensors are shared, not copied)."""
        self._snapshot = model.clone()

    def after_pipeline(self, result) -> None:
        """Drop the copy.

        It is kept through ``after_pass``, where a verification instrument whose hook runs
        after this one may still fail the pass.
        """
        self._snapshot = None

    def after_pass_failed(self, record: PassRecord, model: ir.Model, error: Exception) -> None:
        """Save the copy and note its path in the record."""
        if self._snapshot is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in record.name)
        path = self.directory / f"reproducer-{record.index:02d}-{safe_name}.onnx"
        self._snapshot.metadata_props["onnxforge.reproduce"] = record.text
        from onnxforge.io import save  # here: onnxforge.io imports the passes package

        snapshot, self._snapshot = self._snapshot, None
        try:  # atomically, like every model onnxforge writes; the pass's own error comes first
            save(snapshot, path)
        except Exception as failure:  # noqa: BLE001 - reported, never raised over the failure
            logger.warning(
                "could not save the model before failing pass %s: %s", record.text, failure
            )
            return
        record.reproducer = str(path)
        logger.warning("saved the model before failing pass %s to %s", record.text, path)


def model_fingerprint(model: ir.Model) -> str:
    """A hash of the serialised model, for detecting change."""
    proto = ir.to_proto(model)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


class PrintIR(Instrument):
    """Print the IR before or after passes, or only after passes that changed it (by hash)."""

    def __init__(
        self,
        when: Literal["before", "after", "after-change"] = "after-change",
        *,
        passes: Sequence[str] | None = None,
        sink: Callable[[str], None] | None = None,
    ) -> None:
        self.when = when
        self.passes = set(passes) if passes else None
        self.sink = sink or (lambda text: logger.info("%s", text))
        self._hash: str | None = None

    def _selected(self, record: PassRecord) -> bool:
        return self.passes is None or record.name in self.passes

    def _emit(self, label: str, record: PassRecord, model: ir.Model) -> None:
        text = ir.to_onnx_text(model, exclude_initializers=True)
        self.sink(f"// ----- IR {label} pass #{record.index} {record.text} -----\n{text}")

    def before_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Print (when='before') or remember the hash (when='after-change')."""
        if not self._selected(record):
            return
        if self.when == "before":
            self._emit("before", record, model)
        elif self.when == "after-change":
            self._hash = model_fingerprint(model)

    def after_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Print (when='after', or 'after-change' when the hash moved)."""
        if not self._selected(record):
            return
        if self.when == "after" or (
            self.when == "after-change" and model_fingerprint(model) != self._hash
        ):
            self._emit("after", record, model)


class Explain(Instrument):
    """Before each run of the named pass, ask it for its near-misses on the model it is given.

    Works with passes that have an ``explain(model) -> list`` method (``fuse`` does: each item
    names a rule, the nodes it matched, and the reason its check gave). The results are in
    ``near_misses``, as (pass index, item) pairs.
    """

    def __init__(self, pass_name: str) -> None:
        self.pass_name = pass_name
        self.near_misses: list[tuple[int, Any]] = []
        self._passes: Sequence[PassBase] = ()

    def before_pipeline(self, model: ir.Model, passes: Sequence[PassBase]) -> None:
        """Remember the pass instances, to reach their ``explain`` methods."""
        self._passes = passes
        named = [p for p in passes if p.name == self.pass_name]
        if not named:
            raise InputError(f"--explain {self.pass_name}: that pass is not in the pipeline")
        if not hasattr(named[0], "explain"):
            raise InputError(
                f"pass '{self.pass_name}' cannot explain its near-misses", hint="fuse can"
            )

    def before_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Collect the near-misses on the model as this pass receives it."""
        if record.name == self.pass_name:
            pass_ = self._passes[record.index]
            self.near_misses += [(record.index, miss) for miss in pass_.explain(model)]
