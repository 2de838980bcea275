"""Faults inside the pipeline: each reported with the pass named, and nothing published.

Three ways a pass can fail, each registered here for the length of a test: it raises; it
produces a graph that is not valid ONNX (caught by the default ``--verify structure``); it
produces a graph that ONNX Runtime refuses to load (caught by ``--verify numeric``, which runs
every result). The command exits 1 with one ``error:`` line naming the pass and its index, no
traceback, no output file, no temporary file, and the input as it was.
"""

from __future__ import annotations

import onnx_ir as ir
import pytest

import onnxforge
from onnxforge.errors import EXIT_VERIFICATION_FAILED, PassError, VerificationError
from onnxforge.passes import Pass, PassResult, Semantics, register
from onnxforge.passes import registry as pass_registry

from . import hostile


class RaisingPass(Pass):
    """Raises inside the pass."""

    name = "fault-raise"
    summary = "Raises."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        raise RuntimeError("boom inside the pass")


class InvalidGraphPass(Pass):
    """Feeds the first node a value that nothing defines: not a valid ONNX graph."""

    name = "fault-invalid"
    summary = "Breaks the graph."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        first = next(iter(model.graph))
        ghost = ir.Value(name="ghost", type=ir.TensorType(ir.DataType.FLOAT))
        first.replace_input_with(0, ghost)
        return PassResult(model, True)


class UnrunnablePass(Pass):
    """Turns Relu into an op of a domain ONNX Runtime has no kernel for (valid ONNX still)."""

    name = "fault-unrunnable"
    summary = "Makes the model unrunnable."
    semantics = Semantics.EXACT

    def call(self, model: ir.Model) -> PassResult:
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type, node.domain = "Frobnicate", "com.example"
        model.opset_imports["com.example"] = 1
        return PassResult(model, True)


FAULTS = {
    RaisingPass.name: ("structure", "boom inside the pass"),
    InvalidGraphPass.name: ("structure", "not a valid ONNX model"),
    UnrunnablePass.name: ("numeric", "the result no longer runs"),
}


@pytest.fixture(autouse=True)
def fault_passes():
    """The faulty passes, registered for one test only (the registry is global)."""
    for cls in (RaisingPass, InvalidGraphPass, UnrunnablePass):
        register(cls)
    yield
    for cls in (RaisingPass, InvalidGraphPass, UnrunnablePass):
        pass_registry.unregister(cls.name)


@pytest.fixture(params=["inline", "external"])
def model_path(request, tmp_path):
    """The tiny model, with its weight inline or in external data."""
    folder = tmp_path / "m"
    if request.param == "external":
        return hostile.write_external_model(folder)
    folder.mkdir()
    path = folder / "model.onnx"
    path.write_bytes(hostile.tiny_proto().SerializeToString())
    return path


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failing_pass_is_named_and_nothing_is_published(fault, model_path, run_cli):
    verify, reason = FAULTS[fault]
    folder = model_path.parent
    before = hostile.snapshot(folder)
    result = run_cli(
        "optimize", model_path, "-o", "out.onnx", "-p", f"cleanup,{fault}",
        "--verify", verify, "--ledger", "ledger.json",
        cwd=folder,
    )  # fmt: skip
    assert result.code == EXIT_VERIFICATION_FAILED, result.stderr
    (line,) = [line for line in result.lines if line.startswith("error:")]
    assert f"pass #1 '{fault}' (after cleanup)" in line and reason in line
    assert "Traceback" not in result.stderr + result.stdout
    assert "structure checks are off" not in result.stderr  # the input passed the checker
    after = hostile.snapshot(folder)
    assert '"status": "failed"' in after.pop("ledger.json")[1].decode()  # the ledger says so
    assert after == before  # no model written, no temporary file, the input untouched


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_the_api_raises_a_pass_error_naming_the_pass(fault, model_path):
    verify, reason = FAULTS[fault]
    model = onnxforge.load(model_path)
    with pytest.raises(PassError) as caught:
        onnxforge.optimize(model, f"cleanup,{fault}", verify=verify)
    assert caught.value.pass_name == fault and caught.value.index == 1
    assert caught.value.previous == ("cleanup",)
    assert reason in str(caught.value)
    if fault != RaisingPass.name:
        assert isinstance(caught.value, VerificationError)
    assert [r.status for r in caught.value.records] == ["ok", "failed"]


def test_structure_checks_read_no_external_weight(tmp_path, monkeypatch):
    # The checker sees external tensors as references: a model whose weights cannot be read
    # is still checked (and a broken graph still caught) without reading them.
    path = hostile.write_external_model(tmp_path / "m")
    model = onnxforge.load(path)
    monkeypatch.setattr(ir.ExternalTensor, "_load", lambda self: pytest.fail("a weight was read"))
    with pytest.raises(VerificationError, match="not a valid ONNX model"):
        onnxforge.optimize(model, InvalidGraphPass.name, verify="structure")
