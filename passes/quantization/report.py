"""What ``quantize`` did: settings, data, which nodes stayed float and what each cost."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["FloatNode", "QuantizeReport", "FLOAT_KINDS"]

# Why a node stayed float, as ``FloatNode.rule``.
FLOAT_KINDS = ("kept float", "excluded", "not quantized")


@dataclasses.dataclass(frozen=True)
class FloatNode:
    """A node left in float: ``rule`` says why in a word, ``reason`` in a sentence.

    Shaped like ``fuse``'s near-misses (rule, nodes, reason), so that ``--explain quantize``
    prints it with the same table. ``cost`` is the metric loss the node adds when quantized
    (measured, when the accuracy-aware search ran).
    """

    rule: str
    nodes: tuple[str, ...]
    reason: str
    op_type: str = ""
    cost: float | None = None

    def __str__(self) -> str:
        return f"{self.rule} {', '.join(self.nodes)}: {self.reason}"


@dataclasses.dataclass
class QuantizeReport:
    """The figures of one ``quantize`` run (``pass_.report``)."""

    settings: str = ""
    data: str = ""
    status: str = "quantized"  # quantized | no-op (already quantized, nothing to quantize)
    note: str = ""
    metric: str | None = None
    budget: float | None = None
    loss_all_quantized: float | None = None  # every candidate quantized
    loss: float | None = None  # the model returned
    quantized: dict[str, int] = dataclasses.field(default_factory=dict)  # op type -> nodes
    candidates: int = 0
    float_nodes: list[FloatNode] = dataclasses.field(default_factory=list)
    # node -> loss it adds when quantized (every node the search measured)
    sensitivity: dict[str, float] = dataclasses.field(default_factory=dict)
    smoothed: list[str] = dataclasses.field(default_factory=list)
    unfused: list[str] = dataclasses.field(default_factory=list)
    channels_last: list[str] = dataclasses.field(default_factory=list)
    hand_over: list[str] = dataclasses.field(default_factory=list)  # float Convs, channels-last out
    typed_values: int = 0
    calibration_batches: int = 0
    trials: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The report as log lines."""
        if self.status != "quantized":
            return [f"quantize: {self.status}: {self.note}"]
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.quantized.items())) or "nothing"
        lines = [f"quantize: {self.settings}", f"quantize: quantized {ops}"]
        if self.data:
            lines.append(f"quantize: data: {self.data} ({self.calibration_batches} batches)")
        if self.smoothed:
            lines.append(f"quantize: SmoothQuant on {len(self.smoothed)} activations")
        if self.unfused:
            lines.append(f"quantize: split {len(self.unfused)} fused nodes back into their parts")
        if self.channels_last:
            lines.append(
                f"quantize: {len(self.channels_last)} CNN heads flatten channels-last "
                f"({', '.join(self.channels_last)})"
            )
        if self.hand_over:
            lines.append(
                f"quantize: {len(self.hand_over)} float convolutions hand over channels-last "
                f"({', '.join(self.hand_over)})"
            )
        if self.loss is not None:
            budget = f" (budget {self.budget:g})" if self.budget is not None else ""
            lines.append(
                f"quantize: {self.metric} loss {self.loss:.5f}{budget}; with every node "
                f"quantized {self.loss_all_quantized:.5f}; {self.trials} trials"
            )
        for node in self.float_nodes:
            lines.append(f"quantize: {node}")
        if self.note:
            lines.append(f"quantize: {self.note}")
        return lines
