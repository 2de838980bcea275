"""``onnxforge.compare`` and ``onnxforge compare``: orderings, the prefix trie, rows, executors.

The main model is a tiny CNN written as ONNX text, on which fold-constants, cleanup and fuse
each have something to do. Every row is checked against running its ordering alone with
``onnxforge.optimize``: same model bytes, nodes, size and metric.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

import onnxforge
from onnxforge.backend import Session, compare_outputs, make_inputs
from onnxforge.compare import (
    MAX_PERMUTED_PASSES,
    CompareResult,
    _build_trie,
    ablations,
    compare,
    permutations,
)
from onnxforge.errors import InputError
from onnxforge.passes import Pass, PassManager, PassResult, Semantics
from onnxforge.passes import registry as _registry

# Fast measurement settings: the tests check the table's logic, not the latencies.
FAST = {"warmup": 1, "runs": 3}
THREE = "fold-constants,cleanup,fuse"


def _array_text(name: str, array: np.ndarray) -> str:
    values = ", ".join(repr(float(v)) for v in array.reshape(-1))
    return f"float[{','.join(map(str, array.shape))}] {name} = {{{values}}}"


def tiny_cnn_text(seed: int = 0) -> str:
    """Conv + BatchNorm + Relu, pooling, an Identity, and a classifier whose weight is
    transposed at run time: fold-constants, cleanup and fuse each have work here."""
    rng = np.random.default_rng(seed)
    arrays = {
        "w": rng.standard_normal((4, 2, 3, 3)),
        "b": rng.standard_normal(4),
        "scale": rng.uniform(0.5, 2.0, 4),
        "shift": rng.standard_normal(4),
        "mean": rng.standard_normal(4),
        "var": rng.uniform(0.5, 2.0, 4),
        "wt": rng.standard_normal((5, 16)),
        "fb": rng.standard_normal(5),
    }
    weights = ", ".join(_array_text(k, v.astype(np.float32)) for k, v in arrays.items())
    return f"""
    <ir_version: 10, opset_import: ["" : 20]>
    tiny_cnn (float[N,2,6,6] x) => (float[N,5] y) <{weights}> {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        n = BatchNormalization (c, scale, shift, mean, var)
        r = Relu (n)
        p = MaxPool <kernel_shape = [3, 3], strides = [3, 3]> (r)
        i = Identity (p)
        f = Flatten (i)
        t = Transpose (wt)
        m = MatMul (f, t)
        y = Add (m, fb)
    }}
    """


def build_tiny_cnn() -> ir.Model:
    """A fresh tiny CNN."""
    return ir.from_onnx_text(tiny_cnn_text())


def tiny_inputs(rows: int = 6) -> dict[str, np.ndarray]:
    """Seeded inputs for the tiny CNN."""
    return make_inputs(build_tiny_cnn(), batch=rows, seed=3)


def model_bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def run_alone(pipeline: str) -> ir.Model:
    """The ordering run on its own, as `onnxforge optimize` runs it (no provenance added)."""
    model = build_tiny_cnn()
    result = PassManager(pipeline).run(model)
    return result.model


@pytest.fixture(scope="module")
def three() -> CompareResult:
    """Every ordering of fold-constants, cleanup and fuse on the tiny CNN, compared locally."""
    return compare(build_tiny_cnn(), permutations(THREE), inputs=tiny_inputs(), **FAST)


# --- orderings ------------------------------------------------------------------------------


def test_permutations_are_every_ordering_once_in_canonical_text() -> None:
    orderings = permutations("fold-constants,cleanup,fuse{rules=cnn,cnn}")
    assert len(orderings) == 6 == len(set(orderings))
    assert "fuse{rules=cnn},cleanup,fold-constants" in orderings
    assert all(
        sorted(o.split(",")) == ["cleanup", "fold-constants", "fuse{rules=cnn}"] for o in orderings
    )
    assert permutations("cleanup,cleanup") == ["cleanup,cleanup"]
    too_many = ",".join(["cleanup"] * (MAX_PERMUTED_PASSES + 1))
    with pytest.raises(InputError, match="orderings"):
        permutations(too_many)


def test_ablations_leave_each_pass_out_in_turn() -> None:
    assert ablations("fold-constants,cleanup,fuse") == [
        "fold-constants,cleanup,fuse",
        "cleanup,fuse",
        "fold-constants,fuse",
        "fold-constants,cleanup",
    ]
    assert ablations("cleanup,cleanup") == ["cleanup,cleanup", "cleanup"]
    with pytest.raises(InputError, match="at least two"):
        ablations("cleanup")


def test_the_trie_shares_common_prefixes() -> None:
    orderings = [tuple(o.split(",")) for o in permutations(THREE)]
    root, ends = _build_trie(orderings)
    assert len(root.subtree()) - 1 == 3 + 6 + 6  # instead of 18
    assert [end.ordering for end in ends] == [",".join(o) for o in orderings]
    assert all(end.measure and not end.children for end in ends)
    # an ordering that is a prefix of another ends at an inner node
    root, ends = _build_trie([("cleanup",), ("cleanup", "fuse")])
    assert len(root.subtree()) - 1 == 2
    assert ends[0].children == {"fuse": ends[1]}


# --- test passes, registered only while this module's tests run --------------------------------

CALLS: dict[str, int] = {}


class CountingPass(Pass):
    """Counts its runs, then does what ``act`` does: here, nothing."""

    name = "test-compare-count"
    summary = "Count runs."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        CALLS[self.name] = CALLS.get(self.name, 0) + 1
        return self.act(model)

    def act(self, model: ir.Model) -> PassResult:
        return PassResult(model, False)


class CrashPass(CountingPass):
    """Raises."""

    name = "test-compare-crash"
    summary = "Raise."

    def act(self, model: ir.Model) -> PassResult:
        raise RuntimeError("boom")


class ReluToSigmoidPass(CountingPass):
    """WRONG on purpose: claims to be exact, turns the Relu into a Sigmoid."""

    name = "test-compare-sigmoid"
    summary = "Relu to Sigmoid, claiming to be exact."

    def act(self, model: ir.Model) -> PassResult:
        (relu,) = [node for node in model.graph if node.op_type == "Relu"]
        relu.op_type = "Sigmoid"
        return PassResult(model, True)


TEST_PASSES = (CountingPass, CrashPass, ReluToSigmoidPass)


@pytest.fixture(scope="module", autouse=True)
def _test_passes():
    for cls in TEST_PASSES:
        _registry.register(cls)
    yield
    for cls in TEST_PASSES:
        _registry.unregister(cls.name)


# --- the table ----------------------------------------------------------------------------------


def test_rows_match_running_each_ordering_alone(three: CompareResult) -> None:
    assert sorted(r.pipeline for r in three.rows) == sorted(permutations(THREE))
    reference_inputs = tiny_inputs()
    reference = Session(build_tiny_cnn()).run(reference_inputs)
    for row in three.rows:
        assert row.status == "ok", row.error
        alone = run_alone(row.pipeline)
        data = model_bytes(alone)
        assert row.model_hash == hashlib.sha256(data).hexdigest(), row.pipeline
        assert row.size_bytes == len(data)
        assert row.nodes == sum(1 for _ in alone.graph.all_nodes())
        got = Session(alone).run(reference_inputs)
        assert row.metric == pytest.approx(compare_outputs(reference, got).cosine, abs=1e-12)
        assert [p["text"] for p in row.passes] == row.pipeline.split(",")
        assert row.optimize_s == pytest.approx(sum(p["wall_s"] for p in row.passes))
    # the passes did something: fuse folds BatchNormalization and makes FusedConv and Gemm
    fused = three.row(THREE)
    assert fused.nodes < three.original.nodes
    assert "BatchNormalization" not in fused.ops and "com.microsoft::FusedConv" in fused.ops


def test_latency_columns_ranks_and_pareto(three: CompareResult) -> None:
    original = three.original
    assert original.pipeline == "" and original.model == "orig" and original.speedup == 1.0
    assert original.latency_ms == original.latency["p50_ms"] and original.baseline_latency is None
    for row in three.rows:
        # timed in alternation with the original: the speedup is the ratio of those p50s
        assert row.latency["runs"] == row.baseline_latency["runs"] == FAST["runs"]
        paired = row.baseline_latency["p50_ms"] / row.latency["p50_ms"]
        assert row.speedup == pytest.approx(paired)
        assert row.latency_ms == pytest.approx(original.latency_ms / paired)
        ratio = row.latency["throughput"] / row.baseline_latency["throughput"]
        assert row.throughput == pytest.approx(original.throughput * ratio)
    # ranked by latency; identical models (same hash) share a latency, a rank and a letter
    assert [r.latency_ms for r in three.rows] == sorted(r.latency_ms for r in three.rows)
    by_hash: dict[str, set] = {}
    for row in three.rows:
        by_hash.setdefault(row.model_hash, set()).add((row.latency_ms, row.rank, row.model))
    assert all(len(figures) == 1 for figures in by_hash.values())
    assert (
        len({r.model for r in three.rows})
        == len(by_hash)
        == three.distinct_models - (original.model_hash not in by_hash)
    )
    # Pareto: recomputed here from the definition
    points = [original, *three.rows]
    for row in points:
        dominated = any(
            o.latency_ms <= row.latency_ms
            and o.metric >= row.metric
            and (o.latency_ms < row.latency_ms or o.metric > row.metric)
            for o in points
        )
        assert row.pareto is not dominated, row.pipeline
    assert three.best == three.rows[0].pipeline
    assert min(points, key=lambda r: (r.latency_ms, -r.metric)).pareto


def test_prefixes_run_once(three: CompareResult) -> None:
    assert three.pass_runs == 15 and three.pass_runs_unshared == 18
    CALLS.clear()
    result = compare(
        build_tiny_cnn(),
        [
            "test-compare-count,cleanup",
            "test-compare-count,fold-constants",
            "cleanup,test-compare-count",
        ],
        inputs=tiny_inputs(),
        **FAST,
    )
    # shared prefix once, once under cleanup, once more to replay the fastest ordering
    replayed = "test-compare-count" in result.best
    assert CALLS["test-compare-count"] == 2 + replayed
    assert result.pass_runs == 5 and result.pass_runs_unshared == 6


def test_contributions_of_the_fastest_ordering(three: CompareResult) -> None:
    best = three.row(three.best)
    steps = three.contributions
    assert [c["pass"] for c in steps] == best.pipeline.split(",")
    assert steps[-1]["model_hash"] == best.model_hash
    assert steps[-1]["latency_ms"] == best.latency_ms  # the same model, measured once
    nodes, latency = three.original.nodes, three.original.latency_ms
    for step in steps:
        assert step["delta_nodes"] == step["nodes"] - nodes
        assert step["delta_latency_ms"] == pytest.approx(step["latency_ms"] - latency)
        nodes, latency = step["nodes"], step["latency_ms"]
    assert sum(c["delta_nodes"] for c in steps) == best.nodes - three.original.nodes


def test_a_failing_ordering_is_a_row_and_the_sweep_goes_on() -> None:
    CALLS.clear()
    result = compare(
        build_tiny_cnn(),
        [
            "cleanup,test-compare-crash,fuse",
            "cleanup,test-compare-crash,fold-constants",
            "cleanup,fuse",
            "test-compare-sigmoid,cleanup",
        ],
        inputs=tiny_inputs(),
        **FAST,
    )
    rows = {r.pipeline: r for r in result.rows}
    for pipeline in (
        "cleanup,test-compare-crash,fuse",
        "cleanup,test-compare-crash,fold-constants",
    ):
        row = rows[pipeline]
        assert row.status == "failed" and row.failed_pass == "test-compare-crash"
        assert "boom" in row.error
        assert row.latency_ms is None and row.rank is None and not row.pareto
        assert [p["status"] for p in row.passes] == ["ok", "failed"]
    assert CALLS["test-compare-crash"] == 1  # the shared prefix failed once, for both rows
    wrong = rows["test-compare-sigmoid,cleanup"]
    assert wrong.status == "verify-failed" and wrong.failed_pass == "test-compare-sigmoid"
    assert "drifted" in wrong.error
    assert rows["cleanup,fuse"].status == "ok"
    assert result.rows[0].pipeline == "cleanup,fuse"  # ok rows first
    assert result.best == "cleanup,fuse"


def test_without_verification_a_wrong_pass_shows_in_the_metric() -> None:
    result = compare(
        build_tiny_cnn(),
        ["test-compare-sigmoid", "cleanup"],
        inputs=tiny_inputs(),
        verify="none",
        **FAST,
    )
    wrong, clean = result.row("test-compare-sigmoid"), result.row("cleanup")
    assert wrong.status == clean.status == "ok"
    assert clean.metric == pytest.approx(1.0, abs=1e-6)
    assert wrong.metric < 0.99


@pytest.mark.parametrize("metric", ["top1", "rel-l2", "cosine"])
def test_metrics(metric: str) -> None:
    inputs = tiny_inputs(rows=8)
    logits = Session(build_tiny_cnn()).run(inputs)[0]
    labels = np.argmax(logits, axis=1)
    labels[:2] = (labels[:2] + 1) % 5  # two wrong labels: the original's accuracy is 6/8
    result = compare(
        build_tiny_cnn(),
        ["test-compare-sigmoid"],
        inputs=inputs,
        labels=labels,
        metric=metric,
        verify="none",
        **FAST,
    )
    original, wrong = result.original, result.row("test-compare-sigmoid")
    got = Session(run_alone("test-compare-sigmoid")).run(inputs)[0]
    comparison = compare_outputs([logits], [got])
    if metric == "top1":
        assert original.metric == 0.75
        assert wrong.metric == np.mean(np.argmax(got, axis=1) == labels)
    elif metric == "rel-l2":
        assert original.metric == 0.0 and result.higher_is_better is False
        assert wrong.metric == pytest.approx(comparison.rel_l2)
    else:
        assert original.metric == pytest.approx(1.0, abs=1e-12)
        assert wrong.metric == pytest.approx(comparison.cosine)
    assert wrong.accuracy["labels_top1"] == np.mean(np.argmax(got, axis=1) == labels)
    assert result.higher_is_better is (metric != "rel-l2")


def test_bad_arguments_are_input_errors() -> None:
    model = build_tiny_cnn()
    for kwargs, match in [
        ({"executor": "dask"}, "executor"),
        ({"metric": "f1"}, "metric"),
        ({"verify": "all"}, "verify"),
        ({"inputs": {"z": np.zeros((1, 2), np.float32)}}, "inputs do not match"),
        ({"batch": 0}, "batch"),
    ]:
        with pytest.raises(InputError, match=match):
            compare(model, ["cleanup"], **kwargs)
    with pytest.raises(InputError, match="no orderings"):
        compare(model, [])
    with pytest.raises(InputError, match="unknown pass"):
        compare(model, ["cleanup,no-such-pass"])


def test_worker_processes_give_the_same_rows(three: CompareResult) -> None:
    pooled = compare(build_tiny_cnn(), permutations(THREE), inputs=tiny_inputs(), jobs=2, **FAST)
    assert pooled.executor == "local" and pooled.jobs == 2
    assert same_table(pooled) == same_table(three)


def same_table(result: CompareResult) -> list[tuple]:
    """What every executor must agree on: everything but timings."""
    return sorted(
        (r.pipeline, r.status, r.nodes, r.size_bytes, r.metric, r.model_hash, r.failed_pass)
        for r in [result.original, *result.rows]
    )


# --- Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    """One small local Ray for the module (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray", reason="the ray extra (make test installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_same_table(three: CompareResult, ray_instance) -> None:
    result = compare(
        build_tiny_cnn(), permutations(THREE), inputs=tiny_inputs(), executor="ray", **FAST
    )
    assert result.executor == "ray" and result.jobs == 2  # 2 CPUs, 1 thread per task
    assert same_table(result) == same_table(three)
    assert [c["model_hash"] for c in result.contributions][-1] == result.row(result.best).model_hash
    assert ray_instance.is_initialized()  # an instance the caller started is left running


# --- a bundled sample: its data and metric are the defaults --------------------------------


@pytest.mark.slow
def test_a_sample_spec_brings_its_data_and_metric() -> None:
    from onnxforge.samples import get_sample

    result = compare("digits-cnn", ["fold-constants,cleanup,fuse"], **FAST)
    inputs, labels = get_sample("digits-cnn").evaluation_data()
    assert result.metric == "top1" and result.inputs_rows == len(labels)
    exported = onnxforge.export("digits-cnn")
    logits = Session(exported).run(inputs)[0]
    assert result.original.metric == np.mean(np.argmax(logits, axis=1) == labels)
    row = result.row("fold-constants,cleanup,fuse")
    assert row.status == "ok" and row.nodes < result.original.nodes
    assert math.isclose(row.metric, result.original.metric, abs_tol=1 / len(labels))


# --- the command line ---------------------------------------------------------------------------


def cli(*args: object, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "onnxforge", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


JSON_COLUMNS = {
    "pipeline",
    "status",
    "latency_ms",
    "speedup",
    "throughput",
    "size_bytes",
    "nodes",
    "metric",
    "optimize_s",
    "pareto",
}


def test_cli_compare_prints_the_table_and_writes_json_and_report(tmp_path) -> None:
    model = onnxforge.save(build_tiny_cnn(), tmp_path / "tiny.onnx")
    np.savez(tmp_path / "data.npz", **tiny_inputs())
    result = cli(
        "compare", model, "--permute", "cleanup,fuse", "--data", "data.npz", "--runs", "3",
        "--json", "out.json", "--report", "out.html", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for text in ("(original)", "cleanup,fuse", "fuse,cleanup", "speedup", "pareto", "cosine"):
        assert text in result.stdout
    assert "per-pass contributions of the fastest ordering" in result.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    assert len(data["rows"]) == 2
    for row in [*data["rows"], data["original"]]:
        assert JSON_COLUMNS <= set(row)
        assert row["status"] == "ok" and row["latency_ms"] > 0
    assert data["metric"] == "cosine" and data["best"] in ("cleanup,fuse", "fuse,cleanup")
    assert data["rows"][0]["passes"][0]["text"] in ("cleanup", "fuse")
    assert (tmp_path / "out.html").read_text().startswith("<!DOCTYPE html>")


def test_cli_compare_usage_errors(tmp_path) -> None:
    model = onnxforge.save(build_tiny_cnn(), tmp_path / "tiny.onnx")
    for args in (
        [],
        ["-p", "cleanup", "--permute", "cleanup,fuse"],
        ["--permute", "cleanup,no-such-pass"],
        ["-p", "cleanup", "--executor", "spark"],
    ):
        result = cli("compare", model, *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_cli_compare_exits_1_when_every_ordering_fails(tmp_path) -> None:
    # the failing pass comes in as a plugin module, as a user's would
    (tmp_path / "crash_plugin.py").write_text(
        "from onnxforge.passes import Pass, Semantics, register\n"
        "@register\n"
        "class Crash(Pass):\n"
        "    name = 'crash-plugin'\n"
        "    summary = 'Raise.'\n"
        "    semantics = Semantics.EXACT\n"
        "    def call(self, model):\n"
        "        raise RuntimeError('kaboom')\n"
    )
    model = onnxforge.save(build_tiny_cnn(), tmp_path / "tiny.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge", "--plugin", "crash_plugin", "compare", model,
         "-p", "cleanup,crash-plugin", "--runs", "2", "--json", "out.json"],
        cwd=tmp_path, env={**os.environ, "COLUMNS": "250", "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "kaboom" in result.stdout
    assert "every one of the 1 orderings failed" in result.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["rows"][0]["status"] == "failed" and data["best"] is None


def test_cli_compare_help_lists_its_options(tmp_path) -> None:
    result = cli("compare", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in (
        "--pipeline", "--permute", "--ablate", "--ep", "--metric", "--data", "--batch",
        "--threads", "--runs", "--duration", "--verify", "--budget", "--executor", "--jobs",
        "--ray-address", "--json", "--report",
    ):  # fmt: skip
        assert option in result.stdout, option
    result = cli("optimize", "--help", cwd=tmp_path)
    assert "--bisect" in result.stdout and "--bisect-tolerance" in result.stdout
