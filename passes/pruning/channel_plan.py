"""What the channel walk finds: layouts of channels, sources, edits, and groups of spaces.

A *space* is the set of output channels of one prunable layer; spaces that must keep the same
channels (tied by a residual Add, say) are merged into one *group* in a union-find. A
:class:`Layout` says where a value's channels lie; the edits say what the rewrite must slice
once the kept channels of each group are chosen.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

__all__ = [
    "Segment",
    "Layout",
    "Source",
    "SliceEdit",
    "ShapeEntryEdit",
    "GroupEdit",
    "ChannelPlan",
]


@dataclasses.dataclass(frozen=True)
class Segment:
    """``size`` channels of one space (``None``: channels that are never pruned)."""

    space: int | None
    size: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a value's prunable channels lie: axis, spaces end to end, elements per channel."""

    axis: int
    segments: tuple[Segment, ...]
    block: int = 1

    @property
    def channels(self) -> int:
        """Channels along the axis."""
        return sum(segment.size for segment in self.segments)

    @property
    def extent(self) -> int:
        """Elements along the axis: channels times block."""
        return self.channels * self.block

    def at(self, axis: int) -> Layout:
        """The same channels on another axis (a transposed or broadcast operand)."""
        return dataclasses.replace(self, axis=axis)

    def spaces(self) -> list[int]:
        """The spaces of the segments that may be pruned."""
        return [segment.space for segment in self.segments if segment.space is not None]


@dataclasses.dataclass(frozen=True)
class Source:
    """A layer whose output channels form a space: its weight, and the weight's output axis."""

    node: ir.Node
    layer: str
    weight: ir.Value
    axis: int
    space: int


@dataclasses.dataclass(frozen=True)
class SliceEdit:
    """Keep only the layout's kept elements of input ``index`` of ``node`` along ``axis``."""

    node: ir.Node
    index: int
    axis: int
    layout: Layout


@dataclasses.dataclass(frozen=True)
class ShapeEntryEdit:
    """Entry ``position`` of the constant shape piece in input ``index`` of ``node``.

    It becomes the layout's kept extent (a Reshape's target size on the channel axis).
    """

    node: ir.Node
    index: int
    piece: np.ndarray
    position: int
    layout: Layout


@dataclasses.dataclass(frozen=True)
class GroupEdit:
    """A depthwise Conv's ``group``: it becomes the kept extent of its input layout."""

    node: ir.Node
    layout: Layout


@dataclasses.dataclass
class ChannelPlan:
    """The walk's findings: sources, edits, layouts, the union-find of spaces and the reasons."""

    sources: list[Source] = dataclasses.field(default_factory=list)
    slices: list[SliceEdit] = dataclasses.field(default_factory=list)
    shape_entries: list[ShapeEntryEdit] = dataclasses.field(default_factory=list)
    group_edits: list[GroupEdit] = dataclasses.field(default_factory=list)
    layouts: dict[ir.Value, Layout] = dataclasses.field(default_factory=dict)
    parent: list[int] = dataclasses.field(default_factory=list)
    sizes: list[int] = dataclasses.field(default_factory=list)
    reasons: dict[int, list[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def new_space(self, size: int) -> int:
        """A fresh space of ``size`` channels."""
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        """The group (root space) of a space."""
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        """Tie two spaces of equal size into one group."""
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)

    def groups(self) -> dict[int, list[Source]]:
        """The sources of each group, by root space, in graph order."""
        groups: dict[int, list[Source]] = {}
        for source in self.sources:
            groups.setdefault(self.find(source.space), []).append(source)
        return groups

    def group_reasons(self) -> dict[int, list[str]]:
        """Why each unresolvable group must be left alone (reasons in order, no repeats)."""
        merged: dict[int, list[str]] = {}
        for space, reasons in self.reasons.items():
            bucket = merged.setdefault(self.find(space), [])
            bucket.extend(r for r in reasons if r not in bucket)
        return merged
