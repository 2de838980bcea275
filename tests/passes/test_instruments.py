"""The shipped instruments: Timing, Ledger, VerifyStructure, VerifyNumerics, Bisect,
CrashReproducer, PrintIR, and bisect_pipeline."""

from __future__ import annotations

import logging
import math
import resource
import time

import numpy as np
import onnx_ir as ir
import pytest

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import InputError, PassError, VerificationError
from onnxforge.passes import (
    DEFAULT_TOLERANCES,
    Bisect,
    CrashReproducer,
    Instrument,
    Ledger,
    Pass,
    PassManager,
    PassResult,
    PrintIR,
    Semantics,
    Timing,
    VerifyNumerics,
    VerifyStructure,
    bisect_pipeline,
    get_pass,
    register,
)

from .conftest import (
    IDENTITY_RELU,
    SCALED_RELU,
    CrashError,
    PerturbPass,
    as_text,
    build,
    inputs_for,
    op_counts,
    run,
)

# ---------------------------------------------------------------------------------------------
# Test passes used only here

DEFAULT_SLEEP_S = 0.0


@register
class SleepPass(Pass):
    """Sleeps, changes nothing."""

    name = "test-sleep"
    summary = "Sleep for a while."
    semantics = Semantics.EXACT

    def __init__(self, *, seconds: float = DEFAULT_SLEEP_S) -> None:
        self.seconds = seconds

    def call(self, model: ir.Model) -> PassResult:
        time.sleep(self.seconds)
        return PassResult(model, False)


@register
class DropIdentityBrokenPass(Pass):
    """BROKEN on purpose: removes Identity nodes without rewiring their consumers."""

    name = "test-drop-identity-broken"
    summary = "Remove Identity nodes and leave their consumers dangling."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        identities = [node for node in model.graph if node.op_type == "Identity"]
        for node in identities:
            model.graph.remove(node)
        return PassResult(model, bool(identities))


@register
class WrongOutputTypePass(Pass):
    """BROKEN on purpose: declares the float graph outputs as int64."""

    name = "test-wrong-output-type"
    summary = "Declare every graph output as int64."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        for output in model.graph.outputs:
            output.dtype = ir.DataType.INT64
        return PassResult(model, True)


@register
class PoisonPass(Pass):
    """Sets every float initializer to NaN; lossy, so only the NaN check can catch it."""

    name = "test-poison"
    summary = "Fill float initializers with NaN."
    semantics = Semantics.LOSSY

    def call(self, model: ir.Model) -> PassResult:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            value.const_value = ir.tensor(np.full_like(array, np.nan), name=value.name)
        return PassResult(model, bool(model.graph.initializers))


@register
class UnknownOpPass(Pass):
    """BROKEN on purpose: moves Relu to a domain no runtime knows (the model no longer runs)."""

    name = "test-unknown-op"
    summary = "Turn Relu into an op of an unknown domain."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in model.graph:
            if node.op_type == "Relu":
                node.domain = "com.example.unknown"
                modified = True
        model.opset_imports["com.example.unknown"] = 1
        return PassResult(model, modified)


def _perturb_class(semantics: Semantics) -> type[PerturbPass]:
    """A registered copy of ``test-perturb`` declared with other semantics."""
    cls = type(
        f"Perturb{semantics.name.title()}Pass",
        (PerturbPass,),
        {"name": f"test-perturb-{semantics.value}", "semantics": semantics, "__module__": __name__},
    )
    return register(cls)


PERTURB_BY_SEMANTICS = {s: _perturb_class(s) for s in Semantics if s is not Semantics.LOSSY}


def numeric_verifier(model: ir.Model, **kwargs) -> VerifyNumerics:
    """VerifyNumerics with ONNX Runtime and compare_outputs, on seeded inputs for ``model``."""
    return VerifyNumerics(Session.runner(), inputs_for(model), compare_outputs, **kwargs)


def relative_l2(ref: np.ndarray, got: np.ndarray) -> float:
    """||got - ref|| / ||ref||, in float64, computed here independently of compare_outputs."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(got64 - ref64) / np.linalg.norm(ref64))


def scaled_relu_weights() -> np.ndarray:
    """The weight ``w`` of the SCALED_RELU model, read from the model the tests build."""
    return build(SCALED_RELU).graph.initializers["w"].const_value.numpy()


def max_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# Timing


def test_timing_fills_wall_time_and_peak_rss(identity_relu) -> None:
    sleep_s = 0.05
    rss_before = max_rss_bytes()
    start = time.perf_counter()
    result = PassManager(f"test-sleep{{seconds={sleep_s}}},cleanup", [Timing()]).run(identity_relu)
    total = time.perf_counter() - start
    rss_after = max_rss_bytes()
    slept, cleaned = result.records
    assert sleep_s <= slept.wall_s <= total
    assert 0.0 < cleaned.wall_s <= total - slept.wall_s
    for record in result.records:
        assert rss_before <= record.peak_rss_bytes <= rss_after
    assert slept.peak_rss_bytes <= cleaned.peak_rss_bytes  # a peak never goes down


def test_timing_last_wraps_the_pass_alone(identity_relu) -> None:
    hook_s = 0.1

    class SlowHooks(Instrument):
        def before_pass(self, record, model):
            time.sleep(hook_s)

        def after_pass(self, record, model):
            time.sleep(hook_s)

    tight = PassManager("test-noop", [SlowHooks(), Timing()]).run(identity_relu)
    loose = PassManager("test-noop", [Timing(), SlowHooks()]).run(identity_relu)
    assert tight.records[0].wall_s < hook_s
    assert loose.records[0].wall_s >= 2 * hook_s


def test_timing_on_a_failing_pass(identity_relu) -> None:
    with pytest.raises(PassError) as info:
        PassManager("test-crash", [Timing()]).run(identity_relu)
    record = info.value.records[0]
    assert record.wall_s is not None and record.wall_s >= 0.0
    assert record.peak_rss_bytes > 0


def test_no_timing_without_the_instrument(identity_relu) -> None:
    record = PassManager("cleanup").run(identity_relu).records[0]
    assert record.wall_s is None and record.peak_rss_bytes is None


# ---------------------------------------------------------------------------------------------
# Ledger

LEDGER_TENSORS = {
    "w": np.array([0.5, -1.0, 2.0, 4.0], dtype=np.float32),
    "w_copy": np.array([0.5, -1.0, 2.0, 4.0], dtype=np.float32),  # duplicate of w
    "dead": np.arange(6, dtype=np.float32).reshape(2, 3),  # used by nothing
    "dead_index": np.array([0, 1], dtype=np.int64),  # used by nothing
}
LEDGER_CONSTANT = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
_TEXT_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.int64): "int64"}


def _tensor_text(array: np.ndarray, name: str | None = None) -> str:
    """ONNX text of a tensor literal: ``float[2] {1.0, 2.0}``, or ``float[2] k = {...}``."""
    dims = ",".join(str(d) for d in array.shape)
    values = ", ".join(repr(v.item()) for v in array.ravel())
    head = f"{_TEXT_DTYPES[array.dtype]}[{dims}]" + (f" {name} =" if name else "")
    return f"{head} {{{values}}}"


def ledger_model() -> ir.Model:
    """Identity, duplicate and dead initializers for cleanup; a Relu pair for collapse-relu."""
    initializers = ", ".join(_tensor_text(array, name) for name, array in LEDGER_TENSORS.items())
    constant = _tensor_text(LEDGER_CONSTANT)
    return build(
        f"""
        g (float[N,4] x) => (float[N,4] y) <{initializers}> {{
            a = Identity(x)
            c = Constant<value = {constant}>()
            m = Mul(a, w)
            n = Add(m, w_copy)
            p = Add(n, c)
            r = Relu(p)
            y = Relu(r)
        }}
        """
    )


def test_ledger_counts_nodes_ops_parameters_and_bytes() -> None:
    model = ledger_model()
    ops_before = op_counts(model)
    result = PassManager("cleanup,test-noop,collapse-relu", [Ledger()]).run(model)
    cleanup, noop, collapse = result.records

    # What cleanup must leave: the Identity gone, the Constant an initializer, w_copy merged
    # into w, both dead tensors gone.
    all_tensors = [*LEDGER_TENSORS.values(), LEDGER_CONSTANT]
    kept_tensors = [LEDGER_TENSORS["w"], LEDGER_CONSTANT]
    removed = {"Identity": -ops_before["Identity"], "Constant": -ops_before["Constant"]}
    assert cleanup.nodes_before == sum(ops_before.values())
    assert cleanup.nodes_after == cleanup.nodes_before + sum(removed.values())
    assert cleanup.ops_delta == removed
    assert cleanup.parameters_before == sum(t.size for t in all_tensors)
    assert cleanup.parameters_after == sum(t.size for t in kept_tensors)
    assert cleanup.parameter_bytes_before == sum(t.nbytes for t in all_tensors)
    assert cleanup.parameter_bytes_after == sum(t.nbytes for t in kept_tensors)

    # test-noop changes nothing
    assert noop.nodes_before == noop.nodes_after == cleanup.nodes_after
    assert noop.ops_delta == {}
    assert noop.parameters_before == noop.parameters_after == cleanup.parameters_after
    assert noop.parameter_bytes_before == noop.parameter_bytes_after

    # collapse-relu merges the two Relus into one
    assert collapse.nodes_before == noop.nodes_after
    assert collapse.nodes_after == collapse.nodes_before - 1
    assert collapse.ops_delta == {"Relu": -1}
    assert collapse.parameters_after == collapse.parameters_before

    final = op_counts(result.model)
    assert collapse.nodes_after == sum(final.values())


def test_ledger_counts_subgraph_nodes_and_initializers() -> None:
    branch_weight = np.array([1.0, 2.0], dtype=np.float32)
    model = build(
        f"""
        g (bool c, float[2] x) => (float[2] y) {{
            i = Identity(x)
            y = If(c) <
                then_branch = t () => (float[2] ty) <{_tensor_text(branch_weight, "k")}> {{
                    ty = Add(i, k)
                }},
                else_branch = e () => (float[2] ey) {{
                    n = Neg(i)
                    ey = Relu(n)
                }}
            >
        }}
        """
    )
    result = PassManager("cleanup", [Ledger()]).run(model)
    (record,) = result.records
    # If, Identity, Add, Neg, Relu: five nodes across three graphs
    assert record.nodes_before == 5
    assert record.nodes_after == 4
    assert record.ops_delta == {"Identity": -1}
    assert record.parameters_before == record.parameters_after == branch_weight.size
    assert record.parameter_bytes_after == branch_weight.nbytes


# ---------------------------------------------------------------------------------------------
# VerifyStructure


def test_verify_structure_accepts_valid_passes(scaled_relu) -> None:
    result = PassManager("cleanup,collapse-relu", [VerifyStructure()]).run(scaled_relu)
    assert [r.status for r in result.records] == ["ok", "ok"]


@pytest.mark.parametrize(
    ("broken", "detail"),
    [
        ("test-drop-identity-broken", "topologically sorted"),
        ("test-wrong-output-type", "elem type"),
    ],
)
def test_verify_structure_names_a_broken_pass(identity_relu, broken: str, detail: str) -> None:
    pipeline = f"test-noop,{broken},cleanup"
    with pytest.raises(VerificationError) as info:
        PassManager(pipeline, [VerifyStructure()]).run(identity_relu)
    error = info.value
    assert error.pass_name == broken
    assert error.index == 1
    assert f"pass #1 '{broken}'" in str(error)
    assert "not a valid ONNX model" in str(error)
    assert detail in str(error)
    assert "bug in the pass" in error.hint
    assert [r.status for r in error.records] == ["ok", "failed"]


def test_verify_structure_is_off_for_an_input_that_already_fails(caplog) -> None:
    # the declared output type disagrees with Relu's: the input itself fails the checker
    model = build("g (float[N,4] x) => (int64[N,4] y) { a = Identity(x)\n y = Relu(a) }")
    with caplog.at_level(logging.WARNING):
        result = PassManager("test-drop-identity-broken", [VerifyStructure()]).run(model)
    assert result.records[0].status == "ok"
    assert any("structure checks are off" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# VerifyNumerics


def test_verify_numerics_accepts_exact_passes(scaled_relu) -> None:
    result = PassManager("cleanup,test-noop,collapse-relu", [numeric_verifier(scaled_relu)]).run(
        scaled_relu
    )
    assert [r.status for r in result.records] == ["ok", "ok", "ok"]
    for record in (result.records[0], result.records[2]):
        assert record.drift["rel_l2"] == 0.0 and record.drift["max_abs"] == 0.0
        assert record.total_drift["rel_l2"] == 0.0
        assert record.drift["finite"] is True
    assert result.records[1].drift is None  # unmodified: nothing to compare


def test_verify_numerics_catches_a_wrong_exact_pass(scaled_relu) -> None:
    inputs = inputs_for(scaled_relu)
    expected_ref = np.maximum(inputs["x"] * scaled_relu_weights(), 0)
    sigmoid = 1 / (1 + np.exp(-(inputs["x"] * scaled_relu_weights()).astype(np.float64)))
    expected_got = 1 / (1 + np.exp(-sigmoid))
    verifier = VerifyNumerics(Session.runner(), inputs, compare_outputs)

    pipeline = "cleanup,test-relu-to-sigmoid,collapse-relu"
    with pytest.raises(VerificationError) as info:
        PassManager(pipeline, [verifier]).run(scaled_relu)
    error = info.value
    assert error.pass_name == "test-relu-to-sigmoid"
    assert error.index == 1
    assert "pass #1 'test-relu-to-sigmoid'" in str(error)
    assert "'exact'" in str(error)
    assert f"{DEFAULT_TOLERANCES[Semantics.EXACT]:g}" in str(error)
    assert error.exit_code == 1
    assert [r.status for r in error.records] == ["ok", "failed"]  # collapse-relu never ran
    drift = error.records[1].drift
    assert drift["rel_l2"] == pytest.approx(relative_l2(expected_ref, expected_got), rel=1e-4)


def test_verify_numerics_catches_scaled_weights(scaled_relu) -> None:
    factor = 3.0
    with pytest.raises(VerificationError) as info:
        PassManager(
            f"cleanup,test-scale-initializers{{factor={factor}}}", [numeric_verifier(scaled_relu)]
        ).run(scaled_relu)
    assert info.value.pass_name == f"test-scale-initializers{{factor={factor}}}"
    assert info.value.index == 1
    # Relu(f*z) = f*Relu(z) for f > 0, so the outputs move by exactly (f - 1) relative to themselves
    assert info.value.records[1].drift["rel_l2"] == pytest.approx(factor - 1, rel=1e-6)


def test_tolerances_can_be_overridden(scaled_relu) -> None:
    verifier = numeric_verifier(scaled_relu, tolerances={Semantics.EXACT: 2.5})
    result = PassManager("test-scale-initializers{factor=3.0}", [verifier]).run(scaled_relu)
    assert result.records[0].status == "ok"
    assert result.records[0].drift["rel_l2"] == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("semantics", sorted(PERTURB_BY_SEMANTICS, key=str))
def test_tolerance_follows_semantics(semantics: Semantics) -> None:
    tolerance = DEFAULT_TOLERANCES[semantics]
    name = PERTURB_BY_SEMANTICS[semantics].name
    within = build(SCALED_RELU)
    result = PassManager(f"{name}{{scale={tolerance / 2}}}", [numeric_verifier(within)]).run(within)
    assert result.records[0].drift["rel_l2"] <= tolerance
    beyond = build(SCALED_RELU)
    with pytest.raises(VerificationError) as info:
        PassManager(f"{name}{{scale={tolerance * 2}}}", [numeric_verifier(beyond)]).run(beyond)
    assert f"'{semantics}'" in str(info.value)
    assert f"{tolerance:g}" in str(info.value)


def test_lossy_pass_within_budget(scaled_relu) -> None:
    scale, budget = 0.01, 0.05
    result = PassManager(
        f"test-perturb{{scale={scale}}}", [numeric_verifier(scaled_relu, budget=budget)]
    ).run(scaled_relu)
    (record,) = result.records
    assert record.status == "ok"
    assert record.semantics is Semantics.LOSSY
    assert record.total_drift["rel_l2"] == pytest.approx(scale, rel=1e-3)


def test_lossy_passes_over_budget_are_held_to_the_total(scaled_relu) -> None:
    # each pass moves the outputs by 1%; the budget allows 1.5% in total: the second pass fails
    scale, budget = 0.01, 0.015
    pipeline = f"test-perturb{{scale={scale}}},test-perturb{{scale={scale}}}"
    with pytest.raises(VerificationError) as info:
        PassManager(pipeline, [numeric_verifier(scaled_relu, budget=budget)]).run(scaled_relu)
    error = info.value
    assert error.index == 1
    assert "over the accuracy budget" in str(error)
    assert f"{budget:g}" in str(error)
    first, second = error.records
    assert first.status == "ok"
    assert first.total_drift["rel_l2"] == pytest.approx(scale, rel=1e-3)
    assert second.drift["rel_l2"] == pytest.approx(scale, rel=1e-3)
    assert second.total_drift["rel_l2"] == pytest.approx((1 + scale) ** 2 - 1, rel=1e-3)


def test_lossy_pass_without_budget_is_reported_not_failed(scaled_relu) -> None:
    result = PassManager("test-perturb{scale=10.0}", [numeric_verifier(scaled_relu)]).run(
        scaled_relu
    )
    assert result.records[0].status == "ok"
    assert result.records[0].total_drift["rel_l2"] == pytest.approx(10.0, rel=1e-4)


def test_nan_outputs_are_caught_even_for_lossy_passes(scaled_relu) -> None:
    with pytest.raises(VerificationError) as info:
        PassManager("cleanup,test-poison", [numeric_verifier(scaled_relu, budget=math.inf)]).run(
            scaled_relu
        )
    assert info.value.pass_name == "test-poison"
    assert info.value.index == 1
    assert "NaN or infinite" in str(info.value)
    assert info.value.records[1].drift["finite"] is False


def test_a_model_that_no_longer_runs_names_the_pass(identity_relu) -> None:
    with pytest.raises(VerificationError) as info:
        PassManager("cleanup,test-unknown-op", [numeric_verifier(identity_relu)]).run(identity_relu)
    assert info.value.index == 1
    assert "no longer runs" in str(info.value)


def test_an_input_model_that_does_not_run_is_an_input_error() -> None:
    model = build(IDENTITY_RELU)
    get_pass("test-unknown-op")()(model)
    verifier = VerifyNumerics(Session.runner(), {"x": np.ones((1, 4), np.float32)}, compare_outputs)
    with pytest.raises(InputError, match="input model does not run"):
        PassManager("cleanup", [verifier]).run(model)


def test_verify_numerics_runs_the_model_only_after_changes(scaled_relu) -> None:
    calls = []
    runner = Session.runner()

    def counting_runner(model, inputs):
        calls.append(op_counts(model))
        return runner(model, inputs)

    verifier = VerifyNumerics(counting_runner, inputs_for(scaled_relu), compare_outputs)
    result = PassManager("test-noop,cleanup,cleanup,collapse-relu,test-noop", [verifier]).run(
        scaled_relu
    )
    modified = sum(bool(r.modified) for r in result.records)
    assert modified == 2
    assert len(calls) == 1 + modified  # the reference run, then one per changing pass


def test_optimize_verify_numeric_names_the_wrong_pass(scaled_relu) -> None:
    with pytest.raises(onnxforge.VerificationError) as info:
        onnxforge.optimize(
            scaled_relu, "cleanup,test-relu-to-sigmoid,collapse-relu", verify="numeric"
        )
    error = info.value
    assert isinstance(error, onnxforge.PassError)
    assert error.pass_name == "test-relu-to-sigmoid"
    assert error.index == 1
    assert "pass #1 'test-relu-to-sigmoid'" in str(error)
    assert "relative L2" in str(error)
    assert [r.status for r in error.records] == ["ok", "failed"]
    assert error.exit_code == onnxforge.errors.EXIT_VERIFICATION_FAILED


def test_optimize_verify_numeric_accepts_a_correct_pipeline(scaled_relu) -> None:
    inputs = inputs_for(scaled_relu)
    reference = run(scaled_relu, inputs)
    result = onnxforge.optimize(scaled_relu, "cleanup,collapse-relu", verify="numeric")
    assert [r.status for r in result.records] == ["ok", "ok"]
    assert [r.modified for r in result.records] == [True, True]
    np.testing.assert_array_equal(run(result.model, inputs)[0], reference[0])
    assert result.model.metadata_props["onnxforge.pipeline"] == "cleanup,collapse-relu"


# ---------------------------------------------------------------------------------------------
# Bisect and bisect_pipeline


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 5])
def test_bisect_limit_skips_later_passes(limit: int) -> None:
    model = build(SCALED_RELU)
    pipeline = ["cleanup", "test-noop", "collapse-relu"]
    result = PassManager(",".join(pipeline), [Bisect(limit)]).run(model)
    expected = ["ok" if i < limit else "skipped" for i in range(len(pipeline))]
    assert [r.status for r in result.records] == expected
    ops = op_counts(result.model)
    assert ops["Identity"] == (0 if limit >= 1 else 1)
    assert ops["Relu"] == (1 if limit >= 3 else 2)


def bisect(model: ir.Model, pipeline: str, **kwargs):
    return bisect_pipeline(
        model,
        pipeline,
        runner=Session.runner(),
        compare=compare_outputs,
        inputs=inputs_for(model),
        **kwargs,
    )


@pytest.mark.parametrize(
    "pipeline",
    [
        "cleanup,test-noop,test-relu-to-sigmoid,collapse-relu,test-noop",
        "cleanup,collapse-relu,test-noop,test-noop,test-relu-to-sigmoid",
        "test-relu-to-sigmoid,cleanup,collapse-relu",
        "cleanup,test-scale-initializers{factor=1.5},test-noop",
    ],
)
def test_bisect_pipeline_finds_the_wrong_pass(scaled_relu, pipeline: str) -> None:
    passes = pipeline.split(",")
    culprit = next(i for i, p in enumerate(passes) if p.startswith(("test-relu", "test-scale")))
    before = as_text(scaled_relu)
    probes = []
    result = bisect(scaled_relu, pipeline, on_probe=probes.append)
    assert result.found
    assert result.index == culprit
    assert result.pass_text == passes[culprit]
    assert result.drift["rel_l2"] > 1e-4
    assert result.probes == len(probes)
    assert result.probes <= 1 + math.ceil(math.log2(len(passes)))
    assert as_text(scaled_relu) == before  # the input model is left alone


def test_bisect_pipeline_clean(scaled_relu) -> None:
    result = bisect(scaled_relu, "cleanup,test-noop,collapse-relu,cleanup")
    assert not result.found
    assert result.index is None and result.pass_text is None and result.drift is None
    assert result.probes == 1


def test_bisect_pipeline_finds_where_small_drifts_add_up(scaled_relu) -> None:
    # each pass stays within the tolerance; their product crosses it at the first k with
    # (1 + scale)**k - 1 > tolerance
    scale, tolerance, count = 4e-3, 1e-2, 5
    pipeline = ",".join([f"test-perturb{{scale={scale}}}"] * count)
    expected = next(k for k in range(1, count + 1) if (1 + scale) ** k - 1 > tolerance) - 1
    result = bisect(scaled_relu, pipeline, tolerance=tolerance)
    assert result.index == expected
    assert result.pass_text == f"test-perturb{{scale={scale}}}"


def test_bisect_pipeline_finds_a_crashing_pass(scaled_relu) -> None:
    result = bisect(scaled_relu, "cleanup,test-noop,test-crash,collapse-relu")
    assert result.index == 2
    assert "boom" in result.drift["error"]


# ---------------------------------------------------------------------------------------------
# CrashReproducer


def test_crash_reproducer_saves_the_model_before_a_crashing_pass(tmp_path) -> None:
    model = build(SCALED_RELU)
    folder = tmp_path / "repro"
    with pytest.raises(PassError) as info:
        PassManager("cleanup,test-crash,test-noop", [CrashReproducer(folder)]).run(model)
    record = info.value.records[1]
    assert record.reproducer is not None
    assert (folder / record.reproducer.rsplit("/", 1)[-1]).is_file()
    assert record.reproducer in info.value.hint
    assert "onnxforge optimize" in info.value.hint

    saved = onnxforge.load(record.reproducer)
    assert saved.metadata_props["onnxforge.reproduce"] == "test-crash"
    ops = op_counts(saved)
    assert ops["Identity"] == 0  # cleanup, before the failing pass, is in it
    assert ops["Relu"] == 2 and ops["Neg"] == 0  # the crashing pass's edit is not
    # the saved model reproduces the failure on its own
    with pytest.raises(CrashError):
        get_pass("test-crash")()(saved)


def test_crash_reproducer_that_cannot_write_keeps_the_pass_error(tmp_path, caplog) -> None:
    blocker = tmp_path / "repro"
    blocker.mkdir()
    (blocker / "reproducer-01-test-crash.onnx").mkdir()  # a folder where the file should go
    with pytest.raises(PassError) as info:
        PassManager("cleanup,test-crash", [CrashReproducer(blocker)]).run(build(SCALED_RELU))
    assert isinstance(info.value.__cause__, CrashError)
    assert info.value.records[1].reproducer is None
    assert "could not save the model before failing pass test-crash" in caplog.text
    assert sorted(p.name for p in blocker.iterdir()) == ["reproducer-01-test-crash.onnx"]


def test_crash_reproducer_saves_the_model_before_a_verification_failure(tmp_path) -> None:
    model = build(SCALED_RELU)
    inputs = inputs_for(model)
    reproducer = CrashReproducer(tmp_path)
    verifier = VerifyNumerics(Session.runner(), inputs, compare_outputs)
    pipeline = "cleanup,test-relu-to-sigmoid,collapse-relu"
    with pytest.raises(VerificationError) as info:
        PassManager(pipeline, [reproducer, verifier]).run(model)
    record = info.value.records[1]
    saved = onnxforge.load(record.reproducer)
    assert saved.metadata_props["onnxforge.reproduce"] == "test-relu-to-sigmoid"
    assert op_counts(saved) == {"Mul": 1, "Relu": 2}
    assert record.reproducer in info.value.hint
    # the saved model is the pre-pass model: it computes what the input computed
    np.testing.assert_array_equal(run(saved, inputs)[0], run(build(SCALED_RELU), inputs)[0])


def test_crash_reproducer_placed_after_the_verifier(tmp_path) -> None:
    # after_pass hooks run in reverse order: here CrashReproducer's runs before the verifier fails
    # the pass, and it must still have the snapshot when after_pass_failed comes
    model = build(SCALED_RELU)
    verifier = numeric_verifier(model)
    with pytest.raises(VerificationError) as info:
        PassManager("cleanup,test-relu-to-sigmoid", [verifier, CrashReproducer(tmp_path)]).run(
            model
        )
    record = info.value.records[1]
    assert record.reproducer is not None
    saved = onnxforge.load(record.reproducer)
    assert saved.metadata_props["onnxforge.reproduce"] == "test-relu-to-sigmoid"
    assert op_counts(saved) == {"Mul": 1, "Relu": 2}


def test_optimize_writes_a_reproducer_for_a_verification_failure(tmp_path) -> None:
    model = build(SCALED_RELU)
    with pytest.raises(VerificationError) as info:
        onnxforge.optimize(
            model, "cleanup,test-relu-to-sigmoid", verify="numeric", reproducer_dir=tmp_path
        )
    record = info.value.records[1]
    assert record.reproducer is not None
    saved = onnxforge.load(record.reproducer)
    assert saved.metadata_props["onnxforge.reproduce"] == "test-relu-to-sigmoid"
    assert op_counts(saved)["Relu"] == 2


def test_optimize_writes_a_reproducer_for_a_crash(tmp_path) -> None:
    model = build(SCALED_RELU)
    with pytest.raises(PassError) as info:
        onnxforge.optimize(model, "cleanup,test-crash", verify="numeric", reproducer_dir=tmp_path)
    saved = onnxforge.load(info.value.records[1].reproducer)
    assert saved.metadata_props["onnxforge.reproduce"] == "test-crash"
    assert op_counts(saved) == {"Mul": 1, "Relu": 2}


def test_crash_reproducer_writes_nothing_when_all_passes_succeed(tmp_path) -> None:
    folder = tmp_path / "repro"
    result = PassManager("cleanup,collapse-relu", [CrashReproducer(folder)]).run(build(SCALED_RELU))
    assert all(r.reproducer is None for r in result.records)
    assert not folder.exists() or not any(folder.iterdir())


# ---------------------------------------------------------------------------------------------
# PrintIR


def test_print_ir_before_every_pass(identity_relu) -> None:
    sink: list[str] = []
    PassManager("cleanup,test-noop", [PrintIR("before", sink=sink.append)]).run(identity_relu)
    assert len(sink) == 2
    assert "IR before pass #0 cleanup" in sink[0]
    assert "= Identity (" in sink[0]  # printed before cleanup removed it
    assert "IR before pass #1 test-noop" in sink[1]
    assert "= Identity (" not in sink[1]


def test_print_ir_after_every_pass(identity_relu) -> None:
    sink: list[str] = []
    PassManager("test-noop,cleanup", [PrintIR("after", sink=sink.append)]).run(identity_relu)
    assert len(sink) == 2
    assert "IR after pass #0 test-noop" in sink[0] and "= Identity (" in sink[0]
    assert "IR after pass #1 cleanup" in sink[1] and "= Identity (" not in sink[1]


def test_print_ir_after_change_prints_only_changing_passes() -> None:
    model = build(SCALED_RELU)
    sink: list[str] = []
    pipeline = "test-noop,cleanup,test-noop,cleanup,collapse-relu,collapse-relu"
    result = PassManager(pipeline, [PrintIR("after-change", sink=sink.append)]).run(model)
    changed = [r for r in result.records if r.modified]
    assert [r.index for r in changed] == [1, 4]
    assert len(sink) == len(changed)
    for text, record in zip(sink, changed, strict=True):
        assert f"IR after pass #{record.index} {record.text}" in text
    assert sink[1].count("= Relu (") == 1


def test_print_ir_after_change_is_the_default_and_logs(identity_relu, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="onnxforge.passes.instruments"):
        PassManager("test-noop,cleanup", [PrintIR()]).run(identity_relu)
    printed = [r.getMessage() for r in caplog.records if "IR after pass" in r.getMessage()]
    assert len(printed) == 1 and "#1 cleanup" in printed[0]


def test_print_ir_only_for_selected_passes(identity_relu) -> None:
    sink: list[str] = []
    printer = PrintIR("after", passes=["cleanup"], sink=sink.append)
    PassManager("test-noop,cleanup,test-noop,cleanup", [printer]).run(identity_relu)
    assert len(sink) == 2
    assert "#1 cleanup" in sink[0] and "#3 cleanup" in sink[1]


def test_print_ir_leaves_out_initializer_values() -> None:
    sink: list[str] = []
    model = build(SCALED_RELU)
    PassManager("test-noop", [PrintIR("after", sink=sink.append)]).run(model)
    assert "-1.5" not in sink[0]
    assert "-1.5" in as_text(model)
