"""Session: ONNX Runtime over an IR model or a file, with checked inputs and providers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxforge
from onnxforge.backend import Session, available_eps
from onnxforge.backend.session import model_cuda_options
from onnxforge.errors import InputError
from onnxforge.passes.base import CUDA_PROVIDER_OPTIONS_KEY

CUDA_PROVIDER = "CUDAExecutionProvider"


@pytest.fixture
def x(tiny_bias) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3, tiny_bias.size)).astype(np.float32)


def test_session_from_an_ir_model(make_tiny_model, tiny_bias, tiny_reference, x, ep):
    session = Session(make_tiny_model(), ep=ep)
    assert session.ep == ep
    assert session.input_names == ["x"]
    assert session.output_names == ["y"]
    (y,) = session.run({"x": x})
    np.testing.assert_allclose(y, tiny_reference(x, tiny_bias), rtol=0, atol=0)


def test_session_from_a_path(tiny_model_path, tiny_bias, tiny_reference, x, ep):
    (y,) = Session(tiny_model_path, ep=ep).run({"x": x})
    np.testing.assert_allclose(y, tiny_reference(x, tiny_bias), rtol=0, atol=0)


def test_session_from_a_model_with_external_data(tiny_external_path, tiny_bias, tiny_reference, x):
    model = onnxforge.load(tiny_external_path)
    (y,) = Session(model).run({"x": x})
    np.testing.assert_allclose(y, tiny_reference(x, tiny_bias), rtol=0, atol=0)


def test_session_over_the_exported_sample(seed_cnn_path):
    session = Session(seed_cnn_path, threads=1)
    batch = np.zeros((4, 3, 32, 32), dtype=np.float32)
    (logits,) = session.run({session.input_names[0]: batch})
    assert logits.shape == (4, 10)
    # Every image is the same, so every row of logits is the same.
    np.testing.assert_array_equal(logits, np.broadcast_to(logits[0], logits.shape))


def test_run_with_a_missing_input(make_tiny_model):
    session = Session(make_tiny_model())
    with pytest.raises(InputError, match="missing") as caught:
        session.run({})
    assert "'x'" in str(caught.value)
    assert "x" in caught.value.hint


def test_run_with_an_extra_input(make_tiny_model, x):
    session = Session(make_tiny_model())
    with pytest.raises(InputError, match="unexpected") as caught:
        session.run({"x": x, "mystery": x})
    assert "mystery" in str(caught.value)
    assert caught.value.hint == "the model takes: x"


def test_cuda_on_a_machine_without_it(make_tiny_model):
    installed = ort.get_available_providers()
    if CUDA_PROVIDER in installed:
        pytest.skip("this onnxruntime has the CUDA execution provider")
    with pytest.raises(InputError, match="'cuda' is not available") as caught:
        Session(make_tiny_model(), ep="cuda")
    for provider in installed:
        assert provider in str(caught.value)
    assert caught.value.hint


def test_unknown_execution_provider(make_tiny_model):
    with pytest.raises(InputError, match="unknown execution provider 'tpu'") as caught:
        Session(make_tiny_model(), ep="tpu")
    assert "cpu" in caught.value.hint


def test_auto_picks_what_is_installed(make_tiny_model):
    expected = "cuda" if CUDA_PROVIDER in ort.get_available_providers() else "cpu"
    assert Session(make_tiny_model(), ep="auto").ep == expected
    assert "cpu" in available_eps()
    assert ("cuda" in available_eps()) == (expected == "cuda")


def test_unknown_graph_optimization_level(make_tiny_model):
    with pytest.raises(InputError, match="graph optimization level"):
        Session(make_tiny_model(), graph_optimization="ludicrous")


def test_a_model_onnx_runtime_cannot_load(make_tiny_model):
    model = make_tiny_model()
    next(iter(model.graph)).op_type = "NoSuchOp"
    with pytest.raises(InputError, match="ONNX Runtime cannot load the model"):
        Session(model)


def test_runner_runs_a_fresh_session(make_tiny_model, tiny_bias, tiny_reference, x):
    run = Session.runner()
    (y,) = run(make_tiny_model(), {"x": x})
    np.testing.assert_allclose(y, tiny_reference(x, tiny_bias), rtol=0, atol=0)


def test_an_initializer_that_is_also_an_input_can_be_overridden():
    import onnx_ir as ir

    model = ir.from_onnx_text(
        """<ir_version: 10, opset_import: ["" : 20]>
        g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}> { y = Mul(x, w) }"""
    )
    session = Session(model)
    x = np.array([3.0, 4.0], dtype=np.float32)
    np.testing.assert_array_equal(session.run({"x": x})[0], x * np.array([1.0, 2.0], np.float32))
    w = np.array([-1.0, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(session.run({"x": x, "w": w})[0], x * w)


def _with_cuda_options(model, text: str):
    model.metadata_props[CUDA_PROVIDER_OPTIONS_KEY] = text
    return model


def test_model_cuda_options_from_a_model_and_a_file(make_tiny_model, tmp_path):
    model = _with_cuda_options(make_tiny_model(), '{"prefer_nhwc": "1", "fuse_conv_bias": 1}')
    expected = {"prefer_nhwc": "1", "fuse_conv_bias": "1"}
    assert model_cuda_options(model) == expected
    path = onnxforge.save(model, tmp_path / "hinted.onnx", external_data=True)
    assert model_cuda_options(path) == expected
    assert model_cuda_options(make_tiny_model()) == {}


@pytest.mark.parametrize("text", ["not json", '["prefer_nhwc"]'])
def test_malformed_cuda_options_are_ignored(make_tiny_model, tmp_path, text):
    assert model_cuda_options(_with_cuda_options(make_tiny_model(), text)) == {}
    assert model_cuda_options(tmp_path / "missing.onnx") == {}


def test_recorded_cuda_options_apply_on_cuda_only_and_the_callers_win(make_tiny_model, ep, x):
    model = _with_cuda_options(make_tiny_model(), '{"prefer_nhwc": "1", "fuse_conv_bias": "1"}')
    session = Session(model, ep=ep, provider_options={"fuse_conv_bias": "0"})
    if ep == "cpu":
        assert session.provider_options == {"fuse_conv_bias": "0"}
    else:
        assert session.provider_options == {"prefer_nhwc": "1", "fuse_conv_bias": "0"}
        options = session._session.get_provider_options()[CUDA_PROVIDER]
        assert (options["prefer_nhwc"], options["fuse_conv_bias"]) == ("1", "0")
    assert session.run({"x": x})[0].shape == x.shape


def test_cuda_preset_cnn_runs_with_its_recorded_options(ep):
    if ep != "cuda":
        pytest.skip("the recorded options are for the CUDA provider (run with --ep cuda)")
    from onnxforge.presets import CUDA_PIPELINE

    exported = onnxforge.export("digits-cnn")
    model = onnxforge.optimize(exported, CUDA_PIPELINE).model
    images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    name = Session(exported).input_names[0]
    session = Session(model, ep="cuda")
    assert session.provider_options == {"prefer_nhwc": "1", "fuse_conv_bias": "1"}
    (want,) = Session(exported).run({name: images})
    (got,) = session.run({name: images})
    assert onnxforge.backend.compare_outputs([want], [got]).rel_l2 < 1e-2
