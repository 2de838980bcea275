"""Find the first pass whose inclusion makes the final outputs drift past a tolerance.

Like LLVM's ``-opt-bisect-limit``: run the pipeline with only its first *k* passes (the
:class:`~onnxforge.passes.instruments.Bisect` instrument skips the rest) and binary-search the
smallest *k* whose outputs are bad. This finds a culprit even when every single pass stays
within its own tolerance and only their sum breaks the model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxforge.errors import OnnxforgeError
from onnxforge.passes.base import PassBase
from onnxforge.passes.instruments import Bisect, Comparator, Runner
from onnxforge.passes.manager import PassManager
from onnxforge.passes.pipeline import PipelineLike, format_pass, parse_pipeline

__all__ = ["BisectResult", "bisect_pipeline", "DEFAULT_BISECT_TOLERANCE"]

logger = logging.getLogger(__name__)

DEFAULT_BISECT_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class BisectResult:
    """The first bad pass (``None`` when the whole pipeline is within tolerance)."""

    index: int | None
    pass_text: str | None
    drift: dict[str, Any] | None
    probes: int

    @property
    def found(self) -> bool:
        """Whether a culprit was found."""
        return self.index is not None


def bisect_pipeline(
    model: ir.Model,
    pipeline: PipelineLike,
    *,
    runner: Runner,
    compare: Comparator,
    inputs: Mapping[str, np.ndarray],
    tolerance: float = DEFAULT_BISECT_TOLERANCE,
    on_probe: Callable[[int], None] | None = None,
) -> BisectResult:
    """Binary-search the shortest bad prefix of ``pipeline``; ``model`` itself is not changed."""
    passes: Sequence[PassBase] = parse_pipeline(pipeline)
    reference = runner(model, inputs)
    probes = 0

    def drift_at(limit: int) -> dict[str, Any] | None:
        """The drift of the first ``limit`` passes, or None when they are within tolerance."""
        nonlocal probes
        probes += 1
        if on_probe is not None:
            on_probe(limit)
        manager = PassManager(list(passes), instruments=[Bisect(limit)])
        try:
            result = manager.run(model.clone())
            outputs = runner(result.model, inputs)
        except OnnxforgeError as error:
            return {"error": str(error)}
        except Exception as error:  # a prefix that crashes or no longer runs is bad
            return {"error": f"{type(error).__name__}: {error}"}
        comparison = compare(reference, outputs)
        bad = not comparison.finite or not comparison.rel_l2 <= tolerance
        logger.info("bisect: first %d passes give rel-L2 %.3g", limit, comparison.rel_l2)
        return comparison.as_dict() if bad else None

    final = drift_at(len(passes))
    if final is None:
        return BisectResult(None, None, None, probes)
    low, high, high_drift = 0, len(passes), final  # prefix `low` is good, prefix `high` is bad
    while high - low > 1:
        middle = (low + high) // 2
        drift = drift_at(middle)
        if drift is None:
            low = middle
        else:
            high, high_drift = middle, drift
    return BisectResult(high - 1, format_pass(passes[high - 1]), high_drift, probes)
