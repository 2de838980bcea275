"""``fuse``: rewrite chains of ops into the fused ops that ONNX Runtime has kernels for.

Two rule sets, chosen with ``rules`` (both by default), for an execution-provider ``target``:

- ``cnn``: Pad into Conv, MatMul + Add into Gemm (2-D), BatchNormalization into the Conv,
  ConvTranspose or Gemm before it, an Add of a per-channel constant into the Conv's bias, and
  Conv/Gemm + activation into ``com.microsoft`` FusedConv/FusedGemm where the target has that
  kernel (CPU: both; CUDA: FusedConv with Relu);
- ``transformer``: decomposed layer norm into LayerNormalization, erf- and tanh-form GELU into
  ``com.microsoft`` Gelu/FastGelu, residual Add + LayerNormalization into
  SkipLayerNormalization, scaled dot-product attention into MultiHeadAttention and Attention,
  and bias + GELU into BiasGelu (onnxscript's ``ort_fusions``, with guards); and, with
  ``binary_masks`` (on by default, CPU target), an additive padding mask ``(1 - m) * c`` fed to
  Attention as the raw 0/1 mask ``m`` (its ``mask_index``). With ``skip_layer_norm=sum``
  (the CPU target's default) each fused SkipLayerNormalization is then written as
  ``Sum`` + ``LayerNormalization``, the same formula, which ONNX Runtime's CPU runs faster
  (``fusion_rules.normalization.lower_skip_layer_norm`` has the figures).

Each family's module in ``onnxforge.passes.fusion_rules`` states its math. Every rewrite
computes the same formula with a different rounding or summation order, so the pass is
``reassociating``. No rule changes the formula: exact GELU is never replaced by the tanh
approximation (a tanh-form GELU already in the model becomes FastGelu, which computes that
same tanh formula). One rule rests on an assumption about the inputs instead, and only runs
with ``binary_masks``: an integer graph input that reaches Attention's additive mask only
through Cast, Unsqueeze/Reshape, ``(1 - m) * c`` (or Sub/Mul/Where variants, and the index
grids of HuggingFace's vmap-built masks) is taken to be a 0/1 padding mask and fed to Attention
as its mask index, with ``mask_filter_value = c``; on 0/1 masks the outputs are bit for bit
the same, on other values they differ (``fusion_rules.attention_mask`` states the math and
the provenance it proves). A rule never fires when an intermediate value of its pattern has
another consumer or is a graph output (onnxscript's matcher refuses such matches). Rules reach into
If/Loop/Scan bodies (onnxscript's rewriter walks them), not into model-local functions for
the folds that need new initializers.

The patterns match canonical graphs, so the pass first canonicalises a copy of the model:
Identity nodes out, constant sub-expressions folded (onnxscript's folder, with its size
limits), dead nodes out, shapes inferred. ``fuse`` is a functional pass: when no fusion fires
it returns an unchanged copy with ``modified=False`` (canonicalising alone, or moving a Shape
node to make room for a fusion that then did not happen, is not kept); when one does, it returns
the canonicalised, fused copy. :func:`explain` reports near-misses: structural matches that a
check refused, with the check's reason.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common
from onnxscript.rewriter import _pattern_ir, pattern  # _pattern_ir: StringConstantPattern
from onnxscript.rewriter._basics import MatchingTracer, MatchResult, MatchStatus

from onnxforge.passes.base import FunctionalPass, PassResult, Semantics
from onnxforge.passes.cleanup import eliminate_identities
from onnxforge.passes.fold_constants import FoldConstantsPass
from onnxforge.passes.fusion_rules import (
    activation,
    attention,
    attention_mask,
    batchnorm,
    conv_bias,
    gelu,
    gemm,
    normalization,
    pad_conv,
)
from onnxforge.passes.fusion_rules._values import (
    ONNX_DOMAINS,
    constant_array,
    new_initializer,
)
from onnxforge.passes.registry import register

__all__ = [
    "FusePass",
    "NearMiss",
    "Rewrite",
    "explain",
    "canonicalize",
    "pack_constant_concats",
    "RULE_SETS",
    "TARGETS",
    "DEFAULT_RULES",
    "DEFAULT_TARGET",
    "DEFAULT_BINARY_MASKS",
]

logger = logging.getLogger(__name__)

RULE_SETS = ("cnn", "transformer")
TARGETS = ("cpu", "cuda")
DEFAULT_RULES: tuple[str, ...] = RULE_SETS
DEFAULT_TARGET = "cpu"
# Integer masks that reach Attention's additive mask as (1 - m) * c are 0/1 padding masks:
# the convention of BERT-style attention_mask inputs, and ONNX Runtime's optimizer's assumption.
DEFAULT_BINARY_MASKS = True
SKIP_LAYER_NORM_FORMS = ("auto", "kernel", "sum")
# A Concat of constants that other nodes read too is packed (copied) up to this size.
SHARED_PACK_LIMIT_BYTES = 1 << 20

# What onnxscript's matcher says when a full structural match is refused because an
# intermediate value has another consumer or is a graph output.
_OTHER_USES_REASON = "Matched nodes have other uses preventing replacement."


@dataclasses.dataclass(frozen=True)
class _Stage:
    """Rules applied together, to the whole graph, before the next stage's."""

    name: str
    make_rules: Callable[[], Sequence[pattern.RewriteRule]]
    infer_shapes_after: bool = False  # the rewrite adds nodes that later stages read shapes of
    fuses: bool = True  # False for stages that only make room for a fusion
    # False for a stage that completes earlier rewrites (sdpa-leftovers): a rewrite limit
    # (FusePass.with_rewrite_limit) must never strand a temporary node, so it always runs
    counted: bool = True
    # an op type without which none of the stage's rules can match: the rules are built (which
    # can cost more than applying them) only for a graph that has one
    needs: str | None = None

    @functools.cached_property
    def rules(self) -> Sequence[pattern.RewriteRule]:
        """The stage's rules, each guarded by its root op type (built once per stage)."""
        return tuple(_guarded(rule) for rule in self.make_rules())

    def applies_to(self, model: ir.Model) -> bool:
        """False when the model lacks the op type every rule of the stage needs."""
        return self.needs is None or self.needs in _op_types(model)


@functools.cache
def _stages(rule_sets: tuple[str, ...], target: str, binary_masks: bool) -> tuple[_Stage, ...]:
    """The stages in order: each family's rules see the graph its predecessors left.

    Built once per (rule sets, target, binary_masks): the rules keep no state between matches,
    and building them costs more than applying them to a small graph.
    """
    stages: list[_Stage] = []
    if "cnn" in rule_sets:
        stages += [
            _Stage("pad-conv", functools.partial(pad_conv.rules, target)),
            # before the BatchNormalization fold, which also folds into Gemm
            _Stage("matmul-add-gemm", functools.partial(gemm.rules, target)),
            _Stage("batchnorm", functools.partial(batchnorm.rules, target)),
            _Stage("conv-bias", functools.partial(conv_bias.rules, target)),
            # last: the fused ops are opaque to the folds above
            _Stage("activation", functools.partial(activation.rules, target)),
        ]
    if "transformer" in rule_sets:
        stages += [
            _Stage("layer-norm", functools.partial(normalization.layer_norm_rules, target)),
            _Stage(
                "layer-norm-bias", functools.partial(normalization.layer_norm_bias_rules, target)
            ),
            _Stage("gelu", functools.partial(gelu.gelu_rules, target, "erf"), needs="Erf"),
            _Stage("fast-gelu", functools.partial(gelu.gelu_rules, target, "tanh"), needs="Tanh"),
            _Stage(
                "skip-layer-norm", functools.partial(normalization.skip_layer_norm_rules, target)
            ),
        ]
        for name, rules in attention.attention_stages(target):
            stages.append(
                _Stage(
                    name,
                    functools.partial(tuple, rules),
                    # SDPA's rewrite adds nodes whose shapes the MHA checks read
                    infer_shapes_after=name == "sdpa",
                    fuses=name != attention.SHAPE_READERS,
                    counted=name != "sdpa-leftovers",
                )
            )
        if binary_masks:
            # on the Attention nodes the stages above made, reading their additive masks
            stages.append(_Stage("attention-mask", functools.partial(attention_mask.rules, target)))
        # after attention: BiasGelu must not take the Adds that the MHA bias fusion wants
        stages.append(_Stage("bias-gelu", functools.partial(gelu.bias_gelu_rules, target)))
    # a target may have none of a family (the lazily built ones do nothing when empty)
    return tuple(stage for stage in stages if stage.needs is not None or stage.rules)


def _infer_shapes(model: ir.Model) -> None:
    # Not strict: ONNX's inference knows no com.microsoft op and would give up on the model.
    ir_common.ShapeInferencePass(strict_mode=False)(model)


def canonicalize(model: ir.Model) -> None:
    """Bring ``model`` (in place) to the form the fusion patterns match.

    Identity nodes out (they sit between the ops of a pattern), constant sub-expressions folded
    (a Conv bias computed at run time from a constant blocks the BatchNormalization fold), dead
    nodes out (they count as consumers), shapes inferred (checks read them) unless every value
    has one already (as after ``fold-constants``, which infers them node by node).
    """
    eliminate_identities(model.graph)
    # our folder: onnxscript's own, with size limits checked before evaluating, the never-fold
    # rules (random ops, Q/DQ, custom domains), and ops it would crash on left alone; without
    # the folder's node-by-node shape inference (a proto round trip per node, most of its time
    # when little is left to fold): shapes are inferred for the whole graph below
    FoldConstantsPass(shape_inference=False)(model)
    eliminate_identities(model.graph)  # folding leaves Identity in place of no-op nodes
    ir_common.RemoveUnusedNodesPass()(model)
    if _untyped_values(model):  # after fold-constants every value has its type and shape
        _infer_shapes(model)


def _untyped_values(model: ir.Model) -> bool:
    """Whether any node output (If/Loop/Scan bodies included) lacks a type or a shape."""
    return any(
        value.type is None or value.shape is None
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for value in node.outputs
    )


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One rewrite that ``fuse`` applied: its stage, its rule, and the nodes it replaced."""

    stage: str
    rule: str
    nodes: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.rule} ({self.stage}) on {', '.join(self.nodes)}"


class _RewriteCounter:
    """Lets at most ``limit`` rewrites happen (all when None) and logs each one, in order."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.applied: list[Rewrite] = []

    def wrap(self, stage: str, rule: pattern.RewriteRule) -> pattern.RewriteRule:
        """A copy of ``rule`` that refuses every match once the limit is reached."""
        counted = copy.copy(rule)

        def try_rewrite(model, graph_or_function, node, **kwargs):
            if self.limit is not None and len(self.applied) >= self.limit:
                return None
            delta = rule.try_rewrite(model, graph_or_function, node, **kwargs)
            if delta is not None and kwargs.get("tracer") is None:
                nodes = tuple(_label(n) for n in delta.match.nodes)
                self.applied.append(Rewrite(stage, str(rule), nodes))
            return delta

        counted.try_rewrite = try_rewrite  # type: ignore[method-assign]
        return counted


def _root_operator(rule: pattern.RewriteRule) -> tuple[str, str] | None:
    """The (domain, op_type) every match of ``rule`` is rooted at, or None if not fixed.

    onnxscript's matcher starts from the pattern's output node, matched against the node it
    is offered, so a node of any other op type fails at once; checking that first spares the
    matcher's setup for the (node, rule) pairs that cannot match, which are most of them.
    """
    roots = rule._target_pattern.output_nodes  # noqa: SLF001 - no public accessor
    if len(roots) != 1:
        return None
    domain, op_type = (_constant_string(roots[0].domain), _constant_string(roots[0].op))
    if domain is None or op_type is None:
        return None
    return (_canonical_domain(domain), op_type)


def _canonical_domain(domain: str) -> str:
    return "" if domain in ONNX_DOMAINS else domain


def _constant_string(value: object) -> str | None:
    """A pattern's domain or op as a string, if it is one fixed string.

    Commuted copies of a rule carry them as StringConstantPattern, which ``op_identifier``
    does not resolve.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, _pattern_ir.StringConstantPattern):
        return value.value()
    return None


def _guarded(rule: pattern.RewriteRule) -> pattern.RewriteRule:
    """``rule``, refusing without matching any node whose op type is not its root's."""
    root = _root_operator(rule)
    if root is None:
        return rule
    guarded = copy.copy(rule)

    def try_rewrite(model, graph_or_function, node, **kwargs):
        if node.op_type != root[1] or _canonical_domain(node.domain) != root[0]:
            return None
        return rule.try_rewrite(model, graph_or_function, node, **kwargs)

    guarded.try_rewrite = try_rewrite  # type: ignore[method-assign]
    return guarded


def _op_types(model: ir.Model) -> set[str]:
    graphs = [model.graph, *model.functions.values()]
    return {node.op_type for g in graphs for node in ir.traversal.RecursiveGraphIterator(g)}


def _apply_stage(model: ir.Model, stage: _Stage, counter: _RewriteCounter | None = None) -> int:
    if not stage.applies_to(model):
        return 0
    rules = stage.rules
    if counter is not None and stage.counted:
        rules = [counter.wrap(stage.name, rule) for rule in rules]
    count = pattern.RewriteRuleSet(rules).apply_to_model(model)
    if count:
        logger.debug("fuse: stage %s made %d rewrites", stage.name, count)
        # matched nodes are gone; their inputs' producers (shape arithmetic) may be dead now
        ir_common.RemoveUnusedNodesPass()(model)
        if stage.infer_shapes_after:
            _infer_shapes(model)
    return count


def pack_constant_concats(graph: ir.Graph) -> int:
    """Replace each Concat of constants with one initializer.

    Constants that something else reads too are packed only when the copy is small (biases,
    up to ``SHARED_PACK_LIMIT_BYTES``): a large one would be stored twice.

    The attention fusions pack the Q, K and V weights and biases with Concat nodes; folding
    them here (exactly: a copy of the values) saves the runtime from doing it at load time.
    Returns the number of Concats replaced.
    """
    count = 0
    for node in list(graph):
        if node.op_type != "Concat" or node.domain not in ONNX_DOMAINS:
            continue
        parts = [constant_array(v) for v in node.inputs]
        if not parts or any(p is None for p in parts):
            continue
        shared = any(len(v.uses()) != 1 or v.is_graph_output() for v in node.inputs)
        if shared and sum(p.nbytes for p in parts) > SHARED_PACK_LIMIT_BYTES:
            continue  # packing would keep a second copy of large weights
        packed = node.outputs[0]
        if packed.is_graph_output():
            continue
        array = np.concatenate(parts, axis=node.attributes.get_int("axis", 0))
        value = new_initializer(graph, f"{packed.name or 'packed'}_packed", array)
        ir.convenience.replace_all_uses_with(packed, value)
        graph.remove(node, safe=True)
        count += 1
    return count


def _temporary_nodes(model: ir.Model) -> list[ir.Node]:
    return [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain == attention.TEMPORARY_DOMAIN
    ]


def _validated_rules(rules: Sequence[str]) -> tuple[str, ...]:
    if isinstance(rules, str):
        rules = [rules]
    unknown = [r for r in rules if r not in RULE_SETS]
    if unknown:
        raise ValueError(
            f"unknown rule set(s) {', '.join(map(repr, unknown))}; choices: {', '.join(RULE_SETS)}"
        )
    if not rules:
        raise ValueError(f"rules names no rule set; choices: {', '.join(RULE_SETS)}")
    return tuple(r for r in RULE_SETS if r in rules)  # one canonical order, no repeats


@register
class FusePass(FunctionalPass):
    """Fuse op chains into ONNX Runtime's fused ops (CNN and transformer rule sets).

    Options: ``rules``, the rule sets; ``target``, the execution provider whose kernels the
    fused ops must have; ``binary_masks`` (CPU target): an integer graph input that reaches
    Attention's additive mask only through Cast, Unsqueeze/Reshape, ``(1 - m) * c`` (or
    Sub/Mul variants) is taken to be a 0/1 padding mask and fed to Attention as its mask index
    (bit for bit on 0/1 masks, different on others); ``binary_masks=false`` keeps the additive
    mask; ``skip_layer_norm``: ``kernel`` writes a fused residual + LayerNormalization as ONNX
    Runtime's SkipLayerNormalization, ``sum`` as Sum + LayerNormalization (faster on its CPU),
    ``auto`` picks sum for the cpu target and kernel for cuda.
    """

    name = "fuse"
    summary = (
        "Fuse Conv+BatchNorm, Pad, bias, activations, LayerNorm, GELU, attention into "
        "fused ops the target EP has kernels for."
    )
    semantics = Semantics.REASSOCIATING

    def __init__(
        self,
        *,
        rules: tuple[str, ...] = DEFAULT_RULES,
        target: Literal["cpu", "cuda"] = DEFAULT_TARGET,
        # an integer graph input that reaches Attention's additive mask only through Cast,
        # Unsqueeze/Reshape, (1 - m) * c (or Sub/Mul variants) is taken to be a 0/1 padding
        # mask and fed to Attention as its mask index; false keeps the additive mask
        binary_masks: bool = DEFAULT_BINARY_MASKS,
        # how a fused residual + LayerNormalization is written: "kernel", ONNX Runtime's
        # SkipLayerNormalization; "sum", Sum + LayerNormalization (faster on ORT's CPU);
        # "auto", sum for the cpu target and kernel for cuda
        skip_layer_norm: Literal["auto", "kernel", "sum"] = "auto",
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choices: {', '.join(TARGETS)}")
        if skip_layer_norm not in SKIP_LAYER_NORM_FORMS:
            raise ValueError(
                f"unknown skip_layer_norm {skip_layer_norm!r}; "
                f"choices: {', '.join(SKIP_LAYER_NORM_FORMS)}"
            )
        self.rules = _validated_rules(rules)
        self.target = target
        self.binary_masks = binary_masks
        self.skip_layer_norm = skip_layer_norm
        self._rewrite_limit: int | None = None
        self._counting = False
        self.applied_rewrites: list[Rewrite] = []

    def with_rewrite_limit(self, limit: int | None) -> FusePass:
        """A copy of this pass that applies at most ``limit`` rewrites (all when None).

        Rewrites count in the order they happen (stage by stage, node by node); after a run,
        the copy's ``applied_rewrites`` lists them. ``onnxforge optimize --bisect`` uses it to
        find the first rewrite that breaks a model, as LLVM's debug counters do.
        """
        limited = FusePass(
            rules=self.rules,
            target=self.target,
            binary_masks=self.binary_masks,
            skip_layer_norm=self.skip_layer_norm,
        )
        limited._rewrite_limit, limited._counting = limit, True
        return limited

    def call(self, model: ir.Model) -> PassResult:
        """Canonicalise and fuse a copy; an unchanged copy when no fusion fires."""
        fused = model.clone()
        canonicalize(fused)
        counts: collections.Counter[str] = collections.Counter()
        fusions = 0
        counter = _RewriteCounter(self._rewrite_limit) if self._counting else None
        for stage in _stages(self.rules, self.target, self.binary_masks):
            count = _apply_stage(fused, stage, counter)
            counts[stage.name] += count
            fusions += count if stage.fuses else 0
        logger.info("fuse: %d fusions %s", fusions, {k: v for k, v in counts.items() if v})
        if counter is not None:
            self.applied_rewrites = list(counter.applied)
        if not fusions:
            return PassResult(model.clone(), False)
        if self._skip_layer_norm_form() == "sum":
            lowered = normalization.lower_skip_layer_norm(fused)
            logger.info(
                "fuse: %d SkipLayerNormalization written as Sum + LayerNormalization", len(lowered)
            )
        pack_constant_concats(fused.graph)
        ir_common.RemoveUnusedNodesPass()(fused)
        return PassResult(fused, True)

    def _skip_layer_norm_form(self) -> str:
        if self.skip_layer_norm != "auto":
            return self.skip_layer_norm
        return "sum" if self.target == "cpu" else "kernel"

    def ensures(self, model: ir.Model) -> None:
        """No temporary fusion op (which no runtime implements) is left in the model."""
        left = _temporary_nodes(model)
        if left:
            raise AssertionError(
                f"fuse left {len(left)} temporary {attention.TEMPORARY_DOMAIN} node(s): "
                f"{', '.join(str(n.name) for n in left)}"
            )

    def explain(self, model: ir.Model) -> list[NearMiss]:
        """The near-misses of this pass's rules on ``model`` (which is left unchanged)."""
        return explain(model, rules=self.rules, target=self.target, binary_masks=self.binary_masks)


# ---------------------------------------------------------------------------------------------
# Near-misses


@dataclasses.dataclass(frozen=True)
class NearMiss:
    """A structural match that a rule refused: which rule, on which nodes, and why."""

    rule: str
    nodes: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.rule} on {', '.join(self.nodes)}: {self.reason}"


def _label(node: ir.Node) -> str:
    """A node's name, or for an unnamed node its op and first output: ``Conv(c)``."""
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs else None
    return f"{node.op_type}({output})" if output else node.op_type


def _blocking_values(nodes: Sequence[ir.Node], root: ir.Node) -> list[str]:
    """Why an otherwise matching pattern's nodes cannot be removed, one phrase per value."""
    matched = set(nodes)
    phrases = []
    for node in nodes:
        for value in node.outputs:
            if node is root and value in root.outputs:
                continue  # the pattern's own result
            readers = [_label(user) for user, _ in value.uses() if user not in matched]
            if value.is_graph_output():
                phrases.append(f"'{value.name}' is a graph output")
            elif readers:
                phrases.append(f"'{value.name}' is also read by {', '.join(map(repr, readers))}")
    return phrases


class _NearMissTracer(MatchingTracer):
    """Records every refused structural match (onnxscript's tracer keeps only the best)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[ir.Node, NearMiss]] = []

    def log(self, rule, container, node, match_result: MatchResult, status: MatchStatus) -> None:
        nodes = list(match_result.nodes) if match_result is not None else []
        if status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED):
            reason = match_result.reason or "the rule's check refused the match"
        elif status is MatchStatus.NO_MATCH and match_result.reason == _OTHER_USES_REASON:
            phrases = _blocking_values(nodes, node)
            if not phrases:
                return
            reason = "an intermediate value has another use: " + "; ".join(phrases)
        else:
            return
        names = tuple(_label(n) for n in nodes) or (_label(node),)
        self.found.append((node, NearMiss(str(rule.name or rule), names, reason)))


def explain(
    model: ir.Model,
    *,
    rules: Sequence[str] = DEFAULT_RULES,
    target: Literal["cpu", "cuda"] = DEFAULT_TARGET,
    binary_masks: bool = DEFAULT_BINARY_MASKS,
) -> list[NearMiss]:
    """Near-misses of ``fuse{rules,target,binary_masks}`` on ``model``: refused matches, why.

    Runs the pass's stages on a copy, tracing each stage before applying it, so that a later
    stage's near-misses are found on the graph the earlier stages leave (only the main graph's
    and subgraphs' nodes are traced, not model-local functions'). A refusal whose root
    node some rule (another operand order, a later stage) fused after all is not reported.
    The model is left unchanged.
    """
    rule_sets = FusePass(rules=tuple(rules), target=target).rules
    work = model.clone()
    canonicalize(work)
    found: list[tuple[ir.Node, NearMiss]] = []
    for stage in _stages(rule_sets, target, binary_masks):
        if not stage.applies_to(work):
            continue
        # Traced on a copy: onnxscript builds each successful match's replacement even while
        # tracing, and the unused replacement nodes stay behind as readers of graph values.
        probe = work.clone()
        in_work = dict(
            zip(
                ir.traversal.RecursiveGraphIterator(probe.graph),
                ir.traversal.RecursiveGraphIterator(work.graph),
                strict=True,
            )
        )
        tracer = _NearMissTracer()
        pattern.RewriteRuleSet(stage.rules).apply_to_model(probe, tracer=tracer)
        found += [(in_work[root], miss) for root, miss in tracer.found if root in in_work]
        _apply_stage(work, stage)
    misses: list[NearMiss] = []
    for root, miss in found:
        if root.graph is not None and miss not in misses:
            misses.append(miss)
    return misses
