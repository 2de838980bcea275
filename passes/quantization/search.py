"""Accuracy-aware quantization: keep the most sensitive nodes float until the budget holds.

1. Quantize every candidate; if the loss is within the budget, that is the answer.
2. Otherwise measure each quantized node's sensitivity, one trial per node:
   ``exclude-one`` quantizes everything but the node (its cost: how much the loss falls when
   it alone stays float, in the company it will really keep); ``only-one`` quantizes the node
   alone (its cost: the loss it causes by itself).
3. Rank by cost and keep the top 1, 2, ... nodes float (at most ``max_float``) until the loss
   is within the budget. Nodes whose cost is not positive are never kept: keeping them float
   buys no accuracy.

A trial is one run of ONNX Runtime's quantizer (calibration is done once, before) and one
evaluation. The search raises :class:`BudgetNotMet` when no allowed set meets the budget,
with the best loss it reached.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from typing import Literal

from onnxforge.errors import EXIT_VERIFICATION_FAILED, OnnxforgeError
from onnxforge.passes.quantization.engine import Engine, quantized_node_names
from onnxforge.passes.quantization.metrics import Evaluator

__all__ = ["SearchResult", "BudgetNotMet", "search", "SENSITIVITY_METHODS"]

logger = logging.getLogger(__name__)

SENSITIVITY_METHODS = ("exclude-one", "only-one")


class BudgetNotMet(OnnxforgeError):
    """No allowed set of float nodes brings the loss within the budget."""

    exit_code = EXIT_VERIFICATION_FAILED


@dataclasses.dataclass
class SearchResult:
    """The chosen model and how it was found."""

    path: object  # pathlib.Path of the chosen quantized model
    quantized: set[str]  # candidate nodes quantized with nothing kept float
    loss_all_quantized: float | None
    loss: float | None
    kept: list[str] = dataclasses.field(default_factory=list)  # in ranking order
    costs: dict[str, float] = dataclasses.field(default_factory=dict)
    steps: dict[str, float] = dataclasses.field(default_factory=dict)  # loss after keeping it
    trials: int = 0


def search(
    engine: Engine,
    evaluator: Evaluator | None,
    candidates: Sequence[str],
    *,
    exclude: Collection[str],
    budget: float | None,
    method: Literal["exclude-one", "only-one"],
    max_float: int,
) -> SearchResult:
    """Quantize, then (with a budget) keep sensitive nodes float until the budget holds."""
    full = engine.quantize(exclude=exclude)
    quantized = quantized_node_names(engine.load(full), candidates)
    result = SearchResult(full, quantized, None, None, trials=1)
    if evaluator is None:
        return result
    result.loss_all_quantized = result.loss = evaluator.loss(full)
    logger.info("quantize: %s loss with everything quantized: %.5f", evaluator.metric, result.loss)
    if budget is None or result.loss <= budget:
        return result
    order = [name for name in candidates if name in quantized]
    for index, name in enumerate(order, 1):
        if method == "exclude-one":
            path = engine.quantize(exclude={*exclude, name})
            result.costs[name] = result.loss_all_quantized - evaluator.loss(path)
        else:
            path = engine.quantize(exclude=exclude, only={name})
            result.costs[name] = evaluator.loss(path)
        engine.discard(path)
        result.trials += 1
        cost = result.costs[name]
        logger.info("quantize: sensitivity %d/%d: %s costs %.5f", index, len(order), name, cost)
    ranking = sorted((n for n in order if result.costs[n] > 0), key=lambda n: -result.costs[n])
    best_loss, best_kept = result.loss, []
    for count in range(1, min(max_float, len(ranking)) + 1):
        kept = ranking[:count]
        path = engine.quantize(exclude={*exclude, *kept})
        loss = evaluator.loss(path)
        result.trials += 1
        result.steps[kept[-1]] = loss
        logger.info("quantize: %d node(s) kept float: loss %.5f", count, loss)
        if loss < best_loss:
            best_loss, best_kept = loss, kept
        if loss <= budget:
            engine.discard(full)
            result.path, result.loss, result.kept = path, loss, kept
            return result
        engine.discard(path)
    raise BudgetNotMet(
        f"quantize: {evaluator.metric} loss {best_loss:.5f} with {len(best_kept)} node(s) kept "
        f"float is over the budget {budget:g} (everything quantized: "
        f"{result.loss_all_quantized:.5f}; {len(ranking)} node(s) had a positive cost, "
        f"max_float={max_float})",
        hint="raise budget or max_float, try smooth=0.5..0.8, per_channel=true or "
        "calibration=entropy, or exclude the op types that hurt most",
    )
