"""Export: bundled samples, modules and factory specs, checked against PyTorch."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import onnx_ir as ir
import pytest
import torch

import onnxforge
from onnxforge.backend import Session, compare_outputs
from onnxforge.errors import InputError
from onnxforge.frontend import EXPORT_CHECK_META_KEY
from onnxforge.samples import get_sample

# The export check's contract: ONNX Runtime within this relative L2 error of PyTorch.
EXPORT_CHECK_TOLERANCE = 1e-4

FACTORIES = """
import torch
from torch import nn


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU())


def module_only():
    return _net()


def module_and_inputs():
    return _net(), torch.randn(2, 4, generator=torch.Generator().manual_seed(1))


def not_a_module():
    return {"weights": [1, 2, 3]}


NOT_CALLABLE = 3
"""


@pytest.fixture
def factories(tmp_path, monkeypatch) -> str:
    """A module of factories importable under a name unique to this test."""
    name = "factories_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _torch_outputs(module: torch.nn.Module, inputs) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(*inputs)
    return [out.numpy()]


def test_seed_cnn_has_a_symbolic_batch(seed_cnn_model):
    (x,) = seed_cnn_model.graph.inputs
    (y,) = seed_cnn_model.graph.outputs
    assert isinstance(x.shape[0], ir.SymbolicDim)
    assert list(x.shape)[1:] == [3, 32, 32]
    assert isinstance(y.shape[0], ir.SymbolicDim)


def test_seed_cnn_export_check_is_recorded(seed_cnn_model):
    check = seed_cnn_model.meta[EXPORT_CHECK_META_KEY]
    assert 0 <= check["rel_l2"] < EXPORT_CHECK_TOLERANCE
    # The recorded figure covers the real comparison on the sample's example inputs.
    sample = get_sample("seed-cnn")
    inputs = sample.example_inputs(2)
    expected = _torch_outputs(sample.build(), inputs)
    got = Session(seed_cnn_model).run({seed_cnn_model.graph.inputs[0].name: inputs[0].numpy()})
    assert compare_outputs(expected, got).rel_l2 <= check["rel_l2"] + 1e-12


def test_seed_cnn_runs_at_another_batch(seed_cnn_model):
    sample = get_sample("seed-cnn")
    inputs = sample.example_inputs(5)
    expected = _torch_outputs(sample.build(), inputs)
    got = Session(seed_cnn_model).run({seed_cnn_model.graph.inputs[0].name: inputs[0].numpy()})
    assert got[0].shape == (5, 10)
    comparison = compare_outputs(expected, got)
    assert comparison.rel_l2 < EXPORT_CHECK_TOLERANCE
    assert comparison.top1 == 1.0


def test_export_a_module_with_example_inputs():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    example = torch.randn(3, 6)
    model = onnxforge.export(module, (example,))
    assert isinstance(model.graph.inputs[0].shape[0], ir.SymbolicDim)
    other = torch.randn(7, 6)
    got = Session(model).run({model.graph.inputs[0].name: other.numpy()})
    np.testing.assert_allclose(got[0], _torch_outputs(module, (other,))[0], rtol=1e-5, atol=1e-6)


def test_static_batch():
    module = torch.nn.Linear(4, 2)
    model = onnxforge.export(module, (torch.randn(3, 4),), dynamic_batch=False)
    assert model.graph.inputs[0].shape[0] == 3
    assert model.graph.outputs[0].shape[0] == 3
    assert model.meta[EXPORT_CHECK_META_KEY]["rel_l2"] < EXPORT_CHECK_TOLERANCE


def test_factory_returning_a_module_needs_example_inputs(factories):
    with pytest.raises(InputError, match="example inputs") as caught:
        onnxforge.export(f"{factories}:module_only")
    assert caught.value.hint


def test_factory_returning_a_module_with_given_inputs(factories):
    example = torch.randn(2, 4)
    model = onnxforge.export(f"{factories}:module_only", (example,))
    assert model.graph.inputs[0].shape[1] == 4
    assert model.meta[EXPORT_CHECK_META_KEY]["rel_l2"] < EXPORT_CHECK_TOLERANCE


def test_factory_returning_module_and_inputs(factories):
    import importlib

    module, example = importlib.import_module(factories).module_and_inputs()
    model = onnxforge.export(f"{factories}:module_and_inputs")
    got = Session(model).run({model.graph.inputs[0].name: example.numpy()})
    np.testing.assert_allclose(got[0], _torch_outputs(module, (example,))[0], rtol=1e-5, atol=1e-6)


def test_unknown_sample():
    with pytest.raises(InputError, match="no-such-sample") as caught:
        onnxforge.export("no-such-sample")
    assert "seed-cnn" in caught.value.hint


@pytest.mark.parametrize(
    "spec", ["onnxforge_no_such_module_xyz:build", "FACTORIES:missing_attribute"]
)
def test_bad_import(factories, spec):
    spec = spec.replace("FACTORIES", factories)
    with pytest.raises(InputError, match="cannot import") as caught:
        onnxforge.export(spec)
    assert spec in str(caught.value)


def test_factory_returning_a_non_module(factories):
    with pytest.raises(InputError, match="dict, not a torch.nn.Module"):
        onnxforge.export(f"{factories}:not_a_module")


def test_spec_naming_a_non_callable(factories):
    with pytest.raises(InputError):
        onnxforge.export(f"{factories}:NOT_CALLABLE")


def test_module_without_example_inputs():
    with pytest.raises(InputError, match="example inputs"):
        onnxforge.export(torch.nn.Linear(2, 2))
