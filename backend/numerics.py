"""Compare two sets of model outputs: max-abs, relative L2, worst-row cosine, top-1 agreement."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["OutputComparison", "compare_outputs"]

_TINY = 1e-30


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    """How far ``got`` is from ``ref``, over all outputs together.

    ``rel_l2`` is ||got - ref|| / ||ref|| over every element; ``cosine`` is the worst cosine
    similarity of any row (first axis) of any output; ``top1`` is the fraction of rows whose
    argmax agrees, over outputs shaped (batch, classes), or None when no output has that shape.
    ``finite`` is false when ``got`` has a NaN or infinity where ``ref`` has a finite value.
    """

    max_abs: float
    rel_l2: float
    cosine: float
    top1: float | None
    finite: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return dataclasses.asdict(self)


def _rows(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64, copy=False)
    return array.reshape(array.shape[0], -1) if array.ndim >= 2 else array.reshape(1, -1)


def compare_outputs(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> OutputComparison:
    """Compare output lists of the same length and shapes; a mismatch raises ValueError."""
    if len(ref) != len(got):
        raise ValueError(f"{len(got)} outputs where {len(ref)} were expected")
    max_abs, diff_sq, ref_sq, cosine, finite = 0.0, 0.0, 0.0, 1.0, True
    top1_hits = top1_rows = 0
    for index, (r, g) in enumerate(zip(ref, got, strict=True)):
        r, g = np.asarray(r), np.asarray(g)
        if r.shape != g.shape:
            raise ValueError(f"output {index} has shape {g.shape} where {r.shape} was expected")
        if not (np.issubdtype(r.dtype, np.number) or r.dtype == np.bool_):
            if not np.array_equal(r, g):
                max_abs, diff_sq, cosine = float("inf"), float("inf"), 0.0
            continue
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        valid = np.isfinite(r64)
        finite = finite and bool(np.isfinite(g64[valid]).all())
        if r.size == 0:
            continue
        diff = np.where(valid, g64 - r64, 0.0)
        max_abs = max(max_abs, float(np.where(np.isnan(diff), np.inf, np.abs(diff)).max()))
        diff_sq += float(np.sum(diff * diff))
        ref_sq += float(np.sum(np.where(valid, r64, 0.0) ** 2))
        rr, gr = _rows(np.where(valid, r64, 0.0)), _rows(np.where(valid, g64, 0.0))
        norms = np.linalg.norm(rr, axis=1) * np.linalg.norm(gr, axis=1)
        both_zero = (np.linalg.norm(rr, axis=1) == 0) & (np.linalg.norm(gr, axis=1) == 0)
        row_cos = np.where(both_zero, 1.0, np.sum(rr * gr, axis=1) / np.maximum(norms, _TINY))
        worst_row = float(np.min(row_cos))  # NaN when a row became NaN or infinite
        if np.isnan(worst_row) or worst_row < cosine:
            cosine = worst_row
        if r.ndim == 2 and r.shape[1] > 1:
            top1_hits += int(np.sum(np.argmax(r, axis=1) == np.argmax(g, axis=1)))
            top1_rows += r.shape[0]
    rel_l2 = float(np.sqrt(diff_sq) / max(np.sqrt(ref_sq), _TINY)) if diff_sq else 0.0
    return OutputComparison(
        max_abs=max_abs,
        rel_l2=rel_l2,
        cosine=cosine,
        top1=top1_hits / top1_rows if top1_rows else None,
        finite=finite,
    )
