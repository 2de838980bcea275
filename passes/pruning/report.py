"""What a pruning run did: per-layer rows, the groups left alone and why, model-level figures.

The pass leaves one :class:`PruneReport` on its instance after each ``call`` and logs its
:meth:`PruneReport.lines`. Figures are measured on the model, never estimated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import zlib
from collections.abc import Iterable

import onnx_ir as ir

__all__ = [
    "LayerRow",
    "GroupRow",
    "SkippedGroup",
    "PruneReport",
    "compressed_size",
    "DENSE_KERNEL_NOTE",
    "COMPRESSION_LEVEL",
    "COMPRESSION_THREADS",
]

# zlib level for the compressed-size figure: fast, and the ratio between before and after
# (what the figure is for) barely moves with the level.
COMPRESSION_LEVEL = 1
COMPRESSION_THREADS = min(8, os.cpu_count() or 1)

DENSE_KERNEL_NOTE = (
    "zeroed weights make the model compress better, but dense CPU kernels (ONNX Runtime's Conv, "
    "Gemm, MatMul) do the same work on zeros: expect no speed-up from unstructured or N:M "
    "sparsity without a sparse kernel"
)


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One weight the run changed: its layer (node), shapes and zero counts before and after."""

    layer: str
    op_type: str
    weight: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    zeros_before: int
    zeros_after: int
    group: int | None = None  # channel pruning: the group the layer's output channels are in

    @property
    def parameters_before(self) -> int:
        """Elements of the weight before."""
        return math.prod(self.shape_before)

    @property
    def parameters_after(self) -> int:
        """Elements of the weight after."""
        return math.prod(self.shape_after)

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's elements that are zero after the run."""
        return self.zeros_after / self.parameters_after if self.parameters_after else 0.0


@dataclasses.dataclass(frozen=True)
class GroupRow:
    """A group of output channels pruned together (one layer, or layers tied by Add/Concat)."""

    group: int
    layers: tuple[str, ...]
    channels_before: int
    channels_after: int


@dataclasses.dataclass(frozen=True)
class SkippedGroup:
    """Layers left alone, and why (channel pruning: a dependency that cannot be rewritten)."""

    layers: tuple[str, ...]
    reasons: tuple[str, ...]


@dataclasses.dataclass
class PruneReport:
    """Per-layer rows and model-level figures of one pruning run."""

    granularity: str
    criterion: str
    scope: str
    sparsity: float
    rows: list[LayerRow] = dataclasses.field(default_factory=list)
    groups: list[GroupRow] = dataclasses.field(default_factory=list)
    skipped: list[SkippedGroup] = dataclasses.field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    parameter_bytes_before: int = 0
    parameter_bytes_after: int = 0
    # unstructured and N:M only: zeros shrink the compressed size, not the tensors
    compressed_bytes_before: int | None = None
    compressed_bytes_after: int | None = None
    macs_before: int = 0
    macs_after: int = 0
    macs_uncounted: tuple[str, ...] = ()
    note: str = ""

    @property
    def weight_sparsity(self) -> float:
        """Fraction of zeros over the weights listed in ``rows``, after the run."""
        total = sum(row.parameters_after for row in self.rows)
        return sum(row.zeros_after for row in self.rows) / total if total else 0.0

    def lines(self) -> list[str]:
        """The report as text lines (what the pass logs)."""
        out = [
            f"prune {self.granularity} ({self.criterion}, {self.scope}, sparsity "
            f"{self.sparsity:g}): parameters {self.parameters_before:,} -> "
            f"{self.parameters_after:,} ({self.parameter_bytes_before:,} -> "
            f"{self.parameter_bytes_after:,} bytes), MACs {self.macs_before:,} -> "
            f"{self.macs_after:,}"
        ]
        if self.compressed_bytes_before is not None and self.compressed_bytes_after is not None:
            out[0] += (
                f", zlib-compressed weights {self.compressed_bytes_before:,} -> "
                f"{self.compressed_bytes_after:,} bytes"
            )
        for row in self.rows:
            out.append(
                f"  {row.layer} ({row.op_type}) {row.weight}: "
                f"{'x'.join(map(str, row.shape_before))} -> {'x'.join(map(str, row.shape_after))}"
                f", zeros {row.sparsity:.1%}"
            )
        for group in self.groups:
            out.append(
                f"  group {group.group}: {group.channels_before} -> {group.channels_after} "
                f"channels ({', '.join(group.layers)})"
            )
        for skipped in self.skipped:
            out.append(f"  left alone: {', '.join(skipped.layers)}: {'; '.join(skipped.reasons)}")
        if self.macs_uncounted:
            out.append(f"  MACs not counted (unknown shapes): {', '.join(self.macs_uncounted)}")
        if self.note:
            out.append(f"  note: {self.note}")
        return out


def _compressed_bytes(tensor: ir.TensorProtocol) -> int:
    return len(zlib.compress(tensor.tobytes(), COMPRESSION_LEVEL))


def compressed_size(tensors: Iterable[ir.TensorProtocol]) -> int:
    """Bytes of the tensors after zlib compression, each compressed on its own.

    zlib releases the GIL, so the tensors are compressed on a few threads at once.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=COMPRESSION_THREADS) as pool:
        return sum(pool.map(_compressed_bytes, tensors))
