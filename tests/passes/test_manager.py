"""PassManager: one record per pass, instrument hooks in order, failures as PassError."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import InputError, PassError, VerificationError
from onnxforge.passes import (
    FunctionalPass,
    Instrument,
    Ledger,
    PassManager,
    PassResult,
    PipelineResult,
    Semantics,
    Timing,
    VerifyNumerics,
    VerifyStructure,
    register,
)

from .conftest import CrashError, as_text, inputs_for, op_counts


class HookLog(Instrument):
    """Appends (instrument, hook, pass index) to a shared list for every hook call."""

    def __init__(self, label: str, log: list, *, skip: set[int] = frozenset()) -> None:
        self.label, self.log, self.skip = label, log, skip

    def before_pipeline(self, model, passes):
        self.log.append((self.label, "before_pipeline", len(passes)))

    def should_run(self, record, model):
        self.log.append((self.label, "should_run", record.index))
        return record.index not in self.skip

    def before_pass(self, record, model):
        self.log.append((self.label, "before_pass", record.index))

    def after_pass(self, record, model):
        self.log.append((self.label, "after_pass", record.index))

    def after_pass_failed(self, record, model, error):
        self.log.append((self.label, "after_pass_failed", record.index))

    def after_pipeline(self, result):
        self.log.append((self.label, "after_pipeline", len(result.records)))


class RaiseAfter(Instrument):
    """Raises ``error`` from ``after_pass`` of pass ``index``."""

    def __init__(self, index: int, error: Exception) -> None:
        self.index, self.error = index, error

    def after_pass(self, record, model):
        if record.index == self.index:
            raise self.error


@register
class NegateReluFunctionalPass(FunctionalPass):
    """WRONG on purpose, but functional: returns a copy in which Relu became Neg."""

    name = "test-functional-neg"
    summary = "Return a copy of the model with Relu turned into Neg."
    semantics = Semantics.APPROXIMATE

    def call(self, model: ir.Model) -> PassResult:
        copy = model.clone()
        modified = False
        for node in copy.graph:
            if node.op_type == "Relu":
                node.op_type = "Neg"
                modified = True
        return PassResult(copy, modified)


# ---------------------------------------------------------------------------------------------
# Records


def test_one_record_per_pass_with_honest_modified(identity_relu) -> None:
    result = PassManager("test-noop,cleanup,cleanup,test-noop").run(identity_relu)
    assert isinstance(result, PipelineResult)
    assert result.model is identity_relu  # in-place passes hand the same model on
    assert [r.index for r in result.records] == [0, 1, 2, 3]
    assert [r.name for r in result.records] == ["test-noop", "cleanup", "cleanup", "test-noop"]
    assert [r.status for r in result.records] == ["ok"] * 4
    # only the first cleanup has something to do
    assert [r.modified for r in result.records] == [False, True, False, False]
    assert all(r.semantics is Semantics.EXACT for r in result.records)
    assert all(r.error is None for r in result.records)
    assert op_counts(result.model)["Identity"] == 0


def test_modified_matches_what_each_pass_did(scaled_relu) -> None:
    texts = [as_text(scaled_relu)]

    class Snapshot(Instrument):
        def after_pass(self, record, model):
            texts.append(as_text(model))

    pipeline = "test-noop,cleanup,collapse-relu,cleanup,collapse-relu"
    result = PassManager(pipeline, [Snapshot()]).run(scaled_relu)
    changed = [before != after for before, after in zip(texts, texts[1:], strict=False)]
    assert len(changed) == len(result.records)
    assert [r.modified for r in result.records] == changed
    assert any(changed) and not all(changed)


def test_record_text_is_the_canonical_pass_text(identity_relu) -> None:
    manager = PassManager("cleanup{deduplicate=no},test-scale-initializers{factor=1.0}")
    assert manager.pipeline == "cleanup{deduplicate=false},test-scale-initializers{factor=1.0}"
    result = manager.run(identity_relu)
    assert [r.text for r in result.records] == [
        "cleanup{deduplicate=false}",
        "test-scale-initializers{factor=1.0}",
    ]
    assert result.pipeline == manager.pipeline


def test_skipped_pass_does_not_run(identity_relu) -> None:
    log: list = []
    result = PassManager("test-noop,cleanup,test-noop", [HookLog("a", log, skip={1})]).run(
        identity_relu
    )
    assert [r.status for r in result.records] == ["ok", "skipped", "ok"]
    assert result.records[1].modified is None
    assert op_counts(result.model)["Identity"] == 1  # cleanup never ran
    assert ("a", "before_pass", 1) not in log
    assert ("a", "after_pass", 1) not in log


def test_any_instrument_can_skip(identity_relu) -> None:
    log: list = []
    instruments = [HookLog("a", log), HookLog("b", log, skip={0})]
    result = PassManager("cleanup", instruments).run(identity_relu)
    assert result.records[0].status == "skipped"
    assert op_counts(result.model)["Identity"] == 1


def test_functional_pass_result_is_handed_on(identity_relu) -> None:
    original = as_text(identity_relu)
    result = PassManager("test-functional-neg,cleanup").run(identity_relu)
    assert as_text(identity_relu) == original  # the functional pass left its input alone
    assert result.model is not identity_relu
    assert op_counts(result.model) == {"Neg": 1}  # and cleanup ran on the functional result
    assert [r.modified for r in result.records] == [True, True]


# ---------------------------------------------------------------------------------------------
# Instrument hooks


def test_hook_order_before_in_list_order_after_in_reverse(identity_relu) -> None:
    log: list = []
    instruments = [HookLog(label, log) for label in "abc"]
    PassManager("test-noop,cleanup", instruments).run(identity_relu)
    forward = ["a", "b", "c"]
    backward = forward[::-1]
    expected = [(x, "before_pipeline", 2) for x in forward]
    for index in range(2):
        expected += [(x, "should_run", index) for x in forward]
        expected += [(x, "before_pass", index) for x in forward]
        expected += [(x, "after_pass", index) for x in backward]
    expected += [(x, "after_pipeline", 2) for x in forward]
    assert log == expected


def test_hook_order_when_a_pass_fails(identity_relu) -> None:
    log: list = []
    instruments = [HookLog(label, log) for label in "abc"]
    with pytest.raises(PassError):
        PassManager("cleanup,test-crash,test-noop", instruments).run(identity_relu)
    tail = [entry for entry in log if entry[2] == 1 and entry[1] != "before_pipeline"]
    assert tail == (
        [(x, "should_run", 1) for x in "abc"]
        + [(x, "before_pass", 1) for x in "abc"]
        + [(x, "after_pass_failed", 1) for x in "cba"]
    )
    assert not any(entry[1] == "after_pipeline" for entry in log)
    assert not any(entry[2] == 2 and entry[1] != "before_pipeline" for entry in log)


def test_after_pass_sees_modified_and_the_result(identity_relu) -> None:
    seen = []

    class Probe(Instrument):
        def after_pass(self, record, model):
            seen.append((record.modified, op_counts(model)["Identity"]))

    PassManager("cleanup,cleanup", [Probe()]).run(identity_relu)
    assert seen == [(True, 0), (False, 0)]


# ---------------------------------------------------------------------------------------------
# Failures


def test_raising_pass_becomes_pass_error(identity_relu) -> None:
    manager = PassManager("cleanup,test-scale-initializers{factor=3.0},test-crash,test-noop")
    with pytest.raises(PassError) as info:
        manager.run(identity_relu)
    error = info.value
    assert type(error) is PassError
    assert error.pass_name == "test-crash"
    assert error.index == 2
    assert error.previous == ("cleanup", "test-scale-initializers{factor=3.0}")
    message = str(error)
    assert "pass #2 'test-crash'" in message
    assert "(after cleanup,test-scale-initializers{factor=3.0})" in message
    assert "CrashError" in message and "boom" in message
    assert isinstance(error.__cause__, CrashError)
    assert error.exit_code == 1
    assert error.hint  # says how to get more detail
    records = error.records
    assert [r.status for r in records] == ["ok", "ok", "failed"]  # test-noop never started
    assert records[2].error.startswith("CrashError: boom")


def test_first_pass_failing_says_so(identity_relu) -> None:
    with pytest.raises(PassError) as info:
        PassManager("test-crash,cleanup").run(identity_relu)
    assert info.value.index == 0
    assert info.value.previous == ()
    assert "pass #0 'test-crash' (first pass)" in str(info.value)


def test_previous_lists_only_passes_that_ran(identity_relu) -> None:
    log: list = []
    with pytest.raises(PassError) as info:
        PassManager("test-noop,cleanup,test-crash", [HookLog("a", log, skip={0})]).run(
            identity_relu
        )
    assert info.value.previous == ("cleanup",)


def test_instrument_raising_in_after_pass_fails_the_pass(identity_relu) -> None:
    with pytest.raises(PassError) as info:
        PassManager("test-noop,cleanup", [RaiseAfter(1, ValueError("bad result"))]).run(
            identity_relu
        )
    error = info.value
    assert error.index == 1
    assert error.pass_name == "cleanup"
    assert "ValueError: bad result" in str(error)
    assert error.records[1].status == "failed"


def test_onnxforge_error_message_is_kept_without_type_prefix(identity_relu) -> None:
    with pytest.raises(PassError) as info:
        PassManager("cleanup", [RaiseAfter(0, InputError("a clear message"))]).run(identity_relu)
    assert str(info.value) == "pass #0 'cleanup' (first pass): a clear message"
    assert isinstance(info.value.__cause__, InputError)


def test_failed_verification_is_a_verification_error(scaled_relu) -> None:
    inputs = inputs_for(scaled_relu)
    verify = VerifyNumerics(Session.runner(), inputs, compare_outputs)
    with pytest.raises(VerificationError) as info:
        PassManager("test-relu-to-sigmoid", [verify]).run(scaled_relu)
    assert info.value.index == 0
    assert [r.status for r in info.value.records] == ["failed"]


def test_verification_error_names_the_passes_before_it(scaled_relu) -> None:
    inputs = inputs_for(scaled_relu)
    verify = VerifyNumerics(Session.runner(), inputs, compare_outputs)
    with pytest.raises(VerificationError) as info:
        PassManager("cleanup,test-relu-to-sigmoid", [verify]).run(scaled_relu)
    assert info.value.index == 1
    assert info.value.previous == ("cleanup",)
    assert "(after cleanup)" in str(info.value)
    assert "first pass" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# JSON


def test_pipeline_result_as_dict_is_json(scaled_relu) -> None:
    inputs = inputs_for(scaled_relu)
    instruments = [
        Ledger(),
        VerifyStructure(),
        VerifyNumerics(Session.runner(), inputs, compare_outputs),
        Timing(),
    ]
    result = PassManager("cleanup,test-noop,collapse-relu{max_rounds=2}", instruments).run(
        scaled_relu
    )
    data = result.as_dict()
    decoded = json.loads(json.dumps(data, allow_nan=False))
    assert decoded == data
    assert decoded["pipeline"] == "cleanup,test-noop,collapse-relu{max_rounds=2}"
    assert [p["text"] for p in decoded["passes"]] == [
        "cleanup",
        "test-noop",
        "collapse-relu{max_rounds=2}",
    ]
    assert [p["semantics"] for p in decoded["passes"]] == ["exact"] * 3
    assert [p["modified"] for p in decoded["passes"]] == [True, False, True]
    assert decoded["passes"][0]["drift"]["rel_l2"] == 0.0
    assert decoded["passes"][1]["drift"] is None  # unmodified: not re-run
    assert all(isinstance(p["wall_s"], float) for p in decoded["passes"])
    assert "model" not in decoded


def test_pass_record_as_dict_with_failure_is_json(identity_relu) -> None:
    with pytest.raises(PassError) as info:
        PassManager("cleanup,test-crash", [Timing(), Ledger()]).run(identity_relu)
    dumped = [json.loads(json.dumps(r.as_dict())) for r in info.value.records]
    assert [d["status"] for d in dumped] == ["ok", "failed"]
    assert "boom" in dumped[1]["error"]
    assert np.isfinite(dumped[1]["wall_s"])
