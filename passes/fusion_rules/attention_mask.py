"""Binary padding masks into Attention's mask index: the raw 0/1 mask instead of its bias.

BERT-style models take a padding mask ``m`` of shape (batch, sequence), 1 for a token and 0 for
padding, and turn it into an additive bias on the attention scores, broadcast over heads ``h``
and queries ``q``:

    bias[b, h, q, k] = (1 - float(m[b, k])) * c          (or Where(bool(m[b, k]), 0, c), ...)

with ``c`` a large negative number. ONNX Runtime's ``com.microsoft.Attention`` takes the raw
mask itself as its ``mask_index`` input (int32, (batch, sequence)) and builds the bias inside
the kernel, which saves materialising and reading a (batch, 1, sequence, sequence) tensor:

    bias'[b, h, q, k] = 0 if m[b, k] > 0 else mask_filter_value

With ``mask_filter_value = c`` the two are equal for every ``m`` in {0, 1} (the original's
``(1 - 1) * c`` is ``-0.0``, which adds like ``+0.0``), so the scores, and the outputs, are bit
for bit the same. For other values of ``m`` they are not (a 2 among the 1s gives ``-c`` in the
original and ``0`` here), so the rule rests on an assumption about the inputs, not on algebra:
an integer graph input whose values reach Attention's additive mask only as described below is
taken to be a 0/1 padding mask, the convention of every BERT-style ``attention_mask`` and what
ONNX Runtime's own transformer optimizer assumes. ``fuse`` applies the rule only with its
``binary_masks`` option (on by default).

:func:`trace_padding_mask` proves the provenance of the additive mask with
:class:`~onnxforge.passes.fusion_rules._elements.ElementAnalysis`, which follows the ops
exporters build masks with: Cast, Unsqueeze/Reshape, ``(1 - m) * c`` and the other element-wise
forms (evaluated at ``m = 0`` and ``m = 1``), Expand, Where, and the index grids of
HuggingFace's vmap-built masks (``padding_mask[b, k]`` gathered at every ``(b, h, q, k)``).
:class:`BinaryMaskIndex` fires on ``Attention(x, W, b, -, -, bias)`` when ``bias`` is
``f(m[b, k])`` on axes 0 and 3 of a (batch, 1 or heads, 1 or sequence, sequence) tensor,
``f(1)`` is zero, ``f(0) = c <=`` :data:`MAX_MASK_FILTER_VALUE` (a padding mask, not a learned
bias), ``m`` is an integer graph input of the dims of ``x``'s batch and sequence, and every
value computed from ``m``'s elements is read only on the way to Attention additive masks
(otherwise the mask has another consumer, and the rule leaves the graph alone). It writes
``Attention(x, W, b, Cast<int32>(m))`` with ``mask_filter_value = c`` (one Cast shared by all
the Attention nodes of a graph); the mask's subgraph is then dead and goes. Only the CPU kernel
has been checked against the additive form, so the rule is for the ``cpu`` target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxforge.passes.fusion_rules._elements import ElementAnalysis, MaskOf, Unproven
from onnxforge.passes.fusion_rules._values import ONNX_DOMAINS, describe, known_dims

__all__ = ["rules", "PaddingMask", "trace_padding_mask", "MAX_MASK_FILTER_VALUE"]

# The additive term must be at most this where the mask is 0: a padding mask pushes padded
# keys' scores far down (exporters use -10000, -1e9 or the dtype's lowest value), while a
# learned or positional bias is small.
MAX_MASK_FILTER_VALUE = -1e3

_MS = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class PaddingMask:
    """What :func:`trace_padding_mask` proves: ``bias[b, h, q, k] = c if m[b, k] == 0 else 0``."""

    source: ir.Value  # the integer graph input m
    filter_value: float  # c
    mask_values: tuple[ir.Value, ...]  # the values computed from m's elements, bias included


def trace_padding_mask(bias: ir.Value) -> PaddingMask:
    """The 0/1 padding mask that ``bias`` (a 4-D additive attention mask) is made from.

    Raises :class:`ValueError` with the reason when the provenance is not the one
    :class:`BinaryMaskIndex` takes (module docstring).
    """
    analysis = ElementAnalysis()
    try:
        found = analysis.evaluate(bias)
    except Unproven as refusal:
        raise ValueError(
            f"the additive mask {describe(bias)} is not a padding mask: {refusal}"
        ) from None
    expr = found.expr
    if not isinstance(expr, MaskOf):
        inputs = [f"{describe(v)} ({v.dtype})" for v in analysis.seen if v.is_graph_input()]
        source = f"from graph input {', '.join(inputs)}" if inputs else "from no graph input"
        raise ValueError(
            f"the additive mask {describe(bias)} is computed {source}; a 0/1 padding mask is a "
            "(batch, sequence) integer input"
        )
    source_dims = analysis.shape(expr.source)
    rank = len(found.dims)
    if (rank, expr.row, expr.col) != (4, 0, 3) or (found.dims[0], found.dims[3]) != source_dims:
        raise ValueError(
            f"the additive mask {describe(bias)} does not read {describe(expr.source)}[b, k] at "
            "(b, h, q, k)"
        )
    at_zero, at_one = float(expr.at_zero), float(expr.at_one)
    if at_one != 0.0 or not at_zero <= MAX_MASK_FILTER_VALUE:
        raise ValueError(
            f"the additive mask {describe(bias)} is {at_zero:g} for a 0 and {at_one:g} for a 1 "
            f"in {describe(expr.source)}; a padding mask is 0 for a 1 and at most "
            f"{MAX_MASK_FILTER_VALUE:g} for a 0"
        )
    mask_values = tuple(
        v for v, a in analysis.seen.items() if isinstance(a.expr, MaskOf) and v is not expr.source
    )
    return PaddingMask(expr.source, at_zero, mask_values)


# ---------------------------------------------------------------------------------------------
# The rule


def _label(node: ir.Node) -> str:
    """``Neg 'node_7'``, or for an unnamed node its op and first output: ``Neg(z)``."""
    if node.name:
        return f"{node.op_type} '{node.name}'"
    output = node.outputs[0].name if node.outputs else None
    return f"{node.op_type}({output})" if output else node.op_type


def _other_reader(values: Sequence[ir.Value]) -> str | None:
    """Why a value computed from the mask's elements is needed for more than attention masks.

    A reader is fine when it is an Attention node taking the value as its additive mask, or when
    everything it computes is, in turn, read only by such readers (the mask's own chain, or a
    broadcast of the mask for another Attention node).
    """
    chain = set(values)
    verdict: dict[ir.Value, str | None] = {}

    def reader(value: ir.Value) -> str | None:
        if value not in verdict:
            verdict[value] = None  # a DAG: a repeat is only ever a shared, settled value
            verdict[value] = _why(value)
        return verdict[value]

    def _why(value: ir.Value) -> str | None:
        if value.is_graph_output():
            return f"{describe(value)} is a graph output"
        for user, index in value.uses():
            if user.op_type == "Attention" and user.domain == _MS and index == 5:
                continue
            for output in user.outputs:
                why = reader(output)
                if why is not None:
                    # inside the chain, the reader that is not a mask's is further down
                    if output in chain:
                        return why
                    return f"{describe(value)} is also read by {_label(user)}"
        return None

    for value in values:
        why = reader(value)
        if why is not None:
            return why
    return None


class BinaryMaskIndex(pattern.RewriteRuleClassBase):
    """``Attention(x, W, b, -, -, c * (1 - m))`` -> ``Attention(x, W, b, int32(m))``, 0/1 ``m``."""

    def pattern(self, op, x, weights, bias, attention_bias):
        return op.Attention(
            x, weights, bias, None, None, attention_bias, _domain=_MS, _outputs=["attended"]
        )

    def check(self, context, x, weights, bias, attention_bias, attended, **_):
        result = pattern.MatchResult()
        node = attended.producer()
        if node.attributes.get_int("unidirectional", 0):
            return result.fail(f"Attention '{node.name}' is unidirectional")
        try:
            found = trace_padding_mask(attention_bias)
        except ValueError as refusal:
            return result.fail(str(refusal))
        source_dims = known_dims(found.source)
        x_dims = known_dims(x)
        if x_dims is None or source_dims is None or tuple(x_dims[:2]) != source_dims:
            return result.fail(
                f"the mask {describe(found.source)} is not known to have the batch and sequence "
                f"dims of the input {describe(x)}"
            )
        other = _other_reader(found.mask_values)
        if other is not None:
            return result.fail(f"the mask has another consumer: {other}")
        self._found, self._root = found, node
        return result

    def _int32_mask(self, op, source: ir.Value) -> ir.Value:
        """``source`` as int32: itself, the Cast an earlier rewrite made, or a new Cast."""
        if source.dtype == ir.DataType.INT32:
            return source
        for node in self._root.graph:
            if node is self._root:
                break
            if (
                node.op_type == "Cast"
                and node.domain in ONNX_DOMAINS
                and node.inputs[0] is source
                and node.attributes.get_int("to", 0) == ir.DataType.INT32
            ):
                return node.outputs[0]
        return op.Cast(source, to=ir.DataType.INT32)

    def rewrite(self, op, x, weights, bias, attention_bias, attended, **_):
        attributes = {
            name: attr
            for name, attr in attended.producer().attributes.items()
            if name != "mask_filter_value"
        }
        return op.Attention(
            x,
            weights,
            bias,
            self._int32_mask(op, self._found.source),
            _domain=_MS,
            mask_filter_value=self._found.filter_value,
            **attributes,
        )


def rules(target: str) -> Sequence[pattern.RewriteRule]:
    """The mask rule, for the CPU kernel (the only one checked against the additive form)."""
    return [BinaryMaskIndex.rule()] if target == "cpu" else []
