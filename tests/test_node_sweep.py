"""The correctness bar: ONNX's own node test cases still pass after the default pipeline.

Every case of ``onnx.backend.test.case.node.collect_testcases()`` (one model, one set of
inputs and expected outputs) that ONNX Runtime on the CPU gets right as given must still be
right after ``fold-constants,cleanup`` (plus ``fuse`` when a pass of that name is registered).
A case is right when every output has the expected shape and dtype and its values match with
``np.testing.assert_allclose(rtol=1e-3, atol=1e-5)`` (strings, booleans and integers exactly);
sequences are compared element by element, an absent optional output must stay absent.
Cases whose expected outputs cannot be compared at all are skipped and counted, not hidden.

:func:`run_node_sweep` is the whole sweep, so that a benchmark can time it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.backend.test.case.node import collect_testcases

import onnxforge
from onnxforge.errors import OnnxforgeError
from onnxforge.passes import available_passes, format_pass, parse_pipeline

__all__ = ["PIPELINE", "SweepResult", "pipeline_for_sweep", "run_node_sweep", "node_cases"]

logger = logging.getLogger(__name__)

PIPELINE = "fold-constants,cleanup"
RTOL = 1e-3
ATOL = 1e-5
# How many of ONNX's ~1,900 node cases ONNX Runtime must get right before the pipeline for the
# sweep to mean something. Cases of a newer IR version or opset than the installed onnxruntime
# supports, and ops or types it lacks, are the ones it does not get right.
MIN_RIGHT_BEFORE = 1000


def _import_passes() -> None:
    """Register fold-constants, and fuse where it exists (until ``onnxforge.passes`` does)."""
    importlib.import_module("onnxforge.passes.fold_constants")
    try:
        importlib.import_module("onnxforge.passes.fuse")
    except ImportError:
        pass


def pipeline_for_sweep() -> str:
    """``PIPELINE``, plus ``fuse`` when a pass of that name is registered."""
    _import_passes()
    return f"{PIPELINE},fuse" if "fuse" in available_passes() else PIPELINE


@functools.cache
def node_cases() -> tuple[Any, ...]:
    """ONNX's node test cases (collected once: onnx keeps them in a module-level list)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators overflow casts on purpose
        return tuple(collect_testcases())


class Uncomparable(Exception):
    """An expected output that this sweep does not know how to compare."""


def _as_value(value: Any) -> Any:
    """A case's input or output as ONNX Runtime takes and returns it."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, onnx.SequenceProto):
        return [_as_value(v) for v in numpy_helper.to_list(value)]
    if isinstance(value, list):
        return [_as_value(v) for v in value]
    if isinstance(value, np.generic):
        return np.asarray(value)
    return value


def _compare(expected: Any, actual: Any, where: str) -> None:
    """Raise AssertionError when ``actual`` is not ``expected``; Uncomparable when unknowable."""
    if expected is None:
        assert actual is None, f"{where}: expected no value (empty optional), got one"
        return
    if isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: expected a sequence, got {type(actual)}"
        assert len(actual) == len(expected), f"{where}: sequence length"
        for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
            _compare(e, a, f"{where}[{index}]")
        return
    if not isinstance(expected, np.ndarray):
        raise Uncomparable(f"{where}: expected output of type {type(expected).__name__}")
    assert isinstance(actual, np.ndarray), f"{where}: expected a tensor, got {type(actual)}"
    assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
    if expected.dtype == object or expected.dtype.kind in "SU":
        np.testing.assert_array_equal(actual.astype(object), expected.astype(object), where)
        return
    assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype.kind in "biu":
        np.testing.assert_array_equal(actual, expected, where)
        return
    if expected.dtype.kind not in "fc":  # float8/float4/bfloat16 and friends from ml_dtypes
        actual, expected = actual.astype(np.float32), expected.astype(np.float32)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=where)


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # no thread pool to start per case: sessions start fast
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: many cases are expected not to load
    return options


def _run(model: onnx.ModelProto, feed: dict[str, Any], options: ort.SessionOptions) -> list:
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feed)


def _check(model: onnx.ModelProto, feed: dict[str, Any], expected: Sequence[Any], options) -> None:
    actual = _run(model, feed, options)
    assert len(actual) == len(expected), f"{len(actual)} outputs, expected {len(expected)}"
    for index, (e, a) in enumerate(zip(expected, actual, strict=True)):
        _compare(e, a, f"output {index} ({model.graph.output[index].name})")


@dataclasses.dataclass
class SweepResult:
    """What the sweep found; ``failures`` maps a case name to why it broke."""

    pipeline: str
    total: int = 0
    uncomparable: int = 0
    wrong_before: int = 0  # ONNX Runtime cannot load or run the case, or gets it wrong
    right_before: int = 0
    right_after: int = 0
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    modified: int = 0  # cases the pipeline changed

    def counts(self) -> dict[str, int]:
        """The figures, for recording."""
        return {
            "total": self.total,
            "uncomparable": self.uncomparable,
            "wrong_before": self.wrong_before,
            "right_before": self.right_before,
            "right_after": self.right_after,
            "failures": len(self.failures),
            "modified": self.modified,
        }


def _first_line(error: BaseException) -> str:
    """The error's type and first three non-empty lines (numpy puts the output's name second)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()][:3]
    return f"{type(error).__name__}: {' | '.join(lines)}"[:300]


def _optimize_and_check(case: Any, pipeline: str, feed: dict[str, Any], expected, options):
    """Run ``pipeline`` on the case's model; raise when it fails or the result is wrong.

    Returns whether any pass reported a change.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = onnxforge.optimize(ir.from_proto(case.model), pipeline, verify="none")
    after = ir.to_proto(optimized.model)
    names_before = [v.name for v in (*case.model.graph.input, *case.model.graph.output)]
    names_after = [v.name for v in (*after.graph.input, *after.graph.output)]
    assert names_after == names_before, f"graph inputs/outputs renamed: {names_after}"
    _check(after, feed, expected, options)
    return any(record.modified for record in optimized.records)


def _first_breaking_prefix(case: Any, pipeline: str, feed, expected, options) -> str:
    """The shortest prefix of ``pipeline`` after which the case is wrong (for the message)."""
    passes = [format_pass(p) for p in parse_pipeline(pipeline)]
    for end in range(1, len(passes)):
        prefix = ",".join(passes[:end])
        try:
            _optimize_and_check(case, prefix, feed, expected, options)
        except Exception:
            return prefix
    return pipeline


def run_node_sweep(pipeline: str | None = None, cases: Sequence[Any] | None = None) -> SweepResult:
    """Run every node case before and after ``pipeline`` (default: :func:`pipeline_for_sweep`)."""
    _import_passes()
    pipeline = pipeline or pipeline_for_sweep()
    cases = node_cases() if cases is None else cases
    result = SweepResult(pipeline)
    options = _session_options()
    for case in cases:
        result.total += 1
        ((inputs, outputs),) = case.data_sets
        names = [i.name for i in case.model.graph.input]
        feed = {name: _as_value(v) for name, v in zip(names, inputs, strict=False)}
        expected = [_as_value(v) for v in outputs]
        try:
            _check(case.model, feed, expected, options)
        except Uncomparable:
            result.uncomparable += 1
            continue
        except Exception:  # ORT cannot load or run it, or gets it wrong: not our bar
            result.wrong_before += 1
            continue
        result.right_before += 1
        try:
            result.modified += _optimize_and_check(case, pipeline, feed, expected, options)
        except OnnxforgeError as error:  # a pass raised: PassError names it
            result.failures[case.name] = _first_line(error)
            continue
        except Exception as error:  # wrong result: say after which pass it went wrong
            prefix = _first_breaking_prefix(case, pipeline, feed, expected, options)
            result.failures[case.name] = f"wrong after {prefix!r}: {_first_line(error)}"
            continue
        result.right_after += 1
    return result


@pytest.mark.slow
def test_node_cases_still_right_after_the_pipeline(record_property) -> None:
    result = run_node_sweep()
    for key, value in result.counts().items():
        record_property(key, value)
    logger.info("node sweep over %s: %s", result.pipeline, result.counts())
    assert result.total == len(node_cases())
    assert result.right_before > MIN_RIGHT_BEFORE, result.counts()
    assert result.right_before + result.wrong_before + result.uncomparable == result.total
    assert result.modified > 0, "the pipeline changed no case: it cannot have been exercised"
    assert not result.failures, "\n".join(
        [f"{len(result.failures)} node cases broke under {result.pipeline}:"]
        + [f"  {name}: {why}" for name, why in sorted(result.failures.items())]
    )
    assert result.right_after == result.right_before


# Pruning is lossy where it applies; in ONNX's node cases weights are graph inputs, not
# constants, so it must leave every case as it was: valid, runnable, and still right.
PRUNE_PIPELINE = "fold-constants,cleanup,prune{granularity=channel},fuse"
# cuda-layout rewrites ReduceMean, GlobalAveragePool and MaxPool-after-Relu cases too.
CUDA_LAYOUT_PIPELINE = "fold-constants,cleanup,fuse,cuda-layout"


@pytest.mark.slow
def test_node_cases_still_right_with_prune_in_the_pipeline() -> None:
    result = run_node_sweep(PRUNE_PIPELINE)
    assert result.right_before > MIN_RIGHT_BEFORE, result.counts()
    assert not result.failures, "\n".join(
        [f"{len(result.failures)} node cases broke under {result.pipeline}:"]
        + [f"  {name}: {why}" for name, why in sorted(result.failures.items())]
    )
    assert result.right_after == result.right_before


@pytest.mark.parametrize("pipeline", ["cuda-layout", CUDA_LAYOUT_PIPELINE])
def test_node_cases_still_right_with_cuda_layout(pipeline: str) -> None:
    result = run_node_sweep(pipeline)
    assert result.right_before > MIN_RIGHT_BEFORE, result.counts()
    assert result.modified > 0, "cuda-layout changed no case: it cannot have been exercised"
    assert not result.failures, "\n".join(
        [f"{len(result.failures)} node cases broke under {result.pipeline}:"]
        + [f"  {name}: {why}" for name, why in sorted(result.failures.items())]
    )
    assert result.right_after == result.right_before
