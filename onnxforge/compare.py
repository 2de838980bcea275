"""``compare``: run many orderings of passes over one model and tabulate what each gives.

Orderings are pipelines (text). They are put into a trie keyed by canonical pass text, so that
a common prefix runs once: ``fold-constants,cleanup,fuse`` and ``fold-constants,fuse,cleanup``
share their first step. Each trie node applies one pass to its parent's model and verifies the
result once (structure, and numerics against the parent at the pass's tolerance). A node where
an ordering ends is *measured*: ONNX Runtime latency (p50, throughput) on ``batch`` rows of the
inputs, and the accuracy metric on all of them against the original model's outputs (or the
labels). Models are identified by a hash of their bytes and each distinct model is measured
once, so orderings that converge on the same graph share one latency and show as one model.

Latency is measured in pairs: each model's runs alternate with runs of the original, in the
same job, so that load on the machine (other jobs, other users) slows both alike. The speedup
is the original's p50 over the model's in those alternating runs; ``latency_ms`` is the
original's own p50 divided by that speedup, which puts every row on the footing of one
measurement of the original (the raw figures of both stay in the row).

A pass that fails, or whose result fails verification, fails its node: every ordering below it
gets that status, and the sweep goes on. The table marks the Pareto-optimal rows (no other row
is at least as fast and at least as accurate), and the fastest ordering is replayed with every
prefix measured, which gives each of its passes' contribution.

Executors: ``local`` runs in this process (``jobs=1``) or in a pool of ``jobs`` processes;
``ray`` runs each trie node and each measurement as a Ray task with its own ONNX Runtime
session (models travel through Ray's object store). All give the same rows, except latencies.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib
import itertools
import logging
import multiprocessing
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxforge.backend import Session, Stats, benchmark, compare_outputs, make_inputs
from onnxforge.backend.benchmark import MIN_RUNS, summarize
from onnxforge.errors import InputError, OnnxforgeError, VerificationError, first_line
from onnxforge.io import load
from onnxforge.passes import (
    Ledger,
    PassManager,
    Timing,
    VerifyNumerics,
    VerifyStructure,
    format_pass,
    parse_pipeline,
)
from onnxforge.passes.pipeline import PipelineLike
from onnxforge.passes.statistics import model_stats

__all__ = [
    "compare",
    "permutations",
    "ablations",
    "CompareRow",
    "CompareResult",
    "METRICS",
    "EXECUTORS",
    "VERIFY_LEVELS",
    "DEFAULT_BATCH",
    "DEFAULT_DURATION_S",
    "DEFAULT_WARMUP",
    "MAX_PERMUTED_PASSES",
]

logger = logging.getLogger(__name__)

METRICS = ("cosine", "top1", "rel-l2")
EXECUTORS = ("local", "ray")
VERIFY_LEVELS = ("none", "structure", "numeric")
# Latency is measured at batch 1 (the first row of the inputs): the serving case.
DEFAULT_BATCH = 1
# Per distinct model: a few untimed runs, then this many seconds of timed runs (at least 10).
DEFAULT_WARMUP = 3
DEFAULT_DURATION_S = 1.0
# Without inputs or a sample's evaluation data, this many seeded random rows.
DEFAULT_RANDOM_ROWS = 8
# Intermediate models are verified on this many rows of the inputs (as `optimize` uses batch 2).
VERIFY_ROWS = 2
# The metric runs the inputs through the model in chunks of this many rows.
EVAL_CHUNK = 64
# n! orderings: 6 passes give 720 already.
MAX_PERMUTED_PASSES = 6
ORIGINAL = "(original)"
ORIGINAL_LABEL = "orig"  # the model column of rows whose model is the original, unchanged


# ---------------------------------------------------------------------------------------------
# Orderings


def _pass_texts(pipeline: PipelineLike) -> list[str]:
    return [format_pass(p) for p in parse_pipeline(pipeline)]


def permutations(passes: PipelineLike) -> list[str]:
    """Every ordering of ``passes`` (pipeline text or a list), each once, as pipeline text."""
    texts = _pass_texts(passes)
    if len(texts) > MAX_PERMUTED_PASSES:
        raise InputError(
            f"{len(texts)} passes have {len(texts)}! orderings",
            hint=f"permute at most {MAX_PERMUTED_PASSES} passes, or list orderings with -p",
        )
    return list(dict.fromkeys(",".join(order) for order in itertools.permutations(texts)))


def ablations(pipeline: PipelineLike) -> list[str]:
    """The pipeline itself, then the pipeline with each pass left out in turn."""
    texts = _pass_texts(pipeline)
    if len(texts) < 2:
        raise InputError("ablation needs a pipeline of at least two passes")
    left_out = [",".join(texts[:i] + texts[i + 1 :]) for i in range(len(texts))]
    return list(dict.fromkeys([",".join(texts), *left_out]))


@dataclasses.dataclass(eq=False)
class _Node:
    """A trie node: the pass applied to the parent's model; ``ordering`` when one ends here."""

    id: int
    pass_text: str | None  # None at the root (the original model)
    parent: _Node | None
    depth: int = 0
    children: dict[str, _Node] = dataclasses.field(default_factory=dict)
    ordering: str | None = None
    measure: bool = False

    def path(self) -> list[_Node]:
        """The nodes from the first pass down to this one (the root excluded)."""
        nodes, node = [], self
        while node is not None and node.pass_text is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def subtree(self) -> list[_Node]:
        """The node itself and every node below it."""
        nodes, stack = [], [self]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes


def _build_trie(orderings: Sequence[Sequence[str]]) -> tuple[_Node, list[_Node]]:
    """The trie of the orderings (lists of canonical pass texts) and the node each ends at."""
    root = _Node(0, None, None)
    count = itertools.count(1)
    ends = []
    for passes in orderings:
        node = root
        for text in passes:
            if text not in node.children:
                node.children[text] = _Node(next(count), text, node, node.depth + 1)
            node = node.children[text]
        node.ordering, node.measure = ",".join(passes), True
        ends.append(node)
    return root, ends


# ---------------------------------------------------------------------------------------------
# Jobs: what runs on an executor. Everything they take and return pickles.


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every job needs: settings, inputs and the original model's outputs."""

    ep: str
    threads: int | None
    warmup: int
    runs: int | None
    duration: float | None
    metric: str
    verify: str
    structure_checks: bool  # False when the original model already fails the checker
    budget: float | None
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    bench_inputs: dict[str, np.ndarray]
    verify_inputs: dict[str, np.ndarray]
    reference: list[np.ndarray]  # the original's outputs on `inputs`
    verify_reference: list[np.ndarray]  # ... and on `verify_inputs`
    plugin_modules: tuple[str, ...]  # imported by each job, so that pass names resolve


@dataclasses.dataclass
class _Payload:
    """A model as the local in-process executor hands it on: the IR and its bytes."""

    model: ir.Model
    data: bytes


@dataclasses.dataclass
class _Applied:
    """What applying one pass to a model gave."""

    status: str  # ok | failed | verify-failed
    record: dict[str, Any]
    error: str | None = None
    model_hash: str | None = None
    size_bytes: int | None = None
    nodes: int | None = None
    parameter_bytes: int | None = None
    ops: dict[str, int] | None = None
    verify_outputs: list[np.ndarray] | None = None


@dataclasses.dataclass
class _Measured:
    """Latency and accuracy of one distinct model."""

    status: str  # ok | failed
    error: str | None = None
    latency: dict[str, Any] | None = None
    baseline_latency: dict[str, Any] | None = None  # the original's, timed in alternation
    accuracy: dict[str, Any] | None = None
    metric: float | None = None


def _serialize(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def _model_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _deserialize(data: bytes) -> ir.Model:
    return ir.from_proto(onnx.load_from_string(data))


def _session(data: bytes, ep: str, threads: int | None) -> Session:
    """An ONNX Runtime session from model bytes (written to a file: Session takes paths)."""
    with tempfile.TemporaryDirectory(prefix="onnxforge-compare-") as folder:
        path = pathlib.Path(folder) / "model.onnx"
        path.write_bytes(data)
        return Session(path, ep=ep, threads=threads)


def _import_plugins(modules: Sequence[str]) -> None:
    for module in modules:
        importlib.import_module(module)


class _CachingRunner:
    """VerifyNumerics' runner; keeps the bytes of the last model it ran, for the hash."""

    def __init__(self, context: _Context) -> None:
        self.context = context
        self.last: tuple[ir.Model, bytes] | None = None

    def __call__(self, model: ir.Model, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        data = _serialize(model)
        self.last = (model, data)
        return _session(data, self.context.ep, self.context.threads).run(inputs)

    def bytes_of(self, model: ir.Model) -> bytes:
        if self.last is not None and self.last[0] is model:
            return self.last[1]
        return _serialize(model)


class _VerifyStructureOnce(VerifyStructure):
    """VerifyStructure without re-checking the input: the parent node checked it already."""

    def before_pipeline(self, model, passes) -> None:
        """Checks are on (the sweep checked the original model once)."""
        self.enabled = True


class _VerifyNumericsChained(VerifyNumerics):
    """VerifyNumerics that starts from outputs already known instead of rerunning the input."""

    def __init__(self, *args, reference, previous, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._known = (reference, previous)

    def before_pipeline(self, model, passes) -> None:
        """Take the original's outputs and the parent's as known."""
        self.reference, self.previous = self._known


def _apply_job(
    context: _Context,
    payload: _Payload | bytes,
    pass_text: str,
    parent_outputs: list[np.ndarray] | None,
    keep_model: bool,
) -> tuple[_Applied, _Payload | bytes | None]:
    """Apply one pass to (a copy of) the parent's model and verify the result once."""
    _import_plugins(context.plugin_modules)
    model = payload.model.clone() if isinstance(payload, _Payload) else _deserialize(payload)
    runner = _CachingRunner(context)
    instruments: list = [Ledger()]
    if context.verify in ("structure", "numeric") and context.structure_checks:
        instruments.append(_VerifyStructureOnce())
    numerics = None
    if context.verify == "numeric":
        numerics = _VerifyNumericsChained(
            runner,
            context.verify_inputs,
            compare_outputs,
            budget=context.budget,
            reference=context.verify_reference,
            previous=parent_outputs,
        )
        instruments.append(numerics)
    instruments.append(Timing())
    try:
        result = PassManager(parse_pipeline(pass_text), instruments).run(model)
    except OnnxforgeError as error:
        records = getattr(error, "records", None) or []
        record = records[-1].as_dict() if records else {"text": pass_text, "status": "failed"}
        cause = error.__cause__ or error
        status = "verify-failed" if isinstance(error, VerificationError) else "failed"
        return _Applied(status, record, error=first_line(cause)), None
    except Exception as error:  # an instrument's own failure: still this node's, not the sweep's
        record = {"text": pass_text, "status": "failed"}
        return _Applied(
            "failed", record, error=f"{type(error).__name__}: {first_line(error)}"
        ), None
    (record,) = result.records
    data = runner.bytes_of(result.model)
    stats = model_stats(result.model)
    applied = _Applied(
        "ok",
        record.as_dict(),
        model_hash=_model_hash(data),
        size_bytes=len(data),
        nodes=stats.nodes,
        parameter_bytes=stats.parameter_bytes,
        ops=stats.ops,
        verify_outputs=list(numerics.previous) if numerics is not None else None,
    )
    return applied, (_Payload(result.model, data) if keep_model else data)


def _run_in_chunks(session: Session, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    rows = min((len(v) for v in inputs.values() if np.ndim(v)), default=1)
    parts: list[list[np.ndarray]] = []
    for start in range(0, rows, EVAL_CHUNK):
        chunk = {k: v[start : start + EVAL_CHUNK] if np.ndim(v) else v for k, v in inputs.items()}
        parts.append(session.run(chunk))
    return [np.concatenate(list(outputs)) for outputs in zip(*parts, strict=True)]


def _accuracy(
    outputs: Sequence[np.ndarray], context: _Context
) -> tuple[dict[str, Any], float | None]:
    comparison = compare_outputs(context.reference, outputs)
    accuracy = comparison.as_dict()
    if context.labels is not None:
        predicted = np.argmax(np.asarray(outputs[0]).reshape(len(context.labels), -1), axis=1)
        accuracy["labels_top1"] = float(np.mean(predicted == context.labels))
    metric = {
        "cosine": comparison.cosine,
        "rel-l2": comparison.rel_l2,
        "top1": accuracy.get("labels_top1", comparison.top1),
    }[context.metric]
    return accuracy, None if metric is None else float(metric)


def _paired_runs(candidate, baseline, context: _Context) -> tuple[Stats, Stats]:
    """Time two bound sessions in alternation, so that load on the machine hits both alike.

    The order within each pair alternates too; each model gets ``runs`` runs, or ``duration``
    seconds (at least MIN_RUNS runs).
    """
    for _ in range(max(0, context.warmup)):
        candidate.run()
        baseline.run()
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while True:
        order = ((candidate, 0), (baseline, 1))
        for bound, slot in order if len(times[0]) % 2 == 0 else order[::-1]:
            begin = time.perf_counter()
            bound.run()
            times[slot].append(time.perf_counter() - begin)
        if context.runs is not None:
            if len(times[0]) >= context.runs:
                break
        elif time.perf_counter() - start >= 2 * (context.duration or DEFAULT_DURATION_S):
            if len(times[0]) >= MIN_RUNS:
                break
    return (
        summarize(times[0], batch=candidate.batch),
        summarize(times[1], batch=baseline.batch),
    )


def _measure_job(
    context: _Context, payload: _Payload | bytes, baseline: _Payload | bytes | None
) -> _Measured:
    """Latency and accuracy of one model, in a session of its own.

    With a ``baseline`` (the original model), both are timed in alternation: the speedup
    compares runs made under the same load.
    """
    data = payload.data if isinstance(payload, _Payload) else payload
    try:
        session = _session(data, context.ep, context.threads)
        accuracy, metric = _accuracy(_run_in_chunks(session, context.inputs), context)
        if baseline is None:
            stats = benchmark(
                session,
                context.bench_inputs,
                warmup=context.warmup,
                runs=context.runs,
                duration=context.duration,
            )
            return _Measured("ok", latency=stats.as_dict(), accuracy=accuracy, metric=metric)
        base_data = baseline.data if isinstance(baseline, _Payload) else baseline
        base_session = _session(base_data, context.ep, context.threads)
        stats, base_stats = _paired_runs(
            session.bind(context.bench_inputs), base_session.bind(context.bench_inputs), context
        )
    except Exception as error:  # a model that does not load or run is this row's failure
        return _Measured("failed", error=f"does not run: {first_line(error)}")
    return _Measured(
        "ok",
        latency=stats.as_dict(),
        baseline_latency=base_stats.as_dict(),
        accuracy=accuracy,
        metric=metric,
    )


# ---------------------------------------------------------------------------------------------
# Executors: submit jobs, wait for any to finish


class _Handle:
    """A submitted job: ``result()`` gives its outcome; ``payload`` goes to child jobs."""

    def __init__(self, key: Any, result: Callable[[], Any], payload: Any = None) -> None:
        self.key, self._result, self.payload = key, result, payload

    def result(self) -> Any:
        return self._result()


class _InlineExecutor:
    """Runs each job in this process when it is submitted; models stay in memory."""

    name = "local"
    keep_model = True

    def __init__(self) -> None:
        self.jobs = 1
        self._keys = itertools.count()

    def share(self, value: Any) -> Any:
        return value

    def original(self, model: ir.Model, data: bytes) -> Any:
        return _Payload(model, data)

    def apply(self, context, payload, pass_text, parent_outputs) -> _Handle:
        outcome, child = _apply_job(context, payload, pass_text, parent_outputs, True)
        return _Handle(next(self._keys), lambda: outcome, child)

    def measure(self, context, payload, baseline) -> _Handle:
        outcome = _measure_job(context, payload, baseline)
        return _Handle(next(self._keys), lambda: outcome)

    def wait(self, handles: Sequence[_Handle]) -> list[_Handle]:
        return list(handles)

    def close(self) -> None:
        pass


class _PoolExecutor:
    """Runs jobs in ``jobs`` worker processes; models travel between them as bytes."""

    name = "local"
    keep_model = False

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn")
        )

    def share(self, value: Any) -> Any:
        return value

    def original(self, model: ir.Model, data: bytes) -> Any:
        return data

    def apply(self, context, payload, pass_text, parent_outputs) -> _Handle:
        future = self._pool.submit(_apply_job, context, payload, pass_text, parent_outputs, False)
        pair: dict[str, Any] = {}

        def outcome() -> _Applied:
            if not pair:
                pair["outcome"], handle.payload = future.result()
            return pair["outcome"]

        handle = _Handle(future, outcome)
        return handle

    def measure(self, context, payload, baseline) -> _Handle:
        future = self._pool.submit(_measure_job, context, payload, baseline)
        return _Handle(future, future.result)

    def wait(self, handles: Sequence[_Handle]) -> list[_Handle]:
        by_future = {h.key: h for h in handles}
        done, _ = concurrent.futures.wait(by_future, return_when="FIRST_COMPLETED")
        return [by_future[f] for f in done]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class _RayExecutor:
    """Runs each job as a Ray task; models stay in Ray's object store between tasks."""

    name = "ray"
    keep_model = False

    def __init__(self, jobs: int | None, threads: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise InputError(
                "the ray executor needs Ray", hint="pip install 'onnxforge[ray]'"
            ) from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            # address None: Ray connects to RAY_ADDRESS when set, else starts a local instance
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.jobs = jobs or max(1, cpus // threads)
        task = ray.remote(num_cpus=threads)
        self._apply = task(_apply_job).options(num_returns=2)
        self._measure = task(_measure_job)

    def share(self, value: Any) -> Any:
        return self._ray.put(value)

    def original(self, model: ir.Model, data: bytes) -> Any:
        return self._ray.put(data)

    def apply(self, context, payload, pass_text, parent_outputs) -> _Handle:
        outcome, child = self._apply.remote(context, payload, pass_text, parent_outputs, False)
        return _Handle(outcome, lambda: self._ray.get(outcome), child)

    def measure(self, context, payload, baseline) -> _Handle:
        outcome = self._measure.remote(context, payload, baseline)
        return _Handle(outcome, lambda: self._ray.get(outcome))

    def wait(self, handles: Sequence[_Handle]) -> list[_Handle]:
        by_ref = {h.key: h for h in handles}
        done, _ = self._ray.wait(list(by_ref), num_returns=1)
        more, _ = self._ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        return [by_ref[ref] for ref in dict.fromkeys([*done, *more])]

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


# ---------------------------------------------------------------------------------------------
# The sweep: walk a trie on an executor


class _Progress:
    def __init__(self, callback: Callable[[int, int, str], None] | None) -> None:
        self.callback, self.done, self.total = callback, 0, 0

    def add(self, steps: int) -> None:
        self.total += steps
        self._report("")

    def step(self, text: str, steps: int = 1) -> None:
        self.done += steps
        self._report(text)

    def _report(self, text: str) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total, text)


class _Sweep:
    """Runs tries of passes on an executor; distinct models are measured once across tries."""

    def __init__(self, executor, context: _Context, progress: _Progress) -> None:
        self.executor = executor
        self.context = context
        self.shared = executor.share(context)  # what jobs get: an object reference on Ray
        self.progress = progress
        self.measured: dict[str, _Measured] = {}
        self.baseline: Any = None  # the original's payload, timed alongside every model

    def measure_original(self, payload: Any, model_hash: str) -> _Measured:
        self.progress.add(1)
        self.baseline = payload
        handle = self.executor.measure(self.shared, payload, None)
        self.executor.wait([handle])
        self.measured[model_hash] = handle.result()
        self.progress.step(f"measured {ORIGINAL}")
        return self.measured[model_hash]

    def run(self, root: _Node, payload: Any) -> dict[_Node, _Applied]:
        """Apply every node of the trie below ``root`` (whose model is ``payload``)."""
        nodes = root.subtree()[1:]
        self.progress.add(len(nodes) + sum(n.measure for n in nodes))
        applied: dict[_Node, _Applied] = {}
        waiting: dict[str, list[_Node]] = {}  # hash -> nodes waiting for its measurement
        start = self.context.verify_reference if self.context.verify == "numeric" else None
        ready: list[tuple[str, Any, Any, Any]] = [
            ("apply", child, payload, start) for child in reversed(root.children.values())
        ]
        in_flight: dict[Any, tuple[str, Any, _Handle]] = {}
        while ready or in_flight:
            while ready and len(in_flight) < self.executor.jobs:
                kind, subject, source, outputs = ready.pop()  # last in, first out: depth first
                if kind == "apply":
                    handle = self.executor.apply(self.shared, source, subject.pass_text, outputs)
                else:
                    handle = self.executor.measure(self.shared, source, self.baseline)
                in_flight[handle.key] = (kind, subject, handle)
            for handle in self.executor.wait([h for _, _, h in in_flight.values()]):
                kind, subject, _ = in_flight.pop(handle.key)
                if kind == "measure":
                    self.measured[subject] = handle.result()
                    self.progress.step("measured", len(waiting.pop(subject)))
                    continue
                node, outcome = subject, handle.result()
                applied[node] = outcome
                self.progress.step(f"{' > '.join(n.pass_text for n in node.path())}")
                if outcome.status != "ok":
                    below = node.subtree()
                    skipped = len(below) - 1 + sum(n.measure for n in below)
                    self.progress.step("", skipped)
                    continue
                if node.measure:
                    if outcome.model_hash in self.measured:
                        self.progress.step("measured (same model)")
                    elif outcome.model_hash in waiting:
                        waiting[outcome.model_hash].append(node)
                    else:
                        waiting[outcome.model_hash] = [node]
                        ready.append(("measure", outcome.model_hash, handle.payload, None))
                for child in reversed(node.children.values()):
                    ready.append(("apply", child, handle.payload, outcome.verify_outputs))
        return applied


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class CompareRow:
    """One ordering (or the original model): what it gave, and its per-pass ledger."""

    pipeline: str
    status: str  # ok | failed | verify-failed
    latency_ms: float | None = None  # p50
    speedup: float | None = None  # the original's p50 / this p50
    throughput: float | None = None  # samples per second at the benchmark batch
    size_bytes: int | None = None  # the serialised model
    nodes: int | None = None
    metric: float | None = None
    optimize_s: float | None = None  # the passes' wall time, as if this ordering ran alone
    pareto: bool = False
    rank: int | None = None  # by latency, 1 = fastest; identical models share a rank
    model: str | None = None  # a letter per distinct model: rows with one letter are identical
    model_hash: str | None = None
    parameter_bytes: int | None = None
    latency: dict[str, Any] | None = None  # this model's p50/p90/p99, mean, stdev, runs
    baseline_latency: dict[str, Any] | None = None  # the original's, in alternation with it
    accuracy: dict[str, Any] | None = None  # max_abs, rel_l2, cosine, top1, labels_top1
    ops: dict[str, int] | None = None
    passes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the ledger
    error: str | None = None
    failed_pass: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; the issue's columns first."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompareResult:
    """The table of a comparison, the original model's row, and what the report draws."""

    model: str
    ep: str
    metric: str
    higher_is_better: bool
    executor: str
    jobs: int
    batch: int
    inputs_rows: int
    original: CompareRow
    rows: list[CompareRow]  # ok rows fastest first, then the failed ones
    best: str | None  # the fastest ordering
    contributions: list[dict[str, Any]]  # per pass of the best ordering
    pass_runs: int  # passes applied (trie nodes)
    pass_runs_unshared: int  # passes that running every ordering alone would apply
    distinct_models: int
    wall_s: float

    def row(self, pipeline: str) -> CompareRow:
        """The row of ``pipeline`` (in any spelling that parses to the same canonical text)."""
        canonical = ",".join(_pass_texts(pipeline))
        for row in self.rows:
            if row.pipeline == canonical:
                return row
        raise KeyError(pipeline)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"rows": [...], "original": {...}, ...}``."""
        data = dataclasses.asdict(self)
        data["rows"] = [r.as_dict() for r in self.rows]
        data["original"] = self.original.as_dict()
        return data


def _letters(index: int) -> str:
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("A") + rest) + name
    return name


def _better(a: float, b: float, higher: bool) -> bool:
    """Whether metric ``a`` is at least as good as ``b``."""
    return a >= b if higher else a <= b


def _mark_pareto(rows: Sequence[CompareRow], higher: bool) -> None:
    points = [r for r in rows if r.status == "ok" and r.metric is not None]
    for row in points:
        row.pareto = not any(
            other.latency_ms <= row.latency_ms
            and _better(other.metric, row.metric, higher)
            and (other.latency_ms < row.latency_ms or other.metric != row.metric)
            for other in points
        )


def _fill(row: CompareRow, measured: _Measured | None, original: CompareRow | None) -> None:
    """Copy a measurement into a row; ``original`` is the original's row (None: it is this)."""
    if measured is None:
        return
    if measured.status != "ok":
        row.status, row.error = "failed", measured.error
        return
    row.latency, row.baseline_latency = measured.latency, measured.baseline_latency
    row.accuracy, row.metric = measured.accuracy, measured.metric
    p50, throughput = measured.latency["p50_ms"], measured.latency["throughput"]
    if measured.baseline_latency is None or original is None:  # the original's measurement
        row.latency_ms, row.throughput = p50, throughput
        row.speedup = 1.0 if original is not None else None
        return
    # timed in alternation with the original: the ratios hold whatever the machine's load
    # was; scaled to the original's own measurement, so that every row is on one footing
    baseline = measured.baseline_latency
    row.speedup = baseline["p50_ms"] / p50
    row.latency_ms = original.latency_ms / row.speedup
    row.throughput = original.throughput * throughput / baseline["throughput"]


def _row_for(
    node: _Node, applied: Mapping[_Node, _Applied], sweep: _Sweep, original: CompareRow
) -> CompareRow:
    row = CompareRow(node.ordering or "", "ok")
    total_s = 0.0
    for depth, step in enumerate(node.path()):
        outcome = applied.get(step)
        if outcome is None:  # below a failed node
            break
        row.passes.append({**outcome.record, "index": depth})
        total_s += outcome.record.get("wall_s") or 0.0
        if outcome.status != "ok":
            row.status, row.error, row.failed_pass = outcome.status, outcome.error, step.pass_text
            row.optimize_s = total_s
            return row
    final = applied[node]
    row.optimize_s = total_s
    row.model_hash, row.size_bytes, row.nodes = final.model_hash, final.size_bytes, final.nodes
    row.parameter_bytes, row.ops = final.parameter_bytes, final.ops
    _fill(row, sweep.measured.get(final.model_hash), original)
    return row


def _contributions(
    best: CompareRow, path: list[_Node], applied, sweep: _Sweep, original: CompareRow
) -> list[dict[str, Any]]:
    previous = original
    entries = []
    for depth, node in enumerate(path):
        outcome = applied[node]
        step = CompareRow(node.pass_text or "", "ok")
        step.model_hash, step.size_bytes, step.nodes = (
            outcome.model_hash,
            outcome.size_bytes,
            outcome.nodes,
        )
        if outcome.status != "ok":
            break
        _fill(step, sweep.measured.get(outcome.model_hash), original)

        def delta(now, before):
            return None if now is None or before is None else now - before

        entries.append(
            {
                "index": depth,
                "pass": node.pass_text,
                "status": step.status,
                "latency_ms": step.latency_ms,
                "delta_latency_ms": delta(step.latency_ms, previous.latency_ms),
                "nodes": step.nodes,
                "delta_nodes": delta(step.nodes, previous.nodes),
                "size_bytes": step.size_bytes,
                "delta_size_bytes": delta(step.size_bytes, previous.size_bytes),
                "metric": step.metric,
                "delta_metric": delta(step.metric, previous.metric),
                "wall_s": outcome.record.get("wall_s"),
                "ops_delta": outcome.record.get("ops_delta"),
                "model_hash": step.model_hash,
            }
        )
        previous = step
    if entries and entries[-1]["model_hash"] != best.model_hash:
        logger.warning(
            "replaying %s gave another model than the sweep did: a pass is not deterministic",
            best.pipeline,
        )
    return entries


# ---------------------------------------------------------------------------------------------
# Inputs and the model


def _rows(inputs: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    return {k: (v[:count] if np.ndim(v) else v) for k, v in inputs.items()}


def _resolve_model(model_or_spec) -> tuple[ir.Model, str, Any]:
    """The model, a name for it, and the bundled sample it is (or None)."""
    if isinstance(model_or_spec, ir.Model):
        return model_or_spec.clone(), model_or_spec.graph.name or "model", None
    text = os.fspath(model_or_spec)
    if text.endswith(".onnx") or (os.path.isfile(text) and not text.endswith(".pt2")):
        model = load(text)
        ir.external_data.load_to_model(model)  # the bytes of every model must stand alone
        return model, text, None
    from onnxforge.frontend import export
    from onnxforge.samples import available_samples

    sample = available_samples().get(text)
    return export(text), text, sample


def _plugin_modules(orderings: Sequence[Sequence[str]]) -> tuple[str, ...]:
    modules = {
        type(p).__module__ for passes in orderings for p in parse_pipeline(list(passes) or [])
    }
    return tuple(sorted(m for m in modules if m and not m.startswith("onnxforge.passes")))


def _executor(executor: str, jobs: int | None, threads: int | None, ray_address: str | None):
    if executor == "ray":
        return _RayExecutor(jobs, threads or 1, ray_address)
    if jobs is None or jobs <= 1:
        return _InlineExecutor()
    return _PoolExecutor(jobs)


def compare(
    model_or_spec: ir.Model | str | os.PathLike[str],
    orderings: Sequence[PipelineLike],
    *,
    ep: str = "cpu",
    inputs: Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    metric: Literal["cosine", "top1", "rel-l2"] | None = None,
    executor: Literal["local", "ray"] = "local",
    jobs: int | None = None,
    batch: int = DEFAULT_BATCH,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int | None = None,
    duration: float | None = DEFAULT_DURATION_S,
    verify: Literal["none", "structure", "numeric"] = "numeric",
    budget: float | None = None,
    ray_address: str | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> CompareResult:
    """Run every ordering over the model, sharing common prefixes, and tabulate the results.

    ``model_or_spec`` is an ``onnx_ir.Model`` (not changed), an ``.onnx`` file, or an export
    spec (a bundled sample, whose evaluation data and metric are then the defaults).
    ``inputs`` (with ``labels`` for top-1 accuracy) are the rows the metric is computed on,
    against the original model's outputs; latency is measured on the first ``batch`` rows,
    with ``warmup`` untimed runs and then ``runs`` runs or ``duration`` seconds. ``metric``:
    ``cosine`` (worst row, higher is better), ``top1`` (accuracy on the labels, or agreement
    with the original's argmax; higher is better), ``rel-l2`` (lower is better). ``verify``
    checks each intermediate model once; ``budget`` holds lossy passes to a relative L2 error
    against the original. ``executor="local"`` runs in this process, or in ``jobs`` worker
    processes; ``"ray"`` runs Ray tasks (on the instance ``ray.init`` connected to, else one
    at ``ray_address``, ``RAY_ADDRESS`` or a new local one), ``jobs`` at a time (default: the
    cluster's CPUs / ``threads``). ``threads`` are ONNX Runtime's intra-op threads per session
    (default: all cores in-process; cores / jobs in a pool; 1 per Ray task).
    """
    started = time.perf_counter()
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor '{executor}'", hint=f"use {', '.join(EXECUTORS)}")
    if verify not in VERIFY_LEVELS:
        raise InputError(f"unknown verify level '{verify}'", hint=f"use {', '.join(VERIFY_LEVELS)}")
    if metric is not None and metric not in METRICS:
        raise InputError(f"unknown metric '{metric}'", hint=f"use {', '.join(METRICS)}")
    if batch < 1:
        raise InputError(f"the benchmark batch must be at least 1, got {batch}")
    parsed = list(dict.fromkeys(tuple(_pass_texts(o)) for o in orderings))
    if not parsed:
        raise InputError("no orderings to compare", hint="give -p, --permute or --ablate")
    model, name, sample = _resolve_model(model_or_spec)
    if inputs is None and sample is not None and sample.evaluation_data is not None:
        inputs, sample_labels = sample.evaluation_data()
        labels = sample_labels if labels is None else labels
    if inputs is None:
        inputs = make_inputs(model, batch=DEFAULT_RANDOM_ROWS)
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    metric = metric or (sample.metric if sample is not None else "cosine")
    if jobs is not None and jobs < 1:
        raise InputError(f"jobs must be at least 1, got {jobs}")
    if threads is None and executor == "local" and jobs and jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)

    data = _serialize(model)
    reference_session = _session(data, ep, threads)
    reference_session.check_inputs(inputs)
    verify_inputs = _rows(inputs, VERIFY_ROWS)
    reference = _run_in_chunks(reference_session, inputs)
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) != len(reference[0]):
            raise InputError(f"{len(labels)} labels for {len(reference[0])} rows of inputs")
    if metric == "top1" and labels is None and not any(r.ndim == 2 for r in reference):
        raise InputError(
            "the top1 metric needs labels or a (batch, classes) output",
            hint="use --metric cosine or rel-l2",
        )
    structure_checks = False
    if verify != "none":  # the original is checked once here; each node checks its result
        probe = VerifyStructure()
        probe.before_pipeline(model, ())  # logs why, when the original fails the checker
        structure_checks = probe.enabled
    context = _Context(
        ep=ep,
        threads=threads,
        warmup=warmup,
        runs=runs,
        duration=None if runs is not None else duration,
        metric=metric,
        verify=verify,
        structure_checks=structure_checks,
        budget=budget,
        inputs=inputs,
        labels=labels,
        bench_inputs=_rows(inputs, batch),
        verify_inputs=verify_inputs,
        reference=reference,
        verify_reference=reference_session.run(verify_inputs),
        plugin_modules=_plugin_modules(parsed),
    )
    del reference_session
    root, ends = _build_trie(parsed)
    progress = _Progress(on_progress)
    runner = _executor(executor, jobs, threads, ray_address)
    try:
        original_payload = runner.original(model, data)
        sweep = _Sweep(runner, context, progress)
        original_hash = _model_hash(data)
        stats = model_stats(model)
        original = CompareRow(
            "",
            "ok",
            size_bytes=len(data),
            nodes=stats.nodes,
            parameter_bytes=stats.parameter_bytes,
            ops=stats.ops,
            model_hash=original_hash,
            optimize_s=0.0,
        )
        _fill(original, sweep.measure_original(original_payload, original_hash), None)
        if original.status != "ok":
            raise InputError(f"the original model cannot be measured: {original.error}")
        original.speedup = 1.0
        applied = sweep.run(root, original_payload)
        rows = [_row_for(node, applied, sweep, original) for node in ends]
        higher = metric != "rel-l2"
        _rank(rows, original)
        _mark_pareto([original, *rows], higher)
        ok = [r for r in rows if r.status == "ok"]
        best = min(
            ok, key=lambda r: (r.latency_ms, -r.metric if higher else r.metric), default=None
        )
        contributions: list[dict[str, Any]] = []
        if best is not None:
            # replay the best ordering with every prefix measured
            path_root, (path_end,) = _build_trie([tuple(_pass_texts(best.pipeline))])
            for node in path_end.path():
                node.measure = True
            replayed = sweep.run(path_root, original_payload)
            contributions = _contributions(best, path_end.path(), replayed, sweep, original)
    finally:
        runner.close()
    return CompareResult(
        model=name,
        ep=ep,
        metric=metric,
        higher_is_better=higher,
        executor=executor,
        jobs=runner.jobs,
        batch=batch,
        inputs_rows=len(reference[0]),
        original=original,
        rows=sorted(rows, key=lambda r: (r.rank is None, r.rank or 0, rows.index(r))),
        best=best.pipeline if best is not None else None,
        contributions=contributions,
        pass_runs=len(root.subtree()) - 1,
        pass_runs_unshared=sum(len(p) for p in parsed),
        distinct_models=len({r.model_hash for r in ok} | {original.model_hash}),
        wall_s=time.perf_counter() - started,
    )


def _rank(rows: Sequence[CompareRow], original: CompareRow) -> None:
    """Rank ok rows by latency (identical models share a rank) and letter distinct models.

    Letters go to distinct models fastest first; a row whose model is the original's is
    labelled ``orig``.
    """
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: r.latency_ms)
    labels: dict[str | None, str] = {original.model_hash: ORIGINAL_LABEL}
    rank, last = 0, None
    for row in ok:
        if row.latency_ms != last:
            rank, last = rank + 1, row.latency_ms
        row.rank = rank
        if row.model_hash not in labels:
            labels[row.model_hash] = _letters(len(labels) - 1)
        row.model = labels[row.model_hash]
    original.model = ORIGINAL_LABEL
