"""``prune``: remove weights by magnitude, unstructured, N:M, or whole output channels.

Three granularities, one pass::

    prune{granularity=unstructured,sparsity=0.5,criterion=l1,scope=global}
    prune{granularity=nm,n=2,m=4}
    prune{granularity=channel,sparsity=0.5,layers=conv1,conv2}

- ``unstructured`` zeroes the ``floor(sparsity * size)`` smallest weights of each prunable
  layer (``scope=layer``) or of all of them at once (``scope=global``);
- ``nm`` keeps the ``n`` largest of every ``m`` consecutive weights along the reduction axis
  (``sparsity`` is then ``(m - n) / m`` and the option is not used);
- ``channel`` removes whole output channels of Conv, ConvTranspose, Gemm and MatMul weights,
  ranked by the channel's weight norm, and every consequence with them, so that shapes really
  shrink: BatchNormalization parameters, biases, the next layer's input channels, Flatten and
  Reshape boundaries (blocks of ``H*W`` rows of a Gemm after a flattened Conv; constant target
  shapes rewritten), element-wise ops and pools in between, layers tied by a residual Add or a
  Concat (pruned together, by their summed norms), depthwise convolutions. A group whose
  channels reach something that cannot be rewritten (an unknown op, a Reshape it cannot
  follow, a graph output, whose shape never changes) is left alone, and the report says why.
  See :mod:`onnxforge.passes.pruning.channel_graph` for the rules.

The prunable weights are constant float weights of the main graph: the pass does not reach
into If/Loop/Scan bodies, and a channel read inside one leaves its group alone. ``layers``
names nodes (an unnamed node as ``OpType#index``, its position in the graph) or weights;
empty means every prunable layer. For channel pruning a group is
pruned when ``layers`` names any of its layers (its other layers must follow).

After ``call``, ``pass_.report`` (:class:`~onnxforge.passes.pruning.report.PruneReport`)
holds per-layer rows, groups left alone and why, parameters and MACs before and after, and
for unstructured and N:M the zlib-compressed weight bytes; the pass logs it too. Zeroed
weights shrink the compressed size, not the latency: dense CPU kernels do as much work on
zeros. Channel pruning shrinks the matrices
themselves, which is what makes a model faster. Nothing is retrained: accuracy drops, and
the drop must be measured (``VerifyNumerics`` with a budget, or held-out data).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import onnx_ir as ir

from onnxforge.passes.base import Pass, PassResult, Semantics
from onnxforge.passes.pruning.channel_graph import analyse_channels
from onnxforge.passes.pruning.channel_rewrite import apply_selection, select_channels
from onnxforge.passes.pruning.macs import count_macs
from onnxforge.passes.pruning.report import (
    DENSE_KERNEL_NOTE,
    PruneReport,
    SkippedGroup,
    compressed_size,
)
from onnxforge.passes.pruning.sparsify import (
    apply_masks,
    layer_name,
    nm_mask,
    prunable_weights,
    unstructured_masks,
)
from onnxforge.passes.pruning.static_values import ShapeTable
from onnxforge.passes.registry import register
from onnxforge.passes.statistics import model_stats

__all__ = [
    "PrunePass",
    "GRANULARITIES",
    "CRITERIA",
    "SCOPES",
    "DEFAULT_GRANULARITY",
    "DEFAULT_SPARSITY",
    "DEFAULT_N",
    "DEFAULT_M",
    "DEFAULT_CRITERION",
    "DEFAULT_SCOPE",
    "DEFAULT_LAYERS",
]

logger = logging.getLogger(__name__)

GRANULARITIES = ("unstructured", "nm", "channel")
CRITERIA = ("l1", "l2")
SCOPES = ("global", "layer")

DEFAULT_GRANULARITY = "unstructured"
DEFAULT_SPARSITY = 0.5
# 2:4, the pattern NVIDIA's sparse tensor cores run.
DEFAULT_N = 2
DEFAULT_M = 4
DEFAULT_CRITERION = "l1"
# Per layer: every layer loses the same fraction, which keeps thin layers from vanishing.
DEFAULT_SCOPE = "layer"
DEFAULT_LAYERS: tuple[str, ...] = ()

CHANNEL_NOTE = (
    "channels were removed without retraining: expect an accuracy drop, and measure it on "
    "held-out data"
)


def _check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def _initializer_tensors(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    return {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
    }


def _signature(model: ir.Model) -> tuple[tuple[str | None, str, str], ...]:
    """Names, types and shapes of the graph's inputs and outputs."""
    values = [*model.graph.inputs, *model.graph.outputs]
    return tuple((v.name, str(v.type), str(v.shape)) for v in values)


def _compressed_sizes(
    before: dict[str, ir.TensorProtocol], after: dict[str, ir.TensorProtocol]
) -> tuple[int, int]:
    """zlib-compressed bytes of the initializers before and after; each tensor compressed once."""
    common = compressed_size(t for name, t in after.items() if before.get(name) is t)
    old = compressed_size(t for name, t in before.items() if after.get(name) is not t)
    new = compressed_size(t for name, t in after.items() if before.get(name) is not t)
    return common + old, common + new


@register
class PrunePass(Pass):
    """Zero the smallest weights (unstructured, N:M) or remove whole output channels."""

    name = "prune"
    summary = (
        "Prune weights by magnitude: unstructured, N:M, or whole output channels with every "
        "dependent shape shrunk."
    )
    semantics = Semantics.LOSSY

    def __init__(
        self,
        *,
        granularity: Literal["unstructured", "nm", "channel"] = DEFAULT_GRANULARITY,
        sparsity: float = DEFAULT_SPARSITY,
        n: int = DEFAULT_N,
        m: int = DEFAULT_M,
        criterion: Literal["l1", "l2"] = DEFAULT_CRITERION,
        scope: Literal["global", "layer"] = DEFAULT_SCOPE,
        layers: list[str] = DEFAULT_LAYERS,  # type: ignore[assignment]
    ) -> None:
        _check_choice("granularity", granularity, GRANULARITIES)
        _check_choice("criterion", criterion, CRITERIA)
        _check_choice("scope", scope, SCOPES)
        if isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if isinstance(n, bool) or isinstance(m, bool) or int(n) != n or int(m) != m:
            raise ValueError(f"n and m must be integers, got n={n!r}, m={m!r}")
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < n < m, got n={n}, m={m}")
        if isinstance(layers, str):
            layers = [layers]
        if any(not isinstance(layer, str) or not layer for layer in layers):
            raise ValueError(f"layers must be non-empty names, got {list(layers)!r}")
        self.granularity = granularity
        self.sparsity = float(sparsity)
        self.n = int(n)
        self.m = int(m)
        self.criterion = criterion
        self.scope = scope
        self.layers = list(layers)
        self.report: PruneReport | None = None
        self._signature: tuple = ()

    def requires(self, model: ir.Model) -> None:
        """Nothing beyond a model; notes its graph inputs and outputs for ``ensures``."""
        self._signature = _signature(model)

    def ensures(self, model: ir.Model) -> None:
        """Graph inputs and outputs keep their names, types and shapes."""
        if _signature(model) != self._signature:
            raise AssertionError("prune changed the graph's inputs or outputs")

    def _check_layer_names(self, model: ir.Model) -> None:
        known = set(model.graph.initializers)
        known |= {layer_name(node, index) for index, node in enumerate(model.graph)}
        unknown = [layer for layer in self.layers if layer not in known]
        if unknown:
            raise ValueError(
                f"layers names no node or initializer of the model: {', '.join(unknown)}"
            )

    def call(self, model: ir.Model) -> PassResult:
        """Prune; ``modified`` is true when any weight or shape changed."""
        self._check_layer_names(model)
        report = PruneReport(self.granularity, self.criterion, self.scope, self.sparsity)
        before = model_stats(model)
        tensors_before = _initializer_tensors(model)
        table = ShapeTable(model)
        macs_before = count_macs(model, table)
        if self.granularity == "channel":
            modified = self._prune_channels(model, report, table)
        else:
            modified = self._sparsify(model, report)
        after = model_stats(model) if modified else before
        report.parameters_before, report.parameters_after = before.parameters, after.parameters
        report.parameter_bytes_before = before.parameter_bytes
        report.parameter_bytes_after = after.parameter_bytes
        macs_after = count_macs(model, ShapeTable(model)) if modified else macs_before
        report.macs_before, report.macs_after = macs_before.total, macs_after.total
        report.macs_uncounted = macs_after.uncounted
        if self.granularity != "channel":  # zeros pay off in compressed size, and only there
            sizes = _compressed_sizes(tensors_before, _initializer_tensors(model))
            report.compressed_bytes_before, report.compressed_bytes_after = sizes
        self.report = report
        for line in report.lines():
            logger.info("%s", line)
        return PassResult(model, modified)

    def _sparsify(self, model: ir.Model, report: PruneReport) -> bool:
        weights = prunable_weights(model, self.layers)
        arrays = [w.value.const_value.numpy() for w in weights]  # type: ignore[union-attr]
        report.note = DENSE_KERNEL_NOTE
        if self.granularity == "unstructured":
            masks: list = unstructured_masks(
                arrays, sparsity=self.sparsity, criterion=self.criterion, scope=self.scope
            )
        else:
            masks = []
            for weight, array in zip(weights, arrays, strict=True):
                size = array.shape[weight.reduction_axis]
                if size % self.m:
                    masks.append(None)
                    report.skipped.append(
                        SkippedGroup(
                            (weight.layer,),
                            (f"its reduction axis ({size}) is not a multiple of m={self.m}",),
                        )
                    )
                    continue
                masks.append(
                    nm_mask(
                        array, weight.reduction_axis, n=self.n, m=self.m, criterion=self.criterion
                    )
                )
        report.rows = apply_masks(weights, masks)
        return any(row.zeros_after != row.zeros_before for row in report.rows)

    def _prune_channels(self, model: ir.Model, report: PruneReport, table: ShapeTable) -> bool:
        plan = analyse_channels(model, table)
        selection = select_channels(
            plan,
            sparsity=self.sparsity,
            criterion=self.criterion,
            scope=self.scope,
            layers=self.layers,
        )
        report.groups = selection.groups
        report.skipped = selection.skipped
        report.note = CHANNEL_NOTE
        if not selection.kept:
            return False
        report.rows = apply_selection(model, plan, selection, table)
        return True
