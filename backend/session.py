"""ONNX Runtime sessions on the CPU or CUDA execution provider."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxforge.errors import InputError

__all__ = ["Session", "EP_PROVIDERS", "GRAPH_OPTIMIZATION_LEVELS", "available_eps"]

EP_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
GRAPH_OPTIMIZATION_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_eps() -> list[str]:
    """The execution providers this onnxruntime build offers, by our short names."""
    installed = ort.get_available_providers()
    return [name for name, provider in EP_PROVIDERS.items() if provider in installed]


def _resolve_providers(ep: str) -> list[str]:
    installed = ort.get_available_providers()
    if ep == "auto":
        ep = "cuda" if EP_PROVIDERS["cuda"] in installed else "cpu"
    if ep not in EP_PROVIDERS:
        raise InputError(f"unknown execution provider '{ep}'", hint="use cpu, cuda or auto")
    if EP_PROVIDERS[ep] not in installed:
        raise InputError(
            f"execution provider '{ep}' is not available in this onnxruntime "
            f"{ort.__version__} (installed: {', '.join(installed)})",
            hint="install onnxforge[cuda] (onnxruntime-gpu) in place of onnxruntime",
        )
    providers = [EP_PROVIDERS[ep]]
    return providers if ep == "cpu" else [*providers, EP_PROVIDERS["cpu"]]


def _has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )


class Session:
    """An ONNX Runtime inference session over an ``onnx_ir.Model`` or a model file."""

    def __init__(
        self,
        model_or_path: ir.Model | str | os.PathLike[str],
        *,
        ep: Literal["cpu", "cuda", "auto"] = "cpu",
        threads: int | None = None,
        graph_optimization: Literal["none", "basic", "extended", "all"] = "all",
        provider_options: Mapping[str, Any] | None = None,
    ) -> None:
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        if graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise InputError(
                f"unknown graph optimization level '{graph_optimization}'",
                hint=f"use one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}",
            )
        options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[graph_optimization]
        options.log_severity_level = 3  # errors only: warnings go through our own reporting
        providers = _resolve_providers(ep)
        provider_opts = [dict(provider_options or {})] + [{}] * (len(providers) - 1)
        self.ep = "cuda" if providers[0] == EP_PROVIDERS["cuda"] else "cpu"
        try:
            if isinstance(model_or_path, ir.Model):
                self._session = self._from_model(model_or_path, options, providers, provider_opts)
            else:
                self._session = ort.InferenceSession(
                    os.fspath(model_or_path),
                    options,
                    providers=providers,
                    provider_options=provider_opts,
                )
        except Exception as error:  # ORT raises its own exception types
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise InputError(f"ONNX Runtime cannot load the model: {first_line}") from error
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        # Initializers that are also graph inputs: a caller may feed them to override them.
        self.overridable_names = [i.name for i in self._session.get_overridable_initializers()]

    @staticmethod
    def _from_model(model: ir.Model, options, providers, provider_opts) -> ort.InferenceSession:
        if not _has_external_tensors(model):
            data = ir.to_proto(model).SerializeToString()
            return ort.InferenceSession(
                data, options, providers=providers, provider_options=provider_opts
            )
        # External tensors are read by ONNX Runtime from files next to the model.
        with tempfile.TemporaryDirectory(prefix="onnxforge-session-") as tmp:
            path = pathlib.Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.data")
            return ort.InferenceSession(
                os.fspath(path), options, providers=providers, provider_options=provider_opts
            )

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; returns the outputs in graph order."""
        missing = [name for name in self.input_names if name not in inputs]
        known = set(self.input_names) | set(self.overridable_names)
        unknown = [name for name in inputs if name not in known]
        if missing or unknown:
            raise InputError(
                f"inputs do not match the model: missing {missing or 'none'}, "
                f"unexpected {unknown or 'none'}",
                hint=f"the model takes: {', '.join(self.input_names)}",
            )
        feed = {name: np.asarray(value) for name, value in inputs.items()}
        return list(self._session.run(self.output_names, feed))

    @classmethod
    def runner(cls, *, ep: str = "cpu", threads: int | None = None):
        """A ``runner(model, inputs) -> outputs`` callable, as VerifyNumerics takes."""

        def run(model: ir.Model, inputs: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]:
            return cls(model, ep=ep, threads=threads).run(inputs)

        return run
