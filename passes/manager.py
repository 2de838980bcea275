"""The pass manager: runs passes in order, with instruments around every pass.

Instruments see each pass through four hooks (as TVM's pass instruments and MLIR's pass
manager do): ``should_run`` may skip it, ``before_pass`` runs in list order, ``after_pass`` and
``after_pass_failed`` run in reverse order, so the last instrument in the list wraps the pass
most tightly (put Timing last). An instrument that raises in ``after_pass`` (a failed
verification) fails that pass like an exception inside it would.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxforge.errors import OnnxforgeError, PassError, VerificationError
from onnxforge.passes.base import PassBase, Semantics
from onnxforge.passes.pipeline import PipelineLike, format_pass, format_pipeline, parse_pipeline

__all__ = ["PassRecord", "PipelineResult", "Instrument", "PassManager", "CheckFailed"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassRecord:
    """What happened in one pass: filled by the manager and by the instruments."""

    index: int
    name: str
    text: str
    semantics: Semantics
    status: str = "pending"  # pending | ok | skipped | failed
    modified: bool | None = None
    wall_s: float | None = None
    peak_rss_bytes: int | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    ops_delta: dict[str, int] | None = None
    parameters_before: int | None = None
    parameters_after: int | None = None
    parameter_bytes_before: int | None = None
    parameter_bytes_after: int | None = None
    drift: dict[str, Any] | None = None  # against the previous pass's outputs
    total_drift: dict[str, Any] | None = None  # against the input model's outputs
    error: str | None = None
    reproducer: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        data = dataclasses.asdict(self)
        data["semantics"] = str(self.semantics)
        return data


@dataclasses.dataclass
class PipelineResult:
    """The optimised model and one record per pass."""

    model: ir.Model
    records: list[PassRecord]
    pipeline: str

    def as_dict(self) -> dict[str, Any]:
        """The ledger as a JSON-ready dictionary (the model itself is not included)."""
        return {"pipeline": self.pipeline, "passes": [r.as_dict() for r in self.records]}


class CheckFailed(OnnxforgeError):
    """Raised by an instrument's ``after_pass`` when the pass's result fails a check.

    The manager turns it into a :class:`~onnxforge.errors.VerificationError` that names the
    pass, its index and the passes before it.
    """


class Instrument:
    """Base class of pass instruments; every hook is optional and does nothing by default."""

    def before_pipeline(self, model: ir.Model, passes: Sequence[PassBase]) -> None:
        """Called once, before the first pass."""

    def should_run(self, record: PassRecord, model: ir.Model) -> bool:
        """Return False to skip this pass."""
        return True

    def before_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Called right before the pass runs."""

    def after_pass(self, record: PassRecord, model: ir.Model) -> None:
        """Called after the pass succeeded; ``model`` is the pass's result."""

    def after_pass_failed(self, record: PassRecord, model: ir.Model, error: Exception) -> None:
        """Called when the pass, or an instrument's ``after_pass``, raised."""

    def after_pipeline(self, result: PipelineResult) -> None:
        """Called once, after the last pass."""


class PassManager:
    """Run a pipeline of passes with instruments; ``run(model) -> PipelineResult``."""

    def __init__(self, passes: PipelineLike, instruments: Sequence[Instrument] = ()) -> None:
        self.passes = parse_pipeline(passes)
        self.instruments = list(instruments)

    @property
    def pipeline(self) -> str:
        """The canonical text of the pipeline."""
        return format_pipeline(self.passes)

    def run(self, model: ir.Model) -> PipelineResult:
        """Run every pass in order; a failing pass raises :class:`PassError`."""
        for instrument in self.instruments:
            instrument.before_pipeline(model, self.passes)
        records: list[PassRecord] = []
        for index, pass_ in enumerate(self.passes):
            record = PassRecord(index, pass_.name, format_pass(pass_), pass_.semantics)
            records.append(record)
            if not all(inst.should_run(record, model) for inst in self.instruments):
                record.status = "skipped"
                logger.info("pass #%d %s skipped", index, record.text)
                continue
            model = self._run_one(pass_, record, model, records)
        result = PipelineResult(model, records, self.pipeline)
        for instrument in self.instruments:
            instrument.after_pipeline(result)
        return result

    def _run_one(
        self, pass_: PassBase, record: PassRecord, model: ir.Model, records: list[PassRecord]
    ) -> ir.Model:
        for instrument in self.instruments:
            instrument.before_pass(record, model)
        logger.info("pass #%d %s", record.index, record.text)
        try:
            result = pass_(model)
            record.modified = result.modified
            for instrument in reversed(self.instruments):
                instrument.after_pass(record, result.model)
        except Exception as error:
            record.status = "failed"
            record.error = f"{type(error).__name__}: {error}"
            for instrument in reversed(self.instruments):
                instrument.after_pass_failed(record, model, error)
            raise self._failure(error, record, records) from error
        record.status = "ok"
        return result.model

    @staticmethod
    def _failure(error: Exception, record: PassRecord, records: list[PassRecord]) -> PassError:
        """The typed error for a failed pass: what failed, which pass, after which passes."""
        previous = tuple(r.text for r in records[:-1] if r.status == "ok")
        where = {"pass_name": record.text, "index": record.index, "previous": previous}
        if isinstance(error, CheckFailed):
            hints = [h for h in (error.hint, record.reproducer and _reproducer_hint(record)) if h]
            failure: PassError = VerificationError(
                str(error), hint="; ".join(hints) or None, **where
            )
        elif isinstance(error, OnnxforgeError):
            failure = PassError(str(error), hint=error.hint or _reproducer_hint(record), **where)
            failure.exit_code = error.exit_code  # bad input met inside a pass is still bad input
        else:
            failure = PassError(record.error or str(error), hint=_reproducer_hint(record), **where)
        failure.records = records
        return failure


def _reproducer_hint(record: PassRecord) -> str:
    if record.reproducer:
        return (
            f"the model as it was before this pass is in {record.reproducer}; reproduce with "
            f"`onnxforge optimize {record.reproducer} -o out.onnx -p '{record.text}' --debug`"
        )
    return "rerun with --debug for the traceback, or --reproducer DIR to save the failing input"
