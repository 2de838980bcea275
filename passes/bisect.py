"""Find the first pass whose inclusion makes the final outputs drift past a tolerance.

Like LLVM's ``-opt-bisect-limit``: run the pipeline with only its first *k* passes (the
:class:`~onnxforge.passes.instruments.Bisect` instrument skips the rest) and binary-search the
smallest *k* whose outputs are bad. This finds a culprit even when every single pass stays
within its own tolerance and only their sum breaks the model.

When the culprit is a rule set that can count its rewrites (a pass with a
``with_rewrite_limit(limit)`` method and an ``applied_rewrites`` list, as ``fuse`` has), the
search goes on inside it, as LLVM's debug counters do: the passes before the culprit, then the
culprit limited to its first *m* rewrites, binary-searched for the smallest bad *m*.
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

__all__ = ["BisectResult", "RewriteCulprit", "bisect_pipeline", "DEFAULT_BISECT_TOLERANCE"]

logger = logging.getLogger(__name__)

DEFAULT_BISECT_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class RewriteCulprit:
    """The first bad rewrite inside the culprit pass: its number among the pass's rewrites."""

    index: int  # 0-based, in the order the pass applies its rewrites
    count: int  # how many rewrites the pass applies in all
    stage: str
    rule: str
    nodes: tuple[str, ...]
    drift: dict[str, Any]
    probes: int

    def __str__(self) -> str:
        return (
            f"rewrite #{self.index + 1} of {self.count}: {self.rule} ({self.stage}) on "
            f"{', '.join(self.nodes)}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BisectResult:
    """The first bad pass (``None`` when the whole pipeline is within tolerance).

    ``drift`` is the drift of the shortest bad prefix; ``final`` that of the whole pipeline
    (also when it is within tolerance); ``rewrite`` names the first bad rewrite inside the
    culprit, when the pass can count its rewrites.
    """

    index: int | None
    pass_text: str | None
    drift: dict[str, Any] | None
    probes: int
    rewrite: RewriteCulprit | None = None
    final: dict[str, Any] | None = None

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
    rewrites: bool = True,
) -> BisectResult:
    """Binary-search the shortest bad prefix of ``pipeline``; ``model`` itself is not changed.

    With ``rewrites`` (the default), a culprit that can count its rewrites is searched further
    for its first bad rewrite (``BisectResult.rewrite``).
    """
    passes: Sequence[PassBase] = parse_pipeline(pipeline)
    reference = runner(model, inputs)
    probes = 0

    last: dict[str, Any] = {}

    def judge(make: Callable[[], ir.Model], what: str) -> dict[str, Any] | None:
        """The drift of the model ``make`` returns, or None when it is within tolerance."""
        try:
            outputs = runner(make(), inputs)
        except OnnxforgeError as error:
            return {"error": str(error)}
        except Exception as error:  # a prefix that crashes or no longer runs is bad
            return {"error": f"{type(error).__name__}: {error}"}
        comparison = compare(reference, outputs)
        bad = not comparison.finite or not comparison.rel_l2 <= tolerance
        logger.info("bisect: %s gives rel-L2 %.3g", what, comparison.rel_l2)
        last["drift"] = comparison.as_dict()
        return comparison.as_dict() if bad else None

    def drift_at(limit: int) -> dict[str, Any] | None:
        """The drift of the first ``limit`` passes, or None when they are within tolerance."""
        nonlocal probes
        probes += 1
        if on_probe is not None:
            on_probe(limit)
        manager = PassManager(list(passes), instruments=[Bisect(limit)])
        return judge(lambda: manager.run(model.clone()).model, f"the first {limit} passes")

    final = drift_at(len(passes))
    if final is None:
        return BisectResult(None, None, None, probes, final=last.get("drift"))
    low, high, high_drift = 0, len(passes), final  # prefix `low` is good, prefix `high` is bad
    while high - low > 1:
        middle = (low + high) // 2
        drift = drift_at(middle)
        if drift is None:
            low = middle
        else:
            high, high_drift = middle, drift
    culprit = high - 1
    rewrite = None
    if rewrites and hasattr(passes[culprit], "with_rewrite_limit"):
        rewrite = _bisect_rewrites(model, passes, culprit, judge)
    return BisectResult(
        culprit, format_pass(passes[culprit]), high_drift, probes, rewrite, final=final
    )


def _bisect_rewrites(
    model: ir.Model,
    passes: Sequence[PassBase],
    culprit: int,
    judge: Callable[[Callable[[], ir.Model], str], dict[str, Any] | None],
) -> RewriteCulprit | None:
    """The smallest number of the culprit's rewrites that, after the passes before it, is bad.

    The passes before the culprit are good together (the pass-level search showed it), so zero
    rewrites are good; all of them are bad. None when the pass applied no rewrite at all, or
    when applying all of them is no longer bad (a pass that is not deterministic).
    """
    before = PassManager(list(passes[:culprit])).run(model.clone()).model if culprit else model
    pass_ = passes[culprit]

    def limited_run(limit: int) -> ir.Model:
        return pass_.with_rewrite_limit(limit)(before.clone()).model  # type: ignore[attr-defined]

    full = pass_.with_rewrite_limit(None)  # type: ignore[attr-defined]
    full_model = full(before.clone()).model
    applied = list(full.applied_rewrites)
    probes = 1
    high_drift = judge(lambda: full_model, f"all {len(applied)} rewrites")
    if not applied or high_drift is None:
        return None
    low, high = 0, len(applied)  # `low` rewrites are good, `high` rewrites are bad
    while high - low > 1:
        middle = (low + high) // 2
        probes += 1
        drift = judge(lambda m=middle: limited_run(m), f"the first {middle} rewrites")
        if drift is None:
            low = middle
        else:
            high, high_drift = middle, drift
    first_bad = applied[high - 1]
    return RewriteCulprit(
        high - 1,
        len(applied),
        first_bad.stage,
        first_bad.rule,
        tuple(first_bad.nodes),
        high_drift,
        probes,
    )
