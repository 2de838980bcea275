"""``onnx_to_torch``: an ONNX graph as a trainable module, checked against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import onnxforge
from onnxforge.backend import Session
from onnxforge.errors import InputError
from onnxforge.onnx_to_torch import FALLBACK_PARAMETER_MODULE, SUPPORTED_OPS, onnx_to_torch
from onnxforge.passes.prune import PrunePass
from onnxforge.samples import get_sample
from onnxforge.samples.digits import DigitsCNN

HEADER = '<ir_version: 10, opset_import: ["" : 20]>\n'


def run_both(model: ir.Model, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime, converted module in eval mode) outputs on the same inputs."""
    module = onnx_to_torch(model).eval()
    with torch.no_grad():
        got = module(*(torch.from_numpy(inputs[name]) for name in module.input_names))
    return Session(model).run(inputs)[0], got.numpy()


@pytest.fixture(scope="module")
def digits() -> ir.Model:
    return onnxforge.export("digits-cnn")


@pytest.fixture(scope="module")
def pruned_digits(digits) -> ir.Model:
    pruning = [PrunePass(granularity="channel", sparsity=0.5)]
    return onnxforge.optimize(digits.clone(), pruning).model


@pytest.mark.parametrize("batch", [1, 7])
def test_matches_onnx_runtime_on_the_exported_and_the_pruned_sample(digits, pruned_digits, batch):
    x = get_sample("digits-cnn").example_inputs(batch)[0].numpy()
    for model in (digits, pruned_digits):
        expected, got = run_both(model, {"x": x})
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "seed-cnn", "resnet", "transformer"])
def test_matches_onnx_runtime_on_the_other_samples(name):
    model = onnxforge.export(name)
    sample = get_sample(name)
    names = [v.name for v in model.graph.inputs]
    inputs = {n: t.numpy() for n, t in zip(names, sample.example_inputs(3), strict=True)}
    expected, got = run_both(model, inputs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_parameters_keep_the_initializer_names(pruned_digits):
    module = onnx_to_torch(pruned_digits)
    parameters = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    assert parameters["features.0.weight"].shape == (8, 1, 3, 3)  # the pruned width
    assert parameters["classifier.1.weight"].shape == (10, 128)
    # BatchNormalization's statistics are buffers, not trained by the optimizer.
    assert "features.1.running_mean" in buffers and "features.1.running_mean" not in parameters
    floats = {
        name
        for name, value in pruned_digits.graph.initializers.items()
        if value.const_value.dtype.is_floating_point() and len(value.shape) >= 1
    }
    assert set(parameters) | set(buffers) == floats
    assert module.input_names == ["x"]


def test_gradients_reach_every_parameter(pruned_digits):
    module = onnx_to_torch(pruned_digits).train()
    x = get_sample("digits-cnn").example_inputs(16)[0]
    module(x).logsumexp(dim=1).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_training_mode_matches_torch_batch_norm():
    """In train mode the converted graph normalises by batch statistics and updates the
    running ones with the node's momentum, as the original nn.BatchNorm2d does."""
    torch.manual_seed(0)
    original = DigitsCNN((4, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    model = onnxforge.export(original.eval(), (x,))
    converted = onnx_to_torch(model).train()
    original.train()
    expected = original(x)
    got = converted(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    buffers = dict(converted.named_buffers())
    for name, value in original.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(buffers[name], value, rtol=1e-6, atol=1e-6)


def test_export_round_trip_keeps_names_and_outputs(pruned_digits):
    module = onnx_to_torch(pruned_digits)
    x = get_sample("digits-cnn").example_inputs(2)
    again = onnxforge.export(module, x)  # checked against PyTorch at batch 2 and 3
    assert [v.name for v in again.graph.inputs] == ["x"]
    assert set(pruned_digits.graph.initializers) - {"val_25_pruned"} <= set(
        again.graph.initializers
    )
    inputs = {"x": get_sample("digits-cnn").example_inputs(9)[0].numpy()}
    np.testing.assert_allclose(
        Session(again).run(inputs)[0], Session(pruned_digits).run(inputs)[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("body", "output"),
    [
        ("y = Conv<pads=[0,1,2,0], strides=[2,1]>(x, w)", "float[N,3,?,?]"),
        ("y = MaxPool<kernel_shape=[3,3], pads=[1,0,0,1]>(x)", "float[N,2,?,?]"),
        ("y = AveragePool<kernel_shape=[2,2], strides=[2,2]>(x)", "float[N,2,3,3]"),
        ("y = GlobalAveragePool(x)", "float[N,2,1,1]"),
        ("t = Transpose<perm=[0,2,3,1]>(x)\n y = Softmax<axis=-1>(t)", "float[N,6,6,2]"),
        ("f = Flatten<axis=2>(x)\n y = Gemm<transB=1, alpha=0.5>(f, g)", "float[?,3]"),
        (
            "s = Shape(x)\n d = Gather<axis=0>(s, i)\n u = Unsqueeze(d, z)\n"
            "c = Concat<axis=0>(u, m)\n y = Reshape(x, c)",
            "float[N,72]",
        ),
        ("y = ReduceMean<keepdims=0>(x, ax)", "float[N,2]"),
        ("y = Slice(x, st, en, sx)", "float[N,2,6,2]"),
    ],
)
def test_op_semantics_match_onnx_runtime(body, output):
    rng = np.random.default_rng(0)
    w = ", ".join(repr(float(v)) for v in rng.standard_normal(3 * 2 * 3 * 3))
    g = ", ".join(repr(float(v)) for v in rng.standard_normal(3 * 36))
    constants = (
        f"float[3,2,3,3] w = {{{w}}}, float[3,36] g = {{{g}}}, int64 i = {{0}}, "
        "int64[1] z = {0}, int64[1] m = {72}, int64[2] ax = {2, 3}, int64[1] st = {1}, "
        "int64[1] en = {1000}, int64[1] sx = {3}"
    )
    text = f"{HEADER}g (float[N,2,6,6] x) => ({output} y)\n<{constants}>\n{{\n{body}\n}}"
    model = ir.from_onnx_text(text)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    expected, got = run_both(model, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_ops_are_listed(digits):
    fused = onnxforge.optimize(digits.clone(), "fold-constants,cleanup,fuse").model
    with pytest.raises(InputError, match="unsupported ops com.microsoft::FusedConv") as caught:
        onnx_to_torch(fused)
    assert "before fuse" in caught.value.hint
    model = ir.from_onnx_text(f"{HEADER}g (float[N,4] x) => (float[N,4] y) {{ y = Hardmax(x) }}")
    with pytest.raises(InputError, match="Hardmax x1"):
        onnx_to_torch(model)
    assert "Hardmax" not in SUPPORTED_OPS


def test_a_name_that_is_no_module_path_goes_to_the_fallback_module():
    model = ir.from_onnx_text(
        f"{HEADER}g (float[N,4] x) => (float[N,4] y)\n"
        '<float[4] "weird/name:0" = {1.0, 2.0, 3.0, 4.0}, '
        "float[4] training = {1.0, 1.0, 1.0, 1.0}>\n"
        '{ t = Mul(x, "weird/name:0")\n y = Add(t, training) }'
    )
    module = onnx_to_torch(model)
    names = sorted(name for name, _ in module.named_parameters())
    # 'training' clashes with nn.Module.training, the other is no dotted path of words.
    assert names == [f"{FALLBACK_PARAMETER_MODULE}.p0", f"{FALLBACK_PARAMETER_MODULE}.p1"]
    x = np.ones((2, 4), np.float32)
    expected, got = run_both(model, {"x": x})
    np.testing.assert_array_equal(got, expected)
