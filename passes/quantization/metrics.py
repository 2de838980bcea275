"""How much accuracy a quantized model lost against the float model, as one number.

Every metric is a *loss*, 0 for a model that matches the float one, compared with the
``budget`` option:

- ``cosine``: 1 - the worst cosine similarity of any row (first axis) of any output against
  the float model's (a sentence embedding, a logit vector);
- ``top1``: with labels, the float model's top-1 accuracy minus the quantized one's (0.005 is
  half a point); without labels, the fraction of rows whose argmax changed;
- ``rel_l2``: ||quantized - float|| / ||float|| over every output element.

A model whose outputs turn NaN or infinite where the float ones are finite has an infinite
loss. The float model runs once; its outputs (small next to the inputs) are kept for the
trials, and the evaluation inputs are streamed again for each trial.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from onnxforge.errors import InputError, first_line
from onnxforge.passes.quantization.data import LabelledBatch

__all__ = ["METRICS", "MetricTotals", "Evaluator"]

METRICS = ("cosine", "top1", "rel_l2")

_TINY = 1e-30


@dataclasses.dataclass
class MetricTotals:
    """Running sums over the evaluation batches, for one metric."""

    metric: str
    worst_cosine: float = 1.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    rows: int = 0
    agree: int = 0
    ref_hits: int = 0
    got_hits: int = 0
    labelled: bool = False
    finite: bool = True

    def add(
        self, ref: Sequence[np.ndarray], got: Sequence[np.ndarray], labels: np.ndarray | None
    ) -> None:
        """Fold one batch's outputs (float, quantized) into the totals."""
        for r, g in zip(ref, got, strict=True):
            if not np.issubdtype(r.dtype, np.floating):
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            valid = np.isfinite(r64)
            if not np.isfinite(g64[valid]).all():
                self.finite = False
                return
            r64, g64 = np.where(valid, r64, 0.0), np.where(valid, g64, 0.0)
            self.diff_sq += float(np.sum((g64 - r64) ** 2))
            self.ref_sq += float(np.sum(r64**2))
            if r64.ndim:
                rr = r64.reshape(r64.shape[0], -1)
                gr = g64.reshape(g64.shape[0], -1)
                norms = np.linalg.norm(rr, axis=1) * np.linalg.norm(gr, axis=1)
                cos = np.where(norms > 0, np.sum(rr * gr, axis=1) / np.maximum(norms, _TINY), 1.0)
                self.worst_cosine = min(self.worst_cosine, float(cos.min(initial=1.0)))
        first_ref, first_got = np.asarray(ref[0]), np.asarray(got[0])
        if first_ref.ndim >= 2:
            ref_top = first_ref.reshape(-1, first_ref.shape[-1]).argmax(axis=1)
            got_top = first_got.reshape(-1, first_got.shape[-1]).argmax(axis=1)
            self.rows += ref_top.size
            self.agree += int(np.sum(ref_top == got_top))
            if labels is not None and labels.size == ref_top.size:
                self.labelled = True
                flat = labels.reshape(-1)
                self.ref_hits += int(np.sum(ref_top == flat))
                self.got_hits += int(np.sum(got_top == flat))

    def loss(self) -> float:
        """The metric's loss (see the module doc); infinite for non-finite outputs."""
        if not self.finite:
            return float("inf")
        if self.metric == "cosine":
            return 1.0 - self.worst_cosine
        if self.metric == "rel_l2":
            return float(np.sqrt(self.diff_sq) / max(np.sqrt(self.ref_sq), _TINY))
        if not self.rows:
            raise InputError(
                "metric=top1 needs an output shaped (rows, classes)",
                hint="use metric=cosine or metric=rel_l2 for this model",
            )
        if self.labelled:
            return (self.ref_hits - self.got_hits) / self.rows
        return 1.0 - self.agree / self.rows


class Evaluator:
    """The float model's outputs on the evaluation data, and the loss of any candidate."""

    def __init__(
        self,
        run_float: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
        evaluation: Callable[[], Iterable[LabelledBatch]],
        metric: str,
        make_runner: Callable[[pathlib.Path], Callable[[dict[str, np.ndarray]], list]],
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric = metric
        self.evaluation = evaluation
        self.make_runner = make_runner
        self.reference: list[list[np.ndarray]] = []
        for batch, _ in evaluation():
            try:
                self.reference.append(run_float(batch))
            except InputError:
                raise
            except Exception as error:  # ONNX Runtime's message says which input and why
                raise InputError(
                    f"the evaluation data does not fit the model: {first_line(error)}",
                    hint="each batch needs every graph input with the model's dtype and rank",
                ) from error
        if not self.reference:
            raise InputError("the evaluation data holds no batch")
        self.evaluations = 0

    def loss(self, path: pathlib.Path) -> float:
        """The loss of the model saved at ``path`` against the float model."""
        self.evaluations += 1
        run = self.make_runner(path)
        totals = MetricTotals(self.metric)
        for (batch, labels), ref in zip(self.evaluation(), self.reference, strict=True):
            totals.add(ref, run(batch), labels)
            if not totals.finite:
                break
        return totals.loss()
