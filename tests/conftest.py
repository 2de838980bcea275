"""Shared fixtures: a tiny ONNX model built from text, and the exported seed-cnn sample."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import pytest

import onnxforge

# Large enough (2 KiB) that the bias goes to the external data file when one is written.
TINY_WIDTH = 512


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--ep cuda`` runs the backend tests on the CUDA execution provider (the GPU machine)."""
    parser.addoption(
        "--ep",
        default="cpu",
        choices=("cpu", "cuda"),
        help="execution provider for the backend tests",
    )


@pytest.fixture(scope="session")
def ep(request: pytest.FixtureRequest) -> str:
    """The execution provider the backend tests run on."""
    return request.config.getoption("--ep")


def tiny_model_text(bias: np.ndarray) -> str:
    """ONNX text of ``y = Relu(Identity(x)) + bias`` with ``bias`` as an initializer."""
    values = ", ".join(repr(float(v)) for v in bias)
    return f"""
    <ir_version: 10, opset_import: ["" : 20]>
    tiny (float[N, {bias.size}] x) => (float[N, {bias.size}] y)
        <float[{bias.size}] bias = {{{values}}}>
    {{
        xi = Identity(x)
        r = Relu(xi)
        y = Add(r, bias)
    }}
    """


def default_bias() -> np.ndarray:
    """The tiny model's bias: distinct values, half of them negative."""
    return np.linspace(-1.0, 1.0, TINY_WIDTH, dtype=np.float32)


@pytest.fixture
def tiny_bias() -> np.ndarray:
    """The bias of the default tiny model."""
    return default_bias()


@pytest.fixture
def tiny_text() -> str:
    """ONNX text of the default tiny model (for building it in another process)."""
    return tiny_model_text(default_bias())


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., ir.Model]:
    """A factory: ``make_tiny_model(bias=None)`` builds a fresh tiny model."""

    def make(bias: np.ndarray | None = None) -> ir.Model:
        return ir.from_onnx_text(tiny_model_text(default_bias() if bias is None else bias))

    return make


@pytest.fixture
def tiny_model_path(tmp_path: pathlib.Path, make_tiny_model) -> pathlib.Path:
    """The tiny model saved with ``onnxforge.save`` (weights inline) in ``tmp_path``."""
    return onnxforge.save(make_tiny_model(), tmp_path / "tiny.onnx")


@pytest.fixture
def tiny_external_path(tmp_path: pathlib.Path, make_tiny_model) -> pathlib.Path:
    """The tiny model saved with its bias in ``tiny_ext.onnx.data``."""
    return onnxforge.save(make_tiny_model(), tmp_path / "tiny_ext.onnx", external_data=True)


@pytest.fixture
def tiny_reference() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """What the tiny model computes, in numpy: ``reference(x, bias)``."""

    def reference(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0) + bias

    return reference


@pytest.fixture(scope="session")
def seed_cnn_model() -> ir.Model:
    """The bundled seed-cnn sample, exported once per session (do not mutate; clone it)."""
    return onnxforge.export("seed-cnn")


@pytest.fixture(scope="session")
def seed_cnn_path(seed_cnn_model, tmp_path_factory) -> pathlib.Path:
    """The exported seed-cnn sample saved with ``onnxforge.save``."""
    folder = tmp_path_factory.mktemp("seed-cnn")
    return onnxforge.save(seed_cnn_model.clone(), folder / "seed-cnn.onnx")
