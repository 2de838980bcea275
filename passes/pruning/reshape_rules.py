"""How a Reshape moves channels: its target's sizes, and where the channel axis lands.

Dims are compared as products (:data:`Size`: a static factor and the symbolic names it
multiplies), so that ``[N, C, H, W] -> [N, C*H*W]`` is recognised with a symbolic batch ``N``,
and a target's ``-1`` can be solved for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxforge.passes.pruning.channel_plan import Layout
from onnxforge.passes.pruning.static_values import Dim, dims_product

__all__ = [
    "Size",
    "ShapeEntry",
    "dim_size",
    "multiply",
    "static_product",
    "target_sizes",
    "match_reshape",
]

# A dim as a product: (static factor, sorted symbolic names); None when unknown.
Size = tuple[int, tuple[str, ...]] | None

# One entry of a Reshape target: its value (None: computed at run time), where its constant
# comes from (reader node, input index, the piece, position in it), the dim it copies.
ShapeEntry = tuple[int | None, tuple[ir.Node, int, np.ndarray, int] | None, Size]


def dim_size(dim: Dim) -> Size:
    """One dim as a Size."""
    return dims_product([dim])


def multiply(sizes: Sequence[Size]) -> Size:
    """The product of sizes; None if any is unknown."""
    factor, names = 1, []
    for size in sizes:
        if size is None:
            return None
        factor *= size[0]
        names.extend(size[1])
    return factor, tuple(sorted(names))


def static_product(sizes: Sequence[Size]) -> int | None:
    """The product of sizes when it is a plain number, else None."""
    product = multiply(sizes)
    return product[0] if product is not None and not product[1] else None


def target_sizes(
    entries: Sequence[int | None],
    read: Sequence[Size],
    in_sizes: Sequence[Size],
    out_dims: Sequence[Dim] | None,
    allowzero: int,
) -> list[Size]:
    """A Reshape's output dims from its target entries: ``0`` copies, ``-1`` is inferred."""
    sizes: list[Size] = []
    for i, entry in enumerate(entries):
        if entry is None:  # run time: the dim it reads, else what shape inference says
            known = out_dims is not None and len(out_dims) == len(entries)
            if read[i] is not None:
                sizes.append(read[i])
            else:
                sizes.append(dim_size(out_dims[i]) if known else None)  # type: ignore[index]
        elif entry == 0 and not allowzero:
            sizes.append(in_sizes[i] if i < len(in_sizes) else None)
        elif entry == -1:
            sizes.append(None)
        else:
            sizes.append((entry, ()))
    inferred = [i for i, entry in enumerate(entries) if entry == -1]
    if len(inferred) == 1:
        total = multiply(in_sizes)
        others = multiply([s for i, s in enumerate(sizes) if i != inferred[0]])
        if total is not None and others is not None and others[0]:
            names = list(total[1])
            for name in others[1]:
                if name not in names:
                    return sizes
                names.remove(name)
            if total[0] % others[0] == 0:
                sizes[inferred[0]] = (total[0] // others[0], tuple(names))
    return sizes


def match_reshape(
    in_sizes: Sequence[Size], out_sizes: Sequence[Size], layout: Layout
) -> tuple[int, int] | None:
    """Where a Reshape puts the channel axis, and its new block; None if channels get mixed.

    The input's dims before the channel axis must give the output's dims before axis ``k``;
    the channel dim and some static dims after it (``P`` elements per channel) must give
    output dims ``k .. k+m`` (``Q`` elements per step of axis ``k``). Channel ``c`` then
    covers entries ``c * block*P/Q ...`` of axis ``k``: the new block is ``block*P/Q``.
    """
    c = layout.axis
    prefix = multiply(in_sizes[:c])
    if prefix is None:
        return None
    for k in range(len(out_sizes)):
        if multiply(out_sizes[:k]) != prefix:
            continue
        for m in range(1, len(out_sizes) - k + 1):
            right = static_product(out_sizes[k : k + m])
            if right is None:
                break
            for j in range(c + 1, len(in_sizes) + 1):
                inner = static_product(in_sizes[c + 1 : j])
                if inner is None:
                    break
                if layout.extent * inner != right:
                    continue
                if multiply(in_sizes[j:]) != multiply(out_sizes[k + m :]):
                    continue
                steps = static_product(out_sizes[k + 1 : k + m])
                assert steps is not None
                if (layout.block * inner) % steps:
                    continue
                block = layout.block * inner // steps
                if static_product(out_sizes[k : k + 1]) == layout.channels * block:
                    return k, block
    return None
